"""Tests of nfnets.weights: safe reading of DeepMind's checkpoints, conversion, our format.

Official-format files are written here the way the released ones are (docs/weights.md):
a protocol-3 pickle of Haiku ``FlatMapping`` containers holding float32 arrays. A fake
``haiku._src.data_structures`` module exists only while such a file is being written, so
every read happens without Haiku importable.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from official_format import ROOTS, fake_haiku, official_bytes, to_official, write_official

import nfnets
from nfnets.errors import UsageError
from nfnets.weights import (
    OFFICIAL_RELEASES,
    CheckpointError,
    convert_official,
    detect_variant,
    file_md5,
    load_model,
    load_pretrained,
    load_weights,
    official_to_state_dict,
    read_official_checkpoint,
    read_weights_metadata,
    save_weights,
)

# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def randomised(model):
    """Every parameter random (skip gains and NF-RegNet's classifier start at zero)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


@functools.cache
def _prototype(name: str, overrides: tuple):
    return nfnets.create_model(name, **dict(overrides))


def small_model(name: str = "nf_regnet_b0", **overrides):
    """A fresh copy of a small model (copying is much faster than initialising one)."""
    return copy.deepcopy(_prototype(name, tuple(sorted({"num_classes": 10, **overrides}.items()))))


def meta_model(name: str, **overrides):
    """A model without storage: enough for the key and shape checks that fail before loading."""
    with torch.device("meta"):
        return nfnets.create_model(name, **overrides)


def assert_same_state(a, b, skip: str | None = None):
    sa, sb = a.state_dict(), b.state_dict()
    if skip is not None:
        sa, sb = ({k: v for k, v in d.items() if not k.startswith(skip)} for d in (sa, sb))
    assert sa.keys() == sb.keys() and sa
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


TINY = {"NFNet/~/stem_conv0": {"w": np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3),
                               "gain": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)},
        "NFNet/~/nf_block": {"skip_gain": np.array(0.5, np.float32)}}


def assert_tiny_equal(tree):
    assert type(tree) is dict and all(type(v) is dict for v in tree.values())
    assert tree.keys() == TINY.keys()
    for module, params in TINY.items():
        assert tree[module].keys() == params.keys()
        for name, value in params.items():
            assert tree[module][name].dtype == np.float32
            np.testing.assert_array_equal(tree[module][name], value)


# ---------------------------------------------------------------------------------------------
# Reading official files safely
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("old_numpy_spelling", [True, False])
def test_reads_haiku_pickle_without_haiku(tmp_path, old_numpy_spelling):
    path = write_official(tmp_path / "F0_like.npz", TINY, old_numpy_spelling=old_numpy_spelling)
    data = path.read_bytes()
    assert data[:2] == b"\x80\x03" and b"haiku._src.data_structures\nFlatMapping" in data
    assert (b"cnumpy.core.multiarray\n_reconstruct" in data) == old_numpy_spelling
    assert importlib.util.find_spec("haiku") is None and "haiku" not in sys.modules
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. NumPy 2's numpy.core deprecation shim
        tree = read_official_checkpoint(path)
    assert_tiny_equal(tree)
    assert "haiku" not in sys.modules


def test_reads_plain_dicts_numpy_scalars_and_protocol_2(tmp_path):
    tree = {k: dict(v) for k, v in TINY.items()}
    tree["NFNet/~/nf_block"]["skip_gain"] = np.float32(0.5)  # a scalar, not a 0-d array
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(tree, protocol=2))  # bytes spelled via _codecs.encode
    assert b"_codecs\nencode" in path.read_bytes()
    got = read_official_checkpoint(path)
    assert_tiny_equal(got)
    assert isinstance(got["NFNet/~/nf_block"]["skip_gain"], np.ndarray)


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


