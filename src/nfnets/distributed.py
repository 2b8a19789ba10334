"""Data-parallel training on PyTorch's own stack: FSDP2 sharding for NF models.

``shard_model`` wraps a model with ``torch.distributed.fsdp.fully_shard`` (FSDP2): one FSDP
unit per residual block plus the root (stem, final conv, head), so at most one block's full
parameters and gradients exist at a time beside the root's. Each parameter becomes a
``DTensor`` sharded along dim 0; :mod:`nfnets.agc` clips such gradients exactly (the units of
conv and Linear weights stay whole on a rank, the norms of split vectors are all-reduced).

Two details of NF models that FSDP2 does not cover by itself:

- ``fully_shard`` refuses 0-dim parameters, and every residual block has one, the SkipInit
  gain ``skip_gain`` (a scalar in the official code, ``nfnets/nfnet.py``: NFBlock). Scalars
  are therefore left unsharded (``ignored_params``), replicated on every rank, and
  :func:`sync_replicated_grads` averages their gradients in one all-reduce per step, as the
  reduce-scatter does for the sharded ones.
- Evaluation shards its data unevenly (the last ranks may get one batch fewer), so a sharded
  forward, which all-gathers in every FSDP unit, would wait forever on a rank that has no
  batch left: :func:`gathered` holds the full parameters for the whole evaluation instead.

See ``docs/distributed.md`` for the launch recipes (torchrun, SLURM, Kubernetes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "full_model_state",
    "full_optimizer_state",
    "check_same_device_type",
    "discard_unreduced_grads",
    "gathered",
    "gradient_sync",
    "is_sharded",
    "load_full_model_state",
    "load_full_optimizer_state",
    "mixed_precision_policy",
    "replicated_params",
    "shard_model",
    "sync_replicated_grads",
]


def mixed_precision_policy(precision: str):
    """FSDP2's ``MixedPrecisionPolicy`` for ``--precision``.

    bf16/fp16: parameters all-gathered and computed in that dtype, gradients reduced in
    float32 and kept, like the optimizer state and the master weights, in float32 shards.
    fp32: no casting.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32":
        return MixedPrecisionPolicy()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def replicated_params(model: nn.Module) -> set[nn.Parameter]:
    """The parameters FSDP2 cannot shard (0-dim ones), kept whole on every rank."""
    return {p for p in model.parameters() if p.ndim == 0}


def shard_model(model: nn.Module, precision: str = "fp32", mesh: Any = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place with FSDP2: one unit per residual block, plus the root.

    ``model`` must be on its training device already (FSDP2 shards what it finds there) and
    carry its final parameters: an optimizer must be built after this call, from the new
    (DTensor) parameters. ``mesh`` defaults to all ranks on one dim (plain FSDP); a 2-D
    ``(replicate, shard)`` mesh gives HSDP. Returns ``model`` (its class now also an
    ``FSDPModule``).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:  # one mesh (and so one process group) for every unit
        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    ignored = replicated_params(model)
    kwargs = {"mesh": mesh, "mp_policy": mixed_precision_policy(precision),
              "reshard_after_forward": reshard_after_forward, "ignored_params": ignored}
    for block in getattr(model, "blocks", ()):
        fully_shard(block, **kwargs)
    # The root unit holds the rest (stem, final conv, classifier); its parameters are needed
    # again first in backward, so it keeps them gathered after forward.
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by FSDP2 (``fully_shard``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@torch.no_grad()
def sync_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of the replicated (unsharded) parameters over the ranks.

    One all-reduce for all of them; call it after the step's last backward, where FSDP2 has
    reduce-scattered the sharded gradients. A replicated parameter without a gradient on this
    rank contributes zeros (every rank must send the same layout).
    """
    params = sorted(replicated_params(model), key=lambda p: _name_order(model)[id(p)])
    if not params or not dist.is_initialized():
        return
    flat = torch.stack([torch.zeros_like(p) if p.grad is None else p.grad.reshape(())
                        for p in params]).float()
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat, strict=True):
        p.grad = g.to(p.dtype).reshape(p.shape)


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across ranks in the backward passes inside, or (``enabled=False``)
    only accumulate them locally: for the non-final micro-batches of gradient accumulation.

    FSDP2 (``set_requires_gradient_sync``) then keeps unsharded gradients until the last
    micro-batch reduce-scatters their sum; DDP uses ``no_sync``; a plain model ignores it.
    """
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    no_sync = getattr(model, "no_sync", None)
    with nullcontext() if enabled or no_sync is None else no_sync():
        yield


def discard_unreduced_grads(model: nn.Module) -> None:
    """Drop the gradients FSDP2 accumulated unsharded under ``gradient_sync(model, False)``.

    For a step abandoned mid-accumulation (a non-finite loss): ``zero_grad`` only clears the
    sharded gradients, and the next reduce-scatter would add these to the next step's. FSDP2
    has no public call for this, so its per-parameter state is reached through the private
    ``_get_fsdp_state()``; where that is missing, nothing is dropped.
    """
    for module in model.modules():
        if not is_sharded(module):
            continue
        group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
        for fsdp_param in getattr(group, "fsdp_params", ()):
            fsdp_param.unsharded_accumulated_grad = None
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None:
                unsharded.grad = None


def check_same_device_type(device: torch.device) -> None:
    """Raise ``UsageError`` on every rank unless all ranks train on the same kind of device.

    FSDP2 and DDP run one collective backend for all ranks, so a job whose nodes mix GPUs
    and CPUs cannot train. The check runs over a gloo group, which every rank can join.
    """
    from .errors import UsageError

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    group = dist.new_group(backend="gloo")
    kinds: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(kinds, device.type, group=group)
    dist.destroy_process_group(group)
    if len(set(kinds)) > 1:
        counts = {kind: kinds.count(kind) for kind in sorted(set(kinds))}
        raise UsageError(
            f"the ranks train on different kinds of device ({counts}); give every node the "
            "same hardware, or pass --device cpu (or cuda) so that all ranks agree"
        )


def _name_order(model: nn.Module) -> dict[int, int]:
    # A set has no order that ranks agree on; parameter registration order is the same on all.
    return {id(p): i for i, p in enumerate(model.parameters())}


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Hold every FSDP unit of ``model`` unsharded, so forwards need no collectives.

    For evaluation: each rank may then run any number of batches. The full parameters exist
    on every rank while inside (in the compute dtype of the mixed-precision policy).
    """
    if not is_sharded(model):
        yield model
        return
    units = [m for m in model.modules() if is_sharded(m)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not model, recurse=False)
            unit.reshard()


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a sharded model, on the CPU.

    Collective: every rank must call it. Rank 0 receives the tensors; the others an empty
    dict (``cpu_offload`` gathers onto rank 0 only).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state dict (keyed by parameter names), on rank 0; collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=_options(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (given on every rank) into a sharded model; collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(full_state_dict=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    """Load what :func:`full_optimizer_state` returned (given on every rank); collective."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options(full_state_dict=True))
