"""ONNX export: the fused model, checked against PyTorch with onnxruntime, dynamic batch."""

import pytest
import torch

import nfnets
from nfnets.export import export_onnx
from nfnets.layers import WSConv2d

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TINY = dict(widths=(32, 64, 96, 96), depths=(1, 2, 2, 1), group_width=16)


def tiny() -> nfnets.models.NFModel:
    torch.manual_seed(0)
    model = nfnets.create_model("nfnet_f0", num_classes=5, **TINY)
    with torch.no_grad():  # non-zero skip gains: the residual branches must be exported right
        for name, p in model.named_parameters():
            if name.endswith("gain"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("size", [33, 64])  # odd: symmetric SAME pads; even: explicit Pad
def test_export_matches_pytorch_with_a_dynamic_batch(tmp_path, size):
    model = tiny().train()
    path = tmp_path / "model.onnx"
    error = export_onnx(model, path, size)
    assert 0 <= error < 1e-4

    graph = onnx.load(str(path)).graph
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"
    ops = {node.op_type for node in graph.node}
    assert "Conv" in ops and ("Pad" in ops) == (size % 2 == 0)

    # a third batch size, against the exact (unfused) model
    x = torch.randn(3, 3, size, size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x)
    assert logits.shape == (3, 5)
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-5)


def test_export_leaves_the_model_untouched(tmp_path):
    model = tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "m.onnx", (32, 40))
    assert model.training
    assert any(isinstance(m, WSConv2d) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_export_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="needs an nfnets model"):
        export_onnx(torch.nn.Conv2d(3, 3, 1), tmp_path / "m.onnx", 32)
    with pytest.raises(ValueError, match="image_size"):
        export_onnx(tiny(), tmp_path / "m.onnx", (32, 0))
    with pytest.raises(ValueError, match="opset"):
        export_onnx(tiny(), tmp_path / "m.onnx", 32, opset=9)
