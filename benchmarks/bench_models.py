"""Speed and memory of nfnets' NFNet-F0 against timm's dm_nfnet_f0, measured in one process.

    PYTHONPATH=src python benchmarks/bench_models.py            # CPU table, ~4 min on 2 cores
    PYTHONPATH=src python benchmarks/bench_models.py --compile --threads 2 --reps 5

What is measured (F0 on both sides, same batch, same input, same threads):

- ``train``: images/s of a full training step at ``--train-size`` (192, F0's train size):
  forward, cross-entropy, backward, AGC, SGD (Nesterov, weight decay), zero_grad. Ours uses
  the official recipe (``nfnets.optim.sgd_agc``: every parameter but the classifier weight
  clipped); timm uses ``create_optimizer_v2("sgd")`` and ``timm.utils.adaptive_clip_grad``
  on ``model_parameters(exclude_head=True)``, as timm's train.py does. The AGC phase is timed
  on its own ("AGC share"). Both models have dropout 0.2 and the stochastic depth rate of
  F0's training config, 0.25 (``--stochdepth``; the model's default is 0.1).
- ``matmul``: a square float32 matmul timed alongside the training steps; the model
  utilisation is (official MACs x 2 FLOPs x 3 for forward + backward x batch / step time)
  divided by its FLOP rate (2 FLOPs per multiply-accumulate on both sides).
- ``eval``: images/s of a no-grad forward at ``--eval-size`` (256, F0's test size);
  ``latency``: the same at batch 1 (ms).
- ``memory``: peak memory of one training step, measured in a fresh subprocess per side
  (see ``peak_step_memory``).

Every time is a median over interleaved repetitions after warm-up: each repetition runs
every case once in turn, so a change in machine load hits all of them alike. Writes
``--out`` (JSON with the machine, versions and command) and the tables between the
``bench:<name>`` markers of ``docs/performance.md``. Needs timm: pip install 'nfnets[bench]'.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from report import load_average, machine_info, update_doc
from torch import nn

import nfnets
from nfnets.optim import peak_lr, sgd_agc

try:
    import timm
    from timm.models import model_parameters
    from timm.optim import create_optimizer_v2
    from timm.utils import adaptive_clip_grad
except ImportError:  # pragma: no cover - message for users without the extra
    sys.exit("the benchmarks compare with timm: pip install 'nfnets[bench]' (or pip install timm)")

ROOT = Path(__file__).resolve().parent.parent
MODEL = "nfnet_f0"
TIMM_MODEL = "dm_nfnet_f0"
NUM_CLASSES = 1000
# F0's dropout (deepmind-research nfnets/base.py: nfnet_params) and the training
# config's stochastic depth rate (0.25, as
# paper A.1; the model's own default is 0.1), given to timm too so both run the same net.
DROP_RATE, STOCHDEPTH_RATE = 0.2, 0.25
# The official recipe's SGD and AGC settings (nfnets/experiment_nfnets.py, nfnets/optim.py),
# used for timm as well.
MOMENTUM, WEIGHT_DECAY, CLIPPING, AGC_EPS = 0.9, 2e-5, 0.01, 1e-3

# The targets on the 2-core CPU: (key, description, threshold, "min" | "max").
CPU_TARGETS = [
    ("train_vs_timm", "training images/s, ours / timm (fp32, eager)", 1.10, "min"),
    ("eval_optimized_vs_timm", "eval images/s, optimize_for_inference / timm eager (fp32)",
     1.25, "min"),
    ("eval_optimized_vs_timm_compiled",
     "eval images/s, optimize_for_inference / timm compiled the same way (fp32)", 1.0, "min"),
    ("bf16_vs_fp32", "bf16 training images/s / our fp32", 1.80, "min"),
    ("utilisation", "model FLOP rate / matmul FLOP rate (fp32 training)", 0.75, "min"),
    ("memory_vs_timm", "peak training-step memory, ours / timm", 1.00, "max"),
]


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on the CPU, where every op is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Case:
    """One timed thing: ``run()`` does one repetition and may return its phases' seconds."""

    name: str
    run: Callable[[], dict[str, float] | None]
    images: int = 0
    flops: float = 0.0  # FLOPs of one repetition, for rates
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict:
        wall = statistics.median(self.wall)
        out = {
            "median_s": wall,
            "wall_s": self.wall,
            # Process CPU time counts only the time this process ran, so it is less sensitive
            # to other programs taking the cores (divide by the threads for a wall estimate).
            "median_cpu_s": statistics.median(self.cpu),
        }
        if self.images:
            out["images_per_s"] = self.images / wall
        if self.flops:
            out["tflop_per_s"] = self.flops / wall / 1e12
        for phase, times in self.phases.items():
            out[f"median_{phase}_s"] = statistics.median(times)
        return out


