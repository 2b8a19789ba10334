"""Adaptive Gradient Clipping (AGC), unit-wise, in PyTorch tensor layouts.

Follows the official ``nfnets/optim.py``: ``unitwise_norm``, ``SGD_AGC``
with the Haiku axis conventions translated to PyTorch ones. Two entry points:

- :func:`adaptive_clip_grad_` clips the ``.grad`` of a list of parameters in place;
- :class:`AGC` wraps any ``torch.optim.Optimizer`` and clips before each of its steps, with a
  per-parameter-group ``clipping`` factor (``None`` = not clipped).

Both take FSDP2-sharded parameters (``DTensor``) as well; see :func:`_clip_sharded` and
``docs/distributed.md``: the result is that of AGC on the full tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.optim import Optimizer

__all__ = ["AGC", "ClipStats", "adaptive_clip_grad_", "unit_count"]

CLIPPING = 0.01  # λ, deepmind-research nfnets/experiment_nfnets.py: get_config
EPS = 1e-3  # floor on the parameter norm, deepmind-research nfnets/optim.py
GRAD_NORM_FLOOR = 1e-6  # floor on the gradient norm, deepmind-research nfnets/optim.py

# Devices whose foreach ops loop over the tensors anyway (no fused multi-tensor kernels): there
# each multi-unit gradient is rescaled right after its norms are taken, while it is still in
# cache (F0 on the CPU: 20 % less time). Elsewhere one batched pass launches fewest kernels.
_PER_TENSOR_DEVICES = {"cpu"}


class ClipStats(NamedTuple):
    """What one AGC call did.

    ``clipped`` is a 0-dim int64 tensor on the gradients' device, so reading it costs no host
    sync until you ask for it (``int(stats.clipped)``); ``units`` is a plain int.
    """

    clipped: torch.Tensor  # number of units whose gradient was rescaled
    units: int  # number of units examined (parameters without a gradient are not counted)

    @property
    def fraction(self) -> torch.Tensor:
        """Fraction of units clipped, as a 0-dim float tensor (0 when there were no units)."""
        return self.clipped / max(self.units, 1)


def _is_one_unit(shape: torch.Size) -> bool:
    # The official squeeze rule: a tensor with at most one non-singleton dim (scalar, vector,
    # Linear (out, 1), conv (out, 1, 1, 1)) is one unit, whatever its rank
    # (nfnets/optim.py: unitwise_norm).
    return sum(size != 1 for size in shape) <= 1


def unit_count(shape: torch.Size | tuple[int, ...]) -> int:
    """Number of AGC units in a tensor of this shape (1, or the size of dim 0)."""
    return 1 if _is_one_unit(torch.Size(shape)) else shape[0]


def _check_clipping(clipping: float) -> None:
    if not clipping > 0:
        raise ValueError(f"clipping must be a positive number, got {clipping!r}")


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def _params_with_grad(parameters: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = list(parameters)
    seen: set[int] = set()
    for p in params:
        if id(p) in seen:
            raise ValueError(
                f"parameter of shape {tuple(p.shape)} is given twice; it would be clipped twice"
            )
        seen.add(id(p))
    with_grad = [p for p in params if p.grad is not None]
    for p in with_grad:
        if p.grad.is_sparse:
            raise ValueError(f"AGC does not support sparse gradients (shape {tuple(p.shape)})")
        if not p.grad.is_floating_point():
            raise ValueError(
                f"AGC needs floating-point gradients, got {p.grad.dtype} for a parameter of "
                f"shape {tuple(p.shape)}"
            )
    return with_grad


def _unit_norms(tensors: list[torch.Tensor], n_whole: int, dtype: torch.dtype) -> torch.Tensor:
    """Norms of all units, flattened: the first ``n_whole`` tensors are one unit each, the rest
    are reduced over every dim but dim 0 (PyTorch keeps output units on dim 0: conv OIHW,
    Linear (out, in))."""
    pieces = []
    if n_whole:
        # One multi-tensor kernel for every whole-tensor unit.
        pieces.append(torch.stack(torch._foreach_norm(tensors[:n_whole], 2, dtype=dtype)))
    # No foreach op reduces over some dims only, so per-output-unit norms take one batched
    # reduction per tensor; reducing over dims (not a flattened copy) also keeps channels_last
    # tensors copy-free.
    pieces += [torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), dtype=dtype)
               for t in tensors[n_whole:]]
    return torch.cat(pieces)


def _clip_group(params: list[torch.Tensor], clipping: float, eps: float) -> torch.Tensor:
    """Clip parameters that share device and dtype; return the clipped-unit count."""
    # Whole-tensor units first, so their norms come from a single _foreach_norm.
    params = sorted(params, key=lambda p: not _is_one_unit(p.shape))
    n_whole = sum(_is_one_unit(p.shape) for p in params)
    # Norms in at least float32: a bf16/fp16 sum of squares loses precision or overflows.
    norm_dtype = torch.promote_types(params[0].dtype, torch.float32)
    if params[0].device.type not in _PER_TENSOR_DEVICES:
        return _clip_batch(params, n_whole, clipping, eps, norm_dtype)
    counts = [_clip_batch(params[:n_whole], n_whole, clipping, eps, norm_dtype)]
    counts += [_clip_units(p, clipping, eps, norm_dtype) for p in params[n_whole:]]
    return torch.stack(counts).sum()


def _clip_scale(max_norm: torch.Tensor, grad_norm: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(units to clip, factor per unit): max_norm / ||G|| where ||G|| > max_norm, else 1."""
    clip = grad_norm > max_norm
    # At equality clipping is a no-op, so ">" and the official "keep where g < max" agree.
    return clip, torch.where(clip, max_norm / grad_norm.clamp_min(GRAD_NORM_FLOOR), 1.0)


