"""Evaluation and prediction: load any supported weights, measure top-1/top-5, classify images.

``load_inference_model`` accepts a training run directory, a ``.safetensors`` file written by
``nfnets.weights.save_weights``, a training checkpoint ``step_*.pt`` or DeepMind's
``F*_haiku.npz``. ``evaluate`` follows the official evaluation (official.md §5.10): top-1,
top-5 and unsmoothed cross-entropy summed over the images, then divided by their count, also
across DDP ranks. ``predict`` preprocesses like the official demo (checkpoint-format.md §7).

The ``nfnets eval`` and ``nfnets predict`` subcommands are thin wrappers over these functions.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .checkpoint import list_checkpoints, load_checkpoint
from .data import (
    CROP_PADDING,
    DataError,
    load_rgb,
    normalize,
)
from .errors import UsageError
from .models import create_model, model_defaults
from .weights import (
    CheckpointError,
    detect_variant,
    load_weights,
    official_model_kwargs,
    official_to_state_dict,
    read_official_checkpoint,
    read_weights_metadata,
)

__all__ = ["evaluate", "load_inference_model", "predict", "preprocess_image"]

PathLike = str | os.PathLike
DEFAULT_EVAL_BATCH = 50  # official.md §5.10: eval batch 50
DEFAULT_TOP_K = 5  # official.md §5.10 reports top-1 and top-5
IMAGENET_CLASSES = 1000
_RUN_WEIGHTS = {False: "model.safetensors", True: "model_ema.safetensors"}  # train.py's names
_MAX_ERROR_CHARS = 600  # torch's load_state_dict message lists every key; keep the start


# ----------------------------------------------------------------------------------------------
# Loading a model for inference


def _imagenet_classes() -> list[str]:
    """ImageNet's 1000 class names in label order (torchvision's copy of the standard list)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def _canonical_name(name: str) -> str:
    """Our spelling of a model name ('F0' -> 'nfnet_f0'); UsageError for unknown names."""
    try:
        with torch.device("meta"):  # only the name is needed: build nothing real
            return create_model(name, num_classes=0).model_name
    except ValueError as err:
        raise UsageError(str(err)) from None


def _json_value(value: Any) -> Any:
    """save_weights stores non-string extra metadata as JSON and strings as they are."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _read_config(run_dir: Path) -> dict[str, Any]:
    """A run's config.json, or {} when there is none (e.g. a checkpoint copied elsewhere)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err})") from None
    return config if isinstance(config, dict) else {}


def _info(model: nn.Module, source: Path, ema: bool, *sources: dict[str, Any]) -> dict[str, Any]:
    """Inference facts, taking each key from the first of ``sources`` that has it."""

    def first(key: str) -> Any:
        return next((s[key] for s in sources if s.get(key) is not None), None)

    train = first("train") or {}
    return {
        "classes": first("classes"),
        "test_size": int(first("test_size") or model_defaults(model.model_name)["test_size"]),
        "source": str(source),
        "model_name": model.model_name,
        "ema": ema,
        "data": first("data"),
        # the digits demo's held-out split depends on the run's seed (train.py)
        "seed": int(first("seed") or train.get("seed") or 0),
    }


def _official_classes(model: nn.Module, metadata: dict[str, Any]) -> dict[str, Any]:
    """ImageNet's names for official weights (read directly, or via ``nfnets convert``, which
    records the source file); nothing otherwise."""
    if "source_file" in metadata and model.num_classes == IMAGENET_CLASSES:
        return {"classes": _imagenet_classes()}
    return {}