def run_interleaved(cases: list[Case], warmup: int, reps: int, device: torch.device) -> None:
    """Warm every case up, then time ``reps`` rounds that each run every case once.

    Warm-up rounds are interleaved too, so the first timed round starts from the same state
    as the others. Odd rounds run the cases in reverse order: what a case inherits from the
    one before it (caches, allocator state) then evens out over the rounds.
    """
    for round_index in range(warmup):
        for case in cases if round_index % 2 == 0 else reversed(cases):
            case.run()
    for round_index in range(reps):
        for case in cases if round_index % 2 == 0 else reversed(cases):
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            phases = case.run()
            synchronize(device)
            case.wall.append(time.perf_counter() - wall)
            case.cpu.append(time.process_time() - cpu)
            for phase, seconds in (phases or {}).items():
                case.phases.setdefault(phase, []).append(seconds)


# ----------------------------------------------------------------------------- models


def build(side: str, device: torch.device, stochdepth: float = STOCHDEPTH_RATE) -> nn.Module:
    """F0 from nfnets ('ours') or timm ('timm'), with the same dropout and stochastic depth."""
    torch.manual_seed(0)
    if side == "ours":
        model = nfnets.create_model(MODEL, NUM_CLASSES, drop_rate=DROP_RATE,
                                    stochdepth_rate=stochdepth)
    elif side == "timm":
        model = timm.create_model(TIMM_MODEL, num_classes=NUM_CLASSES, drop_rate=DROP_RATE,
                                  drop_path_rate=stochdepth)
    else:
        raise ValueError(f"side must be 'ours' or 'timm', got {side!r}")
    return model.to(device)


def model_flops(image_size: int) -> float:
    """FLOPs of one F0 forward pass: the official MAC count (count_conv_flops) × 2."""
    with torch.device("meta"):  # the count needs the structure, not the weights
        model = nfnets.create_model(MODEL, NUM_CLASSES)
    return 2.0 * nfnets.count_flops(model, image_size)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on ``device``, or nothing for float32."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def inputs(batch: int, size: int, device: torch.device, channels_last: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    return x, y


class TrainStep:
    """One full training step of ``side``'s F0; returns the seconds of its phases."""

    def __init__(self, side: str, model: nn.Module, batch: int, size: int,
                 device: torch.device, amp: torch.dtype | None = None,
                 channels_last: bool = False, compile: bool = False) -> None:
        self.device, self.amp = device, amp
        model.train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(model) if compile else model
        lr = peak_lr(batch)
        if side == "ours":
            opt = sgd_agc(model, lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                          clipping=CLIPPING, eps=AGC_EPS)
            # AGC.step() is clip_grad_() then the wrapped SGD's step(); split to time each.
            self.clip, self.sgd = opt.clip_grad_, opt.optimizer
        else:
            self.sgd = create_optimizer_v2(model, "sgd", lr=lr, weight_decay=WEIGHT_DECAY,
                                           momentum=MOMENTUM)
            clipped = model_parameters(model, exclude_head=True)
            self.clip = lambda: adaptive_clip_grad(clipped, CLIPPING, AGC_EPS)
        self.x, self.y = inputs(batch, size, device, channels_last)

    def __call__(self) -> dict[str, float]:
        start = time.perf_counter()
        with autocast(self.device, self.amp):
            logits = self.forward(self.x)
        # Logits in float32 for the loss, as the official bf16 recipe (nfnets/experiment_nfnets.py).
        F.cross_entropy(logits.float(), self.y).backward()
        synchronize(self.device)
        clip_start = time.perf_counter()
        self.clip()
        synchronize(self.device)
        clip_end = time.perf_counter()
        self.sgd.step()
        self.sgd.zero_grad(set_to_none=True)
        return {"forward_backward": clip_start - start, "agc": clip_end - clip_start,
                "sgd": time.perf_counter() - clip_end}


