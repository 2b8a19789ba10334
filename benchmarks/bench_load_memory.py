"""Peak memory of loading an official-format NFNet-F0 file, against the 2x-file baseline.

Writes a random NFNet-F0 (71.5M parameters) in DeepMind's pickle format with the test suite's
independent writer (``tests/official_format.py``), then loads it in fresh processes,
alternating two cases ``--repeats`` times each:

- ``load_model``: ``nfnets.load_model(file)`` as ``nfnets eval``/``predict`` use it (declared
  shapes checked first; each array released once converted);
- ``official_to_state_dict``: the baseline, reading the tree and converting it whole with the
  public ``official_to_state_dict`` (every array alive until the end).

Each process reports its own peak (``VmHWM``, since exec) minus its peak after ``import nfnets``
and building one meta-device model (the one-time imports a first model build costs), as a
multiple of the file size. Medians and spread go to ``benchmarks/results/load_memory.json``.

Usage::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_load_memory.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import sys, torch, nfnets
from nfnets.weights import official_to_state_dict, read_official_checkpoint

def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))

with torch.device("meta"):
    nfnets.create_model("nfnet_f0")
base = hwm()
if sys.argv[2] == "load_model":
    nfnets.load_model(sys.argv[1])
else:
    official_to_state_dict(read_official_checkpoint(sys.argv[1]))
print((hwm() - base) * 1024)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/load_memory.json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import torch
    from official_format import to_official, write_official

    import nfnets

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random_f0_haiku.npz"
        torch.manual_seed(0)
        write_official(path, to_official(nfnets.create_model("nfnet_f0").state_dict(), "nfnet"))
        size = path.stat().st_size
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        growth: dict[str, list[float]] = {"load_model": [], "official_to_state_dict": []}
        for r in range(args.repeats):
            cases = list(growth) if r % 2 == 0 else list(reversed(growth))
            for case in cases:
                out = subprocess.run([sys.executable, "-c", _CHILD, str(path), case], env=env,
                                     capture_output=True, text=True, check=True).stdout
                growth[case].append(int(out.split()[-1]) / size)
    result = {case: {"median_x_file": round(statistics.median(v), 2),
                     "min_x_file": round(min(v), 2), "max_x_file": round(max(v), 2)}
              for case, v in growth.items()}
    result["file_mb"] = round(size / 1e6, 1)
    result["setup"] = {"repeats": args.repeats, "torch": torch.__version__,
                       "python": platform.python_version(),
                       "command": "PYTHONPATH=src OMP_NUM_THREADS=1 python "
                                  "benchmarks/bench_load_memory.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
