"""Decoding only the crop of a JPEG, as the official pipeline's ``tf.image.decode_and_crop_jpeg``
does (deepmind-research ``nfnets/dataset.py`` _decode_and_random_crop).

libjpeg-turbo can skip what a crop does not need: rows below the crop are never read, rows
above it are entropy-decoded but not transformed, and columns outside it are not inverse-DCT'd,
upsampled or colour-converted. Its TurboJPEG 3 API offers this as a cropping region
(``tj3SetCroppingRegion``) and reports every error as a return code (the libjpeg API would
``longjmp`` out of an error callback, which ctypes cannot host), so it is called here through
``ctypes`` with no compiled code of ours.

The library is looked up once per process, in this order: the file named by the
``NFNETS_TURBOJPEG`` environment variable (``off``: use none), the system's ``libturbojpeg``
when it is version 3 or later, and the copy bundled in the ``turbojpeg`` wheel (installed with
nfnets on x86-64 Linux). Without one, ``decode_jpeg_region`` decodes the whole image with
simplejpeg and crops it: the same pixels, only slower.

The pixels equal the whole image's decode cropped afterwards (tested over random crops, DCT
scales, chroma subsamplings, grey and progressive files). libjpeg-turbo's "fancy" chroma
upsampling reads one chroma sample on each side, and the decoder treats the edges of the
region it decodes as the image's edges, so one extra pixel column is decoded on each side
(the left edge also moves down to a whole iMCU, as the API requires) and cut off afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import importlib.util
import os
import threading
from collections.abc import Iterator

import numpy as np

from .decode import check_pixels

try:
    import simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a dependency; PIL decodes otherwise
    simplejpeg = None

Box = tuple[int, int, int, int]  # top, left, height, width

ENV_VAR = "NFNETS_TURBOJPEG"

# TurboJPEG 3 API constants (turbojpeg.h)
_TJINIT_DECOMPRESS = 1
_TJPARAM_STOPONWARNING = 0
_TJPARAM_SUBSAMP = 4
_TJPARAM_JPEGWIDTH = 5
_TJPARAM_JPEGHEIGHT = 6
_TJPF_RGB = 0
# iMCU width in pixels per subsampling (tjMCUWidth: 444, 422, 420, gray, 440, 411, 441)
_MCU_WIDTH = {0: 8, 1: 16, 2: 16, 3: 8, 4: 8, 5: 32, 6: 8}
_CONTEXT = 1  # pixel columns decoded beyond each side of the crop (fancy upsampling's reach)


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int),
                ("h", ctypes.c_int)]


class _Scaling(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


def _bind(path: str) -> ctypes.CDLL | None:
    """The library at ``path`` with the TurboJPEG 3 functions declared, or None."""
    try:
        lib = ctypes.CDLL(path)
        lib.tj3Init.restype = ctypes.c_void_p
    except (OSError, AttributeError):  # not loadable, or TurboJPEG 2 (no tj3 functions)
        return None
    handle, size, buffer = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    lib.tj3Init.argtypes = [ctypes.c_int]
    lib.tj3Destroy.argtypes = [handle]
    lib.tj3Set.argtypes = [handle, ctypes.c_int, ctypes.c_int]
    lib.tj3Get.argtypes = [handle, ctypes.c_int]
    lib.tj3DecompressHeader.argtypes = [handle, buffer, size]
    lib.tj3SetScalingFactor.argtypes = [handle, _Scaling]
    lib.tj3SetCroppingRegion.argtypes = [handle, _Region]
    lib.tj3Decompress8.argtypes = [handle, buffer, size, ctypes.c_void_p, ctypes.c_int,
                                   ctypes.c_int]
    lib.tj3GetErrorStr.restype = ctypes.c_char_p
    lib.tj3GetErrorStr.argtypes = [handle]
    return lib


def _candidates() -> list[str]:
    """Library files to try, in order (see the module docstring)."""
    found = []
    if os.environ.get(ENV_VAR, "").lower() == "off":
        return found
    if os.environ.get(ENV_VAR):
        found.append(os.environ[ENV_VAR])
    system = ctypes.util.find_library("turbojpeg")
    if system:
        found.append(system)
    spec = importlib.util.find_spec("turbojpeg")
    if spec is not None and spec.origin:
        site = os.path.dirname(spec.origin)
        for pattern in ("turbojpeg.libs/libturbojpeg*.so*", "turbojpeg/.dylibs/libturbojpeg*",
                        "turbojpeg.libs/turbojpeg*.dll"):
            found += sorted(glob.glob(os.path.join(site, pattern)))
    return found


_lock = threading.Lock()
_state: dict[str, object] = {}


def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """The TurboJPEG 3 library of this process and its path (looked up once)."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib = path = None
                for candidate in _candidates():
                    lib = _bind(candidate)
                    if lib is not None:
                        path = candidate
                        break
                _state["lib"], _state["path"] = lib, path
    return _state["lib"], _state["path"]  # type: ignore[return-value]


