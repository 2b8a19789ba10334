"""Evaluation, prediction and ``nfnets.weights.load_model`` as ``nfnets eval``/``predict`` use it.

Models are tiny NFNets whose classifier weight is zeroed, so the logits equal the classifier
bias for every image: the expected accuracy, loss and probabilities follow by hand.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from official_format import to_official
from PIL import Image

import nfnets
from nfnets.checkpoint import CheckpointWarning, manifest_path, write_manifest
from nfnets.cli import main
from nfnets.data import (
    DataError,
    EvalTransform,
    ImageFolderDataset,
    SkippedImageWarning,
    TensorImageDataset,
    digits_datasets,
    eval_loader,
    normalize,
)
from nfnets.evaluate import evaluate, predict, preprocess_image
from nfnets.files import sha256_file
from nfnets.weights import CheckpointError, load_model, save_weights

TINY = {"widths": (32, 64, 96, 96), "depths": (1, 1, 1, 1), "group_width": 16}
SIZE = 32  # test resolution of the tiny models (the stem and stages reduce it to 1 x 1)


@functools.cache
def _prototype(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return nfnets.create_model("nfnet_f0", num_classes=num_classes, **TINY)


def tiny_model(num_classes: int = 3, bias: list[float] | None = None) -> torch.nn.Module:
    """A tiny NFNet; with ``bias`` its logits are exactly ``bias`` for any image."""
    model = copy.deepcopy(_prototype(num_classes))
    if bias is not None:
        with torch.no_grad():
            model.fc.weight.zero_()
            model.fc.bias.copy_(torch.tensor(bias))
    return model


def favour(k: int, num_classes: int = 3, margin: float = 5.0) -> list[float]:
    return [margin if i == k else 0.0 for i in range(num_classes)]


def write_png(path: Path, size: int = 40, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def image_tree(root: Path, counts: dict[str, int], split: str = "val") -> Path:
    """root/split/<class>/<i>.png with counts[class] random images each."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_png(root / split / name / f"{i}.png", seed=10 * c + i)
    return root


def save(model, path: Path, classes=("a", "b", "c"), test_size: int = SIZE) -> Path:
    save_weights(model, path, extra_metadata={"classes": list(classes), "train_size": test_size,
                                              "test_size": test_size})
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def expected_loss(bias: list[float], labels: list[int]) -> float:
    """Mean cross-entropy when every image's logits are ``bias``."""
    log_z = math.log(sum(math.exp(b) for b in bias))
    return sum(log_z - bias[y] for y in labels) / len(labels)


# ---------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_counts_like_the_official_eval(tmp_path):
    tree = image_tree(tmp_path, {"a": 2, "b": 3, "c": 1})
    dataset = ImageFolderDataset(tree, "val", EvalTransform(SIZE))
    bias = favour(1)
    model = tiny_model(bias=bias).train()
    # batches of 4 and 2: the totals are summed, then divided by the 6 images
    metrics = evaluate(model, eval_loader(dataset, batch_size=4))
    assert metrics["count"] == 6 and metrics["skipped_images"] == 0
    assert metrics["top1"] == pytest.approx(100 * 3 / 6)
    assert metrics["top5"] == 100.0  # top-k with k = 3 classes covers every label
    assert metrics["loss"] == pytest.approx(expected_loss(bias, [0, 0, 1, 1, 1, 2]), rel=1e-6)
    assert model.training  # the caller's mode is restored


def test_top5_is_top5_with_ten_classes():
    labels = list(range(10)) + [9, 9, 5]
    dataset = TensorImageDataset(torch.zeros(len(labels), 3, SIZE, SIZE),
                                 torch.tensor(labels), [str(i) for i in range(10)])
    bias = [float(i) for i in range(10)]  # ranks classes 9 > 8 > ... > 0
    metrics = evaluate(tiny_model(10, bias), eval_loader(dataset, batch_size=5))
    assert metrics["top1"] == pytest.approx(100 * 3 / 13)  # the three 9s
    assert metrics["top5"] == pytest.approx(100 * 8 / 13)  # labels 5..9
    assert metrics["loss"] == pytest.approx(expected_loss(bias, labels), rel=1e-6)


