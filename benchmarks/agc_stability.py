"""AGC's stability claim, measured small: a tiny NF-ResNet across batch sizes and learning rates.

NFNet paper (arXiv 2102.06171) §4.1: without normalisation, NF-ResNets become unstable at large
batch sizes and learning rates; Adaptive Gradient Clipping lets them train there, matching
batch-normalised ResNets, and the best clipping factor λ gets smaller as the batch grows.

This script trains one small NF-ResNet (NF-ResNet-50's blocks, width 0.5, one block per stage,
no stochastic depth) on scikit-learn's digits at 32 px (or on any ImageNet-style folder) for
each cell of a grid of batch sizes × peak learning rates, under five optimiser settings, all
with the recipe's SGD (Nesterov 0.9, weight decay 2e-5, label smoothing 0.1, linear warm-up
then cosine decay over a fixed number of epochs):

- ``none``: the NF model without clipping (``nfnets.sgd_agc(..., clipping=None)``);
- ``agc_0.01`` / ``agc_0.02`` / ``agc_0.04``: the NF model with AGC at λ (classifier weight
  unclipped, as the recipe: ``nfnets.optim.param_groups``);
- ``agc_0.01_noskip`` (not in the default grid): AGC at 0.01 with the SkipInit gains left
  unclipped. AGC floors each unit's weight norm at eps = 1e-3, so a zero-initialised skip gain
  may move by at most λ · 1e-3 per step (official behaviour): at small learning rates and short
  runs the residual branches then stay switched off. This setting separates that effect from
  AGC's clipping of the rest;
- ``bn``: its batch-norm counterpart (``nfnets.signal.batchnorm_counterpart``: plain convs,
  BN before every activation, α = 1, no skip gain), without clipping.

The learning rate axis is the *base* rate per 256 images, so the peak rate of a cell is
``base · batch / 256`` (``nfnets.peak_lr``), as in the recipe and the paper's batch-size sweep.
A run whose loss becomes non-finite stops and counts as diverged. Results: held-out top-1 per
run, written as JSON (with machine facts and the command), a markdown table and a heat-map PNG.
Cells are run in an interleaved order (all settings of a cell one after another).

Usage::

    PYTHONPATH=src python benchmarks/agc_stability.py            # the default grid: 60 runs
    PYTHONPATH=src python benchmarks/agc_stability.py --quick    # seconds: a smoke test
    PYTHONPATH=src python benchmarks/agc_stability.py --data DIR --image-size 64
    # the grid split over processes (one per batch size), then combined:
    PYTHONPATH=src python benchmarks/agc_stability.py --batch-sizes 16 --out b16.json  # &c.
    PYTHONPATH=src python benchmarks/agc_stability.py --merge b16.json b64.json b256.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import nfnets
from nfnets.augment import DEFAULT_LABEL_SMOOTHING as LABEL_SMOOTHING  # the recipe's 0.1
from nfnets.data import EvalTransform, ImageFolderDataset, digits_datasets, eval_collate, normalize
from nfnets.models import NFResidualBlock
from nfnets.optim import peak_lr, sgd_agc, warmup_cosine_lr
from nfnets.signal import batchnorm_counterpart

SETTINGS = ("none", "agc_0.01", "agc_0.02", "agc_0.04", "agc_0.01_noskip", "bn")
DEFAULT_SETTINGS = ("none", "agc_0.01", "agc_0.02", "agc_0.04", "bn")
DEFAULT_BATCHES = (16, 64, 256)
DEFAULT_BASE_LRS = (0.1, 0.4, 1.6, 6.4)
MODEL = "nf_resnet50"
MODEL_ARGS = {"width": 0.5, "depths": [1, 1, 1, 1], "stochdepth_rate": 0.0}
RESULTS = Path("benchmarks/results")


@dataclass
class Run:
    """One training run of the grid."""

    setting: str
    batch_size: int
    base_lr: float
    lr: float
    seed: int
    diverged: bool
    steps: int  # optimiser steps taken (fewer than planned when diverged)
    planned_steps: int
    final_loss: float | None  # mean training loss of the last epoch run
    top1: float | None  # held-out top-1 in percent; None when diverged
    clip_fraction: float | None  # mean fraction of AGC units clipped per step
    seconds: float
    skip_gain: float | None = None  # mean |SkipInit gain| over the NF blocks at the end


def clipping_of(setting: str) -> float | None:
    """λ of an ``agc_*`` setting, None for ``none`` and ``bn``."""
    return float(setting.split("_")[1]) if setting.startswith("agc_") else None


def load_data(data: str, image_size: int, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(train images, train labels, held-out images, held-out labels, classes), normalised,
    in memory (the digits' stratified split, or a folder's train/ and val/ at ``image_size``
    with the evaluation transform: no augmentation, so runs differ only in the optimiser)."""
    if data == "digits":
        train, val = digits_datasets(image_size, seed=seed)
        def tensors(ds):
            return normalize(ds.images.expand(-1, 3, -1, -1).float()), ds.labels
        return (*tensors(train), *tensors(val), len(train.classes))
    splits = []
    for split in ("train", "val"):
        dataset = ImageFolderDataset(data, split, EvalTransform(image_size))
        batch = eval_collate([dataset[i] for i in range(len(dataset))])
        splits += [batch.images, batch.labels]
    return (*splits, len(dataset.classes))


