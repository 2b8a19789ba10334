"""The small subcommands and the command's error handling."""

import json
import subprocess
import sys

import pytest
import torch
from official_format import to_official, write_official

import nfnets
from nfnets.cli import main


def test_list_prints_every_model(capsys):
    assert main(["list"]) == 0
    assert capsys.readouterr().out.split() == nfnets.list_models()


def test_info_prints_the_papers_figures(capsys):
    assert main(["info", "nfnet_f0"]) == 0
    out = capsys.readouterr().out
    assert "71,489,284" in out  # paper Table 3 / README: 71.5M
    assert "12.38B" in out and "6.98B" in out  # MACs at 256 (published) and at 192
    assert "192 / 256" in out and "'405'" in out


def test_info_json_and_extra_sizes(capsys):
    assert main(["info", "F1", "--image-size", "320", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "nfnet_f1" and info["params"] == 132_634_256
    assert round(info["flops"]["320"] / 1e9, 2) == 35.54  # published F1 FLOPs


def test_unknown_model_is_a_usage_error(capsys):
    assert main(["info", "nfnet_f9"]) == 2
    err = capsys.readouterr().err
    assert "did you mean nfnet_f7" in err and "Traceback" not in err


def test_convert_reads_an_official_file_without_haiku(tmp_path, capsys):
    torch.manual_seed(0)
    model = nfnets.create_model("nf_regnet_b0", num_classes=10)
    src = write_official(tmp_path / "B0_haiku.npz", to_official(model.state_dict(), "nf_regnet"))
    out = tmp_path / "b0.safetensors"
    assert main(["convert", str(src), "-o", str(out)]) == 0
    assert "nf_regnet_b0" in capsys.readouterr().out
    loaded = nfnets.load_weights(out)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert main(["convert", str(src), "-o", str(out), "--model", "nf_regnet_b1"]) == 2
    assert "not nf_regnet_b1" in capsys.readouterr().err


def test_convert_refuses_a_malicious_pickle(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (__import__("os").system, (f"touch {marker}",))

    import pickle

    src = tmp_path / "F0_haiku.npz"
    src.write_bytes(pickle.dumps({"NFNet/~/linear": {"w": Exploit()}}, protocol=3))
    assert main(["convert", str(src), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "os.system" in err or "posix.system" in err
    assert not marker.exists()


def test_missing_file_is_a_usage_error(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.npz"), "-o", str(tmp_path / "x")]) == 2
    assert "nope.npz" in capsys.readouterr().err


def test_python_dash_m_and_help():
    result = subprocess.run([sys.executable, "-m", "nfnets", "--help"], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0
    for command in ("train", "eval", "predict", "convert", "info", "export", "plot", "list"):
        assert command in result.stdout
    bad = subprocess.run([sys.executable, "-m", "nfnets", "train", "--epochs", "two"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "invalid int value" in bad.stderr


@pytest.mark.parametrize("command", ["train", "eval", "predict", "export"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: nfnets " + command in capsys.readouterr().out


def test_export_a_weights_file_to_onnx(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = nfnets.create_model("nfnet_f0", num_classes=4, widths=(32, 64, 96, 96),
                                depths=(1, 1, 1, 1), group_width=16)
    weights = tmp_path / "tiny.safetensors"
    nfnets.save_weights(model, weights, {"classes": ["a", "b", "c", "d"], "test_size": 40})
    out = tmp_path / "tiny.onnx"
    assert main(["export", str(weights), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "at 40 px" in printed and out.stat().st_size > 10_000
    assert main(["export", str(tmp_path / "missing.safetensors"), "-o", str(out)]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
