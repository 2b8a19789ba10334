"""``nfnets list``: every model name, or with ``--pretrained`` the released weights."""

from __future__ import annotations

import argparse
import json

from ..models import list_models
from ..pretrained import OFFICIAL_RELEASES, cache_path, release_url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nfnets list``."""
    parser.add_argument("--pretrained", action="store_true",
                        help="list the released weights: resolution, eval crop, published "
                        "top-1/top-5, address, checksum, whether cached")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")


def run(args: argparse.Namespace) -> int:
    """Print every model name, one per line, or the release records."""
    if not args.pretrained:
        names = list_models()
        print(json.dumps(names) if args.json else "\n".join(names))
        return 0
    records = [{**r.to_dict(), "cached": cache_path(r).is_file()}
               for r in OFFICIAL_RELEASES.values()]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    print(f"{'model':<10} {'params':>7} {'train':>5} {'test':>4} {'crop':>5} {'top-1':>5} "
          f"{'top-5':>5}  cached  source")
    for r, rec in zip(OFFICIAL_RELEASES.values(), records, strict=True):
        print(f"{r.model_name:<10} {r.num_params / 1e6:6.1f}M {r.train_size:>5} "
              f"{r.test_size:>4} {r.eval_crop:5.3f} {r.top1:5.1f} {r.top5:5.1f}  "
              f"{'yes' if rec['cached'] else 'no':<6}  {release_url(r)}"
              + ("  (SAM)" if r.sam else ""))
    print("Top-1/top-5: ImageNet validation as published (paper Table 3; F0-F5 are 3-seed "
          "means). Test images: squash-resize to test+32, centre crop, bicubic. Not released: "
          "F7, the '+' variants, NF-ResNets, NF-RegNets.")
    return 0
