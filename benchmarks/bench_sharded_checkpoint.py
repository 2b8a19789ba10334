"""Checkpoint writes of an ``--fsdp`` run: sharded (DCP directory) against gathered (one file).

Two gloo ranks on the CPU shard a model and its EMA with FSDP2 (as ``nfnets train --fsdp``),
take one optimizer step (so SGD momentum exists), then write one checkpoint in one of two ways:

- ``sharded``: ``nfnets.distributed_checkpoint.save_sharded_checkpoint``, what ``--fsdp`` runs
  write now: each rank its own shards, rank 0 the manifest (SHA-256 of every file) and rename;
- ``gathered``: the baseline, what ``--fsdp`` runs wrote before: model, EMA and optimizer
  state gathered to rank 0 (``full_model_state`` / ``full_optimizer_state``), then one
  ``save_checkpoint`` file with its manifest.

Each write runs in a fresh pair of processes, the two ways alternating ``--repeats`` times.
Reported per way: wall time of the write on rank 0 (barrier to barrier), and how far rank 0's
memory rose above what it held before the write (``VmHWM``, the process's peak since exec,
after the write, minus ``VmRSS`` just before it; a lower bound when building the unsharded
model had peaked higher, which the ``gathered`` figure can then understate, never the
``sharded`` one). Medians and spread go to ``benchmarks/results/sharded_checkpoint.json``.

Usage::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_sharded_checkpoint.py \\
        [--model nfnet_f0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _rank(rank: int, world: int, port: int, how: str, model_name: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from nfnets import create_model
    from nfnets.checkpoint import save_checkpoint
    from nfnets.distributed import full_model_state, full_optimizer_state, shard_model
    from nfnets.distributed_checkpoint import save_sharded_checkpoint
    from nfnets.optim import EMA, sgd_agc

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=1000)
    ema = EMA(model, 0.999)
    shard_model(model)
    shard_model(ema.module)
    optimizer = sgd_agc(model, 0.1, momentum=0.9, weight_decay=2e-5, clipping=0.01)
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean().backward()
    optimizer.step()
    ema.update(model)
    state = {"step": 1, "epoch": 0, "batch_in_epoch": 1, "model_name": model.model_name,
             "model_kwargs": model.model_kwargs, "ema": {"num_updates": 1, "decay": 0.999}}
    directory = Path(out) / "checkpoints"
    dist.barrier()
    before, start = _status_bytes("VmRSS"), time.perf_counter()
    if how == "sharded":
        save_sharded_checkpoint(model, ema.module, optimizer, state, directory, 1)
    else:
        weights = full_model_state(model)
        averaged = full_model_state(ema.module)
        optimizer_state = full_optimizer_state(model, optimizer)
        if rank == 0:
            save_checkpoint({**state, "model": weights, "optimizer": optimizer_state,
                             "ema": {**state["ema"], "module": averaged}}, directory, 1)
        del weights, averaged, optimizer_state
    dist.barrier()
    seconds, growth = time.perf_counter() - start, _status_bytes("VmHWM") - before
    if rank == 0:
        written = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        Path(out, "result.json").write_text(json.dumps(
            {"seconds": seconds, "rank0_peak_growth_bytes": growth, "bytes_written": written,
             "parameters": sum(p.numel() for p in model.parameters())}))
    dist.destroy_process_group()


def _child(how: str, model_name: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, __file__, "--child", how, "--model", model_name,
                        "--port", str(port), "--dir", out], check=True, env=env)
        return json.loads(Path(out, "result.json").read_text())


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="nfnet_f0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/sharded_checkpoint.json")
    parser.add_argument("--child", choices=("sharded", "gathered"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch.multiprocessing as mp

        mp.spawn(_rank, args=(2, args.port, args.child, args.model, args.dir), nprocs=2)
        return
    runs: dict[str, list[dict]] = {"sharded": [], "gathered": []}
    for _ in range(args.repeats):
        for how in runs:  # interleaved: the machine's load drifts over minutes
            runs[how].append(_child(how, args.model))
            print(how, runs[how][-1], flush=True)
    result = {
        "model": args.model, "parameters": runs["sharded"][0]["parameters"], "ranks": 2,
        "backend": "gloo (CPU)", "repeats": args.repeats,
        "ways": {how: {"seconds": _summary([r["seconds"] for r in found]),
                       "rank0_peak_growth_MiB": _summary(
                           [round(r["rank0_peak_growth_bytes"] / 2**20, 1) for r in found]),
                       "bytes_written": found[0]["bytes_written"]}
                 for how, found in runs.items()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": __import__("torch").__version__},
        "command": "PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_sharded_checkpoint.py"
                   f" --model {args.model} --repeats {args.repeats}",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
