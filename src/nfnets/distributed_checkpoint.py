"""Sharded training checkpoints for ``--fsdp`` runs, with ``torch.distributed.checkpoint`` (DCP).

Each rank writes only its own shards, nothing is gathered. A checkpoint is a directory::

    checkpoints/step_00000042.dcp/
        __0_0.distcp, __1_0.distcp, ...   DCP: each rank's shards of model, EMA, optimizer
        .metadata                          DCP: which shard of which tensor lies where
        state.pt                           ours (rank 0): step, data position, schedule, RNG,
                                           optimizer hyper-parameters, config, architecture
        manifest.sha256                    ours: SHA-256 of every other file (sha256sum -c)

Atomic as a whole: all ranks write into ``step_N.dcp.tmp-<12 hex>/``, then rank 0 writes the
manifest, fsyncs the directory and renames it to its final name (one ``os.replace``, the
parent fsynced). A kill before the rename leaves a temp directory that the next run removes;
after it, the checkpoint is complete. See ``nfnets.checkpoint`` for verification, fallback to
older checkpoints and pruning, which treat the directory like a file.

Resharding. DCP records each tensor's global shape and where its pieces lie, so a checkpoint
of N ranks loads on M: :func:`load_sharded` reads each rank's part into a live FSDP model
(collective), :func:`read_sharded_checkpoint` with ``full=True`` reads whole tensors in one
process without any process group (a plain resume, ``nfnets convert``, ``nfnets eval``).

What is trusted. DCP's ``FileSystemReader`` unpickles ``.metadata`` with the plain
``pickle.load`` and would read non-tensor entries with ``torch.load(weights_only=False)``;
tensor data it reads with ``weights_only=True``. So (1) the manifest is verified before
anything in the directory is read (``nfnets.checkpoint.verify_checkpoint``), (2)
``.metadata`` is unpickled by :class:`_MetadataUnpickler`, which admits only DCP's metadata
classes, ``torch.Size``, dtypes and paths, (3) a checkpoint with any non-tensor entry is
refused (ours store non-tensors in ``state.pt``, read with ``weights_only=True``), and (4)
tensors are allocated only up to the size of the shard files. A DCP directory without our
manifest (another program's) is not loaded.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import secrets
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from .checkpoint import (
    DIR_MANIFEST,
    prune_checkpoints,
    remove_checkpoint,
    sharded_checkpoint_path,
    temp_checkpoint_dir,
    write_manifest,
)
from .errors import CheckpointError, RunFailed
from .files import atomic_write, disk_error, sha256_file
from .untrusted import load_torch_archive

__all__ = ["load_sharded", "read_sharded_checkpoint", "save_sharded_checkpoint"]

STATE_FILE = "state.pt"  # the small unsharded state, written by rank 0
_METADATA_FILE = ".metadata"  # DCP's


# ----------------------------------------------------------------------------------------------
# Writing


def _sharded_tensors(model: nn.Module, ema_module: nn.Module, optimizer
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The DCP state (each rank's DTensor shards; replicated scalars on every rank) and the
    optimizer's param groups, which hold no tensors and go to ``state.pt``."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    optimizer_state = get_optimizer_state_dict(model, optimizer)
    tensors = {"model": get_model_state_dict(model), "ema": get_model_state_dict(ema_module),
               "optimizer": optimizer_state["state"]}
    return tensors, optimizer_state["param_groups"]


def save_sharded_checkpoint(model: nn.Module, ema_module: nn.Module, optimizer,
                            state: dict[str, Any], directory: str | os.PathLike, step: int,
                            keep: int = 3) -> Path:
    """Write the checkpoint of ``step`` as ``directory/step_N.dcp``; collective.

    ``model`` and ``ema_module`` are FSDP2-sharded; ``state`` is the small unsharded state
    (rank 0's is written; the optimizer's param groups are added to it). Keeps the newest
    ``keep`` checkpoints (files or directories) up to this one. Returns the final path.
    """
    import torch.distributed.checkpoint as dcp

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    is_main = dist.get_rank() == 0
    final = sharded_checkpoint_path(directory, step)
    token = [secrets.token_hex(6) if is_main else None]
    dist.broadcast_object_list(token, src=0)  # one temp directory for all ranks
    tmp = temp_checkpoint_dir(final, token[0])
    tensors, param_groups = _sharded_tensors(model, ema_module, optimizer)
    device = next(model.parameters()).device  # NCCL reduces on the GPU
    error: BaseException | None = None
    if is_main:
        try:
            tmp.mkdir(parents=True)
            small = {**state, "optimizer_param_groups": param_groups}
            atomic_write(tmp / STATE_FILE, lambda path: torch.save(small, path))
        except OSError as err:
            error = disk_error(tmp, err) or err
    written = _all_ok(error is None, device)
    if written:
        try:  # every rank writes and fsyncs its shards; rank 0 writes .metadata last
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
        except CheckpointException as err:  # DCP raises it on every rank alike
            error = _write_failure(tmp, err)
        digests = _shard_digests(tmp) if error is None else {}
        if error is None and is_main:
            try:
                # the rest (.metadata, state.pt, and anything DCP named otherwise) by rank 0
                files = {entry.name: digests.get(entry.name) or sha256_file(entry)
                         for entry in sorted(tmp.iterdir())}
                write_manifest(files, tmp / DIR_MANIFEST)
                _fsync(tmp)
                if final.exists():  # this step saved again (e.g. a resumed run stopping at once)
                    remove_checkpoint(final)
                os.replace(tmp, final)  # the checkpoint appears whole, or not at all
                _fsync(final.parent)
                prune_checkpoints(directory, step, keep)
            except OSError as err:
                error = disk_error(final, err) or err
        written = _all_ok(error is None, device)
    if error is not None:
        raise error
    if not written:
        raise RunFailed(f"rank 0 could not write {final}; see its message")
    return final


def _shard_digests(tmp: Path) -> dict[str, str]:
    """SHA-256 of the shard files this rank wrote (DCP names them ``__<rank>_<n>.distcp``),
    gathered from every rank (collective): each rank hashes its own, in parallel and while
    they are likely still in its page cache, instead of rank 0 reading every rank's bytes."""
    rank = dist.get_rank()
    try:
        mine = {entry.name: sha256_file(entry) for entry in sorted(tmp.iterdir())
                if entry.name.startswith(f"__{rank}_") and entry.suffix == ".distcp"}
    except OSError:  # rank 0 hashes what is missing, and reports the disk's error itself
        mine = {}
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {name: digest for part in gathered for name, digest in (part or {}).items()}


