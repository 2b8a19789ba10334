"""``nfnets info``: parameters, FLOPs and recipe facts of a variant."""

from __future__ import annotations

import argparse
import json

import torch

from ..counting import count_flops, count_params
from ..models import create_model, model_defaults
from ..pretrained import OFFICIAL_RELEASES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nfnets info``."""
    parser.add_argument("model", help="model name, e.g. nfnet_f0 (see nfnets list)")
    parser.add_argument("--image-size", type=int, action="append",
                        help="count FLOPs at this size (default: train and test sizes)")
    parser.add_argument("--json", action="store_true", help="print JSON")


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
    return 0
