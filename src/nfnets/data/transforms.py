"""Per-image transforms of the NFNet recipe: the official crops and resizes.

Training (deepmind-research ``nfnets/dataset.py`` _decode_and_random_crop): a distorted-box
crop with the 'crop_resize' fallback, a random flip and a bicubic resize to S x S. Two
implementations draw the same random numbers, so the same seed gives the same crop and flip in
both:

- ``TrainTransform`` (the exact mode): decode the whole image, crop, flip, resize in float32
  without antialiasing or clamping, like TF2's ``tf.image.resize``;
- ``FastTrainTransform`` (the default): decode only the crop (as the official
  ``tf.image.decode_and_crop_jpeg``), at 1/2, 1/4 or 1/8 size when the crop is still at least
  S pixels on each side there (JPEG DCT scaling, PIL ``Image.draft``), resize in uint8
  (OpenCV's bicubic, the exact mode's kernel, no antialiasing), flip the small result.
  Output uint8, a quarter of the bytes to move to the device. docs/data.md gives its
  deviation from the exact mode.

Evaluation (nfnets/dataset.py _decode_and_center_crop): ``EvalTransform``. The digits demo:
``DigitsTrainTransform``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..errors import UsageError
from .decode import jpeg_size, pil_to_rgb
from .jpeg_region import decode_jpeg_region

CROP_PADDING = 32  # nfnets/dataset.py: eval and fallback crops leave a 32 px margin
RANDOM_CROP_AREA = (0.08, 1.0)  # nfnets/dataset.py _decode_and_random_crop
RANDOM_CROP_ASPECT = (3 / 4, 4 / 3)  # nfnets/dataset.py _decode_and_random_crop
RANDOM_CROP_MIN_COVERED = 0.1  # nfnets/dataset.py: min_object_covered of the whole-image box
RANDOM_CROP_ATTEMPTS = 10  # nfnets/dataset.py _decode_and_random_crop
DIGITS_CROP_AREA = (0.8, 1.0)  # mild crop: a digit must stay recognisable
JPEG_DRAFT_SCALES = (8, 4, 2)  # the reductions libjpeg's DCT scaling offers through PIL

# transform(image, generator): a 3 x H x W uint8 tensor, or the file's bytes when the transform
# has ``decodes_itself = True``
Transform = Callable[[Tensor | bytes, torch.Generator | None], Tensor]


# ----------------------------------------------------------------------------------------------
# Geometry


Box = tuple[int, int, int, int]  # top, left, height, width


def _crop_attempt(
    height: int,
    width: int,
    aspect: float,
    area_range: tuple[float, float],
    draws: Sequence[float],
) -> Box | None:
    """One try of TF's sample_distorted_bounding_box (GenerateRandomCrop), or None.

    ``draws``: three uniforms in [0, 1) for the height, the top and the left offset.
    """
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
        crop_h += _uniform_int(draws[0], max_h - crop_h + 1)
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
    top = _uniform_int(draws[1], height - crop_h) if crop_h < height else 0
    left = _uniform_int(draws[2], width - crop_w) if crop_w < width else 0
    return top, left, crop_h, crop_w


def _uniform_int(u: float, high: int) -> int:
    """An integer uniform in [0, high) from a uniform ``u`` in [0, 1)."""
    return min(int(u * high), high - 1)


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
    whole image when every attempt fails (nfnets/dataset.py _decode_and_random_crop).
    Every attempt's uniforms come from one draw of ``generator`` (one call per image
    rather than four per attempt: this runs for every training image).
    """
    for draws in torch.rand(attempts, 4, generator=generator).tolist():
        aspect = aspect_range[0] + draws[0] * (aspect_range[1] - aspect_range[0])
        box = _crop_attempt(height, width, aspect, area_range, draws[1:])
        if box is not None and box[2] * box[3] >= min_covered * height * width:
            return box
    return 0, 0, height, width


def crop_resize_box(height: int, width: int, size: int) -> Box:
    """The official 'crop_resize' centre crop: side int(min(H, W) / (S + 32) * S).

    nfnets/dataset.py _decode_and_center_crop (float32 arithmetic as TF).
    The side is at least 1 so tiny images still give a crop.
    """
    scale = np.float32(min(height, width)) / np.float32(size + CROP_PADDING)
    side = max(1, int(scale * np.float32(size)))
    return ((height - side) + 1) // 2, ((width - side) + 1) // 2, side, side


def train_crop_box(
    height: int, width: int, size: int, generator: torch.Generator | None = None
) -> Box:
    """The official training crop: a distorted box, or 'crop_resize' when the sampled box is
    the whole image (the sampler failed; nfnets/dataset.py _decode_and_random_crop)."""
    box = sample_distorted_box(height, width, generator)
    if box == (0, 0, height, width):
        return crop_resize_box(height, width, size)
    return box


def _resize(image: Tensor, height: int, width: int) -> Tensor:
    """Bicubic resize to float32 without antialiasing or clamping, like TF2's
    tf.image.resize (nfnets/dataset.py; torchvision's kernel differs, see docs/data.md)."""
    return F.resize(
        image.float(), [height, width], interpolation=InterpolationMode.BICUBIC, antialias=False
    )


