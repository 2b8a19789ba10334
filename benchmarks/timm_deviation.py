"""How far timm's ``dm_nfnet_f0`` model is from the official function on the same weights.

timm's DeepMind NFNets hold DeepMind's weights, but its model differs from the official code
in two places (nfnets.timm_compat): the exact erf GELU instead of the tanh approximation, and
weight standardisation with ε = 1e-5 added to the variance instead of a floor of 1e-4 on
fan_in·var. This script builds NFNet-F0 with perturbed random weights (the released file is
not downloaded here), copies them into timm's model with ``to_timm_state_dict``, and reports
the relative L2 error of the logits against ours (which matches the official function to
float32 round-off, tests/test_models.py), for timm as is and with each deviation removed.

Usage::

    PYTHONPATH=src python benchmarks/timm_deviation.py [--size 256] [--batch 4]
        [--out benchmarks/results/timm_deviation.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import timm
import timm.layers.std_conv as std_conv
import torch
import torch.nn.functional as F

import nfnets
from nfnets.timm_compat import to_timm_state_dict


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Skip gains, WS gains and biases away from their init, so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gain"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.startswith("fc."):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def official_ws_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's ScaledStdConv2dSame.forward with the official standardisation."""
    w = self.weight
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
    scale = torch.rsqrt(torch.clamp(var * w[0].numel(), min=1e-4)) * self.gain
    if self.same_pad:
        x = std_conv.pad_same(x, self.kernel_size, self.stride, self.dilation)
    return F.conv2d(x, (w - mean) * scale, self.bias, self.stride, self.padding,
                    self.dilation, self.groups)


def tanh_gelu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def timm_model(state_dict, *, official_gelu: bool, official_ws: bool) -> torch.nn.Module:
    model = timm.create_model("dm_nfnet_f0", num_classes=1000).eval()
    model.load_state_dict(state_dict)
    for m in model.modules():
        if official_ws and isinstance(m, std_conv.ScaledStdConv2dSame):
            m.forward = official_ws_forward.__get__(m)
        if official_gelu and type(m).__name__ == "GammaAct":
            m.act_fn = tanh_gelu
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/timm_deviation.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    ours = nfnets.create_model("nfnet_f0").eval()
    perturb(ours)
    state_dict = {k: v.clone() for k, v in to_timm_state_dict(ours).items()}
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        reference = ours(x)
        results = {}
        for label, gelu, ws in (("timm", False, False), ("timm_tanh_gelu", True, False),
                                ("timm_official_ws", False, True), ("timm_both_fixed", True, True)):
            logits = timm_model(state_dict, official_gelu=gelu, official_ws=ws)(x)
            results[label] = {
                "rel_l2_logits": rel_err(logits, reference),
                "max_abs_logits": (logits - reference).abs().max().item(),
                "top1_agreement": (logits.argmax(1) == reference.argmax(1)).float().mean().item(),
            }
    record = {"command": " ".join(["python", *sys.argv]), "model": "nfnet_f0 (perturbed random)",
              "image_size": args.size, "batch": args.batch, "torch": torch.__version__,
              "timm": timm.__version__, "machine": platform.machine(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
