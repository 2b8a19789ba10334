"""The bench_models.py table on a CUDA GPU: fp32/bf16, eager/compiled, NCHW/channels-last.

    python benchmarks/gpu.py                     # every combination, both sides
    python benchmarks/gpu.py --train-cases ours:bf16,timm:bf16 --sections train --reps 20

Same measurements as ``benchmarks/bench_models.py`` (interleaved repetitions after warm-up,
medians; see its docstring), with GPU-sized defaults: training batch 32 at 192 px (the
paper's per-step batch), eval batch 128 at 256 px, an 8192² matmul as the utilisation
reference per dtype, peak memory from ``torch.cuda.max_memory_allocated``. The full grid
compiles 8 training and 8 inference graphs, which takes a while: narrow it with
``--train-cases`` / ``--eval-cases``. Writes
``benchmarks/results/gpu.json`` and the ``bench:gpu`` block of ``docs/performance.md``.

For comparison it prints the paper's figure: NFNet-F0 took 56.7 ms per training step of 32
images on one V100 in float16 (paper Table 3). Notes: PyTorch lets
cuDNN use TF32 for float32 convolutions by default but not for the float32 matmul reference,
so the float32 utilisation can exceed 1; timm found channels-last more than halves NFNet
training speed on GPUs because of the grouped convolutions (timm's dm_nfnet notes).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import bench_models as bench
import torch

# Paper Table 3, "GPU Train": one V100, float16, 32 images per step.
PAPER_F0_STEP_MS = 56.7
PAPER_F0_BATCH = 32


def grid(sides: tuple[str, ...], compiled_sides: tuple[str, ...]) -> str:
    """Every dtype × memory format × (eager, compiled where allowed) for each side."""
    specs = []
    for side, dtype, cl, comp in itertools.product(sides, bench.DTYPES, (False, True),
                                                   (False, True)):
        if comp and side not in compiled_sides:
            continue
        specs.append(str(bench.Spec(side, dtype, cl, comp)))
    return ",".join(specs)


def main(argv: list[str] | None = None) -> None:
    parser = bench.parser(
        device="cuda", name="gpu", train_batch=PAPER_F0_BATCH, eval_batch=128,
        train_cases=grid(bench.TRAIN_SIDES, bench.TRAIN_SIDES),
        # Ours compiles through optimize_for_inference (the ours_opt side); timm with
        # torch.compile.
        eval_cases=grid(("ours_fused", "ours_opt", "timm"), ("timm",)),
        matmul_size=8192, threads=None)
    parser.description = __doc__.split("\n\n")[0]
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU, and torch.cuda.is_available() is "
                         "False here; on the CPU run benchmarks/bench_models.py instead")
    if not str(args.device).startswith("cuda"):
        raise SystemExit(f"benchmarks/gpu.py runs on CUDA devices, got --device {args.device}")
    # Fixed input shapes: let cuDNN pick the fastest algorithm for each conv.
    torch.backends.cudnn.benchmark = True
    reference = (f"Paper reference: NFNet-F0 took {PAPER_F0_STEP_MS} ms per training step of "
                 f"{PAPER_F0_BATCH} images on one V100 in float16 (paper Table 3).")
    print(reference)
    command = "python " + " ".join([Path(__file__).relative_to(bench.ROOT).as_posix()]
                                   + sys.argv[1:])
    report = bench.run(args, command, with_targets=False, notes=(reference,))
    train = report["results"].get("train", {})
    if train and args.train_batch == PAPER_F0_BATCH:
        print(f"\nms per {PAPER_F0_BATCH}-image training step (paper, V100 fp16: "
              f"{PAPER_F0_STEP_MS}):")
        for name, res in train.items():
            if not name.startswith("matmul"):
                print(f"  {name:28s} {res['median_s'] * 1e3:8.1f}")


if __name__ == "__main__":
    main()
