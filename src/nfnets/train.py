"""Training with the paper's recipe, single process or DistributedDataParallel, resumable.

Read top to bottom: ``TrainConfig`` (every knob, its default = the official recipe),
``train(cfg)`` (setup, the loop, the end of the run) and the small functions it calls.
Recipe sources: official.md §5 (nfnets/experiment_nfnets.py, nfnets/optim.py).

Run it with ``nfnets train`` (bundled digits demo), ``nfnets train --data DIR --model
nfnet_f0`` (ImageNet-style folder), ``torchrun --nproc-per-node N -m nfnets train ...`` or
``nfnets train --nproc N`` (DDP: gloo on CPU, NCCL on GPU; the global batch is split); add
``--fsdp`` to shard parameters, gradients and optimizer state with FSDP2 instead
(:mod:`nfnets.distributed`, docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .augment import AugmentConfig
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .data import (
    digits_datasets,
    digits_recipe_changes,
    eval_loader,
    imagenet_datasets,
    train_loader,
)
from .distributed import (
    check_same_device_type,
    discard_unreduced_grads,
    full_model_state,
    full_optimizer_state,
    gathered,
    gradient_sync,
    load_full_model_state,
    load_full_optimizer_state,
    shard_model,
    sync_replicated_grads,
)
from .errors import CheckpointError, RunFailed, UsageError
from .files import atomic_write
from .models import create_model, model_defaults
from .optim import EMA, optimizer_step, peak_lr, sgd_agc, warmup_cosine_lr
from .weights import load_pretrained, save_weights

# The digits demo's model: NFNet-F0's architecture (same blocks, stem, head, β/α, SE, SkipInit)
# scaled down for 32 px 8x8-digit images: stage widths 256/512/1536/1536 → 32/64/128/128,
# depths [1, 2, 6, 3] → [1, 1, 1, 1], group width 128 → 16 (so the narrow stages still have
# 1–4 groups), final conv 2× the last width as in F0. ~0.2M parameters instead of 71.5M.
DIGITS_MODEL = "nfnet_f0"
DIGITS_MODEL_ARGS = {"widths": [32, 64, 128, 128], "depths": [1, 1, 1, 1], "group_width": 16}
DIGITS_IMAGE_SIZE = 32
# Short-run settings of the demo (the ImageNet recipe's values are in TrainConfig's defaults).
DIGITS_OVERRIDES = {"epochs": 15, "batch_size": 64, "lr": 0.2, "warmup_epochs": 2.0,
                    "augment": "none", "drop_rate": 0.0, "stochdepth_rate": 0.0}
DIGITS_MODEL_CHANGES = {
    "model": "NFNet-F0 scaled down: widths 32/64/128/128 (F0: 256/512/1536/1536), depths "
             "1/1/1/1 (1/2/6/3), group width 16 (128); same blocks, stem, head, alpha/beta, SE",
    "regularisation": "no dropout or stochastic depth (F0: dropout 0.2, stochastic depth 0.25)",
}


@dataclass
class TrainConfig:
    """Every choice of a training run; ``None`` means "the recipe's value for this variant"."""

    data: str = "digits"  # 'digits' or an ImageNet-style folder (train/CLASS/*, val/CLASS/*)
    model: str | None = None  # default: nfnet_f0 (digits: a scaled-down F0, see DIGITS_MODEL)
    model_args: dict[str, Any] = field(default_factory=dict)  # create_model overrides
    out: str = "runs/nfnets"
    epochs: int | None = None  # recipe: 360
    batch_size: int | None = None  # global batch; recipe: 4096
    lr: float | None = None  # peak; recipe: 0.1 · batch / 256
    warmup_epochs: float | None = None  # recipe: 5, linear from exactly 0 (official.md §5.2)
    weight_decay: float = 2e-5  # coupled L2, after clipping (§5.3)
    clipping: float = 0.01  # AGC λ; 0 turns AGC off (§5.1)
    momentum: float = 0.9  # Nesterov (§5.1)
    label_smoothing: float = 0.1  # §5.6
    ema_decay: float = 0.99999  # with the TF1 warm-up (§5.7)
    stochdepth_rate: float | None = None  # recipe: 0.25 (§2.7; the model default is 0.1)
    drop_rate: float | None = None  # variant's dropout (F0 0.2 … F4+ 0.5)
    augment: str | None = None  # official name, e.g. cutmix_mixup_randaugment_405
    train_size: int | None = None  # variant's train resolution
    test_size: int | None = None  # variant's test resolution
    precision: str = "fp32"  # fp32 | bf16 | fp16 (the official runs used bf16 on TPU)
    channels_last: bool = False
    compile: bool = False
    grad_accum: int = 1
    grad_checkpointing: bool = False
    fsdp: bool = False  # shard with FSDP2 (one unit per block + root) instead of DDP
    num_workers: int = 0
    seed: int = 0
    init_from: str | None = None  # fine-tune: weights file or run; the head is re-initialised
    save_every: int = 0  # steps between checkpoints (0: at each epoch's end only)
    keep_checkpoints: int = 3
    eval_batch_size: int = 50  # official eval batch
    max_nonfinite: int = 20  # consecutive non-finite losses before the run stops
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True
    device: str = "auto"
    stop_at_step: int | None = None  # end early with a checkpoint, as if interrupted

    def resolved(self) -> TrainConfig:
        """A copy with every None filled in from the variant's recipe (or the digits demo)."""
        cfg = dataclasses.replace(self, model_args=dict(self.model_args))
        demo = cfg.data == "digits"
        if cfg.model is None:
            cfg.model = DIGITS_MODEL
            if demo:
                cfg.model_args = {**DIGITS_MODEL_ARGS, **cfg.model_args}
        defaults = model_defaults(cfg.model)
        recipe = {"epochs": 360, "batch_size": 4096, "warmup_epochs": 5.0,
                  "stochdepth_rate": 0.25, "augment": _recipe_augment(defaults),
                  "drop_rate": defaults["drop_rate"]}
        if demo:
            recipe.update(DIGITS_OVERRIDES)
            size = cfg.train_size or cfg.test_size or DIGITS_IMAGE_SIZE
            recipe.update(train_size=size, test_size=size)
        else:
            recipe.update(train_size=defaults["train_size"], test_size=defaults["test_size"])
        for key, value in recipe.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.lr is None:
            cfg.lr = peak_lr(cfg.batch_size)
        return cfg


