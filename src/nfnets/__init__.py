"""nfnets: Normalizer-Free Networks in PyTorch, exact to DeepMind's official code.

Models (NFNet F0–F7, F0+–F7+, NF-ResNet, NF-RegNet), Adaptive Gradient Clipping and the
paper's training recipe (Brock et al. 2021, arXiv 2102.06171 and 2101.08692).

The names below are the public API. Everything else stays importable from its module
(``nfnets.models``, ``nfnets.agc``, ``nfnets.optim``, ``nfnets.weights``, ``nfnets.data``,
``nfnets.evaluate``, ``nfnets.errors``, ...).
"""

from .agc import AGC, adaptive_clip_grad_
from .counting import count_flops, count_params
from .export import export_onnx
from .inference import optimize_for_inference
from .models import create_model, list_models
from .optim import EMA, param_groups, sgd_agc, warmup_cosine_lr
from .signal import signal_propagation
from .weights import convert_official, load_model, load_pretrained, load_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "EMA",
    "adaptive_clip_grad_",
    "convert_official",
    "count_flops",
    "count_params",
    "create_model",
    "export_onnx",
    "list_models",
    "load_model",
    "load_pretrained",
    "load_weights",
    "optimize_for_inference",
    "param_groups",
    "save_weights",
    "sgd_agc",
    "signal_propagation",
    "warmup_cosine_lr",
]

