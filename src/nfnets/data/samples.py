"""What every dataset of this package yields, and how it passes over unreadable images."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import DataError

MAX_CONSECUTIVE_SKIPS = 100  # more unreadable images in a row than this is a broken dataset


class SkippedImageWarning(UserWarning):
    """An image could not be read and was replaced by the next readable one."""


class Sample(NamedTuple):
    """One dataset item: image (3 x S x S: uint8 from the fast transform, float32 on the 0-255
    scale otherwise), label, how many unreadable images were passed over to produce it, and
    the per-sample seed (None without one)."""

    image: Tensor
    label: int
    skipped: int
    seed: int | None


def parse_key(key: int | tuple[int, int], length: int) -> tuple[int, int | None]:
    """Dataset keys are an index, or (index, seed) from ResumableSampler."""
    index, seed = (key[0], key[1]) if isinstance(key, tuple) else (key, None)
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} images")
    return int(index), seed


def seeded_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with ``seed``, or None."""
    return None if seed is None else torch.Generator().manual_seed(int(seed))


def name_list(names: Sequence[str], limit: int = 10) -> str:
    """'a, b, c and 7 more' for error messages."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_with_skips(
    index: int,
    length: int,
    read: Callable[[int], tuple[Tensor, int]],
    describe: Callable[[int], str],
) -> tuple[Tensor, int, int]:
    """``read(i) -> (image, label)`` from ``index`` on, passing over items that fail.

    Returns (image, label, skipped). Each failure warns with ``describe(i)`` (a path, a row);
    ``MAX_CONSECUTIVE_SKIPS`` failures in a row raise ``DataError``.
    """
    for skipped in range(min(MAX_CONSECUTIVE_SKIPS, length)):
        i = (index + skipped) % length
        try:
            image, label = read(i)
        except DataError:
            raise
        except Exception as err:  # decoders raise many types (OSError, SyntaxError, ...)
            warnings.warn(
                f"skipping unreadable image {describe(i)}: {err}", SkippedImageWarning, stacklevel=3
            )
            continue
        return image, label, skipped
    raise DataError(
        f"{MAX_CONSECUTIVE_SKIPS} consecutive images from {describe(index)} on could not be "
        "read; check the data (copy incomplete? wrong file types?)"
    )