def build(setting: str, num_classes: int, seed: int) -> nn.Module:
    """The tiny NF-ResNet (or its BN counterpart), initialised from ``seed``."""
    torch.manual_seed(seed)
    model = nfnets.create_model(MODEL, num_classes=num_classes, **MODEL_ARGS)
    return batchnorm_counterpart(model) if setting == "bn" else model


def train_run(setting: str, batch_size: int, base_lr: float, data: tuple, epochs: int,
              warmup_epochs: float, seed: int) -> Run:
    """Train one cell; stop at the first non-finite loss."""
    x_train, y_train, x_val, y_val, num_classes = data
    model = build(setting, num_classes, seed)
    lr = peak_lr(batch_size, base_lr)
    free = [name for name, _ in model.named_parameters()
            if setting.endswith("_noskip") and name.endswith("skip_gain")]
    optimizer = sgd_agc(model, lr, clipping=clipping_of(setting), exclude_from_clipping=free)
    per_epoch = len(x_train) // batch_size
    if per_epoch == 0:
        raise SystemExit(f"batch size {batch_size} exceeds the {len(x_train)} training images")
    total = epochs * per_epoch
    schedule = warmup_cosine_lr(optimizer, min(warmup_epochs * per_epoch, total - 1), total)
    order = torch.Generator().manual_seed(seed)
    start, steps, diverged, clipped, losses = time.perf_counter(), 0, False, [], []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=order)
        losses = []
        for i in range(per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx],
                                   label_smoothing=LABEL_SMOOTHING)
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            steps += 1
            losses.append(loss.item())
            if optimizer.last_stats is not None and optimizer.clipping is not None:
                clipped.append(float(optimizer.last_stats.fraction))
        if diverged:
            break
    top1 = None if diverged else accuracy(model, x_val, y_val)
    gains = [abs(float(b.skip_gain.detach())) for b in model.modules()
             if isinstance(b, NFResidualBlock)]
    return Run(setting, batch_size, base_lr, lr, seed, diverged, steps, total,
               statistics.fmean(losses) if losses and not diverged else None, top1,
               statistics.fmean(clipped) if clipped else None, time.perf_counter() - start,
               None if setting == "bn" or diverged else statistics.fmean(gains))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Held-out top-1 (percent) in eval mode; a non-finite logit counts as wrong."""
    model.eval()
    logits = torch.cat([model(chunk) for chunk in x.split(256)])
    right = (logits.argmax(1) == y) & torch.isfinite(logits).all(1)
    return 100.0 * right.float().mean().item()


def cell_median(runs: list[Run], setting: str, batch: int, base_lr: float
                ) -> tuple[float, int, int]:
    """(median top-1 over the cell's seeds, diverged seeds, seeds run). Diverged runs count as
    NaN: a cell where at least half the seeds diverged is NaN (diverged), otherwise the median
    of the survivors. A cell nobody ran is (NaN, 0, 0)."""
    cell = [r for r in runs if (r.setting, r.batch_size, r.base_lr) == (setting, batch, base_lr)]
    finite = [r.top1 for r in cell if r.top1 is not None]
    diverged = len(cell) - len(finite)
    median = statistics.median(finite) if finite and diverged * 2 < len(cell) else math.nan
    return median, diverged, len(cell)


def markdown(runs: list[Run], batches: list[int], lrs: list[float], settings: list[str],
             seeds: int) -> str:
    """One table: a row per (setting, batch), a column per base LR; median held-out top-1."""
    head = "| setting | batch | " + " | ".join(f"base lr {lr:g}" for lr in lrs) + " |"
    lines = [head, "|" + "---|" * (len(lrs) + 2)]
    for setting in settings:
        for batch in batches:
            cells = []
            for lr in lrs:
                median, diverged, count = cell_median(runs, setting, batch, lr)
                text = "diverged" if math.isnan(median) else f"{median:.1f}"
                if not count:
                    text = "not run"
                elif diverged and not math.isnan(median):
                    text += f" ({diverged}/{count} div.)"
                cells.append(text)
            lines.append(f"| {setting} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def heatmap(runs: list[Run], batches: list[int], lrs: list[float], settings: list[str],
            path: Path, title: str) -> None:
    """One panel per setting: batch size × base LR, colour = median held-out top-1, ✗ =
    diverged (non-finite loss)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")  # diverged: grey behind the cross

    cols = min(len(settings), 3)  # rows of three panels stay readable at normal size
    rows = math.ceil(len(settings) / cols)
    fig = Figure(figsize=(3.3 * cols + 1.2, (0.55 * len(batches) + 1.9) * rows + 0.4),
                 layout="constrained")
    grid_axes = fig.subplots(rows, cols, sharey=True, squeeze=False)
    axes = list(grid_axes.flat)
    for ax in axes[len(settings):]:
        ax.set_visible(False)
    axes = axes[:len(settings)]
    image = None
    for ax, setting in zip(axes, settings, strict=True):
        cells = [[cell_median(runs, setting, b, lr) for lr in lrs] for b in batches]
        grid = [[median for median, _, _ in row] for row in cells]
        image = ax.imshow(grid, vmin=0, vmax=100, cmap=cmap, aspect="auto",
                          origin="lower")
        for i, row in enumerate(cells):
            for j, (value, _, count) in enumerate(row):
                if not count:
                    ax.text(j, i, "not run", ha="center", va="center", fontsize=8)
                    continue
                diverged = math.isnan(value)
                ax.text(j, i, "✗" if diverged else f"{value:.0f}", ha="center", va="center",
                        color="red" if diverged else ("black" if value > 60 else "white"),
                        fontsize=12 if diverged else 9, fontweight="bold")
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_yticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("base LR (per 256 images)")
        ax.set_title(_TITLES.get(setting) or f"NF + AGC λ={clipping_of(setting):g}",
                     fontsize=10)
    for row in grid_axes:
        row[0].set_ylabel("batch size")
    fig.colorbar(image, ax=axes, label="held-out top-1 (%)", shrink=0.9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)


_TITLES = {"none": "NF, no clipping", "bn": "BN counterpart",
           "agc_0.01_noskip": "NF + AGC λ=0.01,\nskip gains unclipped"}


def machine() -> dict:
    """Facts about the machine the numbers come from."""
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits",
                        help="'digits' (default) or an ImageNet-style folder with train/, val/")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCHES)))
    parser.add_argument("--base-lrs", default=",".join(map(str, DEFAULT_BASE_LRS)),
                        help="peak LRs per 256 images; a cell's LR is base · batch / 256")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help=f"subset of {','.join(SETTINGS)}")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=1, help="seeds per cell (median reported)")
    parser.add_argument("--limit", type=int, default=0,
                        help="use only the first N training images (0: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test in seconds: 256 images at 16 px, one epoch at batch "
                        "32, base LRs 0.1 and 25.6, settings none, agc_0.01 and bn")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="combine partial results (e.g. one process per batch size) into "
                        "--out, with its table and heat map; runs nothing")
    parser.add_argument("--out", type=Path, default=RESULTS / "agc_stability.json",
                        help="JSON path; the .md table and .png heat map go beside it")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.base_lrs, args.settings = "32", "0.1,25.6", "none,agc_0.01,bn"
        args.epochs, args.image_size, args.warmup_epochs, args.limit = 1, 16, 0.25, 256
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.base_lrs = [float(v) for v in args.base_lrs.split(",")]
    args.settings = args.settings.split(",")
    unknown = set(args.settings) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; choose from {SETTINGS}")
    return args