def _all_ok(ok: bool, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank (collective): ranks stop or go on together."""
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _write_failure(path: Path, err: BaseException) -> BaseException:
    """The one-line error for a failed DCP write: the disk's, else the first rank's reason."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, (cause, _) = min(err.failures.items())
        return disk_error(path, cause) or RunFailed(
            f"could not write {path}: rank {rank}: {type(cause).__name__}: {cause}")
    return err


def _fsync(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Reading


def _allowed_globals() -> dict[tuple[str, str], Any]:
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {
        ("torch", "Size"): torch.Size,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
        ("pathlib", "PosixPath"): pathlib.PurePosixPath,  # paths as data, never opened
        ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    }
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta",
                 "_MEM_FORMAT_ENCODING"):
        allowed["torch.distributed.checkpoint.metadata", name] = getattr(metadata, name)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` admitting only its own data classes, ``torch.Size``,
    dtypes, layouts and paths: no other global can be named, so no code runs."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _allowed_globals()
        found = _MetadataUnpickler._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP "
                                         "metadata")
        return found


def _read_metadata(path: Path):
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    try:
        with open(path / _METADATA_FILE, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError,
            ValueError, IndexError, KeyError) as err:
        raise CheckpointError(f"{path}: unreadable DCP metadata ({err})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: {_METADATA_FILE} does not hold DCP metadata")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def _safe_reader(path: Path):
    """DCP's FileSystemReader, but reading ``.metadata`` with :class:`_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = _read_metadata(path)
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _Reader(path)


def _tensor_entries(path: Path, metadata) -> dict[str, Any]:
    """The metadata's tensor entries, after refusing non-tensor ones and sizes larger than
    the shard files can hold."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries, claimed = {}, 0
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor; nfnets checkpoints "
                                  "hold only tensors in DCP files (reading other entries would "
                                  "unpickle them unrestricted), so the directory is refused")
        entries[key] = entry
        claimed += entry.size.numel() * entry.properties.dtype.itemsize
    stored = sum(f.stat().st_size for f in path.glob("*.distcp"))
    if claimed > stored:
        raise CheckpointError(f"{path}: its metadata declares {claimed:,} bytes of tensors but "
                              f"the shard files hold {stored:,}; damaged or crafted")
    return entries


def _nested(metadata, flat: dict[str, Any]) -> dict[str, Any]:
    """DCP's flattened keys back to the nested dicts they were saved from."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        where = metadata.planner_data.get(key, (key,)) if metadata.planner_data else (key,)
        node = nested
        for part in where[:-1]:
            node = node.setdefault(part, {})
        node[where[-1]] = value
    return nested


def read_sharded_checkpoint(path: str | os.PathLike, *, full: bool = True) -> dict[str, Any]:
    """A verified sharded checkpoint as the dict a single-file checkpoint holds.

    ``full=True``: model, EMA and optimizer as whole CPU tensors, in this process, with no
    process group (any number of ranks wrote it). ``full=False``: only the small state, plus
    ``"sharded_path"`` for :func:`load_sharded`. The caller verifies the manifest first
    (``nfnets.checkpoint.load_checkpoint`` does).
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    state = load_torch_archive(path / STATE_FILE)
    if not isinstance(state, dict) or "step" not in state or "model_name" not in state:
        raise CheckpointError(f"{path / STATE_FILE} is not an nfnets checkpoint state")
    param_groups = state.pop("optimizer_param_groups", [])
    metadata = _read_metadata(path)
    entries = _tensor_entries(path, metadata)
    if not full:
        return {**state, "sharded_path": str(path), "optimizer_param_groups": param_groups}
    flat = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
            for key, entry in entries.items()}
    tensors = _nested(metadata, flat)
    # no_dist: one process reads every shard, whatever process group may exist (DCP warns
    # that it assumes just that).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single")
        dcp.load(tensors, storage_reader=_safe_reader(path), no_dist=True)
    ema = {**state.pop("ema", {}), "module": tensors.get("ema", {})}
    optimizer = {"state": tensors.get("optimizer", {}), "param_groups": param_groups}
    return {**state, "model": tensors.get("model", {}), "ema": ema, "optimizer": optimizer}


def load_sharded(checkpoint: dict[str, Any], model: nn.Module, ema_module: nn.Module,
                 optimizer) -> None:
    """Load a sharded checkpoint into FSDP2-sharded ``model``, ``ema_module`` and ``optimizer``:
    each rank reads only the pieces of its own shards, whatever the number of ranks that
    wrote it (DCP reshards). Collective. ``checkpoint`` is what
    ``read_sharded_checkpoint(path, full=False)`` returned."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(checkpoint["sharded_path"])
    tensors, _ = _sharded_tensors(model, ema_module, optimizer)
    try:
        dcp.load(tensors, storage_reader=_safe_reader(path))
    except CheckpointException as err:  # every rank alike
        rank, (cause, _) = min(err.failures.items())
        raise CheckpointError(f"{path} cannot be loaded into this model (rank {rank}: "
                              f"{type(cause).__name__}: {cause})") from None
    set_model_state_dict(model, tensors["model"])
    set_model_state_dict(ema_module, tensors["ema"])
    set_optimizer_state_dict(model, optimizer, {
        "state": tensors["optimizer"], "param_groups": checkpoint["optimizer_param_groups"]})
