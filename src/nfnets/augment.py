"""Batch-level augmentation of the NFNet recipe: MixUp/CutMix, RandAugment and soft targets.

Mirrors the official ``nfnets/dataset.py`` (mixing, label construction) and
``nfnets/autoaugment.py`` (RandAugment) of deepmind-research; labels as
``nfnets/experiment.py``.
The order for NFNets (augment-before-mix False) is::

    2B raw images (0-255 float) -> mix_batch -> B images -> rand_augment_batch -> normalise

Public API (CPU or GPU tensors; usable inside DataLoader workers or on the training device):

- ``AugmentConfig.from_name('cutmix_mixup_randaugment_405')`` parses an official augment name;
  ``config.raw_batch_size(B)`` is how many raw images one output batch of B consumes.
- ``parse_augment_level('405') -> RandAugmentLevel(layers=4, magnitude=5)``.
- ``mix_batch(images_2B, labels_2B, mixup=..., cutmix=..., mixup_alpha=..., generator=...)``
  -> ``MixedBatch(images, labels, mix_labels, ratios)`` with B rows.
- ``make_targets(labels, mix_labels, ratios, num_classes, smoothing)`` -> B x K soft targets.
- ``rand_augment(image_uint8, layers, magnitude, generator)`` on one 3xHxW uint8 image (the
  per-image reference); ``rand_augment_batch(images, level, generator)`` clips, truncates to
  uint8, augments each image with its own random ops, batched on the images' device, and
  returns float32; ``apply_op(image, name, magnitude, generator)`` applies one op.

Every random draw takes an optional ``torch.Generator`` (on the CPU) so a batch is reproducible
from a seed, on any device: the draws stay on the CPU, the pixels stay where they are.
Where torchvision's ops differ from the official TF ones is listed in ``docs/data.md``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .errors import UsageError

DEFAULT_MIXUP_ALPHA = 0.2  # nfnets/dataset.py: alpha unless 'mixup_<number>'
DEFAULT_LABEL_SMOOTHING = 0.1  # nfnets/experiment_nfnets.py get_config, nfnets/experiment.py


# ----------------------------------------------------------------------------------------------
# Augmentation names


class RandAugmentLevel(NamedTuple):
    """RandAugment strength: ``layers`` ops per image, each at ``magnitude`` (official M)."""

    layers: int
    magnitude: int


def parse_augment_level(level: str | int) -> RandAugmentLevel:
    """Parse an official RandAugment level: '405' -> (4 layers, M=5); '15' -> (2 layers, M=15).

    Accepts a bare level or a full augment name, whose last '_'-separated token is the level
    (nfnets/dataset.py): M = int(token); if M > 100, layers = M // 100 and
    M -= 100 * layers, else layers = 2.
    """
    token = str(level).split("_")[-1]
    if not token.isdigit():
        raise UsageError(
            f"RandAugment level must be a non-negative integer such as '405' (4 layers, "
            f"magnitude 5) or '15' (2 layers, magnitude 15); got {level!r}"
        )
    magnitude = int(token)
    if magnitude > 100:
        layers = magnitude // 100
        return RandAugmentLevel(layers, magnitude - 100 * layers)
    return RandAugmentLevel(2, magnitude)  # official default of 2 layers


_KNOWN_AUGMENT_WORDS = ("mixup", "cutmix", "randaugment")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")  # what the official code accepts as a MixUp alpha


@dataclass(frozen=True)
class AugmentConfig:
    """Which batch augmentations run, as the official augment name selects them.

    The NFNet recipe is ``AugmentConfig.from_name('cutmix_mixup_randaugment_405')`` for F0
    (415 for F3 and above; nfnets/experiment_nfnets.py).
    """

    mixup: bool = False
    cutmix: bool = False
    mixup_alpha: float = DEFAULT_MIXUP_ALPHA
    randaugment: RandAugmentLevel | None = None

    def __post_init__(self) -> None:
        if self.mixup_alpha <= 0:
            raise UsageError(f"mixup_alpha must be positive, got {self.mixup_alpha}")

    @classmethod
    def from_name(cls, name: str) -> AugmentConfig:
        """Parse an official augment name such as 'cutmix_mixup_randaugment_405'.

        'none' or '' disables everything. Words are tested like the official code
        (nfnets/dataset.py): 'mixup', 'cutmix', 'randaugment' (level = last token); a number
        right after 'mixup' is the MixUp alpha. AutoAugment is not implemented (NFNets never
        use it).
        """
        tokens = [t for t in name.lower().split("_") if t]
        if tokens in ([], ["none"]):
            return cls()
        for token in tokens:
            if token not in _KNOWN_AUGMENT_WORDS and not _NUMBER.match(token):
                raise UsageError(
                    f"unknown word {token!r} in augment name {name!r}; use '_'-joined words "
                    f"from {_KNOWN_AUGMENT_WORDS} (e.g. 'cutmix_mixup_randaugment_405'), "
                    "or 'none'"
                )
        alpha = DEFAULT_MIXUP_ALPHA
        if "mixup" in tokens:
            after = tokens.index("mixup") + 1
            if after < len(tokens) and _NUMBER.match(tokens[after]):
                alpha = float(tokens[after])
        level = parse_augment_level(tokens[-1]) if "randaugment" in tokens else None
        return cls("mixup" in tokens, "cutmix" in tokens, alpha, level)

    @property
    def mixing(self) -> bool:
        """True when MixUp or CutMix is on, so each output image consumes two raw images."""
        return self.mixup or self.cutmix

    def raw_batch_size(self, batch_size: int) -> int:
        """Raw images the loader must yield for ``batch_size`` outputs (2B when mixing)."""
        if self.mixup and self.cutmix and batch_size % 2:
            raise UsageError(
                f"batch size {batch_size} is odd; half MixUp + half CutMix needs an even batch"
            )
        return 2 * batch_size if self.mixing else batch_size


# ----------------------------------------------------------------------------------------------
# MixUp / CutMix


class MixedBatch(NamedTuple):
    """B mixed images with, per row, the primary label, the partner label and its weight."""

    images: Tensor  # B x C x H x W
    labels: Tensor  # B, weight `ratios`
    mix_labels: Tensor  # B, weight 1 - `ratios`
    ratios: Tensor  # B, float32 in [0, 1]


def _beta(alpha: float, n: int, generator: torch.Generator | None) -> Tensor:
    # torch's Beta sampler cannot take a Generator, so a seed drawn from it drives numpy's.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n)).float()


def _mixup(
    x1: Tensor, x2: Tensor, alpha: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """image = r * x1 + (1 - r) * x2 with r ~ Beta(alpha, alpha) per row (nfnets/dataset.py)."""
    ratio = _beta(alpha, x1.shape[0], generator).to(x1.device)
    r = ratio.view(-1, 1, 1, 1)
    return r * x1 + (1 - r) * x2, ratio


def cutmix_box(
    center_x: Tensor, center_y: Tensor, lam: Tensor, height: int, width: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Official CutMix box bounds (x1, y1, x2, y2), half-open, clipped to the image.

    cut = sqrt(1 - lam); r_w = int(cut * W); x in [cx - r_w // 2, cx + r_w // 2) clipped to
    [0, W] (likewise for y). nfnets/dataset.py cutmix_padding: the box end is
    exclusive because the mask is a block of ones padded to the image size.
    """
    cut = torch.sqrt(1.0 - lam)
    half_w = (cut * width).long() // 2
    half_h = (cut * height).long() // 2
    x1 = (center_x - half_w).clamp(0, width)
    x2 = (center_x + half_w).clamp(0, width)
    y1 = (center_y - half_h).clamp(0, height)
    y2 = (center_y + half_h).clamp(0, height)
    return x1, y1, x2, y2