def _clip_batch(params: list[torch.Tensor], n_whole: int, clipping: float, eps: float,
                norm_dtype: torch.dtype) -> torch.Tensor:
    """Clip ``params`` (whole-tensor units first) with multi-tensor kernels; count clips."""
    if not params:
        return torch.zeros((), dtype=torch.int64)
    weights = [p.detach() for p in params]
    grads = [p.grad for p in params]
    max_norm = _unit_norms(weights, n_whole, norm_dtype).clamp_min_(eps).mul_(clipping)
    clip, scale = _clip_scale(max_norm, _unit_norms(grads, n_whole, norm_dtype))
    # Views of `scale` that broadcast against each gradient; the multiply keeps the float32
    # scale (an fp16 scale of 1e-6 would be subnormal) and rounds once into the grad dtype.
    sizes = [unit_count(g.shape) for g in grads]
    factors = [
        s.reshape(()) if i < n_whole else s.view(-1, *([1] * (g.ndim - 1)))
        for i, (s, g) in enumerate(zip(scale.split(sizes), grads, strict=True))
    ]
    torch._foreach_mul_(grads, factors)
    return clip.sum()


def _clip_units(param: torch.Tensor, clipping: float, eps: float, norm_dtype: torch.dtype
                ) -> torch.Tensor:
    """Clip one multi-unit parameter (units along dim 0); count clips."""
    grad = param.grad
    dims = tuple(range(1, grad.ndim))
    weight_norm = torch.linalg.vector_norm(param.detach(), dim=dims, dtype=norm_dtype)
    max_norm = weight_norm.clamp_min_(eps).mul_(clipping)
    clip, scale = _clip_scale(max_norm, torch.linalg.vector_norm(grad, dim=dims,
                                                                 dtype=norm_dtype))
    grad.mul_(scale.view(-1, *([1] * len(dims))))
    return clip.sum()


