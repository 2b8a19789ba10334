"""CPU inference of NFNet-F0: ``nfnets.optimize_for_inference`` against timm's ``dm_nfnet_f0``.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_inference.py --reps 5

Three cases on the same random batch (F0's test size 256 px, batch 8, fp32, one thread):
``ours_opt`` (``optimize_for_inference``: our model fused and compiled with Inductor freezing),
``timm_compiled`` (timm's model compiled the same way: ``torch.compile`` traced and run under
``no_grad`` with ``torch._inductor.config.freezing`` set) and ``timm`` (timm eager, the
baseline). Each round runs every case
once, alternating the order; the medians of wall-clock and process CPU time are reported,
with each sample. Writes ``benchmarks/results/inference.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from report import load_average, machine_info

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed interleaved rounds")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="F0's test size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "inference.json")
    args = p.parse_args()

    import timm

    import nfnets

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    ours = nfnets.optimize_for_inference(nfnets.create_model("nfnet_f0").eval(), x)
    theirs = timm.create_model("dm_nfnet_f0").eval()
    compiled = torch.compile(theirs, dynamic=False)

    def theirs_compiled(x: torch.Tensor) -> torch.Tensor:  # as optimize_for_inference runs ours
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return compiled(x)

    theirs_compiled(x)  # compile before timing, as optimize_for_inference does
    with torch.no_grad():
        cases = {"ours_opt": lambda: ours(x), "timm_compiled": lambda: theirs_compiled(x),
                 "timm": lambda: theirs(x)}
        for run in cases.values():  # one untimed warm-up each
            run()
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for round_ in range(args.reps):
            order = list(cases) if round_ % 2 else list(reversed(cases))
            for name in order:
                wall, cpu = time.perf_counter(), time.process_time()
                cases[name]()
                samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))

    medians = {name: {"wall": statistics.median(s[0] for s in v),
                      "cpu": statistics.median(s[1] for s in v)} for name, v in samples.items()}
    ratios = {f"ours_opt_vs_{base}": {k: medians[base][k] / medians["ours_opt"][k]
                                      for k in ("wall", "cpu")}
              for base in ("timm", "timm_compiled")}
    result = {
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(torch.device("cpu")), "load_average": load_average(),
        "torch": torch.__version__, "timm": timm.__version__,
        "batch": args.batch, "size": args.size,
        "seconds_per_batch_median": medians, "speedup": ratios,
        "samples": {name: [{"wall": w, "cpu": c} for w, c in v] for name, v in samples.items()},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, m in medians.items():
        print(f"{name:>14}: {m['wall']:.3f} s wall, {m['cpu']:.3f} s CPU per batch")
    for name, r in ratios.items():
        print(f"{name}: {r['wall']:.2f}x wall, {r['cpu']:.2f}x CPU")


if __name__ == "__main__":
    main()