def _malicious(kind: str, marker: Path) -> bytes:
    if kind == "os.system":
        return pickle.dumps(_System(f"touch {marker}"), protocol=3)
    if kind == "eval":
        return pickle.dumps(_Eval(f"open({str(marker)!r}, 'w')"), protocol=3)
    if kind == "nested":  # a valid container whose leaf runs code
        tree = {"NFNet/~/linear": {"w": _System(f"touch {marker}")}}
        return pickle.dumps(tree, protocol=3)
    if kind == "torch":
        return pickle.dumps({"NFNet/~/linear": {"w": torch.zeros(2)}}, protocol=3)
    if kind == "dill":  # dill's array wrapper: GLOBAL dill._dill _create_array, (), REDUCE
        return b"\x80\x03cdill._dill\n_create_array\n)R."
    if kind == "codec":  # _codecs.encode is allowed for latin1 only
        return b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, refused", [
    ("os.system", f"{os.system.__module__}.system"),
    ("eval", "builtins.eval"),
    ("nested", f"{os.system.__module__}.system"),
    ("torch", "torch."),
    ("dill", "dill._dill._create_array"),
    ("codec", "rot13"),
])
def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path, kind, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "F0_haiku.npz.evil"
    path.write_bytes(_malicious(kind, marker))
    with pytest.raises(CheckpointError) as info:
        read_official_checkpoint(path)
    assert refused in str(info.value)
    if kind != "codec":
        assert "not an official NFNet checkpoint" in str(info.value)
    assert not marker.exists()
    # load_pretrained sniffs the same file as an official pickle and refuses it the same way
    with pytest.raises(CheckpointError, match="refusing"):
        load_pretrained(torch.nn.Linear(2, 2), path)
    assert not marker.exists()


def test_persistent_ids_are_refused(tmp_path):
    class WithPid(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage0" if isinstance(obj, np.ndarray) else None

    path = tmp_path / "pid.pkl"
    with open(path, "wb") as f:
        WithPid(f, protocol=3).dump({"NFNet/~/linear": {"b": np.zeros(2, np.float32)}})
    with pytest.raises(CheckpointError, match="persistent ids"):
        read_official_checkpoint(path)


def test_container_rebuilt_through_state_is_refused_cleanly(tmp_path):
    """A FlatMapping pickled as __new__ + state (not a call on a dict) fails with a clear error."""
    with fake_haiku() as flat_mapping:
        class Stateful:
            pass

        Stateful.__module__, Stateful.__qualname__ = flat_mapping.__module__, "FlatMapping"
        sys.modules[flat_mapping.__module__].FlatMapping = Stateful
        container = Stateful()
        container.__dict__.update(_mapping={"b": np.zeros(2, np.float32)})
        data = pickle.dumps({"NFNet/~/linear": container}, protocol=3)
    path = tmp_path / "stateful.npz"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="cannot be read as an official NFNet checkpoint"):
        read_official_checkpoint(path)


@pytest.mark.parametrize("cut", [0, 1, 0.5, -1])
def test_truncated_file(tmp_path, cut):
    data = official_bytes(TINY)
    size = int(len(data) * cut) if isinstance(cut, float) else cut % len(data)
    path = tmp_path / "cut.npz"
    path.write_bytes(data[:size])
    with pytest.raises(CheckpointError, match="truncated or not a pickle"):
        read_official_checkpoint(path)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "F0_haiku.npz"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_official_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretrained(torch.nn.Linear(2, 2), path)


@pytest.mark.parametrize("tree, message", [
    ({"NFNet/~/linear": {"b": np.zeros(2, np.float64)}}, r"NFNet/~/linear/b has dtype float64"),
    ({"NFNet/~/linear": {"b": np.zeros(2, np.int32)}}, r"dtype int32"),
    ({"NFNet/~/linear": {"b": [0.0, 1.0]}}, r"NFNet/~/linear/b is a list"),
    ({"NFNet/~/linear": {}}, r"'NFNet/~/linear' holds no parameters"),
    ({"NFNet/~/linear": np.zeros(2, np.float32)}, r"holds a ndarray, expected a mapping"),
    ({7: {"b": np.zeros(2, np.float32)}}, r"module key 7 is a int"),
    ({}, r"holds no modules"),
    ([np.zeros(2, np.float32)], r"found list"),
])
def test_bad_structure_is_named(tmp_path, tree, message):
    path = tmp_path / "bad.npz"
    path.write_bytes(pickle.dumps(tree, protocol=3))
    with pytest.raises(CheckpointError, match=message):
        read_official_checkpoint(path)


