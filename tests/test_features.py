"""NF models as backbones: feature taps, feature_info, forward_intermediates, FPN."""

import pytest
import torch

import nfnets
from nfnets.models.features import FeatureExtractor, block_stages

TINY = {  # as tests/test_models.py
    "nfnet_f0": dict(widths=(32, 64, 96, 96), depths=(1, 2, 2, 1), group_width=16),
    "nf_resnet50": dict(width=1, depths=(1, 2, 1, 1)),
    "nf_regnet_b0": dict(depths=(1, 2, 1, 1)),
}
# Channels of the five taps of the tiny models: the stem tap (NFNet: the 64-channel conv
# before the last stride-2 stem conv), the stages, and final_conv where there is one.
TINY_CHANNELS = {"nfnet_f0": [64, 32, 64, 96, 192], "nf_resnet50": [16, 64, 128, 256, 512],
                 "nf_regnet_b0": [36, 36, 78, 156, 960]}


def test_full_size_feature_info_matches_timm():
    # timm's dm_nfnet_f0.feature_info: stem.conv3 64/2, stages 256/4, 512/8, 1536/16 and
    # final_conv 3072/32 (its stem.conv3 is our stem.conv2: timm numbers the stem from 1).
    with torch.device("meta"):
        model = nfnets.create_model("nfnet_f0")
    info = model.feature_info
    assert [(f["num_chs"], f["reduction"]) for f in info] == [
        (64, 2), (256, 4), (512, 8), (1536, 16), (3072, 32)]
    assert [f["module"] for f in info] == ["stem.conv2", "blocks.0", "blocks.2", "blocks.8",
                                           "final_conv"]
    with torch.device("meta"):
        resnet = nfnets.create_model("nf_resnet50")
    assert [f["num_chs"] for f in resnet.feature_info] == [64, 256, 512, 1024, 2048]
    assert block_stages(resnet)[3] == (1, 0)  # 3 blocks in stage 0, then stage 1 starts


@pytest.mark.parametrize("name", list(TINY))
def test_taps_have_the_stated_shapes_and_match_forward_features(name):
    torch.manual_seed(0)
    model = nfnets.create_model(name, num_classes=3, **TINY[name]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        expected_final = model.forward_features(x)
    info = model.feature_info
    assert [f["reduction"] for f in info] == [2, 4, 8, 16, 32]
    assert [f["num_chs"] for f in info] == TINY_CHANNELS[name]
    for tap, f in zip(taps, info, strict=True):
        assert tap.shape == (2, f["num_chs"], 64 // f["reduction"], 64 // f["reduction"])
    torch.testing.assert_close(final, expected_final, rtol=1e-5, atol=1e-5)
    # The last tap is pre-activation: forward_features is its activation.
    torch.testing.assert_close(model.final_act(taps[-1]), expected_final, rtol=1e-5, atol=1e-5)
    # The stem tap is pre-activation too: it has negative values a GELU/ReLU output cannot.
    assert taps[0].min() < -0.2


@pytest.mark.parametrize("name", list(TINY))
def test_features_only_returns_chosen_taps_and_drops_the_rest(name):
    torch.manual_seed(0)
    full = nfnets.create_model(name, num_classes=3, **TINY[name]).eval()
    torch.manual_seed(0)
    backbone = nfnets.create_model(name, num_classes=3, features_only=True, out_indices=(1, 2),
                                   **TINY[name]).eval()
    assert isinstance(backbone, FeatureExtractor)
    assert backbone.reductions == [4, 8] == backbone.feature_info.reduction()  # timm's API
    assert backbone.channels == TINY_CHANNELS[name][1:3]
    # Nothing after stage 2 remains: no classifier, no final conv, no later blocks.
    names = {k for k, _ in backbone.named_parameters()}
    assert not any(k.startswith(("model.fc.", "model.final_conv.")) for k in names)
    assert len(backbone.model.blocks) == 3  # stages 1 and 2 of depths (1, 2, ...)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = backbone(x)
        want = full.forward_intermediates(x, [1, 2], intermediates_only=True)
    assert len(got) == 2
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_intermediate_indices():
    model = nfnets.create_model("nf_regnet_b0", num_classes=3, **TINY["nf_regnet_b0"]).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        last_two = model.forward_intermediates(x, 2, intermediates_only=True)
        negative = model.forward_intermediates(x, [-1], intermediates_only=True)
        stem_only = model.forward_intermediates(x, [0], stop_early=True, intermediates_only=True)
    assert [t.shape[1] for t in last_two] == [156, 960]
    torch.testing.assert_close(negative[0], last_two[1])
    assert stem_only[0].shape == (1, 36, 16, 16)
    with pytest.raises(ValueError, match="not in 0..4"):
        model.forward_intermediates(x, [5])


def test_backbone_feeds_torchvision_fpn():
    # The snippet of docs/backbones.md, at a tiny size.
    from torchvision.ops import FeaturePyramidNetwork

    backbone = nfnets.create_model("nfnet_f0", features_only=True, out_indices=(2, 3, 4),
                                   **TINY["nfnet_f0"]).eval()
    fpn = FeaturePyramidNetwork(backbone.channels, out_channels=32).eval()
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        maps = fpn(dict(zip(["p3", "p4", "p5"], backbone(x), strict=True)))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "p3": (1, 32, 16, 12), "p4": (1, 32, 8, 6), "p5": (1, 32, 4, 3)}


def test_taps_of_a_fused_model_match():
    # nfnets.optimize_for_inference (what eval/predict run) folds WS into plain convs; the
    # stem tap reads the fused conv's weight the same way.
    from nfnets.inference import optimize_for_inference

    torch.manual_seed(0)
    model = nfnets.create_model("nfnet_f0", num_classes=3, **TINY["nfnet_f0"]).eval()
    x = torch.randn(1, 3, 64, 64)
    fused = optimize_for_inference(model, x, compile=False)  # compiling takes a minute
    with torch.no_grad():
        for got, want in zip(fused.forward_intermediates(x, intermediates_only=True),
                             model.forward_intermediates(x, intermediates_only=True),
                             strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
