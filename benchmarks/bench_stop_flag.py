"""What the per-step stop-flag all-reduce costs a DDP training step (docs/reliability.md §2).

Two gloo processes on CPU train the digits demo's model (the scaled-down F0 of
``nfnets.train``) on random 32 px images, 32 per rank (the demo's global batch of 64). Each
round times ``--steps`` steps of each case, interleaved (baseline first, then flagged, then
the reverse order next round):

- ``step``: forward, backward (DDP's gradient all-reduce), optimiser step, loss read back:
  the baseline, what a step cost before the stop flag;
- ``step_with_flag``: the same plus ``_StopRequest.agreed``: one 1-element all-reduce (MAX);
- ``flag_alone``: that all-reduce alone.

Medians over rounds of the per-step means are reported, with the spread (min, max).

Usage::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_stop_flag.py \\
        [--rounds 9] [--out benchmarks/results/stop_flag.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import nfnets
    from nfnets.train import DIGITS_MODEL, DIGITS_MODEL_ARGS, _StopRequest

    torch.manual_seed(0)
    model = nfnets.create_model(DIGITS_MODEL, num_classes=10, **DIGITS_MODEL_ARGS)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = nfnets.sgd_agc(model, 0.1)
    images = torch.randn(32, 3, 32, 32)
    targets = torch.randint(0, 10, (32,))
    stop = _StopRequest(announce=False)
    device = torch.device("cpu")

    def step(flag: bool) -> None:
        loss = F.cross_entropy(ddp(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if flag:
            stop.agreed(2, device)

    def timed(fn, n: int) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n

    for _ in range(3):
        step(True)
    samples: dict[str, list[float]] = {"step": [], "step_with_flag": [], "flag_alone": []}
    for r in range(args.rounds):
        order = [False, True] if r % 2 == 0 else [True, False]
        for flag in order:
            key = "step_with_flag" if flag else "step"
            samples[key].append(timed(lambda flag=flag: step(flag), args.steps))
        samples["flag_alone"].append(timed(lambda: stop.agreed(2, device), 200))
    if rank == 0:
        result = {key: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3,
                        "max_ms": max(v) * 1e3} for key, v in samples.items()}
        base = result["step"]["median_ms"]
        result["overhead_percent_of_step"] = round(
            100 * (result["step_with_flag"]["median_ms"] - base) / base, 2)
        result["flag_alone_percent_of_step"] = round(
            100 * result["flag_alone"]["median_ms"] / base, 2)
        result["setup"] = {"processes": 2, "backend": "gloo", "threads": 1,
                           "batch_per_rank": 32, "size": 32, "rounds": args.rounds,
                           "steps_per_round": args.steps, "torch": torch.__version__,
                           "python": platform.python_version(), "machine": platform.machine(),
                           "command": "PYTHONPATH=src OMP_NUM_THREADS=1 python "
                                      "benchmarks/bench_stop_flag.py " + " ".join(sys.argv[1:])}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10, help="steps per case per round")
    parser.add_argument("--out", default="benchmarks/results/stop_flag.json")
    parser.add_argument("--port", type=int, default=29533)
    args = parser.parse_args()
    mp.spawn(_worker, args=(args, args.port), nprocs=2)


if __name__ == "__main__":
    main()
