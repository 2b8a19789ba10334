"""Winograd F(4×4, 3×3) convolution for CPU inference: an opt-in speed-for-precision trade.

A stride-1 3×3 convolution computes each 4×4 output tile from a 6×6 input tile with 36
elementwise products per channel pair instead of 144 (Lavin & Gray 2016, "Fast Algorithms
for Convolutional Neural Networks", arXiv 1509.09308, the F(4×4, 3×3) matrices below):

    Y = Aᵀ [ (G W Gᵀ) ⊙ (Bᵀ D B) ] A        summed over input channels

so the multiplications become 36 independent (tiles × C) @ (C × K) products, one per tile
position ξ, which run as oneDNN 1×1 convolutions on pre-transformed, pre-packed weights.
The transforms are a few dozen additions over the activations. On a 2-core AMD EPYC, F0's
stride-1 3×3 convs with GELU run 1.34–1.47× faster at batch 8, and the whole F0 forward
1.06–1.12× (``benchmarks/bench_winograd.py``, docs/performance.md).

The price is precision: the transforms scale values by up to ~100 before the products, so an
output carries ~1e-5 relative error (max |error| / max |output|) instead of direct
convolution's ~1e-6. That is inside the 1e-4 the fast paths promise, but it is not the exact
function, so it is off by default; turn it on with :func:`use_winograd` (a context manager) or
:func:`set_winograd`. It applies only where it is faster (see :func:`applies`): eager CPU
inference in float32, stride 1, 3×3 kernels with at least 128 channels per group and enough
output tiles; everything else stays on the direct path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from .padding import pad2d

__all__ = ["PackedWeights", "applies", "conv3x3", "set_winograd", "transform_weight",
           "use_winograd", "winograd_enabled"]

# F(4×4, 3×3) with interpolation points 0, ±1, ±2, ∞ (Lavin & Gray 2016, §4.2). The input and
# output transforms are spelled out as additions in _input_transform / _output_transform;
# these two matrices are kept for the weight transform and for the tests.
B_T = torch.tensor([
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
], dtype=torch.float64)
G = torch.tensor([
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
], dtype=torch.float64)
A_T = torch.tensor([
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
], dtype=torch.float64)
# Column 1 of Aᵀ is all ones: a bias added to the products of tile position (1, 1) reaches
# every output of the tile once, so it rides on that position's 1×1 conv for free.
BIAS_POSITION = 1 * 6 + 1

# Where the transforms cost more than the saved multiplications (measured on F0's shapes,
# benchmarks/bench_winograd.py): few channels per group (the stem), or few output tiles
# (batch 1 at 16×16, anything at 8×8 and below).
MIN_GROUP_CHANNELS = 128
MIN_TILES = 64
# The batch is transformed in equal chunks whose transformed tiles (36 per 4×4 output tile and
# channel) stay within this many elements (16 MiB in float32), so that they are still in
# cache when the products read them. Measured on F0's batch-8 shapes with this constant varied
# from 2^20 to 2^24 elements: stage 1 (64×64×128) runs 1.7× faster in chunks of 4 than in one
# piece, stage 2 (32×32×256) 1.5× in chunks of 4; stage 3 (16×16×768) is fastest whole.
CHUNK_TILE_ELEMENTS = 1 << 22

_enabled = False


def set_winograd(enabled: bool) -> bool:
    """Turn the Winograd path for CPU inference on or off; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def winograd_enabled() -> bool:
    """Whether :func:`set_winograd` / :func:`use_winograd` turned the Winograd path on."""
    return _enabled


@contextmanager
def use_winograd(enabled: bool = True) -> Iterator[None]:
    """Run eligible CPU-inference 3×3 convs with Winograd F(4×4, 3×3) inside the block.

    ``with nfnets.winograd.use_winograd(): logits = model(images)``: ~1e-5 relative error per
    conv instead of ~1e-6, for ~10 % less time on NFNet-F0 (see the module docstring).
    """
    previous = set_winograd(enabled)
    try:
        yield
    finally:
        set_winograd(previous)


def _tiles(size: int) -> int:
    return (size + 3) // 4


def applies(x: torch.Tensor, weight_shape: Sequence[int], stride: Sequence[int],
            groups: int) -> bool:
    """Whether a conv of ``weight_shape`` on the float32 input ``x`` should take this path.

    The caller has already established that the conv runs on the oneDNN inference path
    (eager, CPU, no autograd) with TF 'SAME' padding, which is (1, 1) for stride-1 3×3.
    """
    out_channels, group_channels, kh, kw = weight_shape
    return (_enabled and x.dtype == torch.float32 and (kh, kw) == (3, 3)
            and tuple(stride) == (1, 1) and group_channels >= MIN_GROUP_CHANNELS
            and out_channels // groups >= MIN_GROUP_CHANNELS
            and x.shape[0] * _tiles(x.shape[2]) * _tiles(x.shape[3]) >= MIN_TILES)


@torch.no_grad()
def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """G W Gᵀ of a (K, C/groups, 3, 3) weight as 36 1×1 conv weights (36, K, C/groups, 1, 1).

    Computed in float64 and rounded once, so the weight side adds no error of its own.
    """
    u = torch.einsum("ai,kcij,bj->abkc", G.to(weight.device), weight.double(),
                     G.to(weight.device))
    return u.reshape(36, *weight.shape[:2], 1, 1).to(weight.dtype).contiguous()


