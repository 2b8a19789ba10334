"""timm's DeepMind NFNets (``dm_nfnet_f0`` … ``dm_nfnet_f6``) onto ours and back, and the Hub.

timm's ``dm_nfnet_*`` weights are DeepMind's released weights under other names and shapes
(``timm/models/nfnet.py``: ``NormFreeNet`` with ``_dm_nfnet_cfg``), so the mapping is exact:

=====================================  ==========================  =========================
timm                                   ours                        shape
=====================================  ==========================  =========================
``stem.conv{1,2,3,4}``                 ``stem.conv{0,1,2,3}``
``stages.S.I.conv{1,2,2b,3}``          ``blocks.N.conv{0,1,1b,2}`` N = blocks before + I
``stages.S.I.downsample.conv``         ``blocks.N.conv_shortcut``
``stages.S.I.attn_last.fc{1,2}``       ``blocks.N.se.fc{0,1}``     1×1 conv (O,I,1,1) → (O,I)
``stages.S.I.skipinit_gain``           ``blocks.N.skip_gain``      () or (1,) → ()
``*.gain`` of a conv                   ``*.gain``                  (O,1,1,1) → (O,)
``final_conv``, ``head.fc``            ``final_conv``, ``fc``
=====================================  ==========================  =========================

timm's *model* differs from the official one in two places, not in the weights: GELU is the
exact erf form (official: the tanh approximation), and weight standardisation adds ε = 1e-5 to
the variance (official: a floor of 1e-4 on fan_in·var). docs/weights.md gives the measured
effect on the logits. timm's own ``nfnet_*``, ``nf_resnet*`` and ``nf_regnet*`` are different
architectures (rounded channels, γ folded into the conv, no skip gain, other shortcuts), so
only the ``dm_nfnet`` layout is accepted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from .errors import CheckpointError, UsageError

__all__ = [
    "HF_HUB_PREFIX",
    "from_timm_state_dict",
    "hf_hub_state_dict",
    "is_timm_state_dict",
    "read_timm_checkpoint",
    "to_timm_state_dict",
]

HF_HUB_PREFIX = "hf-hub:"
_HUB_WEIGHTS = "model.safetensors"  # what timm pushes to the Hub

# Block sub-modules: timm name -> ours.
_BLOCK = {"conv1": "conv0", "conv2": "conv1", "conv2b": "conv1b", "conv3": "conv2",
          "downsample.conv": "conv_shortcut", "attn_last.fc1": "se.fc0",
          "attn_last.fc2": "se.fc1"}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}
_STAGE_KEY = re.compile(r"stages\.(\d+)\.(\d+)\.(.+)")
_STEM_KEY = re.compile(r"stem\.conv([1-4])\.(.+)")


def is_timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether keys look like a timm NormFreeNet's (``stages.S.I...`` and a ``stem``)."""
    return any(k.startswith("stages.") for k in state_dict) and any(
        k.startswith("stem.") for k in state_dict)


def _timm_layout_error(state_dict: Mapping[str, torch.Tensor], source: object) -> CheckpointError:
    odd = sorted(k for k in state_dict if _our_key(k) is None)[:5]
    return CheckpointError(
        f"{source} is not a timm dm_nfnet checkpoint (keys {', '.join(odd)} have no "
        "counterpart): only timm's dm_nfnet_f0..f6 hold DeepMind's architecture; timm's "
        "nfnet_*, nf_resnet* and nf_regnet* models are timm's own variants"
    )


def _our_key(key: str, blocks_before: Mapping[int, int] | None = None) -> str | None:
    """Our name of a timm key (block number from ``blocks_before``), or None if unknown."""
    if match := _STEM_KEY.fullmatch(key):
        return f"stem.conv{int(match.group(1)) - 1}.{match.group(2)}"
    if key.startswith(("final_conv.", "head.fc.")):
        return key.replace("head.fc.", "fc.")
    if match := _STAGE_KEY.fullmatch(key):
        stage, index, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        number = (blocks_before or {}).get(stage, 0) + index
        if rest == "skipinit_gain":
            return f"blocks.{number}.skip_gain"
        module, _, param = rest.rpartition(".")
        if module in _BLOCK:
            return f"blocks.{number}.{_BLOCK[module]}.{param}"
    return None


