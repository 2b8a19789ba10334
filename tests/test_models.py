"""Models: the registry, official structure and counts, and parity with a literal reference."""

import math

import pytest
import torch
from reference import forward as reference_forward
from reference import perturb

import nfnets
from nfnets.models.common import stage_schedule

TINY = {  # small enough to run the float64 reference in milliseconds
    "nfnet_f0": dict(widths=(32, 64, 96, 96), depths=(1, 2, 2, 1), group_width=16),
    "nf_resnet50": dict(width=1, depths=(1, 2, 1, 1)),
    "nf_regnet_b0": dict(depths=(1, 2, 1, 1)),
}
FAMILY = {"nfnet_f0": "nfnet", "nf_resnet50": "nf_resnet", "nf_regnet_b0": "nf_regnet"}
ACT = {"nfnet_f0": "gelu", "nf_resnet50": "relu", "nf_regnet_b0": "silu"}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_list_models_has_every_official_variant():
    names = nfnets.list_models()
    assert [n for n in names if n.startswith("nfnet_f") and "plus" not in n] == [
        f"nfnet_f{k}" for k in range(8)]
    assert [n for n in names if n.endswith("_plus")] == [f"nfnet_f{k}_plus" for k in range(8)]
    assert [n for n in names if n.startswith("nf_resnet")] == [
        "nf_resnet50", "nf_resnet101", "nf_resnet152", "nf_resnet200", "nf_resnet288",
        "nf_resnet600"]
    assert [n for n in names if n.startswith("nf_regnet")] == [
        f"nf_regnet_b{k}" for k in range(9)]


def test_unknown_model_names_close_matches():
    with pytest.raises(ValueError, match="unknown model 'nfnet_f9'.*did you mean.*nfnet_f"):
        nfnets.create_model("nfnet_f9")


def test_official_spellings_are_aliases():
    with torch.device("meta"):
        assert nfnets.create_model("F0+").model_name == "nfnet_f0_plus"
        assert nfnets.create_model("B3").model_name == "nf_regnet_b3"


def test_bad_override_is_a_clear_error():
    with pytest.raises(ValueError, match="invalid option for nfnet_f0.*colour"):
        nfnets.create_model("nfnet_f0", colour="red")
    with pytest.raises(ValueError, match="narrower than one group"):
        nfnets.create_model("nfnet_f0", widths=(32, 64, 96, 96))


# Exact parameter counts and MACs (computed by the official counting rules of deepmind-research
# nfnets/base.py: count_conv_flops; F0–F6 equal the paper's Table 3 and the official README).
COUNTS = {
    "nfnet_f0": (71_489_284, 6.98, 12.38), "nfnet_f1": (132_634_256, 17.44, 35.54),
    "nfnet_f2": (193_779_228, 33.14, 62.59), "nfnet_f3": (254_924_200, 67.94, 114.76),
    "nfnet_f4": (316_069_172, 121.12, 215.24), "nfnet_f5": (377_214_144, 169.50, 289.76),
    "nfnet_f6": (438_359_116, 228.29, 377.28), "nfnet_f7": (499_504_088, 298.48, 478.78),
    "nfnet_f0_plus": (118_824_516, 11.00, 19.52), "nfnet_f1_plus": (220_357_008, 27.21, 55.45),
    "nfnet_f2_plus": (321_889_500, 51.51, 97.28),
    "nfnet_f3_plus": (423_421_992, 105.38, 177.99),
    "nfnet_f4_plus": (524_954_484, 187.62, 333.39),
    "nfnet_f5_plus": (626_486_976, 262.33, 448.43),
    "nfnet_f6_plus": (728_019_468, 353.10, 583.52),
    "nfnet_f7_plus": (829_551_960, 461.44, 740.16),
}
# Computed from the official nfnets/nf_resnet.py and nfnets/nf_regnet.py constructors:
# NF-ResNet without SE, NF-RegNet.
PARAMS_M = {"nf_resnet50": 25.56, "nf_resnet101": 44.55, "nf_resnet152": 60.19,
            "nf_resnet200": 64.67, "nf_regnet_b0": 8.60, "nf_regnet_b1": 10.02,
            "nf_regnet_b2": 13.79, "nf_regnet_b3": 18.14, "nf_regnet_b4": 29.32,
            "nf_regnet_b5": 48.71, "nf_regnet_b6": 70.05, "nf_regnet_b7": 101.74,
            "nf_regnet_b8": 142.31}


