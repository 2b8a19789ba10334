"""Training checkpoints: atomic writes, a SHA-256 manifest verified on load, keep-last-K.

A checkpoint is a ``torch.save`` of plain containers and tensors only, so it loads with
``torch.load(weights_only=True)``: model, EMA, optimizer, scheduler, scaler, step, position in
the data order and RNG states (see ``nfnets.train``).

Integrity. Beside ``step_00000042.pt`` lies its manifest ``step_00000042.pt.sha256``, in the
format of ``sha256sum`` (``<64 hex>  step_00000042.pt``), so ``sha256sum -c`` checks it too.
The digest covers every byte of the file, including bytes torch never reads back (zip padding),
so any flipped byte is found; a damaged manifest is found as well, since it then no longer
parses or no longer matches (there is no way to corrupt it into a matching one by accident).
A separate manifest rather than a digest inside the file because a file cannot hold its own
digest, and a manifest lists any number of files: a directory-shaped checkpoint
(``torch.distributed.checkpoint``, one file per rank) gets the same treatment with one line
per file.

Order of a save: payload (atomically), then manifest (atomically). A checkpoint is complete
when its manifest exists and matches; a payload without one is a save that was killed between
the two renames. Checkpoints that fail verification are renamed ``*.corrupt`` (never deleted)
and the next older one is tried.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import CheckpointError
from .files import atomic_write
from .untrusted import load_torch_archive

__all__ = ["CheckpointWarning", "checkpoint_path", "list_checkpoints", "load_checkpoint",
           "load_latest_checkpoint", "manifest_path", "save_checkpoint", "verify_checkpoint",
           "write_manifest"]

_NAME = re.compile(r"^step_(\d{8,})\.pt$")
_MANIFEST_LINE = re.compile(r"^([0-9a-f]{64}) [ *]([^/\\\0]+)$")
MANIFEST_SUFFIX = ".sha256"
CORRUPT_SUFFIX = ".corrupt"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (moved aside) or could not be verified."""


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``directory``."""
    return Path(directory) / f"step_{step:08d}.pt"


def manifest_path(path: str | os.PathLike) -> Path:
    """The SHA-256 manifest of checkpoint ``path`` (``step_XXXXXXXX.pt.sha256``)."""
    path = Path(path)
    return path.with_name(path.name + MANIFEST_SUFFIX)


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``directory``, oldest step first (verified or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


class _HashingFile:
    """A write-only file that hashes what passes through it (no second read of the file)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.digest = file, hashlib.sha256()
        self.error: OSError | None = None  # torch's C++ writer hides the errno; keep it

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def write_manifest(files: dict[str, str], manifest: str | os.PathLike) -> None:
    """Write ``{file name: hex SHA-256}`` as a ``sha256sum``-format manifest, atomically."""
    text = "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
    atomic_write(manifest, lambda tmp: Path(tmp).write_text(text))


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike, step: int,
                    keep: int = 3) -> Path:
    """Write ``state`` as the checkpoint of ``step`` with its manifest; keep the newest ``keep``.

    Pruning removes only checkpoints of earlier steps than this one, so a save never deletes
    itself or anything newer.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    path = checkpoint_path(directory, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest: list[str] = []

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            hashing = _HashingFile(f)
            try:
                torch.save(state, hashing)
            except RuntimeError:
                if hashing.error is not None:  # e.g. ENOSPC: report it as the disk error
                    raise hashing.error from None
                raise
            digest.append(hashing.digest.hexdigest())

    atomic_write(path, write)
    write_manifest({path.name: digest[0]}, manifest_path(path))
    older = [p for p in list_checkpoints(directory) if p != path and _step(p) < step]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        for victim in (manifest_path(old), old):
            with contextlib.suppress(FileNotFoundError):
                victim.unlink()
    return path


def _step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless ``path``'s manifest exists, parses and matches every file."""
    from .files import sha256_file

    path = Path(path)
    manifest = manifest_path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not manifest.is_file():
        raise CheckpointError(f"{path}: no {manifest.name} beside it (its save was interrupted "
                              "before the digest was written, or it was copied without it)")
    try:
        lines = manifest.read_text(encoding="ascii").splitlines()
    except (UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable manifest {manifest.name} ({err})") from None
    expected = {}
    for line in lines:
        match = _MANIFEST_LINE.match(line)
        if match is None:
            raise CheckpointError(f"{path}: damaged manifest {manifest.name} (a line that is "
                                  "not '<sha256>  <file>')")
        expected[match.group(2)] = match.group(1)
    if path.name not in expected:
        raise CheckpointError(f"{path}: its manifest {manifest.name} does not list it")
    for name, digest in expected.items():
        member = path.parent / name
        if not member.is_file():
            raise CheckpointError(f"{path}: {name}, listed in {manifest.name}, is missing")
        if sha256_file(member) != digest:
            raise CheckpointError(f"{path}: SHA-256 of {name} does not match {manifest.name} "
                                  "(the file changed after it was written: disk or copy error)")


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Load one verified training checkpoint; a directory means its newest good one.

    ``verify=False`` still requires a matching manifest when one exists, but loads a file that
    has none (e.g. a checkpoint copied alone) with a CheckpointWarning.
    """
    path = Path(path)
    if path.is_dir():
        state = load_latest_checkpoint(path)
        if state is None:
            raise FileNotFoundError(f"no checkpoint (step_*.pt) in {path}")
        return state
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if verify or manifest_path(path).exists():
        verify_checkpoint(path)
    else:
        warnings.warn(f"{path} has no {manifest_path(path).name} beside it; loading it "
                      "unverified", CheckpointWarning, stacklevel=2)
    return _read(path)


def _read(path: Path) -> dict[str, Any]:
    state = load_torch_archive(path)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not an nfnets training checkpoint (no model/step)")
    state["path"] = str(path)
    return state


def load_latest_checkpoint(directory: str | os.PathLike, *, move_aside: bool = True
                           ) -> dict[str, Any] | None:
    """The newest checkpoint in ``directory`` that verifies and loads; None if there is none.

    Each one that fails is renamed ``*.corrupt`` (with its manifest; ``move_aside=False``
    leaves it) with a one-line CheckpointWarning, and the next older one is tried. If every
    checkpoint fails, CheckpointError names each file and why.
    """
    failures = []
    for path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
            return _read(path)
        except CheckpointError as err:
            reason = str(err).removeprefix(f"{path}: ").removeprefix(str(path) + " ")
            moved = _move_aside(path) if move_aside else path
            failures.append(f"{path.name}: {reason}")
            warnings.warn(f"checkpoint {path} is unusable ({reason}); "
                          + (f"moved aside to {moved.name}; " if moved != path else "")
                          + "trying the previous one", CheckpointWarning, stacklevel=2)
    if failures:
        raise CheckpointError(f"no usable checkpoint in {directory}: " + "; ".join(failures))
    return None


def _move_aside(path: Path) -> Path:
    """Rename a bad checkpoint and its manifest to ``*.corrupt`` (``.corrupt.N`` if taken)."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    n = 1
    while target.exists() or manifest_path(target).exists():
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}.{n}")
        n += 1
    os.replace(path, target)
    if manifest_path(path).exists():
        os.replace(manifest_path(path), target.with_name(target.name + MANIFEST_SUFFIX))
    return target
