"""``nfnets train``: one flag per ``TrainConfig`` field; ``--nproc N`` relaunches under DDP."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..checkpoint import list_checkpoints
from ..errors import UsageError
from ..train import TrainConfig, stop_exit_code, train
from ._common import parse_model_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nfnets train``: one per TrainConfig field (defaults: the paper's recipe)."""
    parser.add_argument("--config", help="JSON file of TrainConfig fields read first; a run's "
                        "own config.json works too (its 'train' section is used)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its newest good checkpoint; "
                        "flags given with it are applied (epochs, session settings) or refused; "
                        "'auto': continue the run in --out if it has a checkpoint, else start it")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in --out even if it holds one (the old run is "
                        "moved aside to OUT.replaced-TIME, never deleted)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="start N DDP processes on this machine (as torchrun would)")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="create_model override, e.g. width=0.5 or depths=[1,1,2,1]")
    helps = {
        "data": "'digits' (bundled), an ImageNet-style folder with train/ and val/, "
                "'wds:PATTERN' (WebDataset shards) or 'hf:NAME_OR_PATH' (Hugging Face datasets)",
        "pipeline": "'fast': uint8 from workers, mixing/RandAugment/normalising batched on "
                    "the GPU; 'exact': the float per-worker pipeline (see docs/data.md)",
        "model": "model name (see nfnets list); recipe: nfnet_f0, digits: a scaled-down F0",
        "out": "run directory",
        "epochs": "training epochs (recipe: 360; digits: 15)",
        "batch_size": "global batch size, split over processes (recipe: 4096; digits: 64)",
        "lr": "peak learning rate (recipe: 0.1 × batch / 256)",
        "warmup_epochs": "linear warm-up from 0 (recipe: 5)",
        "weight_decay": "coupled L2 after clipping; none on gains and biases (recipe: 2e-5; "
                        "fine-tuning: 1e-5)",
        "clipping": "AGC clipping factor λ, classifier weight excluded (0 disables AGC)",
        "momentum": "Nesterov momentum",
        "label_smoothing": "applied after MixUp/CutMix label mixing",
        "ema_decay": "EMA decay, with the warm-up min(decay, (1+t)/(10+t))",
        "stochdepth_rate": "stochastic depth rate r; block i of N drops with r·i/N "
                           "(recipe: 0.25)",
        "drop_rate": "dropout before the classifier (recipe: the variant's, F0 0.2)",
        "augment": "official augmentation name, e.g. cutmix_mixup_randaugment_405, or none",
        "train_size": "training resolution (recipe: the variant's, F0 192)",
        "test_size": "evaluation resolution (recipe: the variant's, F0 256)",
        "precision": "fp32, bf16 or fp16 (autocast; fp16 uses a GradScaler)",
        "channels_last": "channels-last memory format (measure: often slower for NFNets)",
        "compile": "torch.compile the training step",
        "grad_accum": "micro-batches per optimiser step (gradients averaged, clipped once)",
        "grad_checkpointing": "recompute blocks in backward to save memory (big variants)",
        "fsdp": "shard parameters, gradients and optimizer state over the processes with "
                "FSDP2 (one unit per block); AGC stays exact (see docs/distributed.md)",
        "num_workers": "DataLoader worker processes",
        "seed": "seed of the data order, augmentation and initialisation",
        "init_from": "fine-tune from weights: a file, a run dir, a released name (nfnet_f0) or "
                     "hf-hub:NAME; new head; unset values take the fine-tuning preset "
                     "(docs/finetuning.md)",
        "save_every": "also checkpoint every N optimiser steps (always at epoch ends)",
        "keep_checkpoints": "how many of the newest checkpoints to keep",
        "eval_batch_size": "evaluation batch size",
        "max_nonfinite": "stop after this many consecutive non-finite losses",
        "log_every": "write a metrics line every N steps",
        "tensorboard": "also log to DIR/tensorboard (needs the tensorboard package)",
        "progress": "show a progress bar on terminals",
        "device": "auto, cpu, cuda or cuda:N",
        "stop_at_step": "stop after step N with a checkpoint (resume later with --resume)",
    }
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_args":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{helps[f.name]} (default: {default})")
            continue
        kind = {"int": int, "float": float, "str": str}
        type_name = str(f.type).split("|")[0].strip()
        parser.add_argument(flag, type=kind.get(type_name, str), default=None,
                            help=helps[f.name] if default is None
                            else f"{helps[f.name]} (default: {default})")


def _given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the user gave: from --config, then from flags."""
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config: no such file: {path}")
        try:
            values = json.loads(path.read_text())
        except ValueError as err:
            raise UsageError(f"--config: {path} is not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise UsageError(f"--config: {path} must hold a JSON object of TrainConfig fields")
        if isinstance(values.get("train"), dict):  # a run's own config.json
            values = {k: v for k, v in values["train"].items() if k != "stop_at_step"}
        unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise UsageError(f"--config: unknown keys {sorted(unknown)}")
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    if args.model_arg:
        values["model_args"] = {**values.get("model_args", {}),
                                **parse_model_args(args.model_arg)}
    return values


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    try:
        return TrainConfig(**_given_values(args))
    except TypeError as err:
        raise UsageError(f"--config: {err}") from None


def run(args: argparse.Namespace) -> int:
    """``nfnets train``: parse, maybe relaunch under DDP, train; 128+N after signal N."""
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    values = _given_values(args)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(values, args)  # each process resolves --resume auto itself
    resume = _resolve_resume(args.resume, values)
    cfg = TrainConfig(**values) if not resume else TrainConfig()
    result = train(cfg, resume=resume, changes=values if resume else None,
                   overwrite=args.overwrite)
    if result.get("signal"):
        return stop_exit_code(result["signal"])
    return 0


def _resolve_resume(resume: str | None, values: dict[str, Any]) -> str | None:
    """``--resume auto``: the run in ``--out`` if it has a checkpoint, else None (start it)."""
    if resume != "auto":
        return resume
    out = values.get("out", TrainConfig.out)
    return out if list_checkpoints(Path(out) / "checkpoints") else None


def _launch(values: dict[str, Any], args: argparse.Namespace) -> int:
    """Re-run this command in ``--nproc`` processes through PyTorch's elastic launcher."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(values, f)
    command = [f"--nproc-per-node={args.nproc}", "--standalone", "-m", "nfnets", "train",
               "--config", f.name]
    if args.resume:
        command += ["--resume", args.resume]
    if args.overwrite:
        command += ["--overwrite"]
    try:
        torchrun(command)
    except ChildFailedError as err:  # the ranks printed their own messages
        return next((failure.exitcode for failure in err.failures.values()
                     if failure.exitcode and failure.exitcode > 0), 1)
    finally:
        os.unlink(f.name)
    return 0
