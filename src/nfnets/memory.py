"""How many training images fit on one GPU: measured activation memory plus parameter arithmetic.

A training step's memory on one GPU is

    persistent state + fixed step memory + batch × per-sample memory + reserve

- **per-sample memory**: what one image adds to the step's peak (saved activations and
  transients), measured for each NFNet variant at its train resolution by
  ``benchmarks/bench_memory.py`` (:data:`MEASURED`; method and raw figures in
  ``benchmarks/results/memory.json``);
- **fixed step memory**: what the step allocates whatever the batch (mostly the
  weight-standardised copies of the conv weights autograd keeps for the backward pass,
  4 bytes per parameter in fp32, and autocast's bf16 copies), measured with it;
- **persistent state**: 16 bytes per parameter (fp32 weights, gradients, momentum, EMA) plus
  DDP's gradient buckets (4 bytes per parameter); with FSDP over N GPUs the 16 bytes are
  divided by N and the unsharded working set is added instead: the root unit and two blocks
  (the one computing and the one prefetched) in the compute dtype, with their gradients;
- **reserve**: :data:`RESERVE_BYTES` for the CUDA context, cuDNN workspaces and allocator
  fragmentation.

The measured figures are CPU allocator peaks; the step's tensors are the same on a GPU, its
workspaces are not, which is what the reserve is for. Confirm on the target GPU with
``python benchmarks/bench_memory.py --device cuda`` before a long run.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

__all__ = ["MEASURED", "RESERVE_BYTES", "SOURCE", "fit_batch", "parse_memory", "plan"]

GIB = 2**30
RESERVE_BYTES = 2 * GIB  # CUDA context (~0.5 GiB), cuDNN workspaces, fragmentation
PERSISTENT_BYTES_PER_PARAM = 16  # fp32 weight + gradient + momentum + EMA
DDP_BUCKET_BYTES_PER_PARAM = 4  # DDP reduces gradients through a flat fp32 copy
SOURCE = ("per-sample and fixed step memory: benchmarks/results/memory.json (python "
          "benchmarks/bench_memory.py: CPU allocator peak at 96 px, scaled to the train size; "
          "F1-F7 linear in depth from F0 and F0 with one more block per stage)")

# name: (per-sample bytes by mode, fixed step bytes by mode), from
# benchmarks/results/memory.json (variants.*.per_sample_bytes / step_fixed_bytes);
# tests/test_memory.py checks that the two agree.
MEASURED: dict[str, dict[str, dict[str, int]]] = {
    "nfnet_f0": {
        "per_sample_bytes": {
            "fp32": 85123072,
            "fp32_checkpointing": 21905408,
            "bf16": 42106880,
            "bf16_checkpointing": 11020971,
        },
        "step_fixed_bytes": {
            "fp32": 203710464,
            "fp32_checkpointing": 37650432,
            "bf16": 165937152,
            "bf16_checkpointing": 80091819,
        },
    },
    "nfnet_f1": {
        "per_sample_bytes": {
            "fp32": 206513266,
            "fp32_checkpointing": 41835634,
            "bf16": 97241088,
            "bf16_checkpointing": 17461248,
        },
        "step_fixed_bytes": {
            "fp32": 357822464,
            "fp32_checkpointing": 40576341,
            "bf16": 292671488,
            "bf16_checkpointing": 122613760,
        },
    },
    "nfnet_f2": {
        "per_sample_bytes": {
            "fp32": 388133319,
            "fp32_checkpointing": 70341973,
            "bf16": 179160860,
            "bf16_checkpointing": 26020219,
        },
        "step_fixed_bytes": {
            "fp32": 511934464,
            "fp32_checkpointing": 43502251,
            "bf16": 419405824,
            "bf16_checkpointing": 165135701,
        },
    },
    "nfnet_f3": {
        "per_sample_bytes": {
            "fp32": 791460978,
            "fp32_checkpointing": 134439822,
            "bf16": 361426489,
            "bf16_checkpointing": 45677985,
        },
        "step_fixed_bytes": {
            "fp32": 666046464,
            "fp32_checkpointing": 46428160,
            "bf16": 546140160,
            "bf16_checkpointing": 207657643,
        },
    },
    "nfnet_f4": {
        "per_sample_bytes": {
            "fp32": 1406107648,
            "fp32_checkpointing": 228917248,
            "bf16": 637796352,
            "bf16_checkpointing": 73007104,
        },
        "step_fixed_bytes": {
            "fp32": 820158464,
            "fp32_checkpointing": 49354069,
            "bf16": 672874496,
            "bf16_checkpointing": 250179584,
        },
    },
    "nfnet_f5": {
        "per_sample_bytes": {
            "fp32": 1962878066,
            "fp32_checkpointing": 310116352,
            "bf16": 886239004,
            "bf16_checkpointing": 94168102,
        },
        "step_fixed_bytes": {
            "fp32": 974270464,
            "fp32_checkpointing": 52279979,
            "bf16": 799608832,
            "bf16_checkpointing": 292701525,
        },
    },
    "nfnet_f6": {
        "per_sample_bytes": {
            "fp32": 2639079196,
            "fp32_checkpointing": 407741326,
            "bf16": 1187543268,
            "bf16_checkpointing": 119054639,
        },
        "step_fixed_bytes": {
            "fp32": 1128382464,
            "fp32_checkpointing": 55205888,
            "bf16": 926343168,
            "bf16_checkpointing": 335223467,
        },
    },
    "nfnet_f7": {
        "per_sample_bytes": {
            "fp32": 3445811200,
            "fp32_checkpointing": 523264000,
            "bf16": 1546598400,
            "bf16_checkpointing": 147968000,
        },
        "step_fixed_bytes": {
            "fp32": 1282494464,
            "fp32_checkpointing": 58131797,
            "bf16": 1053077504,
            "bf16_checkpointing": 377745408,
        },
    },
}


def parse_memory(text: str) -> int:
    """Bytes in ``'80GB'``, ``'80 GiB'``, ``'141G'`` or ``'40000MB'``.

    GB and GiB both mean 2**30 bytes here, as GPU makers' "80 GB" cards hold 80 GiB.
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 80GB or 40000MB")
    value, unit = float(match.group(1)), match.group(2).upper()
    return int(value * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def _mode(precision: str, checkpointing: bool) -> str:
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"measured precisions are fp32 and bf16, not {precision!r} (fp16 "
                         "takes the same memory as bf16)")
    return precision + ("_checkpointing" if checkpointing else "")


