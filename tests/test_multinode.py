"""Many nodes: two torchrun "nodes" on this machine, joined by a c10d rendezvous.

Each node runs one process; with ``--fsdp``, gradient accumulation and gradient checkpointing
the pair must end where one plain process with the same global batch ends (NF nets have no
batch statistics, so splitting the batch only changes float rounding), with AGC clipping some
units and not others.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nfnets.checkpoint import load_checkpoint
from nfnets.cli import main as run

# A tiny run: one epoch (22 steps, evaluation, final weights) of 16 px digits with the demo's
# scaled-down F0, AGC tight enough that some units clip.
COMMON = ["--epochs", "1", "--no-progress", "--train-size", "16", "--batch-size", "64",
          "--lr", "0.2", "--warmup-epochs", "0.2", "--clipping", "0.002", "--log-every", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(rank: int, port: int, out, extra: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "nfnets-test",
               "-m", "nfnets", "train", "--out", str(out), *COMMON, *extra]
    # Output to a file: an unread pipe fills up and blocks the process writing to it.
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_torchrun_nodes_with_fsdp_equal_one_process(tmp_path):
    port = _free_port()
    extra = ["--fsdp", "--grad-accum", "2", "--grad-checkpointing"]
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = [_node(rank, port, tmp_path / "two", extra, log.open("w"))
             for rank, log in zip((0, 1), logs, strict=True)]
    try:
        for node in nodes:
            node.wait(timeout=240)
    finally:
        for node in nodes:
            node.kill()
    for node, log in zip(nodes, logs, strict=True):
        assert node.returncode == 0, log.read_text()[-3000:]
    assert run(["train", "--out", str(tmp_path / "one"), *COMMON]) == 0

    for name in ("model.safetensors", "model_ema.safetensors"):  # gathered from the shards
        one, two = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert one.keys() == two.keys()
        for key, value in one.items():
            torch.testing.assert_close(two[key], value, rtol=0, atol=1e-6, msg=f"{name} {key}")
    assert one["blocks.0.skip_gain"].abs() > 0  # the weights moved
    summaries = [json.loads((tmp_path / run_dir / "summary.json").read_text())
                 for run_dir in ("one", "two")]
    assert summaries[0]["steps"] == summaries[1]["steps"] == 22
    # Evaluation of the gathered model (ranks hold different numbers of batches).
    assert summaries[1]["val_top1"] == pytest.approx(summaries[0]["val_top1"])
    assert summaries[1]["val_top1_ema"] == pytest.approx(summaries[0]["val_top1_ema"])
    # AGC clipped some units and not others, and the sharded count is the global one.
    records, reference = ([r for line in (tmp_path / run_dir / "metrics.jsonl").open()
                           if (r := json.loads(line))["kind"] == "train"]
                          for run_dir in ("two", "one"))
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



# ----------------------------------------------------------------------------------------------
# Elastic restart: one rank killed mid-epoch, torchrun restarts the group, --resume auto


def _torchrun_elastic(out, log_path, extra: list[str], timeout: float, nodes: int = 1,
                      restarts: int = 1, signal_name: str = "KILL", at_step: int = 5) -> int:
    """torchrun --max-restarts 1 over 2 ranks of tests/elastic_train.py; its exit status.

    ``nodes=2`` starts two torchrun agents ("nodes") of one rank each, joined by the c10d
    rendezvous, instead of one agent with two ranks. Rank 1 sends itself ``SIG<signal_name>``
    after step ``at_step``, once (tests/elastic_train.py). Robust under pytest: output goes to
    a file (an unread pipe fills and blocks the writer), no DataLoader workers (children a
    killed rank would leave behind), a 60 s limit on any collective, and past ``timeout`` the
    agents and their ranks are killed: torchrun starts each rank in a session of its own, so
    they are found by parentage, not by process group.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NFNETS_TEST_KILL_AT_STEP": str(at_step),
           "NFNETS_TEST_SIGNAL": signal_name,
           "NFNETS_TEST_KILL_MARKER": str(out.parent / f"{out.name}.killed"),
           "NFNETS_DIST_TIMEOUT": "60",
           # a fresh rendezvous store per restart round (see nfnets.train: torchrun's shared
           # store kept the killed group's addresses, so the restarted one could not connect)
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    script = os.path.join(os.path.dirname(__file__), "elastic_train.py")
    layout = (["--nproc-per-node", "2"] if nodes == 1 else
              ["--nnodes", str(nodes), "--nproc-per-node", "1", "--rdzv-id", "nfnets-elastic"])
    command = [sys.executable, "-m", "torch.distributed.run", "--max-restarts", str(restarts),
               *layout,
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
               "--monitor-interval", "0.5",
               script, "train", "--out", str(out), "--resume", "auto", *COMMON,
               "--save-every", "2", "--stop-at-step", "6", "--num-workers", "0", *extra]
    with open(log_path, "w") as log:
        agents = [subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True) for _ in range(nodes)]
        try:
            return max(abs(agent.wait(timeout=timeout)) for agent in agents)
        except subprocess.TimeoutExpired:
            for agent in agents:
                for pid in [agent.pid, *_descendants(agent.pid)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                agent.wait()
            raise


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux /proc), children first."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One process, the same recipe, to step 6 without a break."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert run(["train", "--out", str(out), *COMMON, "--stop-at-step", "6"]) == 0
    return load_checkpoint(out / "checkpoints")