def test_legacy_torch_file_gets_a_pointer(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"a": torch.zeros(1)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy torch.save"):
        read_official_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Conversion and variant detection
# ---------------------------------------------------------------------------------------------


def test_conversion_layouts():
    tree = {"NFNet/~/stem_conv0": TINY["NFNet/~/stem_conv0"],
            "NFNet/~/nf_block_3/~/squeeze_excite/~/linear_1": {
                "w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)},
            "NFNet/~/nf_block_3": {"skip_gain": np.array(0.5, np.float32)},
            "NFNet/~/linear": {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}}
    family, sd = official_to_state_dict(tree)
    assert family == "nfnet"
    assert set(sd) == {"stem.conv0.weight", "stem.conv0.gain", "stem.conv0.bias",
                       "blocks.3.se.fc1.weight", "blocks.3.se.fc1.bias", "blocks.3.skip_gain",
                       "fc.weight", "fc.bias"}
    w = sd["stem.conv0.weight"]
    assert w.shape == (3, 2, 1, 1) and w.is_contiguous()
    # OIHW[o, i, h, w] == HWIO[h, w, i, o]
    assert w[2, 1, 0, 0] == tree["NFNet/~/stem_conv0"]["w"][0, 0, 1, 2] == 5.0
    assert torch.equal(sd["blocks.3.se.fc1.weight"], torch.tensor([[0.0, 3], [1, 4], [2, 5]]))
    assert sd["blocks.3.skip_gain"].shape == () and sd["blocks.3.skip_gain"].item() == 0.5
    assert sd["fc.weight"].shape == (4, 3)


@pytest.mark.parametrize("tree, message", [
    ({"NFNet/~/nf_block_3/~/conv9": {"w": np.zeros((1, 1, 1, 1), np.float32)}},
     "unexpected module 'NFNet/~/nf_block_3/~/conv9'"),
    ({"NFNet/~/nf_res_block": {"skip_gain": np.zeros((), np.float32)}}, "unexpected module"),
    ({"NFNet/~/linear": {"scale": np.zeros(2, np.float32)}}, "unexpected parameter 'scale'"),
    ({"ResNet/~/linear": {"b": np.zeros(2, np.float32)}}, r"found \['ResNet'\]"),
    ({"NFNet/~/nf_block": {"skip_gain": np.zeros((), np.float32)},
      "NF_RegNet/~/nf_block": {"skip_gain": np.zeros((), np.float32)}}, "expected one"),
    ({"NFNet/~/linear": {"w": np.zeros(3, np.float32)}}, "4-d conv kernel or a 2-d"),
])
def test_unknown_layouts_are_named(tree, message):
    with pytest.raises(CheckpointError, match=message):
        official_to_state_dict(tree)


def tiny_tree(family: str, depths, final_in: int = 1):
    """An official-layout tree with 1-element tensors, except final_conv's input width."""
    root, block = ROOTS[family]

    def conv(c_in=1):
        return {"w": np.zeros((1, 1, c_in, 1), np.float32), "gain": np.ones(1, np.float32),
                "bias": np.zeros(1, np.float32)}

    linear = {"w": np.zeros((1, 1), np.float32), "b": np.zeros(1, np.float32)}
    tree = {f"{root}/~/stem_conv{k}": conv() for k in range(4)} if family == "nfnet" else {
        f"{root}/~/initial_conv": conv()}
    starts = np.cumsum([0, *depths[:-1]])
    convs = ["conv0", "conv1", "conv2"] + (["conv1b"] if family == "nfnet" else [])
    for i in range(sum(depths)):
        name = f"{root}/~/{block}" + (f"_{i}" if i else "")
        tree[name] = {"skip_gain": np.zeros((), np.float32)}
        tree.update({f"{name}/~/{c}": conv() for c in convs})
        if i in starts:
            tree[f"{name}/~/conv_shortcut"] = conv()
        if family != "nf_resnet":
            tree[f"{name}/~/squeeze_excite/~/linear"] = linear
            tree[f"{name}/~/squeeze_excite/~/linear_1"] = linear
    if family != "nf_resnet":
        tree[f"{root}/~/final_conv"] = conv(final_in)
    tree[f"{root}/~/linear"] = linear
    return tree


def _detect_official(tree):
    """Our model name for an official tree, as the loaders detect it."""
    with warnings.catch_warnings():  # the trees of meta models hold read-only NumPy views
        warnings.simplefilter("ignore", UserWarning)
        family, state_dict = official_to_state_dict(tree)
    return detect_variant(state_dict, family)


@pytest.mark.parametrize("family, depths, final_in, expected", [
    ("nfnet", (1, 2, 6, 3), 1536, "nfnet_f0"),
    ("nfnet", (2, 4, 12, 6), 2048, "nfnet_f1_plus"),
    ("nfnet", (7, 14, 42, 21), 1536, "nfnet_f6"),
    ("nfnet", (8, 16, 48, 24), 2048, "nfnet_f7_plus"),
    ("nf_resnet", (3, 4, 23, 3), 1, "nf_resnet101"),
    ("nf_resnet", (24, 24, 24, 24), 1, "nf_resnet288"),
    ("nf_regnet", (1, 3, 6, 6), 1, "nf_regnet_b0"),
    ("nf_regnet", (4, 11, 22, 22), 1, "nf_regnet_b8"),
])
def test_detect_variant_of_tiny_trees(family, depths, final_in, expected):
    tree = tiny_tree(family, depths, final_in)
    if family == "nfnet":  # official nfnet.py: 7 Haiku modules per block + 10 others
        assert len(tree) == 7 * sum(depths) + 10
    assert _detect_official(tree) == expected


@pytest.mark.parametrize("family, depths, final_in, message", [
    ("nfnet", (1, 2, 6, 3), 1024, "final_conv input width 1024"),
    ("nfnet", (1, 2, 5, 3), 1536, r"stage depths \[1, 2, 5, 3\]"),
    ("nf_regnet", (1, 1, 1, 1), 1, r"no nf_regnet variant has stage depths \[1, 1, 1, 1\]"),
])
def test_detect_variant_names_what_it_found(family, depths, final_in, message):
    with pytest.raises(CheckpointError, match=message):
        _detect_official(tiny_tree(family, depths, final_in))


def test_detect_variant_needs_contiguous_blocks():
    tree = tiny_tree("nf_regnet", (1, 3, 6, 6))
    block5 = "NF_RegNet/~/nf_block_5"
    tree = {m: p for m, p in tree.items() if m != block5 and not m.startswith(block5 + "/~/")}
    with pytest.raises(CheckpointError, match="block indices"):
        _detect_official(tree)


@pytest.mark.parametrize("name", nfnets.list_models())
def test_detect_every_model_from_its_official_layout(name):
    with torch.device("meta"):
        model = nfnets.create_model(name)
    family = nfnets.models.model_defaults(name)["family"]
    tree = to_official(model.state_dict(), family)
    assert _detect_official(tree) == name
    assert detect_variant(model.state_dict()) == name


def test_official_f0_layout_matches_the_reference():
    """Our F0 exported to the official layout matches the released F0 file, key by key."""
    with torch.device("meta"):
        model = nfnets.create_model("nfnet_f0")
    tree = to_official(model.state_dict(), "nfnet")
    assert len(tree) == 94
    assert sum(len(p) for p in tree.values()) == 233
    assert sum(a.size for p in tree.values() for a in p.values()) == 71_489_284
    expected = {
        ("NFNet/~/stem_conv3", "w"): (3, 3, 64, 128),
        ("NFNet/~/nf_block", "skip_gain"): (),
        ("NFNet/~/nf_block/~/conv_shortcut", "w"): (1, 1, 128, 256),
        ("NFNet/~/nf_block_1/~/conv1b", "w"): (3, 3, 128, 256),
        ("NFNet/~/nf_block_2/~/conv0", "w"): (1, 1, 512, 256),
        ("NFNet/~/nf_block_3/~/conv1", "w"): (3, 3, 128, 768),
        ("NFNet/~/nf_block_3/~/squeeze_excite/~/linear", "w"): (1536, 768),
        ("NFNet/~/nf_block_3/~/squeeze_excite/~/linear_1", "b"): (1536,),
        ("NFNet/~/nf_block_9/~/conv_shortcut", "w"): (1, 1, 1536, 1536),
        ("NFNet/~/final_conv", "gain"): (3072,),
        ("NFNet/~/linear", "w"): (3072, 1000),
    }
    for (module, param), shape in expected.items():
        assert tree[module][param].shape == shape, (module, param)
    shortcuts = sorted(m for m in tree if m.endswith("conv_shortcut"))
    assert shortcuts == [f"NFNet/~/nf_block{s}/~/conv_shortcut" for s in ("", "_1", "_3", "_9")]


@pytest.mark.parametrize("release", list(OFFICIAL_RELEASES.values()), ids=lambda r: r.variant)
def test_release_table_matches_the_models(release):
    with torch.device("meta"):
        model = nfnets.create_model(release.model_name)
    assert sum(p.numel() for p in model.parameters()) == release.num_params
    defaults = nfnets.models.model_defaults(release.model_name)
    assert (defaults["train_size"], defaults["test_size"]) == (release.train_size,
                                                               release.test_size)
    assert release.url.endswith(f"/dm-nfnets/{release.filename}")
    assert len(release.md5) == 32 and release.sam == (release.variant == "F6")


def test_md5(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"nfnets")
    assert file_md5(path) == "82bdcafad624262951a337a6a40f41ec"


# ---------------------------------------------------------------------------------------------
# load_pretrained / convert_official round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, family, overrides", [
    ("nf_regnet_b0", "nf_regnet", {}),
    ("nfnet_f0", "nfnet", {"width": 0.125, "group_width": 16}),
    ("nf_resnet50", "nf_resnet", {"width": 1, "use_se": True}),
])
def test_official_round_trip(tmp_path, name, family, overrides):
    torch.manual_seed(0)
    source = randomised(small_model(name, **overrides))
    path = write_official(tmp_path / "ckpt.npz", to_official(source.state_dict(), family))
    torch.manual_seed(1)
    target = small_model(name, **overrides)
    assert load_pretrained(target, path) is target
    assert_same_state(source, target)


