"""Reusable layers of Normalizer-Free Networks, exact to DeepMind's official code.

Mirrors deepmind-research ``nfnets/base.py`` (``WSConv2D``, ``SqueezeExcite``, ``StochDepth``,
``nonlinearities``) in plain PyTorch: nothing here depends on the device or on whether
autograd is on. Layers know nothing about models. Fast inference is one step away, in
:mod:`nfnets.inference` (``model.fuse()`` and then ``torch.compile``).

Two implementation choices keep the maths of the official code but do less work:

* The constant factors that the official code multiplies into activations (the activation
  gamma and the block's beta) are folded into the *next* convolution's weight
  (``WSConv2d(input_scale=...)``): conv(c·a, ŵ) = conv(a, c·ŵ), because convolution, zero
  padding and average pooling are linear. This is an exact re-association that saves one
  full pass over every activation; ``tests/reference.py`` (which multiplies literally) checks it.
* Scaled weight standardisation has a closed-form backward (:class:`_StandardizeWeight`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATION_GAMMAS",
    "Conv2dSame",
    "GammaAct",
    "SqueezeExcite",
    "StochasticDepth",
    "WSConv2d",
    "activation_fn",
    "avg_pool_same",
    "conv2d_same",
    "max_pool_same",
    "pad_same",
    "same_padding",
]

# Gamma of each nonlinearity: f(x)·γ has unit variance for x ~ N(0, 1). These are the constants
# of the official code (nfnets/base.py `nonlinearities`), which are slightly above the paper's
# analytic values (paper §3 gives sqrt(2/(1-1/π)) = 1.712859 for ReLU; the code uses 1.7139589).
# The code wins: the released weights were trained with it. 'identity' has no gamma.
ACTIVATION_GAMMAS: dict[str, float] = {
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    "glu": 1.8484294414520264,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "log_softmax": 1.0002083778381348,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "soft_sign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}

# JAX semantics of each function, on NCHW tensors (channel-wise ops use dim 1, which is the
# last axis of the official NHWC tensors). jax.nn.gelu defaults to the tanh approximation,
# jax.nn.leaky_relu to slope 0.01, jax.nn.celu/elu to alpha 1. Named functions rather than
# lambdas, so that whole models can be pickled.
def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _glu_channels(x: torch.Tensor) -> torch.Tensor:
    return F.glu(x, dim=1)


def _leaky_relu_jax(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.01)


def _log_softmax_channels(x: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(x, dim=1)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": _identity,
    "celu": F.celu,
    "elu": F.elu,
    "gelu": _gelu_tanh,
    "glu": _glu_channels,
    "leaky_relu": _leaky_relu_jax,
    "log_sigmoid": F.logsigmoid,
    "log_softmax": _log_softmax_channels,
    "relu": F.relu,
    "relu6": F.relu6,
    "selu": F.selu,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "soft_sign": F.softsign,
    "softplus": F.softplus,
    "tanh": torch.tanh,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain (un-scaled) nonlinearity called ``name`` in the official table."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}"
        ) from None


class GammaAct(nn.Module):
    """Gamma-scaled nonlinearity f(x)·γ with the official γ for ``name``."""

    def __init__(self, name: str = "gelu") -> None:
        super().__init__()
        self.name = name
        self.fn = activation_fn(name)
        self.gamma = ACTIVATION_GAMMAS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) * self.gamma

    def extra_repr(self) -> str:
        return f"{self.name}, gamma={self.gamma}"


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) of one spatial dim; the extra pixel goes after.

    TensorFlow's rule: out = ceil(n/s); total = max((out-1)·s + k - n, 0);
    before = total // 2.
    """
    # ceil(n/s) written with non-negative operands: when ONNX export traces the shapes, `//`
    # becomes ONNX's truncating Div, which differs from floor division on negative numbers.
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
             value: float = 0.0) -> torch.Tensor:
    """Pad an NCHW tensor as TensorFlow's 'SAME' would before a (kernel, stride) window op."""
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1])
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


def avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """2×2 stride-2 average pool with 'SAME' padding that excludes the padding from the count.

    Haiku's SAME average pool divides each window by its number of valid pixels. Padding is
    only ever needed after the last row/column (odd sizes); ``ceil_mode`` makes PyTorch clip
    that last window and divide by its clipped size, which is the same thing without a pad.
    """
    return F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)


def max_pool_same(x: torch.Tensor) -> torch.Tensor:
    """3×3 stride-2 max pool with TF 'SAME' padding (padded with -inf), as NF-ResNet's stem."""
    return F.max_pool2d(pad_same(x, (3, 3), (2, 2), value=-math.inf), 3, 2)


