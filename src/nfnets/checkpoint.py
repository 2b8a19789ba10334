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

Sharded checkpoints (``step_00000042.dcp/``, written by ``--fsdp`` runs through
:mod:`nfnets.distributed_checkpoint`) are directories: every rank writes its shards into
``step_00000042.dcp.tmp-<12 hex>/``, then rank 0 writes ``manifest.sha256`` inside it (one line
per file) and renames the whole directory into place, so the rename publishes the files and
their manifest at once. Verification requires every listed file, equal digests and nothing
unlisted; pruning and moving aside treat the directory as one checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import CheckpointError
from .files import atomic_write
from .untrusted import load_torch_archive

__all__ = ["CheckpointWarning", "checkpoint_path", "is_sharded_checkpoint", "list_checkpoints",
           "load_checkpoint", "load_latest_checkpoint", "manifest_path", "read_checkpoint",
           "remove_temp_checkpoints", "remove_checkpoint", "save_checkpoint",
           "sharded_checkpoint_path", "temp_checkpoint_dir", "verify_checkpoint",
           "write_manifest"]

_NAME = re.compile(r"^step_(\d{8,})\.(pt|dcp)$")
# A sharded checkpoint being written (or deleted): never loaded, removed when a run resumes.
_TEMP_DIR = re.compile(r"^step_\d{8,}\.dcp\.tmp-[0-9a-f]{12}$")
DIR_MANIFEST = "manifest.sha256"  # inside a sharded checkpoint directory
_MANIFEST_LINE = re.compile(r"^([0-9a-f]{64}) [ *]([^/\\\0]+)$")
MANIFEST_SUFFIX = ".sha256"
CORRUPT_SUFFIX = ".corrupt"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (moved aside) or could not be verified."""


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``directory``."""
    return Path(directory) / f"step_{step:08d}.pt"


def sharded_checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """Where the sharded (directory) checkpoint of ``step`` lives in ``directory``."""
    return Path(directory) / f"step_{step:08d}.dcp"


def temp_checkpoint_dir(final: str | os.PathLike, token: str | None = None) -> Path:
    """A temp name beside sharded checkpoint ``final`` (``step_N.dcp.tmp-<12 hex>``)."""
    final = Path(final)
    return final.with_name(f"{final.name}.tmp-{token or secrets.token_hex(6)}")


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a sharded (directory) checkpoint, ``step_N.dcp``."""
    return Path(path).suffix == ".dcp"


def manifest_path(path: str | os.PathLike) -> Path:
    """The SHA-256 manifest of checkpoint ``path``: ``step_N.pt.sha256`` beside a file,
    ``step_N.dcp/manifest.sha256`` inside a sharded checkpoint."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return path / DIR_MANIFEST
    return path.with_name(path.name + MANIFEST_SUFFIX)


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints (files and sharded directories) in ``directory``, oldest step first
    (verified or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), m.group(2), p) for p in directory.iterdir()
             if (m := _NAME.match(p.name))]
    return [p for _, _, p in sorted(found)]


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint and its manifest; a directory is first renamed to a temp name, so
    a kill halfway leaves a leftover that the next run removes, never a damaged checkpoint."""
    path = Path(path)
    if path.is_dir():
        doomed = temp_checkpoint_dir(path)
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, doomed)
            shutil.rmtree(doomed)
        return
    for victim in (manifest_path(path), path):
        with contextlib.suppress(FileNotFoundError):
            victim.unlink()


def remove_temp_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``step_N.dcp.tmp-*`` directories of sharded saves (or deletions) that were
    killed. Call only while holding the run folder (``nfnets.lock.RunLock``)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if _TEMP_DIR.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def prune_checkpoints(directory: str | os.PathLike, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step``: only earlier steps are removed, so
    a save never deletes itself or anything newer."""
    older = [p for p in list_checkpoints(directory) if _step(p) < step]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        remove_checkpoint(old)


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
    prune_checkpoints(directory, step, keep)
    return path


