"""The official NFNet optimisation recipe: parameter groups, SGD + AGC, LR schedule, EMA.

Mirrors ``nfnets/experiment_nfnets.py`` (``_make_opt``, ``get_config``), ``nfnets/optim.py``
(``SGD_AGC``, ``WarmupCosineDecay``) and ``nfnets/utils.py`` (``tf1_ema``) of
google-deepmind/deepmind-research; docs/agc.md and docs/training.md describe the recipe.
§5.1-§5.7. A training step with the recipe::

    opt = sgd_agc(model, lr=peak_lr(batch_size))
    sched = warmup_cosine_lr(opt, warmup_steps, total_steps)
    ema = EMA(model)
    for step, (x, y) in enumerate(loader):
        loss = criterion(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()           # or loss.backward() without a scaler
        if optimizer_step(opt, scaler):          # False when GradScaler skipped the step
            ema.update(model)
        sched.step()
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .agc import AGC, CLIPPING, EPS
from .wrappers import unwrap

__all__ = [
    "EMA",
    "optimizer_step",
    "param_groups",
    "peak_lr",
    "sgd_agc",
    "warmup_cosine",
    "warmup_cosine_lr",
]

WEIGHT_DECAY = 2e-5  # deepmind-research nfnets/experiment_nfnets.py: get_config
MOMENTUM = 0.9  # Nesterov momentum, nfnets/experiment_nfnets.py: get_config
BASE_LR = 0.1  # per 256 images, nfnets/experiment_nfnets.py: get_config (paper §6.1, App. A.1)
BASE_BATCH = 256  # the batch size BASE_LR refers to (nfnets/experiment_nfnets.py)
EMA_DECAY = 0.99999  # deepmind-research nfnets/experiment_nfnets.py: get_config

# Haiku names of norm-layer scales/offsets and of the Linear bias: no weight decay
# (deepmind-research nfnets/experiment_nfnets.py: _make_opt).
_NO_DECAY_NAMES = {"scale", "offset", "b"}
# PyTorch spells Haiku's norm-layer "scale" as `weight`, so such layers are recognised by type
# (_NormBase covers the BatchNorm and InstanceNorm classes; RMSNorm exists from torch 2.4).
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def _no_decay(name: str, module: nn.Module) -> bool:
    # Official predicate on the parameter's own name (not its module path): 'gain' or 'bias'
    # in it (WS gains and biases, skip_gain, Linear biases) or a Haiku scale/offset/b name
    # (nfnets/experiment_nfnets.py: _make_opt).
    return (
        "gain" in name
        or "bias" in name
        or name in _NO_DECAY_NAMES
        or isinstance(module, _NORM_LAYERS)
    )


def _resolve_exclusions(model: nn.Module, exclude: Iterable[Any] | None) -> set[int]:
    """Ids of the parameters named by ``exclude`` (module names, modules or parameters)."""
    if exclude is None:
        return set()
    if isinstance(exclude, (str, nn.Module, torch.Tensor)):
        exclude = [exclude]
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    module_ids = {id(m) for m in modules.values()}
    param_ids = {id(p) for p in params.values()}
    excluded: set[int] = set()
    for item in exclude:
        if isinstance(item, str):
            if item in modules:
                excluded.update(id(p) for p in modules[item].parameters())
            elif item in params:
                excluded.add(id(params[item]))
            else:
                raise ValueError(
                    f"exclude_from_clipping: {item!r} is neither a module nor a parameter name "
                    f"of the model (see model.named_modules() / model.named_parameters())"
                )
        elif isinstance(item, nn.Module):
            if id(item) not in module_ids:
                raise ValueError(
                    f"exclude_from_clipping: the {type(item).__name__} given is not a module "
                    "of the model"
                )
            excluded.update(id(p) for p in item.parameters())
        elif isinstance(item, torch.Tensor):
            if id(item) not in param_ids:
                raise ValueError(
                    f"exclude_from_clipping: the tensor of shape {tuple(item.shape)} is not a "
                    "parameter of the model"
                )
            excluded.add(id(item))
        else:
            raise ValueError(
                "exclude_from_clipping takes module names, modules or parameters, got "
                f"{type(item).__name__}"
            )
    return excluded


def _classifier_weight(model: nn.Module) -> torch.Tensor | None:
    # Found through the model's own API, never by parameter order
    # (timm's train.py skips "the last two" parameters, which breaks when the head changes).
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return None
    weight = getattr(get_classifier(), "weight", None)
    return weight if isinstance(weight, nn.Parameter) else None


def param_groups(
    model: nn.Module,
    weight_decay: float = WEIGHT_DECAY,
    clipping: float | None = CLIPPING,
    exclude_from_clipping: Iterable[str | nn.Module | torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into the official weight-decay / AGC groups.

    - no weight decay on parameters whose own name contains ``gain`` or ``bias`` (WS gains and
      biases, ``skip_gain``, Linear biases), is a Haiku ``scale``/``offset``/``b`` name, or
      belongs to a normalisation layer;
    - no clipping on the classifier **weight** (its bias is clipped), found as
      ``model.get_classifier().weight`` when the model has ``get_classifier``; nothing else is
      exempt by default;
    - no clipping on anything named in ``exclude_from_clipping``: module names or modules
      (all their parameters) and parameter names or parameters.

    Works for any ``nn.Module`` (DDP and ``torch.compile`` wrappers are unwrapped, so names
    are those of the bare model). Each trainable parameter (``requires_grad``; shared
    parameters once) lands in exactly one group. Groups carry ``name``, ``params``,
    ``weight_decay`` and ``clipping`` (``None`` = not clipped) keys, for any
    ``torch.optim`` optimizer wrapped in :class:`~nfnets.agc.AGC`; empty groups are omitted.
    Names: ``decay``, ``no_decay``, ``decay_unclipped``, ``no_decay_unclipped``.
    """
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if clipping is not None and not clipping > 0:
        raise ValueError(f"clipping must be a positive number or None, got {clipping!r}")
    model = unwrap(model)
    unclipped = _resolve_exclusions(model, exclude_from_clipping)
    classifier_weight = _classifier_weight(model)
    if classifier_weight is not None:
        unclipped.add(id(classifier_weight))

    groups: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for param_name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            decay = not _no_decay(param_name, module)
            clip = clipping is not None and id(p) not in unclipped
            name = ("decay" if decay else "no_decay") + ("" if clip else "_unclipped")
            group = groups.setdefault(
                name,
                {
                    "name": name,
                    "params": [],
                    "weight_decay": weight_decay if decay else 0.0,
                    "clipping": clipping if clip else None,
                },
            )
            group["params"].append(p)
    order = ["decay", "no_decay", "decay_unclipped", "no_decay_unclipped"]
    return [groups[name] for name in order if name in groups]


