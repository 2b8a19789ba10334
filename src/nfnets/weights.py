"""Reading and writing NFNet weights, from every source, in one place.

Sources: DeepMind's released ``F{k}_haiku.npz`` files, our safetensors files, torch state
dicts, nfnets training checkpoints and training run directories. The format of a file is told
by its first bytes (``_sniff``), never by its suffix.

DeepMind's files are Python pickles (despite the suffix) of a two-level mapping
``{haiku module path: {param name: float32 array}}``: the official loader is
``deepmind-research nfnets/utils.py: load_haiku_file``, a ``dill.load``. Here they are read
with a restricted unpickler that can only rebuild NumPy arrays and Haiku's mapping containers:
no JAX, Haiku or dill is needed, and nothing named in the file is ever imported or called
beyond that allow-list (docs/weights.md, "Security model").

Our own format is safetensors with metadata ``{"format": "nfnets", "model_name": ...,
"model_kwargs": <json>}``, enough to rebuild the model with ``nfnets.create_model``.

``load_model`` is the one entry point for inference (``nfnets eval``, ``predict``,
``export``); ``load_pretrained`` loads into a model you built (``nfnets train --init-from``).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from .checkpoint import (
    CheckpointWarning,
    is_sharded_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    manifest_path,
    verify_checkpoint,
)
from .errors import CheckpointError, UsageError
from .files import atomic_write
from .integrity import verify_tensors, with_digest
from .pretrained import (
    OFFICIAL_RELEASES,
    OfficialRelease,
    checksum_warning,
    file_md5,
    missing_hint,
)
from .pretrained import imagenet_classes as _shipped_imagenet_classes
from .timm_compat import from_timm_state_dict, is_timm_state_dict
from .untrusted import load_torch_archive
from .wrappers import unwrap

__all__ = [
    "OFFICIAL_RELEASES",
    "RUN_WEIGHTS",
    "CheckpointError",
    "OfficialRelease",
    "convert_checkpoint",
    "convert_official",
    "detect_variant",
    "file_md5",
    "imagenet_classes",
    "load_model",
    "load_pretrained",
    "load_weights",
    "official_model_kwargs",
    "official_to_state_dict",
    "read_official_checkpoint",
    "read_weights_metadata",
    "save_weights",
]

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# The released files: their records live in nfnets.pretrained (address, checksum, resolution,
# class names, published accuracy); every loader checks a file named like one the same way.
# --------------------------------------------------------------------------------------------


def _check_release_md5(path: Path) -> str | None:
    """MD5 of a file named like a release, warning if it differs from the listed checksum.

    A warning, not an error: the listed checksums come from a third party, and the loader is
    safe and validates every tensor whatever the checksum says. Other names are not hashed.
    The message is ``nfnets.pretrained.checksum_warning``'s, the same for every command.
    """
    if not any(r.filename == path.name for r in OFFICIAL_RELEASES.values()):
        return None
    md5 = file_md5(path)
    message = checksum_warning(path, md5)
    if message is not None:
        warnings.warn(message, stacklevel=3)
    return md5


# --------------------------------------------------------------------------------------------
# Restricted unpickling (docs/weights.md, "Security model")
# --------------------------------------------------------------------------------------------

# The first object of a legacy (non-zip) torch.save file.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _numpy_multiarray() -> Any:
    # NumPy 2 moved numpy.core to numpy._core and left a shim that warns on import; the 2021
    # files say numpy.core, so both spellings resolve to whichever real module exists.
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # NumPy 1.x
        return importlib.import_module("numpy.core.multiarray")


def _latin1_encode(text: str, encoding: str) -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(text, "latin1"). Any other codec name
    # would make the codec registry import a module named by the file, so only latin1 passes.
    if encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"refusing _codecs.encode with codec {encoding!r}: official "
                              "NFNet checkpoints only use latin1")
    return text.encode("latin1")


class _NdarrayClass:
    """Stands for ``numpy.ndarray`` in an official pickle: only ``_reconstruct`` may use it.

    Calling it (``ndarray(shape, dtype)`` via REDUCE) would allocate an array of any declared
    shape from a few bytes of file, so it is refused; official files never do it.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise CheckpointError("the pickle calls numpy.ndarray directly, which official NFNet "
                              "checkpoints never do (an array not backed by the file's bytes)")


_NDARRAY = _NdarrayClass()