def _crop(image: Tensor, box: Box) -> Tensor:
    top, left, h, w = box
    return image[..., top : top + h, left : left + w]


def _coin(generator: torch.Generator | None) -> bool:
    return float(torch.rand(1, generator=generator)) < 0.5


class TrainTransform:
    """The exact mode's training geometry (nfnets/dataset.py _decode_and_random_crop):
    distorted-box crop with the 'crop_resize' fallback, random horizontal flip, bicubic resize
    to size x size.

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


def draft_scale(crop_height: int, crop_width: int, size: int) -> int:
    """The largest JPEG decoding reduction (8, 4, 2 or 1) that leaves the crop at least
    ``size`` pixels on both sides, so the resize still only shrinks."""
    for scale in JPEG_DRAFT_SCALES:
        if min(crop_height, crop_width) >= scale * size:
            return scale
    return 1


def resize_uint8(image: Tensor, height: int, width: int) -> Tensor:
    """Bicubic resize of a 3 x H x W uint8 image to uint8 (rounded, clamped), without
    antialiasing, as the official resize (TF2 ``tf.image.resize``) and the exact mode.

    OpenCV's ``INTER_CUBIC``: the exact mode's kernel (a = -0.75, half-pixel centres, edge
    pixels repeated) with fixed-point arithmetic that stays within one level of the exact
    mode's float32 result rounded (tested), where PyTorch's uint8 kernel, which rounds and
    clamps between its two passes, is up to 12 levels off, and slower (docs/performance.md).
    Returns a contiguous 3 x height x width tensor.
    """
    return _to_chw(_resize_hwc(image.permute(1, 2, 0).numpy(), height, width))


def _resize_hwc(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """``resize_uint8`` on an H x W x 3 array (a decoded image's layout)."""
    if array.strides[1:] != (3, 1):  # OpenCV needs whole pixels in a row to be contiguous
        array = np.ascontiguousarray(array)
    return cv2.resize(array, (width, height), interpolation=cv2.INTER_CUBIC)


def _to_chw(array: np.ndarray, flip: bool = False) -> Tensor:
    """H x W x 3 -> contiguous 3 x H x W, mirrored left-right when ``flip``.

    Resampling is mirror-symmetric, so flipping the small output stands for flipping the crop
    (within one level, tested). The samples leave contiguous, so collating them is a plain
    copy rather than ``torch.stack`` gathering channels-last views.
    """
    if flip:
        array = cv2.flip(array, 1)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class FastTrainTransform:
    """The official training geometry, fast: uint8 3 x S x S out (see the module docstring).

    Takes the undecoded file as bytes (``decodes_itself``) or a decoded 3 x H x W uint8
    tensor. The crop box and flip are drawn exactly as ``TrainTransform`` draws them; the
    size comes from the JPEG header, so the decoder knows the crop before it decodes and
    decodes only the crop (``decode_jpeg_region``: the same pixels as decoding everything).
    """

    decodes_itself = True

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: bytes | Tensor, generator: torch.Generator | None = None) -> Tensor:
        if isinstance(image, Tensor):
            crop = _crop(image, train_crop_box(*image.shape[-2:], self.size, generator))
            return _flip_resize(crop.permute(1, 2, 0).numpy(), _coin(generator), self.size)
        jpeg = jpeg_size(image)
        if jpeg is None:
            return self._decode_other(image, generator)
        height, width = jpeg
        box = train_crop_box(height, width, self.size, generator)
        flip = _coin(generator)
        scale = draft_scale(box[2], box[3], self.size)
        # libjpeg's DCT scaling rounds sizes up
        scaled = _scale_box(box, -(-height // scale) / height, -(-width // scale) / width)
        crop = decode_jpeg_region(image, scaled, scale, (height, width))
        return _flip_resize(crop, flip, self.size)

    def _decode_other(self, data: bytes, generator: torch.Generator | None) -> Tensor:
        """PNG, CMYK JPEGs and the rest, through PIL (JPEGs still at reduced size)."""
        pil = Image.open(io.BytesIO(data))
        width, height = pil.size
        box = train_crop_box(height, width, self.size, generator)
        flip = _coin(generator)
        scale = draft_scale(box[2], box[3], self.size)
        if scale > 1 and pil.format == "JPEG":
            pil.draft("RGB", (width // scale, height // scale))
        pil.load()  # raises on truncated data
        image = pil_to_rgb(pil)
        box = _scale_box(box, image.shape[-2] / height, image.shape[-1] / width)
        return _flip_resize(_crop(image, box).permute(1, 2, 0).numpy(), flip, self.size)


def _flip_resize(crop: np.ndarray, flip: bool, size: int) -> Tensor:
    """H x W x 3 crop -> 3 x size x size uint8, mirrored when ``flip``."""
    return _to_chw(_resize_hwc(crop, size, size), flip)


def _scale_box(box: Box, scale_y: float, scale_x: float) -> Box:
    """A crop box in the coordinates of an image decoded at a reduced size."""
    if scale_y == 1.0 and scale_x == 1.0:
        return box
    top, left, h, w = box
    return round(top * scale_y), round(left * scale_x), max(1, round(h * scale_y)), max(
        1, round(w * scale_x)
    )


class EvalTransform:
    """Evaluation geometry (nfnets/dataset.py _decode_and_center_crop).

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
