"""Flags and checks shared by ``nfnets eval`` and ``nfnets predict``."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from ..errors import UsageError
from ..inference import optimize_for_inference


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ema", action="store_true",
                        help="use the EMA weights of a run directory or training checkpoint")
    parser.add_argument("--model", metavar="NAME",
                        help="model name (official .npz files: instead of detecting it)")
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
