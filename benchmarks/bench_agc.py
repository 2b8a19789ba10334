"""Time nfnets' AGC on NFNet-F0 against timm's AGC and against a full F0 training step.

Three timed cases, run in one process, interleaved after warm-up rounds (each round takes
``--agc-repeats`` alternating samples of the two AGC cases, then one training step); the
medians are reported:

- ``nfnets``: ``nfnets.agc.adaptive_clip_grad_`` on every F0 parameter the recipe clips
  (all but the classifier weight), as it runs in a training step. Gradients are reset from a
  saved copy before each sample;
- ``timm``: ``timm.utils.agc.adaptive_clip_grad`` on the same parameters and gradients;
- ``train_step``: zero_grad + forward + backward + SGD step (Nesterov, weight decay, no AGC)
  of F0 in train mode at ``--batch`` images of ``--size`` px.

Usage::

    PYTHONPATH=src python benchmarks/bench_agc.py [--rounds 7] [--out benchmarks/results/agc.json]

Needs timm (``pip install timm``). Writes JSON with machine info, versions and the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.utils.agc import adaptive_clip_grad as timm_adaptive_clip_grad
from torch import nn

import nfnets
from nfnets.agc import adaptive_clip_grad_, unit_count
from nfnets.optim import param_groups

CLIPPING, EPS = 0.01, 1e-3  # deepmind-research nfnets/experiment_nfnets.py, nfnets/optim.py
TARGET_VS_TIMM = 1 / 3  # AGC at most a third of timm's time
TARGET_VS_STEP = 0.02  # AGC at most 2% of an F0 training step


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    parser.add_argument(
        "--agc-repeats", type=int, default=5, help="AGC samples per case per round (default 5)"
    )
    parser.add_argument("--batch", type=int, default=8, help="training-step batch (default 8)")
    parser.add_argument("--size", type=int, default=192, help="training image size (default 192)")
    parser.add_argument("--model", default="nfnet_f0", help="model name (default nfnet_f0)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/agc.json"))
    return parser.parse_args()


def clipped_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the official recipe clips (everything but the classifier weight)."""
    groups = param_groups(model, clipping=CLIPPING)
    return [p for g in groups if g["clipping"] is not None for p in g["params"]]


def fake_grads(params: list[nn.Parameter], seed: int = 0) -> list[torch.Tensor]:
    """Gradients of per-unit size 1e-4..1e-1 times the weights' mean size: a good share of the
    units clip (the count is reported)."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for p in params:
        units = unit_count(p.shape)
        ratio = 10 ** (-4 + 3 * torch.rand(units, generator=gen))
        ratio = ratio.reshape(()) if units == 1 else ratio.view(-1, *[1] * (p.ndim - 1))
        scale = p.detach().abs().mean().clamp_min(EPS) * ratio
        grads.append(torch.randn(p.shape, generator=gen) * scale)
    return grads


def agc_case(fn: Callable[..., object], params, saved) -> Callable[[], float]:
    def run() -> float:
        torch._foreach_copy_([p.grad for p in params], saved)  # same input every sample
        start = time.perf_counter()
        fn(params, CLIPPING, EPS)
        return time.perf_counter() - start

    return run


def step_case(model: nn.Module, batch: int, size: int) -> Callable[[], float]:
    opt = torch.optim.SGD(param_groups(model), lr=0.1, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)

    def run() -> float:
        start = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - start

    return run


def check_agreement(params, saved) -> dict[str, float]:
    """nfnets and timm agree on F0 (it has no tensor where the squeeze rule differs)."""
    torch._foreach_copy_([p.grad for p in params], saved)
    stats = adaptive_clip_grad_(params, CLIPPING, EPS)
    ours = [p.grad.clone() for p in params]
    torch._foreach_copy_([p.grad for p in params], saved)
    timm_adaptive_clip_grad(params, CLIPPING, EPS)
    diff = max(
        float((a - p.grad).abs().max() / p.grad.abs().max())
        for a, p in zip(ours, params, strict=True)
    )
    return {
        "units": stats.units,
        "units_clipped": int(stats.clipped),
        "max_rel_diff_vs_timm": diff,
    }


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model = nfnets.create_model(args.model).train()
    params = clipped_params(model)
    saved = fake_grads(params)
    for p, g in zip(params, saved, strict=True):
        p.grad = g.clone()
    agreement = check_agreement(params, saved)

    cases = {
        "nfnets": agc_case(adaptive_clip_grad_, params, saved),
        "timm": agc_case(timm_adaptive_clip_grad, params, saved),
        # A copy: its optimizer steps must not change the weights the AGC cases clip.
        "train_step": step_case(copy.deepcopy(model), args.batch, args.size),
    }
    schedule = ["nfnets", "timm"] * args.agc_repeats + ["train_step"]
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(args.warmup + args.rounds):
        timings = [(name, cases[name]()) for name in schedule]
        if round_ >= args.warmup:
            for name, elapsed in timings:
                samples[name].append(elapsed)
        print(f"round {round_}: " + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in timings))

    median_ms = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
    # On a shared machine the minimum is the least disturbed sample: reported alongside.
    min_ms = {name: min(s) * 1e3 for name, s in samples.items()}
    vs_timm = median_ms["nfnets"] / median_ms["timm"]
    vs_step = median_ms["nfnets"] / median_ms["train_step"]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15": os.getloadavg(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "nfnets": nfnets.__version__,
        },
        "settings": {
            "model": args.model,
            "clipped_params": len(params),
            "clipped_values": sum(p.numel() for p in params),
            "clipping": CLIPPING,
            "eps": EPS,
            "train_step": f"batch {args.batch} at {args.size} px, fp32, SGD Nesterov + wd",
            "warmup_rounds": args.warmup,
            "rounds": args.rounds,
            "agc_repeats_per_round": args.agc_repeats,
        },
        "agreement": agreement,
        "median_ms": median_ms,
        "min_ms": min_ms,
        "samples_ms": {name: [v * 1e3 for v in s] for name, s in samples.items()},
        "ratios": {"nfnets_over_timm": vs_timm, "nfnets_over_train_step": vs_step},
        "ratios_of_minima": {
            "nfnets_over_timm": min_ms["nfnets"] / min_ms["timm"],
            "nfnets_over_train_step": min_ms["nfnets"] / min_ms["train_step"],
        },
        "targets": {
            "nfnets_over_timm_at_most": TARGET_VS_TIMM,
            "nfnets_over_train_step_at_most": TARGET_VS_STEP,
            "met_vs_timm": vs_timm <= TARGET_VS_TIMM,
            "met_vs_train_step": vs_step <= TARGET_VS_STEP,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    keys = ("median_ms", "min_ms", "ratios", "ratios_of_minima", "targets")
    print(json.dumps({k: result[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
