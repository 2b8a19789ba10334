"""Small ``nfnets`` subcommands: list, info, convert, export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .cli import UsageError
from .counting import count_flops, count_params
from .models import create_model, list_models, model_defaults


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    """``nfnets list`` takes no arguments."""


def run_list(args: argparse.Namespace) -> int:
    """Print every model name, one per line."""
    print("\n".join(list_models()))
    return 0


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
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
    return {"model": model.model_name, "params": count_params(model),
            "flops": {str(s): count_flops(model, s) for s in sizes}, **defaults}


def run_info(args: argparse.Namespace) -> int:
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
    return 0


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nfnets convert``."""
    parser.add_argument("source", help="DeepMind's released F*_haiku.npz (a pickle)")
    parser.add_argument("-o", "--output", required=True, help="safetensors file to write")
    parser.add_argument("--model", help="expected model name (default: detected from the file)")


def run_convert(args: argparse.Namespace) -> int:
    """Convert an official checkpoint without executing anything from it."""
    from .weights import convert_official

    name = convert_official(args.source, args.output, args.model)
    print(f"nfnets convert: wrote {args.output} ({name})")
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nfnets export``."""
    parser.add_argument("source", help="model name, weights file or run directory")
    parser.add_argument("-o", "--output", required=True, help="ONNX file to write")
    parser.add_argument("--model", help="model name when SOURCE is an official .npz")
    parser.add_argument("--ema", action="store_true", help="export a run's EMA weights")
    parser.add_argument("--image-size", type=int, help="example input size (default: test size)")
    parser.add_argument("--num-classes", type=int, default=1000,
                        help="classes when SOURCE is a model name (random weights)")


def run_export(args: argparse.Namespace) -> int:
    """Fuse WS into plain convs and export to ONNX, checked against PyTorch."""
    from .export import export_onnx

    source = Path(args.source)
    if source.exists():
        from .evaluate import load_inference_model

        model, info = load_inference_model(source, model_name=args.model, ema=args.ema)
        size = args.image_size or info["test_size"]
    elif args.source in list_models() or not source.suffix:
        model = create_model(args.source, num_classes=args.num_classes).eval()
        size = args.image_size or model.default_cfg["test_size"]
    else:
        raise FileNotFoundError(f"no such file or run directory: {source}")
    if size < 1:
        raise UsageError("--image-size must be positive")
    error = export_onnx(model, args.output, size)
    print(f"nfnets export: wrote {args.output} ({model.model_name} at {size} px; onnxruntime "
          f"matches PyTorch to {error:.1e} relative)")
    return 0