class PackedWeights:
    """A conv's transformed weights packed for oneDNN, one set per product size.

    ``transformed`` makes the (36, K, C/groups, 1, 1) weights of :func:`transform_weight`; it
    is called once per new product size and not kept, so only the packed copies stay in
    memory (4× the 3×3 weights per set).
    """

    def __init__(self, transformed: Callable[[], torch.Tensor], out_channels: int,
                 in_channels: int, groups: int) -> None:
        self.transformed = transformed
        self.out_channels = out_channels
        self.in_channels = in_channels
        self.groups = groups
        self._packed: dict[int, list[torch.Tensor]] = {}

    def for_tiles(self, tiles: int) -> list[torch.Tensor]:
        """The 36 packed weights for a product over ``tiles`` tile rows (oneDNN picks the
        packed layout for the input shape; a mismatch would cost a reorder per call)."""
        if tiles not in self._packed:
            self._packed[tiles] = [
                torch.ops.mkldnn._reorder_convolution_weight(
                    u, [0, 0], [1, 1], [1, 1], self.groups, [1, self.in_channels, tiles, 1])
                for u in self.transformed()]
        return self._packed[tiles]


def _input_transform(d: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> None:
    """out[j] = Σ_k Bᵀ[j, k]·d[k], with the common sums shared."""
    a, b = d[4] - d[2], d[3] - d[1]
    torch.add(d[4], d[0], alpha=4, out=out[0]).sub_(d[2], alpha=5)
    torch.sub(d[3] + d[4], d[1] + d[2], alpha=4, out=out[1])
    torch.add(d[4] - d[3], d[1] - d[2], alpha=4, out=out[2])
    torch.add(a, b, alpha=2, out=out[3])
    torch.sub(a, b, alpha=2, out=out[4])
    torch.add(d[5], d[1], alpha=4, out=out[5]).sub_(d[3], alpha=5)


def _output_transform(m: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> None:
    """out[r] = Σ_a Aᵀ[r, a]·m[a], with the common sums shared."""
    p, q, r, s = m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]
    torch.add(m[0], p, out=out[0]).add_(r)
    torch.add(q, s, alpha=2, out=out[1])
    torch.add(p, r, alpha=4, out=out[2])
    torch.add(q, s, alpha=8, out=out[3]).add_(m[5])


class _Workspace:
    """Scratch tensors of one conv call, allocated once and reused by all its chunks."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor, *shape: int) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[name] = like.new_empty(numel)
        return buffer[:numel].view(shape)


def _conv_chunk(x: torch.Tensor, weights: PackedWeights, bias: torch.Tensor,
                out: torch.Tensor, workspace: _Workspace) -> None:
    """Winograd conv of a chunk ``x`` (N, C, H, W) into the NHWC-dense ``out`` (N, H', W', K),
    where H' and W' are H and W rounded up to whole tiles."""
    n, c, h, w = x.shape
    th, tw = _tiles(h), _tiles(w)
    k = out.shape[-1]
    # TF 'SAME' for stride-1 3×3 is one zero row/column on each side; whole 6×6 tiles need
    # up to three more at the bottom/right, whose outputs are cropped by the caller.
    padded = pad2d(x, 1, 4 * tw + 1 - w, 1, 4 * th + 1 - h).permute(0, 2, 3, 1)
    rows = workspace.get("rows", x, 6, n, th, padded.shape[2], c)
    _input_transform([padded[:, i:i + 4 * th:4] for i in range(6)], rows)
    del padded
    tiles = workspace.get("tiles", x, 36, n, th, tw, c)
    for i in range(6):
        _input_transform([rows[i][:, :, j:j + 4 * tw:4] for j in range(6)],
                         tiles[6 * i:6 * i + 6])
    count = n * th * tw
    products = [
        # (count, C) @ (C, K) per group, as a 1×1 conv over a (1, C, count, 1) NHWC image
        torch.ops.mkldnn._convolution_pointwise(
            tile.view(1, count, 1, c).permute(0, 3, 1, 2), packed,
            bias if xi == BIAS_POSITION else None, [0, 0], [1, 1], [1, 1], weights.groups,
            "none", [], "").permute(0, 2, 3, 1).view(n, th, tw, k)
        for xi, (tile, packed) in enumerate(zip(tiles, weights.for_tiles(count), strict=True))]
    columns = workspace.get("columns", x, 6, 4, n, th, tw, k)
    for j in range(6):
        _output_transform(products[j::6], columns[j])
    del products
    tiled = out.view(n, th, 4, tw, 4, k)
    for r in range(4):
        _output_transform([columns[j, r] for j in range(6)],
                          [tiled[:, :, r, :, s] for s in range(4)])


def conv3x3(x: torch.Tensor, weights: PackedWeights, bias: torch.Tensor) -> torch.Tensor:
    """Stride-1 3×3 conv with TF 'SAME' padding of an NCHW-shaped float32 ``x`` (dense NCHW
    or channels-last); returns channels-last (N, K, H, W)."""
    n, c, h, w = x.shape
    k = weights.out_channels
    x = x.contiguous(memory_format=torch.channels_last)
    out = x.new_empty(n, 4 * _tiles(h), 4 * _tiles(w), k)
    per_sample = 36 * _tiles(h) * _tiles(w) * c
    chunks = -(-n * per_sample // CHUNK_TILE_ELEMENTS)
    chunk = -(-n // chunks)
    workspace = _Workspace()
    for start in range(0, n, chunk):
        _conv_chunk(x[start:start + chunk], weights, bias, out[start:start + chunk], workspace)
    if out.shape[1:3] != (h, w):
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)