def _recipe_augment(defaults: dict) -> str:
    # NFNets: half MixUp / half CutMix then RandAugment (official.md §5.1); NF-RegNets:
    # mixup_cutmix without RandAugment (§5.11); NF-ResNets (base experiment): none.
    if defaults["ra_level"] is not None:
        return f"cutmix_mixup_randaugment_{defaults['ra_level']}"
    return "cutmix_mixup" if defaults["family"] == "nf_regnet" else "none"


# ----------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says (or continue the run in ``resume``); return the summary.

    ``resume="auto"`` continues the run in ``cfg.out`` when it has a checkpoint and starts it
    afresh otherwise, so that a job script (or torchrun restarting a failed group) can be
    re-run unchanged.
    """
    if resume == "auto":
        resume = cfg.out if list_checkpoints(Path(cfg.out) / "checkpoints") else None
    if resume is not None:
        cfg = _load_run_config(resume, cfg)
    cfg = cfg.resolved()
    _validate(cfg)
    rank, world, device = _setup_distributed(cfg)
    is_main = rank == 0
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)  # the same initial weights (and so EMA) on every rank
    random.seed(cfg.seed)

    # Data: the per-rank micro-batch is global batch / (ranks · accumulation steps).
    micro_batch = cfg.batch_size // (world * cfg.grad_accum)
    augment = AugmentConfig.from_name(cfg.augment)
    train_set, val_set = _datasets(cfg)
    loader, sampler = train_loader(
        train_set, batch_size=micro_batch, augment=augment,
        label_smoothing=cfg.label_smoothing, seed=cfg.seed, rank=rank, world_size=world,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    val_loader = eval_loader(val_set, batch_size=cfg.eval_batch_size, rank=rank,
                             world_size=world, num_workers=cfg.num_workers)
    steps_per_epoch = sampler.batches_per_epoch // cfg.grad_accum
    total_steps = steps_per_epoch * cfg.epochs
    if steps_per_epoch == 0:
        raise UsageError(f"an epoch has {sampler.batches_per_epoch} micro-batches, fewer than "
                         f"--grad-accum {cfg.grad_accum}; lower it or the batch size")

    # Model, optimiser (AGC → SGD-Nesterov with coupled WD), schedule, EMA, scaler.
    model = create_model(cfg.model, num_classes=len(train_set.classes),
                         stochdepth_rate=cfg.stochdepth_rate, drop_rate=cfg.drop_rate,
                         **cfg.model_args)
    if cfg.init_from and resume is None:
        # A run's EMA weights when it has them (what its evaluation reports), else the raw.
        load_pretrained(model, cfg.init_from, skip_classifier=True, ema=None)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.ema_decay)
    if cfg.fsdp:  # the EMA sharded the same way: its update is then local to each shard
        shard_model(model, cfg.precision)
        shard_model(ema.module, cfg.precision)
    optimizer = sgd_agc(model, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                        clipping=cfg.clipping or None)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    scheduler = warmup_cosine_lr(optimizer, min(warmup_steps, total_steps - 1), total_steps)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    torch.manual_seed(cfg.seed + rank)  # ranks differ only in stochastic depth/dropout draws
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_images": 0,
             "nonfinite_steps": 0, "seconds": 0.0, "images": 0}
    if resume is not None:
        _restore(load_checkpoint(Path(resume) / "checkpoints"), model, ema, optimizer,
                 scheduler, scaler, state, device)
    ddp_model = model
    if world > 1 and not cfg.fsdp:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(ddp_model) if cfg.compile else ddp_model

    log = _Logger(out, cfg, is_main)
    if is_main:
        log.start(cfg, model, train_set, val_set, resumed=resume is not None)

    # The loop.
    consecutive_nonfinite, val = 0, None
    start_time = time.time() - state["seconds"]
    for epoch in range(state["epoch"], cfg.epochs):
        sampler.set_epoch(epoch, skip_batches=state["batch_in_epoch"] * cfg.grad_accum)
        model.train()
        bar = log.progress(epoch, steps_per_epoch, state["batch_in_epoch"])
        batches = iter(loader)
        for _ in range(state["batch_in_epoch"], steps_per_epoch):
            step_start = time.time()
            loss, finite, skipped = _train_step(step_model, optimizer, batches, cfg, device,
                                                scaler, world)
            state["skipped_images"] += skipped
            state["batch_in_epoch"] += 1
            if not finite:
                state["nonfinite_steps"] += 1
                consecutive_nonfinite += 1
                if consecutive_nonfinite >= cfg.max_nonfinite:
                    log.close()
                    raise RunFailed(_diverged_message(cfg, state, out))
            else:
                consecutive_nonfinite = 0
                if optimizer_step(optimizer, scaler):
                    ema.update(model)
                scheduler.step()
                state["step"] += 1
            optimizer.zero_grad(set_to_none=True)
            state["images"] += cfg.batch_size
            state["seconds"] = time.time() - start_time
            log.step(state, loss, optimizer, bar, cfg.batch_size / (time.time() - step_start))
            if _should_save(cfg, state):
                _save(out, model, ema, optimizer, scheduler, scaler, state, cfg, is_main)
            if cfg.stop_at_step is not None and state["step"] >= cfg.stop_at_step:
                bar.close()
                _save(out, model, ema, optimizer, scheduler, scaler, state, cfg, is_main)
                log.close()
                del step_model, ddp_model
                _teardown(world)
                if is_main:
                    print(f"nfnets: stopped at step {state['step']} as asked; continue with "
                          f"nfnets train --resume {out}")
                return {"stopped_at_step": state["step"]}
        bar.close()
        state["epoch"], state["batch_in_epoch"] = epoch + 1, 0
        val = _evaluate_both(model, ema, val_loader, device)
        log.epoch(epoch, state, val)
        _save(out, model, ema, optimizer, scheduler, scaler, state, cfg, is_main)

    if val is None:  # resumed a run whose epochs were all done
        val = _evaluate_both(model, ema, val_loader, device)
    summary = {
        "val_top1": val["val_top1"], "val_top5": val["val_top5"],
        "val_top1_ema": val["val_top1_ema"], "val_top5_ema": val["val_top5_ema"],
        "epochs": cfg.epochs, "steps": state["step"], "seconds": round(state["seconds"], 2),
        "images_per_second": round(state["images"] / max(state["seconds"], 1e-9), 2),
        "skipped_images": state["skipped_images"], "nonfinite_steps": state["nonfinite_steps"],
    }
    if cfg.fsdp:  # gathered on every rank, written by rank 0
        model, ema = _gathered_copies(model, ema, cfg, len(train_set.classes))
    if is_main:
        log.finish(summary, model, ema, train_set)
    del step_model, ddp_model
    _teardown(world)
    return summary


def _train_step(model: nn.Module, optimizer, batches, cfg: TrainConfig,
                device: torch.device, scaler, world: int) -> tuple[float, bool, int]:
    """Forward/backward over ``grad_accum`` micro-batches; (mean loss, finite?, skipped).

    Gradients are averaged over the global batch (DDP averages over ranks, the loss is divided
    by the accumulation steps), as the official update uses the global-batch mean (§5.6). A
    non-finite loss on any rank makes every rank skip the step, before any backward pass can
    poison the gradients; the step's remaining micro-batches are still consumed so the data
    order stays aligned with the step count.
    """
    total, skipped = 0.0, 0
    autocast = _autocast(cfg.precision, device)
    for micro in range(cfg.grad_accum):
        images, targets, batch_skipped = next(batches)
        skipped += batch_skipped
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last = micro == cfg.grad_accum - 1
        with gradient_sync(model, last or world == 1):
            with autocast:
                logits = model(images)
            # Logits in float32 for the loss (official.md §5.6); soft (mixed, smoothed) targets.
            loss = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
            finite = torch.isfinite(loss.detach()).to(torch.float32)
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1:
                for _ in range(micro + 1, cfg.grad_accum):
                    skipped += next(batches)[2]
                if cfg.fsdp:
                    discard_unreduced_grads(model)
                optimizer.zero_grad(set_to_none=True)
                return float("nan"), False, skipped
            scaled = loss / cfg.grad_accum
            (scaled if scaler is None else scaler.scale(scaled)).backward()
        total += loss.item() / cfg.grad_accum
    if cfg.fsdp:
        sync_replicated_grads(model)
    return total, True, skipped


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def _evaluate_both(model: nn.Module, ema: EMA, loader, device: torch.device) -> dict[str, Any]:
    from .evaluate import evaluate

    model.eval()
    # Sharded models are held gathered: ranks may have different numbers of batches.
    with gathered(model):
        raw = evaluate(model, loader, device)
    with gathered(ema.module):
        averaged = evaluate(ema.module, loader, device)
    model.train()
    return {"val_top1": raw["top1"], "val_top5": raw["top5"], "val_loss": raw["loss"],
            "val_top1_ema": averaged["top1"], "val_top5_ema": averaged["top5"],
            "val_loss_ema": averaged["loss"]}


# ----------------------------------------------------------------------------------------------
# Setup helpers


def _validate(cfg: TrainConfig) -> None:
    problems = []
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        problems.append(f"--precision must be fp32, bf16 or fp16, not {cfg.precision!r}")
    for name in ("epochs", "batch_size", "grad_accum", "keep_checkpoints", "eval_batch_size",
                 "max_nonfinite", "log_every"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("lr", "weight_decay", "clipping", "label_smoothing", "warmup_epochs",
                 "save_every"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0")
    if not 0 <= cfg.ema_decay <= 1:
        problems.append("--ema-decay must be in [0, 1]")
    if cfg.label_smoothing >= 1:
        problems.append("--label-smoothing must be < 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % (world * cfg.grad_accum):
        problems.append(f"--batch-size {cfg.batch_size} must be divisible by processes "
                        f"({world}) × --grad-accum ({cfg.grad_accum})")
    if cfg.precision == "fp16" and cfg.device == "cpu":
        problems.append("--precision fp16 needs a GPU; use bf16 on CPU")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device is available")
    if cfg.fsdp:
        problems += _fsdp_problems(cfg, world)
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("--tensorboard needs the tensorboard package (pip install tensorboard)")
    if problems:
        raise UsageError("; ".join(problems))


def _fsdp_problems(cfg: TrainConfig, world: int) -> list[str]:
    """What ``--fsdp`` cannot do, each with what to do instead."""
    problems = []
    if world == 1:
        problems.append("--fsdp shards the model over processes, but this is one process: "
                        "start several (nfnets train --nproc N, or torchrun), or drop --fsdp")
    if cfg.compile:
        problems.append("--fsdp with --compile is not supported yet (the FSDP hooks would "
                        "have to be compiled per block): drop --compile")
    if cfg.precision == "fp16":
        problems.append("--fsdp with --precision fp16 needs a sharded gradient scaler, which "
                        "nfnets does not have: use --precision bf16 (no scaling needed)")
    if cfg.device.startswith("cuda:"):
        problems.append(f"--device {cfg.device} with --fsdp: each process takes the GPU of "
                        "its LOCAL_RANK; use --device cuda")
    return problems


def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cfg.fsdp:
            check_same_device_type(device)
        return dist.get_rank(), world, device
    if cfg.device not in ("auto", "cpu", "cuda"):
        return 0, 1, torch.device(cfg.device)
    return 0, 1, torch.device("cuda" if cuda else "cpu")


def _teardown(world: int) -> None:
    """Leave the process group; the caller has dropped its DDP wrapper."""
    if world > 1 and dist.is_initialized():
        dist.barrier()
        # Free DDP's reducer while its process group still exists: a reducer outliving
        # destroy_process_group made a gloo rank abort at exit ("terminate called without an
        # active exception") in 4 of 59 two-process test runs; none in 45 runs since.
        gc.collect()
        dist.destroy_process_group()


def _datasets(cfg: TrainConfig):
    if cfg.data == "digits":
        return digits_datasets(cfg.train_size, seed=cfg.seed)
    return imagenet_datasets(cfg.data, cfg.train_size, cfg.test_size)


def _load_run_config(run_dir: str | os.PathLike, cfg: TrainConfig) -> TrainConfig:
    """The config a run was started with; only --epochs, --stop-at-step, --progress and
    --num-workers may change on resume (anything else would not be the same run)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {run_dir} is not a run directory (no config.json)")
    saved = json.loads(path.read_text())["train"]
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    restored = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    restored.out = str(run_dir)
    restored.stop_at_step = cfg.stop_at_step
    restored.progress = cfg.progress
    restored.num_workers = cfg.num_workers
    if cfg.epochs is not None:
        restored.epochs = cfg.epochs
    return restored


