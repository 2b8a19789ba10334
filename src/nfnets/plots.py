"""Training curves of a run as PNG files, from its ``metrics.jsonl``.

``plot_run(run_dir)`` writes ``run_dir/plots/{loss,accuracy,lr,clip_fraction}.png`` and returns
their paths; a figure with nothing to show (e.g. accuracy before the first evaluation) is not
written. The trainer calls it at the end of a run; ``nfnets plot RUN_DIR`` calls it any time.

Figures are drawn with matplotlib's Agg renderer through ``matplotlib.figure.Figure``, so no
display is needed and pyplot's global state (and any interactive backend) is left alone.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import DataError

__all__ = ["plot_run", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"
_DPI = 120

Records = list[dict[str, Any]]


def read_metrics(path: str | os.PathLike) -> tuple[Records, Records]:
    """The ``train`` and ``val`` records of a metrics.jsonl, ordered by step.

    A run resumed from an earlier checkpoint logs some steps again; the last record of a step
    wins. Lines that are not JSON objects (e.g. one cut short by a crash) are skipped with a
    warning. Raises FileNotFoundError for a missing file and DataError when it holds no
    train or val records.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file: {path} (is this a training run directory?)")
    latest: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "val": {}}
    bad = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                bad += 1
                continue
            if record.get("kind") in latest:
                latest[record["kind"]][record["step"]] = record
    if bad:
        warnings.warn(f"{path}: skipped {bad} malformed line(s)", stacklevel=2)
    train, val = ([r for _, r in sorted(latest[k].items())] for k in ("train", "val"))
    if not train and not val:
        raise DataError(f"{path} holds no training records yet; plot again once the run "
                         "has logged some steps")
    return train, val


def _series(records: Records, x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """(x, y) of the records where both are present (values may be null)."""
    pairs = [(r[x_key], r[y_key]) for r in records
             if r.get(x_key) is not None and r.get(y_key) is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


# (label, records key: "train" or "val", y key, line style) per curve
Curve = tuple[str, str, str, str]


def _figure(curves: Sequence[Curve], data: dict[str, Records], x_key: str, xlabel: str,
            ylabel: str, title: str, path: Path) -> Path | None:
    """Draw the curves that have data into ``path``; None (nothing written) when none has."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = [(label, style, *_series(data[source], x_key, key))
              for label, source, key, style in curves]
    series = [s for s in series if s[2]]
    if not series:
        return None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, style, x, y in series:
        ax.plot(x, y, style, label=label, markersize=4, linewidth=1)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are counts
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=_DPI)
    return path


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Write a run's training curves to ``run_dir/plots/`` and return the PNG paths.

    - ``loss.png``: training loss per logged step and validation loss (raw and EMA) per
      epoch, by step;
    - ``accuracy.png``: validation top-1, top-5 and EMA top-1 per epoch;
    - ``lr.png``: learning rate per step;
    - ``clip_fraction.png``: fraction of gradient units clipped by AGC per step.

    A figure without data is skipped. Raises FileNotFoundError when ``run_dir`` has no
    metrics.jsonl, DataError when it is empty, ImportError without matplotlib.
    """
    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir / METRICS_FILE)
    try:
        import matplotlib  # noqa: F401  (fail early with an installable name)
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'nfnets[demo]'") from err
    out = run_dir / PLOTS_DIR
    out.mkdir(exist_ok=True)
    data = {"train": train, "val": val}
    figures = [
        _figure([("train", "train", "loss", "-"), ("val", "val", "val_loss", "o-"),
                 ("val EMA", "val", "val_loss_ema", "^--")], data,
                "step", "step", "cross-entropy", "Loss (train: smoothed labels)",
                out / "loss.png"),
        _figure([("top-1", "val", "val_top1", "o-"), ("top-5", "val", "val_top5", "s-"),
                 ("EMA top-1", "val", "val_top1_ema", "^--")], data, "epoch", "epoch",
                "accuracy (%)", "Validation accuracy", out / "accuracy.png"),
        _figure([("lr", "train", "lr", "-")], data, "step", "step", "learning rate",
                "Learning rate", out / "lr.png"),
        _figure([("clipped", "train", "clip_fraction", "-")], data, "step", "step",
                "fraction of units clipped", "Adaptive gradient clipping",
                out / "clip_fraction.png"),
    ]
    return [path for path in figures if path is not None]
