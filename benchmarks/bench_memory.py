"""Peak training memory per sample of every NFNet variant, by the allocator's peak.

What is measured: the memory one training forward + backward pass adds per image (the
activations autograd saves, plus transient buffers), for each NFNet variant at its train
resolution, in fp32 and bf16 autocast, with and without gradient checkpointing. The fixed
part (weights, gradients, momentum, EMA, FSDP's unsharded working set) follows from the
parameter counts: see ``nfnets.memory``, which holds the figures this script writes.

How (CPU): each variant runs in its own subprocess with glibc's mmap threshold at 64 KiB,
so every large tensor is its own mapping, returned to the kernel when freed, and the resident
set follows live memory. Before each measured step the peak resident set (VmHWM) is reset
through ``/proc/self/clear_refs``; the step's peak minus the resident set before it is the
step's memory. Gradients stay allocated between steps (zeroed, not freed), so the peak falls
where the saved activations peak, at the start of the backward pass, as it does at full
scale. Two batch sizes give the per-sample slope (fixed transients cancel); each batch size is
run once untimed first, as oneDNN caches a primitive and its scratchpad per input shape.

Resolution: every feature map of an NFNet scales with H·W (train sizes are multiples of 32,
so SAME-padded stride-2 layers halve exactly), so the per-sample figure measured at ``--size``
px is multiplied by (train_size / size)². ``checks`` compares this with a direct measurement
of F0 at its 192 px train size.

Depth: F0–F7 share stage widths and differ only in depths, and every block of a stage after
its first has the same shapes, so what autograd saves is linear in the per-stage depths, and
with gradients preallocated the step peaks where all of it is alive. Five models are measured:
F0 (depths 1, 2, 6, 3) and F0 with one more block in each stage in turn; any variant is
F0 + Σ (depth_s − F0's depth_s) · increment_s. (F1–F7 themselves hold 0.13–0.5 G parameters,
more than a small machine can train even at batch 1.) The '+' variants have wider stages and
are not measured.

With ``--device cuda`` the same steps are measured with ``torch.cuda.max_memory_allocated``.

Usage::

    PYTHONPATH=src python benchmarks/bench_memory.py [--out benchmarks/results/memory.json]
    PYTHONPATH=src python benchmarks/bench_memory.py --device cuda --out memory_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MODES = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=96,
                        help="measurement resolution, a multiple of 32 (default 96)")
    parser.add_argument("--batches", type=int, nargs=2, default=(2, 8),
                        help="the two batch sizes of the slope (default 2 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--no-checks", action="store_true",
                        help="skip the direct F0 measurements that check both scalings")
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON job for one subprocess
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# One subprocess: build a model, measure each mode at both batch sizes.


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _measure_step(model, batch: int, size: int, precision: str, device) -> int:
    """Bytes one forward + backward at ``batch`` adds over what was resident before it."""
    import torch

    model.zero_grad(set_to_none=False)
    x = torch.randn(batch, 3, size, size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status_kib("VmRSS") * 1024
        _reset_peak()
    with autocast:
        logits = model(x)
    logits.float().logsumexp(-1).mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    del x, logits
    return peak - before


def child(job: dict) -> dict:
    import torch

    import nfnets

    torch.manual_seed(0)
    device = torch.device(job["device"])
    model = nfnets.create_model(job["model"], stochdepth_rate=0.0, drop_rate=0.0,
                                **job.get("model_args", {})).to(device).train()
    for p in model.parameters():  # allocated once, as in training (see the module docstring)
        p.grad = torch.zeros_like(p)
    result = {"params": sum(p.numel() for p in model.parameters()), "modes": {}}
    warm = set()
    for precision, checkpointing in MODES:
        model.set_grad_checkpointing(checkpointing)
        # Warm-up first: oneDNN caches a primitive (and its scratchpad) per input shape and
        # dtype, and the first checkpointed step loads code; neither is the step's memory.
        for b in job["batches"] if precision not in warm else job["batches"][:1]:
            _measure_step(model, b, job["size"], precision, device)
        warm.add(precision)
        peaks = [_measure_step(model, b, job["size"], precision, device)
                 for b in job["batches"]]
        (b1, b2), (p1, p2) = job["batches"], peaks
        slope = (p2 - p1) / (b2 - b1)
        result["modes"][_mode_name(precision, checkpointing)] = {
            "peaks": peaks, "per_sample": slope, "fixed": p1 - b1 * slope}
    return result


def _mode_name(precision: str, checkpointing: bool) -> str:
    return precision + ("_checkpointing" if checkpointing else "")


def run_child(job: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The parent: one subprocess per variant, the resolution scaling, the check.


F0_DEPTHS = (1, 2, 6, 3)


def depth_configs() -> list[tuple[int, ...]]:
    """F0's depths, then one more block in each stage in turn."""
    configs = [F0_DEPTHS]
    for stage in range(4):
        depths = list(F0_DEPTHS)
        depths[stage] += 1
        configs.append(tuple(depths))
    return configs


