"""Fine-tuning on a small image folder from a digits-pretrained checkpoint, with the preset.

A transfer experiment that fits on a laptop CPU, built from the bundled digits (scikit-learn's
1797 8x8 images, split as the digits demo does with seed 0):

1. write two ImageNet-style folders: digits 0-4 ("source") and digits 5-9 ("target"), each
   image 8x8 → 32x32 bicubic in the centre of a black 64x64 canvas (the evaluation's
   squash-to-S+32-and-crop-S keeps the centre half at S = 32);
2. pre-train the digits demo's scaled-down NFNet-F0 on the source folder (the demo's short
   recipe);
3. fine-tune it on the target folder with ``--init-from`` and the fine-tuning preset
   (nfnets.finetune), nothing else given; and once more with the preset's learning rate
   scaled linearly with the batch (0.1 · 64/2048) instead;
4. train the same model on the target folder from scratch with the preset's settings, and
   with the digits demo's own short recipe, as the baselines.

Writes benchmarks/results/finetune_digits.json (top-1 of each run on the target's held-out
images). These are digits, not ImageNet: the figures show that the path works and what the
preset does on small data, nothing about ImageNet transfer.

Usage::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/finetune_digits.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nfnets.data import digits_datasets
from nfnets.finetune import PAPER_BATCH, finetune_preset
from nfnets.train import DIGITS_MODEL_ARGS, TrainConfig, train

SIZE = 32  # train and test resolution
COMMON = {"model": "nfnet_f0", "model_args": DIGITS_MODEL_ARGS, "train_size": SIZE,
          "test_size": SIZE, "progress": False, "log_every": 1000}
# The digits demo's short recipe (nfnets.train.DIGITS_OVERRIDES).
DEMO = {"epochs": 15, "batch_size": 64, "lr": 0.2, "warmup_epochs": 2.0, "augment": "none",
        "drop_rate": 0.0, "stochdepth_rate": 0.0}


def write_folders(root: Path) -> None:
    """root/source and root/target, each with train/ and val/ class folders of PNGs."""
    train, val = digits_datasets(SIZE, seed=0)
    for split, dataset in (("train", train), ("val", val)):
        images = dataset.images.expand(-1, 3, -1, -1)  # grey → RGB
        canvas = F.pad(images, (SIZE // 2,) * 4)  # the digit fills the centre half
        for i, (image, label) in enumerate(zip(canvas, dataset.labels.tolist(), strict=True)):
            task = "source" if label < 5 else "target"
            folder = root / task / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = image.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{i}.png")


def run(name: str, work: Path, **values) -> dict:
    start = time.perf_counter()
    summary = train(TrainConfig(out=str(work / "runs" / name), **{**COMMON, **values}))
    return {"top1": summary["val_top1"], "top1_ema": summary["val_top1_ema"],
            "epochs": summary["epochs"], "steps": summary["steps"],
            "seconds": round(time.perf_counter() - start, 1), "settings": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/finetune_digits"))
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/finetune_digits.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    write_folders(args.work / "data")
    source, target = str(args.work / "data" / "source"), str(args.work / "data" / "target")
    results = {"pretrain_source": run("pretrain", args.work, data=source, **DEMO)}
    pretrained = str(args.work / "runs" / "pretrain")
    # The preset alone: nothing but --init-from (and the small model and image size).
    results["finetune_preset"] = run("finetune", args.work, data=target, init_from=pretrained)
    preset = finetune_preset()
    # The preset with the paper's learning rate scaled linearly with the batch (0.1 · B/2048).
    scaled = preset["lr"] * preset["batch_size"] / PAPER_BATCH
    results["finetune_preset_lr_scaled"] = run("finetune_scaled", args.work, data=target,
                                               init_from=pretrained, lr=scaled)
    results["scratch_preset_settings"] = run("scratch_preset", args.work, data=target, **preset)
    results["scratch_demo_recipe"] = run("scratch_demo", args.work, data=target, **DEMO)
    record = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
              "machine": platform.machine(), "threads": torch.get_num_threads(),
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
