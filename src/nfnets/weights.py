"""Reading and writing NFNet weights: DeepMind's released checkpoints and our safetensors files.

DeepMind's ``F{k}_haiku.npz`` files are Python pickles (despite the suffix) of a two-level
mapping ``{haiku module path: {param name: float32 array}}`` (checkpoint-format.md §2). They
are read here with a restricted unpickler that can only rebuild NumPy arrays and Haiku's
mapping containers: no JAX, Haiku or dill is needed, and nothing named in the file is ever
imported or called beyond that allow-list (checkpoint-format.md §3).

Our own format is safetensors with metadata ``{"format": "nfnets", "model_name": ...,
"model_kwargs": <json>}``, enough to rebuild the model with ``nfnets.create_model``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from .checkpoint import manifest_path, verify_checkpoint
from .errors import CheckpointError
from .files import atomic_write
from .integrity import verify_tensors, with_digest
from .untrusted import load_torch_archive

__all__ = [
    "OFFICIAL_RELEASES",
    "CheckpointError",
    "OfficialRelease",
    "convert_official",
    "detect_official_variant",
    "detect_variant",
    "file_md5",
    "load_pretrained",
    "load_weights",
    "official_model_kwargs",
    "official_to_state_dict",
    "read_official_checkpoint",
    "read_weights_metadata",
    "save_weights",
    "verify_md5",
]

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# The released files (checkpoint-format.md §1, official.md §1.1 and §4.2)
# --------------------------------------------------------------------------------------------

_RELEASE_URL = "https://storage.googleapis.com/dm-nfnets/{variant}_haiku.npz"  # official README


@dataclass(frozen=True)
class OfficialRelease:
    """One of DeepMind's released ImageNet checkpoints and its published figures."""

    variant: str  # official name, e.g. "F0"
    model_name: str  # our model name, e.g. "nfnet_f0"
    md5: str  # third-party checksum, not published by DeepMind (checkpoint-format.md §1)
    top1: float  # README = paper Table 3; non-SAM rows are 3-seed means
    top5: float
    train_size: int
    test_size: int
    num_params: int  # checkpoint-format.md §4
    sam: bool  # F6 was trained with SAM (README "F6+SAM")

    @property
    def filename(self) -> str:
        """Name of the released file, e.g. ``F0_haiku.npz``."""
        return f"{self.variant}_haiku.npz"

    @property
    def url(self) -> str:
        """Download address of the released file."""
        return _RELEASE_URL.format(variant=self.variant)


OFFICIAL_RELEASES: dict[str, OfficialRelease] = {
    r.model_name: r
    for r in (
        OfficialRelease("F0", "nfnet_f0", "0a41039da1cb43adf47f1b7d86ddfe0f",
                        83.6, 96.8, 192, 256, 71_489_284, False),
        OfficialRelease("F1", "nfnet_f1", "c9126bbfaf855f9ddb7ff3b902558781",
                        84.7, 97.1, 224, 320, 132_634_256, False),
        OfficialRelease("F2", "nfnet_f2", "7a018d8d1498020e2f5a8719a1e7f53f",
                        85.1, 97.3, 256, 352, 193_779_228, False),
        OfficialRelease("F3", "nfnet_f3", "d8e1e78d26db659c486150dbaccbe78a",
                        85.7, 97.5, 320, 416, 254_924_200, False),
        OfficialRelease("F4", "nfnet_f4", "f5974a7e3388aa81b91a9f1403e759a4",
                        85.9, 97.6, 384, 512, 316_069_172, False),
        OfficialRelease("F5", "nfnet_f5", "8639e925de951030651ac775b9f915c3",
                        86.0, 97.6, 416, 544, 377_214_144, False),
        OfficialRelease("F6", "nfnet_f6", "b16cca40ac1ecec2bd5e3273866da0c1",
                        86.5, 97.9, 448, 576, 438_359_116, True),
    )
}
_RELEASES_BY_FILENAME = {r.filename: r for r in OFFICIAL_RELEASES.values()}


def file_md5(path: PathLike) -> str:
    """Hex MD5 of a file, read in chunks (the checksum is for integrity, not security)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: PathLike, expected: str) -> None:
    """Raise CheckpointError unless the file's MD5 is ``expected``."""
    actual = file_md5(path)
    if actual != expected.lower():
        raise CheckpointError(
            f"{path}: MD5 {actual} does not match the expected {expected}; the file is "
            "corrupt, incomplete or a different file; download it again"
        )


def _check_release_md5(path: Path) -> str | None:
    """MD5 of a file named like a release, warning if it differs from the listed checksum.

    A warning, not an error: the listed checksums come from a third party, and the loader is
    safe and validates every tensor whatever the checksum says. Other names are not hashed.
    """
    release = _RELEASES_BY_FILENAME.get(path.name)
    if release is None:
        return None
    md5 = file_md5(path)
    if md5 != release.md5:
        warnings.warn(
            f"{path}: MD5 {md5} does not match the expected {release.md5} of the released "
            f"{release.filename}; the download may be corrupt or incomplete (loading it anyway: "
            "its structure and every tensor are validated)", stacklevel=3)
    return md5


# --------------------------------------------------------------------------------------------
# Restricted unpickling (checkpoint-format.md §3)
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
        raise FileNotFoundError(f"checkpoint file not found: {path}") from None
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
# Official names → ours (checkpoint-format.md §4–§6)
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


