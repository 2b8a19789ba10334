"""Decoding image files to 8-bit RGB tensors, and handing undecoded files to transforms that
decode for themselves (reduced-size JPEG decoding needs the crop before the pixels)."""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor

try:  # libjpeg-turbo without PIL's copies; the same pixels as PIL (tested)
    import simplejpeg
except ImportError:  # pragma: no cover - PIL decodes everything on its own
    simplejpeg = None

IMAGE_EXTENSIONS = tuple(".jpg .jpeg .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm".split())

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha-composite H x W x 4 uint8 onto white, rounding to nearest."""
    rgba = rgba.astype(np.uint32)
    alpha = rgba[..., 3:]
    rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
    return rgb.astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _hwc_to_tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8)).permute(2, 0, 1)


def pil_to_rgb(img: Image.Image) -> Tensor:
    """Convert a PIL image in any common mode to a 3 x H x W uint8 RGB tensor.

    16-bit grey ('I;16*', and 'I', which is how Pillow opens 16-bit PNGs) is scaled by
    255/65535 with rounding, not clipped; 'F' is clipped to 0..255. Transparency (RGBA, LA, PA,
    P or L/RGB with a transparent colour) is composited onto white. CMYK and other modes go
    through Pillow's RGB conversion. EXIF orientation is ignored, as TF's decoder does.
    The tensor is a view of an H x W x 3 array (channels-last memory), which is the layout
    PyTorch's uint8 resize kernels prefer.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.float64)
        return _hwc_to_tensor(_grey_to_rgb(np.rint(np.clip(wide, 0, 65535) / 257.0)))
    if img.mode == "F":
        return _hwc_to_tensor(_grey_to_rgb(np.rint(np.clip(np.asarray(img), 0, 255))))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return _hwc_to_tensor(_composite_on_white(np.array(img.convert("RGBA"))))
    if img.mode == "RGB":  # one copy; convert("RGB") would make a second
        return _hwc_to_tensor(np.array(img))
    return _hwc_to_tensor(np.array(img.convert("RGB")))


def load_rgb(path: str | os.PathLike | BinaryIO) -> Tensor:
    """Decode an image file (path or binary file object) to a 3 x H x W uint8 RGB tensor
    (see ``pil_to_rgb``)."""
    with Image.open(path) as img:
        img.load()  # raises on truncated data instead of returning a partial image
        return pil_to_rgb(img)


_JPEG_MAGIC = b"\xff\xd8"
_TURBO_COLOURSPACES = ("YCbCr", "Gray", "RGB")  # CMYK/YCCK JPEGs go through PIL


def check_pixels(height: int, width: int) -> None:
    """Raise ``ValueError`` for an image larger than PIL's decompression-bomb limit (twice
    ``PIL.Image.MAX_IMAGE_PIXELS``, where PIL itself refuses), so that a small file claiming
    huge dimensions never makes a decoder allocate for them."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and height * width > 2 * limit:
        raise ValueError(
            f"image of {width} x {height} pixels exceeds the limit of {2 * limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS x 2); raise that limit to read it"
        )


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG that ``decode_jpeg`` handles, from its header; else None.

    Raises ``ValueError`` for one over the size limit (``check_pixels``)."""
    if simplejpeg is None or not data.startswith(_JPEG_MAGIC):
        return None
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colourspace not in _TURBO_COLOURSPACES:
        return None
    check_pixels(height, width)
    return height, width


def decode_jpeg(data: bytes, min_height: int = 0, min_width: int = 0) -> Tensor:
    """Decode a JPEG (``jpeg_size`` not None) to 3 x H x W uint8 RGB, at the smallest DCT
    scale (1, 1/2, 1/4, 1/8) that keeps at least ``min_height`` x ``min_width``.

    The pixels equal PIL's (``Image.draft`` for the reduced scales); corrupt or truncated data
    raises ``ValueError``. The tensor is channels-last in memory.
    """
    array = simplejpeg.decode_jpeg(
        data, colorspace="RGB", min_height=min_height, min_width=min_width, strict=True
    )
    return torch.from_numpy(array).permute(2, 0, 1)


def _read(source: str | os.PathLike | BinaryIO) -> bytes:
    if hasattr(source, "read"):
        return source.read()
    with open(source, "rb") as f:
        return f.read()


def decode_and_transform(source: str | os.PathLike | BinaryIO | bytes, transform, generator):
    """Read ``source`` (a path, a binary file or bytes) and apply ``transform(image, generator)``.

    A transform with ``decodes_itself = True`` gets the undecoded bytes (it reads the size,
    picks its crop, and may decode at reduced size); any other transform gets the decoded
    3 x H x W uint8 tensor (``decode_jpeg`` for plain JPEGs, PIL for the rest: the same
    pixels as ``load_rgb``).
    """
    data = source if isinstance(source, bytes) else _read(source)
    if getattr(transform, "decodes_itself", False):
        return transform(data, generator)
    if jpeg_size(data) is not None:
        return transform(decode_jpeg(data), generator)
    return transform(load_rgb(io.BytesIO(data)), generator)
