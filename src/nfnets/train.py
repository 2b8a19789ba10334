"""Training with the paper's recipe, single process or DistributedDataParallel, resumable.

Read top to bottom: ``TrainConfig`` (every knob, its default = the official recipe),
``train(cfg)`` (setup, the loop, the end of the run) and the small functions it calls.
Recipe sources: deepmind-research nfnets/ (experiment.py, experiment_nfnets.py, optim.py,
utils.py); file names below are in that folder.

A run owns its folder (``nfnets.lock.RunLock``), refuses to overwrite another run, resumes from
the newest checkpoint that verifies (``nfnets.checkpoint``), and stops after the current step
with a checkpoint on SIGTERM, SIGINT or SIGUSR1 (docs/reliability.md).

Run it with ``nfnets train`` (bundled digits demo), ``nfnets train --data DIR --model
nfnet_f0`` (ImageNet-style folder), ``torchrun --nproc-per-node N -m nfnets train ...`` or
``nfnets train --nproc N`` (DDP: gloo on CPU, NCCL on GPU; the global batch is split); add
``--fsdp`` to shard parameters, gradients and optimizer state with FSDP2 instead
(:mod:`nfnets.distributed`, docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .augment import AugmentConfig
from .checkpoint import (
    list_checkpoints,
    load_latest_checkpoint,
    read_checkpoint,
    remove_temp_checkpoints,
    save_checkpoint,
)
from .data import (
    digits_datasets,
    digits_recipe_changes,
    eval_loader,
    jpeg_decoding,
    open_datasets,
    train_loader,
)
from .distributed import (
    check_same_device_type,
    discard_unreduced_grads,
    full_model_state,
    gathered,
    gradient_sync,
    load_full_model_state,
    load_full_optimizer_state,
    shard_model,
    sync_replicated_grads,
)
from .distributed_checkpoint import load_sharded, save_sharded_checkpoint
from .errors import CheckpointError, NFNetsError, RunFailed, UsageError
from .files import atomic_write, disk_error, remove_temp_files
from .finetune import finetune_preset
from .lock import LOCK_NAME, RunLock
from .models import create_model, model_defaults
from .optim import EMA, optimizer_step, peak_lr, sgd_agc, warmup_cosine_lr
from .pretrained import load_backbone, named_weights, weights_architecture
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

    data: str = "digits"  # 'digits', an ImageNet-style folder, 'wds:PATTERN' or 'hf:NAME_OR_PATH'
    pipeline: str = "fast"  # 'fast' (uint8 workers, batch stage on the GPU) or 'exact'
    model: str | None = None  # default: nfnet_f0 (digits: a scaled-down F0, see DIGITS_MODEL)
    model_args: dict[str, Any] = field(default_factory=dict)  # create_model overrides
    out: str = "runs/nfnets"
    epochs: int | None = None  # recipe: 360
    batch_size: int | None = None  # global batch; recipe: 4096
    lr: float | None = None  # peak; recipe: 0.1 · batch / 256
    warmup_epochs: float | None = None  # recipe: 5, linear from 0 (optim.py WarmupCosineDecay)
    # coupled L2, after clipping (optim.py SGD_AGC); recipe 2e-5, fine-tuning 1e-5 (finetune.py)
    weight_decay: float | None = None
    clipping: float = 0.01  # AGC λ; 0 turns AGC off (experiment_nfnets.py get_config)
    momentum: float = 0.9  # Nesterov (experiment_nfnets.py get_config)
    label_smoothing: float = 0.1  # experiment_nfnets.py get_config
    ema_decay: float = 0.99999  # with the TF1 warm-up (utils.py)
    stochdepth_rate: float | None = None  # recipe: 0.25 (the model default is 0.1)
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
    # fine-tune (nfnets.finetune preset): weights file, run, released name or hf-hub: name;
    # the head is re-initialised
    init_from: str | None = None
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
        if cfg.model is None and cfg.init_from and not demo:
            # the architecture the weights hold (a released name, an nfnets file or run)
            found = weights_architecture(cfg.init_from)
            if found is not None:
                cfg.model, cfg.model_args = found[0], {**found[1], **cfg.model_args}
        if cfg.model is None:
            cfg.model = DIGITS_MODEL
            if demo:
                cfg.model_args = {**DIGITS_MODEL_ARGS, **cfg.model_args}
        defaults = model_defaults(cfg.model)
        recipe = {"epochs": 360, "batch_size": 4096, "warmup_epochs": 5.0,
                  "stochdepth_rate": 0.25, "augment": _recipe_augment(defaults),
                  "drop_rate": defaults["drop_rate"], "weight_decay": 2e-5}
        if demo:
            recipe.update(DIGITS_OVERRIDES)
            size = cfg.train_size or cfg.test_size or DIGITS_IMAGE_SIZE
            recipe.update(train_size=size, test_size=size)
        else:
            recipe.update(train_size=defaults["train_size"], test_size=defaults["test_size"])
        if cfg.init_from:  # fine-tuning: the paper's transfer preset (nfnets.finetune)
            base = recipe if demo else {}  # the demo keeps its batch and length
            recipe.update(finetune_preset(cfg.batch_size or base.get("batch_size"),
                                          cfg.epochs or base.get("epochs")))
        for key, value in recipe.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.lr is None:
            cfg.lr = peak_lr(cfg.batch_size)
        return cfg


def _recipe_augment(defaults: dict) -> str:
    # NFNets: half MixUp / half CutMix then RandAugment (experiment_nfnets.py); NF-RegNets:
    # mixup_cutmix without RandAugment (experiment_nf_regnets.py); NF-ResNets (experiment.py):
    # none.
    if defaults["ra_level"] is not None:
        return f"cutmix_mixup_randaugment_{defaults['ra_level']}"
    return "cutmix_mixup" if defaults["family"] == "nf_regnet" else "none"


# ----------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig, resume: str | os.PathLike | None = None, *,
          changes: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train as ``cfg`` says (or continue the run in ``resume``); return the summary.

    A fresh run refuses a folder that already holds a run unless ``overwrite`` (the old run is
    moved aside, not deleted). With ``resume``, ``changes`` are the settings given for the
    continuation (default: the fields of ``cfg`` that differ from ``TrainConfig()``); each is
    applied and recorded, or refused with its reason (see ``resume_config``). SIGTERM, SIGINT
    and SIGUSR1 stop the run after the current step with a checkpoint; the summary is then
    ``{"stopped_at_step": N, "signal": signum}``.

    ``resume="auto"`` continues the run in ``cfg.out`` when it has a checkpoint and starts it
    afresh otherwise, so that a job script (or torchrun restarting a failed group) can be
    re-run unchanged.
    """
    applied: dict[str, tuple[Any, Any]] = {}
    if resume == "auto":  # a run with a checkpoint continues; otherwise a fresh start
        resume = cfg.out if list_checkpoints(Path(cfg.out) / "checkpoints") else None
    if resume is not None:
        if overwrite:
            raise UsageError("--overwrite and --resume contradict each other: --resume "
                             "continues the run, --overwrite moves it aside to start anew")
        cfg, applied = resume_config(resume, _given(cfg) if changes is None else changes)
        _fit_world(cfg, applied, Path(resume), int(os.environ.get("WORLD_SIZE", "1")))
    _validate_sizes(cfg)
    cfg = cfg.resolved()
    _validate(cfg)
    rank, world, device = _setup_distributed(cfg)
    is_main = rank == 0
    lock = _claim_folder(Path(cfg.out), is_main, world, device, resume is not None, overwrite)
    try:
        with _StopRequest(is_main) as stop:
            return _train(cfg, resume, applied, rank, world, device, stop)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, resume, applied: dict[str, tuple[Any, Any]], rank: int,
           world: int, device: torch.device, stop: _StopRequest) -> dict[str, Any]:
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
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        device=None if cfg.pipeline == "exact" else device)  # batch stage on the GPU if any
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
        named = named_weights(cfg.init_from)  # a released or hf-hub: name
        if named is None:
            # A run's EMA weights when it has them (what its evaluation reports), else the raw.
            load_pretrained(model, cfg.init_from, skip_classifier=True, ema=None)
        else:
            load_backbone(model, named[1], named[2])
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
    if warmup_steps > total_steps and is_main and resume is None:
        warnings.warn(f"--warmup-epochs {cfg.warmup_epochs:g} is longer than the run "
                      f"({cfg.epochs} epochs): the learning rate never reaches its peak "
                      f"{cfg.lr:g}", stacklevel=2)
    scheduler = warmup_cosine_lr(optimizer, min(warmup_steps, total_steps - 1), total_steps)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    torch.manual_seed(cfg.seed + rank)  # ranks differ only in stochastic depth/dropout draws
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_images": 0,
             "nonfinite_steps": 0, "seconds": 0.0, "images": 0}
    checkpoint = (_resume_checkpoint(out, is_main, world, device, sharded=cfg.fsdp)
                  if resume is not None else None)
    if checkpoint is not None:
        _restore(checkpoint, model, ema, optimizer, scheduler, scaler, state, device)
        _check_horizon(checkpoint.get("total_steps"), total_steps, applied)
        del checkpoint
        if "epochs" in applied:
            _stretch_schedule(cfg, applied["epochs"][0], optimizer, scheduler, state,
                              steps_per_epoch, is_main)
    elif resume is not None and is_main:
        print(f"nfnets: {out} has no checkpoint yet; starting its run from the beginning")
    ddp_model = model
    if world > 1 and not cfg.fsdp:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(ddp_model) if cfg.compile else ddp_model

    log = _Logger(out, cfg, is_main)
    if is_main:
        log.start(cfg, model, train_set, val_set, resumed=resume is not None,
                  applied=applied, at_step=state["step"])

    # The loop.
    consecutive_nonfinite, val, signum = 0, None, None
    # A resumed run already at --stop-at-step stops before taking another step.
    stopped = cfg.stop_at_step is not None and state["step"] >= cfg.stop_at_step
    start_time = time.time() - state["seconds"]
    for epoch in range(state["epoch"], cfg.epochs if not stopped else state["epoch"]):
        sampler.set_epoch(epoch, skip_batches=state["batch_in_epoch"] * cfg.grad_accum)
        model.train()
        bar = log.progress(epoch, steps_per_epoch, state["batch_in_epoch"])
        batches = _TimedBatches(iter(loader))
        for _ in range(state["batch_in_epoch"], steps_per_epoch):
            step_start, waited = time.time(), batches.waited
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
            log.step(state, loss, optimizer, bar, time.time() - step_start,
                     batches.waited - waited)
            # The epoch's last step is saved at the epoch's end (with its evaluation done).
            saved = _should_save(cfg, state) and state["batch_in_epoch"] < steps_per_epoch
            if saved:
                _save(out, model, ema, optimizer, scheduler, scaler, state, cfg, is_main,
                      total_steps)
            signum = stop.agreed(world, device)
            at_limit = cfg.stop_at_step is not None and state["step"] >= cfg.stop_at_step
            if signum or at_limit:
                bar.close()
                if not saved:
                    _save(out, model, ema, optimizer, scheduler, scaler, state, cfg,
                          is_main, total_steps)
                stopped = True
                break
        if stopped:
            break
        bar.close()
        state["epoch"], state["batch_in_epoch"] = epoch + 1, 0
        val = _evaluate_both(model, ema, val_loader, device)
        log.epoch(epoch, state, val)
        _save(out, model, ema, optimizer, scheduler, scaler, state, cfg, is_main,
              total_steps)
        signum = stop.agreed(world, device)
        if signum and epoch + 1 < cfg.epochs:
            stopped = True
            break
    if stopped:
        log.close()
        del step_model, ddp_model
        _teardown(world)
        if is_main:
            _print_stopped(out, state["step"], signum)
        return {"stopped_at_step": state["step"], **({"signal": signum} if signum else {})}

    if val is None:  # resumed a run whose epochs were all done
        val = _evaluate_both(model, ema, val_loader, device)
    summary = {
        "val_top1": val["val_top1"], "val_top5": val["val_top5"],
        "val_top1_ema": val["val_top1_ema"], "val_top5_ema": val["val_top5_ema"],
        "epochs": cfg.epochs, "steps": state["step"], "seconds": round(state["seconds"], 2),
        "images_per_second": round(state["images"] / max(state["seconds"], 1e-9), 2),
        "skipped_images": state["skipped_images"], "nonfinite_steps": state["nonfinite_steps"],
        "input_wait_fraction": log.input_wait_fraction(),
    }
    if cfg.fsdp:  # gathered on every rank, written by rank 0
        model, ema = _gathered_copies(model, ema, cfg, len(train_set.classes))
    if is_main:
        log.finish(summary, model, ema, train_set)
    del step_model, ddp_model
    _teardown(world)
    return summary


