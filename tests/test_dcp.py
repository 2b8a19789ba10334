"""Sharded (DCP) checkpoints of ``--fsdp`` runs: layout, integrity, resharding, convert.

One 2-rank ``--fsdp`` run (module fixture) writes the sharded checkpoints the tests read; a
1-process run of the same recipe is the reference (2 ranks equal 1 up to float rounding: NF
nets have no batch statistics, and the digits demo draws no stochastic depth or dropout).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from nfnets.checkpoint import (
    CheckpointWarning,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    remove_temp_checkpoints,
    write_manifest,
)
from nfnets.cli import main as run
from nfnets.errors import CheckpointError, RunFailed
from nfnets.files import sha256_file

# 22 steps an epoch of 16 px digits at batch 64; AGC tight enough that some units clip.
COMMON = ["--epochs", "1", "--no-progress", "--train-size", "16", "--batch-size", "64",
          "--lr", "0.2", "--warmup-epochs", "0.2", "--clipping", "0.002", "--log-every", "1"]
SHARD_FILES = {".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"}


def _nfnets(*args: str, timeout: float = 180) -> None:
    """``nfnets ...`` in a fresh process (``--nproc 2`` relaunches under torchrun)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "nfnets", *args], env=env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A 2-rank --fsdp run stopped at step 3, a checkpoint at each step, the last 2 kept."""
    out = tmp_path_factory.mktemp("dcp") / "run"
    _nfnets("train", "--out", str(out), "--nproc", "2", "--fsdp", *COMMON, "--save-every", "1",
            "--keep-checkpoints", "2", "--stop-at-step", "3")
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same recipe in one process, uninterrupted to step 6 (checkpoints at 3 and 6)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert run(["train", "--out", str(out), *COMMON, "--save-every", "3",
                "--stop-at-step", "6"]) == 0
    return out


def _copy(run_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def _assert_same_state(got: dict, want: dict) -> None:
    """Model, EMA and momentum of two checkpoints equal (≤ 1e-6), and the same position."""
    for key in ("step", "epoch", "batch_in_epoch"):
        assert got[key] == want[key], key
    assert got["model"].keys() == want["model"].keys()
    pairs = [(got["model"], want["model"], "model"),
             (got["ema"]["module"], want["ema"]["module"], "ema")]
    for have, expected, what in pairs:
        for key, value in expected.items():
            torch.testing.assert_close(have[key], value, rtol=0, atol=1e-6, msg=f"{what} {key}")
    assert got["ema"]["num_updates"] == want["ema"]["num_updates"]
    have, expected = _momentum_by_name(got), _momentum_by_name(want)
    assert have.keys() == expected.keys() and len(have) == len(got["model"])
    for name, value in expected.items():
        torch.testing.assert_close(have[name], value, rtol=0, atol=1e-6, msg=f"momentum {name}")


def _momentum_by_name(checkpoint: dict) -> dict:
    """Momentum buffers keyed by parameter name, whichever form the checkpoint holds (names
    from a sharded run, positions in the optimizer's param groups from a plain one)."""
    from nfnets import create_model
    from nfnets.optim import sgd_agc

    state, groups = checkpoint["optimizer"]["state"], checkpoint["optimizer"]["param_groups"]
    flat = [p for group in groups for p in group["params"]]
    if isinstance(flat[0], str):
        return {name: state[name]["momentum_buffer"] for name in flat}
    cfg = checkpoint["config"]
    model = create_model(checkpoint["model_name"], **checkpoint["model_kwargs"])
    optimizer = sgd_agc(model, cfg["lr"], momentum=cfg["momentum"],
                        weight_decay=cfg["weight_decay"], clipping=cfg["clipping"] or None)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {order[i]: state[i]["momentum_buffer"] for i in flat}


# ----------------------------------------------------------------------------------------------
# Layout, atomicity, pruning


@pytest.mark.slow
def test_fsdp_run_writes_sharded_checkpoints_with_a_manifest(sharded_run):
    found = list_checkpoints(sharded_run / "checkpoints")
    assert [p.name for p in found] == ["step_00000002.dcp", "step_00000003.dcp"]  # kept 2
    assert sorted(p.name for p in (sharded_run / "checkpoints").iterdir()) == [
        p.name for p in found]  # no temp directory, no single file
    for path in found:
        names = {p.name for p in path.iterdir()}
        assert names == SHARD_FILES | {"manifest.sha256"}
        lines = (path / "manifest.sha256").read_text().splitlines()
        listed = dict(reversed(line.split("  ")) for line in lines)
        assert set(listed) == SHARD_FILES
        assert all(sha256_file(path / name) == digest for name, digest in listed.items())
    config = json.loads((sharded_run / "config.json").read_text())
    assert config["world_size"] == 2


@pytest.mark.slow
def test_checkpoint_read_whole_in_one_process_equals_the_single_process_run(
        sharded_run, reference, tmp_path):
    # No process group here: DCP reads every rank's shards into whole tensors.
    got = load_checkpoint(sharded_run / "checkpoints" / "step_00000003.dcp")
    want = load_checkpoint(reference / "checkpoints" / "step_00000003.pt")
    _assert_same_state(got, want)
    assert got["world_size"] == 2 and got["total_steps"] == want["total_steps"] == 22


# ----------------------------------------------------------------------------------------------
# Verification on resume: damaged directories moved aside, fallback to the previous one


def _damage(path, how: str) -> None:
    if how == "flipped byte":
        shard = path / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    elif how == "missing shard":
        (path / "__0_0.distcp").unlink()
    elif how == "extra file":
        (path / "__2_0.distcp").write_bytes(b"stray")
    elif how == "no manifest":
        (path / "manifest.sha256").unlink()
    elif how == "damaged manifest":
        (path / "manifest.sha256").write_text("not a manifest\n")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flipped byte", "missing shard", "extra file", "no manifest",
                                 "damaged manifest"])
