"""The fast pipeline's uint8 bicubic resize against PyTorch's uint8 kernel.

``resize_uint8`` (OpenCV's ``INTER_CUBIC``: a = -0.75, half-pixel centres, no antialias, then
numpy's transposing copy to a contiguous 3 x S x S) against the baselines the fast mode used
before: PyTorch's uint8 ``interpolate(mode="bicubic")`` on the crop as a strided view of the
decoded image, and the same on a channels-last contiguous copy (which takes PyTorch's
vectorised path, same pixels, and returns a contiguous 3 x S x S itself). Each case's
deviation from the exact mode's float32 resize (clamped, rounded) is reported too. Crops are
the official training crops (``train_crop_box``) of 500x375 / 375x500 photos, resized to S;
one thread each.

Usage::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_resize.py [--rounds 9]

Prints a JSON object and writes it to ``--out``. Needs scikit-image (the photos).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as nnf
from report import save_result

from nfnets.data import resize_uint8, train_crop_box


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


def torch_strided(crop: torch.Tensor, size: int) -> torch.Tensor:
    """Baseline: PyTorch's uint8 kernel on the strided view."""
    return nnf.interpolate(crop.unsqueeze(0), size=(size, size), mode="bicubic",
                           antialias=False)[0]


def torch_contiguous(crop: torch.Tensor, size: int) -> torch.Tensor:
    """Baseline: PyTorch's uint8 kernel on a channels-last contiguous copy."""
    batch = crop.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return nnf.interpolate(batch, size=(size, size), mode="bicubic", antialias=False)[0]


def exact(crop: torch.Tensor, size: int) -> torch.Tensor:
    """The exact mode's float32 resize, clamped and rounded to uint8 levels."""
    return nnf.interpolate(crop.unsqueeze(0).float(), size=(size, size), mode="bicubic",
                           antialias=False)[0].clamp(0, 255).round()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    images = photos()
    generator = torch.Generator().manual_seed(0)
    crops = []
    for i in range(args.crops):
        image = images[i % len(images)]
        top, left, h, w = train_crop_box(*image.shape[-2:], args.size, generator)
        crops.append(image[:, top : top + h, left : left + w])
    cases = {"opencv": lambda c: resize_uint8(c, args.size, args.size),
             "torch_uint8_contiguous": lambda c: torch_contiguous(c, args.size),
             "torch_uint8_strided": lambda c: torch_strided(c, args.size)}
    deviation = {}
    for name, fn in cases.items():
        diffs = torch.stack([(fn(c).float() - exact(c, args.size)).abs() for c in crops])
        deviation[name] = {"max_levels": int(diffs.max()),
                           "fraction_off": round(float((diffs > 0).float().mean()), 6),
                           "psnr_db": round(float(10 * torch.log10(255**2 / diffs.pow(2).mean())),
                                            1)}
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
        "deviation_from_exact": deviation,
        "ms_per_crop": {name: round(v, 4) for name, v in median.items()},
        "spread_ms": {name: [round(min(v), 4), round(max(v), 4)] for name, v in ms.items()},
        "speedup": {f"opencv vs {name}": round(median[name] / median["opencv"], 2)
                    for name in cases if name != "opencv"},
    }
    save_result(args.out, result)


if __name__ == "__main__":
    main()
