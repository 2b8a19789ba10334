"""Many nodes: two torchrun "nodes" on this machine, joined by a c10d rendezvous.

Each node runs one process; with ``--fsdp``, gradient accumulation and gradient checkpointing
the pair must end where one plain process with the same global batch ends (NF nets have no
batch statistics, so splitting the batch only changes float rounding), with AGC clipping some
units and not others.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from nfnets.checkpoint import load_checkpoint
from nfnets.cli import main as run

STEPS = 3
# A tiny run: 16 px digits, the demo's scaled-down F0, AGC tight enough that some units clip.
COMMON = ["--epochs", "1", "--no-progress", "--train-size", "16", "--batch-size", "64",
          "--lr", "0.2", "--warmup-epochs", "0.2", "--clipping", "0.002", "--log-every", "1",
          "--stop-at-step", str(STEPS)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(rank: int, port: int, out, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "nfnets-test",
               "-m", "nfnets", "train", "--out", str(out), *COMMON, *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.slow
def test_two_torchrun_nodes_with_fsdp_equal_one_process(tmp_path):
    port = _free_port()
    extra = ["--fsdp", "--grad-accum", "2", "--grad-checkpointing"]
    nodes = [_node(rank, port, tmp_path / "two", extra) for rank in (0, 1)]
    try:
        logs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, log in zip(nodes, logs, strict=True):
        assert node.returncode == 0, log[-3000:]
    assert run(["train", "--out", str(tmp_path / "one"), *COMMON]) == 0

    one = load_checkpoint(tmp_path / "one" / "checkpoints")
    two = load_checkpoint(tmp_path / "two" / "checkpoints")
    assert one["step"] == two["step"] == STEPS
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=0, atol=1e-6, msg=key)
    for key, value in one["ema"]["module"].items():
        torch.testing.assert_close(two["ema"]["module"][key], value, rtol=0, atol=1e-6,
                                   msg=key)
    assert one["model"]["blocks.0.skip_gain"].abs() > 0  # the weights moved
    # AGC clipped some units and not others, and the sharded count is the global one.
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").open()]
    reference = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").open()]
    fractions = [r["clip_fraction"] for r in records]
    assert all(0 < f < 1 for f in fractions)
    assert fractions == pytest.approx([r["clip_fraction"] for r in reference], abs=1e-6)


def test_resume_auto_starts_fresh_then_continues(tmp_path):
    # What a job script re-run as is (or torchrun restarting a failed group) relies on.
    out = tmp_path / "run"
    base = ["train", "--out", str(out), "--resume", "auto", "--epochs", "1", "--no-progress",
            "--train-size", "16", "--batch-size", "64", "--log-every", "1"]
    assert run([*base, "--stop-at-step", "1"]) == 0  # nothing there: a fresh start
    first = load_checkpoint(out / "checkpoints")
    assert first["step"] == 1
    assert run([*base, "--stop-at-step", "2"]) == 0  # a checkpoint there: continued
    assert load_checkpoint(out / "checkpoints")["step"] == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()]
    assert steps == [1, 2]  # the second run did not start over
