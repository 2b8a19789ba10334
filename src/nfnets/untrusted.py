"""Reading torch archives nobody vouches for: no code runs, memory stays bounded.

``torch.load(weights_only=True)`` already refuses every global outside its allow-list. Two
things are left to this module:

- memory: a torch archive is a zip, and a zip member may be compressed. ``torch.save`` never
  compresses (every member is stored), but a crafted 2 MB archive whose ``data.pkl`` inflates
  to 2 GiB would be inflated in full by the reader. Before torch sees the file, every member
  must be stored (not compressed) and fit inside the file, so nothing read can exceed the file
  size; tensors larger than their storage are refused by torch itself;
- messages: torch's refusal advises re-running with ``weights_only=False``, i.e. executing
  the file. That advice is dropped; the reason is kept.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["check_torch_archive", "load_torch_archive", "torch_refusal"]

_ZIP_MAGIC = b"PK\x03\x04"


def check_torch_archive(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless ``path`` is a zip whose members are all stored and fit in it.

    Reads only the zip's central directory; no member is decompressed.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != _ZIP_MAGIC:
            raise CheckpointError(f"{path} is not a torch archive (a zip written by torch.save)"
                                  f"{' : the file is empty' if size == 0 else ''}")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: damaged zip archive ({err}); the file is truncated or "
                              "corrupt") from None
    total = 0
    for info in members:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path}: member {info.filename!r} is compressed; torch.save stores every "
                "member uncompressed, and a compressed one could inflate to any size, so the "
                "file is refused unread")
        total += info.file_size
        if info.file_size != info.compress_size or total > size:
            raise CheckpointError(
                f"{path}: member {info.filename!r} declares {info.file_size:,} bytes, more than "
                f"the {size:,}-byte file can hold; the file is damaged or crafted")


def load_torch_archive(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU after ``check_torch_archive``.

    Every failure (a refused global, a truncated record, a tensor beyond its storage) becomes
    one CheckpointError naming the file, without torch's advice to disable ``weights_only``.
    """
    path = Path(path)
    check_torch_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError,
            KeyError, IndexError, AttributeError, OverflowError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} cannot be loaded safely: {torch_refusal(err)}") from None


def torch_refusal(err: BaseException) -> str:
    """The reason in a torch.load error, without the advice to set ``weights_only=False``."""
    text = str(err)
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if match:
        text = match.group(1)
    # Keep the first sentence-ish line; drop every line that mentions weights_only=False or
    # points at the documentation of the unsafe path.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    kept = [line for line in lines
            if "weights_only" not in line and "safe_globals" not in line
            and "https://" not in line]
    reason = kept[0] if kept else type(err).__name__
    reason = re.sub(r"\s*(Please|Check the documentation|To load|Re-running).*$", "", reason)
    return reason.rstrip(" .:") or type(err).__name__