def _official_shapes(tree: Mapping[str, Mapping[str, np.ndarray]]
                     ) -> tuple[str, dict[str, tuple[int, ...]]]:
    family, params = _official_params(tree)
    shapes = _unique(
        (key, array.shape if axes is None else tuple(array.shape[a] for a in axes))
        for key, array, axes in params
    )
    return family, shapes


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


def detect_official_variant(tree: Mapping[str, Mapping[str, np.ndarray]]) -> str:
    """Our model name (e.g. ``'nfnet_f0'``) for an official tree, from its keys and shapes."""
    family, shapes = _official_shapes(tree)
    return detect_variant(shapes, family)


# --------------------------------------------------------------------------------------------
# Checking a state dict against a model
# --------------------------------------------------------------------------------------------

_MAX_LISTED = 10


def _unwrap(model: nn.Module) -> nn.Module:
    """The nfnets model inside torch.compile / DataParallel / DDP wrappers."""
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


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
    model = _unwrap(model)
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
# Loading any supported file into a model
# --------------------------------------------------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _read_torch_archive(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict (or ``{"model": state_dict, ...}``) from a torch.save zip archive."""
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
    obj = load_torch_archive(path)  # stored members only, torch's advice rewritten
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("model")):
        obj = obj["model"]
    if not _is_state_dict(obj):
        keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path} is a torch checkpoint but not a plain state dict (found {keys}); resume "
            "training checkpoints with the training tools, or save the model with "
            "nfnets.weights.save_weights"
        )
    return obj


def _read_any(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict in our naming, metadata) of a file of any supported format, by its content."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return _read_torch_archive(path), {}
    if head.startswith(b"\x80"):  # pickle protocol >= 2: DeepMind's official files
        _check_release_md5(path)
        return official_to_state_dict(read_official_checkpoint(path))[1], {}
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
        raw = _read_safetensors_metadata(path)
        # A foreign safetensors file (no nfnets metadata) gets the key check only.
        metadata = _parse_metadata(raw, path) if raw.get("format") == _FORMAT else {}
        state_dict = safetensors.torch.load_file(str(path))
        verify_tensors(state_dict, raw, path)
        return state_dict, metadata
    raise CheckpointError(
        f"{path}: unrecognised weights file (first bytes {head[:8]!r}); expected an official "
        "NFNet pickle (F*_haiku.npz), an nfnets .safetensors file or a torch state dict"
    )


def load_pretrained(model: nn.Module, path: PathLike, *,
                    skip_classifier: bool = False, assign: bool = False) -> nn.Module:
    """Load weights from ``path`` into ``model`` (in place) and return it.

    The format is recognised by content: an official DeepMind pickle (converted on the fly),
    a safetensors file (ours or any other with our key names), or a torch zip archive holding a
    plain state dict (or ``{"model": state_dict}``), read with ``weights_only=True``. Every key
    and shape is checked first; a mismatch raises CheckpointError naming the offending keys
    and the variant the file looks like. ``skip_classifier=True`` loads everything except the
    classifier, for fine-tuning on other classes. ``assign=True`` adopts the loaded tensors as
    the parameters (for a model built on the meta device).
    """
    path = Path(path)
    target = _unwrap(model)
    state_dict, metadata = _read_any(path)
    _check_fits(target, state_dict, path, metadata, skip_classifier)
    if skip_classifier:
        is_head = _is_classifier_key(target)
        state_dict = {k: v for k, v in state_dict.items() if not is_head(k)}
    target.load_state_dict(state_dict, strict=not skip_classifier, assign=assign)
    return model


def official_model_kwargs(family: str, state_dict: Mapping[str, torch.Tensor]
                           ) -> dict[str, Any]:
    """The create_model options an official file implies beyond its variant name."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    kwargs: dict[str, Any] = {"num_classes": _num_classes(shapes)}
    if family == "nf_resnet" and "blocks.0.se.fc0.weight" in state_dict:
        kwargs["use_se"] = True  # NF-ResNets have SE only when asked (official.md §2.13)
    return kwargs


def convert_official(src: PathLike, dst: PathLike, model_name: str | None = None) -> str:
    """Convert an official ``F{k}_haiku.npz`` file to our safetensors format; return the name.

    The variant is detected from the file; a given ``model_name`` must agree with it. The
    output records the source file name (and its MD5 for the known releases).
    """
    from . import create_model

    src = Path(src)
    family, state_dict = official_to_state_dict(read_official_checkpoint(src))
    md5 = _check_release_md5(src)
    try:
        detected = detect_variant(state_dict, family)
    except CheckpointError:
        if model_name is None:
            raise
        detected = None  # an unusual layout: the key check against model_name decides
    # Shapes are all the check needs: build on the meta device (no memory, no init cost).
    with torch.device("meta"):
        model = create_model(model_name or detected,
                             **official_model_kwargs(family, state_dict))
    if detected is not None and model.model_name != detected:
        raise CheckpointError(f"{src} holds {detected} weights, not {model.model_name}")
    _check_fits(model, state_dict, src, {}, skip_classifier=False)
    extra = {"source_file": src.name, **({"source_md5": md5} if md5 else {})}
    _write_safetensors(state_dict, _model_metadata(model, extra), dst)
    return model.model_name

