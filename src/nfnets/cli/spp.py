"""``nfnets spp``: Signal Propagation Plots of a model at initialisation or of a run's weights.

Draws the NF-ResNet paper's three curves (arXiv 2101.08692 §4) per residual block: average
channel squared mean, average channel variance, and the residual branch's variance, and writes
the numbers beside the PNG as CSV and JSON. ``--compare bn`` adds the same architecture with
batch normalisation in place of the NF machinery (see ``nfnets.signal.batchnorm_counterpart``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..data import EvalTransform, ImageFolderDataset, digits_datasets, eval_collate
from ..errors import DataError, UsageError
from ..models import create_model
from ..signal import (
    SignalTable,
    batchnorm_counterpart,
    find_residual_blocks,
    plot_spp,
    set_skip_gains_,
    signal_propagation,
    spp_mode,
    write_tables,
)
from ..weights import load_model
from ._common import parse_model_args, positive, resolve_device

DEFAULT_INIT_SIZE = 128  # statistics at init barely depend on resolution; keeps F7 affordable
DEFAULT_BATCH = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nfnets spp``."""
    parser.add_argument("source", metavar="MODEL_OR_RUN",
                        help="model name (measured at initialisation), or a run directory / "
                        "weights file (measured with its trained weights)")
    parser.add_argument("-o", "--out", default="spp.png", metavar="PNG",
                        help="figure path; the numbers go to the same name with .csv and .json "
                        "(default: spp.png)")
    parser.add_argument("--compare", choices=["bn"],
                        help="also measure the same architecture with batch norm in place of "
                        "the NF machinery (freshly initialised)")
    parser.add_argument("--data", metavar="DIR",
                        help="take the batch from 'digits' or an image folder (DIR/<split>/...) "
                        "instead of unit Gaussian noise (default for a run: the run's data)")
    parser.add_argument("--gaussian", action="store_true",
                        help="feed unit Gaussian noise even for a run")
    parser.add_argument("--split", default="val", help="split folder under --data (default: val)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help=f"images in the batch (default: {DEFAULT_BATCH})")
    parser.add_argument("--image-size", type=int, metavar="S",
                        help=f"input resolution (default: the run's test size, else "
                        f"{DEFAULT_INIT_SIZE})")
    parser.add_argument("--skip-gain", default=None, metavar="G|keep",
                        help="set every SkipInit gain to G before measuring, or 'keep' them "
                        "(default: 1 at initialisation, where the official gains are 0 and "
                        "would hide every branch; keep for trained weights)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="create_model override at initialisation, e.g. depths=[8,8,8,8]")
    parser.add_argument("--ema", action="store_true", help="use a run's EMA weights")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initialisation and of the Gaussian batch")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N (default: cuda when available)")


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, facts) for a model name at init or for trained weights."""
    if Path(args.source).exists():
        if args.model_arg:
            raise UsageError("--model-arg applies to a model name, not to trained weights")
        model, info = load_model(args.source, ema=args.ema)
        return model, {"model": info["model_name"], "source": info["source"], "trained": True,
                       "data": info["data"], "seed": info["seed"],
                       "image_size": info["test_size"]}
    if args.ema:
        raise UsageError("--ema needs a run directory or a training checkpoint")
    torch.manual_seed(args.seed)
    try:
        model = create_model(args.source, **parse_model_args(args.model_arg))
    except ValueError as err:
        raise UsageError(f"{err} (nor is {args.source!r} an existing run or file)") from None
    return model, {"model": model.model_name, "source": "initialisation", "trained": False,
                   "data": None, "seed": args.seed, "image_size": DEFAULT_INIT_SIZE}


def _batch(args: argparse.Namespace, facts: dict[str, Any], size: int,
           in_chans: int) -> tuple[torch.Tensor, str]:
    """The input batch and a description of it."""
    data = None if args.gaussian else (args.data or facts["data"])
    if data is None:
        generator = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.batch_size, in_chans, size, size, generator=generator)
        return x, "unit Gaussian noise"
    if data == "digits":
        dataset, where = digits_datasets(size, seed=facts["seed"])[1], "digits held-out split"
    else:
        dataset = ImageFolderDataset(data, args.split, EvalTransform(size))
        where = str(dataset.split_dir)
    if len(dataset) == 0:
        raise DataError(f"{where} holds no images")
    # evenly spread over the split, so that every class shows up in a sorted dataset
    count = min(args.batch_size, len(dataset))
    indices = torch.linspace(0, len(dataset) - 1, count).round().long().tolist()
    batch = eval_collate([dataset[i] for i in indices])
    return batch.images, f"{count} images of {where}"


def run(args: argparse.Namespace) -> int:
    """``nfnets spp``: measure, write CSV/JSON and the figure, print a summary."""
    positive(args.batch_size, "--batch-size")
    positive(args.image_size, "--image-size")
    if args.gaussian and args.data:
        raise UsageError("--gaussian and --data exclude each other")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"-o must name a .png file, got {out}")
    if not out.parent.is_dir():
        raise UsageError(f"output directory does not exist: {out.parent}")
    device = resolve_device(args.device)
    model, facts = _load(args)
    if not find_residual_blocks(model):
        raise UsageError(f"{facts['model']} has no NF residual blocks to measure")
    size = args.image_size or facts["image_size"]
    x, described = _batch(args, facts, size, model.in_chans)

    skip = args.skip_gain or ("keep" if facts["trained"] else "1")
    if skip != "keep":
        try:
            set_skip_gains_(model, float(skip))
        except ValueError:
            raise UsageError(f"--skip-gain takes a number or 'keep', got {skip!r}") from None
    state = "trained" if facts["trained"] else "init"
    tables = [_measure(model, x, device, f"NF ({state})")]
    if args.compare == "bn":
        torch.manual_seed(args.seed)
        tables.append(_measure(batchnorm_counterpart(model), x, device, "BN-ReLU-Conv (init)"))

    meta = {"model": facts["model"], "source": facts["source"], "input": described,
            "batch_size": int(x.shape[0]), "image_size": size, "skip_gain": skip,
            "seed": args.seed}
    csv_path, json_path = write_tables(tables, out.with_suffix(""), meta)
    title = (f"{facts['model']} — {described}, {size} px"
             f"{'' if skip == 'keep' else f', skip gain {skip}'}")
    plot_spp(tables, out, title)
    for table in tables:
        print(_summary(table))
    for path in (out, csv_path, json_path):
        print(path)
    return 0


def _measure(model: torch.nn.Module, x: torch.Tensor, device: torch.device,
             label: str) -> SignalTable:
    spp_mode(model.to(device))
    return signal_propagation(model, x.to(device), label=label)


def _summary(table: SignalTable) -> str:
    last = table.rows[-1]
    top_mean = max(table.column("avg_sq_mean"))
    return (f"{table.label}: {len(table)} blocks, {last.stage + 1} stages; last block: "
            f"variance {last.avg_var:.4g}, squared mean {last.avg_sq_mean:.4g}; "
            f"largest squared mean {top_mean:.4g}")
