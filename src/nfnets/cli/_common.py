"""Flags and checks shared by ``nfnets eval`` and ``nfnets predict``."""

from __future__ import annotations

import argparse

import torch

from ..errors import UsageError


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
    parser.add_argument("--winograd", action="store_true",
                        help="CPU: run stride-1 3x3 convs as Winograd F(4x4,3x3), ~10%% faster "
                        "on NFNet-F0 for ~1e-5 relative error per conv (see docs/performance.md)")


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