def eval_forward(model: nn.Module, batch: int, size: int, device: torch.device,
                 amp: torch.dtype | None = None, channels_last: bool = False
                 ) -> Callable[[], None]:
    """A no-grad forward of ``model`` (already in its final form) on a fixed batch."""
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x, _ = inputs(batch, size, device, channels_last)

    def run() -> None:
        with torch.no_grad(), autocast(device, amp):
            model(x)

    return run


class FrozenCompiled(nn.Module):
    """``torch.compile`` as ``nfnets.optimize_for_inference`` does it (Inductor freezing on
    the CPU: weights become constants, so convs use pre-packed weights and fused epilogues),
    for timm's model or our unfused one. Freezing needs no_grad and the global Inductor flag
    while Dynamo traces (see ``nfnets/inference.py``), so both are set around every call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.freeze = next(model.parameters()).device.type == "cpu"
        self.compiled = torch.compile(model, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), inductor_config.patch(freezing=self.freeze):
            return self.compiled(x)


def matmul(n: int, device: torch.device, dtype: torch.dtype, repeats: int
           ) -> tuple[Callable[[], None], float]:
    """A square (n×n)·(n×n) matmul repeated ``repeats`` times, and its FLOPs (2n³ each)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)

    def run() -> None:
        for _ in range(repeats):
            torch.mm(a, b)

    return run, 2.0 * n**3 * repeats


# ----------------------------------------------------------------------------- memory


def _rss_kib(field_name: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+) kB", status).group(1))


def peak_step_memory(side: str, batch: int, size: int, device: torch.device,
                     stochdepth: float = STOCHDEPTH_RATE) -> dict:
    """Peak memory of one training step, above what the model and optimiser hold anyway.

    Runs in a fresh process (``--memory-child``). One warm-up step creates the momentum
    buffers; after ``zero_grad(set_to_none=True)`` the resident memory is the baseline; then
    one more step runs and its high-water mark is read. On the CPU that is Linux's VmHWM
    (reset through /proc/self/clear_refs), with glibc's mmap threshold fixed at 64 KiB by
    the parent so every tensor's memory goes back to the system when freed and RSS follows
    the live tensors; on CUDA it is ``torch.cuda.max_memory_allocated``.
    """
    model = build(side, device, stochdepth)
    step = TrainStep(side, model, batch, size, device)
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"method": "torch.cuda.max_memory_allocated", "baseline_bytes": base,
                "peak_bytes": peak, "step_bytes": peak - base}
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    step()
    peak = _rss_kib("VmHWM")
    return {"method": "VmHWM - VmRSS (Linux), MALLOC_MMAP_THRESHOLD_=65536",
            "baseline_bytes": base * 1024, "peak_bytes": peak * 1024,
            "step_bytes": (peak - base) * 1024}


def memory_in_subprocess(side: str, args: argparse.Namespace) -> dict:
    """Run ``peak_step_memory`` for ``side`` in a fresh interpreter and return its result."""
    if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        return {"skipped": "peak RSS needs Linux's /proc/self/clear_refs"}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", side,
           "--device", args.device, "--threads", str(args.threads),
           "--train-batch", str(args.train_batch), "--train-size", str(args.train_size),
           "--stochdepth", str(args.stochdepth)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement for {side} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- cases

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
TRAIN_SIDES = ("ours", "timm")
# ours: eval mode (WS on every call); ours_fused: optimize_for_inference(compile=False);
# ours_opt: optimize_for_inference(), the compiled path (give it no :compile flag).
EVAL_SIDES = ("ours", "ours_fused", "ours_opt", "timm")


@dataclass(frozen=True)
class Spec:
    """A case spec ``side:dtype[:cl][:compile]``, e.g. ``ours:bf16:cl``."""

    side: str
    dtype: str
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def parse(cls, text: str, sides: tuple[str, ...]) -> Spec:
        side, dtype, *flags = text.strip().split(":")
        if side not in sides or dtype not in DTYPES or set(flags) - {"cl", "compile"}:
            raise ValueError(f"bad case {text!r}: use side:dtype[:cl][:compile] with "
                             f"side in {sides} and dtype in {tuple(DTYPES)}")
        return cls(side, dtype, "cl" in flags, "compile" in flags)

    def __str__(self) -> str:
        return ":".join([self.side, self.dtype] + ["cl"] * self.channels_last
                        + ["compile"] * self.compile)