def write_report(record: dict, out: Path, figures: bool = True) -> str:
    """Write ``record`` as JSON to ``out`` and, with ``figures``, the markdown table and the heat
    map beside it; returns the table."""
    cfg = record["settings"]
    runs = [Run(**r) for r in record["runs"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    table = markdown(runs, cfg["batch_sizes"], cfg["base_lrs"], cfg["settings"], cfg["seeds"])
    if figures:
        title = (f"{MODEL} width 0.5, depths 1/1/1/1 on {cfg['data']} at {cfg['image_size']} "
                 f"px, {cfg['epochs']} epoch(s); median of {cfg['seeds']} seed(s); ✗ = diverged")
        out.with_suffix(".md").write_text(f"{title}\n\n{table}")
        heatmap(runs, cfg["batch_sizes"], cfg["base_lrs"], cfg["settings"],
                out.with_suffix(".png"), title)
    return table


def merge(paths: list[Path]) -> dict:
    """One record from several partial grids (e.g. one process per batch size or LR range)
    that share the model, data and schedule; batch sizes, LRs, settings and seeds are united."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(records[0])
    cfg = dict(merged["settings"])
    fixed = ("model", "model_args", "data", "image_size", "epochs", "warmup_epochs",
             "label_smoothing")
    for other in records[1:]:
        for key in fixed:
            if other["settings"][key] != cfg[key]:
                raise SystemExit(f"cannot merge: {key} differs ({other['settings'][key]!r} vs "
                                 f"{cfg[key]!r})")
    cfg["batch_sizes"] = sorted({b for r in records for b in r["settings"]["batch_sizes"]})
    cfg["base_lrs"] = sorted({v for r in records for v in r["settings"]["base_lrs"]})
    cfg["seeds"] = max(r["settings"]["seeds"] for r in records)
    found = {s for r in records for s in r["settings"]["settings"]}
    cfg["settings"] = [s for s in SETTINGS if s in found]
    merged["settings"] = cfg
    merged["command"] = [r["command"] for r in records]
    merged["machine"] = [r["machine"] for r in records]
    # a cell run twice (a split grid that overlapped): the first file's run wins
    runs = {}
    for r in records:
        for run in r["runs"]:
            runs.setdefault((run["setting"], run["batch_size"], run["base_lr"], run["seed"]), run)
    merged["runs"] = list(runs.values())
    return merged


def main(argv: list[str] | None = None) -> dict:
    """Run the grid (or ``--merge`` partial results) and write JSON, markdown and PNG; returns
    the JSON record. The JSON is rewritten after every run, so a long grid loses nothing."""
    args = parse_args(argv)
    command = "python benchmarks/agc_stability.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    if args.merge:
        record = merge(args.merge)
        record["command"].append(command)
        print(write_report(record, args.out))
        return record
    data = load_data(args.data, args.image_size)
    if args.limit:
        data = (data[0][:args.limit], data[1][:args.limit], *data[2:])
    record = {
        "command": command,
        "machine": machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "nfnets": nfnets.__version__},
        "settings": {"model": MODEL, "model_args": MODEL_ARGS, "data": args.data,
                     "image_size": args.image_size, "train_images": len(data[0]),
                     "heldout_images": len(data[2]), "epochs": args.epochs,
                     "warmup_epochs": args.warmup_epochs, "seeds": args.seeds,
                     "batch_sizes": args.batch_sizes, "base_lrs": args.base_lrs,
                     "optimizer": "nfnets.sgd_agc: SGD Nesterov 0.9, wd 2e-5, AGC eps 1e-3",
                     "label_smoothing": LABEL_SMOOTHING, "settings": args.settings},
        "runs": [],
    }
    for seed in range(args.seeds):
        for batch in args.batch_sizes:
            for base_lr in args.base_lrs:
                for setting in args.settings:  # interleaved: every setting of a cell in turn
                    run = train_run(setting, batch, base_lr, data, args.epochs,
                                    args.warmup_epochs, seed)
                    record["runs"].append(asdict(run))
                    write_report(record, args.out, figures=False)
                    result = "diverged" if run.diverged else f"top-1 {run.top1:5.1f}%"
                    print(f"{setting:>9} batch {batch:4d} base lr {base_lr:<5g} "
                          f"(lr {run.lr:.4g}) seed {seed}: {result} "
                          f"[{run.steps}/{run.planned_steps} steps, {run.seconds:.1f}s]",
                          flush=True)
    record["machine"]["load_average_at_end"] = machine()["load_average_1_5_15"]
    print(write_report(record, args.out))
    return record


if __name__ == "__main__":
    torch.set_num_threads(1)  # one core per run: comparable across machines, as documented
    main()