def test_unreadable_images_are_counted(tmp_path):
    tree = image_tree(tmp_path, {"a": 2, "b": 2})
    (tree / "val" / "b" / "9_broken.png").write_bytes(b"not a png")
    dataset = ImageFolderDataset(tree, "val", EvalTransform(SIZE))
    with pytest.warns(SkippedImageWarning, match="9_broken.png"):
        metrics = evaluate(tiny_model(2, [0.0, 1.0]), eval_loader(dataset, batch_size=50))
    # the broken last image is replaced by the first one (label a), still 5 samples
    assert metrics["skipped_images"] == 1 and metrics["count"] == 5
    assert metrics["top1"] == pytest.approx(100 * 2 / 5)


def test_empty_loader_is_an_error():
    with pytest.raises(DataError, match="no images"):
        evaluate(tiny_model(), [])


def _ddp_worker(rank: int, world: int, init_file: str, weights: str, tree: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        model, _ = load_model(weights)
        dataset = ImageFolderDataset(tree, "val", EvalTransform(SIZE))
        # rank 0 gets 4 images in 2 batches, rank 1 gets 3 in 2 batches (uneven on purpose)
        loader = eval_loader(dataset, batch_size=2, rank=rank, world_size=world)
        metrics = evaluate(model, loader)
        Path(out, f"{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes
def test_evaluate_all_reduces_across_ranks(tmp_path):
    tree = image_tree(tmp_path / "data", {"a": 2, "b": 4, "c": 1})
    torch.manual_seed(1)
    model = tiny_model()  # random weights: predictions differ per image
    weights = save(model, tmp_path / "m.safetensors")
    dataset = ImageFolderDataset(tree, "val", EvalTransform(SIZE))
    single = evaluate(model, eval_loader(dataset, batch_size=50))
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(weights), str(tree),
                                str(tmp_path)), nprocs=2)
    for rank in range(2):
        ranked = json.loads((tmp_path / f"{rank}.json").read_text())
        assert ranked["count"] == 7
        for key in ("top1", "top5", "loss"):
            assert ranked[key] == pytest.approx(single[key], rel=1e-5), key


# ---------------------------------------------------------------------------------------------
# load_model


def test_load_safetensors(tmp_path):
    path = save(tiny_model(bias=favour(2)), tmp_path / "m.safetensors", test_size=48)
    model, info = load_model(path)
    assert not model.training and model.model_name == "nfnet_f0"
    assert torch.equal(model.fc.bias, torch.tensor(favour(2)))
    assert info == {"classes": ["a", "b", "c"], "test_size": 48, "source": str(path),
                    "model_name": "nfnet_f0", "ema": False, "data": None, "seed": 0}
    assert load_model(path, model_name="F0")[0].model_name == "nfnet_f0"  # official spelling
    with pytest.raises(CheckpointError, match="holds nfnet_f0 weights, not nfnet_f1"):
        load_model(path, model_name="nfnet_f1")
    with pytest.raises(CheckpointError, match="single set of weights"):
        load_model(path, ema=True)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_model(tmp_path / "nowhere.safetensors")


def write_run(run: Path, *, ema: bool = True, data: str = "imagenet", seed: int = 0) -> Path:
    """A finished run: config.json, model.safetensors (+ model_ema.safetensors)."""
    run.mkdir()
    config = {"model": "nfnet_f0", "model_kwargs": {}, "classes": ["a", "b", "c"],
              "train_size": SIZE, "test_size": SIZE, "data": data, "train": {"seed": seed}}
    (run / "config.json").write_text(json.dumps(config))
    save(tiny_model(bias=favour(0)), run / "model.safetensors")
    if ema:
        save(tiny_model(bias=favour(1)), run / "model_ema.safetensors")
    return run


