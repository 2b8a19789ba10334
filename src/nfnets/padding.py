"""Constant padding of the two spatial dims that writes each output element once."""

from __future__ import annotations

import torch


def pad2d(x: torch.Tensor, left: int, right: int, top: int, bottom: int,
          value: float = 0.0) -> torch.Tensor:
    """``F.pad(x, (left, right, top, bottom), value=value)`` of an (N, C, H, W) tensor, for
    eager inference (callers use F.pad under autograd or graph capture, which knows it).

    It fills only the border and copies the input once, in the input's memory format
    (channels-last stays channels-last); F.pad fills the whole output first and then copies
    the input over it, one more full pass. Pads must be non-negative.
    """
    n, c, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = torch.empty(n, c, top + h + bottom, left + w + right, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if channels_last else
                      torch.contiguous_format)
    out[:, :, :top].fill_(value)
    out[:, :, top + h:].fill_(value)
    out[:, :, top:top + h, :left].fill_(value)
    out[:, :, top:top + h, left + w:].fill_(value)
    out[:, :, top:top + h, left:left + w].copy_(x)
    return out
