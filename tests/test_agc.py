"""Tests for nfnets.agc against a float64 transcription of the official AGC.

Source: deepmind-research nfnets/optim.py: unitwise_norm, SGD_AGC.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import nfnets.agc as agc_module
from nfnets.agc import AGC, ClipStats, adaptive_clip_grad_

# --- reference: the official rule, in the official (Haiku) layout, in float64 numpy ---------


def to_haiku(x: np.ndarray) -> np.ndarray:
    # conv OIHW -> HWIO, Linear (out, in) -> (in, out); vectors and scalars as they are.
    if x.ndim == 4:
        return x.transpose(2, 3, 1, 0)
    return x.T if x.ndim == 2 else x


def from_haiku(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:
        return x.transpose(3, 2, 0, 1)
    return x.T if x.ndim == 2 else x


def official_unitwise_norm(x: np.ndarray) -> np.ndarray:
    if np.squeeze(x).ndim <= 1:
        return np.sqrt(np.sum(x**2))
    if x.ndim == 2:
        return np.sqrt(np.sum(x**2, axis=0, keepdims=True))
    assert x.ndim == 4
    return np.sqrt(np.sum(x**2, axis=(0, 1, 2), keepdims=True))


def reference_agc(w: torch.Tensor, g: torch.Tensor, clipping: float, eps: float):
    """Clipped gradient (PyTorch layout, float64) and number of clipped units."""
    w64 = to_haiku(w.detach().double().numpy())
    g64 = to_haiku(g.double().numpy())
    max_norm = np.maximum(official_unitwise_norm(w64), eps) * clipping
    grad_norm = official_unitwise_norm(g64)
    clipped = g64 * (max_norm / np.maximum(grad_norm, 1e-6))
    out = np.where(grad_norm < max_norm, g64, clipped)
    return torch.from_numpy(from_haiku(out).copy()), int(np.sum(grad_norm > max_norm))


# --- helpers ---------------------------------------------------------------------------------

# Every layout: conv OIHW, Linear (out, in), vector, scalar, and the squeeze-rule cases.
SHAPES = [
    (6, 3, 3, 3),  # conv
    (5, 4, 1, 1),  # 1x1 conv
    (7, 9),  # Linear
    (11,),  # gain / bias
    (),  # skip_gain
    (5, 1),  # Linear with in_features=1: one unit (squeeze rule)
    (4, 1, 1, 1),  # conv with one weight per output channel: one unit
    (1, 8),  # Linear with out_features=1
    (1, 1, 1, 5),  # conv, one output channel, 1x5 kernel
    (1,),
]


def make_params(shapes, seed, dtype=torch.float64):
    """Parameters whose per-unit gradient/weight ratios straddle the clipping threshold."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
        # Log-uniform gradient magnitudes from 1e-4 to 1e-1 of the weights' per row: AGC at
        # 0.01 clips roughly half of the units.
        scale = 10 ** (-4 + 3 * torch.rand(shape[:1], generator=gen, dtype=torch.float64))
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        p.grad = g * scale.reshape(scale.shape + (1,) * (len(shape) - 1))
        if dtype != torch.float64:
            p.data = p.data.to(dtype)
            p.grad = p.grad.to(dtype)
        params.append(p)
    return params


def clone_params(params):
    # Parameter.__deepcopy__ drops .grad, so copy it by hand.
    clones = []
    for p in params:
        q = nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        clones.append(q)
    return clones


def random_shapes(gen: torch.Generator, n: int):
    shapes = []
    for _ in range(n):
        o, i, k = (int(v) for v in torch.randint(1, 9, (3,), generator=gen))
        kind = int(torch.randint(0, 4, (), generator=gen))
        shapes.append([(o, i, k, k), (o, i), (o,), ()][kind])
    return shapes


# --- numerics --------------------------------------------------------------------------------