def _should_save(cfg: TrainConfig, state: dict) -> bool:
    return bool(cfg.save_every) and state["step"] > 0 and state["step"] % cfg.save_every == 0


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(out: Path, model, ema, optimizer, scheduler, scaler, state, cfg, is_main) -> None:
    # Every rank's RNG would differ; rank 0's checkpoint restores rank 0 exactly, and other
    # ranks reseed deterministically from it on resume.
    if cfg.fsdp:  # collectives: every rank gathers, rank 0 writes the usual single file
        weights = full_model_state(model)
        ema_state = {**ema.state_dict(), "module": full_model_state(ema.module)}
        optimizer_state = full_optimizer_state(model, optimizer)
    else:
        weights, ema_state, optimizer_state = None, None, None
    if not is_main:
        return
    if weights is None:
        weights, ema_state = model.state_dict(), ema.state_dict()
        optimizer_state = optimizer.state_dict()
    norms = torch._foreach_norm([w.detach().float() for w in weights.values()])
    if not bool(torch.isfinite(torch.stack(norms)).all()):
        # Never replace a good checkpoint with diverged weights (the run stops soon after).
        print(f"nfnets: weights are not finite at step {state['step']}; checkpoint not written",
              file=sys.stderr)
        return
    checkpoint = {
        "model": weights, "ema": ema_state,
        "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        **state, "rng": _rng_state(), "model_name": model.model_name,
        "model_kwargs": model.model_kwargs, "config": dataclasses.asdict(cfg),
    }
    save_checkpoint(checkpoint, out / "checkpoints", state["step"], cfg.keep_checkpoints)