def test_full_f0_is_built_with_the_official_counts_and_structure():
    torch.manual_seed(0)
    model = nfnets.create_model("nfnet_f0")
    assert nfnets.count_params(model) == 71_489_284
    assert nfnets.count_flops(model, 256) == 12_384_198_656
    assert model.stem.conv3.out_channels == 128 and model.final_conv.out_channels == 3072
    assert [b.conv1.groups for b in model.blocks] == [1, 2, 2] + [6] * 9
    assert [b.conv1.out_channels for b in model.blocks] == [128, 256, 256] + [768] * 9
    assert [b.conv_shortcut is not None for b in model.blocks] == [
        True, True, False, True, False, False, False, False, False, True, False, False]
    assert [b.se.fc0.out_features for b in model.blocks][:4] == [128, 256, 256, 768]
    assert all(b.skip_gain.item() == 0 for b in model.blocks)  # SkipInit
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert model.drop_rate == 0.2 and model.default_cfg["ra_level"] == "405"
    assert model.default_cfg["train_size"] == 192 and model.default_cfg["test_size"] == 256


def test_plus_variant_rounds_stage_one_bottleneck_down():
    with torch.device("meta"):
        model = nfnets.create_model("nfnet_f0_plus")
    assert model.stem.conv3.out_channels == 192
    assert [model.blocks[i].conv1.out_channels for i in (0, 1, 3)] == [128, 384, 1024]


def test_f0_beta_and_drop_path_schedule():
    # β and drop rates of the official NFNet body loop for F0 (α 0.2, stochastic depth 0.25)
    sched = stage_schedule([1, 2, 6, 3], 0.2, 0.25)
    betas = [round(b, 6) for _, _, b, _ in sched]
    assert betas == [1.0, 0.980581, 0.980581, 0.96225, 0.980581, 0.96225, 0.944911, 0.928477,
                     0.912871, 0.898027, 0.980581, 0.96225]
    assert [round(r, 6) for *_, r in sched] == [round(0.25 * i / 12, 6) for i in range(12)]
    with torch.device("meta"):
        model = nfnets.create_model("nfnet_f0", stochdepth_rate=0.25)
    assert model.blocks[0].drop_path is None
    assert model.blocks[11].drop_path.rate == pytest.approx(0.229167, abs=1e-6)