class _TimedBatches:
    """The loader's iterator, adding up how long the loop waits for it (``waited``, seconds).

    A step that mostly waits is fed too slowly: add workers (docs/data.md, workers per GPU).
    """

    def __init__(self, iterator) -> None:
        self.iterator, self.waited = iterator, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.waited += time.perf_counter() - start


def _train_step(model: nn.Module, optimizer, batches, cfg: TrainConfig,
                device: torch.device, scaler, world: int) -> tuple[float, bool, int]:
    """Forward/backward over ``grad_accum`` micro-batches; (mean loss, finite?, skipped).

    Gradients are averaged over the global batch (DDP averages over ranks, the loss is divided
    by the accumulation steps), as the official update uses the global-batch mean (experiment.py). A
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
            # Logits in float32 for the loss (experiment.py); soft (mixed, smoothed) targets.
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
# Stopping on a signal: finish the step, checkpoint, say how to continue


# Exit status of a run stopped by a signal: 128 + the signal's number, the shell's convention
# for "ended by signal N", so schedulers and scripts see why it ended (SIGTERM 143, SIGINT
# 130, SIGUSR1 138) while the checkpoint makes it resumable.
def stop_exit_code(signum: int) -> int:
    """The command's exit status after a stop requested by signal ``signum``."""
    return 128 + signum


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class _StopRequest:
    """While active, SIGTERM, SIGINT and SIGUSR1 ask the run to stop after the current step.

    A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once. Handlers are installed
    only in the main thread (Python delivers signals there) and restored on exit.
    """

    def __init__(self, announce: bool) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()  # forked DataLoader workers inherit the handler

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in _STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker: behave as without us
            previous = self._previous.get(signum, signal.SIG_DFL)
            signal.signal(signum, previous)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signum)
            return
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self.announce:  # os.write: print() is not safe inside a signal handler
            os.write(2, f"nfnets: {signal.Signals(signum).name} received: stopping after this "
                        "step with a checkpoint (Ctrl-C again aborts at once)\n".encode())

    def agreed(self, world: int, device: torch.device) -> int | None:
        """The stop signal if any rank received one (every rank gets the same answer).

        Under DDP this is one 1-element all-reduce per step: the step has already waited for
        the device (the loss is read back), so it adds only the collective's latency, and
        every rank stops after the same step, which a per-rank decision could not promise.
        """
        if world == 1:
            return self.signum
        flag = torch.tensor([float(self.signum or 0)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def _print_stopped(out: Path, step: int, signum: int | None) -> None:
    found = list_checkpoints(out / "checkpoints")
    where = f"checkpoint {found[-1]}" if found else "no checkpoint (weights not finite)"
    why = f"by {signal.Signals(signum).name}" if signum else "as asked (--stop-at-step)"
    print(f"nfnets: stopped {why} at step {step}; {where}. Continue with: nfnets train "
          f"--resume {shlex.quote(str(out))}", flush=True)


# ----------------------------------------------------------------------------------------------
# The run folder: one run per folder, no leftovers, an old run only moved aside


def _all_agree(ok: bool, world: int, device: torch.device) -> bool:
    if world == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _claim_folder(out: Path, is_main: bool, world: int, device: torch.device, resumed: bool,
                  overwrite: bool) -> RunLock | None:
    """Rank 0 locks ``out`` and readies it; every rank learns whether that worked."""
    lock, error = None, None
    if is_main:
        try:
            lock = RunLock(out).acquire()
            _prepare_folder(out, resumed, overwrite)
        except NFNetsError as err:
            if lock is not None:
                lock.release()
            lock, error = None, err
    if not _all_agree(error is None, world, device):
        raise error or RunFailed(f"rank 0 could not take {out}; see its message")
    return lock


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds (part of) a training run."""
    return any((out / name).exists() for name in
               ("config.json", "summary.json", "metrics.jsonl", "model.safetensors")) or bool(
        list_checkpoints(out / "checkpoints"))


def _prepare_folder(out: Path, resumed: bool, overwrite: bool) -> None:
    """Remove temp files a killed run left; refuse (or move aside) an old run for a new one."""
    for folder in (out, out / "checkpoints"):
        removed = remove_temp_files(folder) + remove_temp_checkpoints(folder)
        if removed:
            print(f"nfnets: removed {len(removed)} temp file(s) an interrupted run left in "
                  f"{folder}")
    if resumed or not holds_run(out):
        return
    if not overwrite:
        found = list_checkpoints(out / "checkpoints")
        what = f"checkpoints up to {found[-1].name}" if found else "a run record"
        raise UsageError(
            f"{out} already holds a run ({what}); continue it with --resume {out}, start "
            "over with --overwrite (the old run is moved aside, not deleted), or choose "
            "another --out")
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    aside.mkdir()
    for entry in out.iterdir():
        if entry.name != LOCK_NAME:
            os.replace(entry, aside / entry.name)
    print(f"nfnets: --overwrite: moved the previous run in {out} to {aside}")


def _resume_checkpoint(out: Path, is_main: bool, world: int, device: torch.device,
                       sharded: bool = False) -> dict[str, Any] | None:
    """The newest good checkpoint (rank 0 chooses and moves bad ones aside; all load it).

    ``sharded`` (an --fsdp run): a sharded checkpoint is returned as its small state, for each
    rank to read its own shards (``_restore``); a single file is read whole on every rank.
    """
    directory = out / "checkpoints"
    full = not sharded
    if world == 1:
        return load_latest_checkpoint(directory, full=full)
    checkpoint, error, chosen = None, None, [None]
    if is_main:
        try:
            checkpoint = load_latest_checkpoint(directory, full=full)
            chosen = [checkpoint["path"] if checkpoint is not None else ""]
        except CheckpointError as err:
            error = err
    dist.broadcast_object_list(chosen, src=0)  # None: rank 0 found none usable
    if error is not None:
        raise error
    if chosen[0] is None:
        raise RunFailed(f"rank 0 found no usable checkpoint in {directory}; see its message")
    if not is_main and chosen[0]:
        checkpoint = read_checkpoint(chosen[0], full=full)  # rank 0 verified it
    return checkpoint


# ----------------------------------------------------------------------------------------------
# Resuming: what may change, and what that means

# May change on resume without changing the run's arithmetic (beyond float rounding for a new
# device or --compile); applied, printed and recorded in config.json.
_RESUME_APPLIES = {"stop_at_step", "progress", "num_workers", "log_every", "tensorboard",
                   "device", "eval_batch_size", "keep_checkpoints", "save_every",
                   "max_nonfinite", "compile", "channels_last", "grad_checkpointing",
                   # the global batch stays: only how it is split over processes changes
                   "grad_accum", "fsdp"}
# Changes the schedule: applied, with the new cosine horizon printed.
_RESUME_SCHEDULE = {"epochs"}
_REFUSAL = ("changes the run's optimisation, data or model, which its checkpoint (optimiser "
            "state, schedule, data order) belongs to; to train with it, start a new run with "
            "--init-from {run}")


def resume_config(run_dir: str | os.PathLike, changes: dict[str, Any]
                  ) -> tuple[TrainConfig, dict[str, tuple[Any, Any]]]:
    """The config of the run in ``run_dir`` with ``changes`` applied, and what changed.

    Returns ``(config, {field: (old, new)})``. A change to a field outside the allowed ones
    (session settings like ``progress`` or ``num_workers``, and ``epochs``) raises UsageError
    listing every refused field with the reason; values equal to the run's are not changes.
    """
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {run_dir} is not a run directory (no config.json)")
    try:
        saved = json.loads(path.read_text())["train"]
        if not isinstance(saved, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"--resume: {path} has no 'train' section; it was not written "
                              "by nfnets train, or it is damaged") from None
    saved.setdefault("pipeline", "exact")  # runs from before the fast pipeline used the exact one
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    restored = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    restored.out, restored.stop_at_step = str(run_dir), None  # stop_at_step: this session only
    applied, refused = {}, []
    for name, value in changes.items():
        if name not in known:
            raise UsageError(f"--resume: unknown setting {name!r}")
        if name == "out":
            if Path(value).resolve() != run_dir.resolve():
                refused.append(f"--out {value}: a resumed run stays in its folder {run_dir}")
            continue
        old = getattr(restored, name)
        if name == "model_args" and isinstance(value, dict):
            value = {**old, **value}  # --model-arg overrides keys; the others stay the run's
        if value is None or value == old:
            continue
        if name in _RESUME_APPLIES or name in _RESUME_SCHEDULE:
            applied[name] = (old, value)
            setattr(restored, name, value)
        else:
            flag = "--model-arg" if name == "model_args" else f"--{name.replace('_', '-')}"
            refused.append(f"{flag} {old} → {value} " + _REFUSAL.format(run=run_dir))
    if refused:
        raise UsageError("--resume cannot change: " + "; ".join(refused))
    return restored, applied


def _fit_world(cfg: TrainConfig, applied: dict[str, tuple[Any, Any]], run_dir: Path,
               world: int) -> None:
    """Resumed on another number of processes: keep the global batch, or refuse.

    The per-process micro-batch stays when the run's micro-batches per step (processes ×
    --grad-accum) divide among the new processes (then --grad-accum is recomputed), else
    --grad-accum stays and the micro-batch changes; when neither splits the batch evenly, the
    resume is refused. An --fsdp run resumed on one process continues unsharded. Each change
    is printed and recorded in config.json (``world_size`` and ``resumes``).
    """
    try:
        old = json.loads((run_dir / "config.json").read_text()).get("world_size")
    except (OSError, ValueError, AttributeError):
        old = None
    if not isinstance(old, int) or old == world:
        return
    if cfg.fsdp and world == 1 and "fsdp" not in applied:
        applied["fsdp"] = (True, False)
        cfg.fsdp = False
    accum, batch = cfg.grad_accum, cfg.batch_size
    if "grad_accum" not in applied:
        micro_batches = old * accum  # per step, over all processes
        if micro_batches % world == 0:
            accum = micro_batches // world
        elif batch % (world * accum):
            raise UsageError(
                f"--resume on {world} processes: the run's global batch {batch} (on {old} "
                f"processes × --grad-accum {cfg.grad_accum}) cannot be split evenly over "
                f"{world} processes; resume on a number of processes that divides it, or give "
                "--grad-accum so that processes × --grad-accum divides it")
        if accum != cfg.grad_accum:
            applied["grad_accum"] = (cfg.grad_accum, accum)
            cfg.grad_accum = accum
    applied["world_size"] = (old, world)
    if os.environ.get("RANK", "0") == "0" and batch % (world * cfg.grad_accum) == 0:
        print(f"nfnets: resume on {world} process{'es' if world > 1 else ''} (the run used "
              f"{old}): global batch {batch} kept, {batch // (world * cfg.grad_accum)} per "
              f"process per micro-batch × --grad-accum {cfg.grad_accum} (recorded in "
              "config.json)")


def _given(cfg: TrainConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that differ from ``TrainConfig()`` (what a caller set)."""
    default = TrainConfig()
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)
            if getattr(cfg, f.name) != getattr(default, f.name)}


