"""Datasets, transforms and loaders of the NFNet ImageNet recipe, plus the bundled digits demo.

Mirrors the official ``nfnets/dataset.py`` (official.md §6). Two data sources:

- an ImageNet-style folder tree ``root/{train,val}/<class>/<image>``
  (``imagenet_datasets`` or ``ImageFolderDataset``);
- scikit-learn's offline handwritten digits (``digits_datasets``), the default demo.

Per-image work happens in the dataset (decode, crop, flip, bicubic resize -> float32 on the
0-255 scale, unclamped); batch work happens in the collate (MixUp/CutMix, RandAugment,
normalisation, soft targets), so both run in DataLoader workers.

The API the training loop uses::

    train_set, val_set = imagenet_datasets(root, train_size, eval_size)   # or digits_datasets(32)
    augment = AugmentConfig.from_name("cutmix_mixup_randaugment_405")
    loader, sampler = train_loader(train_set, batch_size=B, augment=augment, seed=0,
                                   rank=rank, world_size=world, num_workers=8)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch, skip_batches=k if resuming this epoch else 0)
        for images, targets, skipped in loader:   # B x 3 x S x S, B x K, int
            ...
    for images, labels, skipped in eval_loader(val_set, batch_size=50):   # labels: B int64
        ...

Each training step's raw batch holds 2B images when MixUp or CutMix is on (official.md §6.7),
B otherwise. Batches depend only on (seed, epoch, position): the sampler gives every sample its
own seed, so results do not depend on ``num_workers`` and a run resumed with ``skip_batches``
sees exactly the batches it would have seen. An unreadable image is replaced by the next
readable one, a ``SkippedImageWarning`` names its path, and ``skipped`` counts replacements in
the batch.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .augment import (
    DEFAULT_LABEL_SMOOTHING,
    AugmentConfig,
    _randint,
    make_targets,
    mix_batch,
    rand_augment_batch,
)
from .errors import DataError, UsageError

IMAGE_EXTENSIONS = tuple(".jpg .jpeg .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm".split())
# official.md §6.4, nfnets/dataset.py MEAN_RGB / STDDEV_RGB (ImageNet statistics x 255)
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CROP_PADDING = 32  # official.md §6.3: eval and fallback crops leave a 32 px margin
RANDOM_CROP_AREA = (0.08, 1.0)  # official.md §6.2, nfnets/dataset.py _decode_and_random_crop
RANDOM_CROP_ASPECT = (3 / 4, 4 / 3)  # official.md §6.2
RANDOM_CROP_MIN_COVERED = 0.1  # official.md §6.2: min_object_covered of the whole-image box
RANDOM_CROP_ATTEMPTS = 10  # official.md §6.2
MAX_CONSECUTIVE_SKIPS = 100  # more unreadable images in a row than this is a broken dataset
_DIGITS_MAX_VALUE = 16.0  # sklearn digits pixels are 0..16
DIGITS_CROP_AREA = (0.8, 1.0)  # mild crop: a digit must stay recognisable


class SkippedImageWarning(UserWarning):
    """An image could not be read and was replaced by the next readable one."""


class Sample(NamedTuple):
    """One dataset item: image (3 x S x S float32, 0-255 scale), label, how many unreadable
    images were passed over to produce it, and the per-sample seed (None without one)."""

    image: Tensor
    label: int
    skipped: int
    seed: int | None


class Batch(NamedTuple):
    """What the loaders yield: normalised images, targets (train: B x K soft targets;
    eval: B int64 labels) and the number of unreadable images replaced in this batch."""

    images: Tensor
    targets: Tensor
    skipped: int


Transform = Callable[[Tensor, torch.Generator | None], Tensor]


# ----------------------------------------------------------------------------------------------
# Decoding


_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha-composite H x W x 4 uint8 onto white, rounding to nearest."""
    rgba = rgba.astype(np.uint32)
    alpha = rgba[..., 3:]
    rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
    return rgb.astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def pil_to_rgb(img: Image.Image) -> Tensor:
    """Convert a PIL image in any common mode to a 3 x H x W uint8 RGB tensor.

    16-bit grey ('I;16*', and 'I', which is how Pillow opens 16-bit PNGs) is scaled by
    255/65535 with rounding, not clipped; 'F' is clipped to 0..255. Transparency (RGBA, LA, PA,
    P or L/RGB with a transparent colour) is composited onto white. CMYK and other modes go
    through Pillow's RGB conversion. EXIF orientation is ignored, as TF's decoder does.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.float64)
        return _hwc_to_tensor(_grey_to_rgb(np.rint(np.clip(wide, 0, 65535) / 257.0)))
    if img.mode == "F":
        return _hwc_to_tensor(_grey_to_rgb(np.rint(np.clip(np.asarray(img), 0, 255))))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return _hwc_to_tensor(_composite_on_white(np.array(img.convert("RGBA"))))
    return _hwc_to_tensor(np.array(img.convert("RGB")))


def _hwc_to_tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8)).permute(2, 0, 1)


def load_rgb(path: str | os.PathLike) -> Tensor:
    """Decode an image file to a 3 x H x W uint8 RGB tensor (see ``pil_to_rgb``)."""
    with Image.open(path) as img:
        img.load()  # raises on truncated data instead of returning a partial image
        return pil_to_rgb(img)


# ----------------------------------------------------------------------------------------------
# Geometry


Box = tuple[int, int, int, int]  # top, left, height, width


def _crop_attempt(
    height: int,
    width: int,
    aspect: float,
    area_range: tuple[float, float],
    generator: torch.Generator | None,
) -> Box | None:
    """One try of TF's sample_distorted_bounding_box (GenerateRandomCrop), or None."""
    min_area = area_range[0] * width * height
    max_area = area_range[1] * width * height
    # TF draws the height uniformly between the heights giving the min and max areas.
    crop_h = round(math.sqrt(min_area / aspect))
    max_h = round(math.sqrt(max_area / aspect))
    if round(max_h * aspect) > width:
        max_h = int((width + 0.5 - 1e-7) / aspect)
        if round(max_h * aspect) > width:
            max_h -= 1
    max_h = min(max_h, height)
    crop_h = min(crop_h, max_h)
    if crop_h < max_h:
        crop_h += _randint(max_h - crop_h + 1, generator)
    crop_w = round(crop_h * aspect)
    if crop_w * crop_h < min_area:  # TF nudges the height by one against rounding
        crop_h += 1
        crop_w = round(crop_h * aspect)
    if crop_w * crop_h > max_area:
        crop_h -= 1
        crop_w = round(crop_h * aspect)
    area = crop_w * crop_h
    if not (min_area <= area <= max_area and 0 < crop_w <= width and 0 < crop_h <= height):
        return None
    # TF's offsets are uniform over [0, H - h), so a smaller crop never touches the last row.
    top = _randint(height - crop_h, generator) if crop_h < height else 0
    left = _randint(width - crop_w, generator) if crop_w < width else 0
    return top, left, crop_h, crop_w