def test_regnet_structure():
    with torch.device("meta"):
        model = nfnets.create_model("nf_regnet_b0")
    assert model.stem.conv.out_channels == 36 and model.final_conv.out_channels == 960
    assert model.blocks[0].conv0.out_channels == 32  # expansion 1 on 36 → rounded to ×8
    assert all(b.stride == 2 for b in (model.blocks[0], model.blocks[1], model.blocks[4]))
    assert torch.all(model.fc.weight == 0) if model.fc.weight.device.type != "meta" else True


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("size", [32, 33])
def test_parity_with_the_literal_official_forward(name, size):
    """The float32 model matches the float64 literal official forward to round-off."""
    torch.manual_seed(0)
    model = nfnets.create_model(name, num_classes=7, **TINY[name]).eval()
    perturb(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = model.forward_features(x)
        pool = model.forward_head(features, pre_logits=True)
        logits = model(x)
    ref_logits, ref_pool = reference_forward(model, x, FAMILY[name], ACT[name],
                                             TINY[name]["depths"])
    assert rel_err(logits, ref_logits) < 4e-6
    assert rel_err(pool, ref_pool) < 4e-6
    assert logits.std() > 0.01  # the perturbed model is not trivially constant


@pytest.mark.parametrize("size", [64, 65])
def test_full_f0_parity_at_even_and_odd_sizes(size):
    torch.manual_seed(1)
    model = nfnets.create_model("nfnet_f0", num_classes=10).eval()
    perturb(model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        logits = model(x)
    ref_logits, _ = reference_forward(model, x, "nfnet", "gelu", (1, 2, 6, 3))
    assert rel_err(logits, ref_logits) < 2e-5


def test_se_resnet_and_relu_nfnet_parity():
    torch.manual_seed(2)
    resnet = nfnets.create_model("nf_resnet50", num_classes=5, width=1, depths=(1, 1, 1, 1),
                                 use_se=True).eval()
    nfnet = nfnets.create_model("nfnet_f0", num_classes=5, activation="relu",
                                **TINY["nfnet_f0"]).eval()
    for model, family, act, depths in ((resnet, "nf_resnet", "relu", (1, 1, 1, 1)),
                                       (nfnet, "nfnet", "relu", TINY["nfnet_f0"]["depths"])):
        perturb(model)
        x = torch.randn(2, 3, 40, 40)
        with torch.no_grad():
            assert rel_err(model(x), reference_forward(model, x, family, act, depths)[0]) < 2e-6


def test_model_api():
    model = nfnets.create_model("nfnet_f0", num_classes=7, in_chans=1, **TINY["nfnet_f0"])
    x = torch.randn(2, 1, 64, 64)
    assert model.forward_features(x).shape == (2, model.num_features, 2, 2)
    assert model.num_features == 192
    assert model.get_classifier() is model.fc
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 192)
    with pytest.raises(ValueError, match=r"expects images of shape \(batch, 1, height, width\)"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="expects images"):
        model(torch.randn(1, 64, 64))
    rebuilt = nfnets.create_model(model.model_name, **model.model_kwargs)
    assert rebuilt.in_chans == 1 and rebuilt.num_features == 192
    assert [b.conv1.out_channels for b in rebuilt.blocks] == [
        b.conv1.out_channels for b in model.blocks]


def test_skip_init_makes_identity_blocks_at_init():
    torch.manual_seed(0)
    model = nfnets.create_model("nfnet_f0", num_classes=3, **TINY["nfnet_f0"]).eval()
    block = model.blocks[2]  # stride 1, no projection
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)


def test_every_parameter_gets_a_gradient_in_training():
    torch.manual_seed(0)
    for name, kw in TINY.items():
        model = nfnets.create_model(name, num_classes=4, stochdepth_rate=0.0, **kw).train()
        perturb(model)
        model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
        missing = [n for n, p in model.named_parameters()
                   if p.grad is None or p.grad.abs().sum() == 0]
        assert missing == [], name


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = nfnets.create_model("nfnet_f0", num_classes=4, drop_rate=0.0, stochdepth_rate=0.0,
                                **TINY["nfnet_f0"]).train()
    perturb(model)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).sum().backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)


def test_signal_metrics_follow_the_official_definitions():
    torch.manual_seed(0)
    model = nfnets.create_model("nfnet_f0", num_classes=4, **TINY["nfnet_f0"]).eval()
    perturb(model)
    x = torch.randn(4, 3, 32, 32)
    metrics = nfnets.models.signal_metrics(model, x)
    n = len(model.blocks)
    assert len(metrics) == 2 * (n + 1) + n
    stem = model.stem(x)
    torch.testing.assert_close(metrics["avg_var_0"], stem.var((0, 2, 3), unbiased=False).mean())
    torch.testing.assert_close(metrics["avg_sq_mean_0"], (stem.mean((0, 2, 3)) ** 2).mean())
    with torch.no_grad():
        out = model.blocks(stem)
    torch.testing.assert_close(metrics[f"avg_var_{n}"], out.var((0, 2, 3), unbiased=False).mean())
    assert all(metrics[f"res_avg_var_{k}"] > 0 for k in range(n))