def _stretch_schedule(cfg: TrainConfig, old_epochs: int, optimizer, scheduler, state: dict,
                      steps_per_epoch: int, is_main: bool) -> None:
    """After --epochs changed on resume: check it, set the lr of the new schedule, say so."""
    done = state["epoch"] + (1 if state["batch_in_epoch"] else 0)
    if cfg.epochs < done:
        raise UsageError(f"--epochs {cfg.epochs}: the run has already started epoch {done}; "
                         "give at least that many")
    old_lr = optimizer.param_groups[0]["lr"]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs,
                                   scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if is_main:
        print(f"nfnets: resume: --epochs {old_epochs} → {cfg.epochs}: the cosine schedule now "
              f"ends at step {cfg.epochs * steps_per_epoch} (was {old_epochs * steps_per_epoch}"
              f"); learning rate at step {state['step']}: {old_lr:.6g} → "
              f"{optimizer.param_groups[0]['lr']:.6g} (recorded in config.json)")


# ----------------------------------------------------------------------------------------------
# Setup helpers


def _validate(cfg: TrainConfig) -> None:
    problems = []
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        problems.append(f"--precision must be fp32, bf16 or fp16, not {cfg.precision!r}")
    if cfg.pipeline not in ("fast", "exact"):
        problems.append(f"--pipeline must be fast or exact, not {cfg.pipeline!r}")
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
    if not 0 <= cfg.momentum < 1:
        problems.append(f"--momentum must be in [0, 1), not {cfg.momentum:g}")
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