def _load_state(model: nn.Module, state_dict: dict[str, Tensor], source: Path) -> None:
    """load_state_dict, turning torch's mismatch report into a CheckpointError."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        detail = str(err)
        if len(detail) > _MAX_ERROR_CHARS:
            detail = detail[:_MAX_ERROR_CHARS] + " ..."
        raise CheckpointError(f"{source}: the weights do not fit {model.model_name}: "
                              f"{detail}") from None


def _check_name(found: str, wanted: str | None, source: Path) -> None:
    if wanted is not None and _canonical_name(wanted) != found:
        raise CheckpointError(f"{source} holds {found} weights, not {wanted}; drop --model or "
                              f"pass --model {found}")


def _load_safetensors(path: Path, model_name: str | None, ema: bool,
                      config: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    if ema and path.name != _RUN_WEIGHTS[True]:
        raise CheckpointError(
            f"{path} holds a single set of weights, so --ema does not apply: pass a run "
            "directory or a training checkpoint with --ema, or the run's model_ema.safetensors "
            "itself"
        )
    metadata = read_weights_metadata(path)
    _check_name(metadata["model_name"], model_name, path)
    model = load_weights(path)
    extra = {key: _json_value(value) for key, value in metadata.items()}
    return model, _info(model, path, ema, extra, config, _official_classes(model, extra))


def _load_training_checkpoint(path: Path, model_name: str | None, ema: bool
                              ) -> tuple[nn.Module, dict[str, Any]]:
    state = load_checkpoint(path, verify=False)  # verified when its manifest is there
    name = state.get("model_name")
    if not name:
        raise CheckpointError(f"{path} does not name its model (no model_name); it was not "
                              "written by nfnets train")
    _check_name(name, model_name, path)
    if ema:
        averaged = state.get("ema")
        if not isinstance(averaged, dict) or not isinstance(averaged.get("module"), dict):
            raise CheckpointError(f"{path} holds no EMA weights; drop --ema")
        weights = averaged["module"]
    else:
        weights = state["model"]
    try:
        model = create_model(name, **(state.get("model_kwargs") or {}))
    except ValueError as err:
        raise CheckpointError(f"{path}: cannot rebuild {name}: {err}") from None
    _load_state(model, weights, path)
    # in a run, RUN/checkpoints/step_*.pt; the run's config.json has the class names
    run_config = _read_config(path.parent.parent) if path.parent.name == "checkpoints" else {}
    return model, _info(model, path, ema, run_config, state.get("config") or {})


def _load_official(path: Path, model_name: str | None, ema: bool
                   ) -> tuple[nn.Module, dict[str, Any]]:
    if ema:
        # checkpoint-format.md §1: one set of weights per file, EMA or raw is not stated
        raise CheckpointError(f"{path} is an official checkpoint with a single set of weights; "
                              "drop --ema")
    family, state_dict = official_to_state_dict(read_official_checkpoint(path))
    try:
        detected = detect_variant(state_dict, family)
    except CheckpointError:
        if model_name is None:
            raise
        detected = None  # an unusual layout: loading into model_name decides
    if detected is not None:
        _check_name(detected, model_name, path)
    name = model_name or detected
    try:
        model = create_model(name, **official_model_kwargs(family, state_dict))
    except ValueError as err:
        raise UsageError(str(err)) from None
    _load_state(model, state_dict, path)
    return model, _info(model, path, ema, _official_classes(model, {"source_file": path.name}))


def _load_file(path: Path, model_name: str | None, ema: bool) -> tuple[nn.Module, dict[str, Any]]:
    """Dispatch on the file's first bytes: suffixes lie (F*_haiku.npz is a pickle)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip archive
        return _load_training_checkpoint(path, model_name, ema)
    if head.startswith(b"\x80"):  # pickle protocol >= 2 (checkpoint-format.md §2)
        return _load_official(path, model_name, ema)
    # a run's weights file copied out of the run has no config beside it; others never do
    in_run = path.name in _RUN_WEIGHTS.values()
    return _load_safetensors(path, model_name, ema, _read_config(path.parent) if in_run else {})


