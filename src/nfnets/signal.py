"""Signal Propagation Plots: per-block activation statistics of any residual network.

The NF-ResNet paper (Brock, De, Smith 2021, arXiv 2101.08692, §4) diagnoses a residual network
at initialisation by feeding it one batch and recording, at the output of every residual block,

- the **average channel squared mean** (mean shift: the squared per-channel mean over N, H, W,
  averaged over channels),
- the **average channel variance** (per-channel variance over N, H, W, averaged over channels),
- the **average channel variance of the residual branch's output**, before it is merged with
  the skip path,

and plotting the three against depth. These are the official metric definitions
(``deepmind-research nfnets/base.py: signal_metrics``); :func:`nfnets.models.signal_metrics`
computes them for our models by re-running the blocks, :func:`signal_propagation` with forward
hooks on *any* ``nn.Module`` whose residual blocks it is told (or, for our models, finds).
Hooks reduce each tensor to a few numbers on the spot, so no activation is kept.

:func:`batchnorm_counterpart` builds the paper's comparison: the same architecture with batch
normalisation in place of the NF machinery (plain convs, BN before every activation, α = 1,
no β, no skip gain), i.e. the BN-ReLU-Conv pre-activation ResNet of the paper's SPP figures.
:func:`plot_spp` draws one or more tables; ``nfnets spp`` is the command-line front end.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import atomic_write
from .layers import ACTIVATION_GAMMAS, Conv2dSame, GammaAct, SqueezeExcite, activation_fn
from .models.common import NFResidualBlock
from .models.nf_regnet import NFRegNetBlock

__all__ = [
    "BlockSignal",
    "SignalTable",
    "batchnorm_counterpart",
    "channel_stats",
    "find_residual_blocks",
    "plot_spp",
    "set_skip_gains_",
    "signal_propagation",
    "spp_mode",
    "write_tables",
]

#: How a block's residual-branch output is found: a submodule name relative to the block
#: (its output is the branch output), the submodule itself, or ``fn(block, block_input)``
#: returning the branch output (computed again from the block's input).
BranchSpec = str | nn.Module | Callable[[nn.Module, torch.Tensor], torch.Tensor]

COLUMNS = ("index", "name", "stage", "transition", "avg_sq_mean", "avg_var", "res_avg_var",
           "expected_var", "skip_gain")


def channel_stats(t: torch.Tensor, channel_dim: int = 1) -> tuple[float, float]:
    """(average channel squared mean, average channel variance) of ``t``.

    Per channel, the mean and population variance over every other dimension (N, H, W for an
    NCHW map), then averaged over channels: the official ``signal_metrics`` definitions.
    Computed in float32 at least.
    """
    t = t.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    dims = tuple(d for d in range(t.ndim) if d != channel_dim % t.ndim)
    var, mean = torch.var_mean(t, dim=dims, unbiased=False)
    return float((mean**2).mean()), float(var.mean())


@dataclass
class BlockSignal:
    """Statistics of one residual block's output (and of its residual branch).

    ``transition`` is True when the block changes the shape of its input (a stride or a width
    change: the first block of a stage). ``res_avg_var`` is NaN when the branch is unknown.
    ``expected_var`` is the NF analytic variance of the block output (1 + α² after a
    transition block, + α² per further block) for NF blocks, else NaN. ``skip_gain`` is the
    block's SkipInit gain (NaN for other blocks): the branch enters the output as
    α · skip_gain · branch, so a trained gain near 0 means the branch is switched off.
    """

    index: int
    name: str
    stage: int
    transition: bool
    avg_sq_mean: float
    avg_var: float
    res_avg_var: float = math.nan
    expected_var: float = math.nan
    skip_gain: float = math.nan


@dataclass
class SignalTable:
    """Per-block signal statistics of one forward pass, in block order.

    ``input_sq_mean`` / ``input_var`` describe the first block's input (the stem output of our
    models, number 0 of the official metrics).
    """

    rows: list[BlockSignal] = field(default_factory=list)
    input_sq_mean: float = math.nan
    input_var: float = math.nan
    label: str = ""

    def column(self, key: str) -> list[Any]:
        """One column of the table, e.g. ``table.column("avg_var")``."""
        return [getattr(row, key) for row in self.rows]

    def stage_starts(self) -> list[int]:
        """Block indices at which a new stage begins (after the first)."""
        return [r.index for r in self.rows[1:] if r.stage != self.rows[r.index - 1].stage]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN written as None)."""
        return {
            "label": self.label,
            "input": {"avg_sq_mean": _finite(self.input_sq_mean),
                      "avg_var": _finite(self.input_var)},
            "blocks": [{k: _finite(v) for k, v in asdict(r).items()} for r in self.rows],
        }

    def __len__(self) -> int:
        return len(self.rows)


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ----------------------------------------------------------------------------------------------
# Finding blocks and branches