def test_convert_official_then_load_weights(tmp_path):
    torch.manual_seed(0)
    source = randomised(small_model())
    src = write_official(tmp_path / "b0.npz", to_official(source.state_dict(), "nf_regnet"))
    dst = tmp_path / "b0.safetensors"
    assert convert_official(src, dst) == "nf_regnet_b0"
    metadata = read_weights_metadata(dst)
    assert metadata["model_name"] == "nf_regnet_b0"
    assert metadata["model_kwargs"] == {"num_classes": 10}
    assert metadata["source_file"] == "b0.npz" and "source_md5" not in metadata
    loaded = load_weights(dst)
    assert loaded.model_name == "nf_regnet_b0"
    assert_same_state(source, loaded)
    assert sorted(os.listdir(tmp_path)) == ["b0.npz", "b0.safetensors"]
    with pytest.raises(CheckpointError, match="holds nf_regnet_b0 weights, not nf_regnet_b1"):
        convert_official(src, tmp_path / "b1.safetensors", model_name="B1")
    assert not (tmp_path / "b1.safetensors").exists()
    assert convert_official(src, tmp_path / "b0.safetensors", model_name="B0") == "nf_regnet_b0"
    with pytest.raises(FileNotFoundError, match="F0_haiku.npz"):
        convert_official(tmp_path / "F0_haiku.npz", dst)