def _validate_sizes(cfg: TrainConfig) -> None:
    """Sizes, checked before the digits demo fills one from the other."""
    for name in ("train_size", "test_size"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if (cfg.data == "digits" and None not in (cfg.train_size, cfg.test_size)
            and cfg.train_size != cfg.test_size):
        raise UsageError("the digits demo trains and evaluates at one size: give --train-size "
                         f"only (got --train-size {cfg.train_size}, --test-size "
                         f"{cfg.test_size})")


def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            _warn_shared_rendezvous_store()
            dist.init_process_group("nccl" if cuda else "gloo", timeout=_collective_timeout())
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cfg.fsdp:
            check_same_device_type(device)
        return dist.get_rank(), world, device
    if cfg.device not in ("auto", "cpu", "cuda"):
        return 0, 1, torch.device(cfg.device)
    return 0, 1, torch.device("cuda" if cuda else "cpu")


def _warn_shared_rendezvous_store() -> None:
    """Say so when torchrun may restart this group over a store kept from the previous one.

    With ``--max-restarts`` and the c10d rendezvous, torchrun keeps one TCP store for every
    restart round (torch/distributed/elastic/rendezvous/dynamic_rendezvous.py: the shared
    store), so the restarted ranks can read the dead group's addresses and fail to connect
    (or wait) at the next process-group setup. ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``,
    set for torchrun, gives each round a fresh store.
    """
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if (restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and os.environ.get("RANK", "0") == "0"
            and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0):
        print("nfnets: warning: torchrun --max-restarts shares one rendezvous store across "
              "restarts, where a restarted group can find the dead group's addresses; export "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun (docs/distributed.md)",
              file=sys.stderr, flush=True)


def _collective_timeout() -> datetime.timedelta | None:
    """``NFNETS_DIST_TIMEOUT`` (seconds): how long a collective may wait for a rank that is
    gone before it fails (torch's default otherwise: 10 min with NCCL, 30 min with gloo). A
    short one lets torchrun restart a group sooner when a rank hangs instead of dying."""
    value = os.environ.get("NFNETS_DIST_TIMEOUT")
    if not value:
        return None
    try:
        seconds = float(value)
        if seconds <= 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"NFNETS_DIST_TIMEOUT must be a positive number of seconds, not "
                         f"{value!r}") from None
    return datetime.timedelta(seconds=seconds)


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
    return open_datasets(cfg.data, cfg.train_size, cfg.test_size,
                         exact=cfg.pipeline == "exact")


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


