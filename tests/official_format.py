"""Writing files exactly like DeepMind's released checkpoints (docs/weights.md).

A protocol-3 pickle of Haiku ``FlatMapping`` containers of float32 arrays, as
``deepmind-research nfnets/utils.py: load_haiku_file`` reads them with dill.

Shared by the tests of the weights reader, evaluation and the CLI. The inverse of the
official → ours mapping is written here independently of nfnets.weights.
"""

import pickle
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np

HAIKU_MODULES = ("haiku", "haiku._src", "haiku._src.data_structures")


@contextmanager
def fake_haiku():
    """A throwaway ``haiku._src.data_structures.FlatMapping`` that pickles like Haiku 0.0.3's
    (a call of the class on a plain dict), importable only inside the ``with`` block."""
    class FlatMapping(dict):
        def __reduce__(self):
            return FlatMapping, (dict(self),)

    FlatMapping.__module__ = "haiku._src.data_structures"
    FlatMapping.__qualname__ = "FlatMapping"
    modules = {name: types.ModuleType(name) for name in HAIKU_MODULES}
    modules["haiku._src.data_structures"].FlatMapping = FlatMapping
    assert not any(name in sys.modules for name in HAIKU_MODULES)
    sys.modules.update(modules)
    try:
        yield FlatMapping
    finally:
        for name in HAIKU_MODULES:
            del sys.modules[name]


def official_bytes(tree, *, old_numpy_spelling: bool = True, protocol: int = 3) -> bytes:
    with fake_haiku() as flat_mapping:
        data = pickle.dumps(
            flat_mapping({k: flat_mapping(v) for k, v in tree.items()}), protocol=protocol)
    if old_numpy_spelling:  # the 2021 files name NumPy 1's module
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return data


def write_official(path: Path, tree, **kwargs) -> Path:
    path.write_bytes(official_bytes(tree, **kwargs))
    return path


# Inverse of the official → ours mapping, written independently of nfnets.weights.
ROOTS = {"nfnet": ("NFNet", "nf_block"), "nf_resnet": ("NF_ResNet", "nf_res_block"),
          "nf_regnet": ("NF_RegNet", "nf_block")}


def official_module(prefix: str, family: str) -> str:
    root, block = ROOTS[family]
    parts = prefix.split(".")
    if parts[0] == "stem":
        name = "initial_conv" if parts[1] == "conv" else "stem_" + parts[1]
    elif parts[0] == "fc":
        name = "linear"
    elif parts[0] == "final_conv":
        name = "final_conv"
    else:
        assert parts[0] == "blocks", prefix
        index = int(parts[1])
        name = block if index == 0 else f"{block}_{index}"
        sub = ".".join(parts[2:])
        if sub:
            name += "/~/" + {"se.fc0": "squeeze_excite/~/linear",
                             "se.fc1": "squeeze_excite/~/linear_1"}.get(sub, sub)
    return f"{root}/~/{name}"


def to_official(state_dict, family: str):
    """Our state dict → the official tree (HWIO kernels, (in, out) Linears, w/b/gain names).

    Meta tensors become zero-stride float32 arrays of the right shape (no memory)."""
    tree: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in state_dict.items():
        prefix, param = key.rsplit(".", 1)
        if tensor.is_meta:
            array = np.broadcast_to(np.float32(0), tuple(tensor.shape))
        else:
            array = tensor.detach().numpy()
        is_linear = state_dict[f"{prefix}.weight"].ndim == 2 if param == "bias" else False
        if param == "weight":
            name = "w"
            array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
        elif param == "bias":
            name = "b" if is_linear else "bias"
        else:
            name = param
        if not tensor.is_meta:
            array = np.array(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        tree.setdefault(official_module(prefix, family), {})[name] = array
    return tree