def test_known_release_name_with_wrong_md5_warns(tmp_path):
    source = small_model()
    src = write_official(tmp_path / "F0_haiku.npz", to_official(source.state_dict(), "nf_regnet"))
    with pytest.warns(UserWarning, match="does not match the expected 0a41039d"):
        convert_official(src, tmp_path / "out.safetensors")
    assert read_weights_metadata(tmp_path / "out.safetensors")["source_md5"] == file_md5(src)


@pytest.fixture(scope="module")
def b0_official(tmp_path_factory):
    """An official-format NF-RegNet-B0 (10 classes) file and the model it came from."""
    torch.manual_seed(0)
    model = randomised(small_model())
    path = tmp_path_factory.mktemp("b0") / "b0.npz"
    return write_official(path, to_official(model.state_dict(), "nf_regnet")), model


def test_wrong_variant_names_keys_and_the_file_variant(b0_official):
    path, _ = b0_official
    with pytest.raises(CheckpointError) as info:
        load_pretrained(meta_model("nf_regnet_b1", num_classes=10), path)
    message = str(info.value)
    assert "does not fit nf_regnet_b1" in message
    assert "looks like nf_regnet_b0: nfnets.create_model('nf_regnet_b0', num_classes=10)" in message
    # b1's second stage starts at block 2, b0's at block 1 (stage depths 2,4,7,7 vs 1,3,6,6)
    assert "missing from the file: blocks.2.conv_shortcut.weight (78, 36, 1, 1)" in message
    assert message.count("\n  ") <= 11  # at most 10 keys plus the "and N more" line
    assert "more" in message


