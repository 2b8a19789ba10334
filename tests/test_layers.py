"""Layers against hand-computed cases and the official constants (nfnets/base.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from reference import avg_pool, max_pool, ws_conv

from nfnets.layers import (
    ACTIVATION_GAMMAS,
    GammaAct,
    SqueezeExcite,
    StochasticDepth,
    WSConv2d,
    activation_fn,
    avg_pool_same,
    conv2d_same,
    max_pool_same,
    same_padding,
)


def test_gamma_table_is_the_official_one():
    # nfnets/base.py `nonlinearities`, verbatim.
    assert ACTIVATION_GAMMAS == {
        "identity": 1.0, "celu": 1.270926833152771, "elu": 1.2716004848480225,
        "gelu": 1.7015043497085571, "glu": 1.8484294414520264,
        "leaky_relu": 1.70590341091156, "log_sigmoid": 1.9193484783172607,
        "log_softmax": 1.0002083778381348, "relu": 1.7139588594436646,
        "relu6": 1.7131484746932983, "selu": 1.0008515119552612,
        "sigmoid": 4.803835391998291, "silu": 1.7881293296813965,
        "soft_sign": 2.338853120803833, "softplus": 1.9203323125839233,
        "tanh": 1.5939117670059204,
    }


def test_gelu_is_the_tanh_approximation_times_gamma():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    tanh_gelu = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    got = GammaAct("gelu")(x)
    torch.testing.assert_close(got, tanh_gelu * 1.7015043497085571, rtol=1e-12, atol=1e-12)
    # the exact (erf) GELU is measurably different: a port using it would fail parity
    assert (got - F.gelu(x) * 1.7015043497085571).abs().max() > 1e-4


def test_gamma_makes_unit_variance_for_gaussian_input():
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in ("relu", "gelu", "silu", "tanh"):
        assert GammaAct(name)(x).std().item() == pytest.approx(1.0, abs=3e-3)


def test_unknown_activation_lists_choices():
    with pytest.raises(ValueError, match="unknown activation 'swish'.*gelu"):
        activation_fn("swish")


@pytest.mark.parametrize("n,k,s,expected", [
    (64, 3, 2, (0, 1)), (65, 3, 2, (1, 1)), (64, 3, 1, (1, 1)), (65, 3, 1, (1, 1)),
    (64, 1, 2, (0, 0)), (65, 1, 2, (0, 0)), (64, 7, 2, (2, 3)), (65, 7, 2, (3, 3)),
    (64, 2, 2, (0, 0)), (65, 2, 2, (0, 1)),
])
def test_same_padding_table(n, k, s, expected):
    # TensorFlow's SAME padding rule, worked cases
    assert same_padding(n, k, s) == expected


def test_strided_conv_pads_bottom_right_on_even_input():
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    w = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    out = conv2d_same(x, w, None, (2, 2), 1)
    # TF 'SAME': pad 0 before, 1 after → windows start at rows/cols 0 and 2
    expected = torch.tensor([[x[0, 0, 0:3, 0:3].sum(), x[0, 0, 0:3, 2:4].sum()],
                             [x[0, 0, 2:4, 0:3].sum(), x[0, 0, 2:4, 2:4].sum()]])
    torch.testing.assert_close(out[0, 0], expected)
    # PyTorch's symmetric padding=1 gives the right size but a shifted grid
    assert not torch.allclose(F.conv2d(x, w, stride=2, padding=1)[0, 0], expected)


def test_avg_pool_excludes_padding_on_odd_input():
    x = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3)
    out = avg_pool_same(x)[0, 0]
    expected = torch.tensor([[(0 + 1 + 3 + 4) / 4, (2 + 5) / 2], [(6 + 7) / 2, 8.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    y = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(avg_pool_same(y), avg_pool(y))


@pytest.mark.parametrize("size", [8, 9])
def test_max_pool_same(size):
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    out = max_pool_same(x)
    assert out.shape[-1] == math.ceil(size / 2)
    torch.testing.assert_close(out, max_pool(x))


def test_ws_conv_matches_float64_reference_and_standardises():
    torch.manual_seed(0)
    conv = WSConv2d(8, 6, 3, stride=2, groups=2).double()
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
        conv.bias.normal_()
    for size in (9, 10):
        x = torch.randn(2, 8, size, size, dtype=torch.float64)
        torch.testing.assert_close(conv(x), ws_conv(conv, x), rtol=1e-12, atol=1e-12)
    w = conv.standardized_weight()
    fan_in = 4 * 3 * 3
    assert conv.fan_in == fan_in
    torch.testing.assert_close(w.mean((1, 2, 3)), torch.zeros(6, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    # population variance · fan_in == gain²  (unit-norm rows times the gain)
    torch.testing.assert_close(w.var((1, 2, 3), unbiased=False) * fan_in, conv.gain.detach() ** 2)


def test_ws_eps_is_a_floor_on_fan_in_times_var():
    conv = WSConv2d(2, 2, 1).double()
    with torch.no_grad():
        w = torch.tensor([[1.0, 1.002], [0.0, 3.0]], dtype=torch.float64)
        conv.weight.copy_(w.view(2, 2, 1, 1))
    w = conv.standardized_weight()
    # row 0: fan_in·var = 2·(1e-3)² = 2e-6 < 1e-4 → scale = 1/sqrt(1e-4) = 100
    torch.testing.assert_close(w[0].flatten(), torch.tensor([-0.1, 0.1], dtype=torch.float64))
    # row 1: fan_in·var = 2·2.25 = 4.5 → scale 1/sqrt(4.5); an additive eps would differ
    torch.testing.assert_close(w[1].flatten(),
                               torch.tensor([-1.5, 1.5], dtype=torch.float64) / math.sqrt(4.5))


def test_ws_init_is_official():
    torch.manual_seed(0)
    conv = WSConv2d(256, 512, 3)
    assert conv.weight.std().item() == pytest.approx((256 * 9) ** -0.5, rel=0.01)
    assert conv.gain.shape == (512,) and torch.all(conv.gain == 1)
    assert torch.all(conv.bias == 0)


def test_eval_follows_parameter_changes_without_a_cache():
    conv = WSConv2d(4, 4, 3).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        first = conv(x)
        conv.weight.data.mul_(2.0).add_(0.3)  # even a change autograd cannot see
        conv.gain.mul_(3.0)
        second = conv(x)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, conv(x))  # the same with autograd on
    # the module holds its parameters and buffers and nothing derived from them
    assert set(vars(conv)) - set(vars(torch.nn.Conv2d(4, 4, 3))) == {
        "activation", "act", "input_scale", "eps", "fan_in"}


def test_fuse_gives_a_plain_conv_with_the_same_output():
    conv = WSConv2d(4, 6, 3, stride=2, input_scale=1.7).eval()
    fused = conv.fuse()
    assert not isinstance(fused, WSConv2d)
    for size in (8, 9):
        x = torch.randn(2, 4, size, size)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), conv(x))


def test_input_scale_is_exact_folding():
    conv = WSConv2d(4, 4, 3).double()
    scaled = WSConv2d(4, 4, 3, input_scale=1.7).double()
    scaled.load_state_dict(conv.state_dict())
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(scaled(x), conv(1.7 * x))


def test_squeeze_excite_official_shape_and_relu():
    se = SqueezeExcite(64, 0.5).double()
    assert se.fc0.out_features == 32 and se.fc1.out_features == 64
    assert SqueezeExcite(3, 0.25).fc0.out_features == 1  # max(1, int(ch·ratio))
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64)
    h = torch.relu(se.fc0(x.mean((2, 3))))
    expected = 2 * torch.sigmoid(se.fc1(h))[:, :, None, None]
    torch.testing.assert_close(se(x), expected)
    # truncated-normal init at ±2 stddev of 1/sqrt(fan_in)
    bound = 2 * 64 ** -0.5
    assert se.fc0.weight.abs().max() <= bound and torch.all(se.fc0.bias == 0)


def test_stochastic_depth_drops_per_sample_without_rescaling():
    torch.manual_seed(0)
    sd = StochasticDepth(0.5)
    x = torch.ones(4000, 3, 2, 2)
    y = sd(x)
    per_sample = y.view(4000, -1)
    assert set(per_sample.unique().tolist()) == {0.0, 1.0}  # kept samples are NOT scaled by 2
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert per_sample[:, 0].mean().item() == pytest.approx(0.5, abs=0.03)
    assert torch.equal(sd.eval()(x), x)
    with pytest.raises(ValueError):
        StochasticDepth(1.0)
