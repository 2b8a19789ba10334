"""Evaluation and prediction: top-1/top-5 over a loader, the top classes of image files.

``evaluate`` follows the official evaluation (deepmind-research nfnets/experiment.py; the
paper's Table 3 protocol): top-1, top-5 and unsmoothed cross-entropy summed over the images,
then divided by their count, also across DDP ranks. ``preprocess_image`` prepares one file
exactly as ``nfnets eval`` prepares a dataset image (``nfnets.data.EvalTransform``), so both
commands give the same logits for the same file. Models for either come from
``nfnets.weights.load_model``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .data import EvalTransform, load_rgb, normalize
from .errors import DataError, UsageError

__all__ = ["evaluate", "predict", "preprocess_image"]

PathLike = str | os.PathLike
DEFAULT_EVAL_BATCH = 50  # the official eval batch (deepmind-research nfnets/experiment_nfnets.py)
DEFAULT_TOP_K = 5  # the official evaluation reports top-1 and top-5


# ----------------------------------------------------------------------------------------------
# Evaluation


def _device_of(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu"
             ) -> dict[str, float | int]:
    """Top-1 and top-5 accuracy (percent) and mean unsmoothed cross-entropy over ``loader``.

    ``loader`` yields ``(images, labels, skipped)`` batches as ``nfnets.data.eval_loader``.
    Correct counts and the loss are summed, then divided by the number of images (as
    deepmind-research nfnets/experiment.py does). With fewer than 5 classes "top-5" is top-k
    with k = the class count.
    When ``torch.distributed`` is initialised each rank passes its shard and the sums are
    all-reduced, so every rank returns the global figures. The model is evaluated in eval mode
    and left in the mode it had. Returns ``top1``, ``top5``, ``loss``, ``count`` and
    ``skipped_images`` (unreadable images that the loader replaced).
    """
    device = _device_of(device)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        # no DDP forward: ranks may hold different numbers of batches, so no collectives
        # may happen per batch, only the one all_reduce at the end
        model = model.module
    was_training = model.training
    model.eval()
    # float64 sums: 50,000 per-image losses added in float32 would lose digits
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    try:
        for images, labels, skipped in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            logits = model(images).float()
            k = min(DEFAULT_TOP_K, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hits = top == labels[:, None]
            totals += torch.stack([
                hits[:, 0].sum().double(),
                hits.any(dim=1).sum().double(),
                F.cross_entropy(logits, labels, reduction="sum").double(),
                torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
                torch.tensor(float(skipped), dtype=torch.float64, device=device),
            ])
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    top1, top5, loss, count, skipped_images = totals.tolist()
    if count == 0:
        raise DataError("the evaluation loader yielded no images")
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "loss": loss / count,
            "count": int(count), "skipped_images": int(skipped_images)}


# ----------------------------------------------------------------------------------------------
# Prediction


def preprocess_image(path: PathLike, image_size: int, *, crop: bool = True) -> Tensor:
    """One image file as ``nfnets eval`` feeds it: 3 x S x S float32, normalised.

    The official evaluation geometry 'resize_crop_32' (deepmind-research nfnets/dataset.py;
    docs/data.md): squash-resize to (S+32) x (S+32) bicubic
    without antialiasing, crop the centre S x S at offset 16, normalise on the 0-255 scale.
    ``crop=False`` squashes straight to S x S (the digits demo evaluates uncropped images).
    Raises FileNotFoundError or DataError naming the file when it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        rgb = load_rgb(path)
    except Exception as err:  # decoders raise many types (OSError, SyntaxError, ...)
        raise DataError(f"cannot read image {path}: {err}") from None
    # 'resize_crop_1' is a crop fraction of 1: resize to S, then an S x S crop of it (all).
    transform = EvalTransform(image_size, "resize_crop_32" if crop else "resize_crop_1")
    return normalize(transform(rgb)[None])[0]


@torch.no_grad()
def _top_k(model: nn.Module, images: Iterable[Tensor], top_k: int, device: torch.device,
           batch_size: int = DEFAULT_EVAL_BATCH) -> Iterator[list[tuple[int, float]]]:
    """(class index, probability) pairs, most probable first, for each of ``images`` (each
    3 x S x S, normalised), batched; lazily, so only one batch is in memory at a time."""
    images = iter(images)
    while batch := list(itertools.islice(images, batch_size)):
        probs = model(torch.stack(batch).to(device)).float().softmax(dim=1)
        values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
        for i, v in zip(indices.tolist(), values.tolist(), strict=True):
            yield list(zip(i, v, strict=True))


def _class_names(classes: Sequence[str] | None, num_classes: int) -> list[str]:
    if classes is None:
        return [str(i) for i in range(num_classes)]
    if len(classes) != num_classes:
        raise UsageError(f"{len(classes)} class names given for a model of {num_classes} "
                         "classes")
    return list(classes)


def predict(model: nn.Module, images: Sequence[PathLike], classes: Sequence[str] | None,
            image_size: int, top_k: int = DEFAULT_TOP_K, *, crop: bool = True,
            device: str | torch.device = "cpu", batch_size: int = DEFAULT_EVAL_BATCH
            ) -> list[list[tuple[str, float]]]:
    """The ``top_k`` most probable classes of each image file, as (name, softmax probability)
    pairs sorted by probability, one list per image in order.

    Images are preprocessed by ``preprocess_image`` (the official demo's geometry at
    ``image_size``). ``classes`` names the model's outputs (None: the indices as strings).
    An unreadable image raises DataError naming it.
    """
    if top_k < 1:
        raise UsageError(f"top_k must be >= 1, got {top_k}")
    device = _device_of(device)
    names = _class_names(classes, model.num_classes)
    model.eval()
    inputs = (preprocess_image(p, image_size, crop=crop) for p in images)
    return [[(names[i], p) for i, p in pairs]
            for pairs in _top_k(model, inputs, top_k, device, batch_size)]
