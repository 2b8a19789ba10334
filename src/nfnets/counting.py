"""Parameter and FLOP counts with the official convention
(deepmind-research nfnets/base.py: count_conv_flops).

FLOPs are multiply-accumulates of every conv and linear (SE FCs and the classifier included)
at the given input size — no factor 2, no biases, activations, pooling or WS. The published
NFNet FLOPs are this count at the test size (F0: 12.38B at 256).
"""

from __future__ import annotations

from torch import nn

from .models import NFModel


def count_params(model: nn.Module) -> int:
    """Number of parameter values (WS gains, biases and skip gains included)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: NFModel, image_size: int | tuple[int, int]) -> int:
    """Multiply-accumulates of one image's forward pass at ``image_size`` (official rule)."""
    if not isinstance(model, NFModel):
        raise TypeError(f"count_flops needs an nfnets model, got {type(model).__name__}")
    return round(model.flops(image_size))
