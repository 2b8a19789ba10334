"""``nfnets eval``: top-1/top-5 of weights on an image folder or the digits demo."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from torch import nn

from ..data import EvalTransform, ImageFolderDataset, digits_datasets, eval_loader
from ..errors import UsageError
from ..evaluate import DEFAULT_EVAL_BATCH, evaluate
from ..weights import imagenet_classes, load_model
from ._common import add_model_arguments, positive, prepare_model, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nfnets eval``."""
    parser.add_argument("path", metavar="PATH",
                        help="run directory, .safetensors, training checkpoint .pt or "
                        "official F*_haiku.npz")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="ImageNet-style folder (DIR/<split>/<class>/<image>), or 'digits' "
                        "for the bundled digits held-out split")
    parser.add_argument("--split", default="val", help="split folder under DIR (default: val)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_EVAL_BATCH,
                        help=f"images per batch (default: {DEFAULT_EVAL_BATCH}, as official)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="data loading processes (default: 0)")
    add_model_arguments(parser)


def _eval_dataset(args: argparse.Namespace, info: dict[str, Any], image_size: int):
    if args.data == "digits":
        return digits_datasets(image_size, seed=info["seed"])[1], "digits held-out split"
    dataset = ImageFolderDataset(args.data, args.split, EvalTransform(image_size))
    return dataset, str(dataset.split_dir)


def _check_classes(dataset_classes: list[str], model: nn.Module, info: dict[str, Any],
                   where: str) -> None:
    if len(dataset_classes) != model.num_classes:
        raise UsageError(
            f"{where} has {len(dataset_classes)} classes but {info['source']} predicts "
            f"{model.num_classes}; evaluate on data with the classes the model was trained on"
        )
    known = info["classes"]
    # official weights carry ImageNet's readable names, never the folder's synset ids
    if known is not None and list(known) not in (list(dataset_classes), imagenet_classes()):
        print(f"nfnets eval: warning: the class names of {where} differ from the run's "
              "(labels are matched by sorted position)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """``nfnets eval``: top-1/top-5 at the test resolution, single centre crop."""
    positive(args.image_size, "--image-size")
    positive(args.batch_size, "--batch-size")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, got {args.num_workers}")
    device = resolve_device(args.device)
    model, info = load_model(args.path, model_name=args.model, ema=args.ema)
    image_size = args.image_size or info["test_size"]
    dataset, where = _eval_dataset(args, info, image_size)
    _check_classes(dataset.classes, model, info, where)
    loader = eval_loader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                         pin_memory=device.type == "cuda")
    model = prepare_model(model, device, args.batch_size, image_size, args.compile)
    metrics = evaluate(model, loader, device)
    result = {**metrics, "model": info["model_name"], "source": info["source"],
              "ema": info["ema"], "image_size": image_size, "data": where}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{info['model_name']}{' (EMA)' if info['ema'] else ''} from {info['source']} "
              f"on {where}: {metrics['count']} images at {image_size} px")
        print(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
              f"loss {metrics['loss']:.4f}")
        if metrics["skipped_images"]:
            print(f"{metrics['skipped_images']} unreadable images were replaced by their "
                  "neighbours (see the warnings above)")
    return 0