@contextlib.contextmanager
def whole_image_decoding() -> Iterator[None]:
    """Within this context (this thread and process), ``decode_jpeg_region`` decodes whole
    images and crops them, as without libturbojpeg: to compare speeds, or to rule it out."""
    _handles.disabled = True
    try:
        yield
    finally:
        _handles.disabled = False


def turbojpeg_library() -> str | None:
    """Path of the libturbojpeg (version 3 or later) that ``decode_jpeg_region`` uses, or None
    when it falls back to decoding whole images."""
    return _library()[1]


class _Handle(threading.local):
    """One decompressor per thread and process (TurboJPEG handles are not shared)."""

    handle: int | None = None
    pid: int = -1
    disabled: bool = False


_handles = _Handle()


def _decompressor(lib: ctypes.CDLL) -> int:
    if _handles.handle is None or _handles.pid != os.getpid():  # new thread, or forked worker
        handle = lib.tj3Init(_TJINIT_DECOMPRESS)
        if not handle:
            raise MemoryError("libturbojpeg could not create a decompressor")
        # a warning (corrupt or truncated data) stops the decode: such files are skipped, as
        # simplejpeg's strict mode skips them
        lib.tj3Set(handle, _TJPARAM_STOPONWARNING, 1)
        _handles.handle, _handles.pid = handle, os.getpid()
    return _handles.handle


def _scaled(length: int, scale: int) -> int:
    return -(-length // scale)  # libjpeg's DCT scaling rounds sizes up


def _decode_whole_and_crop(data: bytes, box: Box, scale: int, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    whole = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=_scaled(height, scale),
                                   min_width=_scaled(width, scale), strict=True)
    top, left, h, w = box
    return np.ascontiguousarray(whole[top : top + h, left : left + w])


def decode_jpeg_region(data: bytes, box: Box, scale: int = 1,
                       size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode ``box`` (top, left, height, width) of a JPEG decoded at 1/``scale`` size
    (1, 2, 4 or 8; the box is in that image's coordinates) to an H x W x 3 uint8 RGB array,
    C-contiguous.

    ``size`` is the file's (height, width) when the caller has read the header. Equals the
    whole image's decode (simplejpeg, PIL's pixels) cropped to the box; decodes only what the
    box needs when libjpeg-turbo 3 is available (``turbojpeg_library``). Corrupt or truncated
    data raises ``ValueError``, and so does an image over the size limit (``check_pixels``).
    """
    data = bytes(data)  # ctypes passes bytes without a copy; memoryviews and bytearrays copy
    if size is None:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        size = (height, width)
    check_pixels(*size)
    lib = _library()[0]
    if lib is None or _handles.disabled:
        return _decode_whole_and_crop(data, box, scale, size)
    top, left, h, w = box
    scaled_w = _scaled(size[1], scale)
    handle = _decompressor(lib)
    if lib.tj3DecompressHeader(handle, data, len(data)) != 0:
        return _decode_whole_and_crop(data, box, scale, size)  # raises if corrupt
    mcu = _MCU_WIDTH.get(lib.tj3Get(handle, _TJPARAM_SUBSAMP), 32)
    mcu = max(1, _scaled(mcu, scale))  # the iMCU width at this scale (TJSCALED)
    x0 = max(0, left - _CONTEXT) // mcu * mcu
    x1 = min(scaled_w, left + w + _CONTEXT)
    out = np.empty((h, x1 - x0, 3), np.uint8)
    if (lib.tj3SetScalingFactor(handle, _Scaling(1, scale)) != 0
            or lib.tj3SetCroppingRegion(handle, _Region(x0, top, x1 - x0, h)) != 0
            or lib.tj3Decompress8(handle, data, len(data), out.ctypes.data, out.strides[0],
                                  _TJPF_RGB) != 0):
        # a file libturbojpeg refuses (corrupt, or a kind it does not crop): the whole-image
        # decoder raises for corrupt data and decodes the rest
        return _decode_whole_and_crop(data, box, scale, size)
    return np.ascontiguousarray(out[:, left - x0 : left - x0 + w])


def jpeg_decoding() -> str:
    """One line saying how the fast pipeline decodes JPEGs here, for a run's log."""
    path = turbojpeg_library()
    if path is not None:
        return f"JPEG training crops are decoded alone by libturbojpeg ({path})"
    return (f"JPEGs are decoded whole, then cropped (no libturbojpeg 3 found: pip install "
            f"turbojpeg, or set {ENV_VAR} to a libturbojpeg.so of version 3 or later; "
            "docs/data.md)")