def from_timm_state_dict(state_dict: Mapping[str, torch.Tensor], source: object = "state dict"
                         ) -> dict[str, torch.Tensor]:
    """A timm ``dm_nfnet_*`` state dict in our names and shapes (values untouched).

    Raises CheckpointError naming keys without a counterpart (another timm architecture).
    """
    depths: dict[int, int] = {}
    for key in state_dict:
        if match := _STAGE_KEY.fullmatch(key):
            stage, index = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths.get(stage, 0), index + 1)
    if sorted(depths) != list(range(len(depths))):
        raise CheckpointError(f"{source}: timm stages {sorted(depths)} are not numbered 0..N-1")
    blocks_before = {s: sum(depths[t] for t in range(s)) for s in depths}
    ours: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        name = _our_key(key, blocks_before)
        if name is None:
            raise _timm_layout_error(state_dict, source)
        if name.endswith(".gain") or name.endswith("skip_gain"):
            tensor = tensor.reshape(-1) if name.endswith(".gain") else tensor.reshape(())
        elif ".se.fc" in name and name.endswith(".weight"):
            tensor = tensor.reshape(tensor.shape[:2])  # 1x1 conv -> Linear
        ours[name] = tensor
    return ours


def to_timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our NFNet's state dict in timm's ``dm_nfnet`` names and shapes.

    ``timm.create_model('dm_nfnet_f0').load_state_dict(to_timm_state_dict(ours))`` loads it
    (any F variant; NF-ResNets and NF-RegNets have no timm counterpart). Tensors are shared
    with the model where no reshape is needed; copy them before changing either.
    """
    from .models.features import block_stages

    if getattr(model, "default_cfg", {}).get("family", "nfnet") != "nfnet" or not hasattr(
            model.stem, "conv3"):
        raise UsageError(f"{getattr(model, 'model_name', type(model).__name__)}: only NFNet-F "
                         "models have a timm counterpart (dm_nfnet_*)")
    stages = block_stages(model)
    back: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "stem":
            name = f"stem.conv{int(parts[1][4:]) + 1}.{parts[2]}"
        elif parts[0] == "blocks":
            stage, index = stages[int(parts[1])]
            rest = ".".join(parts[2:])
            if rest == "skip_gain":
                name = f"stages.{stage}.{index}.skipinit_gain"
            else:
                module, _, param = rest.rpartition(".")
                name = f"stages.{stage}.{index}.{_BLOCK_BACK[module]}.{param}"
        else:
            name = key.replace("fc.", "head.fc.", 1) if parts[0] == "fc" else key
        if parts[-1] == "gain":
            tensor = tensor.reshape(-1, 1, 1, 1)
        elif ".se.fc" in key and parts[-1] == "weight":
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        back[name] = tensor
    return back


def read_timm_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A timm checkpoint file (safetensors, or a torch ``.pth``/``.bin`` read with
    ``weights_only=True``) mapped to our names. timm's training checkpoints
    (``{"state_dict": ...}``) are accepted too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        try:
            state_dict = safetensors.torch.load_file(str(path))
        except safetensors.SafetensorError as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # untrusted bytes fail in many ways
            raise CheckpointError(f"{path}: torch could not load it safely ({err})") from err
        for wrapper in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state_dict, Mapping) and isinstance(state_dict.get(wrapper), Mapping):
                state_dict = state_dict[wrapper]
                break
    if not (isinstance(state_dict, Mapping) and is_timm_state_dict(state_dict)):
        raise CheckpointError(f"{path} is not a timm NFNet checkpoint (no stem/stages keys)")
    return from_timm_state_dict(state_dict, path)


def hf_hub_state_dict(spec: str) -> dict[str, torch.Tensor]:
    """Download ``hf-hub:ORG/NAME`` (e.g. ``hf-hub:timm/dm_nfnet_f0.dm_in1k``) with
    huggingface_hub (cached in its own cache, ``HF_HOME``) and map it to our names."""
    repo_id = spec.removeprefix(HF_HUB_PREFIX)
    try:
        import huggingface_hub
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:
        raise UsageError(f"{spec}: Hugging Face Hub weights need huggingface_hub: "
                         "pip install 'nfnets[hub]'") from None
    try:
        path = huggingface_hub.hf_hub_download(repo_id, _HUB_WEIGHTS)
    except (HfHubHTTPError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{spec}: cannot download {_HUB_WEIGHTS} of the Hub repository "
                              f"{repo_id!r} ({first})") from None
    return read_timm_checkpoint(path)