def _pad_for_conv(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...]
                  ) -> tuple[torch.Tensor, tuple[int, int]]:
    """(input, conv padding) for TF 'SAME': the input is padded explicitly only where the
    padding is asymmetric; symmetric padding is left to the conv, which makes no copy."""
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1])
    if top == bottom and left == right:
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom)), (0, 0)


def conv2d_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, int], groups: int) -> torch.Tensor:
    """conv2d with TF 'SAME' padding; pads explicitly only when the padding is asymmetric.

    Symmetric cases (every stride-1 conv, stride-2 convs on odd sizes) use the conv's own
    padding argument, so no padded copy of the input is made.
    """
    x, padding = _pad_for_conv(x, weight.shape[-2:], stride)
    return F.conv2d(x, weight, bias, stride, padding, 1, groups)


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding, a bias and an optional nonlinearity after it.

    ``activation`` names the plain (un-scaled) nonlinearity of the official table applied to the
    output; its gamma belongs to the next conv's ``input_scale``. This is what
    :meth:`WSConv2d.fuse` returns.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, groups: int = 1,
                 activation: str | None = None, **factory) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         groups=groups, bias=True, **factory)
        self.activation = activation
        self.act = None if activation is None else activation_fn(activation)

    def conv_weight(self) -> torch.Tensor:
        """The weight the convolution uses."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = conv2d_same(x, self.conv_weight(), self.bias, self.stride, self.groups)
        return y if self.act is None else self.act(y)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"


class WSConv2d(Conv2dSame):
    """Conv2d with Scaled Weight Standardisation, a learned gain and a bias (official WSConv2D).

    For each output channel o, with fan_in N = in/groups · kh · kw and the population
    (ddof 0) mean and variance of its weights:

        ŵ_o = (w_o - mean_o) · gain_o · input_scale / sqrt(max(N · var_o, eps))

    ``eps`` (1e-4) is a floor on N·var, not an addend (deepmind-research nfnets/base.py:
    WSConv2D). The bias is always present. ``input_scale`` is a constant the official code
    multiplies into this conv's input (the previous activation's gamma, the block's beta);
    folding it into ŵ is exact. Padding is TensorFlow 'SAME'; ``activation`` is applied to the
    output (see :class:`Conv2dSame`). Weights are initialised N(0, 1/fan_in), gains 1, biases 0.
    ŵ is computed on every call; :meth:`fuse` bakes it into a plain conv for inference.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        input_scale: float = 1.0,
        eps: float = 1e-4,
        activation: str | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         groups=groups, activation=activation)
        # gain is created after nn.Conv2d.__init__ (which calls reset_parameters) and
        # starts at 1, as in the official code.
        self.gain = nn.Parameter(torch.ones(out_channels))
        self.input_scale = float(input_scale)
        self.eps = eps
        self.fan_in = (in_channels // groups) * self.kernel_size[0] * self.kernel_size[1]

    def reset_parameters(self) -> None:
        """N(0, 1/fan_in) weights (Haiku VarianceScaling(1, fan_in, normal)), zero bias."""
        fan_in = self.weight[0].numel()
        nn.init.normal_(self.weight, 0.0, fan_in ** -0.5)
        nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        """The effective conv weight ŵ (gain and input_scale included), with autograd.

        The backward is the closed form of :class:`_StandardizeWeight` (first-order only:
        differentiating twice through it raises an error).
        """
        return _StandardizeWeight.apply(self.weight, self.gain, self.input_scale, self.eps)[0]

    def conv_weight(self) -> torch.Tensor:
        """ŵ, the standardised weight the convolution uses."""
        return self.standardized_weight()

    @torch.no_grad()
    def fuse(self) -> Conv2dSame:
        """A plain :class:`Conv2dSame` with ŵ baked in (for inference and export)."""
        conv = Conv2dSame(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                          self.groups, self.activation, device=self.weight.device,
                          dtype=self.weight.dtype)
        conv.weight.copy_(self.standardized_weight())
        conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return super().extra_repr() + f", input_scale={self.input_scale:.6g}, eps={self.eps}"


class _StandardizeWeight(torch.autograd.Function):
    """ŵ = (w - mean)·s with s = gain·c / sqrt(max(N·var, eps)), per output channel.

    Forward (the classic two-pass variance): mean, the centred weight, its sum of squares
    d = N·var and an in-place scale of the centred copy. ``torch.var_mean`` would read the
    weight once, but its CPU Welford kernel is several times slower than these four
    vectorised passes (docs/performance.md).

    Backward: autograd's generic graph of the plain formula runs about ten weight-sized
    kernels (and sums three paths into w.grad); the closed form below runs five and is the
    exact derivative of the forward, several times faster (docs/performance.md).
    Per output channel, with G = ∂L/∂ŵ, r = max(d, eps)^-½, S1 = ΣG and S2 = ΣG·(w - mean):

        ∂L/∂gain = c·r·S2
        ∂L/∂w    = s·G - s·S1/N - [d ≥ eps]·s·r²·S2·(w - mean)

    The last term is the path through d (∂d/∂w = 2(w - mean); the mean's share sums to
    zero); like ``torch.clamp``'s gradient it is cut where the eps floor is active.
    Forward also returns the mean and d (non-differentiable outputs, because ``setup_context``
    can save only inputs and outputs): backward needs them.
    """

    @staticmethod
    def forward(weight: torch.Tensor, gain: torch.Tensor, input_scale: float, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dims = tuple(range(1, weight.ndim))
        mean = weight.mean(dims, keepdim=True)
        centred = weight - mean
        d = torch.linalg.vector_norm(centred, dim=dims, keepdim=True).square()  # N·var
        scale = torch.rsqrt(torch.clamp(d, min=eps)) * (gain * input_scale).view_as(d)
        return centred.mul_(scale), mean, d

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        weight, gain, input_scale, eps = inputs
        _, mean, d = output
        ctx.mark_non_differentiable(mean, d)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(weight, gain, mean, d)
        ctx.input_scale = input_scale
        ctx.eps = eps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor | None, *_):
        weight, gain, mean, d = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        dims = tuple(range(1, weight.ndim))
        rstd = torch.rsqrt(torch.clamp(d, min=ctx.eps))
        live = d >= ctx.eps
        scale = rstd * (gain * ctx.input_scale).view_as(rstd)
        s1 = grad.sum(dims, keepdim=True)
        s2 = (grad * weight).sum(dims, keepdim=True) - mean * s1  # ΣG·(w - mean)
        grad_weight = grad_gain = None
        if ctx.needs_input_grad[0]:
            # ∂L/∂w = s·G + b·w + e, with b = -[d ≥ eps]·s·r²·S2 and e = -s·S1/N - b·mean
            b = torch.where(live, -scale * rstd * rstd * s2, 0.0)
            e = -scale * s1 / weight[0].numel() - b * mean
            grad_weight = torch.addcmul(e, weight, b).addcmul_(grad, scale)
        if ctx.needs_input_grad[1]:
            grad_gain = (ctx.input_scale * rstd * s2).view_as(gain)
        return grad_weight, grad_gain, None, None


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite gate of the official code: returns 2·sigmoid(fc1(relu(fc0(mean))))).

    The hidden width is max(1, int(channels · ratio)). The hidden nonlinearity is a plain ReLU
    without gamma: the paper (App. C) says GELU, the official code (nfnets/base.py) passes none
    and so uses its ReLU default — the code wins, the released weights were trained with it.
    The ×2 of the official blocks is part of the returned gate. The Linears are not
    weight-standardised and start as Haiku's default: truncated normal with stddev parameter
    1/sqrt(fan_in) cut at ±2 stddev, zero bias.
    """

    def __init__(self, channels: int, ratio: float = 0.5, out_channels: int | None = None
                 ) -> None:
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.fc0 = nn.Linear(channels, hidden)
        self.fc1 = nn.Linear(hidden, out_channels or channels)
        for fc in (self.fc0, self.fc1):
            _truncated_normal_(fc.weight, fc.in_features ** -0.5)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate of shape (B, C, 1, 1) for an input of shape (B, C, H, W)."""
        h = self.fc1(F.relu(self.fc0(x.mean((2, 3)))))
        return (2.0 * torch.sigmoid(h))[:, :, None, None]


