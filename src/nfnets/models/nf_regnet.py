"""NF-RegNets (Brock, De, Smith 2021, arXiv 2101.08692), as nfnets/nf_regnet.py.

EfficientNet-like inverted bottlenecks (RegNet widths) without normalisation: 1×1 expansion,
grouped 3×3 with group size 8, squeeze-excite on the expanded width, 1×1 projection
(deepmind-research nfnets/nf_regnet.py).
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


class NFRegNetBlock(NFResidualBlock):
    """NF-RegNet block: h = act(x)·β → 1×1 expand → act → grouped 3×3 (stride) → SE gate on
    the expanded width (before any activation) → act → 1×1 project.

    The expanded width is int(in_ch · expansion) rounded down to a multiple of the group size
    (based on the *input* channels, unlike NFNet). The shortcut rule is NFNet's.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, beta: float = 1.0,
                 alpha: float = 0.2, stochdepth_rate: float = 0.0, activation: str = "silu",
                 expansion: float = 2.25, group_size: int = 8, se_ratio: float = 0.5) -> None:
        super().__init__(alpha, stochdepth_rate)
        groups = int(in_ch * expansion) // group_size
        if groups < 1:
            raise ValueError(f"NF-RegNet block of {in_ch} input channels is narrower than one "
                             f"group of {group_size}")
        width = groups * group_size
        gamma = fold_gamma(activation)
        self.act = activation_fn(activation)
        self.stride = stride
        self.conv0 = WSConv2d(in_ch, width, 1, input_scale=gamma * beta, activation=activation)
        self.conv1 = WSConv2d(width, width, 3, stride=stride, groups=groups, input_scale=gamma)
        self.se = SqueezeExcite(width, se_ratio)
        self.conv2 = WSConv2d(width, out_ch, 1, input_scale=gamma)
        self.conv_shortcut = (WSConv2d(in_ch, out_ch, 1, input_scale=gamma * beta)
                              if stride > 1 or in_ch != out_ch else None)

    def shortcut(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # h = act(x); its × γβ is folded into conv0 and conv_shortcut
        return pooled_shortcut(x, h, self.stride, self.conv_shortcut)

    def residual(self, h: torch.Tensor) -> tuple[torch.Tensor, None]:
        r = self.conv1(self.conv0(h))  # conv0 ends with act
        return self.conv2(self.act(r * self.se(r))), None

    def flops(self, h: float, w: float) -> tuple[float, float, float]:
        """(MACs, output h, output w) by the official NFBlock.count_flops rule."""
        total = conv_flops(self.conv0, h, w) + conv_flops(self.conv1, h, w)
        h, w = h / self.stride, w / self.stride
        return total + output_flops(self, h, w), h, w


class NFRegNet(NFModel):
    """NF-RegNet with the official constructor's defaults (nfnets/nf_regnet.py NF_RegNet).

    Widths are the variant's times ``width`` (0.75); every stage's first block has stride 2,
    stage 1 included; the first block expands by 1, all others by ``expansion`` (2.25). The
    official default activation 'swish' is missing from its own table; its experiments pass
    'silu', which is our default. The classifier starts at zero (official fc_init).
    """

    def __init__(self, depths: tuple[int, ...] = (1, 3, 6, 6),
                 widths: tuple[int, ...] = (48, 104, 208, 440), *, num_classes: int = 1000,
                 in_chans: int = 3, width: float = 0.75, expansion: float = 2.25,
                 group_size: int = 8, se_ratio: float = 0.5, alpha: float = 0.2,
                 stochdepth_rate: float = 0.1, drop_rate: float = 0.2,
                 activation: str = "silu") -> None:
        super().__init__()
        stem_ch = int(widths[0] * width)
        self.stem = nn.Sequential()
        self.stem.add_module("conv", WSConv2d(in_chans, stem_ch, 3, stride=2))
        blocks, ch = [], stem_ch
        for stage, index, beta, rate in stage_schedule(list(depths), alpha, stochdepth_rate):
            out_ch = int(widths[stage] * width)
            blocks.append(NFRegNetBlock(
                ch, out_ch, stride=2 if index == 0 else 1, beta=beta, alpha=alpha,
                stochdepth_rate=rate, activation=activation,
                expansion=1.0 if not blocks else expansion, group_size=group_size,
                se_ratio=se_ratio))
            ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        # Head mimicking EfficientNet: 1280 channels per 440 of the last stage.
        num_features = int(1280 * ch // 440)
        self.final_conv = WSConv2d(ch, num_features, 1)
        self._init_head(activation, num_features, num_classes, drop_rate, 0.0, in_chans)

    def _stem_flops(self, h: float, w: float) -> tuple[float, float, float]:
        return conv_flops(self.stem.conv, h, w), h / 2, w / 2
