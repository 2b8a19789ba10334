"""NF models as backbones: the feature maps of the stem and of each stage.

Five taps per model, index 0 the stem and 1–4 the stages, at reductions 2, 4, 8, 16, 32 for
every family. They are **pre-activation** features, as timm's NFNets give them since timm
PR #475: a pre-activation network's stage output is the residual sum before the next block's
activation, so that is what is tapped, and:

* the stem tap is the output of the last stem conv at stride 2, before its activation
  (NFNet: ``stem.conv2``, 64 channels, before the stride-2 ``stem.conv3``; NF-ResNet: the 7×7
  conv before the max-pool; NF-RegNet: the stem conv);
* the last tap is taken after ``final_conv`` (before its activation) where the model has one
  (NFNet, NF-RegNet: 3072 channels for F0), else it is the last stage's output (NF-ResNet).

``FeatureExtractor`` (``create_model(name, features_only=True)``) wraps a model and returns the
chosen taps; ``forward_intermediates`` on the model returns them beside the final features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import conv2d_same

__all__ = ["FeatureExtractor", "FeatureInfo", "block_stages", "feature_info",
           "forward_intermediates"]

NUM_TAPS = 5


class FeatureInfo(list):
    """A list of ``{"num_chs", "reduction", "module"}`` dicts, one per tap, that also answers
    timm's ``feature_info.channels()`` / ``.reduction()`` / ``.module_name()``."""

    def channels(self) -> list[int]:
        """Channels of each tap."""
        return [int(f["num_chs"]) for f in self]

    def reduction(self) -> list[int]:
        """Stride of each tap relative to the input."""
        return [int(f["reduction"]) for f in self]

    def module_name(self) -> list[str]:
        """The module each tap is taken from."""
        return [str(f["module"]) for f in self]


def block_stages(model: nn.Module) -> list[tuple[int, int]]:
    """(stage, index within the stage) of every block, in order.

    A stage starts at the first block and at every strided block: all three families downsample
    only in a stage's first block (official NFNet/NF_ResNet/NF_RegNet constructors).
    """
    result: list[tuple[int, int]] = []
    stage, index = -1, 0
    for i, block in enumerate(model.blocks):
        if i == 0 or block.stride > 1:
            stage, index = stage + 1, 0
        result.append((stage, index))
        index += 1
    return result


def _stage_ends(model: nn.Module) -> list[int]:
    """Index of each stage's last block."""
    stages = block_stages(model)
    return [i for i, (s, _) in enumerate(stages) if i + 1 == len(stages) or stages[i + 1][0] != s]