def sample_distorted_box(
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    *,
    area_range: tuple[float, float] = RANDOM_CROP_AREA,
    aspect_range: tuple[float, float] = RANDOM_CROP_ASPECT,
    min_covered: float = RANDOM_CROP_MIN_COVERED,
    attempts: int = RANDOM_CROP_ATTEMPTS,
) -> Box:
    """Random crop box as TF's ``sample_distorted_bounding_box`` with a whole-image box.

    Aspect uniform in ``aspect_range``, height uniform between the heights of the min and max
    areas, offset uniform; a box must also cover ``min_covered`` of the image. Returns the
    whole image when every attempt fails (official.md §6.2).
    """
    for _ in range(attempts):
        u = float(torch.rand(1, generator=generator))
        aspect = aspect_range[0] + u * (aspect_range[1] - aspect_range[0])
        box = _crop_attempt(height, width, aspect, area_range, generator)
        if box is not None and box[2] * box[3] >= min_covered * height * width:
            return box
    return 0, 0, height, width


def crop_resize_box(height: int, width: int, size: int) -> Box:
    """The official 'crop_resize' centre crop: side int(min(H, W) / (S + 32) * S).

    official.md §6.3, nfnets/dataset.py _decode_and_center_crop (float32 arithmetic as TF).
    The side is at least 1 so tiny images still give a crop.
    """
    scale = np.float32(min(height, width)) / np.float32(size + CROP_PADDING)
    side = max(1, int(scale * np.float32(size)))
    return ((height - side) + 1) // 2, ((width - side) + 1) // 2, side, side


