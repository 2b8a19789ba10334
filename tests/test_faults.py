"""Fault injection: kills, signals, corrupted checkpoints, shared folders, hostile files, full
disks. docs/reliability.md lists each guarantee and the test here that holds it.

Runs are the digits demo at 8 px, one epoch of 11 steps (batch 128), so a whole run takes about
a second; interrupted runs are forked from this process (torch is already imported), killed or
signalled, and resumed in-process. Every resumed run must end with exactly the weights of one
uninterrupted reference run (CPU, one thread: bit-identical).
"""

import contextlib
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import nfnets.plots
import nfnets.weights
from nfnets.checkpoint import (
    list_checkpoints,
    load_latest_checkpoint,
    manifest_path,
    save_checkpoint,
    verify_checkpoint,
)
from nfnets.cli import main
from nfnets.errors import CheckpointError, UsageError
from nfnets.lock import RunLock
from nfnets.train import TrainConfig, train

FLAGS = ["--train-size", "8", "--epochs", "1", "--batch-size", "128", "--lr", "0.4",
         "--warmup-epochs", "0.2", "--no-progress", "--save-every", "2", "--log-every", "1",
         "--keep-checkpoints", "20"]
STEPS = 11  # 1437 // 128
STOP = 6  # interrupted runs are compared at this step's checkpoint, with the reference's


def tiny(out, **changes) -> TrainConfig:
    values = dict(out=str(out), train_size=8, epochs=1, batch_size=128, lr=0.4,
                  warmup_epochs=0.2, progress=False, save_every=2, log_every=1,
                  keep_checkpoints=20)
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    # Drawing PNGs costs seconds per run and is not what these tests are about.
    monkeypatch.setattr(nfnets.plots, "plot_run", lambda out: [])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: its final raw and EMA weights and its checkpoint at STOP."""
    out = tmp_path_factory.mktemp("reference") / "run"
    original = nfnets.plots.plot_run
    nfnets.plots.plot_run = lambda out: []
    try:
        train(tiny(out))
    finally:
        nfnets.plots.plot_run = original
    return (load_file(out / "model.safetensors"), load_file(out / "model_ema.safetensors"),
            torch.load(out / "checkpoints" / f"step_{STOP:08d}.pt", weights_only=True))


def assert_same_as_reference(out: Path, reference) -> None:
    for name, expected in zip(("model.safetensors", "model_ema.safetensors"), reference[:2],
                              strict=True):
        got = load_file(out / name)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), (name, key)


def assert_same_checkpoint_as_reference(out: Path, reference) -> None:
    """The run's checkpoint at STOP equals the uninterrupted run's, tensor for tensor."""
    got = load_latest_checkpoint(out / "checkpoints")
    expected = reference[2]
    assert got["step"] == STOP
    for part in ("model", "ema", "optimizer"):
        a, b = _tensors(got[part]), _tensors(expected[part])
        assert a.keys() == b.keys() and a
        for key in a:
            assert torch.equal(a[key], b[key]), (part, key)


def _tensors(tree, prefix="") -> dict:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(
        tree, list) else []
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def _stop_tqdm_monitor() -> None:
    # tqdm's monitor thread (started by any earlier test that showed a bar) can hold tqdm's
    # lock at the moment of fork; the child then waits on it forever in its first bar.
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.monitor_interval = 0
    if tqdm.monitor is not None:
        tqdm.monitor.exit()
        tqdm.monitor = None


def fork(target) -> int:
    """Run ``target()`` in a forked child whose stdout/stderr go to files; return its pid."""
    _stop_tqdm_monitor()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        # GNU OpenMP's thread pool does not survive fork: once an earlier test ran a parallel
        # region with several threads, the child's first multi-threaded op waits forever on
        # the parent's workers. One thread keeps every parallel region in the child itself.
        torch.set_num_threads(1)
        try:
            code = target()
        except BaseException:  # noqa: BLE001 - the parent reads the status
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = 60) -> int:
    """Exit status of a child (negative: killed by that signal)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("child did not finish")