@torch.no_grad()
def _truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std²) cut at ±2·std by resampling, without variance correction (as Haiku's).

    Rejection sampling: torch.nn.init.trunc_normal_ is ~50× slower on CPU (erfinv).
    """
    if tensor.device.type == "meta":
        return tensor
    tensor.normal_()
    outside = tensor.abs() > 2
    while outside.any():
        tensor[outside] = torch.randn(int(outside.sum()), dtype=tensor.dtype,
                                      device=tensor.device)
        outside = tensor.abs() > 2
    return tensor.mul_(std)


class StochasticDepth(nn.Module):
    """Per-sample drop of a residual branch, without 1/keep rescaling (official StochDepth).

    In training each sample's branch is kept with probability 1 - rate (mask = floor(keep + u),
    u ~ U[0, 1)); the official blocks keep ``scale_by_keep=False``, so train and eval
    expectations differ by the factor keep. Identity in eval mode.
    """

    def __init__(self, rate: float) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"stochastic depth rate must be in [0, 1), got {rate}")
        self.rate = rate

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        """A fresh per-sample 0/1 mask of shape (B, 1, ..., 1) that broadcasts against ``x``."""
        u = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype)
        return torch.floor(1.0 - self.rate + u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        return x * self.keep_mask(x)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.6g}"
