"""Model builders: one function per family, and ``create_model(name)`` over the variant tables.

Names: ``nfnet_f0`` … ``nfnet_f7``, ``nfnet_f0_plus`` … ``nfnet_f7_plus`` (official spelling
``F0+`` accepted), ``nf_resnet50`` … ``nf_resnet600``, ``nf_regnet_b0`` … ``nf_regnet_b8``.
"""

from __future__ import annotations

import difflib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from .common import NFModel, NFResidualBlock, signal_metrics
from .nf_regnet import NFRegNet, NFRegNetBlock
from .nf_resnet import NFResBlock, NFResNet
from .nfnet import NFBlock, NFNet
from .variants import (
    NF_REGNET_VARIANTS,
    NF_RESNET_DEPTHS,
    NF_RESNET_IMAGE_SIZE,
    NFNET_VARIANTS,
)

__all__ = [
    "NFBlock", "NFModel", "NFNet", "NFRegNet", "NFRegNetBlock", "NFResBlock", "NFResNet",
    "NFResidualBlock", "create_model", "list_models", "model_defaults", "nf_regnet",
    "nf_resnet", "nfnet", "signal_metrics",
]


@dataclass(frozen=True)
class _Entry:
    family: str  # 'nfnet' | 'nf_resnet' | 'nf_regnet'
    variant: str | int  # key of the family's variant table


def _registry() -> dict[str, _Entry]:
    names = {}
    for key in NFNET_VARIANTS:
        names[f"nfnet_{key.lower().replace('+', '_plus')}"] = _Entry("nfnet", key)
    for depth in NF_RESNET_DEPTHS:
        names[f"nf_resnet{depth}"] = _Entry("nf_resnet", depth)
    for key in NF_REGNET_VARIANTS:
        names[f"nf_regnet_{key.lower()}"] = _Entry("nf_regnet", key)
    return names


_MODELS = _registry()


def list_models() -> list[str]:
    """All model names ``create_model`` accepts."""
    return list(_MODELS)


def _canonical(name: str) -> str:
    # Accept the official spellings too: 'F0', 'F0+', 'nfnet_f0+', 'NF-ResNet50', 'B0'.
    key = name.strip().lower().replace("-", "_").replace("+", "_plus")
    if key.startswith("f") and key[1:2].isdigit():
        key = "nfnet_" + key
    elif key.startswith("b") and key[1:].isdigit():
        key = "nf_regnet_" + key
    elif key.startswith("resnet"):
        key = "nf_" + key
    return key


def _entry(name: str) -> tuple[str, _Entry]:
    key = _canonical(name)
    if key not in _MODELS:
        close = difflib.get_close_matches(key, list(_MODELS), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown model {name!r}{hint} (nfnets.list_models() lists all "
                         f"{len(_MODELS)} names)")
    return key, _MODELS[key]


def model_defaults(name: str) -> dict:
    """Recipe facts of a variant without building it: train/test size, RandAugment level,
    dropout, family (official variant tables)."""
    key, entry = _entry(name)
    if entry.family == "nfnet":
        row = NFNET_VARIANTS[entry.variant]
        return {"family": "nfnet", "train_size": row.train_size, "test_size": row.test_size,
                "ra_level": row.ra_level, "drop_rate": row.drop_rate}
    if entry.family == "nf_regnet":
        row = NF_REGNET_VARIANTS[entry.variant]
        # NF-RegNets were trained with MixUp+CutMix and no RandAugment
        # (the official NF-RegNet training configuration).
        return {"family": "nf_regnet", "train_size": row.train_size,
                "test_size": row.test_size, "ra_level": None, "drop_rate": row.drop_rate}
    return {"family": "nf_resnet", "train_size": NF_RESNET_IMAGE_SIZE,
            "test_size": NF_RESNET_IMAGE_SIZE, "ra_level": None, "drop_rate": 0.0}


def nfnet(variant: str = "F0", **overrides) -> NFNet:
    """NFNet ``variant`` ('F0'…'F7', 'F0+'…'F7+') with the official defaults, overridable."""
    row = NFNET_VARIANTS[variant]
    kwargs = {"depths": row.depths, "widths": row.widths, "drop_rate": row.drop_rate}
    return NFNet(**{**kwargs, **overrides})


def nf_resnet(depth: int = 50, **overrides) -> NFResNet:
    """NF-ResNet of ``depth`` (50, 101, 152, 200, 288, 600), official defaults, overridable."""
    return NFResNet(**{"depths": NF_RESNET_DEPTHS[depth], **overrides})


def nf_regnet(variant: str = "B0", **overrides) -> NFRegNet:
    """NF-RegNet ``variant`` ('B0'…'B8') with the official defaults, overridable."""
    row = NF_REGNET_VARIANTS[variant]
    kwargs = {"depths": row.depths, "widths": row.widths, "drop_rate": row.drop_rate}
    return NFRegNet(**{**kwargs, **overrides})


_BUILDERS = {"nfnet": nfnet, "nf_resnet": nf_resnet, "nf_regnet": nf_regnet}


def create_model(name: str, num_classes: int = 1000, pretrained: str | Path | None = None,
                 **overrides) -> NFModel:
    """Build model ``name`` (see ``list_models()``), optionally loading weights.

    ``overrides`` replace the official constructor defaults: e.g. ``width``, ``depths``,
    ``widths``, ``group_width`` (NFNet), ``activation``, ``alpha``, ``se_ratio``,
    ``stochdepth_rate``, ``drop_rate``, ``in_chans``. ``pretrained`` is a path to DeepMind's
    released ``F*_haiku.npz`` or to a safetensors file saved by nfnets; its class count must
    equal ``num_classes`` (fine-tune with ``model.reset_classifier(n)`` after loading).
    """
    key, entry = _entry(name)
    builder = _BUILDERS[entry.family]
    kwargs = {"num_classes": num_classes, **overrides}
    try:
        # With weights to load, skip the random initialisation: build without storage and
        # adopt the loaded tensors (F6's init alone takes seconds).
        with torch.device("meta") if pretrained is not None else nullcontext():
            model = builder(entry.variant, **kwargs)
    except (TypeError, ValueError) as err:  # an unknown option, or a value the builder refuses
        raise UsageError(f"invalid option for {key}: {err}") from None
    model.model_name = key
    model.model_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    model.default_cfg = model_defaults(key)
    if pretrained is not None:
        from ..weights import load_pretrained

        load_pretrained(model, pretrained, assign=True)
    return model

