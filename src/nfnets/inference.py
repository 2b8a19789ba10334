"""The one fast inference path: fuse weight standardisation, then compile for the device.

A trained NF model standardises every conv weight on every call (deepmind-research
nfnets/base.py: WSConv2D). For inference those weights are constants, so
:meth:`nfnets.models.NFModel.fuse` bakes them into plain convs once (exact). What remains is
an ordinary conv net, and PyTorch's public compiler does the device-specific work:

* CPU: ``torch.compile`` with Inductor *freezing*: weights become constants of the graph, so
  Inductor pre-packs the conv weights for oneDNN and fuses each conv with the nonlinearity
  after it. Dynamo decides whether parameters are graph constants while it traces, from the
  global ``torch._inductor.config.freezing`` (``torch._dynamo.utils.is_parameter_freezing``);
  ``torch.compile(options={"freezing": True})`` reaches only Inductor, after the parameters
  were already lifted to graph inputs, and then nothing is frozen. So the flag is set around
  every call, which is where Dynamo traces (and retraces for a new input shape).
* CUDA and other devices: ``torch.compile`` with its default options.

The inputs keep their memory layout; docs/performance.md gives the measured figures (and why
channels-last is not forced). ``compile=False`` returns the fused eager model, which is what
``nfnets eval`` and ``nfnets predict`` run unless given ``--compile`` (compiling takes longer
than classifying a few images).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch._inductor.config as inductor_config
from torch import nn

__all__ = ["optimize_for_inference"]


class _Frozen(nn.Module):
    """Runs ``module`` (the compiled fused model) under ``torch.no_grad()`` and, when ``freeze``,
    with Inductor freezing switched on: Inductor freezes weights only for graphs traced without
    autograd and with the global flag set (see the module docstring)."""

    def __init__(self, module: nn.Module, freeze: bool) -> None:
        super().__init__()
        self.module = module
        self.freeze = freeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        freezing = inductor_config.patch(freezing=True) if self.freeze else contextlib.nullcontext()
        with torch.no_grad(), freezing:
            return self.module(x)


def optimize_for_inference(model: nn.Module, example_input: torch.Tensor, *,
                           compile: bool = True) -> nn.Module:
    """A fast, eval-mode copy of ``model`` for inference; ``model`` itself is left unchanged.

    The copy is fused (:meth:`~nfnets.models.NFModel.fuse`: weight standardisation folded into
    plain convs, exact), put in eval mode and frozen (no parameter requires grad). With
    ``compile=True`` it is then compiled with ``torch.compile`` for ``example_input``'s device
    (with Inductor freezing on the CPU) and run once on ``example_input``, so the compile time
    is spent here rather than on the first real batch. The result returns the same outputs as
    ``model.eval()`` up to float rounding (tests check ≤ 1e-4 relative); it takes any batch
    size (a new batch size may compile once more). It records no autograd graph. The
    compiled result wraps the fused model, which is its ``.module``.

    ``example_input`` is an image batch of the shape, dtype and device the model will see;
    ``model`` must already be on that device.
    """
    if not hasattr(model, "fuse"):
        raise TypeError(f"optimize_for_inference needs an nfnets model (with .fuse()), "
                        f"got {type(model).__name__}")
    param = next(model.parameters(), None)
    if param is not None and param.device != example_input.device:
        raise ValueError(f"the model is on {param.device} but example_input is on "
                         f"{example_input.device}; move one of them first")
    fused = copy.deepcopy(model).fuse().eval().requires_grad_(False)
    if not compile:
        return fused  # no parameter requires grad, so no autograd graph is recorded
    # Static shapes: a second input shape (e.g. an evaluation's last, smaller batch) compiles
    # one more static graph instead of a symbolic-shape one, whose index arithmetic can take
    # Inductor minutes to simplify on small maps.
    optimized = _Frozen(torch.compile(fused, dynamic=False),
                        freeze=example_input.device.type == "cpu")
    optimized(example_input)  # compile now, not on the caller's first batch
    return optimized