def _step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless ``path``'s manifest exists, parses and matches every file.

    For a sharded checkpoint (a directory) the manifest must also list every file in it:
    an unlisted file (or subdirectory) is refused as well.
    """

    path = Path(path)
    manifest = manifest_path(path)
    if is_sharded_checkpoint(path):
        _verify_directory(path)
        return
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not manifest.is_file():
        raise CheckpointError(f"{path}: no {manifest.name} beside it (its save was interrupted "
                              "before the digest was written, or it was copied without it)")
    expected = _read_manifest(path, manifest)
    if path.name not in expected:
        raise CheckpointError(f"{path}: its manifest {manifest.name} does not list it")
    _check_digests(path, path.parent, expected, manifest.name)


def _check_digests(path: Path, folder: Path, expected: dict[str, str], manifest: str,
                   plain_files: bool = False) -> None:
    """Every file ``expected`` lists in ``folder`` exists (as a plain file, not a link, when
    ``plain_files``) and has the listed SHA-256; ``path`` and ``manifest`` name them in errors."""
    from .files import sha256_file

    for name, digest in expected.items():
        member = folder / name
        if not member.is_file() or (plain_files and member.is_symlink()):
            raise CheckpointError(f"{path}: {name}, listed in {manifest}, is missing or not a "
                                  "plain file")
        if sha256_file(member) != digest:
            raise CheckpointError(f"{path}: SHA-256 of {name} does not match {manifest} "
                                  "(the file changed after it was written: disk or copy error)")


def _read_manifest(path: Path, manifest: Path) -> dict[str, str]:
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
    return expected


def _verify_directory(path: Path) -> None:
    manifest = path / DIR_MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not manifest.is_file():
        raise CheckpointError(f"{path}: no {DIR_MANIFEST} inside (not written by nfnets, or "
                              "damaged)")
    expected = _read_manifest(path, manifest)
    if not expected:
        raise CheckpointError(f"{path}: its {DIR_MANIFEST} lists no files")
    present = {entry.name for entry in path.iterdir()} - {DIR_MANIFEST}
    missing, extra = sorted(set(expected) - present), sorted(present - set(expected))
    if missing:
        raise CheckpointError(f"{path}: {', '.join(missing)}, listed in {DIR_MANIFEST}, "
                              f"{'is' if len(missing) == 1 else 'are'} missing")
    if extra:
        raise CheckpointError(f"{path}: {', '.join(extra)} not listed in {DIR_MANIFEST} (the "
                              "directory changed after it was written)")
    _check_digests(path, path, expected, DIR_MANIFEST, plain_files=True)


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True,
                    full: bool = True) -> dict[str, Any]:
    """Load one verified training checkpoint; a directory of checkpoints means its newest
    good one.

    ``verify=False`` still requires a matching manifest when one exists, but loads a file that
    has none (e.g. a checkpoint copied alone) with a CheckpointWarning; a sharded checkpoint
    is always verified. A sharded checkpoint is gathered into full tensors in this process
    (no process group needed); ``full=False`` returns only its small state and
    ``"sharded_path"``, for :func:`nfnets.distributed_checkpoint.load_sharded` to read each
    rank's shards.
    """
    path = Path(path)
    if is_sharded_checkpoint(path) and path.is_dir():
        verify_checkpoint(path)
        return _read(path, full)
    if path.is_dir():
        state = load_latest_checkpoint(path, full=full)
        if state is None:
            raise FileNotFoundError(f"no checkpoint (step_*.pt or step_*.dcp) in {path}")
        return state
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if verify or manifest_path(path).exists():
        verify_checkpoint(path)
    else:
        warnings.warn(f"{path} has no {manifest_path(path).name} beside it; loading it "
                      "unverified", CheckpointWarning, stacklevel=2)
    return _read(path)


def read_checkpoint(path: str | os.PathLike, *, full: bool = True) -> dict[str, Any]:
    """Read a checkpoint that has already been verified (by this process or by rank 0 of a
    distributed run, which verifies once for all ranks); ``full`` as in load_checkpoint."""
    return _read(Path(path), full)


def _read(path: Path, full: bool = True) -> dict[str, Any]:
    if is_sharded_checkpoint(path):
        from .distributed_checkpoint import read_sharded_checkpoint

        state = read_sharded_checkpoint(path, full=full)
        state["path"] = str(path)
        return state
    state = load_torch_archive(path)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not an nfnets training checkpoint (no model/step)")
    state["path"] = str(path)
    return state


def load_latest_checkpoint(directory: str | os.PathLike, *, move_aside: bool = True,
                           full: bool = True) -> dict[str, Any] | None:
    """The newest checkpoint in ``directory`` that verifies and loads; None if there is none.

    Each one that fails is renamed ``*.corrupt`` (with its manifest; ``move_aside=False``
    leaves it) with a one-line CheckpointWarning, and the next older one is tried. If every
    checkpoint fails, CheckpointError names each file and why. ``full``: see
    :func:`load_checkpoint`.
    """
    failures = []
    for path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
            return _read(path, full)
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
    if not target.is_dir() and manifest_path(path).exists():  # a directory holds its own
        os.replace(manifest_path(path), target.with_name(target.name + MANIFEST_SUFFIX))
    return target