def fit(measured: dict[tuple[int, ...], float], depths: tuple[int, ...]) -> float:
    """The value at ``depths``, linear in each stage's depth (see the module docstring)."""
    base = measured[F0_DEPTHS]
    # A block never takes memory away; a negative increment is measurement noise (seen for
    # the small stage-3/4 maps with bf16 and checkpointing), counted as zero.
    return base + sum((depths[stage] - F0_DEPTHS[stage]) * max(0.0, measured[config] - base)
                      for stage, config in enumerate(depth_configs()[1:]))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    import torch

    from nfnets.models import model_defaults
    from nfnets.models.variants import NFNET_VARIANTS

    if args.size % 32:
        raise SystemExit("--size must be a multiple of 32 (exact scaling of every map)")
    start = time.time()
    runs = {}
    for depths in depth_configs():
        runs[depths] = run_child({"model": "nfnet_f0", "model_args": {"depths": depths},
                                  "size": args.size, "batches": list(args.batches),
                                  "device": args.device})
        print(f"measured nfnet_f0 with depths {depths}", file=sys.stderr, flush=True)
    modes = list(runs[F0_DEPTHS]["modes"])
    variants: dict[str, dict] = {}
    for key, row in NFNET_VARIANTS.items():
        if key.endswith("+"):
            continue
        name = f"nfnet_{key.lower()}"
        train_size = model_defaults(name)["train_size"]
        scale = (train_size / args.size) ** 2
        variants[name] = {
            "depths": list(row.depths), "train_size": train_size,
            "per_sample_bytes": {m: round(scale * fit(
                {d: r["modes"][m]["per_sample"] for d, r in runs.items()}, row.depths))
                for m in modes},
            # What the step adds whatever the batch, at --size: gradients are preallocated,
            # so mostly the standardised-weight copies autograd keeps and autocast's copies.
            "step_fixed_bytes": {m: round(fit(
                {d: r["modes"][m]["fixed"] for d, r in runs.items()}, row.depths))
                for m in modes},
        }

    checks = {}
    if not args.no_checks:
        direct = run_child({"model": "nfnet_f0", "size": 192, "batches": [1, 3],
                            "device": args.device})
        checks = {f"nfnet_f0_scaled_over_direct_at_192px_{m}":
                  variants["nfnet_f0"]["per_sample_bytes"][m] / r["per_sample"]
                  for m, r in direct["modes"].items()}
    raw = {str(list(d)): r for d, r in runs.items()}

    result = {
        "command": "python benchmarks/bench_memory.py" + (
            " " + " ".join(argv) if argv else " " + " ".join(sys.argv[1:])).rstrip(),
        "method": ("per-sample slope of the step's peak over two batch sizes at "
                   f"{args.size} px, scaled by (train_size/{args.size})^2; linear in the "
                   "per-stage depths from F0 and F0 with one more block per stage; "
                   "gradients preallocated; peak by "
                   + ("torch.cuda.max_memory_allocated" if args.device == "cuda" else
                      "VmHWM reset via /proc/self/clear_refs, glibc mmap threshold 64 KiB")),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "device": args.device},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "settings": {"size": args.size, "batches": list(args.batches),
                     "stochdepth_rate": 0.0, "modes": [_mode_name(*m) for m in MODES]},
        "seconds": round(time.time() - start, 1),
        "variants": variants,
        "checks": checks,
        "raw": raw,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v["per_sample_bytes"] for k, v in variants.items()}, indent=1))
    print(json.dumps(checks, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
