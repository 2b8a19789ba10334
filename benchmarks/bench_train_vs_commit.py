"""F0 training-step time of this checkout against another commit, interleaved in one process.

    PYTHONPATH=src python benchmarks/bench_train_vs_commit.py --baseline main --reps 9

The baseline's ``src/nfnets`` is taken with ``git archive`` and imported under another package
name (the library uses relative imports only), so both versions build the same F0 (same
seed, dropout 0.2, the recipe's stochastic depth 0.25) and run the same step — forward,
cross-entropy, backward, AGC and SGD through each version's own ``nfnets.optim.sgd_agc`` — on
the same batch, alternating, one thread by default. ``--variant full_batch_sd`` adds a third
case: this checkout with stochastic depth computed on the whole batch times the mask (no
kept-samples path), which measures what ``nfnets.models.common._kept_samples`` buys.

Writes ``--out`` (JSON: medians of wall and process CPU time, per-round ratios to the
baseline, every sample, machine, command).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from report import load_average, machine_info

ROOT = Path(__file__).resolve().parent.parent


def import_commit(rev: str, into: Path) -> object:
    """The ``nfnets`` package of commit ``rev``, imported as ``nfnets_baseline``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/nfnets"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "src" / "nfnets").rename(into / "nfnets_baseline")
    sys.path.insert(0, str(into))
    return importlib.import_module("nfnets_baseline")


def train_step(lib, batch: int, size: int, stochdepth: float
               ) -> Callable[[], tuple[float, float]]:
    """One recipe training step of ``lib``'s F0 on a fixed batch; returns its (wall, CPU)
    seconds. The process CPU time of a one-thread step counts only the time it ran, so it is
    the steadier figure on a machine that other programs share."""
    torch.manual_seed(0)
    model = lib.create_model("nfnet_f0", 1000, drop_rate=0.2, stochdepth_rate=stochdepth).train()
    opt = lib.optim.sgd_agc(model, lib.optim.peak_lr(batch), momentum=0.9, weight_decay=2e-5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)

    def run() -> tuple[float, float]:
        torch.manual_seed(1)  # the same stochastic-depth masks on every side and sample
        start, cpu = time.perf_counter(), time.process_time()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default="main", help="git revision to compare against")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=192, help="F0's train size")
    p.add_argument("--stochdepth", type=float, default=0.25, help="the recipe's rate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--variant", action="append", default=[], choices=["full_batch_sd"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_vs_commit.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import nfnets
    from nfnets.models import common

    with tempfile.TemporaryDirectory() as tmp:
        baseline = import_commit(args.baseline, Path(tmp))
        cases = {"baseline": train_step(baseline, args.batch, args.size, args.stochdepth),
                 "current": train_step(nfnets, args.batch, args.size, args.stochdepth)}
        if "full_batch_sd" in args.variant:
            step = train_step(nfnets, args.batch, args.size, args.stochdepth)

            def full_batch() -> tuple[float, float]:
                kept = common._kept_samples
                common._kept_samples = lambda mask, x: None  # whole batch × mask
                try:
                    return step()
                finally:
                    common._kept_samples = kept

            cases["current_full_batch_sd"] = full_batch
        samples: dict[str, dict[str, list[float]]] = {
            clock: {name: [] for name in cases} for clock in ("wall", "cpu")}
        for round_ in range(args.warmup + args.reps):
            order = list(cases) if round_ % 2 == 0 else list(reversed(cases))
            times = {name: cases[name]() for name in order}
            if round_ >= args.warmup:
                for name, (wall, cpu) in times.items():
                    samples["wall"][name].append(wall)
                    samples["cpu"][name].append(cpu)
            print(f"round {round_}: " + ", ".join(f"{n} {w:.3f} s (cpu {c:.3f} s)"
                                                  for n, (w, c) in times.items()), flush=True)

    median = {clock: {name: statistics.median(s) for name, s in by_name.items()}
              for clock, by_name in samples.items()}
    # Per-round ratios cancel load changes that hit both sides of one round alike.
    paired = {clock: {name: sorted(a / b for a, b in zip(s, by_name["baseline"], strict=True))
                      for name, s in by_name.items() if name != "baseline"}
              for clock, by_name in samples.items()}
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": machine_info(torch.device("cpu")),
        "torch": torch.__version__,
        "load_before": load_average(),
        "median_s": median,
        "median_ratio_to_baseline": {
            clock: {n: statistics.median(r) for n, r in by_name.items()}
            for clock, by_name in paired.items()},
        "ratio_to_baseline_range": {
            clock: {n: [r[0], r[-1]] for n, r in by_name.items()}
            for clock, by_name in paired.items()},
        "samples_s": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "median_ratio_to_baseline",
                                             "ratio_to_baseline_range")}, indent=2))


if __name__ == "__main__":
    main()