def test_damaged_sharded_checkpoint_is_moved_aside_and_the_previous_one_used(
        sharded_run, tmp_path, how):
    out = _copy(sharded_run, tmp_path)
    newest = out / "checkpoints" / "step_00000003.dcp"
    _damage(newest, how)
    with pytest.warns(CheckpointWarning, match="step_00000003.dcp is unusable") as caught:
        state = load_latest_checkpoint(out / "checkpoints", full=False)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert state["step"] == 2 and state["sharded_path"].endswith("step_00000002.dcp")
    assert not newest.exists()
    assert (out / "checkpoints" / "step_00000003.dcp.corrupt").is_dir()  # kept, not deleted
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002.dcp"]


@pytest.mark.slow
def test_metadata_is_unpickled_with_an_allow_list(sharded_run, tmp_path):
    # A directory whose manifest matches (a crafted one, or ours rewritten) still cannot
    # run code through DCP's pickled .metadata.
    out = _copy(sharded_run, tmp_path)
    path = out / "checkpoints" / "step_00000003.dcp"
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (path / ".metadata").write_bytes(pickle.dumps(Payload()))
    write_manifest({p.name: sha256_file(p) for p in path.iterdir()
                    if p.name != "manifest.sha256"}, path / "manifest.sha256")
    with pytest.raises(CheckpointError, match="not allowed in DCP metadata"):
        load_checkpoint(path)
    assert not marker.exists()