def _save(out: Path, model, ema, optimizer, scheduler, scaler, state, cfg, is_main,
          total_steps: int) -> None:
    # Every rank's RNG would differ; rank 0's checkpoint restores rank 0 exactly, and other
    # ranks reseed deterministically from it on resume.
    world = dist.get_world_size() if dist.is_initialized() else 1
    small = {
        "ema": {k: v for k, v in ema.state_dict().items() if k != "module"},
        "scheduler": scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        **state, "rng": _rng_state(), "model_name": model.model_name,
        "model_kwargs": model.model_kwargs, "config": dataclasses.asdict(cfg),
        "world_size": world, "total_steps": total_steps,
    }
    # Never replace a good checkpoint with diverged weights (the run stops soon after).
    if not _all_agree(_finite(model), world if cfg.fsdp else 1, _device_of(model)):
        if is_main:
            print(f"nfnets: weights are not finite at step {state['step']}; checkpoint not "
                  "written", file=sys.stderr)
        return
    try:
        if cfg.fsdp:  # collective: every rank writes its shards, nothing is gathered
            save_sharded_checkpoint(model, ema.module, optimizer, small, out / "checkpoints",
                                    state["step"], cfg.keep_checkpoints)
        elif is_main:
            checkpoint = {**small, "model": model.state_dict(), "ema": ema.state_dict(),
                          "optimizer": optimizer.state_dict()}
            save_checkpoint(checkpoint, out / "checkpoints", state["step"],
                            cfg.keep_checkpoints)
    except RunFailed as err:  # the disk refused: say what is still safe
        raise RunFailed(f"{err}; {_intact(out)}") from None