def train_crop_box(
    height: int, width: int, size: int, generator: torch.Generator | None = None
) -> Box:
    """The official training crop: a distorted box, or 'crop_resize' when the sampled box is
    the whole image (the sampler failed; official.md §6.2)."""
    box = sample_distorted_box(height, width, generator)
    if box == (0, 0, height, width):
        return crop_resize_box(height, width, size)
    return box


def _resize(image: Tensor, height: int, width: int) -> Tensor:
    """Bicubic resize to float32 without antialiasing or clamping, like TF2's
    tf.image.resize (official.md §6.2-6.3; torchvision's kernel differs, see docs/data.md)."""
    return F.resize(
        image.float(), [height, width], interpolation=InterpolationMode.BICUBIC, antialias=False
    )


def _crop(image: Tensor, box: Box) -> Tensor:
    top, left, h, w = box
    return image[..., top : top + h, left : left + w]


def _coin(generator: torch.Generator | None) -> bool:
    return float(torch.rand(1, generator=generator)) < 0.5


class TrainTransform:
    """ImageNet training geometry (official.md §6.2): distorted-box crop with the 'crop_resize'
    fallback, random horizontal flip, bicubic resize to size x size.

    Call with a 3 x H x W uint8 image and an optional generator; returns float32 on the 0-255
    scale, not clamped (bicubic overshoots, as the official pipeline's).
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        crop = _crop(image, train_crop_box(*image.shape[-2:], self.size, generator))
        if _coin(generator):
            crop = F.horizontal_flip(crop)
        return _resize(crop, self.size, self.size)


class EvalTransform:
    """Evaluation geometry (official.md §6.3).

    'resize_crop_32' (NFNets): squash-resize to (S+32) x (S+32) bicubic, centre crop S at
    offset ((S+32 - S) + 1) // 2 = 16. 'resize_crop_<pct>' with pct <= 1 resizes to int(S/pct).
    'crop_resize': centre crop of side int(min(H, W) / (S+32) * S), resize to S.
    """

    def __init__(self, size: int, mode: str = "resize_crop_32") -> None:
        self.size = size
        self.mode = mode
        if mode == "crop_resize":
            self.scaled = None
        elif mode.startswith("resize_crop_"):
            try:
                pct = float(mode.removeprefix("resize_crop_"))
            except ValueError:
                pct = 0.0
            if pct <= 0:
                raise UsageError(f"bad eval mode {mode!r}; use e.g. 'resize_crop_32'")
            # official: a number > 1 is a pixel margin, otherwise a crop fraction
            self.scaled = int(size + pct) if pct > 1 else int(size / pct)
        else:
            raise UsageError(
                f"unknown eval mode {mode!r}; use 'resize_crop_32' or 'crop_resize'")

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.scaled is None:
            box = crop_resize_box(*image.shape[-2:], self.size)
            return _resize(_crop(image, box), self.size, self.size)
        resized = _resize(image, self.scaled, self.scaled)
        offset = ((self.scaled - self.size) + 1) // 2
        return _crop(resized, (offset, offset, self.size, self.size))


class DigitsTrainTransform:
    """Mild augmentation for the digits demo: a random crop of 80-100% of the area (aspect
    3/4-4/3, whole image when sampling fails) resized back to S. No flip: digits are not
    mirror-symmetric."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        height, width = image.shape[-2:]
        box = sample_distorted_box(height, width, generator, area_range=DIGITS_CROP_AREA)
        if box == (0, 0, height, width):
            return image.float()
        return _resize(_crop(image, box), self.size, self.size)


# ----------------------------------------------------------------------------------------------
# Datasets


def _parse_key(key: int | tuple[int, int], length: int) -> tuple[int, int | None]:
    """Dataset keys are an index, or (index, seed) from ResumableSampler."""
    index, seed = (key[0], key[1]) if isinstance(key, tuple) else (key, None)
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} images")
    return int(index), seed


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(int(seed))


def _names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _layout(root: Path) -> str:
    return f"expected an ImageNet-style tree {root}/train/<class>/<image> and {root}/val/<class>/"


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; {_layout(root)}")
    if not root.is_dir():
        raise DataError(f"data folder {root} is a file, not a folder; {_layout(root)}")
    if not any(root.iterdir()):
        raise DataError(f"data folder {root} is empty; {_layout(root)}")


