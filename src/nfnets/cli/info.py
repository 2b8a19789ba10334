"""``nfnets info``: parameters, FLOPs and recipe facts of a variant; with ``--gpu-memory``,
the largest per-GPU training batch that fits (see ``nfnets.memory``)."""

from __future__ import annotations

import argparse
import json

import torch

from ..counting import count_flops, count_params
from ..errors import UsageError
from ..memory import parse_memory, plan
from ..models import create_model, model_defaults
from ..pretrained import OFFICIAL_RELEASES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nfnets info``."""
    parser.add_argument("model", help="model name, e.g. nfnet_f0 (see nfnets list)")
    parser.add_argument("--image-size", type=int, action="append",
                        help="count FLOPs at this size (default: train and test sizes)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--gpu-memory", metavar="SIZE",
                        help="also print the largest per-GPU training batch that fits in SIZE "
                        "(e.g. 80GB), from measured per-sample memory")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="training precision for --gpu-memory (default bf16)")
    parser.add_argument("--gpus", type=int, default=8,
                        help="GPUs in the job, for FSDP's share and --grad-accum (default 8)")
    parser.add_argument("--global-batch", type=int, default=4096,
                        help="global batch for the --grad-accum advice (default: the "
                        "recipe's 4096)")


def model_info(name: str, image_sizes: list[int] | None = None) -> dict:
    """Parameters, MACs (official rule) and recipe facts of ``name``, without allocating it."""
    defaults = model_defaults(name)
    with torch.device("meta"):  # shapes only: F7+ would otherwise take 3.3 GB to count
        model = create_model(name)
    sizes = image_sizes or sorted({defaults["train_size"], defaults["test_size"]})
    release = OFFICIAL_RELEASES.get(model.model_name)
    return {"model": model.model_name, "params": count_params(model),
            "flops": {str(s): count_flops(model, s) for s in sizes}, **defaults,
            "pretrained": release.to_dict() if release else None}


def run(args: argparse.Namespace) -> int:
    """Print what ``model_info`` finds."""
    info = model_info(args.model, args.image_size)
    if args.gpu_memory:
        info["gpu_memory"] = _memory_plan(args)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['model']} ({info['family']})")
    print(f"  parameters      {info['params']:,} ({info['params'] / 1e6:.2f}M)")
    for size, flops in info["flops"].items():
        print(f"  FLOPs @ {size:>4} px {flops / 1e9:.2f}B multiply-accumulates")
    print(f"  train / test    {info['train_size']} / {info['test_size']} px")
    print(f"  dropout         {info['drop_rate']}")
    if info["ra_level"]:
        print(f"  RandAugment     '{info['ra_level']}' (layers, magnitude)")
    released = info["pretrained"]
    print(f"  weights         DeepMind's release, ImageNet top-1 {released['top1']} / top-5 "
          f"{released['top5']} as published (--pretrained)" if released else
          "  weights         none released by DeepMind")
    if args.gpu_memory:
        _print_plan(info["gpu_memory"])
    return 0


def _memory_plan(args: argparse.Namespace) -> dict:
    try:
        memory = parse_memory(args.gpu_memory)
    except ValueError as err:
        raise UsageError(f"--gpu-memory: {err}") from None
    if args.gpus < 1 or args.global_batch < 1:
        raise UsageError("--gpus and --global-batch must be positive")
    try:
        return plan(args.model, memory, args.precision, args.gpus, args.global_batch)
    except KeyError as err:
        raise UsageError(str(err.args[0])) from None


def _print_plan(result: dict) -> None:
    gib = result["memory_bytes"] / 2**30
    print(f"  training batch per GPU in {gib:g} GiB ({result['precision']}; global batch "
          f"{result['global_batch']} on {result['gpus']} GPUs):")
    labels = {"ddp": "DDP", "ddp_checkpointing": "DDP + checkpointing", "fsdp": "FSDP",
              "fsdp_checkpointing": "FSDP + checkpointing"}
    for key, label in labels.items():
        row = result["plans"][key]
        accum = (f"--grad-accum {row['grad_accum']}" if row["grad_accum"]
                 else "does not reach the global batch")
        print(f"    {label:<22} {row['per_gpu_batch']:>5}  ({accum}; "
              f"{row['per_sample_bytes'] / 2**20:.0f} MiB per image)")
    print(f"  source: {result['source']}")