class _PendingArray:
    """What ``_reconstruct`` returns; its ``__setstate__`` builds the array after checking that
    the declared shape and dtype are exactly what the bytes in the file hold."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise CheckpointError("malformed array state in the pickle")
        shape, dtype, _, data = state[-4:]
        if not isinstance(shape, tuple) or not all(
                isinstance(n, int) and 0 <= n for n in shape) or len(shape) > 8:
            raise CheckpointError(f"malformed array shape {shape!r} in the pickle")
        # Plain numbers only (float32 itself is required later, with the parameter's name).
        if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or dtype.itemsize > 16:
            raise CheckpointError(f"an array of dtype {dtype!r}; official NFNet checkpoints "
                                  "hold float32 arrays only")
        if not isinstance(data, bytes):
            raise CheckpointError("an array whose data is not a byte string")
        declared = math.prod(shape) * dtype.itemsize
        if declared != len(data):
            raise CheckpointError(
                f"an array declares shape {shape} ({declared:,} bytes of {dtype}) but the file "
                f"holds {len(data):,} bytes for it; damaged or crafted, refused before "
                "allocating it")
        array = _numpy_multiarray()._reconstruct(np.ndarray, (0,), b"b")
        array.__setstate__(state)
        self.array = array


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _PendingArray:
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') followed by __setstate__;
    # any other shape here would allocate memory the file does not pay for.
    if cls is not _NDARRAY or shape != (0,):
        raise CheckpointError(f"refusing _reconstruct({shape!r}): official NFNet checkpoints "
                              "only reconstruct empty arrays and fill them from the file")
    return _PendingArray()


def _scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" \
            or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise CheckpointError("a NumPy scalar that is not one plain number")
    return _numpy_multiarray().scalar(dtype, data)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _reconstruct
        allowed[(module, "scalar")] = _scalar
    # Haiku's containers pickle as a call of the class on a plain dict, so dict rebuilds them.
    for module in ("haiku._src.data_structures", "haiku.data_structures"):
        for name in ("FlatMapping", "FlatMap", "frozendict"):
            allowed[(module, name)] = dict
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _OfficialUnpickler(pickle.Unpickler):
    """Unpickler that can only build NumPy arrays, dtypes, scalars and plain dicts."""

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.source}: refusing to load the global '{module}.{name}': this file is "
                "not an official NFNet checkpoint (those reference only NumPy arrays and Haiku "
                "mappings). Nothing from it was imported or run."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(
            f"{self.source}: the pickle uses persistent ids, which official NFNet checkpoints "
            "never do; refusing to load it"
        )


def read_official_checkpoint(path: PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Read a DeepMind ``F{k}_haiku.npz`` file safely, without JAX, Haiku or dill.

    Returns ``{module_path: {param_name: float32 ndarray}}`` as plain dicts. Raises
    FileNotFoundError for a missing file and CheckpointError for anything that is not an
    official checkpoint: a global outside the allow-list, a truncated or non-pickle file, or
    a structure other than a two-level mapping of float32 arrays.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file not found: {path}{missing_hint(path)}") from None
    with f:
        try:
            tree = _OfficialUnpickler(f, path).load()
        except CheckpointError as err:
            if str(path) in str(err):
                raise
            raise CheckpointError(f"{path}: {err}") from None
        except Exception as err:  # untrusted bytes can fail in many ways; report them alike
            raise CheckpointError(
                f"{path} cannot be read as an official NFNet checkpoint: truncated or not a "
                f"pickle, or built differently ({type(err).__name__}: {err})"
            ) from err
    return _validate_tree(_resolve_arrays(tree), path)


def _resolve_arrays(obj: Any, depth: int = 0) -> Any:
    """Replace each ``_PendingArray`` by its array, in the dicts and lists of the tree."""
    if isinstance(obj, _PendingArray):
        if obj.array is None:
            raise CheckpointError("an array that was never filled (no __setstate__)")
        return obj.array
    if depth > 4:  # official trees are two levels deep
        return obj
    if isinstance(obj, dict):
        return {k: _resolve_arrays(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve_arrays(v, depth + 1) for v in obj]
    return obj


def _validate_tree(tree: Any, path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Check the unpickled object is ``{str: {str: float32 ndarray}}`` and copy it into dicts."""
    if isinstance(tree, int) and tree == _TORCH_LEGACY_MAGIC:
        raise CheckpointError(
            f"{path} is a legacy torch.save file, not an official NFNet checkpoint; "
            "read it with torch.load(..., weights_only=True)"
        )
    if not isinstance(tree, Mapping):
        raise CheckpointError(
            f"{path}: expected a mapping of module paths at the top level, found "
            f"{type(tree).__name__}; not an official NFNet checkpoint"
        )
    if not tree:
        raise CheckpointError(f"{path}: the checkpoint holds no modules")
    result: dict[str, dict[str, np.ndarray]] = {}
    for module, params in tree.items():
        if not isinstance(module, str):
            raise CheckpointError(f"{path}: module key {module!r} is a {type(module).__name__}, "
                                  "expected a str")
        if not isinstance(params, Mapping):
            raise CheckpointError(f"{path}: module {module!r} holds a {type(params).__name__}, "
                                  "expected a mapping of parameters")
        if not params:
            raise CheckpointError(f"{path}: module {module!r} holds no parameters (an empty "
                                  "mapping); the file is damaged or not an official checkpoint")
        result[module] = {name: _validate_array(value, path, module, name)
                          for name, value in params.items()}
    return result


def _validate_array(value: Any, path: Path, module: str, name: Any) -> np.ndarray:
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: parameter key {name!r} of {module!r} is a "
                              f"{type(name).__name__}, expected a str")
    if isinstance(value, np.generic):  # a 0-d value stored as a NumPy scalar
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise CheckpointError(f"{path}: {module}/{name} is a {type(value).__name__}, expected a "
                              "float32 NumPy array")
    if value.dtype != np.float32:
        raise CheckpointError(f"{path}: {module}/{name} has dtype {value.dtype}, expected "
                              "float32 (official checkpoints store float32 little-endian)")
    return value


# --------------------------------------------------------------------------------------------
# Official names → ours (deepmind-research nfnets/nfnet.py, base.py: the Haiku module names)
# --------------------------------------------------------------------------------------------

# Haiku root module → (our family, Haiku name of its blocks).
_OFFICIAL_ROOTS = {
    "NFNet": ("nfnet", "nf_block"),
    "NF_ResNet": ("nf_resnet", "nf_res_block"),
    "NF_RegNet": ("nf_regnet", "nf_block"),
}
_TOP_LEVEL_MODULES = {
    **{f"stem_conv{k}": f"stem.conv{k}" for k in range(4)},
    "initial_conv": "stem.conv",
    "final_conv": "final_conv",
    "linear": "fc",
}
# Sub-modules of a block ("" = the block itself, which owns skip_gain). Haiku numbers unnamed
# modules per scope, so the SE's two Linears are "linear" and "linear_1".
_BLOCK_MODULES = {
    "": "",
    **{name: name for name in ("conv0", "conv1", "conv1b", "conv2", "conv_shortcut")},
    "squeeze_excite/~/linear": "se.fc0",
    "squeeze_excite/~/linear_1": "se.fc1",
}
_PARAM_NAMES = {"w": "weight", "b": "bias", "bias": "bias", "gain": "gain",
                "skip_gain": "skip_gain"}
