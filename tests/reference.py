"""A float64 reference of the official NF forward passes, written from deepmind-research
nfnets/base.py and nfnet.py / nf_resnet.py / nf_regnet.py.

Deliberately literal and slow: gamma multiplied after each activation, β on the activation,
weight standardisation by the official formula, TF 'SAME' padding spelled out, average pool
that divides by the number of valid pixels. Our models fold constants and cache weights;
these functions do none of that, so agreement checks the folding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GAMMA = {  # nfnets/base.py `nonlinearities`
    "gelu": 1.7015043497085571, "relu": 1.7139588594436646, "silu": 1.7881293296813965,
}


def act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":  # jax.nn.gelu's default tanh approximation, written out
        f = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    elif name == "relu":
        f = torch.clamp(x, min=0)
    elif name == "silu":
        f = x / (1 + torch.exp(-x))
    else:
        raise NotImplementedError(name)
    return f * GAMMA[name]


def tf_same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    out = math.ceil(n / s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def ws_conv(conv, x: torch.Tensor) -> torch.Tensor:
    w = conv.weight.double()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    fan_in = w.shape[1] * w.shape[2] * w.shape[3]
    scale = torch.rsqrt(torch.clamp(var * fan_in, min=1e-4)) * conv.gain.double().view(-1, 1, 1, 1)
    w_hat = w * scale - mean * scale
    kh, kw = w.shape[2:]
    t, b = tf_same_pads(x.shape[2], kh, conv.stride[0])
    lft, r = tf_same_pads(x.shape[3], kw, conv.stride[1])
    x = F.pad(x, (lft, r, t, b))
    return F.conv2d(x, w_hat, conv.bias.double(), conv.stride, 0, 1, conv.groups)


def avg_pool(x: torch.Tensor) -> torch.Tensor:
    t, b = tf_same_pads(x.shape[2], 2, 2)
    lft, r = tf_same_pads(x.shape[3], 2, 2)
    total = F.avg_pool2d(F.pad(x, (lft, r, t, b)), 2, 2, divisor_override=1)
    count = F.avg_pool2d(F.pad(torch.ones_like(x[:1, :1]), (lft, r, t, b)), 2, 2,
                         divisor_override=1)
    return total / count


def max_pool(x: torch.Tensor) -> torch.Tensor:
    t, b = tf_same_pads(x.shape[2], 3, 2)
    lft, r = tf_same_pads(x.shape[3], 3, 2)
    return F.max_pool2d(F.pad(x, (lft, r, t, b), value=-math.inf), 3, 2)


def se(module, x: torch.Tensor) -> torch.Tensor:
    h = x.mean(dim=(2, 3))
    h = F.linear(h, module.fc0.weight.double(), module.fc0.bias.double()).clamp(min=0)
    h = F.linear(h, module.fc1.weight.double(), module.fc1.bias.double())
    return torch.sigmoid(h)[:, :, None, None]


def pooled_shortcut(block, x, out):
    if block.stride > 1:
        return ws_conv(block.conv_shortcut, avg_pool(out))
    if block.conv_shortcut is not None:
        return ws_conv(block.conv_shortcut, out)
    return x


def nfnet_block(block, x, name, beta, alpha):
    out = act(name, x) * beta
    shortcut = pooled_shortcut(block, x, out)
    out = ws_conv(block.conv0, out)
    out = ws_conv(block.conv1, act(name, out))
    if block.conv1b is not None:
        out = ws_conv(block.conv1b, act(name, out))
    out = ws_conv(block.conv2, act(name, out))
    out = (se(block.se, out) * 2) * out
    return out * block.skip_gain.double() * alpha + shortcut


def resnet_block(block, x, name, beta, alpha):
    out = act(name, x) * beta
    shortcut = x if block.conv_shortcut is None else ws_conv(block.conv_shortcut, out)
    out = ws_conv(block.conv0, out)
    out = ws_conv(block.conv1, act(name, out))
    out = ws_conv(block.conv2, act(name, out))
    if block.se is not None:
        out = 2 * se(block.se, out) * out
    return out * block.skip_gain.double() * alpha + shortcut


def regnet_block(block, x, name, beta, alpha):
    out = act(name, x) * beta
    shortcut = pooled_shortcut(block, x, out)
    out = ws_conv(block.conv0, out)
    out = ws_conv(block.conv1, act(name, out))
    out = 2 * se(block.se, out) * out
    out = ws_conv(block.conv2, act(name, out))
    return out * block.skip_gain.double() * alpha + shortcut


def betas(depths, alpha):
    expected, result = 1.0, []
    for depth in depths:
        for i in range(depth):
            result.append(1.0 / expected)
            if i == 0:
                expected = 1.0
            expected = math.sqrt(expected**2 + alpha**2)
    return result


def forward(model, x: torch.Tensor, family: str, name: str, depths, alpha: float = 0.2):
    """(logits, pool) of ``model``'s parameters run through the literal official forward."""
    x = x.double()
    if family == "nfnet":
        out = ws_conv(model.stem.conv0, x)
        out = ws_conv(model.stem.conv1, act(name, out))
        out = ws_conv(model.stem.conv2, act(name, out))
        out = ws_conv(model.stem.conv3, act(name, out))
        block_fn = nfnet_block
    elif family == "nf_resnet":
        out = max_pool(ws_conv(model.stem.conv, x))
        block_fn = resnet_block
    else:
        out = ws_conv(model.stem.conv, x)
        block_fn = regnet_block
    for block, beta in zip(model.blocks, betas(depths, alpha), strict=True):
        out = block_fn(block, out, name, beta, alpha)
    if family != "nf_resnet":
        out = ws_conv(model.final_conv, out)
    pool = act(name, out).mean(dim=(2, 3))
    logits = F.linear(pool, model.fc.weight.double(), model.fc.bias.double())
    return logits, pool


@torch.no_grad()
def perturb(model, seed: int = 0) -> None:
    """Make every parameter matter: skip gains, WS gains and biases away from their init."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("skip_gain") or name.endswith("gain"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif name.startswith("fc."):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
