"""Winograd F(4×4, 3×3) against direct oneDNN convolution on NFNet-F0's CPU inference.

    PYTHONPATH=src python benchmarks/bench_winograd.py          # ~2 min on 2 cores

Two sections, each timed in one process with interleaved repetitions after warm-up (medians):

- ``convs``: every distinct stride-1 3×3 conv of F0 at ``--size`` and ``--batch`` (input
  shape, groups, how often F0 runs it), called as the model calls it (standardised weights,
  GELU after it) with ``winograd.use_winograd()`` off and on; plus the output's relative error
  (max |error| / max |output|) of each path against the same conv in float64. Shapes the
  Winograd path does not take (``nfnets.winograd.applies``) are listed with their direct time.
- ``model``: the whole no-grad F0 forward, exact path against Winograd path, and the logits'
  relative error of each against the float64 model (skip gains set to 1 so that every
  residual branch reaches the output; at their initial 0 the branches would not count).

Writes ``benchmarks/results/<name>.json`` and the ``bench:<name>`` block of
``docs/performance.md``. Needs no timm.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from report import load_average, machine_info, update_doc
from torch import nn

import nfnets
from nfnets import winograd
from nfnets.layers import Conv2dSame

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="nfnet_f0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="F0's test size")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7, help="timed rounds per conv shape")
    p.add_argument("--model-reps", type=int, default=5, help="timed rounds of the model")
    p.add_argument("--name", default="winograd")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default: benchmarks/results/<name>.json)")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md",
                   help="markdown file to update ('' to skip)")
    return p.parse_args(argv)


def interleaved(cases: dict, warmup: int, reps: int) -> dict[str, float]:
    """Median seconds of each no-arg callable, run in turn (reversed every other round)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases.items())
    for round_ in range(warmup + reps):
        for name, fn in order if round_ % 2 else order[::-1]:
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def call(module: nn.Module, x: torch.Tensor, use: bool):
    def run() -> torch.Tensor:
        with torch.no_grad(), winograd.use_winograd(use):
            return module(x)
    return run


def conv_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[Conv2dSame, torch.Tensor]]:
    """Every stride-1 3×3 conv of ``model`` with the input it sees on ``x`` (first of each
    distinct shape), and how often that shape occurs."""
    seen: dict[tuple, list] = {}

    def hook(module, inputs, _output):
        key = (tuple(inputs[0].shape), module.groups, module.out_channels)
        if key in seen:
            seen[key][2] += 1
        else:
            seen[key] = [module, inputs[0].clone(), 1]

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, Conv2dSame) and m.kernel_size == (3, 3) and m.stride == (1, 1)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return list(seen.values())


def conv_section(model: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    rows = []
    for module, inp, count in conv_inputs(model, x):
        inp = inp.contiguous(memory_format=torch.channels_last)  # as the oneDNN path runs
        with winograd.use_winograd():
            takes = winograd.applies(inp, module.weight.shape, module.stride, module.groups)
        cases = {"direct": call(module, inp, False)}
        if takes:
            cases["winograd"] = call(module, inp, True)
        times = interleaved(cases, args.warmup, args.reps)
        reference = copy.deepcopy(module).double()
        with torch.no_grad():
            expected = reference(inp.double())
        row = {"input": list(inp.shape), "groups": module.groups,
               "out_channels": module.out_channels, "count": count, "winograd": takes,
               "direct_ms": 1e3 * times["direct"],
               "direct_rel_err": rel_err(cases["direct"](), expected)}
        if takes:
            row |= {"winograd_ms": 1e3 * times["winograd"],
                    "winograd_rel_err": rel_err(cases["winograd"](), expected),
                    "speedup": times["direct"] / times["winograd"]}
        rows.append(row)
        print(row, flush=True)
    return rows


def model_section(model: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> dict:
    times = interleaved({"exact": call(model, x, False), "winograd": call(model, x, True)},
                        args.warmup, args.model_reps)
    with_branches = copy.deepcopy(model)
    with torch.no_grad():
        for block in with_branches.blocks:
            block.skip_gain.fill_(1.0)
        expected = copy.deepcopy(with_branches).double()(x.double())
    errors = {path: rel_err(call(with_branches, x, use)(), expected)
              for path, use in (("exact", False), ("winograd", True))}
    return {"exact_s": times["exact"], "winograd_s": times["winograd"],
            "speedup": times["exact"] / times["winograd"],
            "exact_rel_err": errors["exact"], "winograd_rel_err": errors["winograd"]}


def markdown(report: dict) -> str:
    a, m = report["args"], report["machine"]
    lines = [f"Measured {report['date']} on {m['cpu']} ({m['logical_cpus']} logical CPUs, "
             f"{a['threads']} torch thread(s)); torch {report['torch']}. Load average before / "
             f"after: {report['load_before']} / {report['load_after']}.", "",
             f"Command: `{report['command']}`", "",
             f"**Stride-1 3×3 convs of {a['model']}** at {a['size']} px, batch {a['batch']} "
             f"(conv + GELU as the model runs them; median of {a['reps']} interleaved rounds; "
             "error = max |error| / max |output| against float64):", "",
             "| input (N, C, H, W) | groups | × in model | direct ms | Winograd ms | speedup "
             "| direct error | Winograd error |", "|---|---|---|---|---|---|---|---|"]
    for r in report["convs"]:
        shape = "×".join(str(d) for d in r["input"])
        if r["winograd"]:
            lines.append(f"| {shape} | {r['groups']} | {r['count']} | {r['direct_ms']:.1f} | "
                         f"{r['winograd_ms']:.1f} | {r['speedup']:.2f}× | "
                         f"{r['direct_rel_err']:.1e} | {r['winograd_rel_err']:.1e} |")
        else:
            lines.append(f"| {shape} | {r['groups']} | {r['count']} | {r['direct_ms']:.1f} | "
                         f"not taken | – | {r['direct_rel_err']:.1e} | – |")
    mod = report["model"]
    lines += ["", f"**Whole model** (no-grad forward, median of {a['model_reps']} interleaved "
              f"rounds): exact path {mod['exact_s']:.3f} s, Winograd path "
              f"{mod['winograd_s']:.3f} s, **{mod['speedup']:.3f}×**. Logits' error against "
              f"float64: exact {mod['exact_rel_err']:.1e}, Winograd "
              f"{mod['winograd_rel_err']:.1e}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nfnets.create_model(args.model).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": "python " + " ".join(["benchmarks/bench_winograd.py", *sys.argv[1:]]),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": machine_info(torch.device("cpu")), "torch": torch.__version__,
              "load_before": load_average()}
    print("convs ...", flush=True)
    report["convs"] = conv_section(model, x, args)
    print("model ...", flush=True)
    report["model"] = model_section(model, x, args)
    report["load_after"] = load_average()
    out = args.out or ROOT / "benchmarks" / "results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    if str(args.doc):
        update_doc(args.doc, args.name, text)
    print(text)


if __name__ == "__main__":
    main()