# HWIO conv kernels → OIHW; (in, out) Linear weights → (out, in).
_WEIGHT_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}


def _our_module_name(rest: str, block_name: str) -> str | None:
    """Our module name for a Haiku path below the root (``None`` if it is not one of ours)."""
    if rest in _TOP_LEVEL_MODULES:
        return _TOP_LEVEL_MODULES[rest]
    head, _, tail = rest.partition("/~/")
    # The first block is unnumbered, then _1, _2, … (Haiku's per-scope numbering).
    match = re.fullmatch(rf"{block_name}(?:_([1-9]\d*))?", head)
    if match is None or tail not in _BLOCK_MODULES:
        return None
    block = f"blocks.{int(match.group(1) or 0)}"
    return f"{block}.{_BLOCK_MODULES[tail]}" if tail else block


def _official_params(tree: Mapping[str, Mapping[str, np.ndarray]]
                     ) -> tuple[str, Iterator[tuple[str, np.ndarray, tuple[int, ...] | None]]]:
    """The family and an iterator of (our key, array, axes permutation or None)."""
    roots = {module.split("/~/", 1)[0] for module in tree}
    if len(roots) != 1 or not roots <= _OFFICIAL_ROOTS.keys():
        raise CheckpointError(
            f"expected one official root module out of {sorted(_OFFICIAL_ROOTS)}, found "
            f"{sorted(roots)[:5]}"
        )
    root = roots.pop()
    family, block_name = _OFFICIAL_ROOTS[root]

    def items() -> Iterator[tuple[str, np.ndarray, tuple[int, ...] | None]]:
        for module, params in tree.items():
            ours = _our_module_name(module.partition("/~/")[2], block_name)
            if ours is None:
                raise CheckpointError(f"unexpected module {module!r} in an official {root} "
                                      "checkpoint")
            for name, array in params.items():
                if name not in _PARAM_NAMES:
                    raise CheckpointError(f"unexpected parameter {name!r} in module {module!r}")
                axes = None
                if name == "w":
                    if array.ndim not in _WEIGHT_AXES:
                        raise CheckpointError(f"{module}/w has shape {array.shape}; expected a "
                                              "4-d conv kernel or a 2-d Linear weight")
                    axes = _WEIGHT_AXES[array.ndim]
                yield f"{ours}.{_PARAM_NAMES[name]}", array, axes

    return family, items()