def test_classifier_mismatch_suggests_num_classes_or_finetuning(b0_official):
    path, source = b0_official
    target = small_model()
    target.reset_classifier(5)
    fresh_fc = {k: v.clone() for k, v in target.fc.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_pretrained(target, path)
    message = str(info.value)
    assert "only the classifier differs: the file has 10 classes, nf_regnet_b0 has 5" in message
    assert "num_classes=10" in message and "--init-from" in message
    load_pretrained(target, path, skip_classifier=True)
    for key, value in target.state_dict().items():
        expected = fresh_fc[key[3:]] if key.startswith("fc.") else source.state_dict()[key]
        assert torch.equal(value, expected), key


def test_skip_classifier_into_a_headless_model(b0_official):
    path, source = b0_official
    target = small_model()
    target.reset_classifier(0)
    with pytest.raises(CheckpointError, match="the file has 10 classes, nf_regnet_b0 has 0"):
        load_pretrained(target, path)
    load_pretrained(target, path, skip_classifier=True)
    assert_same_state(target, source, skip="fc.")


def test_create_model_pretrained(b0_official):
    path, source = b0_official
    assert_same_state(source, nfnets.create_model("nf_regnet_b0", num_classes=10,
                                                  pretrained=path))


# ---------------------------------------------------------------------------------------------
# Our safetensors format and other containers
# ---------------------------------------------------------------------------------------------


def test_save_and_load_weights(tmp_path):
    torch.manual_seed(0)
    model = randomised(small_model(drop_rate=0.0))
    path = tmp_path / "m.safetensors"
    save_weights(model, path, extra_metadata={"epoch": 3, "note": "hello"})
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temp file left behind
    metadata = read_weights_metadata(path)
    assert metadata["format"] == "nfnets" and metadata["model_name"] == "nf_regnet_b0"
    assert metadata["model_kwargs"] == model.model_kwargs == {"num_classes": 10,
                                                              "drop_rate": 0.0}
    assert (metadata["epoch"], metadata["note"]) == ("3", "hello")
    loaded = load_weights(path)
    assert loaded.model_kwargs == model.model_kwargs and loaded.drop_rate == 0.0
    assert_same_state(model, loaded)
    # built on the meta device: every tensor must have been replaced by a loaded one
    assert all(t.device.type == "cpu" for t in [*loaded.parameters(), *loaded.buffers()])
    assert all(p.requires_grad for p in loaded.parameters())
    loaded.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-4, atol=1e-3)
    loaded.reset_classifier(3)
    assert loaded.fc.weight.device.type == "cpu"
    other = load_pretrained(small_model(drop_rate=0.0), path)
    assert_same_state(model, other)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = small_model()
    path = tmp_path / "m.safetensors"
    save_weights(model, path)
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_weights(randomised(model), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_save_weights_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="nfnets.create_model"):
        save_weights(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="may not override 'model_name'"):
        save_weights(small_model(), tmp_path / "x.safetensors", {"model_name": "x"})
    with pytest.raises(FileNotFoundError, match="missing"):
        save_weights(small_model(), tmp_path / "missing" / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_foreign_safetensors(tmp_path):
    model = randomised(small_model())
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="without nfnets metadata"):
        load_weights(path)
    assert_same_state(model, load_pretrained(small_model(), path))
    with pytest.raises(CheckpointError, match="looks like nf_regnet_b0"):
        load_pretrained(meta_model("nf_regnet_b2"), path)