@pytest.fixture(params=["per_tensor", "batched"])
def strategy(request, monkeypatch):
    """Run a test with each way of batching the kernels (CPU default: per tensor; CUDA:
    batched), so that both are checked on the CPU."""
    if request.param == "batched":
        monkeypatch.setattr(agc_module, "_PER_TENSOR_DEVICES", set())
    return request.param


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("clipping", [0.01, 0.05])
def test_matches_official_reference_every_layout(seed, clipping, strategy):
    gen = torch.Generator().manual_seed(100 + seed)
    params = make_params(SHAPES + random_shapes(gen, 12), seed)
    expected = [reference_agc(p, p.grad, clipping, 1e-3) for p in params]

    stats = adaptive_clip_grad_(params, clipping=clipping)

    for p, (g_ref, _) in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-12, atol=0)
    n_clipped = sum(count for _, count in expected)
    assert int(stats.clipped) == n_clipped
    units = sum(1 if sum(s != 1 for s in p.shape) <= 1 else p.shape[0] for p in params)
    assert stats.units == units
    assert 0 < n_clipped < units  # both branches exercised


def test_clip_count_and_norms_on_constructed_units():
    # A Linear weight with 4 rows of norm 1: gradient rows at 0.5, 0.99, 1.5 and 3 times the
    # max norm 0.01 -> exactly the last two are clipped to norm 0.01.
    w = nn.Parameter(torch.eye(4, dtype=torch.float64))
    ratios = torch.tensor([0.5, 0.99, 1.5, 3.0], dtype=torch.float64)
    w.grad = torch.diag(ratios * 0.01).flip(1)
    stats = adaptive_clip_grad_([w], clipping=0.01)
    assert int(stats.clipped) == 2 and stats.units == 4
    torch.testing.assert_close(
        w.grad.norm(dim=1),
        torch.tensor([0.005, 0.0099, 0.01, 0.01], dtype=torch.float64),
        rtol=1e-12,
        atol=0,
    )
    assert float(stats.fraction) == 0.5


@pytest.mark.parametrize("shape", [(4, 1), (4, 1, 1, 1)])
def test_squeeze_rule_one_unit(shape):
    # Per-row norms would clip the second row (weight 0.1 -> max 1e-3 < 0.01); the official
    # rule takes one norm over the whole tensor (max 0.1 > |g| = 0.02), so nothing changes.
    w = nn.Parameter(torch.tensor([10.0, 0.1, 0.0, 0.0], dtype=torch.float64).view(shape))
    g = torch.tensor([0.01, 0.01, 0.01, 0.01], dtype=torch.float64).view(shape)
    w.grad = g.clone()
    stats = adaptive_clip_grad_([w], clipping=0.01)
    assert stats.units == 1 and int(stats.clipped) == 0
    torch.testing.assert_close(w.grad, g, rtol=0, atol=0)


def test_conv1d_and_conv3d_weights_are_clipped_per_output_channel():
    gen = torch.Generator().manual_seed(0)
    for shape in [(5, 3, 4), (3, 2, 2, 3, 2)]:
        w = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
        w.grad = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.05
        dims = tuple(range(1, len(shape)))
        max_norm = 0.01 * torch.linalg.vector_norm(w.detach(), dim=dims).clamp_min(1e-3)
        g_norm = torch.linalg.vector_norm(w.grad, dim=dims)
        expected = torch.minimum(g_norm, max_norm)
        stats = adaptive_clip_grad_([w], clipping=0.01)
        torch.testing.assert_close(
            torch.linalg.vector_norm(w.grad, dim=dims), expected, rtol=1e-12, atol=0
        )
        assert stats.units == shape[0] and int(stats.clipped) == int((g_norm > max_norm).sum())