def _finite(model: nn.Module) -> bool:
    """Whether this rank's weights (its shards, under FSDP) are all finite."""
    from torch.distributed.tensor import DTensor

    local = [w.to_local() if isinstance(w, DTensor) else w for w in model.state_dict().values()]
    local = [w.detach().float() for w in local if w.numel()]
    return not local or bool(torch.isfinite(torch.stack(torch._foreach_norm(local))).all())


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _intact(out: Path) -> str:
    """Which checkpoint is still good after a failed write (for the one-line error)."""
    found = list_checkpoints(out / "checkpoints")
    if not found:
        return "no checkpoint had been written yet"
    return f"the previous checkpoint {found[-1]} is intact; resume from it with --resume {out}"


def _restore(checkpoint, model, ema, optimizer, scheduler, scaler, state, device) -> None:
    from .distributed import is_sharded

    sharded = is_sharded(model)
    if "sharded_path" in checkpoint:  # each rank reads its own shards (resharded by DCP)
        load_sharded(checkpoint, model, ema.module, optimizer)
        ema.num_updates = int(checkpoint["ema"]["num_updates"])
        _restore_small(checkpoint, scheduler, scaler, state)
        return
    if sharded != _keyed_by_name(checkpoint["optimizer"]):
        # An --fsdp run keys optimizer state by parameter name, a plain one by position
        checkpoint["optimizer"] = _rekeyed(model, optimizer, checkpoint["optimizer"], sharded)
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
    _restore_small(checkpoint, scheduler, scaler, state)


