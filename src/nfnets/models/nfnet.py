"""NFNet F0–F7 and F0+–F7+ (Brock et al. 2021, arXiv 2102.06171), as nfnets/nfnet.py.

A pre-activation SE-ResNeXt-D bottleneck without normalisation: every conv is a scaled
weight-standardised conv, activations are gamma-scaled, and each block computes
``h + α · skip_gain · f(act(h) · β)`` with β tracked analytically
(deepmind-research nfnets/nfnet.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import SqueezeExcite, WSConv2d, activation_fn
from .common import (
    NFModel,
    NFResidualBlock,
    conv_flops,
    fold_gamma,
    output_flops,
    pooled_shortcut,
    stage_schedule,
)


class NFBlock(NFResidualBlock):
    """NFNet bottleneck: 1×1 → grouped 3×3 (stride) → grouped 3×3 → 1×1 → SE, pre-activation.

    Order of operations (official NFBlock): h = act(x)·β; the shortcut is avg-pool(h) then
    conv_shortcut on strided blocks, conv_shortcut(h) when only the width changes, else the raw
    x; r = conv2(act(conv1b(act(conv1(act(conv0(h))))))); r = 2·SE(r)·r. The activation gamma
    and β are folded into the convs that consume them (see nfnets.layers).
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, beta: float = 1.0,
                 alpha: float = 0.2, stochdepth_rate: float = 0.0, activation: str = "gelu",
                 expansion: float = 0.5, group_width: int = 128, se_ratio: float = 0.5,
                 use_two_convs: bool = True) -> None:
        super().__init__(alpha, stochdepth_rate)
        # "big width": the bottleneck follows the output channels, rounded DOWN to a multiple
        # of the group width (official NFBlock; no guard there, so we add one).
        groups = int(out_ch * expansion) // group_width
        if groups < 1:
            raise ValueError(
                f"NFNet block of {out_ch} channels with expansion {expansion} is narrower than "
                f"one group of {group_width}: lower group_width or raise the width"
            )
        width = groups * group_width
        gamma = fold_gamma(activation)
        self.act = activation_fn(activation)
        self.stride = stride
        self.conv0 = WSConv2d(in_ch, width, 1, input_scale=gamma * beta, activation=activation)
        self.conv1 = WSConv2d(width, width, 3, stride=stride, groups=groups, input_scale=gamma,
                              activation=activation)
        self.conv1b = (WSConv2d(width, width, 3, groups=groups, input_scale=gamma,
                                activation=activation)
                       if use_two_convs else None)
        self.conv2 = WSConv2d(width, out_ch, 1, input_scale=gamma)
        self.conv_shortcut = (WSConv2d(in_ch, out_ch, 1, input_scale=gamma * beta)
                              if stride > 1 or in_ch != out_ch else None)
        self.se = SqueezeExcite(out_ch, se_ratio)

    def shortcut(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # h = act(x); its × γβ is folded into conv0 and conv_shortcut
        return pooled_shortcut(x, h, self.stride, self.conv_shortcut)

    def residual(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.conv1(self.conv0(h))  # each of these convs ends with act
        if self.conv1b is not None:
            r = self.conv1b(r)
        r = self.conv2(r)
        return r, self.se(r)

    def flops(self, h: float, w: float) -> tuple[float, float, float]:
        """(MACs, output h, output w) by the official NFBlock.count_flops rule."""
        total = conv_flops(self.conv0, h, w) + conv_flops(self.conv1, h, w)
        h, w = h / self.stride, w / self.stride
        if self.conv1b is not None:
            total += conv_flops(self.conv1b, h, w)
        return total + output_flops(self, h, w), h, w


class NFNet(NFModel):
    """NFNet with the official constructor's defaults (nfnets/nfnet.py NFNet).

    ``widths``/``depths`` are the variant's stage widths and depths; ``width`` multiplies only
    the block output channels (not the stem, not the group width). ``stochdepth_rate`` defaults
    to the model's 0.1; the training recipe uses 0.25. Stage strides are 1, 2, 2, 2.
    """

    def __init__(self, depths: tuple[int, ...] = (1, 2, 6, 3),
                 widths: tuple[int, ...] = (256, 512, 1536, 1536), *, num_classes: int = 1000,
                 in_chans: int = 3, width: float = 1.0, se_ratio: float = 0.5,
                 alpha: float = 0.2, stochdepth_rate: float = 0.1, drop_rate: float = 0.2,
                 activation: str = "gelu", final_conv_mult: float | None = 2,
                 final_conv_ch: int | None = None, use_two_convs: bool = True,
                 group_width: int = 128, expansion: float = 0.5) -> None:
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f"depths {depths} and widths {widths} must have the same length")
        gamma = fold_gamma(activation)
        stem_ch = widths[0] // 2  # 128 for F, 192 for '+' (official: first width // 2)
        # Stem: four 3×3 convs, strides 2, 1, 1, 2; no activation after the last one.
        self.stem = nn.Sequential()
        self.stem.add_module("conv0", WSConv2d(in_chans, 16, 3, stride=2, activation=activation))
        self.stem.add_module("conv1", WSConv2d(16, 32, 3, input_scale=gamma,
                                               activation=activation))
        self.stem.add_module("conv2", WSConv2d(32, 64, 3, input_scale=gamma,
                                               activation=activation))
        self.stem.add_module("conv3", WSConv2d(64, stem_ch, 3, stride=2, input_scale=gamma))

        blocks, ch = [], stem_ch
        for stage, index, beta, rate in stage_schedule(list(depths), alpha, stochdepth_rate):
            out_ch = int(widths[stage] * width)
            # Stage strides 1, 2, 2, 2: only a stage's first block is strided.
            stride = 2 if stage > 0 and index == 0 else 1
            blocks.append(NFBlock(
                ch, out_ch, stride=stride, beta=beta,
                alpha=alpha, stochdepth_rate=rate, activation=activation, expansion=expansion,
                group_width=group_width, se_ratio=se_ratio, use_two_convs=use_two_convs))
            ch = out_ch
        self.blocks = nn.Sequential(*blocks)

        if final_conv_mult is None:
            if final_conv_ch is None:
                raise ValueError("give one of final_conv_mult or final_conv_ch")
            num_features = final_conv_ch
        else:
            num_features = int(final_conv_mult * ch)
        # The last block's output enters final_conv without an activation (official head).
        self.final_conv = WSConv2d(ch, num_features, 1)
        self._init_head(activation, num_features, num_classes, drop_rate, 0.01, in_chans)

    def _stem_flops(self, h: float, w: float) -> tuple[float, float, float]:
        total = 0.0
        for conv in (self.stem.conv0, self.stem.conv1, self.stem.conv2, self.stem.conv3):
            total += conv_flops(conv, h, w)
            h, w = h / conv.stride[0], w / conv.stride[1]
        return total, h, w