def _restore(checkpoint, model, ema, optimizer, scheduler, scaler, state, device) -> None:
    from .distributed import is_sharded

    sharded = is_sharded(model)
    try:
        if sharded:  # every rank read the full checkpoint and keeps its own shards
            load_full_model_state(model, checkpoint["model"])
        else:
            model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint['path']} does not fit this model: {err}") from None
    if sharded:
        load_full_model_state(ema.module, checkpoint["ema"]["module"])
        ema.num_updates = int(checkpoint["ema"]["num_updates"])
        load_full_optimizer_state(model, optimizer, checkpoint["optimizer"])
    else:
        ema.load_state_dict(checkpoint["ema"])
        ema.module.to(device)
        optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    for key in state:
        state[key] = checkpoint[key]
    _set_rng_state(checkpoint["rng"])
    if dist.is_initialized() and dist.get_rank() > 0:
        torch.manual_seed(int(torch.randint(0, 2**31, ())) + dist.get_rank())


def _gathered_copies(model, ema: EMA, cfg: TrainConfig, num_classes: int):
    """Plain (unsharded) CPU copies of a sharded model and its EMA on rank 0 (other ranks get
    theirs back unchanged); collective."""
    weights, averaged = full_model_state(model), full_model_state(ema.module)
    if not weights:  # not rank 0: nothing to write
        return model, ema
    copies = []
    for state in (weights, averaged):
        plain = create_model(cfg.model, num_classes=num_classes,
                             stochdepth_rate=cfg.stochdepth_rate, drop_rate=cfg.drop_rate,
                             **cfg.model_args)
        plain.load_state_dict(state)
        copies.append(plain)
    plain_ema = EMA(copies[1], ema.decay)
    plain_ema.num_updates = ema.num_updates
    return copies[0], plain_ema


