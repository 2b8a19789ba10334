"""The opt-in Winograd F(4×4, 3×3) path for CPU inference: same function within its error
bound, used only where enabled and eligible, cached weights that follow the parameters."""

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import perturb

import nfnets
from nfnets import winograd
from nfnets.layers import Conv2dSame, WSConv2d

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="the Winograd path runs its products on oneDNN")

# Measured ~1e-5 (max |error| / max |output|) per conv; direct float32 convs give ~1e-6.
CONV_TOLERANCE = 5e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture
def any_shape(monkeypatch):
    """Let tiny convs take the path (the real thresholds need ≥128 channels, ≥64 tiles)."""
    monkeypatch.setattr(winograd, "MIN_GROUP_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_TILES", 1)


def test_matrices_compute_a_correlation_exactly():
    # Lavin & Gray's identity in 1-D: Aᵀ[(G g) ⊙ (Bᵀ d)] = the 4 outputs of a 3-tap
    # correlation of d (6 inputs); the 2-D algorithm is this applied along rows and columns.
    torch.manual_seed(0)
    d, g = torch.randn(6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    direct = torch.stack([d[i:i + 3] @ g for i in range(4)])
    torch.testing.assert_close(winograd.A_T @ ((winograd.G @ g) * (winograd.B_T @ d)), direct,
                               rtol=0, atol=1e-12)
    assert winograd.BIAS_POSITION == 7 and bool((winograd.A_T[:, 1] == 1).all())


def test_transform_helpers_match_the_matrices():
    torch.manual_seed(0)
    d = [torch.randn(3, 5) for _ in range(6)]
    out = torch.empty(6, 3, 5)
    winograd._input_transform(d, out)
    torch.testing.assert_close(out, torch.einsum("jk,kab->jab", winograd.B_T.float(),
                                                 torch.stack(d)))
    m = [torch.randn(3, 5) for _ in range(6)]
    res = torch.empty(4, 3, 5)
    winograd._output_transform(m, res)
    torch.testing.assert_close(res, torch.einsum("rk,kab->rab", winograd.A_T.float(),
                                                 torch.stack(m)))


@pytest.mark.parametrize("size", [(8, 8), (9, 13), (4, 5), (1, 1)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv3x3_equals_direct_conv(size, groups, layout, monkeypatch):
    monkeypatch.setattr(winograd, "CHUNK_TILE_ELEMENTS", 1)  # one sample per chunk
    torch.manual_seed(0)
    w = torch.randn(6, 8 // groups, 3, 3)
    b = torch.randn(6)
    x = torch.randn(3, 8, *size)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weights = winograd.PackedWeights(lambda: winograd.transform_weight(w), 6, 8, groups)
    with torch.no_grad():
        out = winograd.conv3x3(x, weights, b)
    direct = F.conv2d(x.double(), w.double(), b.double(), padding=1, groups=groups)
    assert out.shape == direct.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, direct) < CONV_TOLERANCE


def test_chunks_of_any_size_give_the_same_output(monkeypatch):
    torch.manual_seed(0)
    w, b, x = torch.randn(4, 4, 3, 3), torch.randn(4), torch.randn(5, 4, 8, 8)
    weights = winograd.PackedWeights(lambda: winograd.transform_weight(w), 4, 4, 1)
    outs = []
    for budget in (1, 36 * 4 * 4 * 2, 1 << 30):  # 1, 2 (then 1) and all 5 samples per chunk
        monkeypatch.setattr(winograd, "CHUNK_TILE_ELEMENTS", budget)
        with torch.no_grad():
            outs.append(winograd.conv3x3(x, weights, b))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


def test_applies_only_when_enabled_and_where_it_pays():
    x = torch.randn(4, 128, 16, 16)  # 4·4·4 = 64 tiles
    shape, one = (128, 128, 3, 3), (1, 1)
    assert not winograd.winograd_enabled()
    assert not winograd.applies(x, shape, one, 1)  # off by default
    with winograd.use_winograd():
        assert winograd.winograd_enabled()
        assert winograd.applies(x, shape, one, 1)
        assert not winograd.applies(x, shape, (2, 2), 1)  # stride 2
        assert not winograd.applies(x, (128, 128, 1, 1), one, 1)  # 1×1
        assert not winograd.applies(x.bfloat16(), shape, one, 1)  # float32 only
        assert not winograd.applies(x[:, :64], (64, 64, 3, 3), one, 1)  # the stem's widths
        assert not winograd.applies(x[:2], shape, one, 1)  # 32 tiles
        with winograd.use_winograd(False):
            assert not winograd.applies(x, shape, one, 1)
        assert winograd.winograd_enabled()
    assert not winograd.winograd_enabled()
    assert winograd.set_winograd(True) is False
    assert winograd.set_winograd(False) is True


def test_conv_module_caches_transformed_weights_that_follow_the_parameters():
    torch.manual_seed(0)
    conv = WSConv2d(128, 128, 3, activation="gelu").eval()  # real thresholds: 64 tiles
    x = torch.randn(1, 128, 32, 32)
    with torch.no_grad():
        exact = conv(x)
        with winograd.use_winograd():
            fast = conv(x)
            cached = conv._winograd.value
            assert cached is not None
            assert conv(x) is not fast and conv._winograd.value is cached
            conv.weight.mul_(-1.0)  # in place: the transformed weight must follow
            flipped = conv(x)
            assert conv._winograd.value is not cached
        flipped_exact = conv(x)
    assert rel_err(fast, exact) < CONV_TOLERANCE
    assert rel_err(flipped, flipped_exact) < CONV_TOLERANCE
    assert rel_err(flipped, exact) > 0.1
    conv.double()
    assert conv._winograd.value is None


def test_autograd_and_graph_capture_never_take_the_path(any_shape):
    torch.manual_seed(0)
    conv = Conv2dSame(4, 4, 3, activation="relu")
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    exact = conv(x)
    with winograd.use_winograd():
        trained = conv(x)
    assert conv._winograd.value is None
    torch.testing.assert_close(trained, exact, rtol=0, atol=0)


@pytest.mark.parametrize("name,config", [
    ("nfnet_f0", dict(widths=(32, 64, 96, 96), depths=(1, 2, 2, 1), group_width=16)),
    ("nf_regnet_b0", dict(depths=(1, 2, 2, 1))),  # depthwise (8 channels per group)
    ("nf_resnet50", dict(width=1, depths=(1, 2, 1, 1), use_se=True)),
])
def test_model_inference_with_winograd_stays_within_the_fast_path_bound(name, config,
                                                                          any_shape):
    torch.manual_seed(0)
    model = nfnets.create_model(name, num_classes=5, **config).eval()
    with torch.no_grad():
        perturb(model)  # non-zero skip gains, so the residual branches count
        x = torch.randn(2, 3, 40, 40)
        exact = model(x)
        with winograd.use_winograd():
            fast = model(x)
            fused = copy.deepcopy(model).fuse()(x)
    used = [m for m in model.modules() if isinstance(m, Conv2dSame) and m._winograd.value]
    assert used  # the stride-1 3×3 convs took the path
    assert all(m.kernel_size == (3, 3) and m.stride == (1, 1) for m in used)
    assert rel_err(fast, exact) < 1e-4
    assert rel_err(fused, exact) < 1e-4
