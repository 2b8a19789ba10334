"""``nfnets convert``: DeepMind's released weights to our safetensors format."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nfnets convert``."""
    parser.add_argument("source", help="DeepMind's released F*_haiku.npz (a pickle)")
    parser.add_argument("-o", "--output", required=True, help="safetensors file to write")
    parser.add_argument("--model", help="expected model name (default: detected from the file)")


def run(args: argparse.Namespace) -> int:
    """Convert an official checkpoint without executing anything from it."""
    from ..weights import convert_official

    name = convert_official(args.source, args.output, args.model)
    print(f"nfnets convert: wrote {args.output} ({name})")
    return 0
