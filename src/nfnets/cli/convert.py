"""``nfnets convert``: DeepMind's released weights, or a training run or checkpoint (including an
``--fsdp`` run's sharded one), to our single-file safetensors format."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nfnets convert``."""
    parser.add_argument("source", help="DeepMind's released F*_haiku.npz (a pickle), a training "
                        "run directory, a checkpoint step_N.pt or a sharded checkpoint "
                        "directory step_N.dcp")
    parser.add_argument("-o", "--output", required=True, help="safetensors file to write")
    parser.add_argument("--model", help="expected model name (official files; default: "
                        "detected from the file)")
    parser.add_argument("--ema", action="store_true",
                        help="a run's or checkpoint's EMA weights (default: the raw weights)")


def run(args: argparse.Namespace) -> int:
    """Convert without executing anything from the source."""
    from ..errors import UsageError
    from ..weights import _sniff, convert_checkpoint, convert_official

    source = Path(args.source)
    official = source.is_file() and _sniff(source) == "official"
    if official:
        if args.ema:
            raise UsageError("--ema: an official file holds a single set of weights; drop --ema")
        name = convert_official(source, args.output, args.model)
    else:
        if args.model:
            raise UsageError("--model applies to official files; a run or checkpoint records "
                             "its architecture")
        name = convert_checkpoint(source, args.output, ema=args.ema)
    print(f"nfnets convert: wrote {args.output} ({name}{', EMA weights' if args.ema else ''})")
    return 0