def cli_child(args, log: Path):
    def target():
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        return main(["train", *args])
    return target


def train_lines(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_text().count('"kind": "train"')
    except FileNotFoundError:
        return 0


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.tmp")]


# ----------------------------------------------------------------------------------------------
# 1. Checkpoint integrity


def test_bit_flips_at_20_random_offsets_are_all_detected(tmp_path):
    torch.manual_seed(0)
    state = {"model": {"w": torch.randn(64, 64), "b": torch.randn(64)}, "step": 3,
             "ema": {"module": {"w": torch.randn(64, 64)}}, "rng": [1, 2, 3]}
    path = save_checkpoint(state, tmp_path, 3)
    good = path.read_bytes()
    verify_checkpoint(path)  # the pristine file passes
    rng = random.Random(0)
    detected = 0
    for offset in rng.sample(range(len(good)), 20):
        flipped = bytearray(good)
        flipped[offset] ^= 1 << rng.randrange(8)
        path.write_bytes(flipped)
        with contextlib.suppress(CheckpointError):
            verify_checkpoint(path)
            continue
        detected += 1
    assert detected == 20
    path.write_bytes(good)
    manifest = manifest_path(path).read_bytes()
    for offset in (0, 10, 63, len(manifest) - 2):  # a damaged digest is found too
        flipped = bytearray(manifest)
        flipped[offset] ^= 0x40
        manifest_path(path).write_bytes(flipped)
        with pytest.raises(CheckpointError):
            verify_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate", "zero-bytes", "flip", "no-manifest"])
def test_each_kind_of_damage_falls_back_to_the_previous_checkpoint(tmp_path, damage):
    for step in (1, 2):
        save_checkpoint({"model": {"w": torch.full((256,), float(step))}, "step": step},
                        tmp_path, step)
    newest = list_checkpoints(tmp_path)[-1]
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "zero-bytes":
        newest.write_bytes(b"")
    elif damage == "flip":
        newest.write_bytes(data[:600] + bytes([data[600] ^ 4]) + data[601:])
    else:
        manifest_path(newest).unlink()
    with pytest.warns(UserWarning, match="moved aside to step_00000002.pt.corrupt"):
        state = load_latest_checkpoint(tmp_path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.full((256,), 1.0))
    assert (tmp_path / "step_00000002.pt.corrupt").exists()  # renamed, never deleted


def test_resume_skips_damaged_checkpoints_and_ends_as_the_uninterrupted_run(
        tmp_path, reference, capsys):
    out = tmp_path / "run"
    train(tiny(out, stop_at_step=6))  # checkpoints at steps 2, 4, 6
    second, newest = list_checkpoints(out / "checkpoints")[-2:]
    data = newest.read_bytes()  # the case: 64 bytes flipped in the middle (EMA)
    middle = len(data) // 2
    newest.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64])
                       + data[middle + 64:])
    second.write_bytes(second.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    err = printed.err.strip().splitlines()
    assert len(err) == 2 and all("trying the previous one" in line for line in err)
    last = printed.out.strip().splitlines()[-1]  # the final line counts skipped images
    assert "done." in last and "0 unreadable images skipped" in last
    assert (out / "checkpoints" / f"{newest.name}.corrupt").exists()
    assert_same_as_reference(out, reference)  # resumed from step 2, identically


def test_when_every_checkpoint_is_bad_resume_exits_2_naming_each(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(out, stop_at_step=4))
    found = list_checkpoints(out / "checkpoints")
    found[0].write_bytes(b"")
    found[1].write_bytes(found[1].read_bytes()[:100])
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "no usable checkpoint" in err
    assert all(p.name in err for p in found)
    assert not (out / "model.safetensors").exists()  # never exit 0 with corrupt weights


def test_a_written_weights_file_carries_a_digest_that_finds_damage(tmp_path):
    model = nfnets.create_model("nfnet_f0", num_classes=3, widths=(16, 16, 16, 16),
                                depths=(1, 1, 1, 1), group_width=8)
    path = tmp_path / "w.safetensors"
    nfnets.save_weights(model, path)
    assert nfnets.weights.read_weights_metadata(path)["content_sha256"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="SHA-256"):
        nfnets.load_weights(path)


# ----------------------------------------------------------------------------------------------
# 2. kill -9 at random moments, during checkpoint writes included


@pytest.mark.slow
def test_kill_9_at_random_moments_always_resumes_to_the_same_weights(tmp_path, reference):
    rng = random.Random(11)
    during_write = 0
    for trial in range(10):
        out = tmp_path / f"kill{trial}"
        pid = fork(lambda out=out: (train(tiny(out, stop_at_step=STOP)), 0)[1])
        # Odd trials: kill the moment a checkpoint's temp file exists (mid-write); even
        # trials: at a random moment of the run.
        deadline = time.monotonic() + (30 if trial % 2 else rng.uniform(0.0, 1.0))
        status = None
        while time.monotonic() < deadline and status is None:
            if trial % 2 and any(p.suffix == ".tmp" for p in (out / "checkpoints").glob(
                    ".step_*")):
                during_write += 1
                break
            done, raw = os.waitpid(pid, os.WNOHANG)
            status = os.waitstatus_to_exitcode(raw) if done else None
            time.sleep(0.0005)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            status = wait(pid)
        assert status in (-signal.SIGKILL, 0), (trial, status)
        if (out / "config.json").exists():
            train(tiny(out, stop_at_step=STOP), resume=out)
        else:  # killed before the run wrote anything durable: the same command starts it
            train(tiny(out, stop_at_step=STOP))
        assert not temp_files(out), trial  # the resume removed what the kill left
        assert_same_checkpoint_as_reference(out, reference)
    assert during_write >= 3  # kills really landed inside checkpoint writes


# ----------------------------------------------------------------------------------------------
# 3. Signals: finish the step, checkpoint, print how to resume, exit 128+N


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_matches(tmp_path, reference, sig):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    pid = fork(cli_child(["--out", str(out), *FLAGS, "--stop-at-step", str(STOP)], log))
    deadline = time.monotonic() + 30
    while train_lines(out) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(pid, sig)
    assert wait(pid) == 128 + sig
    printed = log.read_text()
    assert f"nfnets train --resume {out}" in printed and "Traceback" not in printed
    step = load_latest_checkpoint(out / "checkpoints")["step"]
    assert 3 <= step < STOP  # stopped after the step in progress, with a checkpoint
    assert not temp_files(out)
    assert main(["train", "--resume", str(out), "--stop-at-step", str(STOP)]) == 0
    assert_same_checkpoint_as_reference(out, reference)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().split(
        "\n") if line]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no step logged twice