def adaptive_clip_grad_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    clipping: float = CLIPPING,
    eps: float = EPS,
) -> ClipStats:
    """Clip each parameter's ``.grad`` in place, unit-wise (Adaptive Gradient Clipping).

    For every unit ``i`` with weight ``W_i`` and gradient ``G_i``::

        max_norm = clipping * max(||W_i||, eps)
        G_i <- G_i * max_norm / max(||G_i||, 1e-6)   where ||G_i|| > max_norm

    Units, in PyTorch layouts: one per output channel for conv weights (O, I, kh, kw), reduced
    over (I, kh, kw); one per output row for ``nn.Linear`` weights (out, in); in general one per
    index of dim 0 for tensors of rank >= 2 (also Conv1d/Conv3d weights, which the official
    code has no rule for). Vectors and scalars (WS gains, biases, ``skip_gain``) are one unit.
    **Squeeze rule** (official ``unitwise_norm``): a tensor with at most one non-singleton dim
    is ONE unit, e.g. a Linear weight (out, 1) or a conv weight (out, 1, 1, 1) -- not ``out``
    units as a "reduce all but dim 0" rule would give.

    Parameters without a gradient are skipped. Tensors are grouped by device and dtype and
    processed with multi-tensor (``torch._foreach_*``) kernels; norms are taken in at least
    float32. No host synchronisation happens. Works under ``torch.compile``.

    Sharded parameters (``DTensor``, e.g. from FSDP2's ``fully_shard``) are clipped exactly as
    their full tensors would be, with one all-reduce for the whole call (see
    :func:`_clip_sharded`); the returned count is then the global one, on every rank.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        clipping: the clipping factor λ (> 0); the paper uses 0.01 for batch 1024-4096.
        eps: floor on the parameter norm (> 0), so zero-initialised units can still move.

    Returns:
        :class:`ClipStats` with the number of clipped units (a 0-dim tensor on the gradients'
        device) and the number of units examined.

    Raises:
        ValueError: on ``clipping <= 0``, ``eps <= 0``, a parameter given twice, or a
            sparse or non-floating-point gradient.
    """
    _check_clipping(clipping)
    _check_eps(eps)
    params = _params_with_grad(parameters)
    if not params:
        return ClipStats(torch.zeros((), dtype=torch.int64), 0)
    if any(_is_dtensor(p) for p in params):
        return _clip_sharded([(p, clipping) for p in params], eps)

    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    counts = [_clip_group(group, clipping, eps) for group in groups.values()]
    units = sum(unit_count(p.shape) for p in params)
    return ClipStats(_sum_on_first_device(counts), units)


def _sum_on_first_device(counts: list[torch.Tensor]) -> torch.Tensor:
    if len(counts) == 1:
        return counts[0]
    device = counts[0].device
    return torch.stack([c.to(device, non_blocking=True) for c in counts]).sum()


# ----------------------------------------------------------------------------------------------
# Sharded parameters (FSDP2 DTensors)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


class _ShardPlan(NamedTuple):
    """How one DTensor parameter's AGC units lie on this rank."""

    param: torch.Tensor
    clipping: float
    kind: str  # "rows": units whole here; "partial": norms need the all-reduce; "full": local
    weight: torch.Tensor  # local shard of the parameter (plain tensor)
    grad: torch.Tensor  # local shard of its gradient (plain tensor, clipped in place)


def _plan_shard(param: torch.Tensor, clipping: float) -> _ShardPlan:
    """Classify a DTensor parameter by where its AGC units are.

    FSDP2 shards dim 0 (``Shard(0)``): a multi-unit tensor (conv, Linear) keeps each output
    unit whole on one rank ("rows": exact norms from the local shard, even a ragged or empty
    one), while a one-unit tensor (vector, scalar, squeeze-rule (out, 1, 1, 1)) is split across
    ranks and its norm is a sum of per-rank squares ("partial"). A multi-unit tensor sharded on
    another dim has every unit split ("partial", per unit). Replicated tensors are "full".
    """
    grad = param.grad
    if not _is_dtensor(grad) or grad.placements != param.placements:
        raise ValueError(
            f"AGC: the gradient of a sharded parameter of shape {tuple(param.shape)} is laid "
            f"out as {getattr(grad, 'placements', 'a plain tensor')}, its parameter as "
            f"{param.placements}; clip after the gradients are reduce-scattered (after backward)"
        )
    if any(pl.is_partial() for pl in param.placements):
        raise ValueError("AGC: partial (unreduced) DTensor gradients cannot be clipped")
    dims = {pl.dim for pl in param.placements if pl.is_shard()}
    if not dims:
        kind = "full"
    elif not _is_one_unit(param.shape) and dims == {0}:
        kind = "rows"
    elif _is_one_unit(param.shape) or 0 not in dims:
        kind = "partial"
    else:
        raise ValueError(
            f"AGC: a parameter of shape {tuple(param.shape)} is sharded on dim 0 and on other "
            f"dims ({param.placements}); its units are neither whole nor replicated per rank"
        )
    return _ShardPlan(param, clipping, kind, param.detach().to_local(), grad.to_local())


def _shard_group(plans: list[_ShardPlan]) -> tuple[Any, tuple[int, ...]]:
    """(device mesh, mesh dims to reduce over): the same for every sharded parameter."""
    # DeviceMesh compares by its ranks and device type: meshes built by separate fully_shard
    # calls over the same ranks are one layout.
    layouts = {(p.param.device_mesh,
                tuple(i for i, pl in enumerate(p.param.placements) if pl.is_shard()))
               for p in plans if p.kind != "full"}
    if len(layouts) > 1:
        raise ValueError(
            "AGC: sharded parameters on different device meshes or mesh dims are clipped in "
            "one call; clip each layout with its own call"
        )
    for p in plans:
        if p.kind != "full":
            return p.param.device_mesh, layouts.pop()[1]
    return None, ()