def _list_images(class_dir: Path) -> list[str]:
    """Image paths under class_dir (recursive, sorted), relative to its parent."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, class_dir.parent)
        found += [os.path.join(rel, f) for f in sorted(filenames) if _is_image(f)]
    return found


def _scan_split(root: Path, split: str) -> tuple[list[str], list[str], list[int]]:
    """Classes (sorted folder names), image paths relative to root/split, and labels."""
    split_dir = root / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        raise DataError(
            f"data folder {root} has no '{split}' folder (it holds: {_names(present)}); "
            f"{_layout(root)}"
        )
    entries = sorted(
        (e for e in os.scandir(split_dir) if not e.name.startswith(".")), key=lambda e: e.name
    )
    classes = [e.name for e in entries if e.is_dir()]
    if not classes:
        if any(e.is_file() and _is_image(e.name) for e in entries):
            raise DataError(
                f"{split_dir} holds images directly but no class folders; move each image into "
                f"{split_dir}/<class>/ (ImageNet's val images must be sorted into the same "
                "synset folders as train)"
            )
        raise DataError(f"{split_dir} contains no class folders; {_layout(root)}")
    files: list[str] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(classes):
        found = _list_images(split_dir / name)
        if not found:
            empty.append(name)
        files += found
        labels += [label] * len(found)
    if empty:
        raise DataError(
            f"class folder(s) with no images in {split_dir}: {_names(empty)} (images are files "
            f"ending in {', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder(s)"
        )
    return classes, files, labels


class ImageFolderDataset(Dataset):
    """Images of ``root/split/<class>/...``; classes are the sorted folder names.

    Items are ``Sample``s: the decoded image passed through ``transform(image_uint8, generator)``.
    Keys are an index or an (index, seed) pair from ``ResumableSampler``; the seed makes the
    random transform reproducible. An unreadable or truncated image is replaced by the next
    readable one (warning with its path; ``Sample.skipped`` counts the images passed over).
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Transform) -> None:
        self.root = Path(root)
        _check_root(self.root)
        self.split_dir = self.root / split
        self.classes, files, labels = _scan_split(self.root, split)
        # numpy arrays rather than Python lists: workers then share them without copy-on-read
        self._files = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)
        self._labels = np.array(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self._files)

    def path(self, index: int) -> Path:
        """Full path of image ``index``."""
        return self.split_dir / os.fsdecode(self._files[index])

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        index, seed = _parse_key(key, len(self))
        for skipped in range(min(MAX_CONSECUTIVE_SKIPS, len(self))):
            i = (index + skipped) % len(self)
            path = self.path(i)
            try:
                image = load_rgb(path)
            except Exception as err:  # decoders raise many types (OSError, SyntaxError, ...)
                warnings.warn(
                    f"skipping unreadable image {path}: {err}", SkippedImageWarning, stacklevel=2
                )
                continue
            return Sample(
                self.transform(image, _generator(seed)), int(self._labels[i]), skipped, seed
            )
        raise DataError(
            f"{MAX_CONSECUTIVE_SKIPS} consecutive images from {self.path(index)} on could not be "
            "read; check the data folder (copy incomplete? wrong file types?)"
        )


class TensorImageDataset(Dataset):
    """In-memory images (N x C x S x S float, 0-255 scale) with integer labels.

    Items are ``Sample``s with 3 channels (grey is repeated); ``transform(image, generator)``
    is applied when given. Keys as for ``ImageFolderDataset``.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, classes: list[str], transform: Transform | None = None
    ) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"need N x C x H x W images and N labels, got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self.images, self.labels, self.classes = images, labels, classes
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        index, seed = _parse_key(key, len(self))
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image, _generator(seed))
        if image.shape[0] == 1:
            image = image.repeat(3, 1, 1)
        return Sample(image, int(self.labels[index]), 0, seed)


def imagenet_datasets(
    root: str | os.PathLike, train_size: int, eval_size: int, eval_mode: str = "resize_crop_32"
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Train and val datasets of an ImageNet-style tree, with the official transforms.

    Raises ``DataError`` when the tree is missing, empty, lacks a split, has a class folder
    without images, or when val's classes differ from train's.
    """
    train = ImageFolderDataset(root, "train", TrainTransform(train_size))
    val = ImageFolderDataset(root, "val", EvalTransform(eval_size, eval_mode))
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"val classes differ from train classes in {root}: only in train: "
            f"[{_names(only_train)}]; only in val: [{_names(only_val)}]. Both splits need the "
            "same class folders (the label of a class is its position in sorted order)"
        )
    return train, val