def _cutmix(x1: Tensor, x2: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """image = m * x1 + (1 - m) * x2, m = 1 inside a random box; ratio = mean(m)."""
    n, _, height, width = x1.shape
    # Random draws on the CPU (the generator's device), the mask on the images' device.
    center_x = torch.randint(0, width, (n,), generator=generator)
    center_y = torch.randint(0, height, (n,), generator=generator)
    lam = torch.rand(n, generator=generator)  # Beta(1, 1) = U(0, 1), as the official code
    bx1, by1, bx2, by2 = (
        b.to(x1.device) for b in cutmix_box(center_x, center_y, lam, height, width)
    )
    xs = torch.arange(width, device=x1.device).view(1, 1, -1)
    ys = torch.arange(height, device=x1.device).view(1, -1, 1)
    inside_x = (xs >= bx1.view(-1, 1, 1)) & (xs < bx2.view(-1, 1, 1))
    inside_y = (ys >= by1.view(-1, 1, 1)) & (ys < by2.view(-1, 1, 1))
    mask = (inside_x & inside_y).float()  # n x H x W
    ratio = mask.mean(dim=(1, 2))  # the clipped box area, nfnets/dataset.py, mixing
    m = mask.unsqueeze(1)
    return m * x1 + (1 - m) * x2, ratio


def mix_batch(
    images: Tensor,
    labels: Tensor,
    *,
    mixup: bool = True,
    cutmix: bool = True,
    mixup_alpha: float = DEFAULT_MIXUP_ALPHA,
    generator: torch.Generator | None = None,
) -> MixedBatch:
    """Mix 2B raw images into B, exactly as the official pipeline (nfnets/dataset.py).

    Both on (the NFNet recipe), with q = B/2: rows 0..q-1 are MixUp of X[i] with X[q+i], rows
    q..B-1 are CutMix of X[2q+i] (inside the box) with X[3q+i]. One of them on: the whole batch
    mixes X[:B] with X[B:]. Neither: the input comes back unchanged with ratio 1.
    ``images`` is N x C x H x W float (0-255 scale), ``labels`` N int64, both on any device;
    the random draws come from ``generator`` on the CPU, so a seed gives the same batch on
    every device.
    """
    n = images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if not (mixup or cutmix):
        return MixedBatch(images, labels, labels, torch.ones(n, device=images.device))
    if n % 2:
        raise ValueError(f"mixing needs 2B raw images (an even count), got {n}")
    b = n // 2
    if mixup and cutmix:
        if b % 2:
            raise ValueError(
                f"half MixUp + half CutMix needs an even output batch, got {b} "
                f"(from {n} raw images); use a multiple of 4 raw images"
            )
        q = b // 2
        mixed_a, ratio_a = _mixup(images[:q], images[q : 2 * q], mixup_alpha, generator)
        mixed_b, ratio_b = _cutmix(images[2 * q : 3 * q], images[3 * q :], generator)
        return MixedBatch(
            torch.cat([mixed_a, mixed_b]),
            torch.cat([labels[:q], labels[2 * q : 3 * q]]),
            torch.cat([labels[q : 2 * q], labels[3 * q :]]),
            torch.cat([ratio_a, ratio_b]),
        )
    if mixup:
        mixed, ratio = _mixup(images[:b], images[b:], mixup_alpha, generator)
    else:
        mixed, ratio = _cutmix(images[:b], images[b:], generator)
    return MixedBatch(mixed, labels[:b], labels[b:], ratio)


def _one_hot(labels: Tensor, num_classes: int) -> Tensor:
    # scatter rather than F.one_hot, which checks the labels' range and so synchronises a GPU
    out = torch.zeros(labels.shape[0], num_classes, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0)


def make_targets(
    labels: Tensor,
    mix_labels: Tensor | None,
    ratios: Tensor | None,
    num_classes: int,
    smoothing: float = DEFAULT_LABEL_SMOOTHING,
) -> Tensor:
    """Soft targets: mix one-hots first, then smooth (nfnets/experiment.py, loss and labels).

    y = ratio * one_hot(label) + (1 - ratio) * one_hot(mix_label);
    y = (1 - smoothing) * y + smoothing / num_classes. ``mix_labels``/``ratios`` may be None
    (no mixing). Returns B x num_classes float32 whose rows sum to 1.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    # Checked on the CPU only: on a GPU the check would stall the stream every step (labels
    # reaching the device were built from the datasets' own checked class lists).
    if labels.device.type == "cpu" and labels.numel() and (
        int(labels.min()) < 0 or int(labels.max()) >= num_classes
    ):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.tolist()}")
    targets = _one_hot(labels, num_classes)
    if mix_labels is not None:
        if ratios is None:
            raise ValueError("ratios are required when mix_labels are given")
        r = ratios.float().view(-1, 1)
        targets = r * targets + (1 - r) * _one_hot(mix_labels, num_classes)
    return (1 - smoothing) * targets + smoothing / num_classes


# ----------------------------------------------------------------------------------------------
# RandAugment (nfnets/autoaugment.py distort_image_with_randaugment)

_MAX_LEVEL = 10.0  # nfnets/autoaugment.py: levels are scaled by M / 10
_FILL = 128  # grey for translate, shear, rotate and cutout (nfnets/autoaugment.py)
_TRANSLATE_CONST = 100  # px at M = 10 (nfnets/autoaugment.py)
_CUTOUT_CONST = 40  # cutout half-size at M = 10 (nfnets/autoaugment.py)
_ROTATE_MAX_DEG = 30.0  # degrees at M = 10
_SHEAR_MAX = 0.3  # shear coefficient at M = 10
_SOLARIZE_ADD_MAX = 110  # SolarizeAdd increment at M = 10
_SOLARIZE_ADD_THRESHOLD = 128  # SolarizeAdd touches only pixels below this


def _enhance_factor(m: float) -> float:
    return (m / _MAX_LEVEL) * 1.8 + 0.1  # 1.0 (identity) at M = 5


def _randint(high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(0, high, (1,), generator=generator))


def _random_sign(value: float, generator: torch.Generator | None) -> float:
    # official _randomly_negate_tensor: negate with probability 1/2
    return -value if float(torch.rand(1, generator=generator)) < 0.5 else value


def _blend(degenerate: Tensor, image: Tensor, factor: float) -> Tensor:
    """Official TF blend: degenerate + factor * (image - degenerate), clipped, truncated."""
    if factor == 1.0:
        return image
    out = degenerate.float() + factor * (image.float() - degenerate.float())
    return out.clamp(0, 255).to(torch.uint8)


def _contrast(image: Tensor, m: float, generator: torch.Generator | None) -> Tensor:
    # The official op blends towards a grey of (pixel count / 256), not the mean intensity: its
    # "mean" sums the histogram counts (nfnets/autoaugment.py contrast). Kept for fidelity, so
    # torchvision's adjust_contrast (true grey mean) is not used here.
    height, width = image.shape[-2:]
    grey = int(min(height * width / 256.0, 255.0))
    return _blend(torch.full_like(image, grey), image, _enhance_factor(m))


def _posterize(image: Tensor, m: float, generator: torch.Generator | None) -> Tensor:
    bits = int((m / _MAX_LEVEL) * 4)  # keeps more bits at higher M (nfnets/autoaugment.py)
    return F.posterize(image, min(bits, 8))  # > 8 bits: no-op (TF shifts by a negative count)


def _solarize(image: Tensor, m: float, generator: torch.Generator | None) -> Tensor:
    threshold = int((m / _MAX_LEVEL) * 256)
    if threshold > 255:  # M >= 10: no uint8 pixel reaches it (torchvision would raise)
        return image
    return F.solarize(image, threshold)


def _solarize_add(image: Tensor, m: float, generator: torch.Generator | None) -> Tensor:
    added = (image.int() + int((m / _MAX_LEVEL) * _SOLARIZE_ADD_MAX)).clamp(0, 255).to(image.dtype)
    return torch.where(image < _SOLARIZE_ADD_THRESHOLD, added, image)


def _rotate_by(image: Tensor, m: float, negate: bool) -> Tensor:
    degrees = (m / _MAX_LEVEL) * _ROTATE_MAX_DEG
    degrees = -degrees if negate else degrees
    return F.rotate(image, degrees, interpolation=InterpolationMode.NEAREST, fill=_FILL)


def _shear_by(axis: int) -> Callable[[Tensor, float, bool], Tensor]:
    def op(image: Tensor, m: float, negate: bool) -> Tensor:
        coefficient = (m / _MAX_LEVEL) * _SHEAR_MAX
        coefficient = -coefficient if negate else coefficient
        shear = [0.0, 0.0]
        shear[axis] = math.degrees(math.atan(coefficient))  # torchvision takes tan^-1, in degrees
        # TF shears about pixel (0, 0): input x = x + c * y. torchvision's centre is in corner
        # coordinates, so pixel (0, 0)'s centre is at (0.5, 0.5).
        return F.affine(
            image,
            angle=0.0,
            translate=[0.0, 0.0],
            scale=1.0,
            shear=shear,
            interpolation=InterpolationMode.NEAREST,
            fill=_FILL,
            center=[0.5, 0.5],
        )

    return op


def _translate_by(axis: int) -> Callable[[Tensor, float, bool], Tensor]:
    def op(image: Tensor, m: float, negate: bool) -> Tensor:
        pixels = (m / _MAX_LEVEL) * _TRANSLATE_CONST  # absolute px
        pixels = -pixels if negate else pixels
        shift = [0.0, 0.0]
        shift[axis] = -pixels  # TF translate_x(pixels) samples input x + pixels
        return F.affine(
            image,
            angle=0.0,
            translate=shift,
            scale=1.0,
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.NEAREST,
            fill=_FILL,
        )

    return op


def _cutout_at(images: Tensor, m: float, centres: Tensor) -> Tensor:
    """Grey squares of half-size int(M/10 * 40) at per-image centres (N x 2, row then column),
    clipped to the image, on an N x 3 x H x W batch."""
    half = int((m / _MAX_LEVEL) * _CUTOUT_CONST)
    height, width = images.shape[-2:]
    cy, cx = (c.to(images.device).view(-1, 1, 1) for c in centres.unbind(1))
    ys = torch.arange(height, device=images.device).view(1, -1, 1)
    xs = torch.arange(width, device=images.device).view(1, 1, -1)
    inside = (ys >= cy - half) & (ys < cy + half) & (xs >= cx - half) & (xs < cx + half)
    return images.masked_fill(inside.unsqueeze(1), _FILL)


def _cutout(image: Tensor, m: float, generator: torch.Generator | None) -> Tensor:
    height, width = image.shape[-2:]
    centre = torch.tensor([[_randint(height, generator), _randint(width, generator)]])
    return _cutout_at(image.unsqueeze(0), m, centre)[0]


def _signed(
    op: Callable[[Tensor, float, bool], Tensor],
) -> Callable[[Tensor, float, torch.Generator | None], Tensor]:
    """The per-image form of a signed op: the sign drawn as the official
    _randomly_negate_tensor does (negate with probability 1/2)."""

    def per_image(image: Tensor, m: float, generator: torch.Generator | None) -> Tensor:
        return op(image, m, _random_sign(1.0, generator) < 0)

    return per_image


def _no_arg(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor, float, object], Tensor]:
    return lambda image, m, generator: fn(image)


def _enhance(fn: Callable[[Tensor, float], Tensor]) -> Callable[[Tensor, float, object], Tensor]:
    def op(image: Tensor, m: float, generator: object) -> Tensor:
        factor = _enhance_factor(m)
        # factor 1 is the identity, as the official blend returns the image itself; skipping
        # the call matters at M = 5 (F0), where Sharpness would otherwise convolve for nothing
        return image if factor == 1.0 else fn(image, factor)

    return op


# name -> op(image_uint8, magnitude, generator); insertion order is the official op order
# (nfnets/autoaugment.py), which the uniform op choice indexes into.
_OPS: dict[str, Callable[[Tensor, float, torch.Generator | None], Tensor]] = {
    "AutoContrast": _no_arg(F.autocontrast),
    "Equalize": _no_arg(F.equalize),
    "Invert": _no_arg(F.invert),
    "Rotate": _signed(_rotate_by),
    "Posterize": _posterize,
    "Solarize": _solarize,
    "Color": _enhance(F.adjust_saturation),
    "Contrast": _contrast,
    "Brightness": _enhance(F.adjust_brightness),
    "Sharpness": _enhance(F.adjust_sharpness),
    "ShearX": _signed(_shear_by(0)),
    "ShearY": _signed(_shear_by(1)),
    "TranslateX": _signed(_translate_by(0)),
    "TranslateY": _signed(_translate_by(1)),
    "Cutout": _cutout,
    "SolarizeAdd": _solarize_add,
}
RAND_AUGMENT_OPS: tuple[str, ...] = tuple(_OPS)


def _shift_by(axis: int) -> Callable[[Tensor, float, bool], Tensor]:
    """Translate as a copy when the shift is a whole number of pixels (every integer M):
    the same pixels as ``_translate_by``'s nearest-neighbour affine (tested), without
    building and sampling a grid."""
    affine = _translate_by(axis)

    def op(images: Tensor, m: float, negate: bool) -> Tensor:
        pixels = (m / _MAX_LEVEL) * _TRANSLATE_CONST
        shift = round(pixels)
        if abs(pixels - shift) > 1e-6:
            return affine(images, m, negate)
        shift = -shift if negate else shift  # output[x] = input[x + shift]
        dim = -1 if axis == 0 else -2
        size = images.shape[dim]
        out = torch.full_like(images, _FILL)
        if abs(shift) < size:
            kept = size - abs(shift)
            out.narrow(dim, max(-shift, 0), kept).copy_(images.narrow(dim, max(shift, 0), kept))
        return out

    return op


# Ops with a random sign take (images, magnitude, negate) in their batched form.
_SIGNED_OPS: dict[str, Callable[[Tensor, float, bool], Tensor]] = {
    "Rotate": _rotate_by,
    "ShearX": _shear_by(0),
    "ShearY": _shear_by(1),
    "TranslateX": _shift_by(0),
    "TranslateY": _shift_by(1),
}
_CUTOUT = RAND_AUGMENT_OPS.index("Cutout")


def _check_image(image: Tensor) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"RandAugment ops take one 3 x H x W uint8 image, got {image.dtype} "
            f"{tuple(image.shape)}"
        )


def apply_op(
    image: Tensor, name: str, magnitude: float, generator: torch.Generator | None = None
) -> Tensor:
    """Apply one RandAugment op by its official name to a 3 x H x W uint8 image."""
    if name not in _OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; choose from {RAND_AUGMENT_OPS}")
    if magnitude < 0:
        raise ValueError(f"RandAugment magnitude must be >= 0, got {magnitude}")
    _check_image(image)
    return _OPS[name](image, float(magnitude), generator)


def rand_augment(
    image: Tensor, layers: int, magnitude: float, generator: torch.Generator | None = None
) -> Tensor:
    """Official RandAugment on one uint8 image: ``layers`` ops, each drawn uniformly from
    ``RAND_AUGMENT_OPS`` and always applied at ``magnitude`` (nfnets/autoaugment.py)."""
    if layers < 0:
        raise ValueError(f"RandAugment layers must be >= 0, got {layers}")
    for _ in range(layers):
        name = RAND_AUGMENT_OPS[_randint(len(RAND_AUGMENT_OPS), generator)]
        image = apply_op(image, name, magnitude, generator)
    return image


class RandAugmentChoices(NamedTuple):
    """Per-image random choices of a RandAugment batch: op indices into ``RAND_AUGMENT_OPS``
    (N x layers), whether a signed op is negated (N x layers) and Cutout centres (row, column;
    N x layers x 2)."""

    ops: Tensor
    negate: Tensor
    centres: Tensor


def draw_rand_augment_choices(
    n: int, layers: int, height: int, width: int, generator: torch.Generator | None = None
) -> RandAugmentChoices:
    """Draw every per-image choice of a RandAugment batch on the CPU.

    The draws are the ones ``rand_augment`` makes, in the same order, image after image: the
    op, then its sign (Rotate, Shear, Translate) or its centre (Cutout). So a batch augmented
    with these choices equals the images augmented one by one from the same generator.
    """
    ops = torch.zeros(n, layers, dtype=torch.long)
    negate = torch.zeros(n, layers, dtype=torch.bool)
    centres = torch.zeros(n, layers, 2, dtype=torch.long)
    signed = {RAND_AUGMENT_OPS.index(name) for name in _SIGNED_OPS}
    for i in range(n):
        for layer in range(layers):
            op = _randint(len(RAND_AUGMENT_OPS), generator)
            ops[i, layer] = op
            if op in signed:
                negate[i, layer] = _random_sign(1.0, generator) < 0
            elif op == _CUTOUT:
                centres[i, layer, 0] = _randint(height, generator)
                centres[i, layer, 1] = _randint(width, generator)
    return RandAugmentChoices(ops, negate, centres)


def _apply_group(
    images: Tensor, name: str, magnitude: float, negate: bool, centres: Tensor
) -> Tensor:
    """One op on images that all drew it (and, for a signed op, the same sign)."""
    if name in _SIGNED_OPS:
        return _SIGNED_OPS[name](images, magnitude, negate)
    if name == "Cutout":
        return _cutout_at(images, magnitude, centres)
    return _OPS[name](images, magnitude, None)  # the rest take batches as they are


def apply_op_batch(
    images: Tensor, name: str, magnitude: float, negate: Tensor, centres: Tensor
) -> Tensor:
    """Apply one op to every image of an N x 3 x H x W uint8 batch, on its device.

    ``negate`` (N bool) gives the sign of Rotate/Shear/Translate per image, ``centres``
    (N x 2) the Cutout centre per image; other ops ignore them. Signed ops run once per sign
    on the images that drew it, so each image gets exactly what ``apply_op`` gives it.
    """
    if name not in _OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; choose from {RAND_AUGMENT_OPS}")
    if name not in _SIGNED_OPS:
        return _apply_group(images, name, float(magnitude), False, centres)
    out = torch.empty_like(images)
    for flag in (False, True):
        rows = (negate == flag).nonzero().view(-1).to(images.device)
        if rows.numel():
            out[rows] = _apply_group(images[rows], name, float(magnitude), flag, centres)
    return out


def rand_augment_batch(
    images: Tensor, level: RandAugmentLevel, generator: torch.Generator | None = None
) -> Tensor:
    """RandAugment each image of a B x 3 x H x W batch (0-255 scale, after mixing), batched.

    As the official pipeline (nfnets/autoaugment.py): clip to [0, 255], cast to uint8 by
    truncation (a uint8 batch passes as it is), augment each image with its own ops, signs and
    centres, cast back to float32. Choices are drawn on the CPU exactly as ``rand_augment``
    draws them image by image, then each op runs once on the images that chose it, on the
    batch's device (the GPU in training). The result equals ``rand_augment`` applied to each
    image in turn from the same generator (tested op by op).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"need a B x 3 x H x W batch, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        out = images
    else:
        out = images.clamp(0, 255).to(torch.uint8)  # float -> uint8 truncates
    n, _, height, width = out.shape
    choices = draw_rand_augment_choices(n, level.layers, height, width, generator)
    magnitude = float(level.magnitude)
    for layer in range(level.layers):
        # Sort the images by (op, sign) so each op runs on one contiguous slice: two gathers
        # per layer instead of one per op.
        key = choices.ops[:, layer] * 2 + choices.negate[:, layer].long()
        order = torch.argsort(key, stable=True)
        groups, counts = torch.unique_consecutive(key[order], return_counts=True)
        order_dev = order.to(out.device)
        grouped = out.index_select(0, order_dev)
        centres = choices.centres[order, layer]
        result = torch.empty_like(grouped)
        start = 0
        for group, count in zip(groups.tolist(), counts.tolist(), strict=True):
            rows = slice(start, start + count)
            result[rows] = _apply_group(
                grouped[rows], RAND_AUGMENT_OPS[group // 2], magnitude, bool(group % 2),
                centres[rows],
            )
            start += count
        out = result.index_select(0, torch.argsort(order).to(out.device))  # unsort
    return out.float()
