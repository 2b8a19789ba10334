"""NF-ResNets (Brock, De, Smith 2021, arXiv 2101.08692), as nfnets/nf_resnet.py.

Pre-activation bottleneck ResNets with scaled weight standardisation, SkipInit gains and
analytic β, without normalisation layers (deepmind-research nfnets/nf_resnet.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import SqueezeExcite, WSConv2d, activation_fn, max_pool_same
from .common import NFModel, NFResidualBlock, conv_flops, fold_gamma, stage_schedule


class NFResBlock(NFResidualBlock):
    """NF-ResNet bottleneck: 1×1 → 3×3 (stride here) → 1×1, optional SE, pre-activation.

    Unlike NFNet, a projecting shortcut is a *strided* 1×1 conv on act(x)·β (no avg-pool), and
    the bottleneck is a quarter of the output width without groups (official NFResBlock).
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, beta: float = 1.0,
                 alpha: float = 0.2, stochdepth_rate: float = 0.0, activation: str = "relu",
                 bottleneck_ratio: float = 0.25, use_se: bool = False, se_ratio: float = 0.25
                 ) -> None:
        super().__init__(alpha, stochdepth_rate)
        width = int(out_ch * bottleneck_ratio)
        gamma = fold_gamma(activation)
        self.act = activation_fn(activation)
        self.stride = stride
        self.conv0 = WSConv2d(in_ch, width, 1, input_scale=gamma * beta, activation=activation)
        self.conv1 = WSConv2d(width, width, 3, stride=stride, input_scale=gamma,
                              activation=activation)
        self.conv2 = WSConv2d(width, out_ch, 1, input_scale=gamma)
        self.conv_shortcut = (WSConv2d(in_ch, out_ch, 1, stride=stride, input_scale=gamma * beta)
                              if stride > 1 or in_ch != out_ch else None)
        self.se = SqueezeExcite(out_ch, se_ratio) if use_se else None

    def shortcut(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # h = act(x); its × γβ is folded into conv0 and conv_shortcut
        return x if self.conv_shortcut is None else self.conv_shortcut(h)

    def residual(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        r = self.conv2(self.conv1(self.conv0(h)))  # conv0 and conv1 end with act
        return r, None if self.se is None else self.se(r)

    def flops(self, h: float, w: float) -> tuple[float, float, float]:
        """(MACs, output h, output w) by the official rule (MACs of every conv and SE FC)."""
        total = conv_flops(self.conv0, h, w) + conv_flops(self.conv1, h, w)
        if self.conv_shortcut is not None:
            total += conv_flops(self.conv_shortcut, h, w)  # strided: counted on its input
        h, w = h / self.stride, w / self.stride
        total += conv_flops(self.conv2, h, w)
        if self.se is not None:
            total += 2 * self.se.fc0.out_features * self.se.fc1.out_features
        return total, h, w


class NFResNet(NFModel):
    """NF-ResNet with the official constructor's defaults (nfnets/nf_resnet.py NF_ResNet).

    Stage widths are (64, 128, 256, 512)·width (width 4 → 256…2048 block outputs), the stem is
    a 7×7/2 WS conv to 16·width channels followed by a 3×3/2 'SAME' max-pool with no activation
    between them, and there is no final conv: the head pools act(x). The official ``drop_rate``
    default looks up a key its variant table lacks, so ours defaults to 0.
    """

    def __init__(self, depths: tuple[int, ...] = (3, 4, 6, 3), *, num_classes: int = 1000,
                 in_chans: int = 3, width: int = 4, alpha: float = 0.2,
                 stochdepth_rate: float = 0.1, drop_rate: float = 0.0,
                 activation: str = "relu", use_se: bool = False, se_ratio: float = 0.25
                 ) -> None:
        super().__init__()
        stem_ch = int(16 * width)
        self.stem = nn.Sequential()
        self.stem.add_module("conv", WSConv2d(in_chans, stem_ch, 7, stride=2))
        self.stem.add_module("pool", _MaxPoolSame())
        blocks, ch = [], stem_ch
        for stage, index, beta, rate in stage_schedule(list(depths), alpha, stochdepth_rate):
            out_ch = int((64, 128, 256, 512)[stage] * width)
            blocks.append(NFResBlock(
                ch, out_ch, stride=2 if stage > 0 and index == 0 else 1, beta=beta, alpha=alpha,
                stochdepth_rate=rate, activation=activation, use_se=use_se, se_ratio=se_ratio))
            ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.final_conv = nn.Identity()
        self._init_head(activation, ch, num_classes, drop_rate, 0.01, in_chans)

    def _stem_flops(self, h: float, w: float) -> tuple[float, float, float]:
        # The stem conv, then the max-pool halves the size again.
        return conv_flops(self.stem.conv, h, w), h / 4, w / 4


class _MaxPoolSame(nn.Module):
    """3×3 stride-2 max pool with TF 'SAME' padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool_same(x)