def test_load_run_directory(tmp_path):
    run = write_run(tmp_path / "run", data="digits", seed=7)
    raw, info = load_model(run)
    averaged, ema_info = load_model(run, ema=True)
    assert raw.fc.bias.argmax() == 0 and averaged.fc.bias.argmax() == 1
    assert info["source"] == str(run / "model.safetensors")
    assert ema_info["source"] == str(run / "model_ema.safetensors") and ema_info["ema"]
    assert (info["data"], info["seed"], info["test_size"]) == ("digits", 7, SIZE)


def test_run_without_ema_weights(tmp_path):
    run = write_run(tmp_path / "run", ema=False)
    with pytest.raises(CheckpointError, match="no model_ema.safetensors; drop --ema"):
        load_model(run, ema=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_model(tmp_path / "empty")


def write_checkpoint(path: Path, step: int, raw_class: int, ema_class: int | None) -> Path:
    """A training checkpoint as nfnets.train writes it (the parts inference reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = tiny_model(bias=favour(raw_class))
    ema = None if ema_class is None else {
        "module": tiny_model(bias=favour(ema_class)).state_dict(), "num_updates": step,
        "decay": 0.99999}
    torch.save({"model": model.state_dict(), "ema": ema, "optimizer": {}, "scheduler": {},
                "step": step, "epoch": 0, "model_name": model.model_name,
                "model_kwargs": model.model_kwargs,
                "config": {"data": "digits", "seed": 3, "test_size": 24}}, path)
    return path


def test_run_in_progress_uses_its_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"classes": ["x", "y", "z"]}))
    write_checkpoint(run / "checkpoints" / "step_00000002.pt", 2, raw_class=0, ema_class=0)
    newest = write_checkpoint(run / "checkpoints" / "step_00000010.pt", 10, 2, 1)
    # written without the SHA-256 manifest nfnets.train writes beside each: read, with a warning
    with pytest.warns(CheckpointWarning, match="step_00000010.pt has no .* reading it unverified"):
        raw, info = load_model(run)
    for path in (run / "checkpoints").iterdir():
        write_manifest({path.name: sha256_file(path)}, manifest_path(path))
    averaged, _ = load_model(run, ema=True)
    assert raw.fc.bias.argmax() == 2 and averaged.fc.bias.argmax() == 1
    assert info["source"] == str(newest) and not raw.training
    # class names from the run's config.json, the rest from the checkpoint's config
    assert info["classes"] == ["x", "y", "z"]
    assert (info["test_size"], info["data"], info["seed"]) == (24, "digits", 3)
    # a newest checkpoint that no longer matches its digest: the previous good one, unchanged
    write_manifest({newest.name: "0" * 64}, manifest_path(newest))
    with pytest.warns(CheckpointWarning, match="step_00000010.pt is unusable"):
        older, info = load_model(run)
    assert older.fc.bias.argmax() == 0 and info["source"].endswith("step_00000002.pt")
    assert newest.is_file()  # reading a run never moves its files


def test_training_checkpoint_file(tmp_path):
    path = write_checkpoint(tmp_path / "step_00000005.pt", 5, raw_class=1, ema_class=None)
    model, info = load_model(path)
    assert model.fc.bias.argmax() == 1 and info["classes"] is None
    with pytest.raises(CheckpointError, match="holds no EMA weights; drop --ema"):
        load_model(path, ema=True)


def test_official_checkpoint(tmp_path):
    with torch.device("meta"):  # only the shapes: building the real B0 twice would be slow
        reference = nfnets.create_model("nf_regnet_b0")
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) for k, v in reference.state_dict().items()}
    tree = to_official(state, "nf_regnet")
    path = tmp_path / "B0_haiku.npz"
    path.write_bytes(pickle.dumps(tree, protocol=3))  # plain dicts: allowed by the format
    model, info = load_model(path)
    assert model.model_name == "nf_regnet_b0" and not model.training
    assert torch.equal(model.fc.weight, torch.from_numpy(tree["NF_RegNet/~/linear"]["w"].T))
    conv = tree["NF_RegNet/~/nf_block_3/~/conv1"]["w"]
    assert torch.equal(model.blocks[3].conv1.weight, torch.from_numpy(conv).permute(3, 2, 0, 1))
    assert len(info["classes"]) == 1000 and info["classes"][:2] == ["tench", "goldfish"]
    assert info["test_size"] == nfnets.models.model_defaults("nf_regnet_b0")["test_size"] == 224
    with pytest.raises(CheckpointError, match="single set of weights; drop --ema"):
        load_model(path, ema=True)
    with pytest.raises(CheckpointError, match="holds nf_regnet_b0 weights, not nf_regnet_b1"):
        load_model(path, model_name="B1")


def test_converted_official_weights_get_imagenet_names(tmp_path):
    path = tmp_path / "f0.safetensors"
    save_weights(tiny_model(1000), path, extra_metadata={"source_file": "F0_haiku.npz"})
    _, info = load_model(path)
    assert info["classes"][0] == "tench" and info["test_size"] == 256  # F0's test size
    save_weights(tiny_model(1000), path)
    assert load_model(path)[1]["classes"] is None


# ---------------------------------------------------------------------------------------------
# predict


def test_preprocess_matches_the_demo_geometry(tmp_path):
    # At S = 32 a 64 x 64 image is already (S + 32)^2, so the demo's resize leaves it as is
    # and the crop is rows and columns 16..47.
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    expected = normalize(torch.from_numpy(pixels[16:48, 16:48]).permute(2, 0, 1)[None].float())
    assert torch.equal(preprocess_image(tmp_path / "x.png", 32), expected[0])
    whole = normalize(torch.from_numpy(pixels).permute(2, 0, 1)[None].float())
    assert torch.equal(preprocess_image(tmp_path / "x.png", 64, crop=False), whole[0])
    # a flat colour stays flat: (value - mean) / std on the 0-255 scale
    # (deepmind-research nfnets/dataset.py: MEAN_RGB, STDDEV_RGB)
    Image.new("RGB", (50, 30), (255, 0, 128)).save(tmp_path / "flat.png")
    flat = preprocess_image(tmp_path / "flat.png", 16)
    assert flat.shape == (3, 16, 16)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    for c, value in enumerate((255, 0, 128)):
        assert torch.allclose(flat[c], torch.tensor((value - mean[c]) / std[c]), atol=1e-5)


def odd_sized_tree(root: Path) -> Path:
    """root/val/{a,b,c}/0.png, non-square and of several sizes, so the resize and crop act."""
    for c, (name, (h, w)) in enumerate({"a": (50, 37), "b": (23, 61), "c": (80, 80)}.items()):
        (root / "val" / name).mkdir(parents=True)
        pixels = np.random.default_rng(c).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "val" / name / "0.png")
    return root


def test_preprocess_image_is_the_eval_datasets_image(tmp_path):
    dataset = ImageFolderDataset(odd_sized_tree(tmp_path), "val", EvalTransform(SIZE))
    for i in range(len(dataset)):
        expected = normalize(dataset[i].image[None])[0]
        assert torch.equal(preprocess_image(dataset.path(i), SIZE), expected), dataset.path(i)


def test_cli_eval_and_predict_give_the_same_logits(tmp_path, capsys):
    tree = odd_sized_tree(tmp_path / "data")
    torch.manual_seed(3)
    weights = save(tiny_model(), tmp_path / "m.safetensors")  # random: logits depend on pixels
    status, out, err = cli(capsys, "eval", weights, "--data", tree, "--json")
    assert status == 0, err
    evaluated = json.loads(out)
    images = sorted((tree / "val").glob("*/0.png"))
    status, out, err = cli(capsys, "predict", *images, "--weights", weights, "--top-k", "3",
                           "--json")
    assert status == 0, err
    predicted = json.loads(out)
    # eval's loss is the mean of -log p(label); predict prints p for every class
    labels = {"a": 0, "b": 1, "c": 2}
    nll = [-math.log(next(p["probability"] for p in entry["predictions"]
                          if p["index"] == labels[Path(entry["image"]).parent.name]))
           for entry in predicted]
    assert evaluated["loss"] == pytest.approx(sum(nll) / 3, rel=1e-6)
    hits = sum(entry["predictions"][0]["class"] == Path(entry["image"]).parent.name
               for entry in predicted)
    assert evaluated["top1"] == pytest.approx(100 * hits / 3)
    # the losses of the three images differ, so equal means mean the same images went in
    assert len({round(x, 6) for x in nll}) == 3


def test_predict_returns_sorted_probabilities(tmp_path):
    images = [write_png(tmp_path / f"{i}.png", size=20 + 10 * i, seed=i) for i in range(3)]
    bias = [1.0, 0.0, 3.0]
    results = predict(tiny_model(bias=bias), images, ["a", "b", "c"], SIZE, top_k=2,
                      batch_size=2)
    expected = torch.tensor(bias).softmax(0).tolist()
    assert len(results) == 3
    for pairs in results:
        assert [name for name, _ in pairs] == ["c", "a"]
        assert [p for _, p in pairs] == pytest.approx([expected[2], expected[0]], rel=1e-6)
        assert sum(p for _, p in pairs) <= 1.0
    everything = predict(tiny_model(bias=bias), images[:1], None, SIZE, top_k=5)[0]
    assert [name for name, _ in everything] == ["2", "0", "1"]  # k capped at 3 classes
    assert sum(p for _, p in everything) == pytest.approx(1.0, abs=1e-6)


def test_predict_names_an_unreadable_image(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match="cannot read image .*bad.jpg"):
        predict(tiny_model(), [bad], None, SIZE)


# ---------------------------------------------------------------------------------------------
# The CLI


def test_cli_eval_json(tmp_path, capsys):
    tree = image_tree(tmp_path / "data", {"a": 1, "b": 1, "c": 2})
    weights = save(tiny_model(bias=favour(2)), tmp_path / "m.safetensors")
    status, out, err = cli(capsys, "eval", weights, "--data", tree, "--json", "--device", "cpu")
    assert status == 0, err
    result = json.loads(out)
    assert (result["top1"], result["top5"], result["count"]) == (50.0, 100.0, 4)
    assert result["image_size"] == SIZE and result["model"] == "nfnet_f0"
    status, out, _ = cli(capsys, "eval", weights, "--data", tree, "--batch-size", "3")
    assert status == 0 and "top-1 50.00%  top-5 100.00%" in out and "4 images at 32 px" in out


def test_cli_eval_and_predict_run_the_fused_model_and_compile_on_request(tmp_path, capsys,
                                                                          monkeypatch):
    from nfnets.cli import _common
    from nfnets.inference import optimize_for_inference

    calls = []

    def spy(model, example, *, compile):  # the real path, uncompiled (compiling is slow)
        calls.append((compile, tuple(example.shape)))
        return optimize_for_inference(model, example, compile=False)

    monkeypatch.setattr(_common, "optimize_for_inference", spy)
    tree = image_tree(tmp_path / "data", {"a": 1, "b": 1, "c": 2})
    weights = save(tiny_model(bias=favour(2)), tmp_path / "m.safetensors")
    for flags, compile in (([], False), (["--compile"], True)):
        status, out, err = cli(capsys, "eval", weights, "--data", tree, "--json", "--device",
                               "cpu", "--batch-size", "3", *flags)
        assert status == 0, err
        result = json.loads(out)
        assert (result["top1"], result["top5"], result["count"]) == (50.0, 100.0, 4)
        assert calls.pop() == (compile, (3, 3, SIZE, SIZE))
    image = next((tmp_path / "data" / "val" / "c").iterdir())
    status, out, err = cli(capsys, "predict", image, "--weights", weights, "--compile",
                           "--device", "cpu")
    assert status == 0, err
    assert "c" in out and calls.pop() == (True, (1, 3, SIZE, SIZE))


def test_cli_eval_digits_uses_the_runs_split(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    digits = [str(i) for i in range(10)]
    (run / "config.json").write_text(json.dumps(
        {"classes": digits, "test_size": 16, "data": "digits", "train": {"seed": 5}}))
    save(tiny_model(10, [float(i) for i in range(10)]), run / "model.safetensors",
         classes=digits, test_size=16)
    status, out, err = cli(capsys, "eval", run, "--data", "digits", "--json")
    assert status == 0, err
    labels = digits_datasets(16, seed=5)[1].labels
    result = json.loads(out)
    assert result["count"] == len(labels)
    assert result["top1"] == pytest.approx(100 * (labels == 9).float().mean().item())
    assert result["top5"] == pytest.approx(100 * (labels >= 5).float().mean().item())


def test_cli_eval_errors(tmp_path, capsys):
    tree = image_tree(tmp_path / "data", {"a": 1, "b": 1})
    weights = save(tiny_model(), tmp_path / "m.safetensors")
    status, _, err = cli(capsys, "eval", tmp_path / "missing", "--data", tree)
    assert status == 2 and "missing" in err and err.count("\n") == 1
    status, _, err = cli(capsys, "eval", weights, "--data", tree)
    assert status == 2 and "has 2 classes but" in err and "predicts 3" in err
    status, _, err = cli(capsys, "eval", weights, "--data", tree, "--ema")
    assert status == 2 and "--ema does not apply" in err
    status, _, err = cli(capsys, "eval", weights, "--data", tmp_path / "nodata")
    assert status == 2 and "nodata does not exist" in err
    status, _, err = cli(capsys, "eval", weights, "--data", tree, "--batch-size", "0")
    assert status == 2 and "--batch-size must be positive" in err
    status, _, err = cli(capsys, "eval", weights, "--data", tree, "--model", "nfnet_f9")
    assert status == 2 and "unknown model" in err


def test_cli_predict_reports_bad_images_and_goes_on(tmp_path, capsys):
    weights = save(tiny_model(bias=[0.0, 4.0, 0.0]), tmp_path / "m.safetensors")
    good = write_png(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    status, out, err = cli(capsys, "predict", bad, good, "--weights", weights, "--top-k", "2")
    assert status == 2
    assert "bad.png" in err and "good.png" not in err
    assert out.splitlines()[0] == str(good) and out.splitlines()[1].endswith("b")
    status, out, _ = cli(capsys, "predict", good, bad, tmp_path / "gone.png",
                         "--weights", weights, "--json")
    assert status == 2
    entries = json.loads(out)
    assert [e["image"] for e in entries] == [str(good), str(bad), str(tmp_path / "gone.png")]
    assert [p["class"] for p in entries[0]["predictions"]] == ["b", "a", "c"]
    assert "error" in entries[1] and "not found" in entries[2]["error"]
    status, out, err = cli(capsys, "predict", good, "--weights", weights, "--top-k", "0")
    assert status == 2 and "--top-k must be positive" in err


@pytest.mark.parametrize("data, crop", [("digits", False), ("imagenet", True)])
def test_cli_predict_crops_unless_the_run_is_digits(tmp_path, capsys, monkeypatch, data, crop):
    import nfnets.evaluate

    seen = []

    def recording(path, image_size, *, crop=True):
        seen.append((image_size, crop))
        return preprocess_image(path, image_size, crop=crop)

    monkeypatch.setattr(nfnets.cli.predict, "preprocess_image", recording)
    run = write_run(tmp_path / "run", data=data)
    image = write_png(tmp_path / "digit.png", size=8)
    status, out, err = cli(capsys, "predict", image, "--weights", run, "--json")
    assert status == 0, err
    assert seen == [(SIZE, crop)]
    assert json.loads(out)[0]["predictions"][0]["class"] == "a"  # model.safetensors favours a