def digits_datasets(
    image_size: int = 32, seed: int = 0, val_fraction: float = 0.2
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """scikit-learn's 1797 handwritten digits (8x8, 10 classes) as a train / held-out pair.

    The split is stratified and fixed by ``seed``. Pixels 0..16 are scaled to 0..255 and
    upsampled bicubic (unclamped) to ``image_size``; train images get ``DigitsTrainTransform``,
    held-out images none.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError("the digits demo needs scikit-learn: pip install 'nfnets[demo]'") from err
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) * (255.0 / _DIGITS_MAX_VALUE)
    images = _resize(images, image_size, image_size)
    labels = torch.from_numpy(digits.target).long()
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=val_fraction, stratify=digits.target, random_state=seed
    )
    train_idx, val_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(val_idx))
    classes = [str(c) for c in digits.target_names]
    train = TensorImageDataset(
        images[train_idx], labels[train_idx], classes, DigitsTrainTransform(image_size)
    )
    val = TensorImageDataset(images[val_idx], labels[val_idx], classes)
    return train, val


def digits_recipe_changes(image_size: int, augment: AugmentConfig) -> dict[str, str]:
    """What the digits demo's data pipeline changes from the ImageNet recipe, for the log."""
    if augment.randaugment is None:
        randaugment = "off (the recipe uses 4 layers at M=5..15)"
    else:
        layers, magnitude = augment.randaugment
        randaugment = (
            f"{layers} layers at M={magnitude}; note its translate (100 px at M=10) "
            "and cutout (40 px) are absolute and sized for ImageNet images"
        )
    mixing = " + ".join(n for n, on in (("MixUp", augment.mixup), ("CutMix", augment.cutmix)) if on)
    return {
        "dataset": "scikit-learn digits: 1797 8x8 grey images, 10 classes, stratified "
        "train/held-out split (ImageNet: 1.28M train, 50k val, 1000 classes)",
        "resolution": f"8x8 upsampled bicubic to {image_size}x{image_size} for train and eval "
        "(ImageNet: the variant's train and test sizes)",
        "crop": "random 80-100% of the area, aspect 3/4-4/3, whole image if sampling fails "
        "(ImageNet: 8-100% with the crop_resize fallback)",
        "flip": "none, digits are not mirror-symmetric (ImageNet: random horizontal flip)",
        "eval preprocessing": "the upsampled image as is (ImageNet: squash to S+32, centre crop S)",
        "mixup/cutmix": (mixing or "off") + " (ImageNet: half MixUp alpha 0.2, half CutMix)",
        "randaugment": randaugment,
    }


# ----------------------------------------------------------------------------------------------
# Sampling and batching


class ResumableSampler(Sampler):
    """Seeded, DDP-aware, resumable sampler yielding ``(index, sample_seed)`` keys.

    Each epoch draws a permutation of the dataset (or keeps order when ``shuffle`` is False)
    and one seed per position from (seed, epoch); rank r takes every ``world_size``-th position
    starting at r, like ``DistributedSampler`` but without padding. With ``drop_last`` every
    rank gets the same number of full batches (needed so DDP ranks step together); without it
    each sample is seen exactly once across ranks (for evaluation).
    ``set_epoch(epoch, skip_batches=k)`` starts the epoch after its first k batches, so a run
    resumed mid-epoch sees the same remaining keys.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples < 1 or batch_size < 1 or seed < 0:
            raise ValueError(
                f"need num_samples >= 1, batch_size >= 1, seed >= 0; got "
                f"{num_samples}, {batch_size}, {seed}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip_batches = 0

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in a whole epoch."""
        if self.drop_last:
            return (self.num_samples // self.world_size) // self.batch_size
        return math.ceil(len(range(self.rank, self.num_samples, self.world_size)) / self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; skip its first ``skip_batches`` batches (for resuming)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(
                f"skip_batches must be in [0, {self.batches_per_epoch}], got {skip_batches}"
            )
        self.epoch, self.skip_batches = epoch, skip_batches

    def _bounds(self) -> tuple[int, int]:
        start = self.skip_batches * self.batch_size
        rank_count = len(range(self.rank, self.num_samples, self.world_size))
        stop = self.batches_per_epoch * self.batch_size if self.drop_last else rank_count
        return start, stop

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        seeds = rng.integers(0, 2**62, size=self.num_samples, dtype=np.int64)
        order = order[self.rank :: self.world_size]
        seeds = seeds[self.rank :: self.world_size]
        start, stop = self._bounds()
        yield from zip(order[start:stop].tolist(), seeds[start:stop].tolist(), strict=True)

    def __len__(self) -> int:
        start, stop = self._bounds()
        return stop - start


def normalize(images: Tensor) -> Tensor:
    """(x - MEAN_RGB) / STD_RGB on a B x 3 x H x W float batch on the 0-255 scale."""
    mean = torch.tensor(MEAN_RGB, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD_RGB, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


_BATCH_SEED_SALT = 0x5DEECE66D  # decorrelates a batch's stream from its first sample's


def _batch_generator(samples: Sequence[Sample]) -> torch.Generator | None:
    seed = samples[0].seed
    return None if seed is None else torch.Generator().manual_seed(seed ^ _BATCH_SEED_SALT)


class TrainCollate:
    """Collate for training: raw samples (2B when mixing, else B) -> ``Batch`` of B.

    MixUp/CutMix (official halves), then RandAugment per image, then normalisation
    (official.md §6.8); targets are the mixed, smoothed soft labels (§5.6). The batch's random
    stream is seeded from its first sample's seed, so batches do not depend on worker count.
    """

    def __init__(
        self,
        num_classes: int,
        augment: AugmentConfig,
        label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    ) -> None:
        self.num_classes, self.augment, self.label_smoothing = num_classes, augment, label_smoothing

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        generator = _batch_generator(samples)
        images = torch.stack([s.image for s in samples])
        labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        aug = self.augment
        mixed = mix_batch(
            images,
            labels,
            mixup=aug.mixup,
            cutmix=aug.cutmix,
            mixup_alpha=aug.mixup_alpha,
            generator=generator,
        )
        images = mixed.images
        if aug.randaugment is not None:
            images = rand_augment_batch(images, aug.randaugment, generator)
        targets = make_targets(
            mixed.labels, mixed.mix_labels, mixed.ratios, self.num_classes, self.label_smoothing
        )
        return Batch(normalize(images), targets, sum(s.skipped for s in samples))


def eval_collate(samples: Sequence[Sample]) -> Batch:
    """Collate for evaluation: normalised images, int64 labels, skipped count."""
    images = torch.stack([s.image for s in samples])
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    return Batch(normalize(images), labels, sum(s.skipped for s in samples))


def train_loader(
    dataset: ImageFolderDataset | TensorImageDataset,
    *,
    batch_size: int,
    augment: AugmentConfig,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, ResumableSampler]:
    """Training loader yielding ``Batch(images B x 3 x S x S, targets B x K, skipped)``.

    ``batch_size`` is B per rank (the output batch); the loader reads
    ``augment.raw_batch_size(B)`` images per step. Call ``sampler.set_epoch`` before each
    epoch.
    """
    raw = augment.raw_batch_size(batch_size)
    sampler = ResumableSampler(
        len(dataset), batch_size=raw, seed=seed, rank=rank, world_size=world_size
    )
    if sampler.batches_per_epoch == 0:
        raise DataError(
            f"the training set has {len(dataset)} images ({len(dataset) // world_size} per "
            f"rank), fewer than one step's {raw} raw images (batch {batch_size}"
            f"{' x 2 for MixUp/CutMix' if augment.mixing else ''}); lower the batch size"
        )
    loader = DataLoader(
        dataset,
        batch_size=raw,
        sampler=sampler,
        collate_fn=TrainCollate(len(dataset.classes), augment, label_smoothing),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
    return loader, sampler


def eval_loader(
    dataset: ImageFolderDataset | TensorImageDataset,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Evaluation loader yielding ``Batch(images, labels, skipped)`` in dataset order; each
    sample is seen once across ranks (rank r gets samples r, r + world_size, ...)."""
    sampler = ResumableSampler(
        len(dataset),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        rank=rank,
        world_size=world_size,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=eval_collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