def _unit_params(name: str) -> tuple[int, int, int]:
    """(all parameters, the largest block's, the root unit's) of ``name``, without memory."""
    from .models import create_model

    with torch.device("meta"):
        model = create_model(name)
    total = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    return total, max(blocks), total - sum(blocks)


def fit_batch(memory: int, per_sample: float, fixed: float) -> int:
    """The largest batch with ``fixed + batch × per_sample <= memory`` (0 if none)."""
    if per_sample <= 0:
        raise ValueError("per-sample memory must be positive")
    return max(0, math.floor((memory - fixed) / per_sample))


def plan(name: str, memory: int, precision: str = "bf16", gpus: int = 8,
         global_batch: int = 4096) -> dict[str, Any]:
    """Largest per-GPU batch of ``name`` in ``memory`` bytes, for DDP and FSDP over ``gpus``,
    with and without gradient checkpointing, and the ``--grad-accum`` that reaches
    ``global_batch``. Raises KeyError for a model without measured figures."""
    from .models import _canonical

    key = _canonical(name)
    if key not in MEASURED:
        raise KeyError(f"no measured memory figures for {name!r}; measured: "
                       f"{', '.join(MEASURED)}")
    params, largest_block, root = _unit_params(key)
    compute_bytes = 2 if precision == "bf16" else 4
    ddp_state = params * (PERSISTENT_BYTES_PER_PARAM + DDP_BUCKET_BYTES_PER_PARAM)
    fsdp_state = (params * PERSISTENT_BYTES_PER_PARAM / gpus
                  + (2 * largest_block + root) * (compute_bytes + 4))
    rows = {}
    for checkpointing in (False, True):
        mode = _mode(precision, checkpointing)
        per_sample = MEASURED[key]["per_sample_bytes"][mode]
        step_fixed = MEASURED[key]["step_fixed_bytes"][mode]
        for strategy, state in (("ddp", ddp_state), ("fsdp", fsdp_state)):
            batch = fit_batch(memory - RESERVE_BYTES, per_sample, state + step_fixed)
            rows[f"{strategy}{'_checkpointing' if checkpointing else ''}"] = {
                "per_gpu_batch": batch, "grad_accum": grad_accum(global_batch, gpus, batch),
                "state_bytes": round(state), "step_fixed_bytes": step_fixed,
                "per_sample_bytes": per_sample}
    return {"model": key, "memory_bytes": memory, "precision": precision, "gpus": gpus,
            "global_batch": global_batch, "plans": rows, "source": SOURCE}


def grad_accum(global_batch: int, gpus: int, max_batch: int) -> int | None:
    """Fewest accumulation steps with a per-GPU micro-batch <= ``max_batch`` that divides
    ``global_batch`` evenly over ``gpus`` (None if even a micro-batch of 1 does not fit)."""
    if max_batch < 1 or global_batch % gpus:
        return None
    per_gpu = global_batch // gpus
    for steps in range(1, per_gpu + 1):
        if per_gpu % steps == 0 and per_gpu // steps <= max_batch:
            return steps
    return None
