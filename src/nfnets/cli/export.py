"""``nfnets export``: a fused model to ONNX, checked against PyTorch."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from ..errors import UsageError
from ..models import create_model, list_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nfnets export``."""
    parser.add_argument("source", help="model name, weights file or run directory")
    parser.add_argument("-o", "--output", required=True, help="ONNX file to write")
    parser.add_argument("--model", help="model name when SOURCE is an official .npz")
    parser.add_argument("--ema", action="store_true", help="export a run's EMA weights")
    parser.add_argument("--image-size", type=int, help="example input size (default: test size)")
    parser.add_argument("--num-classes", type=int, default=1000,
                        help="classes when SOURCE is a model name (random weights)")


def run(args: argparse.Namespace) -> int:
    """Fuse WS into plain convs and export to ONNX, checked against PyTorch."""
    from ..export import export_onnx

    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:  # before loading anything: one line, not a traceback around the ImportError
        raise UsageError(f"nfnets export needs {' and '.join(missing)}: pip install "
                         "'nfnets[export]'")
    source = Path(args.source)
    if source.exists():
        from ..weights import load_model

        model, info = load_model(source, model_name=args.model, ema=args.ema)
        size = args.image_size or info["test_size"]
    elif args.source in list_models() or not source.suffix:
        model = create_model(args.source, num_classes=args.num_classes).eval()
        size = args.image_size or model.default_cfg["test_size"]
    else:
        raise FileNotFoundError(f"no such file or run directory: {source}")
    if size < 1:
        raise UsageError("--image-size must be positive")
    error = export_onnx(model, args.output, size)
    print(f"nfnets export: wrote {args.output} ({model.model_name} at {size} px; onnxruntime "
          f"matches PyTorch to {error:.1e} relative)")
    return 0
