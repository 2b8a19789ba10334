"""Signal propagation: the hook-based tables, the BN counterpart, ``nfnets spp``."""

from __future__ import annotations

import csv
import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import nfnets
from nfnets.cli import main
from nfnets.layers import WSConv2d
from nfnets.models import signal_metrics
from nfnets.signal import (
    BNAct,
    batchnorm_counterpart,
    channel_stats,
    find_residual_blocks,
    set_skip_gains_,
    signal_propagation,
    spp_mode,
)

# Tiny members of every family, small enough for 32 px inputs on one core.
TINY = {
    "nf_resnet50": {"width": 0.25, "depths": [2, 1, 1, 1]},
    "nf_resnet50+se": {"width": 0.25, "depths": [2, 1, 1, 1], "use_se": True},
    "nfnet_f0": {"widths": [32, 64, 64, 64], "depths": [1, 2, 1, 1], "group_width": 16},
    "nf_regnet_b0": {"depths": [1, 2, 1, 1], "width": 0.5},
}


def tiny(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nfnets.create_model(name.split("+")[0], num_classes=10, **TINY[name]).eval()
    return set_skip_gains_(model, 1.0)


def official_stats(t: torch.Tensor) -> tuple[float, float]:
    """deepmind-research nfnets/base.py signal_metrics, on the NHWC tensor: mean over axes
    (0, 1, 2) of x² minus the squared mean... written out: per-channel mean and variance over
    N, H, W, then the channel average."""
    nhwc = t.permute(0, 2, 3, 1).double()
    mean = nhwc.mean(dim=(0, 1, 2))
    var = ((nhwc - mean) ** 2).mean(dim=(0, 1, 2))
    return float((mean**2).mean()), float(var.mean())


@pytest.mark.parametrize("name", list(TINY))
def test_table_equals_signal_metrics(name):
    model = tiny(name)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    table = signal_propagation(model, x)
    ref = signal_metrics(model, x)
    assert len(table) == len(model.blocks) == len(find_residual_blocks(model))
    assert table.input_var == pytest.approx(ref["avg_var_0"].item(), rel=1e-5)
    assert table.input_sq_mean == pytest.approx(ref["avg_sq_mean_0"].item(), rel=1e-4, abs=1e-9)
    for row in table.rows:
        k = row.index
        assert row.name == f"blocks.{k}"
        assert row.avg_var == pytest.approx(ref[f"avg_var_{k + 1}"].item(), rel=1e-5)
        assert row.avg_sq_mean == pytest.approx(ref[f"avg_sq_mean_{k + 1}"].item(),
                                                rel=1e-4, abs=1e-9)
        assert row.res_avg_var == pytest.approx(ref[f"res_avg_var_{k}"].item(), rel=1e-5)


def test_channel_stats_follow_the_official_definition():
    gen = torch.Generator().manual_seed(0)
    # channels with different means and scales, so averaging the wrong axis would show
    t = torch.randn(3, 5, 4, 6, generator=gen) * torch.arange(1.0, 6.0).view(1, 5, 1, 1)
    t = t + torch.linspace(-2, 3, 5).view(1, 5, 1, 1)
    assert channel_stats(t) == pytest.approx(official_stats(t), rel=1e-6)
    seq = t.flatten(2).transpose(1, 2)  # (B, T, C): channels last
    assert channel_stats(seq, channel_dim=-1) == pytest.approx(official_stats(t), rel=1e-6)


def test_stages_transitions_and_the_nf_variance_track():
    torch.manual_seed(0)
    model = nfnets.create_model("nf_resnet50", num_classes=10, width=0.5,
                                depths=[4, 3, 1, 1]).eval()
    set_skip_gains_(model, 1.0)
    x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    table = signal_propagation(model, x)
    assert table.column("stage") == [0, 0, 0, 0, 1, 1, 1, 2, 3]
    assert table.column("transition") == [True, False, False, False, True, False, False,
                                          True, True]
    assert table.stage_starts() == [4, 7, 8]
    alpha2 = 0.2**2  # official NF-ResNet alpha
    assert table.column("expected_var") == pytest.approx(
        [1 + alpha2 * k for k in (1, 2, 3, 4, 1, 2, 3, 1, 1)])
    for row in table.rows:
        # NF: no mean shift, variance on the analytic 1 + kα² track (the β schedule); the
        # 4x4 and 2x2 maps of the last stages hold few pixels and lose some variance
        assert row.avg_sq_mean < 0.05
        if row.stage < 2:
            assert row.avg_var == pytest.approx(row.expected_var, rel=0.15)
        else:
            assert 0.6 < row.avg_var / row.expected_var < 1.1


def test_bn_counterpart_variance_grows_linearly_within_a_stage():
    torch.manual_seed(0)
    model = nfnets.create_model("nf_resnet50", num_classes=10, width=0.5,
                                depths=[4, 3, 1, 1]).eval()
    bn = spp_mode(batchnorm_counterpart(model))
    x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    table = signal_propagation(bn, x)
    var, res = table.column("avg_var"), table.column("res_avg_var")
    assert all(math.isnan(v) for v in table.column("expected_var"))
    # Var(x_{l+1}) = Var(x_l) + Var(f(x_l)): BN-ReLU-Conv branches add ≈0.68 each
    # (NF-ResNet paper §4), so the variance climbs through stage 0 and stage 1 ...
    for a, b, r in zip(var[0:3] + var[4:6], var[1:4] + var[5:7], res[1:4] + res[5:7],
                       strict=True):
        assert b - a == pytest.approx(r, rel=0.3)
        assert 0.45 < r < 0.9
    assert var[3] > 2.5 * var[0] / 1.4
    # ... and falls back at a transition, whose shortcut is a conv of a normalised input
    assert var[4] < 0.6 * var[3]
    # BN removes the mean shift inside the branch, not on the skip path: it accumulates
    assert table.rows[3].avg_sq_mean > 0.3 > max(
        signal_propagation(set_skip_gains_(model, 1.0), x).column("avg_sq_mean"))


def test_bn_counterpart_structure():
    model = tiny("nf_regnet_b0")
    bn = batchnorm_counterpart(model)
    assert not any(isinstance(m, WSConv2d) for m in bn.modules())
    assert any(isinstance(m, WSConv2d) for m in model.modules())  # the original is untouched
    for block in bn.blocks:
        assert block.alpha == 1.0 and block.skip_gain.item() == 1.0
        assert not block.skip_gain.requires_grad
        assert isinstance(block.act, BNAct)
    # NF-RegNet calls act on the block input and again inside the branch (expanded width)
    assert len(bn.blocks[1].act.norms) == 2
    bn.train()
    out = bn(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    groups = nfnets.param_groups(bn)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(id(p) in no_decay for m in bn.modules() if isinstance(m, nn.BatchNorm2d)
               for p in m.parameters())


class _Block(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layers = nn.Sequential(*[_Block(8) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))


def test_any_module_with_named_blocks_and_branches():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(2, 3, 8, 8)
    names = ["layers.0", "layers.1", "layers.2"]
    by_name = signal_propagation(net, x, blocks=names, branch="branch")
    by_module = signal_propagation(net, x, blocks=list(net.layers), branch=[
        b.branch for b in net.layers])
    by_fn = signal_propagation(net, x, blocks=names,
                               branch=lambda block, h: block.branch(h))
    # reference: run the blocks by hand
    expected = []
    with torch.no_grad():
        h = net.stem(x)
        for block in net.layers:
            r = block.branch(h)
            h = h + r
            expected.append((*official_stats(h), official_stats(r)[1]))
    for table in (by_name, by_module, by_fn):
        got = [(r.avg_sq_mean, r.avg_var, r.res_avg_var) for r in table.rows]
        assert torch.tensor(got).double() == pytest.approx(torch.tensor(expected).double(),
                                                           rel=1e-5)
        assert table.column("name") == names
    # without a branch the column is NaN, the rest still measured
    assert all(math.isnan(v) for v in signal_propagation(net, x, names).column("res_avg_var"))
    # every hook is gone afterwards, also after an error
    with pytest.raises(ValueError, match="no submodule"):
        signal_propagation(net, x, blocks=names, branch="nope")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_bad_block_names_are_explained():
    net = _Net()
    with pytest.raises(ValueError, match="no NF residual blocks"):
        signal_propagation(net, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="not a module name"):
        signal_propagation(net, torch.randn(1, 3, 8, 8), blocks=["layers.7"])
    with pytest.raises(ValueError, match="not a module of the model"):
        signal_propagation(net, torch.randn(1, 3, 8, 8), blocks=[nn.Identity()])
    net.unused = nn.Identity()  # registered, never called
    with pytest.raises(ValueError, match="did not run"):
        signal_propagation(net, torch.randn(1, 3, 8, 8), blocks=["layers.0", "unused"])


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_cli_draws_the_figure_and_writes_the_numbers(tmp_path, capsys):
    out = tmp_path / "spp.png"
    argv = ["spp", "nf_resnet50", "--compare", "bn", "-o", str(out), "--image-size", "32",
            "--batch-size", "4", "--model-arg", "width=0.25", "--model-arg", "depths=[2,1,1,1]"]
    assert main(argv) == 0
    assert png_size(out) == (1430, 484)  # 13 x 4.4 inches at 110 dpi: three panels
    with open(tmp_path / "spp.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 5  # NF and BN, five blocks each
    assert {float(r["skip_gain"]) for r in rows} == {1.0}  # set for NF, frozen for BN
    assert {r["model"] for r in rows} == {"NF (init)", "BN-ReLU-Conv (init)"}
    record = json.loads((tmp_path / "spp.json").read_text())
    assert record["model"] == "nf_resnet50" and record["skip_gain"] == "1"
    assert [len(t["blocks"]) for t in record["tables"]] == [5, 5]
    assert record["tables"][0]["blocks"][0]["res_avg_var"] > 0.1  # skip gains set to 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[-3:] == [str(out), str(tmp_path / "spp.csv"), str(tmp_path / "spp.json")]


def test_cli_on_a_runs_weights_and_its_own_data(tmp_path, capsys):
    model = tiny("nfnet_f0")
    set_skip_gains_(model, 0.5)
    run = tmp_path / "run"
    run.mkdir()
    nfnets.save_weights(model, run / "model.safetensors")  # what nfnets train leaves behind
    (run / "config.json").write_text(json.dumps({"data": "digits", "seed": 0, "test_size": 32}))
    out = tmp_path / "trained.png"
    assert main(["spp", str(run), "--batch-size", "6", "-o", str(out)]) == 0
    record = json.loads((tmp_path / "trained.json").read_text())
    # trained weights keep their skip gains; the batch comes from the run's data and size
    assert record["skip_gain"] == "keep" and record["batch_size"] == 6
    assert {b["skip_gain"] for b in record["tables"][0]["blocks"]} == {0.5}
    assert record["input"] == "6 images of digits held-out split" and record["image_size"] == 32
    assert len(record["tables"]) == 1 and len(record["tables"][0]["blocks"]) == 5
    png_size(out)


@pytest.mark.parametrize("argv, message", [
    (["spp", "no_such_model"], "unknown model"),
    (["spp", "nf_resnet50", "-o", "x.jpg"], "must name a .png"),
    (["spp", "nf_resnet50", "--skip-gain", "lots", "--model-arg", "width=0.25",
      "--image-size", "32", "--batch-size", "2"], "--skip-gain"),
])
def test_cli_usage_errors(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ the AGC stability benchmark


def import_benchmark():
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import agc_stability
    finally:
        sys.path.remove(str(root / "benchmarks"))
    return agc_stability


def test_agc_benchmark_grid_logic():
    bench = import_benchmark()
    assert bench.clipping_of("agc_0.02") == 0.02
    assert bench.clipping_of("none") is None and bench.clipping_of("bn") is None

    def run(setting, lr, seed, top1):
        return bench.Run(setting, 64, lr, lr / 4, seed, top1 is None, 5, 10, None, top1,
                         None, 0.1)

    runs = [run("none", 0.1, 0, 50.0), run("none", 0.1, 1, 70.0), run("none", 0.1, 2, None),
            run("none", 1.6, 0, None), run("none", 1.6, 1, None), run("none", 1.6, 2, 90.0)]
    # one diverged seed of three: the median of the survivors, the divergence counted
    assert bench.cell_median(runs, "none", 64, 0.1) == (60.0, 1, 3)
    # most seeds diverged: the cell is diverged
    median, diverged, count = bench.cell_median(runs, "none", 64, 1.6)
    assert math.isnan(median) and (diverged, count) == (2, 3)
    table = bench.markdown(runs, [64], [0.1, 1.6, 6.4], ["none"], 3)
    assert "| none | 64 | 60.0 (1/3 div.) | diverged | not run |" in table


def test_agc_benchmark_merges_partial_grids(tmp_path):
    bench = import_benchmark()
    settings = {"model": "m", "model_args": {}, "data": "digits", "image_size": 32, "epochs": 5,
                "warmup_epochs": 1.0, "label_smoothing": 0.1, "settings": ["none"],
                "base_lrs": [0.1], "seeds": 1}
    paths = []
    for batch, top1 in ((256, None), (16, 80.0)):
        run = bench.Run("none", batch, 0.1, 0.1, 0, top1 is None, 3, 9, None, top1, None, 1.0)
        duplicate = bench.Run("none", 16, 0.1, 0.1, 0, False, 9, 9, None, 10.0, None, 1.0)
        record = {"command": f"run {batch}", "machine": {},
                  "runs": [bench.asdict(run), bench.asdict(duplicate)],
                  "settings": {**settings, "batch_sizes": [batch]}}
        paths.append(tmp_path / f"b{batch}.json")
        paths[-1].write_text(json.dumps(record))
    merged = bench.merge(paths)
    assert merged["settings"]["batch_sizes"] == [16, 256]
    # the 16-batch cell appears in both files: the first file's run is kept
    assert merged["command"] == ["run 256", "run 16"] and len(merged["runs"]) == 2
    table = bench.write_report(merged, tmp_path / "all.json", figures=False)
    assert "| none | 16 | 10.0 |" in table and "| none | 256 | diverged |" in table
    other = json.loads(paths[0].read_text())
    other["settings"]["epochs"] = 6
    paths[0].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="epochs differs"):
        bench.merge(paths)


def test_agc_benchmark_quick_mode(tmp_path):
    bench = import_benchmark()
    out = tmp_path / "agc.json"
    record = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["settings"]["settings"] == ["none", "agc_0.01", "bn"]
    runs = {(r["setting"], r["base_lr"]): r for r in record["runs"]}
    assert len(runs) == 6
    # at base LR 25.6 (LR 3.2) the unclipped NF net diverges within the epoch, AGC keeps it
    # finite, and the clipped run reports how many units it clipped
    assert runs["none", 25.6]["diverged"] and runs["none", 25.6]["top1"] is None
    assert not runs["agc_0.01", 25.6]["diverged"]
    assert 0 < runs["agc_0.01", 25.6]["clip_fraction"] <= 1
    assert runs["bn", 0.1]["clip_fraction"] is None
    assert "| agc_0.01 | 32 |" in out.with_suffix(".md").read_text()
    png_size(out.with_suffix(".png"))