def _diverged_message(cfg: TrainConfig, state: dict, out: Path) -> str:
    found = list_checkpoints(out / "checkpoints")
    last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"
    return (f"the loss was not finite for {cfg.max_nonfinite} consecutive steps (at step "
            f"{state['step']}, {state['nonfinite_steps']} non-finite in all); stopping. {last}. "
            "Lower --lr or --clipping, or use --precision fp32.")


# ----------------------------------------------------------------------------------------------
# What the user sees: progress bar, per-epoch lines, metrics.jsonl, optional TensorBoard


class _Logger:
    def __init__(self, out: Path, cfg: TrainConfig, active: bool) -> None:
        self.out, self.cfg, self.active = out, cfg, active
        self.writer = None
        self.loss_sum, self.loss_count = 0.0, 0

    def start(self, cfg: TrainConfig, model, train_set, val_set, resumed: bool) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "checkpoints").mkdir(exist_ok=True)
        if not resumed:
            config = {"model": model.model_name, "model_kwargs": model.model_kwargs,
                      "classes": list(train_set.classes), "train_size": cfg.train_size,
                      "test_size": cfg.test_size, "data": cfg.data,
                      "train": dataclasses.asdict(cfg)}
            if cfg.data == "digits":
                config["digits_demo_changes"] = _digits_changes(cfg)
            atomic_write(self.out / "config.json",
                         lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
        print(f"nfnets: {'resuming' if resumed else 'training'} {model.model_name} "
              f"({sum(p.numel() for p in model.parameters()):,} parameters) on {cfg.data}: "
              f"{len(train_set)} train / {len(val_set)} val images, "
              f"{len(train_set.classes)} classes; run directory {self.out}")
        if cfg.data == "digits" and not resumed:
            print("nfnets: the digits demo differs from the ImageNet recipe in:")
            for key, value in _digits_changes(cfg).items():
                print(f"  - {key}: {value}")
        if cfg.tensorboard:  # _validate checked that the package is there
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))

    def progress(self, epoch: int, steps: int, done: int):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is None or not (self.active and self.cfg.progress):
            return _NoBar()
        # disable=None: a bar on terminals only, so logs and CI output stay clean.
        return tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                    unit="step", leave=False, dynamic_ncols=True, file=sys.stderr,
                    disable=None)

    def step(self, state: dict, loss: float, optimizer, bar, images_per_second: float) -> None:
        if math.isfinite(loss):
            self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1
        bar.update(1)
        if not self.active or state["step"] % self.cfg.log_every:
            return
        # Reading the clip count waits for the device, so only at logging steps.
        stats = optimizer.last_stats
        clip = float(stats.fraction) if stats is not None and stats.units else 0.0
        lr = optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", img_s=f"{images_per_second:.1f}",
                        clip=f"{clip:.3f}", refresh=False)
        record = {"kind": "train", "step": state["step"], "epoch": state["epoch"],
                  "loss": loss if math.isfinite(loss) else None, "lr": lr,
                  "clip_fraction": clip, "images_per_second": round(images_per_second, 2),
                  "seconds": round(state["seconds"], 2)}
        self._write(record)

    def epoch(self, epoch: int, state: dict, val: dict) -> None:
        train_loss = self.loss_sum / self.loss_count if self.loss_count else None
        self.loss_sum, self.loss_count = 0.0, 0
        if not self.active:
            return
        record = {"kind": "val", "epoch": epoch + 1, "step": state["step"],
                  "train_loss": train_loss, **val}
        self._write(record)
        print(f"epoch {epoch + 1}/{self.cfg.epochs}  step {state['step']}  train loss "
              f"{_fmt(train_loss)}  val top-1 {_fmt(val['val_top1'], 2)}  top-5 "
              f"{_fmt(val['val_top5'], 2)}  EMA top-1 {_fmt(val['val_top1_ema'], 2)}  "
              f"({state['seconds']:.0f}s)", flush=True)

    def _write(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, float):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def finish(self, summary: dict, model, ema: EMA, train_set) -> None:
        extra = {"classes": list(train_set.classes), "train_size": self.cfg.train_size,
                 "test_size": self.cfg.test_size}
        save_weights(model, self.out / "model.safetensors", extra)
        save_weights(ema.module, self.out / "model_ema.safetensors", extra)
        atomic_write(self.out / "summary.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        plots = []
        try:
            from .plots import plot_run

            plots = plot_run(self.out)
        except ImportError as err:  # matplotlib is an optional dependency
            print(f"nfnets: no plots ({err}); pip install matplotlib")
        self.close()
        print(f"nfnets: done. val top-1 {_fmt(summary['val_top1'], 2)}%, EMA top-1 "
              f"{_fmt(summary['val_top1_ema'], 2)}%, {summary['steps']} steps in "
              f"{summary['seconds']:.0f}s. Run directory: {self.out}")
        if plots:
            print(f"nfnets: plots: {', '.join(str(p) for p in plots)}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _digits_changes(cfg: TrainConfig) -> dict[str, str]:
    """What the digits demo changes from the ImageNet recipe (printed and recorded)."""
    changes = digits_recipe_changes(cfg.train_size, AugmentConfig.from_name(cfg.augment))
    if cfg.model == DIGITS_MODEL and cfg.model_args == DIGITS_MODEL_ARGS:
        changes.update(DIGITS_MODEL_CHANGES)
    changes["schedule"] = (f"{cfg.epochs} epochs at batch {cfg.batch_size}, peak lr {cfg.lr}, "
                           f"{cfg.warmup_epochs} warm-up epochs (recipe: 360 epochs, batch "
                           "4096, lr 1.6, 5 warm-up epochs)")
    return changes


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
