"""Flags and checks shared by ``nfnets eval`` and ``nfnets predict``."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..pretrained import load_named
from ..timm_compat import HF_HUB_PREFIX
from ..weights import load_model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ema", action="store_true",
                        help="use the EMA weights of a run directory or training checkpoint")
    parser.add_argument("--model", metavar="NAME",
                        help="model name (official .npz files: instead of detecting it)")
    parser.add_argument("--pretrained", action="store_true",
                        help="DeepMind's released weights of --model, downloaded once into "
                        "the torch hub cache and verified (see nfnets list --pretrained)")
    parser.add_argument("--image-size", type=int, metavar="S",
                        help="test resolution (default: the run's, else the variant's)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--winograd", action="store_true",
                        help="CPU: run stride-1 3x3 convs as Winograd F(4x4,3x3), ~10%% faster "
                        "on NFNet-F0 for ~1e-5 relative error per conv (see docs/performance.md)")


def model_from_args(args: argparse.Namespace, path: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """The model and its info for eval/predict: from ``path`` (a file, a run, an 'hf-hub:'
    name) or, with ``--pretrained``, the release of ``--model``."""
    if args.pretrained:
        if path:
            raise UsageError("give a weights path or --pretrained, not both")
        if not args.model:
            raise UsageError("--pretrained needs --model NAME (nfnets list --pretrained)")
        if args.ema:
            raise UsageError("released weights are a single set; drop --ema")
        return load_named(args.model)
    if not path:
        raise UsageError("give a weights path, or --model NAME --pretrained")
    if path.startswith(HF_HUB_PREFIX):
        return load_named(path, args.model)
    return load_model(path, model_name=args.model, ema=args.ema)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} must be positive, got {value}")
