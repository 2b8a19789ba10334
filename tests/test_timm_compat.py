"""timm's dm_nfnet weights onto ours and back (timm is in the dev extra; no network)."""

from dataclasses import replace

import pytest
import safetensors.torch
import torch
from reference import forward as reference_forward
from reference import perturb

import nfnets
from nfnets.errors import CheckpointError, UsageError
from nfnets.timm_compat import (
    from_timm_state_dict,
    read_timm_checkpoint,
    to_timm_state_dict,
)

timm = pytest.importorskip("timm")
from timm.models.nfnet import NormFreeNet, _dm_nfnet_cfg  # noqa: E402

# A small model of dm_nfnet's layout: timm's dm stem is fixed at 128 channels (widths[0] // 2
# for ours); two blocks in stage 2 exercise the global block numbering.
DEPTHS = (1, 2, 1, 1)
WIDTHS = (256, 256, 384, 512)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def small_pair():
    """(ours, timm's) small dm_nfnet with the same random weights, in eval mode."""
    torch.manual_seed(0)
    ours = nfnets.create_model("nfnet_f0", num_classes=10, depths=DEPTHS, widths=WIDTHS).eval()
    perturb(ours)
    theirs = NormFreeNet(replace(_dm_nfnet_cfg(depths=DEPTHS, channels=WIDTHS)),
                         num_classes=10).eval()
    theirs.load_state_dict(to_timm_state_dict(ours))
    return ours, theirs


def test_full_f0_names_and_shapes_map_exactly():
    with torch.device("meta"):
        theirs = timm.create_model("dm_nfnet_f0")
        ours = nfnets.create_model("nfnet_f0")
    mapped = from_timm_state_dict(theirs.state_dict())
    assert {k: v.shape for k, v in mapped.items()} == {
        k: v.shape for k, v in ours.state_dict().items()}
    back = to_timm_state_dict(ours)
    assert {k: v.shape for k, v in back.items()} == {
        k: v.shape for k, v in theirs.state_dict().items()}
    assert theirs.state_dict()["stem.conv1.gain"].shape == (16, 1, 1, 1)
    assert "blocks.11.se.fc1.weight" in mapped  # stages.3.2: 1 + 2 + 6 blocks before it


def test_timm_safetensors_loads_into_ours_and_matches_the_official_function(tmp_path):
    ours, theirs = small_pair()
    path = tmp_path / "model.safetensors"  # what timm pushes to the Hub
    safetensors.torch.save_file({k: v.contiguous() for k, v in theirs.state_dict().items()},
                                path)
    loaded = nfnets.create_model("nfnet_f0", num_classes=10, depths=DEPTHS, widths=WIDTHS,
                                 pretrained=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = loaded(x)
        timm_logits = theirs(x)
    official, _ = reference_forward(loaded, x, "nfnet", "gelu", DEPTHS)
    assert rel_err(logits, official) < 4e-6  # float32 vs the float64 official function
    # timm's model on the same weights differs by its own deviations (erf GELU, WS eps added
    # to the variance): 1.7e-2 relative here on random weights, 4.1e-2 on a random-weight F0
    # (docs/weights.md); test_timm_deviations_are_gelu_and_ws_eps shows there is nothing else.
    deviation = rel_err(timm_logits, official)
    assert 1e-3 < deviation < 0.1


def test_timm_deviations_are_gelu_and_ws_eps():
    """timm with tanh-GELU and the official WS formula gives the official logits: nothing else
    differs."""
    ours, theirs = small_pair()
    import timm.layers.std_conv as std_conv

    def official_ws(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        scale = torch.rsqrt(torch.clamp(var * w[0].numel(), min=1e-4)) * self.gain
        x = std_conv.pad_same(x, self.kernel_size, self.stride, self.dilation) \
            if self.same_pad else x
        return torch.nn.functional.conv2d(x, (w - mean) * scale, self.bias, self.stride,
                                          self.padding, self.dilation, self.groups)

    for m in theirs.modules():
        if isinstance(m, std_conv.ScaledStdConv2dSame):
            m.forward = official_ws.__get__(m)
        if type(m).__name__ == "GammaAct":  # timm's dm_nfnet activations: gamma * GELU
            m.act_fn = lambda x, inplace=False: torch.nn.functional.gelu(x, approximate="tanh")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(theirs(x), ours(x)) < 1e-5


def test_round_trip_is_the_identity(tmp_path):
    ours, _ = small_pair()
    back = from_timm_state_dict(to_timm_state_dict(ours))
    expected = ours.state_dict()
    assert back.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(back[key], value), key
    # and through a timm .pth file read with weights_only=True
    torch.save({"state_dict": to_timm_state_dict(ours)}, tmp_path / "timm.pth")
    for key, value in read_timm_checkpoint(tmp_path / "timm.pth").items():
        assert torch.equal(value, expected[key]), key


def test_other_timm_architectures_and_wrong_variants_are_refused(tmp_path):
    with torch.device("meta"):
        resnet = timm.create_model("nf_resnet50")
    with pytest.raises(CheckpointError, match="not a timm dm_nfnet checkpoint"):
        from_timm_state_dict(resnet.state_dict())
    ours, theirs = small_pair()
    path = tmp_path / "small.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in theirs.state_dict().items()},
                                path)
    with pytest.raises(CheckpointError, match="does not fit nfnet_f0"):
        nfnets.create_model("nfnet_f0", pretrained=path)  # full F0: the file is smaller
    with pytest.raises(UsageError, match="timm counterpart"):
        to_timm_state_dict(nfnets.create_model("nf_regnet_b0", depths=(1, 1, 1, 1)))


def test_hub_names_need_huggingface_hub_and_report_unknown_repos(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(repo_id, filename, **kwargs):
        # what huggingface_hub raises for a repository that does not exist (HTTP 401/404),
        # built without the HTTP response object its constructor wants
        url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(err, f"404 Client Error. Repository Not Found for url: {url}")
        raise err

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    with pytest.raises(CheckpointError, match=r"hf-hub:timm/dm_nfnet_f9.*'timm/dm_nfnet_f9'"):
        nfnets.create_model("nfnet_f0", pretrained="hf-hub:timm/dm_nfnet_f9")


def test_hub_download_maps_onto_ours(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    ours, theirs = small_pair()
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in theirs.state_dict().items()},
                                path)
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    # a Hub checkpoint of another variant than the model: one line naming the mismatched keys
    with pytest.raises(CheckpointError) as info:
        nfnets.create_model("nfnet_f0", pretrained="hf-hub:timm/dm_nfnet_f0.dm_in1k")
    message = str(info.value)
    assert "\n" not in message and "does not fit nfnet_f0" in message
    assert "wrong-shape" in message and "blocks.1.conv0.weight is (128, 256, 1, 1)" in message
    calls.clear()
    model = nfnets.create_model("nfnet_f0", num_classes=10, depths=DEPTHS, widths=WIDTHS,
                                pretrained="hf-hub:timm/dm_nfnet_f0.dm_in1k")
    assert calls == [("timm/dm_nfnet_f0.dm_in1k", "model.safetensors")]
    for key, value in ours.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
