"""``nfnets`` under torchrun for test_multinode's elastic restart: rank 1 kills itself once.

``NFNETS_TEST_KILL_AT_STEP=K`` makes rank 1 SIGKILL its own process right after optimizer
step K (uncatchable, as when a node dies), once: the file ``NFNETS_TEST_KILL_MARKER`` records
that it happened, so the group torchrun restarts runs to the end. ``NFNETS_TEST_SIGNAL=TERM``
sends SIGTERM instead (as a scheduler's preemption notice, to one rank only).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import nfnets.train as train_module
from nfnets.cli import main

_should_save = train_module._should_save


def _dying_should_save(cfg, state):
    marker = Path(os.environ["NFNETS_TEST_KILL_MARKER"])
    at = int(os.environ["NFNETS_TEST_KILL_AT_STEP"])
    if os.environ.get("RANK") == "1" and state["step"] == at and not marker.exists():
        name = os.environ.get("NFNETS_TEST_SIGNAL", "KILL")
        marker.write_text(f"{'killed' if name == 'KILL' else 'signalled'} rank 1 at step {at}\n")
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
    return _should_save(cfg, state)


if __name__ == "__main__":
    train_module._should_save = _dying_should_save
    sys.exit(main(sys.argv[1:]))