def test_mismatch_with_our_file_names_its_model(tmp_path):
    path = tmp_path / "ours.safetensors"
    save_weights(small_model(drop_rate=0.0), path)
    with pytest.raises(CheckpointError, match=r"create_model\('nf_regnet_b0', drop_rate=0.0, "
                                              r"num_classes=10\) fits it"):
        load_pretrained(meta_model("nf_regnet_b2"), path)


def test_torch_archives(tmp_path):
    model = randomised(small_model())
    plain, wrapped, other = (tmp_path / n for n in ("plain.pt", "wrapped.pt", "other.pt"))
    torch.save(model.state_dict(), plain)
    torch.save({"model": model.state_dict(), "epoch": 4}, wrapped)
    torch.save({"optimizer": {"lr": 0.1}}, other)
    assert_same_state(model, load_pretrained(small_model(), plain))
    assert_same_state(model, load_pretrained(small_model(), wrapped))
    with pytest.raises(CheckpointError, match="neither a plain state dict nor an nfnets training"):
        load_pretrained(small_model(), other)


def _write_npz(path: Path) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a path
        np.savez(f, a=np.zeros(2))


@pytest.mark.parametrize("write, message", [
    (_write_npz, "not a torch checkpoint"),
    (lambda p: p.write_bytes(b"hello world, not weights"), "unrecognised weights file"),
    (lambda p: p.write_bytes(b""), "unrecognised weights file"),
    (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken"), "safetensors"),
])
def test_unrecognised_files(tmp_path, write, message):
    path = tmp_path / "weights.bin"
    write(path)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(small_model(), path)


@pytest.mark.slow
def test_full_f0_official_round_trip(tmp_path):
    """A full-size F0 file (≈286 MB, the released size) converts and loads exactly."""
    torch.manual_seed(0)
    source = randomised(nfnets.create_model("nfnet_f0"))
    tree = to_official(source.state_dict(), "nfnet")
    src = write_official(tmp_path / "F0.npz", tree)
    # the released F0_haiku.npz is 285,976,842 bytes (the official demo's download log)
    assert abs(src.stat().st_size - 285_976_842) < 50_000
    del tree
    dst = tmp_path / "nfnet_f0.safetensors"
    assert convert_official(src, dst) == "nfnet_f0"
    assert_same_state(source, load_weights(dst))


def test_create_model_pretrained_adopts_the_loaded_tensors(tmp_path):
    model = randomised(small_model("nf_regnet_b0")).eval()
    path = write_official(tmp_path / "B0_haiku.npz", to_official(model.state_dict(), "nf_regnet"))
    loaded = nfnets.create_model("nf_regnet_b0", num_classes=10, pretrained=path).eval()
    assert not any(p.is_meta for p in loaded.parameters())
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad
               for p in loaded.parameters())
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(CheckpointError, match="10 classes"):
        nfnets.create_model("nf_regnet_b0", num_classes=5, pretrained=path)