def test_under_ddp_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    import torch.distributed as dist

    from nfnets.train import _StopRequest

    def rank_main(rank: int):
        def target():
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}",
                                    rank=rank, world_size=2)
            stop = _StopRequest(announce=False)
            answers = [stop.agreed(2, torch.device("cpu"))]  # step 1: nobody was signalled
            if rank == 1:
                stop.signum = signal.SIGTERM  # only rank 1 received it
            answers.append(stop.agreed(2, torch.device("cpu")))  # step 2
            dist.destroy_process_group()
            return 1 if answers == [None, signal.SIGTERM] else 2
        return target

    pids = [fork(rank_main(rank)) for rank in (0, 1)]
    assert [wait(pid) for pid in pids] == [1, 1]  # both ranks: no stop, then SIGTERM


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    pid = fork(cli_child(["--out", str(out), *FLAGS, "--epochs", "50"], log))
    deadline = time.monotonic() + 30
    while train_lines(out) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(pid, signal.SIGINT)
    while "SIGINT received" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.001)  # two signals before the handler runs would count as one
    os.kill(pid, signal.SIGINT)
    assert wait(pid) == 130
    assert "interrupted" in log.read_text()
    assert not temp_files(out)


# ----------------------------------------------------------------------------------------------
# 4. One run per folder