def sgd_agc(
    model: nn.Module,
    lr: float,
    *,
    momentum: float = MOMENTUM,
    weight_decay: float = WEIGHT_DECAY,
    clipping: float | None = CLIPPING,
    eps: float = EPS,
    exclude_from_clipping: Iterable[str | nn.Module | torch.Tensor] | None = None,
) -> AGC:
    """The official optimiser: AGC, then SGD with Nesterov momentum and coupled weight decay.

    Per parameter (nfnets/optim.py: SGD_AGC): ``g = AGC(g)``; ``g += wd * p``;
    ``buf = m * buf + g``;
    ``p -= lr * (g + m * buf)``. ``torch.optim.SGD(nesterov=True)`` applies weight decay, then
    momentum, exactly in this order once AGC has run before it. Groups come from
    :func:`param_groups`; set the LR per iteration with :func:`warmup_cosine_lr`.
    """
    groups = param_groups(model, weight_decay, clipping, exclude_from_clipping)
    sgd = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    return AGC(sgd, clipping=clipping, eps=eps)


def peak_lr(batch_size: int, base: float = BASE_LR) -> float:
    """Peak learning rate ``base * batch_size / 256`` (1.6 at the official batch of 4096)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    return base * batch_size / BASE_BATCH


def warmup_cosine(
    step: float,
    peak: float,
    warmup_steps: float,
    total_steps: float,
    end: float = 0.0,
) -> float:
    """Learning rate at ``step``: linear warm-up from 0, then cosine decay to ``end``.

    Exactly ``WarmupCosineDecay`` of the official ``nfnets/optim.py`` (deepmind-research)::

        lr(t) = peak * t / W                                          for t <= W
        lr(t) = end + 0.5 * (peak - end) * (1 + cos(pi * (t - W) / (T - W)))   otherwise

    so the update at step 0 uses lr 0. ``warmup_steps`` may be fractional (the official
    5 epochs of 1,281,167 images at batch 4096 are 1563.9 steps). Two edge cases the official
    code leaves undefined: with ``warmup_steps == 0`` there is no warm-up (lr(0) = peak, where
    the official formula divides 0 by 0), and steps past ``total_steps`` return ``end``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            "need 0 <= warmup_steps < total_steps, got "
            f"warmup_steps={warmup_steps!r}, total_steps={total_steps!r}"
        )
    if step > total_steps:
        return end
    if step <= warmup_steps and warmup_steps > 0:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return end + 0.5 * (peak - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_lr(
    optimizer: Optimizer, warmup_steps: float, total_steps: float, end_factor: float = 0.0
) -> LambdaLR:
    """A ``LambdaLR`` that follows :func:`warmup_cosine`, stepped once per iteration.

    Each group's current ``lr`` is its peak; the schedule ends at ``end_factor * peak``.
    Call ``scheduler.step()`` after every optimiser step: update ``k`` (from 0) then uses
    ``lr(k)``, as in the official code. The scheduler's state dict round-trips.
    """
    warmup_cosine(0, 1.0, warmup_steps, total_steps, end_factor)  # validate now, not mid-run
    # A partial (not a lambda) so LambdaLR.state_dict can save it.
    factor = functools.partial(
        warmup_cosine,
        peak=1.0,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        end=end_factor,
    )
    return LambdaLR(optimizer, factor)


def optimizer_step(optimizer: Optimizer, scaler: torch.amp.GradScaler | None = None) -> bool:
    """Take one optimiser step, through ``scaler`` when given, and say whether it happened.

    With a ``GradScaler`` this runs ``scaler.step(optimizer)`` (which unscales the gradients
    before :class:`~nfnets.agc.AGC` clips them) and ``scaler.update()``. Returns False when the
    scaler skipped the step because the gradients held inf/NaN; the loop should then not
    update the EMA either.
    """
    taken = []
    handle = optimizer.register_step_post_hook(lambda *_: taken.append(True))
    try:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
    finally:
        handle.remove()
    return bool(taken)


class EMA:
    """Exponential moving average of a model's parameters, with the official TF1 warm-up.

    After each optimiser step call :meth:`update`; the ``t``-th call (``t`` = 0, 1, ...: the
    number of earlier updates, i.e. the official step counter of the update just made) uses
    ``d = min(decay, (1 + t) / (10 + t))`` and sets ``ema = d * ema + (1 - d) * param``
    (deepmind-research ``nfnets/utils.py``: tf1_ema; paper App. A.1). Buffers are copied as
    they are.

    ``ema.module`` is a full copy of the model (in eval mode, no gradients) for evaluation;
    :meth:`state_dict` / :meth:`load_state_dict` carry it with the update counter.
    """

    def __init__(self, model: nn.Module, decay: float = EMA_DECAY) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        t = self.num_updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current parameters (one call per step)."""
        model = unwrap(model)
        ema_params, params = list(self.module.parameters()), list(model.parameters())
        ema_buffers, buffers = list(self.module.buffers()), list(model.buffers())
        if len(ema_params) != len(params) or len(ema_buffers) != len(buffers):
            raise ValueError(
                "EMA.update got a model whose parameters or buffers differ from the one the "
                "EMA was created from"
            )
        weight = 1.0 - self.current_decay()
        if params:
            # lerp: ema + (1 - d) * (p - ema) = d * ema + (1 - d) * p, in one pass.
            torch._foreach_lerp_(ema_params, params, weight)
        if buffers:
            torch._foreach_copy_(ema_buffers, buffers)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The averaged model's state dict, the update counter and the decay."""
        return {
            "module": self.module.state_dict(),
            "num_updates": self.num_updates,
            "decay": self.decay,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        missing = {"module", "num_updates", "decay"} - set(state_dict)
        if missing:
            raise ValueError(f"not an EMA state dict: missing keys {sorted(missing)}")
        self.module.load_state_dict(state_dict["module"])
        self.num_updates = int(state_dict["num_updates"])
        self.decay = float(state_dict["decay"])