def parse_specs(text: str, sides: tuple[str, ...]) -> list[Spec]:
    return [Spec.parse(item, sides) for item in text.split(",") if item.strip()]


def train_section(specs: list[Spec], args: argparse.Namespace, device: torch.device
                  ) -> dict[str, dict]:
    """Interleaved training steps of every spec, plus the matmul reference of each dtype."""
    models: dict[tuple[str, bool], nn.Module] = {}  # one model per side and memory format
    cases = []
    step_flops = 3 * model_flops(args.train_size) * args.train_batch  # forward + backward
    for spec in specs:
        key = (spec.side, spec.channels_last)
        if key not in models:
            models[key] = build(spec.side, device, args.stochdepth)
        step = TrainStep(spec.side, models[key], args.train_batch, args.train_size, device,
                         DTYPES[spec.dtype], spec.channels_last, spec.compile)
        cases.append(Case(str(spec), step, args.train_batch, step_flops))
    for dtype in sorted({spec.dtype for spec in specs}):
        run, flops = matmul(args.matmul_size, device, DTYPES[dtype] or torch.float32,
                            args.matmul_repeats)
        cases.append(Case(f"matmul:{dtype}", run, flops=flops))
    run_interleaved(cases, args.warmup, args.reps, device)
    return {case.name: case.summary() for case in cases}


def eval_models(specs: list[Spec], device: torch.device, batch: int, size: int
                ) -> dict[Spec, nn.Module]:
    """The model each eval spec runs: eval-mode ours/timm, ours through
    ``optimize_for_inference`` (fused, or fused and compiled), compiled if asked."""
    base = {side: build(side, device).eval() for side in {"ours", "timm"}
            if any(spec.side.startswith(side) for spec in specs)}
    models = {}
    for spec in specs:
        if spec.side in ("ours_fused", "ours_opt"):
            x, _ = inputs(batch, size, device, spec.channels_last)
            model = base["ours"]
            if spec.channels_last:
                model = copy.deepcopy(model).to(memory_format=torch.channels_last)
            models[spec] = nfnets.optimize_for_inference(model, x,
                                                         compile=spec.side == "ours_opt")
            continue
        # One copy per spec: channels-last conversion must not leak into other cases.
        model = copy.deepcopy(base[spec.side])
        if spec.channels_last:
            model.to(memory_format=torch.channels_last)
        models[spec] = FrozenCompiled(model) if spec.compile else model
    return models