def test_a_second_run_on_a_locked_folder_exits_2_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    ready = tmp_path / "ready"

    def hold():
        with RunLock(out):
            ready.touch()
            time.sleep(30)
        return 0

    pid = fork(hold)
    try:
        while not ready.exists():
            time.sleep(0.01)
        start = time.monotonic()
        assert main(["train", "--out", str(out), *FLAGS]) == 2
        assert time.monotonic() - start < 20  # refused, not trained
        err = capsys.readouterr().err
        assert f"pid {pid}" in err and "in use by another run" in err
    finally:
        os.kill(pid, signal.SIGKILL)
        wait(pid)
    # The holder died without releasing: its lock is gone with it, the folder is free.
    with RunLock(out):
        pass


def test_without_record_locks_a_dead_holder_is_stale_and_a_live_one_refuses(tmp_path,
                                                                             monkeypatch):
    import errno
    import fcntl
    import socket

    def no_locks(fd, flags):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    lock_file = tmp_path / ".lock"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer exists
    lock_file.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with RunLock(tmp_path):  # stale: taken over
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock_file.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                     "since": "now"}))
    with pytest.raises(UsageError, match=f"pid {os.getppid()}"):
        RunLock(tmp_path).acquire()


def test_a_new_run_refuses_a_folder_holding_a_run_and_overwrite_moves_it_aside(tmp_path,
                                                                                 capsys):
    out = tmp_path / "run"
    train(tiny(out, stop_at_step=2))
    capsys.readouterr()
    assert main(["train", "--out", str(out), *FLAGS]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert main(["train", "--out", str(out), *FLAGS, "--stop-at-step", "1",
                 "--overwrite"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and list_checkpoints(aside[0] / "checkpoints")  # old run kept
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000001.pt"]


def test_resume_applies_or_refuses_every_flag(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny(out, stop_at_step=4))
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--lr", "0.5", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.4 → 0.5" in err and "--batch-size 128 → 4" in err
    # A longer schedule is applied, printed and recorded.
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress",
                 "--stop-at-step", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"--epochs 1 → 2: the cosine schedule now ends at step {2 * STEPS}" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["epochs"] == 2
    assert config["resumes"][-1]["changes"]["epochs"] == {"from": 1, "to": 2}
    # The run's own value is not a change; an unchanged flag is accepted silently.
    assert main(["train", "--resume", str(out), "--lr", "0.4", "--model-arg", "group_width=16",
                 "--stop-at-step", "6", "--no-progress"]) == 0
    assert main(["train", "--resume", str(out), "--model-arg", "group_width=8"]) == 2
    assert "--model-arg {" in capsys.readouterr().err


def test_pruning_never_deletes_the_new_checkpoints(tmp_path):
    for step in (100, 101, 102):  # an older run's higher steps
        save_checkpoint({"model": {}, "step": step}, tmp_path, step)
    for step in (1, 2, 3, 4):
        new = save_checkpoint({"model": {}, "step": step}, tmp_path, step, keep=2)
        assert new.exists()
    assert {p.name for p in list_checkpoints(tmp_path)} >= {"step_00000003.pt",
                                                             "step_00000004.pt"}


# ----------------------------------------------------------------------------------------------
# 5. Hostile files: refused, peak memory bounded

_HOSTILE = r"""
import pickle, resource, sys, zipfile
import numpy as np
import nfnets
from nfnets.errors import CheckpointError, UsageError
from nfnets.weights import (convert_official, load_model, load_pretrained,
                            read_official_checkpoint)
from nfnets.untrusted import load_torch_archive
model = nfnets.create_model("nfnet_f0", num_classes=10, widths=(16, 16, 16, 16),
                            depths=(1, 1, 1, 1), group_width=8)
refused = []
for path in sys.argv[1:]:
    for load in (read_official_checkpoint, lambda p: load_pretrained(model, p), load_model,
                 lambda p: convert_official(p, p + ".out"), load_torch_archive):
        try:
            load(path)
        except CheckpointError as err:
            assert "weights_only=False" not in str(err)
            refused.append(1)
        except Exception as err:
            print("NOT REFUSED CLEANLY", path, type(err).__name__, err)
print("refused", len(refused))
# VmHWM: this process's own peak since exec. getrusage's ru_maxrss would also count the
# parent's resident memory at the fork (Linux carries it across exec), i.e. pytest's.
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("maxrss_kib", int(peak.split()[1]), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _array_pickle_with_shape(shape) -> bytes:
    """Official-format pickle: one array whose state declares ``shape`` (4 GiB) over 4 bytes."""
    class Array:
        def __reduce__(self):
            return (np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                    (1, shape, np.dtype("float32"), False, b"\0\0\0\0"))
    return pickle.dumps({"NFNet/~/linear": {"w": Array()}}, protocol=2)


def _zip_bomb(path: Path, inflated: int = 2 << 30) -> None:
    """A torch-style archive whose data.pkl is deflated: ~2 MB inflating to 2 GiB of zeros.

    Built from one full-flushed deflate block repeated (a full flush resets the window, so the
    block is position-independent); the CRC is not computed as nothing may inflate it.
    """
    chunk = 1 << 20
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = block.compress(bytes(chunk)) + block.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    data = body * (inflated // chunk) + end
    name = b"archive/data.pkl"
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, 0, len(data),
                        inflated, len(name), 0) + name
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, 0,
                          len(data), inflated, len(name), 0, 0, 0, 0, 0, 0) + name
    end_record = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central),
                             len(local) + len(data), 0)
    path.write_bytes(local + data + central + end_record)


@pytest.mark.slow
def test_hostile_files_are_refused_with_bounded_peak_memory(tmp_path):
    files = []
    for name, payload in [
        ("reconstruct.npz", _reconstruct_pickle()),
        ("ndarray_call.npz", _ndarray_call_pickle()),
        ("setstate.npz", _array_pickle_with_shape((1, 1, 32768, 32768))),
        ("binbytes8.npz", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"\0" * 16),
    ]:
        (tmp_path / name).write_bytes(payload)
        files.append(tmp_path / name)
    assert (tmp_path / "reconstruct.npz").stat().st_size < 200  # the 182-byte file
    _zip_bomb(tmp_path / "bomb.pt")
    assert (tmp_path / "bomb.pt").stat().st_size < 3 << 20
    files.append(tmp_path / "bomb.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _HOSTILE, *map(str, files)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "NOT REFUSED" not in result.stdout, result.stdout
    assert f"refused {5 * len(files)}" in result.stdout
    peak = int(result.stdout.split("maxrss_kib")[1].split()[0]) * 1024
    assert peak < 1.5e9, f"peak RSS {peak / 1e9:.2f} GB"


def _reconstruct_pickle() -> bytes:
    """The issue's file: ``_reconstruct(ndarray, (1,1,32768,32768), b'b')``, a 4 GiB array."""
    class Array:
        def __reduce__(self):
            return (np._core.multiarray._reconstruct, (np.ndarray, (1, 1, 32768, 32768), b"b"))
    return pickle.dumps({"NFNet/~/linear": {"w": Array()}}, protocol=2)


def _ndarray_call_pickle() -> bytes:
    class Array:
        def __reduce__(self):
            return (np.ndarray, ((1, 1, 32768, 32768), np.dtype("float32")))
    return pickle.dumps({"NFNet/~/linear": {"w": Array()}}, protocol=2)


def test_official_shapes_are_checked_against_the_target_before_any_conversion(
        tmp_path, monkeypatch):
    from official_format import to_official, write_official

    small = dict(depths=(1, 1, 1, 1), group_width=8)
    source = nfnets.create_model("nfnet_f0", num_classes=4, widths=(16, 16, 16, 16), **small)
    path = write_official(tmp_path / "tiny_haiku.npz", to_official(source.state_dict(), "nfnet"))
    target = nfnets.create_model("nfnet_f0", num_classes=4, widths=(16, 16, 32, 32), **small)

    def no_conversion(tree):
        raise AssertionError("converted before the shapes were checked")

    monkeypatch.setattr(nfnets.weights, "_convert_releasing", no_conversion)
    with pytest.raises(CheckpointError, match="does not fit"):
        nfnets.load_pretrained(target, path)
    with pytest.raises(CheckpointError, match="does not fit"):
        nfnets.weights.convert_official(path, tmp_path / "out.safetensors", "nfnet_f1")


def test_torch_refusals_never_suggest_weights_only_false(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError) as caught:
        nfnets.load_pretrained(torch.nn.Linear(2, 2), path)
    message = str(caught.value)
    assert "weights_only" not in message and str(path) in message and "\n" not in message


# ----------------------------------------------------------------------------------------------
# 6. Full and read-only disks


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a 3 MB tmpfs here ({done.stderr.strip()})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_gives_one_line_and_keeps_the_previous_checkpoint(tiny_disk, capsys):
    # One checkpoint of this model is ~2.7 MB: the first fits in 3 MB, the second cannot.
    out = tiny_disk / "run"
    code = main(["train", "--out", str(out), *FLAGS, "--train-size", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "could not write" in err[0] and "free on" in err[0]
    assert "intact" in err[0] or "no checkpoint had been written" in err[0]
    assert not temp_files(out)
    for path in list_checkpoints(out / "checkpoints"):
        verify_checkpoint(path)


def test_a_read_only_folder_gives_one_line(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only folders; the tmpfs test covers the message")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    assert main(["train", "--out", str(folder / "run"), *FLAGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Permission denied" in err[0]


# ----------------------------------------------------------------------------------------------
# 7. User mistakes: one line, before the first step


@pytest.mark.parametrize("args,message", [
    (["--train-size", "0"], "--train-size must be >= 1"),
    (["--train-size", "-3"], "--train-size must be >= 1"),
    (["--test-size", "0"], "--test-size must be >= 1"),
    (["--train-size", "16", "--test-size", "24"], "give --train-size only"),
    (["--momentum", "5"], "--momentum must be in [0, 1)"),
    (["--nproc", "0"], "--nproc must be >= 1"),
])
def test_mistakes_are_refused_before_anything_runs(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (out / "config.json").exists()


def test_resume_of_a_config_without_train_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model": "nfnet_f0"}))
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no 'train' section" in err[0]


def test_config_accepts_a_runs_own_config_and_warnings_are_one_line(tmp_path, capsys):
    first = tmp_path / "first"
    train(tiny(first, stop_at_step=1))
    capsys.readouterr()
    out = tmp_path / "second"
    assert main(["train", "--config", str(first / "config.json"), "--out", str(out),
                 "--warmup-epochs", "3", "--stop-at-step", "1"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    warning = [line for line in err if "warning" in line]
    assert warning == [line for line in err if "never reaches its peak" in line]
    assert len(warning) == 1 and warning[0].startswith("nfnets: warning: --warmup-epochs 3")
    assert json.loads((out / "config.json").read_text())["train"]["train_size"] == 8


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"nfnets {nfnets.__version__}"


def test_agc_passes_the_closure_on_so_lbfgs_works():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    optimizer = nfnets.AGC(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5),
                           clipping=None)
    calls = []

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        calls.append(loss.item())
        return loss

    first = torch.nn.functional.mse_loss(model(x), y).item()
    optimizer.step(closure)
    assert len(calls) > 1  # LBFGS re-evaluated it
    assert torch.nn.functional.mse_loss(model(x), y).item() < first


def test_export_without_the_extra_is_one_line(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main(["export", "nfnet_f0", "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'nfnets[export]'" in err[0]