def test_zero_weights_use_eps_floor():
    # Zero-initialised skip_gain / biases / weights: max norm = 0.01 * 1e-3 = 1e-5 per unit.
    shapes = [(), (6,), (3, 4), (2, 3, 3, 3)]
    params = [nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    stats = adaptive_clip_grad_(params, clipping=0.01, eps=1e-3)
    assert int(stats.clipped) == stats.units == 1 + 1 + 3 + 2
    # Tolerances are relative only: the values are far below assert_close's default atol.
    exact = {"rtol": 1e-12, "atol": 0}
    one = torch.tensor(1e-5, dtype=torch.float64)
    torch.testing.assert_close(params[0].grad.abs(), one, **exact)
    torch.testing.assert_close(params[1].grad.norm(), one, **exact)
    torch.testing.assert_close(params[2].grad.norm(dim=1), one.expand(3), **exact)
    torch.testing.assert_close(params[3].grad.flatten(1).norm(dim=1), one.expand(2), **exact)


def test_grad_norm_floor():
    # max norm 1e-4 * 1e-3 = 1e-7 < |g| = 5e-7 < 1e-6: the official 1e-6 floor on the gradient
    # norm makes the factor 1e-7 / 1e-6, so |g| ends at 5e-8, not at 1e-7.
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    w.grad = torch.tensor([3e-7, 4e-7, 0.0], dtype=torch.float64)
    g_ref, count = reference_agc(w, w.grad, 1e-4, 1e-3)
    stats = adaptive_clip_grad_([w], clipping=1e-4, eps=1e-3)
    assert int(stats.clipped) == count == 1
    torch.testing.assert_close(w.grad, g_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        w.grad.norm(), torch.tensor(5e-8, dtype=torch.float64), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_grads(dtype, strategy):
    params = make_params(SHAPES, seed=7, dtype=dtype)
    expected = [reference_agc(p, p.grad, 0.01, 1e-3) for p in params]
    stats = adaptive_clip_grad_(params)
    # One rounding of the product into the gradient dtype (norms are float32); fp16 values
    # below 6e-5 are subnormal, with an absolute spacing of 6e-8.
    rtol, atol = {
        torch.float32: (1e-6, 0),
        torch.bfloat16: (1e-2, 0),
        torch.float16: (2e-3, 6e-8),
    }[dtype]
    for p, (g_ref, _) in zip(params, expected, strict=True):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad.double(), g_ref, rtol=rtol, atol=atol)
    assert int(stats.clipped) == sum(count for _, count in expected)


def test_mixed_dtypes_are_grouped_and_counted_together():
    a = make_params(SHAPES[:5], seed=1)
    b = make_params(SHAPES[5:], seed=2, dtype=torch.float32)
    expected = [reference_agc(p, p.grad, 0.01, 1e-3) for p in a + b]
    stats = adaptive_clip_grad_(b[:2] + a + b[2:])
    for p, (g_ref, _) in zip(a + b, expected, strict=True):
        torch.testing.assert_close(p.grad.double(), g_ref, rtol=1e-6, atol=0)
    assert int(stats.clipped) == sum(c for _, c in expected)
    assert stats.clipped.dtype == torch.int64 and stats.clipped.dim() == 0


def test_channels_last_gradients():
    params = make_params([(6, 4, 3, 3)], seed=3)
    ref = clone_params(params)
    params[0].grad = params[0].grad.contiguous(memory_format=torch.channels_last)
    adaptive_clip_grad_(params)
    adaptive_clip_grad_(ref)
    torch.testing.assert_close(params[0].grad, ref[0].grad, rtol=1e-14, atol=0)


def test_parameters_without_grad_and_empty_lists():
    params = make_params(SHAPES[:3], seed=4)
    no_grad = nn.Parameter(torch.randn(3, 3))
    stats = adaptive_clip_grad_([no_grad] + params)
    assert no_grad.grad is None
    assert stats.units == 6 + 5 + 7
    empty = adaptive_clip_grad_([])
    assert int(empty.clipped) == 0 and empty.units == 0 and float(empty.fraction) == 0.0
    assert int(adaptive_clip_grad_([no_grad]).clipped) == 0


def test_single_tensor_and_generator_inputs():
    p = make_params([(4, 3)], seed=5)[0]
    (q,) = clone_params([p])
    adaptive_clip_grad_(p)
    adaptive_clip_grad_(x for x in [q])
    torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_bad_input_raises_value_error():
    p = make_params([(3, 3)], seed=6)[0]
    for clipping in (0.0, -0.01, float("nan")):
        with pytest.raises(ValueError, match="clipping must be a positive number"):
            adaptive_clip_grad_([p], clipping=clipping)
    for eps in (0.0, -1e-3):
        with pytest.raises(ValueError, match="eps must be a positive number"):
            adaptive_clip_grad_([p], eps=eps)
    with pytest.raises(ValueError, match="given twice"):
        adaptive_clip_grad_([p, p])
    ints = torch.zeros(3, dtype=torch.int64)
    ints.grad = torch.ones(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="floating-point gradients, got torch.int64"):
        adaptive_clip_grad_([ints])
    sparse = nn.Parameter(torch.randn(4, 2))
    sparse.grad = torch.randn(4, 2).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        adaptive_clip_grad_([sparse])


def test_works_under_torch_compile(strategy):
    # aot_eager traces the whole function (fullgraph: no graph break) and functionalises the
    # in-place update without a C++ build; eager and compiled must agree exactly.
    eager = make_params(SHAPES, seed=8, dtype=torch.float32)
    compiled = clone_params(eager)

    def clip(params):
        return adaptive_clip_grad_(params, clipping=0.02)

    stats_eager = clip(eager)
    stats_compiled = torch.compile(clip, backend="aot_eager", fullgraph=True)(compiled)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    assert int(stats_compiled.clipped) == int(stats_eager.clipped) > 0
    assert stats_compiled.units == stats_eager.units


def test_gradient_accumulation_clips_the_accumulated_gradient():
    # Two half-batch backward passes (loss / 2 each) then one clip == one clip of the
    # full-batch gradient.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    loss_fn = nn.CrossEntropyLoss()
    for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):
        (loss_fn(model(xs), ys) / 2).backward()
    loss_fn(twin(x), y).backward()
    stats = adaptive_clip_grad_(model.parameters(), clipping=0.001)
    stats_full = adaptive_clip_grad_(twin.parameters(), clipping=0.001)
    assert int(stats.clipped) == int(stats_full.clipped) > 0
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)