def eval_section(specs: list[Spec], models: dict[Spec, nn.Module], batch: int, size: int,
                 reps: int, args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    cases = [Case(str(spec), eval_forward(models[spec], batch, size, device,
                                          DTYPES[spec.dtype], spec.channels_last), batch)
             for spec in specs]
    run_interleaved(cases, args.warmup, reps, device)
    return {case.name: case.summary() for case in cases}


# ----------------------------------------------------------------------------- report


def versions() -> dict:
    return {"nfnets": nfnets.__version__, "torch": torch.__version__,
            "timm": timm.__version__}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _get(section: dict, case: str, key: str) -> float | None:
    return section.get(case, {}).get(key)


def _best(section: dict, prefixes: tuple[str, ...], key: str, lowest: bool = False
          ) -> tuple[str | None, float | None]:
    """The case whose name starts with one of ``prefixes`` with the best ``key``."""
    found = [(name, res[key]) for name, res in section.items()
             if name.startswith(prefixes) and key in res]
    if not found:
        return None, None
    return (min if lowest else max)(found, key=lambda item: item[1])


def _eager(section: dict) -> dict:
    """The uncompiled cases of ``section``."""
    return {name: res for name, res in section.items()
            if "compile" not in name and not name.startswith("ours_opt")}


def ratios(report: dict) -> dict:
    """The figures the targets are about (None where a needed case was not run)."""
    train, ev, lat = (report["results"].get(k, {}) for k in ("train", "eval", "latency"))
    mem = report["results"].get("memory", {})
    ips = "images_per_s"
    out = {
        "train_vs_timm": _ratio(_get(train, "ours:fp32", ips), _get(train, "timm:fp32", ips)),
        "train_compiled_vs_timm_compiled": _ratio(_get(train, "ours:fp32:compile", ips),
                                                  _get(train, "timm:fp32:compile", ips)),
        "bf16_vs_fp32": _ratio(_get(train, "ours:bf16", ips), _get(train, "ours:fp32", ips)),
        "bf16_cl_vs_fp32": _ratio(_get(train, "ours:bf16:cl", ips),
                                  _get(train, "ours:fp32", ips)),
        "channels_last_fp32_train": _ratio(_get(train, "ours:fp32:cl", ips),
                                           _get(train, "ours:fp32", ips)),
        "utilisation": _ratio(_get(train, "ours:fp32", "tflop_per_s"),
                              _get(train, "matmul:fp32", "tflop_per_s")),
        "utilisation_bf16": _ratio(_get(train, "ours:bf16", "tflop_per_s"),
                                   _get(train, "matmul:bf16", "tflop_per_s")),
        "agc_share": _ratio(_get(train, "ours:fp32", "median_agc_s"),
                            _get(train, "ours:fp32", "median_s")),
        "timm_agc_share": _ratio(_get(train, "timm:fp32", "median_agc_s"),
                                 _get(train, "timm:fp32", "median_s")),
    }
    eager = ("ours:fp32", "ours_fused:fp32")  # eager fp32 paths, NCHW or channels-last
    timm_ips, timm_latency = _get(ev, "timm:fp32", ips), _get(lat, "timm:fp32", "median_s")
    name, best = _best(_eager(ev), eager, ips)
    out["eval_vs_timm"] = _ratio(best, timm_ips)
    out["eval_vs_timm_case"] = name
    name, best = _best(_eager(lat), eager, "median_s", lowest=True)
    out["latency_vs_timm"] = _ratio(best, timm_latency)
    out["latency_vs_timm_case"] = name
    # The one fast path, optimize_for_inference, against timm eager and timm compiled alike.
    name, best = _best(ev, ("ours_opt:fp32",), ips)
    out["eval_optimized_vs_timm"] = _ratio(best, timm_ips)
    out["eval_optimized_vs_timm_compiled"] = _ratio(best, _get(ev, "timm:fp32:compile", ips))
    out["eval_optimized_case"] = name
    name, best = _best(lat, ("ours_opt:fp32",), "median_s", lowest=True)
    out["latency_optimized_vs_timm"] = _ratio(best, timm_latency)
    out["latency_optimized_vs_timm_compiled"] = _ratio(
        best, _get(lat, "timm:fp32:compile", "median_s"))
    out["memory_vs_timm"] = _ratio(mem.get("ours", {}).get("step_bytes"),
                                   mem.get("timm", {}).get("step_bytes"))
    return out


def targets(figures: dict) -> list[dict]:
    rows = []
    for key, what, threshold, kind in CPU_TARGETS:
        value = figures.get(key)
        met = None if value is None else (value >= threshold if kind == "min"
                                          else value <= threshold)
        rows.append({"key": key, "what": what, "value": value,
                     "target": f"{'≥' if kind == 'min' else '≤'} {threshold:g}", "met": met})
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """The report as markdown tables (what goes between the doc's markers)."""
    args, res = report["args"], report["results"]
    m, v = report["machine"], report["versions"]
    device = m.get("gpu", m["cpu"])
    lines = [
        f"Measured {report['date']} on {device} ({m['logical_cpus']} logical CPUs, "
        f"{args['threads']} torch thread(s)); torch {v['torch']}, timm {v['timm']}, "
        f"nfnets {v['nfnets']}, Python {m['python']}. Load average before / after: "
        f"{report['load_before']} / {report['load_after']}.",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    if "train" in res:
        lines += [
            f"**Training step** at {args['train_size']} px, batch {args['train_batch']}, "
            f"stochastic depth {args.get('stochdepth', 0.1)} "
            f"(forward, loss, backward, AGC, SGD), median of {args['reps']} interleaved "
            "repetitions after warm-up:",
            "",
            "| case | images/s | ms/step | AGC ms (share) | TFLOP/s | CPU s/step |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in res["train"].items():
            if name.startswith("matmul"):
                continue
            agc = r.get("median_agc_s")
            lines.append(
                f"| {name} | {_fmt(r['images_per_s'])} | {_fmt(r['median_s'] * 1e3, 0)} | "
                f"{_fmt(agc * 1e3, 1)} ({_fmt(100 * agc / r['median_s'], 1)}%) | "
                f"{_fmt(r['tflop_per_s'], 3)} | {_fmt(r['median_cpu_s'])} |")
        for name, r in res["train"].items():
            if name.startswith("matmul"):
                lines.append(f"| {name} {args['matmul_size']}² reference | – | – | – | "
                             f"{_fmt(r['tflop_per_s'], 3)} | {_fmt(r['median_cpu_s'])} |")
        lines.append("")
    for key, title in (("eval", "**Eval** (no grad)"), ("latency", "**Batch-1 latency**")):
        if key not in res:
            continue
        batch = args["eval_batch"] if key == "eval" else 1
        lines += [f"{title} at {args['eval_size']} px, batch {batch}:", "",
                  "| case | images/s | ms/batch | CPU s/batch |", "|---|---|---|---|"]
        for name, r in res[key].items():
            lines.append(f"| {name} | {_fmt(r['images_per_s'])} | "
                         f"{_fmt(r['median_s'] * 1e3, 1)} | {_fmt(r['median_cpu_s'], 3)} |")
        lines.append("")
    if "memory" in res:
        lines += [f"**Peak memory of a training step** (fp32, batch {args['train_batch']}, "
                  f"{args['train_size']} px), fresh process per side:", "",
                  "| side | step peak above baseline (MiB) | baseline (MiB) | method |",
                  "|---|---|---|---|"]
        for side, r in res["memory"].items():
            if "skipped" in r:
                lines.append(f"| {side} | – | – | {r['skipped']} |")
                continue
            lines.append(f"| {side} | {r['step_bytes'] / 2**20:.0f} | "
                         f"{r['baseline_bytes'] / 2**20:.0f} | {r['method']} |")
        lines.append("")
    if report.get("targets"):
        lines += ["**Targets**:", "", "| target | measured | goal | met |", "|---|---|---|---|"]
        for t in report["targets"]:
            if t["value"] is None:
                continue  # the cases it needs were not run
            met = "yes" if t["met"] else "**no**"
            lines.append(f"| {t['what']} | {_fmt(t['value'])} | {t['target']} | {met} |")
        f = report["figures"]
        lines.append("")
        if f["eval_vs_timm_case"]:
            lines.append(f"Our fastest eager fp32 eval path, {f['eval_vs_timm_case']}: "
                         f"{_fmt(f['eval_vs_timm'])}× timm eager.")
        if f["latency_vs_timm_case"]:
            lines.append(f"Our fastest eager fp32 batch-1 latency, {f['latency_vs_timm_case']}: "
                         f"{_fmt(f['latency_vs_timm'])}× timm's.")
        if f["latency_optimized_vs_timm"] is not None:
            lines.append("optimize_for_inference batch-1 latency: "
                         f"{_fmt(f['latency_optimized_vs_timm'])}× timm eager's, "
                         f"{_fmt(f['latency_optimized_vs_timm_compiled'])}× timm compiled's.")
        if f["agc_share"] is not None:
            lines += [f"AGC share of our step: {_fmt(100 * f['agc_share'], 1)}% (timm's: "
                      f"{_fmt(100 * (f['timm_agc_share'] or 0), 1)}%).", ""]
    lines += [note + "\n" for note in report.get("notes", [])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

CPU_TRAIN_CASES = "ours:fp32,timm:fp32,ours:bf16,timm:bf16,ours:fp32:cl,ours:bf16:cl"
CPU_EVAL_CASES = "ours_fused:fp32,timm:fp32,ours_fused:bf16,timm:bf16,ours_fused:fp32:cl"
CPU_COMPILE_TRAIN = "ours:fp32:compile,timm:fp32:compile"
CPU_COMPILE_EVAL = "ours_opt:fp32,ours_opt:fp32:cl,timm:fp32:compile"
SECTIONS = ("train", "eval", "latency", "memory")


def parser(device: str = "cpu", name: str = "cpu", train_batch: int = 8, eval_batch: int = 8,
           train_cases: str = CPU_TRAIN_CASES, eval_cases: str = CPU_EVAL_CASES,
           matmul_size: int = 2048, threads: int | None = 1) -> argparse.ArgumentParser:
    """Command-line options; ``benchmarks/gpu.py`` passes its own defaults."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default=device, help="torch device")
    p.add_argument("--threads", type=int, default=threads,
                   help="torch CPU threads (1 by default on a shared CPU: see docs/performance.md)")
    p.add_argument("--train-batch", type=int, default=train_batch)
    p.add_argument("--train-size", type=int, default=192, help="F0's train size")
    p.add_argument("--stochdepth", type=float, default=STOCHDEPTH_RATE,
                   help="stochastic depth rate of the trained models (F0's training config: "
                        "0.25; the model's default: 0.1)")
    p.add_argument("--eval-batch", type=int, default=eval_batch)
    p.add_argument("--eval-size", type=int, default=256, help="F0's test size")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of every case")
    p.add_argument("--reps", type=int, default=3, help="timed interleaved rounds")
    p.add_argument("--latency-reps", type=int, default=10, help="timed rounds at batch 1")
    p.add_argument("--train-cases", default=train_cases,
                   help="comma list of side:dtype[:cl][:compile], side in ours/timm")
    p.add_argument("--eval-cases", default=eval_cases,
                   help="as --train-cases, side in ours/ours_fused/timm (also for latency)")
    p.add_argument("--compile", action="store_true",
                   help=f"add {CPU_COMPILE_TRAIN} and {CPU_COMPILE_EVAL}")
    p.add_argument("--sections", default=",".join(SECTIONS), help="what to run")
    p.add_argument("--matmul-size", type=int, default=matmul_size)
    p.add_argument("--matmul-repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default: benchmarks/results/<name>.json)")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md",
                   help="markdown file to update ('' to skip)")
    p.add_argument("--name", default=name, help="result name (JSON file and doc markers)")
    p.add_argument("--memory-child", choices=TRAIN_SIDES, help=argparse.SUPPRESS)
    return p


def run(args: argparse.Namespace, command: str, with_targets: bool,
        notes: tuple[str, ...] = ()) -> dict:
    """Run the chosen sections and write the JSON and markdown; return the report.

    ``notes`` are printed under the tables (e.g. a reference figure).
    """
    device = torch.device(args.device)
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / f"{args.name}.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    sections = [s for s in args.sections.split(",") if s]
    if set(sections) - set(SECTIONS):
        raise SystemExit(f"--sections takes a comma list of {SECTIONS}, got {args.sections!r}")
    train_specs = parse_specs(args.train_cases, TRAIN_SIDES)
    eval_specs = parse_specs(args.eval_cases, EVAL_SIDES)
    if args.compile:
        train_specs += parse_specs(CPU_COMPILE_TRAIN, TRAIN_SIDES)
        eval_specs += parse_specs(CPU_COMPILE_EVAL, EVAL_SIDES)
    train_specs, eval_specs = list(dict.fromkeys(train_specs)), list(dict.fromkeys(eval_specs))
    if any(spec.compile or spec.side == "ours_opt" for spec in eval_specs):
        # A compiled eval model sees the eval batch and batch 1: give each shape its own
        # static graph rather than one dynamic-shape graph for both.
        torch._dynamo.config.automatic_dynamic_shapes = False

    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": command, "args": {k: str(v) if isinstance(v, Path) else v
                                           for k, v in vars(args).items()},
              "machine": machine_info(device), "versions": versions(),
              "load_before": load_average(), "notes": list(notes), "results": {}}
    results = report["results"]
    if "train" in sections:
        print("training steps ...", flush=True)
        results["train"] = train_section(train_specs, args, device)
    if "eval" in sections or "latency" in sections:
        models = eval_models(eval_specs, device, args.eval_batch, args.eval_size)
        if "eval" in sections:
            print("eval ...", flush=True)
            results["eval"] = eval_section(eval_specs, models, args.eval_batch,
                                           args.eval_size, args.reps, args, device)
        if "latency" in sections:
            print("latency ...", flush=True)
            results["latency"] = eval_section(eval_specs, models, 1, args.eval_size,
                                              args.latency_reps, args, device)
        del models
    if "memory" in sections:
        print("memory ...", flush=True)
        results["memory"] = {side: memory_in_subprocess(side, args) for side in TRAIN_SIDES}
    report["load_after"] = load_average()
    report["figures"] = ratios(report)
    if with_targets:
        report["targets"] = targets(report["figures"])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    if str(args.doc):
        update_doc(args.doc, args.name, text)
    print(text)
    return report


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.memory_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        print(json.dumps(peak_step_memory(args.memory_child, args.train_batch,
                                          args.train_size, device, args.stochdepth)))
        return
    if args.device != "cpu":
        raise SystemExit("bench_models.py measures the CPU; use benchmarks/gpu.py for CUDA")
    run(args, "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix()]
                                    + sys.argv[1:]), with_targets=True)


if __name__ == "__main__":
    main()
