"""``nfnets predict``: the top-k classes of image files."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

from torch import Tensor

from ..errors import DataError
from ..evaluate import DEFAULT_EVAL_BATCH, DEFAULT_TOP_K, _class_names, _top_k, preprocess_image
from ..weights import load_model
from ._common import add_model_arguments, positive, prepare_model, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nfnets predict``."""
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--weights", required=True, metavar="PATH",
                        help="run directory, .safetensors, training checkpoint .pt or "
                        "official F*_haiku.npz")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                        help=f"classes to show per image (default: {DEFAULT_TOP_K})")
    add_model_arguments(parser)


def _print_predictions(images: list[str], predictions: dict[str, list[tuple[int, float]]],
                       errors: dict[str, str], names: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps([
            {"image": image, "error": errors[image]} if image in errors else
            {"image": image, "predictions": [{"class": names[i], "index": i, "probability": p}
                                             for i, p in predictions[image]]}
            for image in images
        ], indent=2))
        return
    for image in images:
        if image in predictions:
            print(image)
            for i, p in predictions[image]:
                print(f"  {100 * p:6.2f}%  {names[i]}")


def run(args: argparse.Namespace) -> int:
    """``nfnets predict``: top-k classes per image. An unreadable image is reported (stderr,
    and as an "error" entry with --json) and the others are still predicted; the exit status
    is then 2."""
    positive(args.image_size, "--image-size")
    positive(args.top_k, "--top-k")
    device = resolve_device(args.device)
    model, info = load_model(args.weights, model_name=args.model, ema=args.ema)
    image_size = args.image_size or info["test_size"]
    crop = info["data"] != "digits"  # the digits demo evaluates whole images (data.py)
    names = _class_names(info["classes"], model.num_classes)
    model = prepare_model(model, device, min(len(args.images), DEFAULT_EVAL_BATCH), image_size,
                          args.compile)
    readable: list[str] = []
    errors: dict[str, str] = {}

    def inputs() -> Iterator[Tensor]:
        for image in args.images:
            try:
                tensor = preprocess_image(image, image_size, crop=crop)
            except (DataError, FileNotFoundError) as err:
                errors[image] = str(err)
                print(f"nfnets predict: error: {err}", file=sys.stderr)
                continue
            readable.append(image)
            yield tensor

    results = list(_top_k(model, inputs(), args.top_k, device))  # fills readable and errors
    predictions = dict(zip(readable, results, strict=True))
    _print_predictions(args.images, predictions, errors, names, args.json)
    return 2 if errors else 0
