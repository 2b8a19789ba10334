"""The bundled demo: scikit-learn's handwritten digits, and in-memory image datasets."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..augment import AugmentConfig
from .samples import Sample, parse_key, seeded_generator
from .transforms import DigitsTrainTransform, Transform, _resize

_DIGITS_MAX_VALUE = 16.0  # sklearn digits pixels are 0..16


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
        index, seed = parse_key(key, len(self))
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image, seeded_generator(seed))
        if image.shape[0] == 1:
            image = image.repeat(3, 1, 1)
        return Sample(image, int(self.labels[index]), 0, seed)


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
