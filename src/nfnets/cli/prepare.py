"""``nfnets prepare SRC -o OUT``: write a dataset as WebDataset shards for ``--data wds:OUT``."""

from __future__ import annotations

import argparse
import sys

from ..data.writer import write_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nfnets prepare``."""
    parser.add_argument("source", metavar="SRC",
                        help="an ImageNet-style folder, wds:SPEC or hf:NAME_OR_PATH")
    parser.add_argument("-o", "--out", required=True, help="output folder for the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--max-size", type=int, default=None,
                        help="shrink images to this shorter side (re-encoded JPEG); keep it "
                             ">= 2x the train size, see docs/data.md")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality with --max-size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes writing shards in parallel (folders, hf:)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction,
                        default=sys.stderr.isatty(), help="show progress bars")


def run(args: argparse.Namespace) -> int:
    """Write the shards (keeping complete ones of an earlier run) and print a summary."""
    info = write_shards(args.source, args.out, shard_size=args.shard_size,
                        max_size=args.max_size, quality=args.quality, seed=args.seed,
                        workers=args.workers, progress=args.progress)
    for split, entry in info["splits"].items():
        print(f"{split}: {entry['num_samples']} samples in {len(entry['filenames'])} shards")
    print(f"{len(info['classes'])} classes; {info['skipped']} samples skipped (no image, no "
          f"label or unreadable); use --data wds:{args.out}")
    return 0