def find_residual_blocks(model: nn.Module) -> list[str]:
    """Names of the NF residual blocks of ``model`` (outermost ones, in module order)."""
    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, NFResidualBlock) and not any(
                name.startswith(outer + ".") for outer in names):
            names.append(name)
    return names


def _nf_branch_tap(block: NFResidualBlock) -> tuple[nn.Module, Callable]:
    """(module to hook, fn(inputs, output) -> branch output) for one of our NF blocks.

    The official metric is the branch after squeeze-excite (``r · gate``) and before stochastic
    depth, skip gain and α. Where the SE gate multiplies the branch output (NFNet, NF-ResNet
    with SE), the SE module's hook sees both r (its input) and the gate (its output); where SE
    sits inside the branch (NF-RegNet) or is absent, the branch output is conv2's output.
    """
    se = getattr(block, "se", None)
    if se is not None and not isinstance(block, NFRegNetBlock):
        return se, lambda inputs, gate: inputs[0] * gate
    return block.conv2, lambda inputs, out: out


def _resolve_blocks(model: nn.Module, blocks: Iterable[str | nn.Module] | None
                    ) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    if blocks is None:
        found = find_residual_blocks(model)
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no NF residual blocks; name its residual blocks "
                "with blocks=[...] (module names or modules)")
        return [(name, modules[name]) for name in found]
    names_of = {id(m): n for n, m in modules.items()}
    resolved = []
    for item in blocks:
        if isinstance(item, str):
            if item not in modules:
                raise ValueError(f"blocks: {item!r} is not a module name of the model "
                                 "(see model.named_modules())")
            resolved.append((item, modules[item]))
        elif isinstance(item, nn.Module):
            if id(item) not in names_of:
                raise ValueError(f"blocks: the {type(item).__name__} given is not a module "
                                 "of the model")
            resolved.append((names_of[id(item)], item))
        else:
            raise TypeError(f"blocks takes module names or modules, got {type(item).__name__}")
    if not resolved:
        raise ValueError("blocks is empty")
    return resolved


# ----------------------------------------------------------------------------------------------
# The measurement