def _stem_tap(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the stem conv whose pre-activation output is tap 0."""
    convs = [(name, m) for name, m in model.stem.named_children() if isinstance(m, nn.Conv2d)]
    # NFNet's stem ends with a stride-2 conv; the tap is the conv before it (stride 2 overall).
    return convs[-2] if len(convs) > 1 else convs[0]


def feature_info(model: nn.Module) -> FeatureInfo:
    """Channels, reduction and module of each tap, in timm's format
    (``[{"num_chs": 64, "reduction": 2, "module": "stem.conv2"}, ...]``)."""
    stem_name, stem_conv = _stem_tap(model)
    info: list[dict[str, object]] = [
        {"num_chs": stem_conv.out_channels, "reduction": 2, "module": f"stem.{stem_name}"}]
    reduction = _stem_reduction(model)
    ends = _stage_ends(model)
    for start, end in zip([0, *(e + 1 for e in ends[:-1])], ends, strict=True):
        reduction *= model.blocks[start].stride
        info.append({"num_chs": model.blocks[end].conv2.out_channels, "reduction": reduction,
                     "module": f"blocks.{end}"})
    if isinstance(model.final_conv, nn.Conv2d):
        info[-1] = {**info[-1], "num_chs": model.final_conv.out_channels, "module": "final_conv"}
    return FeatureInfo(info)


def _stem_reduction(model: nn.Module) -> int:
    """The stem's total stride: its convs' strides, times 2 for NF-ResNet's max-pool."""
    reduction = 1
    for module in model.stem.children():
        reduction *= module.stride[0] if isinstance(module, nn.Conv2d) else 2
    return reduction


def _forward_stem(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(stem output, tap 0): the tap conv is run without its activation, which then follows."""
    tap_name, _ = _stem_tap(model)
    tap = None
    for name, module in model.stem.named_children():
        if name == tap_name:
            tap = conv2d_same(x, module.conv_weight(), module.bias, module.stride,
                              module.groups)
            x = tap if module.act is None else module.act(tap)
        else:
            x = module(x)
    return x, tap


def forward_intermediates(model: nn.Module, x: torch.Tensor,
                          indices: int | Sequence[int] | None = None, *,
                          stop_early: bool = False, intermediates_only: bool = False
                          ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
    """The taps ``indices`` (None: all five; an int n: the last n) and the final features.

    Returns ``(forward_features(x), [taps])``, or only the taps with ``intermediates_only``;
    ``stop_early`` then skips everything after the last tap asked for. The final features
    equal ``model.forward_features(x)`` (the last tap after ``final_conv``, activated).
    """
    take = _take_indices(indices)
    model._check_input(x)
    x, stem_tap = _forward_stem(model, x)
    taps: dict[int, torch.Tensor] = {0: stem_tap}
    last = max(take)
    ends = _stage_ends(model)
    if not (intermediates_only and stop_early and last == 0):
        checkpointed = model.grad_checkpointing and model.training and torch.is_grad_enabled()
        for i, block in enumerate(model.blocks):
            x = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
            if i in ends:
                tap = ends.index(i) + 1
                if tap == len(ends):
                    x = model.final_conv(x)
                taps[tap] = x
                if intermediates_only and stop_early and tap == last:
                    break
    chosen = [taps[i] for i in take]
    if intermediates_only:
        return chosen
    return model.final_act(x), chosen


def _take_indices(indices: int | Sequence[int] | None) -> list[int]:
    if indices is None:
        return list(range(NUM_TAPS))
    if isinstance(indices, int):
        if not 1 <= indices <= NUM_TAPS:
            raise ValueError(f"take the last n of {NUM_TAPS} features: n in 1..{NUM_TAPS}, "
                             f"got {indices}")
        return list(range(NUM_TAPS - indices, NUM_TAPS))
    take = [i + NUM_TAPS if i < 0 else i for i in indices]
    if not take or any(not 0 <= i < NUM_TAPS for i in take):
        raise ValueError(f"feature indices {list(indices)} are not in 0..{NUM_TAPS - 1}")
    return take


class FeatureExtractor(nn.Module):
    """A backbone: ``forward(x)`` returns the feature maps of ``out_indices`` (default all five:
    the stem, then stages 1–4 at reductions 2, 4, 8, 16, 32), pre-activation as timm's.

    The classifier is dropped; parts of the model after the last chosen tap are removed, so
    they cost neither memory nor compute. ``feature_info`` lists the chosen taps' channels,
    reductions and modules; ``channels`` and ``reductions`` are the same as lists.
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[int] = (0, 1, 2, 3, 4)) -> None:
        super().__init__()
        self.out_indices = _take_indices(list(out_indices))
        self.feature_info = FeatureInfo(feature_info(model)[i] for i in self.out_indices)
        self.model_name = getattr(model, "model_name", "")
        model.reset_classifier(0)
        last = max(self.out_indices)
        if last < NUM_TAPS - 1:
            model.final_conv = nn.Identity()
            if last == 0:
                model.blocks = nn.Sequential()
            else:
                model.blocks = model.blocks[: _stage_ends(model)[last - 1] + 1]
        self.model = model

    @property
    def channels(self) -> list[int]:
        """Channels of each returned map."""
        return self.feature_info.channels()

    @property
    def reductions(self) -> list[int]:
        """Stride of each returned map relative to the input."""
        return self.feature_info.reduction()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of the chosen taps, in ``out_indices`` order."""
        return forward_intermediates(self.model, x, self.out_indices, stop_early=True,
                                     intermediates_only=True)