def _sum_squares(t: torch.Tensor, per_unit: bool, dtype: torch.dtype) -> torch.Tensor:
    dims = tuple(range(1, t.ndim)) if per_unit else None
    return torch.linalg.vector_norm(t, dim=dims, dtype=dtype).square().reshape(-1)


def _apply_clip(plan: _ShardPlan, weight_norm: torch.Tensor, grad_norm: torch.Tensor,
                eps: float) -> torch.Tensor:
    max_norm = weight_norm.clamp_min(eps).mul_(plan.clipping)
    clip, scale = _clip_scale(max_norm, grad_norm)
    per_unit = plan.kind == "rows" or not _is_one_unit(plan.param.shape)
    shape = (-1, *([1] * (plan.grad.ndim - 1))) if per_unit else ()
    plan.grad.mul_(scale.reshape(shape))
    return clip.sum()


def _clip_sharded(entries: list[tuple[torch.Tensor, float]], eps: float) -> ClipStats:
    """AGC on DTensor (and plain) parameters, equal to AGC on the full tensors.

    Unit norms come from the local shards where the unit is whole; the squared norms of split
    units (weights and gradients), together with the count of clipped whole units, travel in
    ONE all-reduce over the mesh dims that shard them; then every rank rescales its own shard.
    Split units get the same norms on every rank, so their clip decision agrees everywhere.
    """
    plain = [(p, c) for p, c in entries if not _is_dtensor(p)]
    plans = [_plan_shard(p, c) for p, c in entries if _is_dtensor(p)]
    mesh, mesh_dims = _shard_group(plans)
    norm_dtype = torch.float32
    for p, _ in entries:
        norm_dtype = torch.promote_types(norm_dtype, p.dtype)
    device = plans[0].grad.device

    # Units whole on this rank: clip now; their clip count joins the all-reduce.
    local_clips = torch.zeros((), dtype=norm_dtype, device=device)
    after_clips = []  # counts every rank computes identically (replicated or reduced units)
    for plan in plans:
        if plan.kind == "partial":
            continue
        per_unit = not _is_one_unit(plan.param.shape)
        w = _sum_squares(plan.weight, per_unit, norm_dtype).sqrt()
        g = _sum_squares(plan.grad, per_unit, norm_dtype).sqrt()
        clipped = _apply_clip(plan, w, g, eps)
        if plan.kind == "rows":
            local_clips = local_clips + clipped
        else:
            after_clips.append(clipped)

    split = [p for p in plans if p.kind == "partial"]
    squares = [_sum_squares(t, not _is_one_unit(p.param.shape), norm_dtype)
               for p in split for t in (p.weight, p.grad)]
    buffer = torch.cat([*squares, local_clips.reshape(1)])
    for mesh_dim in mesh_dims:
        dist.all_reduce(buffer, group=mesh.get_group(mesh_dim))
    pieces = buffer[:-1].split([s.numel() for s in squares])
    for i, plan in enumerate(split):
        after_clips.append(_apply_clip(plan, pieces[2 * i].sqrt(), pieces[2 * i + 1].sqrt(), eps))
    clipped = buffer[-1].round().to(torch.int64)
    for count in after_clips:
        clipped = clipped + count.to(device)

    # Plain tensors among them (e.g. parameters FSDP was told to ignore) are local everywhere.
    units = sum(unit_count(p.shape) for p, _ in entries)
    for clipping in {c for _, c in plain}:
        stats = adaptive_clip_grad_([p for p, c in plain if c == clipping], clipping, eps)
        clipped = clipped + stats.clipped.to(device)
    return ClipStats(clipped, units)