def _unique(pairs: Iterator[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise CheckpointError(f"two official entries map to the same key {key!r}")
        out[key] = value
    return out


def official_to_state_dict(tree: Mapping[str, Mapping[str, np.ndarray]]
                           ) -> tuple[str, dict[str, torch.Tensor]]:
    """Convert an official tree to ``(family, state_dict)`` in our naming and layouts.

    ``family`` is ``'nfnet'``, ``'nf_resnet'`` or ``'nf_regnet'``. Conv kernels become OIHW,
    Linear weights (out, in), all contiguous; the raw (un-standardised) weights are kept.
    """
    family, params = _official_params(tree)

    def convert(array: np.ndarray, axes: tuple[int, ...] | None) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        return tensor if axes is None else tensor.permute(axes).contiguous()

    return family, _unique((key, convert(array, axes)) for key, array, axes in params)


# --------------------------------------------------------------------------------------------
# Variant detection from a state dict's keys and shapes
# --------------------------------------------------------------------------------------------


def _variant_index() -> dict[tuple[str, tuple[int, ...], int | None], str]:
    """(family, stage depths, final_conv input width or None) → our model name."""
    from .models.variants import NF_REGNET_VARIANTS, NF_RESNET_DEPTHS, NFNET_VARIANTS

    index: dict[tuple[str, tuple[int, ...], int | None], str] = {}
    for key, row in NFNET_VARIANTS.items():
        # F and F+ share depths; the final conv reads the last stage's width (1536 vs 2048).
        name = "nfnet_" + key.lower().replace("+", "_plus")
        index[("nfnet", row.depths, row.widths[-1])] = name
    for key, row in NF_REGNET_VARIANTS.items():
        index[("nf_regnet", row.depths, None)] = f"nf_regnet_{key.lower()}"
    for depth, depths in NF_RESNET_DEPTHS.items():
        index[("nf_resnet", depths, None)] = f"nf_resnet{depth}"
    return index


def _family_of(shapes: Mapping[str, tuple[int, ...]]) -> str:
    if "stem.conv0.weight" in shapes:
        return "nfnet"
    if "stem.conv.weight" in shapes:
        return "nf_regnet" if "final_conv.weight" in shapes else "nf_resnet"
    raise CheckpointError("no stem found (neither stem.conv0.weight nor stem.conv.weight); "
                          "not an NFNet, NF-ResNet or NF-RegNet state dict")


def _stage_depths(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Blocks per stage, from which blocks have a shortcut conv (each stage's first block)."""
    blocks = sorted({int(m.group(1)) for key in shapes
                     if (m := re.match(r"blocks\.(\d+)\.", key))})
    if blocks != list(range(len(blocks))) or not blocks:
        raise CheckpointError(f"block indices are not 0..N-1: found {blocks[:20]}")
    starts = [i for i in blocks if f"blocks.{i}.conv_shortcut.weight" in shapes]
    if not starts or starts[0] != 0:
        raise CheckpointError("the first block has no shortcut conv; unknown layout")
    return tuple(end - start for start, end in zip(starts, starts[1:] + [len(blocks)],
                                                    strict=True))


def detect_variant(shapes: Mapping[str, Any], family: str | None = None) -> str:
    """Our model name for a state dict (in our naming) or a mapping of key → shape.

    Uses the stem (family), the stage depths (blocks with a shortcut conv start a stage) and,
    for NFNets, the final conv's input width ('+' variants: 2048 instead of 1536).
    """
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    family = family or _family_of(shapes)
    depths = _stage_depths(shapes)
    final_in = shapes.get("final_conv.weight", (None, None))[1] if family == "nfnet" else None
    name = _variant_index().get((family, depths, final_in))
    if name is None:
        found = f"stage depths {list(depths)}" + (
            f", final_conv input width {final_in}" if final_in is not None else "")
        raise CheckpointError(f"no {family} variant has {found}")
    return name


# --------------------------------------------------------------------------------------------
# Checking a state dict against a model
# --------------------------------------------------------------------------------------------

_MAX_LISTED = 10


def _is_classifier_key(model: nn.Module) -> Callable[[str], bool]:
    """Predicate for the classifier's keys, by the head's module name (``fc``): it also
    matches a file's classifier when the model's head was removed (an nn.Identity)."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if get_classifier is not None else None
    prefix = next((name + "." for name, module in model.named_modules() if module is head),
                  None)
    return lambda key: prefix is not None and key.startswith(prefix)


def _describe_file(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, Any]) -> str:
    """What the file looks like, for error messages (empty if it cannot be told)."""
    name = metadata.get("model_name")
    if name is not None:
        kwargs = metadata["model_kwargs"]
    else:
        try:
            name = detect_variant(shapes)
        except CheckpointError:
            return ""
        kwargs = {"num_classes": _num_classes(shapes)}
    args = ", ".join([repr(name), *(f"{k}={v!r}" for k, v in kwargs.items())])
    return f" The file looks like {name}: nfnets.create_model({args}) fits it."


def _num_classes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Output size of the classifier ``fc`` in a key → shape mapping (0 if it has none)."""
    return shapes.get("fc.weight", (0,))[0]


def _natural(key: str) -> list[Any]:
    """Sort key that puts blocks.2 before blocks.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _check_fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Any,
                metadata: Mapping[str, Any], skip_classifier: bool) -> None:
    """Raise CheckpointError naming the offending keys unless ``state_dict`` fits ``model``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    is_head = _is_classifier_key(model)
    if skip_classifier:
        expected = {k: v for k, v in expected.items() if not is_head(k)}
        found = {k: v for k, v in found.items() if not is_head(k)}
    missing = sorted(expected.keys() - found.keys(), key=_natural)
    unexpected = sorted(found.keys() - expected.keys(), key=_natural)
    wrong = sorted((k for k in expected.keys() & found.keys() if expected[k] != found[k]),
                   key=_natural)
    if not (missing or unexpected or wrong):
        return
    model_name = getattr(model, "model_name", "") or type(model).__name__
    if all(map(is_head, missing + unexpected + wrong)):
        raise CheckpointError(
            f"{source}: only the classifier differs: the file has {_num_classes(found)} "
            f"classes, {model_name} has {_num_classes(expected)}. Build the model with "
            f"num_classes={_num_classes(found)} to use the file as is, or fine-tune: "
            "load_pretrained(..., skip_classifier=True) (the CLI's --init-from) loads "
            "everything but the classifier, which keeps its fresh initialisation."
        )
    lines = ([f"  missing from the file: {k} {expected[k]}" for k in missing]
             + [f"  not in the model: {k} {found[k]}" for k in unexpected]
             + [f"  shape: {k} is {found[k]} in the file, {expected[k]} in the model"
                for k in wrong])
    more = f"\n  ... and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    raise CheckpointError(
        f"{source} does not fit {model_name} ({len(missing)} missing, {len(unexpected)} "
        f"unexpected, {len(wrong)} wrong-shape keys).{_describe_file(found, metadata)}\n"
        + "\n".join(lines[:_MAX_LISTED]) + more
    )


# --------------------------------------------------------------------------------------------
# Our safetensors format
# --------------------------------------------------------------------------------------------

_FORMAT = "nfnets"
_FORMAT_VERSION = "1"
_RESERVED_METADATA = ("format", "format_version", "model_name", "model_kwargs")


def _model_metadata(model: nn.Module, extra: Mapping[str, Any] | None) -> dict[str, str]:
    name = getattr(model, "model_name", "")
    kwargs = getattr(model, "model_kwargs", None)
    if not name or kwargs is None:
        raise ValueError(f"{type(model).__name__} has no model_name/model_kwargs; only models "
                         "built by nfnets.create_model can be saved with their architecture")
    try:
        kwargs_json = json.dumps(kwargs, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"model_kwargs of {name} are not JSON-serialisable: {err}") from None
    metadata = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "model_name": name,
                "model_kwargs": kwargs_json}
    for key, value in (extra or {}).items():
        if key in _RESERVED_METADATA:
            raise ValueError(f"extra_metadata may not override {key!r}")
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return metadata


def _write_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                       path: PathLike) -> None:
    """Write a safetensors file atomically (see ``nfnets.files.atomic_write``)."""
    metadata = with_digest(tensors, metadata)  # verified on load (nfnets.integrity)
    atomic_write(path, lambda tmp: safetensors.torch.save_file(dict(tensors), tmp,
                                                               metadata=dict(metadata)))


def save_weights(model: nn.Module, path: PathLike,
                 extra_metadata: Mapping[str, Any] | None = None) -> None:
    """Save ``model``'s state dict as safetensors, with what ``load_weights`` needs to rebuild it.

    ``extra_metadata`` values are stored as strings (non-strings as JSON). The write is atomic:
    an interrupted save leaves any previous file at ``path`` intact.
    """
    model = unwrap(model)
    metadata = _model_metadata(model, extra_metadata)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _write_safetensors(tensors, metadata, path)


def _read_safetensors_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except safetensors.SafetensorError as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def read_weights_metadata(path: PathLike) -> dict[str, Any]:
    """The metadata of a weights file written by ``save_weights``, ``model_kwargs`` parsed."""
    path = Path(path)
    return _parse_metadata(_read_safetensors_metadata(path), path)


def _parse_metadata(raw: Mapping[str, str], path: Path) -> dict[str, Any]:
    metadata: dict[str, Any] = dict(raw)
    if metadata.get("format") != _FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file without nfnets metadata, so the architecture is "
            "unknown: build the model yourself and use nfnets.weights.load_pretrained(model, "
            "path)"
        )
    try:
        metadata["model_kwargs"] = json.loads(metadata["model_kwargs"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: damaged nfnets metadata (model_kwargs: {err})") from None
    if "model_name" not in metadata:
        raise CheckpointError(f"{path}: damaged nfnets metadata (no model_name)")
    return metadata


def load_weights(path: PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved by ``save_weights`` (architecture from the metadata) and load it."""
    from . import create_model

    metadata = read_weights_metadata(path)
    # Built on the meta device, the model costs no memory and no initialisation (seconds for
    # the large NFNets); assign=True then adopts the loaded tensors as its parameters.
    with torch.device("meta"):
        model = create_model(metadata["model_name"], **metadata["model_kwargs"])
    state_dict = safetensors.torch.load_file(str(path), device=str(torch.device(map_location)))
    verify_tensors(state_dict, _read_safetensors_metadata(Path(path)), path)
    _check_fits(model, state_dict, path, metadata, skip_classifier=False)
    model.load_state_dict(state_dict, assign=True)
    return model


# --------------------------------------------------------------------------------------------
# Reading weights from any source: one sniffer, one reader per format
# --------------------------------------------------------------------------------------------

# The weights files nfnets.train writes into a run directory: raw and EMA.
RUN_WEIGHTS = {False: "model.safetensors", True: "model_ema.safetensors"}
_IMAGENET_NUM_CLASSES = 1000


@dataclass
class _Source:
    """What a weights source holds: a state dict in our naming, and what is known about it."""

    state_dict: dict[str, torch.Tensor]
    path: Path  # the file actually read (a run directory resolves to one of its files)
    ema: bool  # whether these are the EMA weights of a training run
    model_name: str | None = None  # recorded by the file; None when it must be detected
    model_kwargs: dict[str, Any] | None = None
    family: str | None = None  # official files name their family by their root module
    # Facts for inference (classes, test_size, data, seed), first mapping that has one wins.
    facts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metadata(self) -> dict[str, Any]:
        """The recorded architecture, in ``read_weights_metadata``'s shape (for messages)."""
        if self.model_name is None:
            return {}
        return {"model_name": self.model_name, "model_kwargs": self.model_kwargs or {}}


def _sniff(path: Path) -> str:
    """The format of a weights file by its first bytes: suffixes lie (F*_haiku.npz is a pickle).

    ``'torch'`` (torch.save's zip archive), ``'official'`` (a pickle, protocol >= 2: DeepMind's
    released files) or ``'safetensors'`` (a little-endian u64 header length, then JSON).
    """
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}{missing_hint(path)}")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    # Before the pickle test: a safetensors header length can start with 0x80 too (a header
    # of 128 + 256k bytes), so its own shape decides: a '{' after a length the file can hold.
    if len(head) >= 9 and head[8:9] == b"{" and (
            int.from_bytes(head[:8], "little") <= path.stat().st_size - 8):
        return "safetensors"
    if head.startswith(b"\x80"):
        return "official"
    raise CheckpointError(
        f"{path}: unrecognised weights file (first bytes {head[:8]!r}); expected an official "
        "NFNet pickle (F*_haiku.npz), an nfnets .safetensors file, a torch state dict or an "
        "nfnets training checkpoint"
    )


def _read_official(path: Path, check: Callable[[str, dict[str, torch.Tensor]], None] | None = None
                   ) -> tuple[str, dict[str, torch.Tensor], str | None]:
    """(family, state dict in our naming, MD5 for a file named like a release) of an official
    file: the one loader behind ``load_pretrained``, ``load_model`` and ``convert_official``.

    ``check(family, declared)`` sees the converted state dict's keys and shapes as meta
    tensors before anything is converted: layouts are only copied once they fit the target.
    """
    md5 = _check_release_md5(path)
    tree = read_official_checkpoint(path)  # every array backed by bytes the file holds
    if check is not None:
        check(*_declared_state_dict(tree))
    family, state_dict = _convert_releasing(tree)
    return family, state_dict, md5


def _convert_releasing(tree: dict[str, dict[str, np.ndarray]]
                       ) -> tuple[str, dict[str, torch.Tensor]]:
    """``official_to_state_dict`` that drops each array from ``tree`` once it is converted.

    The permuted copies and the file's arrays then never coexist in full: loading peaks near
    the file's size plus the largest tensor, instead of twice the file's size.
    """
    family, params = _official_params(tree)
    plan = _unique((key, axes) for key, _, axes in params)  # names checked, nothing copied
    order = [(module, name) for module, names in tree.items() for name in names]
    state_dict = {}
    for (key, axes), (module, name) in zip(plan.items(), order, strict=True):
        tensor = torch.from_numpy(tree[module].pop(name))
        state_dict[key] = tensor if axes is None else tensor.permute(axes).contiguous()
        del tensor  # the source array goes with its last reference
    return family, state_dict


def _declared_state_dict(tree: Mapping[str, Mapping[str, np.ndarray]]
                         ) -> tuple[str, dict[str, torch.Tensor]]:
    """(family, {our key: meta tensor of the converted shape}): no memory, no copy."""
    family, params = _official_params(tree)
    return family, _unique(
        (key, torch.empty(array.shape if axes is None else tuple(array.shape[a] for a in axes),
                          device="meta"))
        for key, array, axes in params)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _load_torch_file(path: Path) -> Any:
    """The object in a torch.save zip archive, unpickled with ``weights_only=True``."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as err:
        raise CheckpointError(f"{path}: damaged zip archive ({err})") from err
    if not any(name.endswith("/data.pkl") for name in names):
        raise CheckpointError(
            f"{path} is a zip archive but not a torch checkpoint (a real NumPy .npz?). "
            "DeepMind's F*_haiku.npz files are pickles despite the suffix; this one is not."
        )
    if manifest_path(path).exists():  # a training checkpoint with its SHA-256 manifest
        verify_checkpoint(path)
    return load_torch_archive(path)  # stored members only; torch's advice to unpickle dropped


def _read_config(run_dir: Path) -> dict[str, Any]:
    """A run's config.json, or {} when there is none (e.g. a checkpoint copied elsewhere)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err})") from None
    return config if isinstance(config, dict) else {}


def _json_value(value: Any) -> Any:
    """save_weights stores non-string extra metadata as JSON and strings as they are."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _our_names(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """A foreign state dict in our names: timm's dm_nfnet layout is mapped exactly
    (nfnets.timm_compat); any other is returned as it is, for the key check."""
    return from_timm_state_dict(state_dict, path) if is_timm_state_dict(state_dict) \
        else state_dict


def _read_sharded(path: Path, ema: bool | None) -> _Source:
    """A sharded training checkpoint (``step_N.dcp``, an --fsdp run's), verified, then
    gathered into whole tensors in this process (no process group needed)."""
    return _training_checkpoint(load_checkpoint(path), path, ema)


def _read_torch(path: Path, ema: bool | None) -> _Source:
    """An nfnets training checkpoint (raw or EMA weights), or a plain torch state dict."""
    obj = _load_torch_file(path)
    if isinstance(obj, Mapping) and obj.get("model_name") and _is_state_dict(obj.get("model")):
        return _training_checkpoint(obj, path, ema)
    # {"model": ...}; timm's training checkpoints use "state_dict"
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and _is_state_dict(obj.get(wrapper)):
            obj = obj[wrapper]
            break
    if not _is_state_dict(obj):
        keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path} is a torch checkpoint but neither a plain state dict nor an nfnets "
            f"training checkpoint (found {keys}); save the model with "
            "nfnets.weights.save_weights"
        )
    if ema:
        raise CheckpointError(f"{path} holds a single set of weights; drop --ema")
    return _Source(_our_names(obj, path), path, False)


def _training_checkpoint(obj: Mapping[str, Any], path: Path, ema: bool | None) -> _Source:
    """The raw or EMA weights of an nfnets training checkpoint (file or sharded)."""
    averaged = obj.get("ema")
    averaged = averaged.get("module") if isinstance(averaged, Mapping) else None
    use_ema = bool(ema) or (ema is None and _is_state_dict(averaged))
    if use_ema and not _is_state_dict(averaged):
        raise CheckpointError(f"{path} holds no EMA weights; drop --ema")
    # in a run, RUN/checkpoints/step_*.pt: the run's config.json has the class names
    in_run = path.parent.name == "checkpoints"
    run_config = _read_config(path.parent.parent) if in_run else {}
    return _Source(averaged if use_ema else obj["model"], path, use_ema,
                   str(obj["model_name"]), dict(obj.get("model_kwargs") or {}),
                   facts=[run_config, obj.get("config") or {}])


def _read_safetensors(path: Path, ema: bool | None, config: dict[str, Any] | None = None
                      ) -> _Source:
    """A safetensors file: ours (architecture in the metadata) or foreign (keys only)."""
    if ema and path.name != RUN_WEIGHTS[True]:
        raise CheckpointError(
            f"{path} holds a single set of weights, so --ema does not apply: pass a run "
            "directory or a training checkpoint with --ema, or the run's "
            f"{RUN_WEIGHTS[True]} itself"
        )
    raw = _read_safetensors_metadata(path)
    state_dict = safetensors.torch.load_file(str(path))
    verify_tensors(state_dict, raw, path)  # the content SHA-256 save_weights recorded
    if raw.get("format") != _FORMAT:
        return _Source(_our_names(state_dict, path), path, bool(ema))
    metadata = _parse_metadata(raw, path)
    if config is None:
        # a run's weights file copied out of the run has no config beside it; others never do
        in_run = path.name in RUN_WEIGHTS.values()
        config = _read_config(path.parent) if in_run else {}
    extra = {key: _json_value(value) for key, value in metadata.items()}
    return _Source(state_dict, path, path.name == RUN_WEIGHTS[True], metadata["model_name"],
                   metadata["model_kwargs"], facts=[extra, config])


def _read_run(run: Path, ema: bool | None) -> _Source:
    """A finished run's safetensors, else (run still going) its newest checkpoint."""
    config = _read_config(run)
    for use_ema in ((True, False) if ema is None else (ema,)):
        if (run / RUN_WEIGHTS[use_ema]).is_file():
            return _read_safetensors(run / RUN_WEIGHTS[use_ema], use_ema, config)
    if ema and (run / RUN_WEIGHTS[False]).is_file():
        raise CheckpointError(f"run {run} has {RUN_WEIGHTS[False]} but no "
                              f"{RUN_WEIGHTS[True]}; drop --ema")
    checkpoints = list_checkpoints(run / "checkpoints")
    if checkpoints:
        # the newest that verifies (file or sharded); a damaged one is skipped with a warning
        # but left where it is: reading a run never changes it
        try:
            state = load_latest_checkpoint(run / "checkpoints", move_aside=False)
        except CheckpointError:
            newest = checkpoints[-1]
            if is_sharded_checkpoint(newest) or manifest_path(newest).exists():
                raise
            # none verifies and the newest has no digest at all (written before checkpoints
            # had one, or copied without it): read it as a checkpoint file given by name
            warnings.warn(f"{newest} has no {manifest_path(newest).name} to verify it against; "
                          "reading it unverified", CheckpointWarning, stacklevel=2)
            return _read_torch(newest, ema)
        if state is not None:
            return _training_checkpoint(state, Path(state["path"]), ema)
    raise CheckpointError(f"{run} holds no weights: expected a training run directory with "
                          f"{RUN_WEIGHTS[False]} or checkpoints/step_*.pt (or step_*.dcp)")



def _read_source(source: PathLike, ema: bool | None,
                 check: Callable[[str, dict[str, torch.Tensor]], None] | None = None) -> _Source:
    """Read any supported source. ``ema``: True (the EMA weights, an error if there are none),
    False (the raw weights) or None (the EMA weights when the source has them, else the raw)."""
    path = Path(source)
    if path.is_dir() and is_sharded_checkpoint(path):
        return _read_sharded(path, ema)
    if path.is_dir():
        return _read_run(path, ema)
    if not path.exists():
        raise FileNotFoundError(f"no such file or run directory: {path}{missing_hint(path)}")
    kind = _sniff(path)
    if kind == "torch":
        return _read_torch(path, ema)
    if kind == "safetensors":
        return _read_safetensors(path, ema)
    if ema:
        # DeepMind ship one set of weights per file and do not say if it is the EMA copy
        raise CheckpointError(f"{path} is an official checkpoint with a single set of weights; "
                              "drop --ema")
    family, state_dict, _ = _read_official(path, check)
    return _Source(state_dict, path, False, family=family, facts=[{"source_file": path.name}])


def load_pretrained(model: nn.Module, source: PathLike, *, skip_classifier: bool = False,
                    assign: bool = False, ema: bool | None = False) -> nn.Module:
    """Load weights from ``source`` into ``model`` (in place) and return it.

    ``source`` is a file of any supported format, recognised by content (an official DeepMind
    pickle, converted on the fly; a safetensors file, ours or any other with our key names; a
    torch zip archive holding a plain state dict, ``{"model": state_dict}`` or an nfnets
    training checkpoint, read with ``weights_only=True``) or a training run directory.
    ``ema`` picks a run's or training checkpoint's EMA weights (True), raw weights (False) or
    the EMA weights when there are any (None). Every key and shape is checked first; a
    mismatch raises CheckpointError naming the offending keys and the variant the file looks
    like. ``skip_classifier=True`` loads everything except the classifier, for fine-tuning on
    other classes. ``assign=True`` adopts the loaded tensors as the parameters (for a model
    built on the meta device).
    """
    target = unwrap(model)

    def fits(family: str, declared: dict[str, torch.Tensor]) -> None:
        _check_fits(target, declared, Path(source), {}, skip_classifier)

    loaded = _read_source(source, ema, check=fits)  # official files: checked before converting
    _check_fits(target, loaded.state_dict, loaded.path, loaded.metadata, skip_classifier)
    state_dict = loaded.state_dict
    if skip_classifier:
        is_head = _is_classifier_key(target)
        state_dict = {k: v for k, v in state_dict.items() if not is_head(k)}
    target.load_state_dict(state_dict, strict=not skip_classifier, assign=assign)
    return model


def official_model_kwargs(family: str, state_dict: Mapping[str, torch.Tensor]
                           ) -> dict[str, Any]:
    """The create_model options a state dict implies beyond its variant name."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    kwargs: dict[str, Any] = {"num_classes": _num_classes(shapes)}
    if family == "nf_resnet" and "blocks.0.se.fc0.weight" in state_dict:
        # NF-ResNets have SE only when asked (deepmind-research nfnets/nf_resnet.py: use_se)
        kwargs["use_se"] = True
    return kwargs


def _canonical_name(name: str) -> str:
    """Our spelling of a model name ('F0' -> 'nfnet_f0'); UsageError for unknown names."""
    from . import create_model

    with torch.device("meta"):  # only the name is needed: allocate nothing
        return create_model(name, num_classes=0).model_name


def _architecture(loaded: _Source, model_name: str | None) -> tuple[str, dict[str, Any]]:
    """The model name and create_model options of a source: recorded, else detected.

    ``model_name`` (the user's) must agree with a recorded or detected name; it decides alone
    only when the layout is unusual enough that detection fails.
    """
    wanted = None if model_name is None else _canonical_name(model_name)
    if loaded.model_name is not None:
        found = loaded.model_name
        kwargs = dict(loaded.model_kwargs or {})
    else:
        shapes = {k: tuple(v.shape) for k, v in loaded.state_dict.items()}
        family = loaded.family or _family_of(shapes)
        try:
            found = detect_variant(shapes, family)
        except CheckpointError:
            if wanted is None:
                raise
            found = wanted  # an unusual layout: the key check against model_name decides
        kwargs = official_model_kwargs(family, loaded.state_dict)
    if wanted is not None and wanted != found:
        raise CheckpointError(f"{loaded.path} holds {found} weights, not {wanted}; drop "
                              f"--model or pass --model {found}")
    return found, kwargs


def imagenet_classes() -> list[str]:
    """ImageNet's 1000 class names in label order (shipped with nfnets: nfnets.pretrained)."""
    return list(_shipped_imagenet_classes())


def _inference_info(model: nn.Module, loaded: _Source) -> dict[str, Any]:
    """What inference needs besides the model, from the source's metadata and run config."""
    from .models import model_defaults

    facts = loaded.facts

    def first(key: str) -> Any:
        return next((f[key] for f in facts if f.get(key) is not None), None)

    classes = first("classes")
    # official weights (read directly, or via `nfnets convert`, which records the source file)
    if classes is None and first("source_file") and model.num_classes == _IMAGENET_NUM_CLASSES:
        classes = imagenet_classes()
    train = first("train") or {}
    return {
        "classes": classes,
        "test_size": int(first("test_size") or model_defaults(model.model_name)["test_size"]),
        "source": str(loaded.path),
        "model_name": model.model_name,
        "ema": loaded.ema,
        "data": first("data"),
        # the digits demo's held-out split depends on the run's seed (nfnets.train)
        "seed": int(first("seed") or train.get("seed") or 0),
    }


def load_model(source: PathLike, *, model_name: str | None = None, ema: bool = False,
               map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Build the model that ``source`` holds and load it; return ``(model in eval mode, info)``.

    ``source`` is a training run directory (``model_ema.safetensors`` with ``ema``, else
    ``model.safetensors``; while the run has neither, its newest checkpoint that verifies,
    ``checkpoints/step_*.pt`` or a sharded ``step_*.dcp``), a sharded checkpoint directory, a
    ``.safetensors`` file (from ``save_weights``; a foreign one with our key names has its
    variant detected), a training checkpoint ``.pt``, a torch state dict, or DeepMind's
    ``F*_haiku.npz`` (variant detected from the file). ``model_name`` must agree with what the
    file records or what is detected.

    ``info``: ``classes`` (names in label order, or None when unknown; ImageNet's for official
    weights), ``test_size`` (the run's, else the variant's), ``source`` (the file read),
    ``model_name``, ``ema``, ``data`` (the run's data option, or None) and ``seed`` (the run's
    seed, which fixes the digits demo's held-out split).

    Raises FileNotFoundError for a missing path, UsageError for an unknown ``model_name`` and
    CheckpointError for a source that cannot be used (including ``ema=True`` on weights
    without an EMA copy).
    """
    from . import create_model

    loaded = _read_source(source, ema, check=_claimed_variant_check(Path(source), model_name))
    name, kwargs = _architecture(loaded, model_name)
    try:
        # Built on the meta device, the model costs no memory and no initialisation (seconds
        # for the large NFNets); assign=True then adopts the loaded tensors as its parameters.
        with torch.device("meta"):
            model = create_model(name, **kwargs)
    except UsageError as err:
        raise CheckpointError(f"{loaded.path}: cannot rebuild {name}: {err}") from None
    _check_fits(model, loaded.state_dict, loaded.path, loaded.metadata, skip_classifier=False)
    model.load_state_dict(loaded.state_dict, assign=True)
    return model.to(map_location).eval(), _inference_info(model, loaded)


def _claimed_variant_check(path: Path, model_name: str | None
                           ) -> Callable[[str, dict[str, torch.Tensor]], None]:
    """A ``_read_official`` check: the declared shapes fit the variant the tree claims (or
    ``model_name``), before any array is converted."""
    def check(family: str, declared: dict[str, torch.Tensor]) -> None:
        from . import create_model

        name, kwargs = _architecture(_Source(declared, path, False, family=family), model_name)
        with torch.device("meta"):
            model = create_model(name, **kwargs)
        _check_fits(model, declared, path, {}, skip_classifier=False)

    return check


def convert_checkpoint(src: PathLike, dst: PathLike, *, ema: bool = False) -> str:
    """Write the weights of a training run or checkpoint as our safetensors file; return the
    model name.

    ``src`` is what :func:`load_model` reads: a run directory (its final weights, else its
    newest good checkpoint), a checkpoint file, or a sharded ``step_N.dcp`` directory of an
    ``--fsdp`` run, gathered here in one process without a process group. ``ema`` picks the
    EMA weights. The file records the architecture, the class names, test size, data and
    seed the run had, and its content digest, like the weights a finished run writes.
    """
    model, info = load_model(src, ema=ema)
    extra = {key: info[key] for key in ("classes", "test_size", "data", "seed")
             if info[key] is not None}
    extra.update(converted_from=str(info["source"]), ema=bool(info["ema"]))
    save_weights(model, dst, extra)
    return model.model_name


def convert_official(src: PathLike, dst: PathLike, model_name: str | None = None) -> str:
    """Convert an official ``F{k}_haiku.npz`` file to our safetensors format; return the name.

    The variant is detected from the file; a given ``model_name`` must agree with it. The
    output records the source file name (and its MD5 for the known releases).
    """
    from . import create_model

    src = Path(src)
    if _sniff(src) != "official":
        raise CheckpointError(f"{src} is not an official NFNet checkpoint (a pickle such as "
                              "F0_haiku.npz)")
    family, state_dict, md5 = _read_official(src, _claimed_variant_check(src, model_name))
    loaded = _Source(state_dict, src, False, family=family)
    name, kwargs = _architecture(loaded, model_name)
    # Shapes are all the check needs: build on the meta device (no memory, no init cost).
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    _check_fits(model, state_dict, src, {}, skip_classifier=False)
    extra = {"source_file": src.name, **({"source_md5": md5} if md5 else {})}
    _write_safetensors(state_dict, _model_metadata(model, extra), dst)
    return model.model_name