def test_bf16_autocast_fp32_params():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 8, 8))
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    params = list(model.parameters())
    assert all(p.grad.dtype == torch.float32 for p in params)
    expected = [reference_agc(p, p.grad, 0.001, 1e-3) for p in params]
    stats = adaptive_clip_grad_(params, clipping=0.001)
    for p, (g_ref, _) in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad.double(), g_ref, rtol=1e-5, atol=0)
    assert int(stats.clipped) == sum(c for _, c in expected) > 0


# --- the AGC optimizer wrapper ---------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))

    def get_classifier(self):
        return self.fc


def _loss(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 2, 6, 6, generator=gen)
    y = torch.randint(0, 3, (4,), generator=gen)
    return nn.functional.cross_entropy(model(x), y)


def _groups(model, clipping=0.01):
    return [
        {"params": [model.conv.weight, model.conv.bias], "clipping": clipping},
        {"params": [model.fc.weight], "clipping": None},
        {"params": [model.fc.bias]},  # no key: the wrapper's default factor
    ]


def test_wrapper_clips_per_group_then_steps():
    torch.manual_seed(0)
    model = TinyNet()
    ref = copy.deepcopy(model)
    opt = AGC(torch.optim.SGD(_groups(model, 0.001), lr=0.5), clipping=0.002)
    assert opt.last_stats is None
    _loss(model).backward()
    _loss(ref).backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    adaptive_clip_grad_([ref.conv.weight, ref.conv.bias], clipping=0.001)
    adaptive_clip_grad_([ref.fc.bias], clipping=0.002)
    assert torch.equal(ref.fc.weight.grad, grads["fc.weight"])  # not clipped

    opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach() - 0.5 * q.grad, msg=name)
    assert isinstance(opt.last_stats, ClipStats)
    assert opt.last_stats.units == 4 + 1 + 1  # conv rows, conv bias, fc bias; fc.weight skipped
    assert int(opt.last_stats.clipped) > 0
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_wrapper_with_lambda_lr_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = TinyNet()
    twin = copy.deepcopy(model)

    def make(m):
        opt = AGC(torch.optim.SGD(_groups(m), lr=0.1, momentum=0.9, nesterov=True))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    opt, sched = make(model)
    for step in range(2):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 3)
    assert opt.param_groups is opt.optimizer.param_groups

    # Resume a twin from the checkpoint, then take the same step on both.
    twin.load_state_dict(model.state_dict())
    opt2, sched2 = make(twin)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups is opt2.optimizer.param_groups
    assert opt2.param_groups[1]["clipping"] is None and opt2.param_groups[0]["lr"] == 0.1 / 3
    # A bare SGD loads the same checkpoint: the format is the wrapped optimizer's.
    torch.optim.SGD(_groups(copy.deepcopy(model)), lr=1.0, momentum=0.9).load_state_dict(
        opt.state_dict()
    )
    for m, o, s in ((model, opt, sched), (twin, opt2, sched2)):
        o.zero_grad()
        _loss(m, 5).backward()
        o.step()
        s.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_wrapper_under_grad_scaler_clips_unscaled_gradients():
    torch.manual_seed(0)
    model = TinyNet()
    twin = copy.deepcopy(model)
    opt = AGC(torch.optim.SGD(_groups(model, 0.001), lr=0.5, momentum=0.9))
    opt_twin = AGC(torch.optim.SGD(_groups(twin, 0.001), lr=0.5, momentum=0.9))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    for step in range(3):
        opt.zero_grad()
        scaler.scale(_loss(model, step)).backward()
        scaler.step(opt)
        scaler.update()
        opt_twin.zero_grad()
        _loss(twin, step).backward()
        opt_twin.step()
        assert int(opt.last_stats.clipped) == int(opt_twin.last_stats.clipped) > 0
    # Power-of-two scaling is exact, so clipping the unscaled gradient gives identical updates.
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_wrapper_skipped_scaler_step_neither_clips_nor_steps():
    torch.manual_seed(0)
    model = TinyNet()
    opt = AGC(torch.optim.SGD(_groups(model), lr=0.5))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = copy.deepcopy(model.state_dict())
    scaler.scale(_loss(model)).backward()
    model.fc.bias.grad[0] = float("inf")
    conv_grad = model.conv.weight.grad.clone()
    scaler.step(opt)
    scaler.update()
    assert opt.last_stats is None  # step() never ran
    assert scaler.get_scale() == 2.0**9
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    # unscale_ divided by the scale, but the gradient was not clipped
    torch.testing.assert_close(model.conv.weight.grad, conv_grad / 2.0**10, rtol=0, atol=0)


