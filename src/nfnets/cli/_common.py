"""Flags and checks shared by ``nfnets eval`` and ``nfnets predict``."""

from __future__ import annotations

import argparse
import ast
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..inference import optimize_for_inference
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
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the fused model first (nfnets.optimize_for_inference):"
                        " faster per image, but compiling takes a minute or more, so it pays "
                        "only on many images (see docs/performance.md)")


def prepare_model(model: nn.Module, device: torch.device, batch_size: int, image_size: int,
                  compile: bool) -> nn.Module:
    """``model`` on ``device`` through the one inference path, ``optimize_for_inference``:
    fused, and compiled for a (batch_size, C, image_size, image_size) batch if asked."""
    model = model.to(device)
    example = torch.zeros(batch_size, model.in_chans, image_size, image_size, device=device)
    return optimize_for_inference(model, example, compile=compile)


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


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``--model-arg KEY=VALUE`` items as create_model overrides; VALUE is a Python literal
    (``width=0.5``, ``depths=[1,1,2,1]``) or else the plain string."""
    args: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            args[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            args[key] = text
    return args