def _check_horizon(saved: int | None, total_steps: int, applied: dict) -> None:
    """The cosine schedule's length is the run's: only --epochs may change it on resume."""
    if saved is None or saved == total_steps or "epochs" in applied:
        return
    raise RunFailed(f"resuming would change the learning-rate schedule from {saved} to "
                    f"{total_steps} steps (the steps per epoch changed with the processes or "
                    "batch split); resume with the run's number of processes")


def _keyed_by_name(optimizer_state: dict[str, Any]) -> bool:
    groups = optimizer_state.get("param_groups") or [{}]
    return any(isinstance(p, str) for group in groups for p in group.get("params", ()))


def _rekeyed(model: nn.Module, optimizer, saved: dict[str, Any], by_name: bool
             ) -> dict[str, Any]:
    """An optimizer state dict keyed the other way: by parameter name
    (``get_optimizer_state_dict``'s form, ``by_name``) or by position in ``optimizer``'s
    param groups (``torch.optim``'s own)."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    key = dict(enumerate(order)) if by_name else {name: i for i, name in enumerate(order)}
    try:
        groups = [{**group, "params": [key[p] for p in group["params"]]}
                  for group in saved["param_groups"]]
        state = {key[p]: value for p, value in saved["state"].items()}
    except KeyError as err:
        raise CheckpointError(f"the checkpoint's optimizer state has parameter {err}, which "
                              "this model does not have") from None
    return {"state": state, "param_groups": groups}


def _restore_small(checkpoint, scheduler, scaler, state) -> None:
    """Schedule, scaler, counters, data position and RNG: what every checkpoint holds whole."""
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
        self.since_log = [0.0, 0.0, 0]  # step seconds, input wait, steps since the last log
        self.run_time = [0.0, 0.0]  # the same since this process started

    def start(self, cfg: TrainConfig, model, train_set, val_set, resumed: bool,
              applied: dict[str, tuple[Any, Any]], at_step: int) -> None:
        try:
            (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create {self.out / 'checkpoints'}: {err.strerror}") from None
        if resumed:
            self._record_resume(cfg, applied, at_step)
            self._drop_metrics_after(at_step)
        else:
            config = {"model": model.model_name, "model_kwargs": model.model_kwargs,
                      "classes": list(train_set.classes), "train_size": cfg.train_size,
                      "test_size": cfg.test_size, "data": cfg.data,
                      "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                      "train": dataclasses.asdict(cfg)}
            if cfg.data == "digits":
                config["digits_demo_changes"] = _digits_changes(cfg)
            atomic_write(self.out / "config.json",
                         lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
        print(f"nfnets: {'resuming' if resumed else 'training'} {model.model_name} "
              f"({sum(p.numel() for p in model.parameters()):,} parameters) on {cfg.data}: "
              f"{len(train_set)} train / {len(val_set)} val images, "
              f"{len(train_set.classes)} classes; run directory {self.out}")
        if cfg.data != "digits" and cfg.pipeline == "fast":
            print(f"nfnets: {jpeg_decoding()}")
        if cfg.data == "digits" and not resumed:
            print("nfnets: the digits demo differs from the ImageNet recipe in:")
            for key, value in _digits_changes(cfg).items():
                print(f"  - {key}: {value}")
        if cfg.tensorboard:  # _validate checked that the package is there
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))

    def _record_resume(self, cfg: TrainConfig, applied: dict[str, tuple[Any, Any]],
                       at_step: int) -> None:
        """Write what a resume changed into config.json (``train`` and a ``resumes`` log)."""
        path = self.out / "config.json"
        config = json.loads(path.read_text())
        persistent = {k: new for k, (_, new) in applied.items()
                      if k not in ("stop_at_step", "world_size")}
        config["train"].update(persistent)
        if "world_size" in applied:
            config["world_size"] = applied["world_size"][1]
        config.setdefault("resumes", []).append({
            "at_step": at_step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "changes": {k: {"from": old, "to": new} for k, (old, new) in applied.items()}})
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
        for name, (old, new) in applied.items():
            if name not in ("epochs", "world_size"):  # printed by _stretch_schedule, _fit_world
                print(f"nfnets: resume: --{name.replace('_', '-')} {old} → {new} (applied"
                      f"{'' if name == 'stop_at_step' else '; recorded in config.json'})")

    def _drop_metrics_after(self, step: int) -> None:
        """Forget metrics.jsonl records past the checkpoint resumed from: they are redone."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) > step:
                    continue
            except ValueError:  # a line cut by a kill: dropped too
                continue
            kept.append(line)
        if len(kept) != len(lines):
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))

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

    def step(self, state: dict, loss: float, optimizer, bar, seconds: float,
             input_wait: float) -> None:
        """One step took ``seconds``, of which ``input_wait`` waiting for its batch."""
        if math.isfinite(loss):
            self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + 1
        self.since_log = [self.since_log[0] + seconds, self.since_log[1] + input_wait,
                          self.since_log[2] + 1]
        self.run_time = [self.run_time[0] + seconds, self.run_time[1] + input_wait]
        bar.update(1)
        if not self.active or state["step"] % self.cfg.log_every:
            return
        total, waited, steps = self.since_log
        self.since_log = [0.0, 0.0, 0]
        images_per_second = steps * self.cfg.batch_size / max(total, 1e-9)
        wait = waited / max(total, 1e-9)
        # Reading the clip count waits for the device, so only at logging steps.
        stats = optimizer.last_stats
        clip = float(stats.fraction) if stats is not None and stats.units else 0.0
        lr = optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", img_s=f"{images_per_second:.1f}",
                        clip=f"{clip:.3f}", wait=f"{wait:.0%}", refresh=False)
        record = {"kind": "train", "step": state["step"], "epoch": state["epoch"],
                  "loss": loss if math.isfinite(loss) else None, "lr": lr,
                  "clip_fraction": clip, "images_per_second": round(images_per_second, 2),
                  "input_wait_fraction": round(wait, 4), "seconds": round(state["seconds"], 2)}
        self._write(record)

    def input_wait_fraction(self) -> float | None:
        """Share of this process's step time spent waiting for batches (None before a step)."""
        total, waited = self.run_time
        return round(waited / total, 4) if total > 0 else None

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
        path = self.out / "metrics.jsonl"
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            failure = disk_error(path, err)
            if failure is None:
                raise
            raise RunFailed(f"{failure}; {_intact(self.out)}") from None
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
              f"{summary['seconds']:.0f}s{_wait_note(summary['input_wait_fraction'])}, "
              f"{summary['skipped_images']} unreadable images skipped, "
              f"{summary['nonfinite_steps']} non-finite steps skipped. Run directory: "
              f"{self.out}")
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


def _wait_note(fraction: float | None) -> str:
    if fraction is None:
        return ""
    note = f" ({fraction:.0%} of it waiting for input"
    if fraction > 0.1:  # the loader, not the model, set the pace
        note += "; more --num-workers would help, docs/data.md"
    return note + ")"


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
