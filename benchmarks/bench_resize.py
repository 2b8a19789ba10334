"""The fast pipeline's uint8 resize: a channels-last contiguous crop against the strided crop.

``resize_uint8`` copies the crop into channels-last contiguous memory before PyTorch's uint8
bicubic resize (a = -0.75, no antialias); the baseline hands the same kernel the crop as a
strided view of the decoded image (how the fast mode called it before). Both give the same
pixels (checked here); only the contiguous input takes PyTorch's vectorised path. Crops are
the official training crops (``train_crop_box``) of 500x375 / 375x500 photos, resized to S.

Usage::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_resize.py [--rounds 9]

Prints a JSON object and writes it to ``--out``. Needs scikit-image (the photos).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf

from nfnets.data import resize_uint8, train_crop_box
from nfnets.files import atomic_write


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--crops", type=int, default=200, help="crops per case per round")
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/resize.json"))
    return parser.parse_args()


def photos() -> list[torch.Tensor]:
    """Decoded-image layout: H x W x 3 memory seen as 3 x H x W."""
    import skimage.data
    from PIL import Image

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "coins"):
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        for size in ((500, 375), (375, 500)):
            array = np.asarray(image.resize(size, Image.BICUBIC))
            out.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
    return out


def strided(crop: torch.Tensor, size: int) -> torch.Tensor:
    """The baseline: the same kernel on the strided view."""
    return nnf.interpolate(crop.unsqueeze(0), size=(size, size), mode="bicubic",
                           antialias=False)[0]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    images = photos()
    generator = torch.Generator().manual_seed(0)
    crops = []
    for i in range(args.crops):
        image = images[i % len(images)]
        top, left, h, w = train_crop_box(*image.shape[-2:], args.size, generator)
        crops.append(image[:, top : top + h, left : left + w])
    same = all(torch.equal(resize_uint8(c, args.size, args.size), strided(c, args.size))
               for c in crops)
    cases = {"contiguous": lambda c: resize_uint8(c, args.size, args.size),
             "strided": lambda c: strided(c, args.size)}
    ms: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn(crops[0])
    for _ in range(args.rounds):
        for name, fn in cases.items():
            start = time.process_time()
            for crop in crops:
                fn(crop)
            ms[name].append((time.process_time() - start) / len(crops) * 1e3)
    median = {name: statistics.median(v) for name, v in ms.items()}
    result = {
        "command": "PYTHONPATH=src OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "settings": {"size": args.size, "crops": args.crops, "rounds": args.rounds,
                     "clock": "process CPU time", "threads": 1},
        "same_pixels": same,
        "ms_per_crop": {name: round(v, 4) for name, v in median.items()},
        "spread_ms": {name: [round(min(v), 4), round(max(v), 4)] for name, v in ms.items()},
        "speedup": round(median["strided"] / median["contiguous"], 2),
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text + "\n"))


if __name__ == "__main__":
    main()
