"""Export an nfnets model to ONNX for inference, checked against PyTorch with onnxruntime.

The exported graph is the *fused* model (``NFModel.fuse``): every weight-standardised conv
becomes a plain conv with its standardised weight, gain and folded activation gammas baked in,
so the file holds ordinary Conv/Gelu/... nodes that any ONNX runtime runs at full speed.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from .models import NFModel

__all__ = ["DEFAULT_OPSET", "export_onnx"]

# Opset 17 is the newest one the TorchScript-based exporter and onnxruntime >= 1.16 (the
# `export` extra's floor) both support fully; tanh-GELU is decomposed into basic ops there.
DEFAULT_OPSET = 17


def _image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(n, int) and n > 0 for n in hw):
        raise ValueError(
            f"image_size must be a positive int or (height, width), got {image_size!r}"
        )
    return hw


def _import_onnxruntime():
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "ONNX export needs onnx and onnxruntime: pip install 'nfnets[export]'"
        ) from err
    return onnxruntime


@torch.no_grad()
def export_onnx(
    model: NFModel,
    path: str | Path,
    image_size: int | tuple[int, int],
    opset: int = DEFAULT_OPSET,
    *,
    rtol: float = 1e-4,
) -> float:
    """Export the fused, eval-mode copy of ``model`` to ``path`` and verify it.

    The input is ``image`` of shape (batch, in_chans, height, width) with a dynamic batch axis
    and a fixed spatial size (the 'SAME' paddings depend on it); the output is ``logits``
    (or pooled features when the model has no classifier). ``model`` itself is not changed.

    The file is then run with onnxruntime on a batch of two random images (a different batch
    size from the export's, which checks the dynamic axis) and compared with the *unfused*
    PyTorch model in eval mode.

    Returns:
        The max absolute difference divided by the max absolute PyTorch output.

    Raises:
        TypeError: if ``model`` is not an nfnets model.
        ValueError: on a bad ``image_size`` or ``opset``.
        ImportError: if onnx or onnxruntime is missing.
        RuntimeError: if the ONNX output differs by more than ``rtol`` (relative, as returned).
    """
    if not isinstance(model, NFModel):
        raise TypeError(f"export_onnx needs an nfnets model, got {type(model).__name__}")
    if not isinstance(opset, int) or opset < 13:
        raise ValueError(f"opset must be an int >= 13, got {opset!r}")
    h, w = _image_hw(image_size)
    ort = _import_onnxruntime()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    # Exported and checked in float32 on the CPU, whatever the model's dtype and device.
    reference = copy.deepcopy(model).float().eval().cpu()
    fused = copy.deepcopy(reference).fuse()
    dummy = torch.zeros(1, model.in_chans, h, w)
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated and that the 'SAME' paddings,
        # computed from the input's shape, become constants: both expected here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fused, (dummy,), str(path), dynamo=False, opset_version=opset,
            input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )

    x = torch.randn(2, model.in_chans, h, w, generator=torch.Generator().manual_seed(0))
    expected = reference(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"image": x.numpy()})
    error = float((torch.from_numpy(actual) - expected).abs().max() / expected.abs().max())
    if not error <= rtol:
        raise RuntimeError(
            f"ONNX output of {path} differs from PyTorch by {error:.3g} (relative), more than "
            f"rtol={rtol:g}; try another opset or report a bug"
        )
    return error