def _load_run(run: Path, model_name: str | None, ema: bool) -> tuple[nn.Module, dict[str, Any]]:
    """A finished run's safetensors, else (run still going) its newest checkpoint."""
    weights = run / _RUN_WEIGHTS[ema]
    if weights.is_file():
        return _load_safetensors(weights, model_name, ema, _read_config(run))
    if ema and (run / _RUN_WEIGHTS[False]).is_file():
        raise CheckpointError(f"run {run} has {_RUN_WEIGHTS[False]} but no "
                              f"{_RUN_WEIGHTS[True]}; drop --ema")
    checkpoints = list_checkpoints(run / "checkpoints")
    if checkpoints:
        return _load_training_checkpoint(checkpoints[-1], model_name, ema)
    raise CheckpointError(f"{run} holds no weights: expected a training run directory with "
                          f"{_RUN_WEIGHTS[False]} or checkpoints/step_*.pt")


def load_inference_model(path: PathLike, *, model_name: str | None = None, ema: bool = False,
                         num_classes: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load weights for inference; return ``(model in eval mode, info)``.

    ``path`` is a training run directory (``model_ema.safetensors`` with ``ema``, else
    ``model.safetensors``; while the run has neither, its newest ``checkpoints/step_*.pt``), a
    ``.safetensors`` file from ``save_weights``, a training checkpoint ``.pt`` or DeepMind's
    ``F*_haiku.npz`` (variant detected from the file, or ``model_name``). ``model_name`` must
    agree with files that name their model; ``num_classes``, when given, must equal the
    file's class count.

    ``info``: ``classes`` (names in label order, or None when unknown; ImageNet's for official
    files), ``test_size`` (the run's, else the variant's), ``source`` (the file loaded),
    ``model_name``, ``ema``, ``data`` (the run's data option, or None) and ``seed`` (the run's
    seed, which fixes the digits demo's held-out split).

    Raises FileNotFoundError for a missing path and CheckpointError for a file that cannot be
    used (including ``ema=True`` on weights without an EMA copy).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or run directory: {path}")
    if path.is_dir():
        model, info = _load_run(path, model_name, ema)
    else:
        model, info = _load_file(path, model_name, ema)
    if num_classes is not None and model.num_classes != num_classes:
        raise CheckpointError(f"{info['source']} predicts {model.num_classes} classes, not "
                              f"{num_classes}")
    return model.eval(), info


# ----------------------------------------------------------------------------------------------
# Evaluation


def _device_of(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu"
             ) -> dict[str, float | int]:
    """Top-1 and top-5 accuracy (percent) and mean unsmoothed cross-entropy over ``loader``.

    ``loader`` yields ``(images, labels, skipped)`` batches as ``nfnets.data.eval_loader``.
    Correct counts and the loss are summed, then divided by the number of images
    (official.md §5.10). With fewer than 5 classes "top-5" is top-k with k = the class count.
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
    """One image file as the official demo feeds it: 3 x S x S float32, normalised.

    checkpoint-format.md §7: squash-resize to (S+32) x (S+32) with PIL's bicubic filter,
    crop the centre S x S at offset 16, normalise on the 0-255 scale (official.md §6.4).
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
    image = Image.fromarray(rgb.permute(1, 2, 0).numpy())
    if crop:
        scaled = image_size + CROP_PADDING
        offset = (scaled - image_size + 1) // 2  # official.md §6.3: 16 for a 32 px margin
        image = image.resize((scaled, scaled), Image.Resampling.BICUBIC)
        image = image.crop((offset, offset, offset + image_size, offset + image_size))
    else:
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return normalize(pixels[None])[0]


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
        raise ValueError(f"{len(classes)} class names given for a model of {num_classes} "
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
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    device = _device_of(device)
    names = _class_names(classes, model.num_classes)
    model.eval()
    inputs = (preprocess_image(p, image_size, crop=crop) for p in images)
    return [[(names[i], p) for i, p in pairs]
            for pairs in _top_k(model, inputs, top_k, device, batch_size)]
