"""Training-curve plots from a synthetic metrics.jsonl."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from nfnets.cli import main
from nfnets.plots import plot_run, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_line(step: int, loss: float = 2.0, clip: float | None = 0.1) -> dict:
    return {"kind": "train", "step": step, "epoch": step // 10, "loss": loss,
            "lr": 0.1 * min(1.0, step / 10), "clip_fraction": clip,
            "images_per_second": 100.0, "seconds": step * 0.5}


def val_line(epoch: int, top1: float | None) -> dict:
    return {"kind": "val", "epoch": epoch, "step": 10 * epoch, "train_loss": 2.0 / epoch,
            "val_loss": 1.5 / epoch, "val_top1": top1, "val_top5": 90.0,
            "val_top1_ema": None if epoch == 1 else 55.0, "val_top5_ema": None}


def write_metrics(run: Path, records: list[dict], tail: str = "") -> Path:
    run.mkdir(exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (run / "metrics.jsonl").write_text(text)
    return run


def assert_png(path: Path) -> None:
    """A PNG of the plots' size: 7 x 4.5 inches at 120 dpi (IHDR: width, height at 16..24)."""
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (840, 540), path


@pytest.fixture
def drawn(monkeypatch):
    """{figure file name: {curve label: (x, y)}} of every figure plot_run saves."""
    from matplotlib.figure import Figure

    curves: dict[str, dict[str, tuple[list, list]]] = {}
    savefig = Figure.savefig

    def recording(fig, path, *args, **kwargs):
        (ax,) = fig.axes
        curves[Path(path).name] = {line.get_label(): (list(line.get_xdata()),
                                                      list(line.get_ydata()))
                                   for line in ax.get_lines()}
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return curves


def test_plot_run_writes_every_figure(tmp_path, drawn):
    records = [train_line(s, loss=3.0 - 0.05 * s, clip=None if s % 7 == 0 else 0.02)
               for s in range(1, 31)]
    records += [val_line(e, top1=None if e == 2 else 40.0 + e) for e in (1, 2, 3)]
    run = write_metrics(tmp_path / "run", records)
    paths = plot_run(run)
    names = ["loss.png", "accuracy.png", "lr.png", "clip_fraction.png"]
    assert paths == [run / "plots" / name for name in names]
    for path in paths:
        assert_png(path)
    steps = list(range(1, 31))
    clipped = [s for s in steps if s % 7]
    assert drawn["loss.png"]["train"] == (steps, [3.0 - 0.05 * s for s in steps])
    assert drawn["loss.png"]["val"] == ([10, 20, 30], [1.5, 0.75, 0.5])
    assert "val EMA" not in drawn["loss.png"]  # no val_loss_ema in these records: no curve
    assert drawn["accuracy.png"]["top-1"] == ([1, 3], [41.0, 43.0])  # epoch 2 has no top-1
    assert drawn["accuracy.png"]["top-5"] == ([1, 2, 3], [90.0] * 3)
    assert drawn["accuracy.png"]["EMA top-1"] == ([2, 3], [55.0, 55.0])
    assert drawn["lr.png"]["lr"] == (steps, [0.1 * min(1.0, s / 10) for s in steps])
    assert drawn["clip_fraction.png"]["clipped"] == (clipped, [0.02] * len(clipped))


def test_a_run_without_evaluations_still_plots(tmp_path, capsys, drawn):
    run = write_metrics(tmp_path / "run", [train_line(s, clip=None) for s in range(1, 6)])
    paths = plot_run(run)
    # no val records: no accuracy figure; AGC off (clip_fraction null): no clipping figure
    assert [p.name for p in paths] == ["loss.png", "lr.png"]
    for path in paths:
        assert_png(path)
    assert set(drawn) == {"loss.png", "lr.png"}
    assert drawn["loss.png"]["train"] == ([1, 2, 3, 4, 5], [2.0] * 5)
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(p) for p in paths]


def test_resumed_steps_and_a_cut_line(tmp_path):
    records = [train_line(1, loss=5.0), train_line(2, loss=4.0), val_line(1, 10.0),
               train_line(2, loss=3.0), train_line(3, loss=2.0)]  # resumed at step 1
    run = write_metrics(tmp_path / "run", records, tail='{"kind": "train", "ste')
    with pytest.warns(UserWarning, match="skipped 1 malformed line"):
        train, val = read_metrics(run / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in train] == [(1, 5.0), (2, 3.0), (3, 2.0)]
    assert [r["val_top1"] for r in val] == [10.0]


def test_missing_or_empty_metrics_are_clear_errors(tmp_path, capsys):
    status = main(["plot", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert status == 2 and "no metrics file" in err and "nowhere" in err
    run = write_metrics(tmp_path / "run", [])
    status = main(["plot", str(run)])
    err = capsys.readouterr().err
    assert status == 2 and "holds no training records yet" in err
    assert not (run / "plots").exists()
