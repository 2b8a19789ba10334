"""Constant padding of the two spatial dims that writes each output element once."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad2d(x: torch.Tensor, left: int, right: int, top: int, bottom: int,
          value: float = 0.0) -> torch.Tensor:
    """``F.pad(x, (left, right, top, bottom), value=value)`` for an (N, C, H, W) tensor.

    Without autograd and outside graph capture, it fills only the border and copies the
    input once, in the input's memory format (channels-last stays channels-last); F.pad fills
    the whole output first and then copies the input over it, one more full pass. Elsewhere
    it is F.pad itself, which every exporter and compiler knows.
    """
    if (torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export() or min(left, right, top, bottom) < 0):
        return F.pad(x, (left, right, top, bottom), value=value)
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