def test_wrapper_bad_input():
    model = TinyNet()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        AGC(model.parameters())
    with pytest.raises(ValueError, match="clipping must be a positive number"):
        AGC(torch.optim.SGD(model.parameters(), lr=0.1), clipping=0.0)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        AGC(torch.optim.SGD(model.parameters(), lr=0.1), eps=-1.0)
    groups = [{"params": list(model.parameters()), "clipping": -1.0, "name": "decay"}]
    with pytest.raises(ValueError, match="param group 'decay' has clipping=-1.0"):
        AGC(torch.optim.SGD(groups, lr=0.1))
    opt = AGC(torch.optim.SGD([model.conv.weight], lr=0.1))
    with pytest.raises(ValueError, match="has clipping=0"):
        opt.add_param_group({"params": [model.fc.weight], "clipping": 0})
    opt.add_param_group({"params": [model.fc.weight], "clipping": None})
    assert len(opt.optimizer.param_groups) == 2


def test_wrapper_closure_and_deepcopy():
    torch.manual_seed(0)
    model = TinyNet()
    opt = AGC(torch.optim.SGD(_groups(model), lr=0.1))

    def closure():
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and opt.last_stats.units == 6
    clone = copy.deepcopy(opt)
    assert isinstance(clone.optimizer, torch.optim.SGD) and clone.eps == opt.eps
    assert clone.param_groups is clone.optimizer.param_groups