def _assert_equals_uninterrupted(out, uninterrupted) -> None:
    """The run in ``out`` ended at step 6 with the uninterrupted run's weights and EMA."""
    final = load_checkpoint(out / "checkpoints")
    assert final["step"] == 6
    for part, reference in (("model", uninterrupted["model"]),
                            ("ema", uninterrupted["ema"]["module"])):
        got = final[part] if part == "model" else final["ema"]["module"]
        for key, value in reference.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=f"{part} {key}")


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "nodes"), [([], 1), (["--fsdp"], 1), ([], 2)],
                         ids=["ddp", "fsdp", "ddp-two-nodes"])
def test_killed_rank_is_restarted_by_torchrun_and_resumes(tmp_path, uninterrupted, extra, nodes):
    out, log = tmp_path / "run", tmp_path / "torchrun.log"
    status = _torchrun_elastic(out, log, extra, timeout=150, nodes=nodes)
    text = log.read_text()
    assert status == 0, text[-4000:]
    assert (tmp_path / "run.killed").read_text() == "killed rank 1 at step 5\n"
    assert "resuming" in text  # the restarted group continued the run, not a fresh start
    _assert_equals_uninterrupted(out, uninterrupted)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 5's record, written before the kill, redone


def test_restartable_group_without_a_fresh_rendezvous_store_is_warned(monkeypatch, capsys):
    from nfnets.train import _warn_shared_rendezvous_store

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # what torchrun sets by default
    monkeypatch.setenv("RANK", "0")
    _warn_shared_rendezvous_store()
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # a fresh store per round
    _warn_shared_rendezvous_store()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value,expected", [("60", 60.0), ("", None)])
def test_collective_timeout_from_the_environment(monkeypatch, value, expected):
    from nfnets.train import _collective_timeout

    monkeypatch.setenv("NFNETS_DIST_TIMEOUT", value)
    timeout = _collective_timeout()
    assert (timeout.total_seconds() if timeout else None) == expected


def test_bad_collective_timeout_is_one_line(monkeypatch):
    from nfnets.errors import UsageError
    from nfnets.train import _collective_timeout

    monkeypatch.setenv("NFNETS_DIST_TIMEOUT", "soon")
    with pytest.raises(UsageError, match="NFNETS_DIST_TIMEOUT must be a positive number"):
        _collective_timeout()


@pytest.mark.slow
def test_sigterm_on_one_fsdp_rank_stops_the_group_with_a_sharded_checkpoint(tmp_path,
                                                                           uninterrupted):
    """A preemption notice reaching one rank only: both ranks finish the step, write a sharded
    checkpoint together and exit 143; the same command then resumes to the uninterrupted run."""
    from nfnets.checkpoint import list_checkpoints, verify_checkpoint

    out = tmp_path / "run"
    first = tmp_path / "first.log"
    status = _torchrun_elastic(out, first, ["--fsdp"], timeout=150, restarts=0,
                               signal_name="TERM", at_step=3)
    text = first.read_text()
    assert status != 0, text[-4000:]  # the agent reports its ranks' exit status
    # the first rank to exit reports 128 + SIGTERM (torchrun then ends the other, which has
    # written its shards by then: the save is collective)
    assert "exitcode  : 143" in text, text[-4000:]
    # the one traceback is torchrun's own report of the ranks' exit status, none is a rank's
    assert text.count("Traceback") == 1 and "ChildFailedError" in text, text[-4000:]
    assert "[rank0]" not in text and "[rank1]" not in text, text[-4000:]
    assert f"nfnets train --resume {out}" in text
    assert (tmp_path / "run.killed").read_text() == "signalled rank 1 at step 3\n"
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == "step_00000003.dcp"
    verify_checkpoint(newest)
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]
    second = tmp_path / "second.log"
    assert _torchrun_elastic(out, second, ["--fsdp"], timeout=150, restarts=0) == 0, \
        second.read_text()[-4000:]
    _assert_equals_uninterrupted(out, uninterrupted)
