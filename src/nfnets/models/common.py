"""What every NF model family shares: the residual merge, the head, the model API, metrics.

Every family (NFNet, NF-ResNet, NF-RegNet) is ``stem → blocks → final_conv → act → pool →
dropout → fc``, with residual blocks ``h + α · skip_gain · f(act(h) · β)`` (deepmind-research
nfnets/base.py, nfnets/nfnet.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import (
    ACTIVATION_GAMMAS,
    GammaAct,
    StochasticDepth,
    WSConv2d,
    activation_fn,
    avg_pool_same,
)


def conv_flops(conv: WSConv2d, h: float, w: float) -> float:
    """Multiply-accumulates of ``conv`` on an h×w input, by the official rule.

    nfnets/base.py count_conv_flops: out_ch · (h·w / prod(stride)) · in/groups · kh · kw, with
    float division (so odd sizes count fractional pixels, as the official counter does).
    """
    out = conv.out_channels * (h * w) / (conv.stride[0] * conv.stride[1])
    return out * conv.in_channels / conv.groups * conv.kernel_size[0] * conv.kernel_size[1]


def output_flops(block: nn.Module, h: float, w: float) -> float:
    """MACs of a block's convs at its output resolution — conv_shortcut (if any, stride 1) and
    conv2 — plus its squeeze-excite FCs (2 · hidden · channels), as the official counters."""
    total = conv_flops(block.conv2, h, w)
    if block.conv_shortcut is not None:
        total += conv_flops(block.conv_shortcut, h, w)
    return total + 2 * block.se.fc0.out_features * block.se.fc1.out_features


def stage_schedule(depths: list[int], alpha: float, stochdepth_rate: float
                   ) -> list[tuple[int, int, float, float]]:
    """(stage, index in stage, β, drop-path rate) for every block, as the official body loop.

    As the official model constructors: β = 1/expected_std taken before the reset; the
    expected std resets to 1 after a stage's first block and then grows by α² per block;
    rate = stochdepth · idx / N.
    """
    num_blocks = sum(depths)
    expected_std = 1.0
    schedule = []
    for stage, depth in enumerate(depths):
        for i in range(depth):
            index = len(schedule)
            schedule.append((stage, i, 1.0 / expected_std, stochdepth_rate * index / num_blocks))
            if i == 0:
                expected_std = 1.0
            expected_std = (expected_std**2 + alpha**2) ** 0.5
    return schedule


def pooled_shortcut(x: torch.Tensor, h: torch.Tensor, stride: int,
                    conv: WSConv2d | None) -> torch.Tensor:
    """Shortcut of NFNet and NF-RegNet blocks (official NFBlock): on strided blocks a 2×2
    'SAME' average pool of h = act(x)·β and then ``conv``; ``conv(h)`` when only the width
    changes; otherwise the raw input x."""
    if stride > 1:
        return conv(avg_pool_same(h))
    return x if conv is None else conv(h)


class NFResidualBlock(nn.Module):
    """Base of all NF residual blocks: ``out = shortcut + α · skip_gain · mask · gate · r``.

    Subclasses build their convs, set ``act`` (the plain pre-activation; its γ·β is folded into
    the convs that read it) and implement ``shortcut(x, h)`` and ``residual(h) -> (r, gate)``
    for h = act(x), where ``gate`` is the squeeze-excite gate applied to the branch output
    (None if there is none). The per-sample stochastic-depth mask, the gate, α and the
    zero-initialised scalar ``skip_gain`` (SkipInit) are all multiplied on the small
    (B, C, 1, 1) gate first, so the merge is a single ``addcmul`` over the activation.
    """

    act: Callable[[torch.Tensor], torch.Tensor]

    def __init__(self, alpha: float, stochdepth_rate: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.skip_gain = nn.Parameter(torch.zeros(()))
        # The official blocks only create StochDepth for 0 < rate < 1 (block 0 never has one).
        self.drop_path = StochasticDepth(stochdepth_rate) if 0.0 < stochdepth_rate < 1.0 else None

    def shortcut(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def residual(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(shortcut, r, gate) of the whole batch, before stochastic depth."""
        h = self.act(x)
        return (self.shortcut(x, h), *self.residual(h))

    def merge(self, shortcut: torch.Tensor, r: torch.Tensor, gate: torch.Tensor | None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
        """shortcut + α · skip_gain · mask · gate · r, for a (B, 1, 1, 1) stochastic-depth
        ``mask`` (None: keep every sample)."""
        scale = self.alpha * self.skip_gain
        if gate is not None:
            scale = gate * scale
        if mask is not None:
            scale = scale * mask
        return torch.addcmul(shortcut, r, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(x)
        shortcut = self.shortcut(x, h)
        mask = None
        if self.drop_path is not None and self.training:
            mask = self.drop_path.keep_mask(x)
            kept = _kept_samples(mask, x)
            if kept is not None:
                # Samples are independent (no batch statistics), so the branch of the kept
                # samples alone is exactly their part of the whole batch's branch; the dropped
                # ones add nothing. Skips the dropped share of the block's convolutions.
                r, gate = self.residual(h.index_select(0, kept))
                scale = self.alpha * self.skip_gain
                if gate is not None:
                    scale = gate * scale
                dtype = torch.result_type(shortcut, r)  # as addcmul would promote (autocast)
                return shortcut.to(dtype).index_add(0, kept, (r * scale).to(dtype))
        return self.merge(shortcut, *self.residual(h), mask)


def _kept_samples(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """Indices of the samples a stochastic-depth ``mask`` keeps, where computing the residual
    branch on those alone pays: eager CPU execution with some but not all samples dropped.

    Elsewhere the whole batch runs and the mask multiplies the branch: on a GPU, learning how
    many samples are kept stalls the stream; compiled graphs want static shapes; and when no
    sample is kept the branch still has to run (with zero weight), so that every parameter
    receives a gradient, as DistributedDataParallel requires.

    Worth it: an F0 training step (batch 8, 192 px, the recipe's stochastic depth 0.25, one
    CPU thread) takes 7 % more time on the whole batch times the mask (docs/performance.md,
    ``benchmarks/bench_train_vs_commit.py --variant full_batch_sd``).
    """
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    kept = mask.flatten().nonzero().flatten()
    return kept if 0 < kept.numel() < mask.shape[0] else None


class NFModel(nn.Module):
    """Shared API of the NF model families (timm-style interop).

    Subclasses set ``stem`` (nn.Module), ``blocks`` (nn.Sequential of NFResidualBlock),
    ``final_conv`` (WSConv2d or nn.Identity), ``num_features`` and call ``_init_head``.
    ``forward`` returns logits; ``forward_features`` the map after the final conv and its
    gamma-scaled activation; ``forward_head(x, pre_logits=True)`` the pooled features.
    """

    model_name: str = ""
    model_kwargs: dict = {}
    #: The variant's recipe facts (train/test size, RandAugment level, dropout).
    default_cfg: dict = {}
    grad_checkpointing: bool = False

    def _init_head(self, activation: str, num_features: int, num_classes: int,
                   drop_rate: float, fc_init_std: float, in_chans: int) -> None:
        self.in_chans = in_chans
        self.final_act = GammaAct(activation)
        self.num_features = num_features
        self.drop_rate = drop_rate
        self.fc_init_std = fc_init_std
        self.reset_classifier(num_classes)

    def get_classifier(self) -> nn.Module:
        """The final classifier (an nn.Linear, or nn.Identity after ``reset_classifier(0)``)."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` classes.

        ``num_classes=0`` removes it: ``forward`` then returns the pooled features.
        """
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        # Keep create_model's record true, so save_weights -> load_weights rebuilds this head.
        # A new dict: never mutate the empty class-level default.
        if self.model_kwargs:
            self.model_kwargs = {**self.model_kwargs, "num_classes": num_classes}
        param = next(self.parameters(), None)
        device = None if param is None else param.device
        if num_classes == 0:
            self.fc = nn.Identity()
            return
        self.fc = nn.Linear(self.num_features, num_classes, device=device)
        # NFNet/NF-ResNet: N(0, 0.01) untruncated; NF-RegNet: zeros (official fc_init).
        nn.init.normal_(self.fc.weight, 0.0, self.fc_init_std)
        nn.init.zeros_(self.fc.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"{self.model_name or type(self).__name__} expects images of shape "
                f"(batch, {self.in_chans}, height, width); got a tensor of shape {tuple(x.shape)}"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_features, H/32, W/32) map after the final conv and its activation, in the
        memory layout of ``x``."""
        self._check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing replays the RNG, so stochastic depth is unchanged.
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.final_act(self.final_conv(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, dropout (training only), classifier."""
        x = x.mean((2, 3))
        if pre_logits:
            return x
        if self.drop_rate > 0.0:
            x = F.dropout(x, self.drop_rate, self.training)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @torch.no_grad()
    def fuse(self) -> NFModel:
        """Fold weight standardisation into plain convs, in place, for inference/export.

        The fused model computes the same function in eval mode but is no longer a WS model:
        do not train it.
        """
        for module in list(self.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, WSConv2d):
                    setattr(module, child_name, child.fuse())
        return self.eval()

    def flops(self, image_size: int | tuple[int, int]) -> float:
        """Multiply-accumulates of one forward pass at ``image_size``, by the official rule."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        total, h, w = self._stem_flops(float(h), float(w))
        for block in self.blocks:
            block_flops, h, w = block.flops(h, w)
            total += block_flops
        if isinstance(self.final_conv, WSConv2d):
            total += conv_flops(self.final_conv, h, w)
        if isinstance(self.fc, nn.Linear):
            total += self.fc.in_features * self.fc.out_features
        return total

    def _stem_flops(self, h: float, w: float) -> tuple[float, float, float]:
        raise NotImplementedError


def fold_gamma(activation: str) -> float:
    """The gamma the official code multiplies after ``activation`` (folded into the next conv)."""
    activation_fn(activation)  # validates the name with a helpful error
    return ACTIVATION_GAMMAS[activation]


@torch.no_grad()
def signal_metrics(model: NFModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Signal-propagation statistics of one batch, as the official ``return_metrics``.

    Keys (as the official ``return_metrics`` of nfnets/nfnet.py): ``avg_sq_mean_i`` and
    ``avg_var_i`` — the channel-averaged squared mean and variance over (N, H, W) — of the stem
    output (i = 0) and of every block output (i = k + 1), and ``res_avg_var_k``, the residual
    branch's variance after squeeze-excite and before stochastic depth, skip gain and α.
    """
    def stats(t: torch.Tensor, i: int) -> dict[str, torch.Tensor]:
        var, mean = torch.var_mean(t, dim=(0, 2, 3), unbiased=False)
        return {f"avg_sq_mean_{i}": (mean**2).mean(), f"avg_var_{i}": var.mean()}

    model._check_input(x)
    h = model.stem(x)
    metrics = stats(h, 0)
    for k, block in enumerate(model.blocks):
        shortcut, r, gate = block.branches(h)
        residual = r if gate is None else r * gate
        metrics[f"res_avg_var_{k}"] = torch.var(residual, dim=(0, 2, 3), unbiased=False).mean()
        h = block.merge(shortcut, r, gate)
        metrics.update(stats(h, k + 1))
    return metrics