def test_leftover_temp_directories_are_removed(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    leftover = checkpoints / "step_00000004.dcp.tmp-0123456789ab"
    leftover.mkdir(parents=True)
    (leftover / "__0_0.distcp").write_bytes(b"half written")
    kept = checkpoints / "step_00000004.dcp.tmp-mine"  # not our pattern: left alone
    kept.mkdir()
    assert remove_temp_checkpoints(checkpoints) == [leftover]
    assert not leftover.exists() and kept.exists()
    assert list_checkpoints(checkpoints) == []


# ----------------------------------------------------------------------------------------------
# Resharding: 2 → 1 and 1 → 2, equal to the uninterrupted run


@pytest.mark.slow
def test_two_rank_sharded_run_resumed_by_one_process(sharded_run, reference, tmp_path, capsys):
    out = _copy(sharded_run, tmp_path)
    leftover = out / "checkpoints" / "step_00000004.dcp.tmp-0123456789ab"  # a killed save
    leftover.mkdir()
    assert run(["train", "--resume", str(out), "--stop-at-step", "6", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "resume on 1 process (the run used 2): global batch 64 kept, 32 per process per " \
           "micro-batch × --grad-accum 2" in printed
    assert not leftover.exists()
    got = load_checkpoint(out / "checkpoints")  # a plain run writes single files again
    assert got["path"].endswith("step_00000006.pt")
    _assert_same_state(got, load_checkpoint(reference / "checkpoints" / "step_00000006.pt"))
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 1
    assert config["train"]["grad_accum"] == 2 and config["train"]["fsdp"] is False
    assert config["resumes"][-1]["changes"]["world_size"] == {"from": 2, "to": 1}


@pytest.mark.slow
def test_one_process_run_resumed_by_two_sharded_ranks(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "checkpoints" / "step_00000006.pt").unlink()  # resume from step 3
    (out / "checkpoints" / "step_00000006.pt.sha256").unlink()
    _nfnets("train", "--resume", str(out), "--nproc", "2", "--fsdp", "--stop-at-step", "6",
            "--no-progress")
    got = load_checkpoint(out / "checkpoints")
    assert got["path"].endswith("step_00000006.dcp")  # the sharded run writes shards
    _assert_same_state(got, load_checkpoint(reference / "checkpoints" / "step_00000006.pt"))
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["train"]["fsdp"] is True
    assert config["train"]["grad_accum"] == 1  # 1 × 64 → 2 × 32 per micro-batch


# ----------------------------------------------------------------------------------------------
# Keeping the global batch on another world size, or refusing


@pytest.mark.parametrize("before,accum,batch,world,expected", [
    (2, 1, 64, 1, 2),  # the micro-batch stays: accumulation takes the missing process
    (2, 2, 64, 4, 1),
    (1, 1, 64, 2, 1),  # 1 micro-batch cannot split: 2 × 32 instead of 1 × 64
    (4, 1, 64, 2, 2),
])
def test_resume_on_another_world_size_keeps_the_global_batch(tmp_path, before, accum, batch,
                                                             world, expected):
    from nfnets.train import TrainConfig, _fit_world

    (tmp_path / "config.json").write_text(json.dumps({"world_size": before}))
    cfg = TrainConfig(batch_size=batch, grad_accum=accum)
    applied: dict = {}
    _fit_world(cfg, applied, tmp_path, world)
    assert cfg.grad_accum == expected and cfg.batch_size == batch
    assert batch % (world * cfg.grad_accum) == 0
    assert applied["world_size"] == (before, world)


def test_resume_that_cannot_keep_the_global_batch_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert run(["train", "--out", str(out), *COMMON, "--batch-size", "63",
                "--stop-at-step", "1"]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; refused before any rank waits
    assert run(["train", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "global batch 63" in err[0] and "cannot be split evenly over 2 processes" in err[0]


def test_schedule_horizon_may_change_only_with_epochs():
    from nfnets.train import _check_horizon

    _check_horizon(22, 22, {})
    _check_horizon(22, 44, {"epochs": (1, 2)})
    with pytest.raises(RunFailed, match="schedule from 22 to 21 steps"):
        _check_horizon(22, 21, {})


# ----------------------------------------------------------------------------------------------
# nfnets convert and the inference commands on a sharded run


@pytest.mark.slow
def test_convert_gathers_a_sharded_run_into_one_safetensors_file(sharded_run, reference,
                                                                  tmp_path):
    want = load_checkpoint(reference / "checkpoints" / "step_00000003.pt")
    for flags, expected in (([], want["model"]), (["--ema"], want["ema"]["module"])):
        target = tmp_path / f"x{len(flags)}.safetensors"
        assert run(["convert", str(sharded_run), "-o", str(target), *flags]) == 0
        got = load_file(target)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
    from nfnets.weights import load_model, read_weights_metadata

    metadata = read_weights_metadata(tmp_path / "x1.safetensors")
    assert metadata["model_name"] == "nfnet_f0" and "content_sha256" in metadata
    assert json.loads(metadata["classes"]) == [str(i) for i in range(10)]
    # the converted file is a weights file like any other; the run itself loads too
    model, info = load_model(tmp_path / "x1.safetensors")
    direct, direct_info = load_model(sharded_run, ema=True)
    assert direct_info["source"].endswith("step_00000003.dcp") and direct_info["ema"]
    for (key, a), b in zip(model.state_dict().items(), direct.state_dict().values(),
                           strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_inference_commands_read_a_sharded_run(sharded_run, tmp_path, capsys):
    assert run(["eval", str(sharded_run), "--data", "digits", "--batch-size", "120"]) == 0
    assert "step_00000003.dcp" in capsys.readouterr().out


def test_third_party_dcp_directory_without_manifest_is_refused(tmp_path):
    path = tmp_path / "checkpoints" / "step_00000001.dcp"
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"anything")
    with pytest.raises(CheckpointError, match="no manifest.sha256 inside"):
        load_checkpoint(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(CheckpointError, match="no usable checkpoint"):
            load_latest_checkpoint(tmp_path / "checkpoints", move_aside=False)


# ----------------------------------------------------------------------------------------------
# A save stopped at any stage leaves the previous checkpoint good


@pytest.fixture
def one_rank_group():
    """A 1-rank gloo process group in this process (FSDP2 and DCP run on it)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded_training_state():
    """A tiny FSDP2-sharded model, its EMA and an optimizer after one step."""
    from nfnets import create_model
    from nfnets.distributed import shard_model
    from nfnets.optim import EMA, sgd_agc
    from nfnets.train import DIGITS_MODEL_ARGS

    model = create_model("nfnet_f0", num_classes=10, **DIGITS_MODEL_ARGS)
    ema = EMA(model, 0.9)
    shard_model(model)
    shard_model(ema.module)
    optimizer = sgd_agc(model, 0.1, momentum=0.9, weight_decay=2e-5, clipping=0.01)
    model(torch.randn(2, 3, 16, 16)).logsumexp(-1).mean().backward()
    optimizer.step()
    small = {"step": 1, "epoch": 0, "batch_in_epoch": 1, "model_name": model.model_name,
             "model_kwargs": model.model_kwargs, "ema": {"num_updates": 0, "decay": 0.9}}
    return model, ema, optimizer, small


@pytest.mark.parametrize("stage", ["save", "write_manifest", "_fsync", "replace"])
def test_a_sharded_save_stopped_at_any_stage_leaves_the_previous_one(tmp_path, monkeypatch,
                                                                      one_rank_group, stage):
    import nfnets.distributed_checkpoint as module

    model, ema, optimizer, small = _sharded_training_state()
    checkpoints = tmp_path / "checkpoints"
    module.save_sharded_checkpoint(model, ema.module, optimizer, small, checkpoints, 1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as far as the files go, what a kill leaves

    if stage == "save":
        import torch.distributed.checkpoint as dcp

        monkeypatch.setattr(dcp, "save", killed)
    elif stage == "replace":
        monkeypatch.setattr(module.os, "replace", killed)
    else:
        monkeypatch.setattr(module, stage, killed)
    with pytest.raises(KeyboardInterrupt):
        module.save_sharded_checkpoint(model, ema.module, optimizer, {**small, "step": 2},
                                       checkpoints, 2)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_00000001.dcp"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # verifies: nothing moved aside
        state = load_latest_checkpoint(checkpoints)
    assert state["step"] == 1
    torch.testing.assert_close(state["model"]["stem.conv0.weight"],
                               model.state_dict()["stem.conv0.weight"].full_tensor())
    assert len(remove_temp_checkpoints(checkpoints)) == 1  # the interrupted save's directory
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000001.dcp"]


def test_a_full_disk_during_a_sharded_save_is_one_line(tmp_path, monkeypatch, one_rank_group):
    import errno

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    import nfnets.distributed_checkpoint as module

    model, ema, optimizer, small = _sharded_training_state()
    checkpoints = tmp_path / "checkpoints"
    module.save_sharded_checkpoint(model, ema.module, optimizer, small, checkpoints, 1)

    def full(*args, **kwargs):  # what DCP raises, on every rank, when a rank's write fails
        cause = OSError(errno.ENOSPC, "No space left on device")
        raise CheckpointException("save failed", {0: (cause, None)})

    monkeypatch.setattr(dcp, "save", full)
    with pytest.raises(RunFailed, match="No space left on device") as caught:
        module.save_sharded_checkpoint(model, ema.module, optimizer, {**small, "step": 2},
                                       checkpoints, 2)
    assert "\n" not in str(caught.value)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_00000001.dcp"]
    assert load_latest_checkpoint(checkpoints)["step"] == 1
