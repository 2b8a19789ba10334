"""nfnets.memory (the per-GPU batch planner) and benchmarks/bench_memory.py's measurement."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from nfnets import memory
from nfnets.cli import main as run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "memory.json"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory",
                                                  ROOT / "benchmarks" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text, expected", [
    ("80GB", 80 * 2**30), ("80 GiB", 80 * 2**30), ("141G", 141 * 2**30),
    ("40000MB", 40000 * 2**20), ("1.5TB", int(1.5 * 2**40)), ("123", 123),
])
def test_parse_memory(text, expected):
    assert memory.parse_memory(text) == expected


def test_parse_memory_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="80GB"):
        memory.parse_memory("eighty gigs")


def test_fit_batch_and_grad_accum():
    assert memory.fit_batch(100, per_sample=10, fixed=25) == 7  # 25 + 7·10 <= 100 < 25 + 80
    assert memory.fit_batch(20, per_sample=10, fixed=25) == 0
    # 4096 over 64 GPUs is 64 per GPU: 40 fit, so 2 steps of 32.
    assert memory.grad_accum(4096, 64, 40) == 2
    assert memory.grad_accum(4096, 64, 64) == 1
    assert memory.grad_accum(4096, 8, 3) == 256  # 512 per GPU in micro-batches of 2
    assert memory.grad_accum(4096, 8, 0) is None


def test_plan_adds_up(monkeypatch):
    per_sample, step_fixed = 100 * 2**20, 3 * 2**30
    figures = {"per_sample_bytes": dict.fromkeys(
                   ("fp32", "fp32_checkpointing", "bf16", "bf16_checkpointing"), per_sample),
               "step_fixed_bytes": dict.fromkeys(
                   ("fp32", "fp32_checkpointing", "bf16", "bf16_checkpointing"), step_fixed)}
    monkeypatch.setattr(memory, "MEASURED", {"nfnet_f0": figures})
    result = memory.plan("F0", 80 * 2**30, "bf16", gpus=8)
    params, largest, root = memory._unit_params("nfnet_f0")
    ddp = result["plans"]["ddp"]
    assert ddp["state_bytes"] == params * 20  # 16 B of fp32 state + 4 B of DDP buckets
    free = 80 * 2**30 - memory.RESERVE_BYTES - params * 20 - step_fixed
    assert ddp["per_gpu_batch"] == free // per_sample
    fsdp = result["plans"]["fsdp"]
    assert fsdp["state_bytes"] == round(params * 16 / 8 + (2 * largest + root) * 6)
    assert fsdp["per_gpu_batch"] >= ddp["per_gpu_batch"]
    with pytest.raises(KeyError, match="no measured memory figures"):
        memory.plan("nfnet_f1", 80 * 2**30)


def test_measured_figures_are_the_benchmark_results():
    results = json.loads(RESULTS.read_text())
    assert set(memory.MEASURED) == set(results["variants"])
    for name, entry in results["variants"].items():
        assert memory.MEASURED[name]["per_sample_bytes"] == entry["per_sample_bytes"], name
        assert memory.MEASURED[name]["step_fixed_bytes"] == entry["step_fixed_bytes"], name
    # Deeper and wider variants at larger sizes need more per image; checkpointing less.
    f0, f7 = memory.MEASURED["nfnet_f0"], memory.MEASURED["nfnet_f7"]
    for mode in ("fp32", "bf16"):
        assert f7["per_sample_bytes"][mode] > f0["per_sample_bytes"][mode]
        assert (f0["per_sample_bytes"][mode + "_checkpointing"]
                < f0["per_sample_bytes"][mode])


def test_info_prints_the_batch_that_fits(capsys):
    assert run(["info", "nfnet_f1", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "training batch per GPU in 80 GiB" in out and "--grad-accum" in out
    assert "source: per-sample and fixed step memory: benchmarks/results/memory.json" in out
    assert run(["info", "nfnet_f1", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err


def test_tiny_measurement_grows_with_the_batch():
    bench = _bench()
    # Big enough maps (64 px, batches 2 and 8) that each image adds megabytes, far above the
    # page-level noise of the resident set.
    job = {"model": "nfnet_f0", "size": 64, "batches": [2, 8], "device": "cpu",
           "model_args": {"widths": [32, 64, 128, 128], "depths": [1, 1, 1, 1],
                          "group_width": 16, "num_classes": 10}}
    result = bench.run_child(job)
    for mode, figures in result["modes"].items():
        low, high = figures["peaks"]
        assert high > low > 0, mode
        assert figures["per_sample"] > 2**19, mode  # over half a MiB per 64 px image
    # bf16 autocast keeps half-size activations where fp32 keeps full ones.
    assert result["modes"]["bf16"]["per_sample"] < result["modes"]["fp32"]["per_sample"]
