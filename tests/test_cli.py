"""The small subcommands and the command's error handling."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from official_format import to_official, write_official

import nfnets
import nfnets.cli.list_models
from nfnets.augment import AugmentConfig
from nfnets.cli import main
from nfnets.data import EvalTransform
from nfnets.errors import CheckpointError, DataError, RunFailed, UsageError


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
    assert "at 40 px" in printed
    # the file is the model at 40 px: onnxruntime gives the logits of the weights file
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.shape[1:] == [3, 40, 40]
    x = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    (logits,) = session.run(None, {graph_input.name: x.numpy()})
    with torch.no_grad():
        expected = nfnets.load_weights(weights).eval()(x)
    assert logits.shape == (1, 4)
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-5)
    assert main(["export", str(tmp_path / "missing.safetensors"), "-o", str(out)]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("error, status", [
    (UsageError("bad flag"), 2),
    (DataError("bad data"), 2),
    (CheckpointError("bad file"), 2),
    (FileNotFoundError("no such file or run directory: x"), 2),
    (RunFailed("the loss diverged"), 1),
])
def test_our_errors_are_one_line_with_their_exit_status(monkeypatch, capsys, error, status):
    monkeypatch.delenv("NFNETS_DEBUG", raising=False)

    def fail(args):
        raise error

    monkeypatch.setattr(nfnets.cli.list_models, "run", fail)
    assert main(["list"]) == status
    err = capsys.readouterr().err
    assert err == (f"nfnets list: error: {error}\n" if status == 2 else f"nfnets list: {error}\n")
    monkeypatch.setenv("NFNETS_DEBUG", "1")  # the traceback on demand
    with pytest.raises(type(error)):
        main(["list"])


@pytest.mark.parametrize("error", [ValueError("a bug"), KeyError("a bug"), OSError("a bug")])
def test_any_other_exception_keeps_its_traceback(monkeypatch, error):
    def fail(args):
        raise error

    monkeypatch.setattr(nfnets.cli.list_models, "run", fail)
    with pytest.raises(type(error)):  # the interpreter prints it and exits with status 1
        main(["list"])


def test_a_bug_exits_1_with_a_traceback_from_the_console(tmp_path):
    # a plain ValueError from inside a subcommand is a bug, not a usage error
    script = ("import sys, nfnets.cli, nfnets.cli.list_models as m\n"
              "def run(args): raise ValueError('a bug')\n"
              "m.run = run\nsys.exit(nfnets.cli.main(['list']))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: a bug" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["info", "nfnet_f9"], "unknown model 'nfnet_f9'"),
    (["export", "nfnet_f9", "-o", "x.onnx"], "unknown model 'nfnet_f9'"),
])
def test_user_mistakes_that_were_bare_value_errors_are_usage_errors(capsys, argv, message):
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err


def test_library_user_mistakes_raise_our_types():
    with pytest.raises(UsageError, match="unknown model"):
        nfnets.create_model("nfnet_f9")
    with pytest.raises(UsageError, match="invalid option for nfnet_f0: .*colour"):
        nfnets.create_model("nfnet_f0", colour=3)
    with pytest.raises(UsageError, match="unknown eval mode"):
        EvalTransform(32, "centre")
    with pytest.raises(UsageError, match="bad eval mode"):
        EvalTransform(32, "resize_crop_x")
    with pytest.raises(UsageError, match="unknown word 'cutmx'"):  # nfnets train --augment
        AugmentConfig.from_name("cutmx_mixup")


PUBLIC = {
    "AGC", "EMA", "adaptive_clip_grad_", "convert_official", "count_flops", "count_params",
    "create_model", "export_onnx", "list_models", "load_model", "load_pretrained",
    "load_weights", "optimize_for_inference", "param_groups", "save_weights", "sgd_agc",
    "signal_propagation", "warmup_cosine_lr",
}


def test_the_public_api_is_small():
    assert set(nfnets.__all__) == PUBLIC
    has_inference = importlib.util.find_spec("nfnets.inference") is not None
    for name in PUBLIC - ({"optimize_for_inference"} if not has_inference else set()):
        assert callable(getattr(nfnets, name)), name
    for internal in ("ClipStats", "signal_metrics", "optimizer_step", "peak_lr",
                     "warmup_cosine", "model_defaults", "set_winograd", "use_winograd"):
        assert not hasattr(nfnets, internal), internal


def test_train_input_mistakes_are_usage_errors(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text("{not json")
    argv = ["train", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*argv, "--config", str(config)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert main([*argv, "--config", str(tmp_path)]) == 2  # a folder, not a file
    assert "--config: no such file" in capsys.readouterr().err