# ---------------------------------------------------------------------------------------------
# reset_classifier keeps the recorded config true
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [3, 0])
def test_reset_classifier_then_save_and_load_round_trips(tmp_path, num_classes):
    torch.manual_seed(0)
    model = randomised(small_model(drop_rate=0.0))
    model.reset_classifier(num_classes)
    assert model.model_kwargs == {"num_classes": num_classes, "drop_rate": 0.0}
    path = tmp_path / "fine_tuned.safetensors"
    save_weights(model, path)
    assert read_weights_metadata(path)["model_kwargs"]["num_classes"] == num_classes
    loaded = load_weights(path)
    assert loaded.num_classes == num_classes and loaded.model_kwargs == model.model_kwargs
    assert_same_state(model, loaded)
    # the class-level default of models not built by create_model is never touched
    assert type(model).model_kwargs == {}


# ---------------------------------------------------------------------------------------------
# load_model: every source through one reader
# ---------------------------------------------------------------------------------------------


def test_load_model_from_every_file_format(tmp_path, b0_official):
    official, source = b0_official
    state = source.state_dict()
    ours = tmp_path / "ours.safetensors"
    save_weights(source, ours)
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, foreign)
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": state, "note": "kept by a third-party loop"}, wrapped)
    for path in (official, ours, foreign, plain, wrapped):
        model, info = load_model(path)
        assert model.model_name == "nf_regnet_b0" and model.num_classes == 10, path
        assert not model.training and info["source"] == str(path) and not info["ema"]
        assert_same_state(source, model)
        with pytest.raises(CheckpointError, match="holds nf_regnet_b0 weights, not nf_regnet_b1"):
            load_model(path, model_name="B1")
    # the official file gets no ImageNet names: it has 10 classes, not 1000
    assert load_model(official)[1]["classes"] is None
    with pytest.raises(CheckpointError, match="single set of weights"):
        load_model(plain, ema=True)
    with pytest.raises(UsageError, match="unknown model 'nfnet_f9'"):
        load_model(ours, model_name="nfnet_f9")


def test_unrecognised_and_missing_sources(tmp_path):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"GIF89a not weights")
    for load in (load_model, lambda p: load_pretrained(small_model(), p)):
        with pytest.raises(CheckpointError, match="unrecognised weights file"):
            load(junk)
        with pytest.raises(FileNotFoundError, match="no such file or run directory: .*gone"):
            load(tmp_path / "gone.safetensors")


def test_load_pretrained_from_a_run_prefers_ema_only_when_asked(tmp_path):
    torch.manual_seed(0)
    raw, averaged = randomised(small_model()), randomised(small_model())
    run = tmp_path / "run"
    run.mkdir()
    save_weights(raw, run / "model.safetensors")
    for ema, expected in ((False, raw), (None, raw)):
        assert_same_state(load_pretrained(small_model(), run, ema=ema), expected)
    with pytest.raises(CheckpointError, match="no model_ema.safetensors; drop --ema"):
        load_pretrained(small_model(), run, ema=True)
    save_weights(averaged, run / "model_ema.safetensors")
    for ema, expected in ((False, raw), (None, averaged), (True, averaged)):
        assert_same_state(load_pretrained(small_model(), run, ema=ema), expected)


def test_training_checkpoint_ema_choice(tmp_path):
    torch.manual_seed(0)
    raw, averaged = randomised(small_model()), randomised(small_model())
    path = tmp_path / "step_00000004.pt"
    torch.save({"model": raw.state_dict(), "ema": {"module": averaged.state_dict()},
                "step": 4, "model_name": raw.model_name, "model_kwargs": raw.model_kwargs},
               path)
    assert_same_state(load_pretrained(small_model(), path), raw)
    assert_same_state(load_pretrained(small_model(), path, ema=None), averaged)
    model, info = load_model(path, ema=True)
    assert_same_state(model, averaged)
    assert info["ema"] and info["model_name"] == "nf_regnet_b0"
