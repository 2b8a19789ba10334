"""`nfnets list --pretrained`, `predict/eval --model X --pretrained` and hf-hub: names."""

import json

import pytest
from test_evaluate import image_tree, write_png
from test_pretrained import serve_release

from nfnets.cli import main
from nfnets.pretrained import imagenet_classes

SMALL = {"widths": (32, 64, 96, 96), "depths": (1, 1, 1, 1), "group_width": 16}


def cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_list_pretrained_shows_the_records(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    status, out, _ = cli(capsys, "list", "--pretrained")
    assert status == 0
    assert "nfnet_f0" in out and "83.6" in out and "0.889" in out and "F7" in out
    assert "nfnet_f7 " not in out
    status, out, _ = cli(capsys, "list", "--pretrained", "--json")
    records = json.loads(out)
    assert [r["model"] for r in records] == [f"nfnet_f{k}" for k in range(7)]
    assert records[0]["md5"] == "0a41039da1cb43adf47f1b7d86ddfe0f"
    assert records[0]["cached"] is False


@pytest.fixture
def imagenet_release(tmp_path, monkeypatch):
    """A small 1000-class NFNet served as nfnet_f0's release (test resolution 48)."""
    record, source, server = serve_release(tmp_path, monkeypatch, SMALL, 1000)
    yield record, source, server
    server.stop()


def test_predict_pretrained_prints_imagenet_names(imagenet_release, tmp_path, capsys):
    image = write_png(tmp_path / "cat.png", size=60)
    status, out, err = cli(capsys, "predict", image, "--model", "nfnet_f0", "--pretrained",
                           "--top-k", "3", "--json")
    assert status == 0, err
    (result,) = json.loads(out)
    names = imagenet_classes()
    assert [p["class"] for p in result["predictions"]] == [
        names[p["index"]] for p in result["predictions"]]
    assert len(result["predictions"]) == 3


def test_pretrained_flag_needs_a_model_and_no_path(capsys):
    status, _, err = cli(capsys, "predict", "x.png", "--pretrained")
    assert status == 2 and "--pretrained needs --model" in err
    status, _, err = cli(capsys, "eval", "--data", "digits", "--model", "nfnet_f7",
                         "--pretrained")
    assert status == 2 and "released no weights" in err and "Traceback" not in err


def test_eval_pretrained_on_a_folder(tmp_path, monkeypatch, capsys):
    _, _, server = serve_release(tmp_path, monkeypatch, SMALL, 3)
    try:
        tree = image_tree(tmp_path / "data", {"a": 2, "b": 2, "c": 1})
        status, out, err = cli(capsys, "eval", "--data", tree, "--model", "nfnet_f0",
                               "--pretrained", "--json")
    finally:
        server.stop()
    assert status == 0, err
    result = json.loads(out)
    assert result["count"] == 5 and result["image_size"] == 48  # the record's test size
    assert result["source"].endswith("/tiny_haiku.npz")


def test_a_missing_released_file_names_its_address(tmp_path, capsys):
    # The report: `nfnets convert F0_haiku.npz` said "file not found" and nothing else.
    status, _, err = cli(capsys, "convert", tmp_path / "F0_haiku.npz", "-o", tmp_path / "o")
    assert status == 2
    assert "https://storage.googleapis.com/dm-nfnets/F0_haiku.npz" in err
    assert "--model nfnet_f0 --pretrained" in err


def test_info_names_the_release(capsys):
    status, out, _ = cli(capsys, "info", "nfnet_f6", "--json")
    assert status == 0 and json.loads(out)["pretrained"]["top1"] == 86.5
    status, out, _ = cli(capsys, "info", "nfnet_f7")
    assert status == 0 and "none released" in out