def test_fused_model_matches():
    torch.manual_seed(0)
    model = nfnets.create_model("nf_regnet_b0", num_classes=4, **TINY["nf_regnet_b0"]).eval()
    perturb(model)
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        expected = model(x)
        fused = model.fuse()
        assert not any(isinstance(m, nfnets.layers.WSConv2d) for m in fused.modules())
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- every model

# Real forward/backward at 64 px for the models whose construction and step fit CI's time
# (the others are checked on the meta device only).
REAL = {"nfnet_f0", "nf_resnet50", "nf_regnet_b0", "nf_regnet_b1"}


def macs_of_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``forward_features(x)`` and the MACs its convs and linears (squeeze-excite) really ran,
    counted from the shapes they saw; the classifier's MACs are added."""
    total = 0

    def conv(module, inputs, out):
        nonlocal total
        kh, kw = module.kernel_size
        total += out[0].numel() * module.in_channels // module.groups * kh * kw

    def linear(module, inputs, out):
        nonlocal total
        total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(conv if isinstance(m, torch.nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        features = model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    fc = model.get_classifier()
    return features, total + fc.in_features * fc.out_features


# The deepest variants take several seconds each on the meta device (meta kernels run in
# Python): CI runs them, `-m "not slow"` skips them.
DEEP = {f"nfnet_f{k}{plus}" for k in range(4, 8) for plus in ("", "_plus")} | {
    "nf_resnet200", "nf_resnet288", "nf_resnet600", "nf_regnet_b7", "nf_regnet_b8"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n
                                  for n in nfnets.list_models()])
def test_every_model_on_the_meta_device(name):
    with torch.device("meta"):
        model = nfnets.create_model(name)
    cfg = model.default_cfg
    params = nfnets.count_params(model)
    if name in COUNTS:  # the official table
        assert params == COUNTS[name][0]
        assert round(nfnets.count_flops(model, cfg["train_size"]) / 1e9, 2) == COUNTS[name][1]
        assert round(nfnets.count_flops(model, cfg["test_size"]) / 1e9, 2) == COUNTS[name][2]
    elif name in PARAMS_M:
        assert round(params / 1e6, 2) == PARAMS_M[name]
    size = cfg["test_size"]
    features, macs = macs_of_features(model, torch.empty(1, 3, size, size, device="meta"))
    side = math.ceil(size / 32)  # five stride-2 steps with SAME padding
    assert features.shape == (1, model.num_features, side, side)
    # The official FLOP rule is the MACs the layers really run where every stage has whole
    # pixels; elsewhere it counts fractional pixels (float division), so fewer.
    if size % 32 == 0:
        assert nfnets.count_flops(model, size) == macs
    else:
        assert 0.9 * macs < nfnets.count_flops(model, size) < macs
    fc = model.get_classifier()
    assert fc is model.fc and (fc.in_features, fc.out_features) == (model.num_features, 1000)
    pooled = model.forward_head(features, pre_logits=True)
    assert model.forward_head(features).shape == (1, 1000)
    model.reset_classifier(10)
    assert model.get_classifier().out_features == 10
    assert model.forward_head(features).shape == (1, 10)
    model.reset_classifier(0)
    assert model.forward_head(features).shape == pooled.shape == (1, model.num_features)


@pytest.mark.parametrize("name", sorted(REAL))
def test_every_small_model_trains_a_step_at_64px(name):
    torch.manual_seed(0)
    model = nfnets.create_model(name, num_classes=5, stochdepth_rate=0.0).train()
    perturb(model)  # nonzero skip gains and classifier, so every parameter matters
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3])).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n