class AGC(Optimizer):
    """Wrap an optimizer so that every ``step`` first clips gradients with AGC.

    Each parameter group is clipped with its own ``"clipping"`` key when present (``None``
    means not clipped, e.g. the classifier weight), else with ``clipping`` given here; ``eps``
    applies to all groups. Clipping uses the gradients as they are when ``step`` runs:

    - with ``torch.amp.GradScaler``, ``scaler.step(opt)`` unscales before calling ``step``, so
      the *unscaled* gradient is clipped; a step skipped for inf/NaN neither clips nor steps
      (:func:`nfnets.optim.optimizer_step` tells the loop whether it happened);
    - with gradient accumulation, call ``step`` once after the last micro-batch: the
      accumulated gradient is clipped once;
    - under DistributedDataParallel, gradients are already averaged across ranks, so every
      rank clips the same global-batch gradient.

    ``param_groups``, ``state``, ``defaults``, ``state_dict``, ``load_state_dict``,
    ``zero_grad`` and ``add_param_group`` are those of the wrapped optimizer, so LR schedulers
    and checkpoints work unchanged (a state dict of the bare optimizer loads here and back).
    After each step, ``last_stats`` holds that step's :class:`ClipStats` (None before the first
    step). A ``closure`` is passed on, its gradients clipped at each evaluation (LBFGS works).
    """

    def __init__(
        self, optimizer: Optimizer, clipping: float | None = CLIPPING, eps: float = EPS
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"AGC wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if clipping is not None:
            _check_clipping(clipping)
        _check_eps(eps)
        self.optimizer = optimizer
        self.clipping = clipping
        self.eps = eps
        self.last_stats: ClipStats | None = None
        for group in optimizer.param_groups:
            self._check_group(group)
        # Optimizer.__init__ sets up the step hooks; the groups it passes to add_param_group
        # already belong to the wrapped optimizer, whose containers we then share (not copy).
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._share_containers()

    def _share_containers(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    def _check_group(self, group: dict[str, Any]) -> None:
        clipping = group.get("clipping", self.clipping)
        if clipping is not None and not clipping > 0:
            name = group.get("name", "without a name")
            raise ValueError(
                f"param group {name!r} has clipping={clipping!r}; use a positive number, "
                "or None to leave the group unclipped"
            )

    def clip_grad_(self) -> ClipStats:
        """Clip the current gradients of every clipped group (what ``step`` does first)."""
        by_factor: dict[float, list[torch.Tensor]] = {}
        for group in self.param_groups:
            self._check_group(group)
            clipping = group.get("clipping", self.clipping)
            if clipping is not None:
                by_factor.setdefault(clipping, []).extend(group["params"])
        sharded = [p for ps in by_factor.values() for p in ps
                   if p.grad is not None and _is_dtensor(p)]
        if sharded:  # one all-reduce for all factors (see _clip_sharded)
            for ps in by_factor.values():
                _params_with_grad(ps)  # the same checks as the plain path
            return _clip_sharded([(p, c) for c, ps in by_factor.items() for p in ps
                                  if p.grad is not None], self.eps)
        stats = [adaptive_clip_grad_(ps, c, self.eps) for c, ps in by_factor.items()]
        if not stats:
            return ClipStats(torch.zeros((), dtype=torch.int64), 0)
        return ClipStats(
            _sum_on_first_device([s.clipped for s in stats]), sum(s.units for s in stats)
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Clip the gradients with AGC, then take the wrapped optimizer's step.

        A ``closure`` is passed on to the wrapped optimizer, wrapped so that the gradients of
        each of its evaluations are clipped: optimizers that re-evaluate it (LBFGS) see
        clipped gradients every time, and the others evaluate it once, as before.
        """
        if closure is None:
            self.last_stats = self.clip_grad_()
            return self.optimizer.step()

        def clipped_closure() -> Any:
            with torch.enable_grad():
                loss = closure()
            with torch.no_grad():
                self.last_stats = self.clip_grad_()
            return loss

        return self.optimizer.step(clipped_closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forwarded to the wrapped optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Forwarded to the wrapped optimizer; the group may carry a ``"clipping"`` key."""
        if any(param_group is g for g in self.optimizer.param_groups):
            return  # Optimizer.__init__ registering a group the wrapped optimizer owns
        self._check_group(param_group)
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict (group ``"clipping"`` keys included)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the wrapped optimizer, then share its new containers again."""
        self.optimizer.load_state_dict(state_dict)
        # Optimizer.load_state_dict replaces param_groups and state with new objects.
        self._share_containers()

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ would keep only defaults/state/param_groups and lose the wrap.
        return {"optimizer": self.optimizer, "clipping": self.clipping, "eps": self.eps}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return f"AGC(clipping={self.clipping}, eps={self.eps},\n{inner}\n)"