class _Recorder:
    """Forward hooks that reduce block outputs and branch outputs to statistics at once."""

    def __init__(self, blocks: list[tuple[str, nn.Module]], channel_dim: int) -> None:
        self.blocks = blocks
        self.channel_dim = channel_dim
        self.output: list[tuple[float, float] | None] = [None] * len(blocks)
        self.branch: list[float] = [math.nan] * len(blocks)
        self.transition: list[bool] = [False] * len(blocks)
        self.input: tuple[float, float] = (math.nan, math.nan)
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def stats(self, t: torch.Tensor) -> tuple[float, float]:
        return channel_stats(t, self.channel_dim)

    def hook_block(self, i: int, block: nn.Module) -> None:
        def pre(module: nn.Module, inputs: tuple) -> None:
            if i == 0 and self.output[0] is None:
                self.input = self.stats(inputs[0])

        def post(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self.output[i] is not None:
                raise RuntimeError(f"block {self.blocks[i][0]} ran twice in one forward pass; "
                                   "signal_propagation needs each block called once")
            self.transition[i] = tuple(output.shape) != tuple(inputs[0].shape)
            self.output[i] = self.stats(output)

        self.handles.append(block.register_forward_pre_hook(pre))
        self.handles.append(block.register_forward_hook(post))

    def hook_branch(self, i: int, module: nn.Module, pick: Callable) -> None:
        def post(_: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.branch[i] = self.stats(pick(inputs, output))[1]

        self.handles.append(module.register_forward_hook(post))

    def hook_branch_fn(self, i: int, block: nn.Module, fn: Callable) -> None:
        def pre(module: nn.Module, inputs: tuple) -> None:
            self.branch[i] = self.stats(fn(module, inputs[0]))[1]

        self.handles.append(block.register_forward_pre_hook(pre))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _branch_specs(blocks: list[tuple[str, nn.Module]],
                  branch: BranchSpec | Sequence[BranchSpec | None] | None
                  ) -> list[BranchSpec | None]:
    if branch is None or isinstance(branch, (str, nn.Module)) or callable(branch):
        return [branch] * len(blocks)
    specs = list(branch)
    if len(specs) != len(blocks):
        raise ValueError(f"branch: {len(specs)} entries for {len(blocks)} blocks")
    return specs


@torch.no_grad()
def signal_propagation(model: nn.Module, x: torch.Tensor,
                       blocks: Iterable[str | nn.Module] | None = None,
                       branch: BranchSpec | Sequence[BranchSpec | None] | None = None, *,
                       channel_dim: int = 1, label: str = "") -> SignalTable:
    """Signal-propagation statistics of ``model`` on the batch ``x``, one row per block.

    ``blocks``: the residual blocks, as module names or modules, in depth order (default: every
    NF residual block of the model, see :func:`find_residual_blocks`). ``branch`` says where
    each block's residual-branch output is (one spec for all blocks, or one per block, None for
    unknown): a submodule name relative to the block (e.g. ``"conv3"``, ``"branch.5"``) or the
    submodule, whose output is taken, or ``fn(block, block_input) -> branch output`` (which
    computes the branch a second time). Our NF blocks need none: their branch is found (after
    squeeze-excite, before stochastic depth, skip gain and α, as the official metric).

    The model runs once in its current mode (call ``model.eval()`` first for NF models, so that
    stochastic depth is off; see :func:`spp_mode` for BN models, which want batch statistics).
    Statistics are per channel along ``channel_dim`` (1 for NCHW maps; -1 for (B, T, C)
    sequences) over every other dimension, then averaged over channels.
    """
    resolved = _resolve_blocks(model, blocks)
    specs = _branch_specs(resolved, branch)
    recorder = _Recorder(resolved, channel_dim)
    try:
        for i, ((name, block), spec) in enumerate(zip(resolved, specs, strict=True)):
            recorder.hook_block(i, block)
            if spec is None and isinstance(block, NFResidualBlock):
                recorder.hook_branch(i, *_nf_branch_tap(block))
            elif isinstance(spec, str):
                sub = dict(block.named_modules()).get(spec)
                if sub is None or spec == "":
                    raise ValueError(f"branch: block {name} has no submodule {spec!r}")
                recorder.hook_branch(i, sub, lambda inputs, out: out)
            elif isinstance(spec, nn.Module):
                recorder.hook_branch(i, spec, lambda inputs, out: out)
            elif spec is not None:
                recorder.hook_branch_fn(i, block, spec)
        model(x)
    finally:
        recorder.remove()
    missing = [name for (name, _), out in zip(resolved, recorder.output, strict=True)
               if out is None]
    if missing:
        raise ValueError(f"blocks {missing} did not run in the forward pass")
    table = SignalTable(input_sq_mean=recorder.input[0], input_var=recorder.input[1],
                        label=label)
    stage, expected = 0, math.nan
    for i, (name, block) in enumerate(resolved):
        transition = recorder.transition[i]
        if i > 0 and transition:
            stage += 1
        nf = isinstance(block, NFResidualBlock) and not isinstance(block.act, BNAct)
        alpha = block.alpha if nf else None
        if alpha is not None:
            # The NF variance model: a transition block's shortcut sees h/β, so the variance
            # restarts at 1, then grows by α² per block (NFNet paper 2102.06171 §3 and App. C;
            # the β schedule of deepmind-research nfnets/nfnet.py: NFNet.__init__).
            base = 1.0 if (transition or math.isnan(expected)) else expected
            expected = base + alpha**2
        sq_mean, var = recorder.output[i]
        gain = (float(block.skip_gain) if isinstance(block, NFResidualBlock) else math.nan)
        table.rows.append(BlockSignal(i, name, stage, transition, sq_mean, var,
                                      recorder.branch[i],
                                      expected if alpha is not None else math.nan, gain))
    return table


# ----------------------------------------------------------------------------------------------
# Model preparation: skip gains, modes, the batch-norm counterpart


@torch.no_grad()
def set_skip_gains_(model: nn.Module, value: float) -> nn.Module:
    """Set every NF block's SkipInit gain to ``value`` in place; returns ``model``.

    At initialisation the official gains are 0, so every block is its shortcut and the SPP
    shows nothing of the residual branches. The paper's signal-propagation analysis (and the
    β schedule) assume the branches are merged: measure with gains of 1.
    """
    for module in model.modules():
        if isinstance(module, NFResidualBlock):
            module.skip_gain.fill_(value)
    return model


def spp_mode(model: nn.Module) -> nn.Module:
    """Eval mode (no stochastic depth, no dropout), except batch-norm layers, which stay in
    training mode so that they normalise with the batch's statistics, as in the paper's SPPs
    of BN networks at initialisation. Returns ``model``."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
    return model


class BNAct(nn.Module):
    """Batch norm, then a plain nonlinearity; one BN per channel count seen at this call site.

    NF blocks call their pre-activation ``act`` on the block input; an NF-RegNet block calls it
    again inside its branch, on the expanded width: each call site gets its own BN, told apart
    by its channel count.
    """

    def __init__(self, channels: Iterable[int], activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.fn = activation_fn(activation)
        self.norms = nn.ModuleDict({str(c): nn.BatchNorm2d(c) for c in sorted(set(channels))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.shape[1])
        if key not in self.norms:
            raise RuntimeError(f"BNAct has batch norms for {list(self.norms)} channels, "
                               f"not {key}")
        return self.fn(self.norms[key](x))


class _ConvBN(nn.Module):
    """conv → BN → activation (a plain conv replacing a WS conv that owned an activation)."""

    def __init__(self, conv: Conv2dSame, activation: str) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels)
        self.fn = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.bn(self.conv(x)))


class _PlainGate(nn.Module):
    """An SE gate without the NF ×2 (a BN network's SE returns sigmoid(·) alone)."""

    def __init__(self, se: SqueezeExcite) -> None:
        super().__init__()
        self.se = se

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.se(x)


def _plain_conv(conv: Conv2dSame) -> Conv2dSame:
    """A plain 'SAME' conv of the same shape, He-initialised: N(0, 2/fan_in), zero bias (the
    usual init of BN ResNets; the BN that follows makes the scale irrelevant except for the
    last conv of a branch)."""
    plain = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       conv.groups, device=conv.weight.device, dtype=conv.weight.dtype)
    nn.init.kaiming_normal_(plain.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(plain.bias)
    return plain


@torch.no_grad()
def batchnorm_counterpart(model: nn.Module) -> nn.Module:
    """The same architecture with batch normalisation in place of the NF machinery.

    A deep copy of ``model`` in which (the NF-ResNet paper's BN-ReLU-Conv pre-activation
    baseline, arXiv 2101.08692 §4):

    - every WS conv is a plain conv (no standardisation, no γ or β folded in), He-initialised;
      one that owned an activation becomes conv → BN → activation;
    - each NF block's pre-activation becomes BN → activation (also inside NF-RegNet branches);
    - α = 1 and the skip gain is a frozen 1 (no SkipInit); squeeze-excite gates lose their
      NF ×2; the head's γ-scaled activation becomes BN → activation.

    Stochastic depth and dropout are kept, so the copy trains like the original. For an SPP put
    it in :func:`spp_mode` (BN uses batch statistics). Works for any model built from our NF
    blocks and WS convs.
    """
    bn = copy.deepcopy(model)
    for block in [m for m in bn.modules() if isinstance(m, NFResidualBlock)]:
        block.alpha = 1.0
        block.skip_gain.fill_(1.0)
        block.skip_gain.requires_grad_(False)
        activation = _activation_name(block)
        channels = [block.conv0.in_channels]
        if isinstance(block, NFRegNetBlock):
            channels.append(block.conv1.out_channels)  # act(r · se(r)) inside the branch
        block.act = BNAct(channels, activation)
        if isinstance(getattr(block, "se", None), SqueezeExcite):
            block.se = _PlainGate(block.se)
    for module in list(bn.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv2dSame) and not isinstance(module, _ConvBN):
                plain = _plain_conv(child)
                setattr(module, name, plain if child.activation is None
                        else _ConvBN(plain, child.activation))
            elif isinstance(child, GammaAct):
                channels = getattr(bn, "num_features", None)
                if channels is None:
                    raise ValueError("batchnorm_counterpart: cannot tell the channels of "
                                     f"{name}; the model has no num_features")
                setattr(module, name, BNAct([channels], child.name))
    return bn


def _activation_name(block: NFResidualBlock) -> str:
    # The block's own `act` is a bare function; the convs that own an activation name it.
    for conv in block.modules():
        if isinstance(conv, Conv2dSame) and conv.activation is not None:
            return conv.activation
    for name in ACTIVATION_GAMMAS:
        if activation_fn(name) is block.act:
            return name
    raise ValueError(f"cannot tell the activation of {type(block).__name__}")


# ----------------------------------------------------------------------------------------------
# Output: CSV, JSON, the figure


def write_tables(tables: Sequence[SignalTable], stem: str | os.PathLike,
                 meta: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``stem.csv`` (one row per model and block) and ``stem.json``; returns both paths."""
    stem = Path(stem)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("model",) + COLUMNS)
    for table in tables:
        for row in table.rows:
            writer.writerow([table.label] + [_csv_value(v) for v in asdict(row).values()])
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    text = buf.getvalue()
    atomic_write(csv_path, lambda tmp: Path(tmp).write_text(text))
    payload = json.dumps({**(meta or {}), "tables": [t.as_dict() for t in tables]}, indent=2)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(payload + "\n"))
    return csv_path, json_path


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return value


_STYLES = ({"color": "tab:blue", "marker": "o"}, {"color": "tab:red", "marker": "s"},
           {"color": "tab:green", "marker": "^"}, {"color": "tab:purple", "marker": "D"})


def plot_spp(tables: Sequence[SignalTable], path: str | os.PathLike, title: str = "") -> Path:
    """Draw the three SPP panels (squared mean, variance, branch variance vs block) to a PNG.

    One curve per table (e.g. the NF model and its BN counterpart); stage boundaries of the
    first table are dashed vertical lines; variances are on a log axis, as in the paper's
    figures; the NF analytic variance (1 + kα² within a stage) is drawn dotted where known.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'nfnets[demo]'") from err
    path = Path(path)
    fig = Figure(figsize=(13, 4.4), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = (("avg_sq_mean", "average channel squared mean", "Mean shift"),
              ("avg_var", "average channel variance", "Block output variance"),
              ("res_avg_var", "average channel variance", "Residual branch variance"))
    for ax, (key, ylabel, panel_title) in zip(axes, panels, strict=True):
        positive = True
        for table, style in zip(tables, _STYLES, strict=False):
            x = [r.index + 1 for r in table.rows]
            y = table.column(key)
            if all(math.isnan(v) for v in y):
                continue
            positive &= all(v > 0 for v in y if not math.isnan(v))
            ax.plot(x, y, label=table.label or None, markersize=3.5, linewidth=1.2, **style)
            expected = table.column("expected_var")
            if key == "avg_var" and not all(math.isnan(v) for v in expected):
                ax.plot(x, expected, ":", color=style["color"], linewidth=1.2,
                        label=f"{table.label} analytic 1+kα²".strip())
        if tables:
            for start in tables[0].stage_starts():
                ax.axvline(start + 0.5, color="grey", linestyle="--", linewidth=0.8, alpha=0.7)
        if key != "avg_sq_mean" and positive and ax.lines:
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            low, high = ax.get_ylim()
            ax.yaxis.set_major_formatter(plain)
            # label the minor ticks too when the axis spans too little for major ones
            ax.yaxis.set_minor_formatter(plain if high / low < 20 else NullFormatter())
        ax.set(xlabel="residual block (depth)", ylabel=ylabel, title=panel_title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title + "   (dashed verticals: stage boundaries)", fontsize=11)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path
