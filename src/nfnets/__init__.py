"""nfnets: Normalizer-Free Networks in PyTorch, exact to DeepMind's official code.

Models (NFNet F0–F7, F0+–F7+, NF-ResNet, NF-RegNet), Adaptive Gradient Clipping and the
paper's training recipe (Brock et al. 2021, arXiv 2102.06171 and 2101.08692).
"""

from .agc import AGC, ClipStats, adaptive_clip_grad_
from .counting import count_flops, count_params
from .export import export_onnx
from .models import create_model, list_models, model_defaults, signal_metrics
from .optim import (
    EMA,
    optimizer_step,
    param_groups,
    peak_lr,
    sgd_agc,
    warmup_cosine,
    warmup_cosine_lr,
)
from .signal import batchnorm_counterpart, signal_propagation
from .weights import convert_official, load_pretrained, load_weights, save_weights
from .winograd import set_winograd, use_winograd

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "EMA",
    "ClipStats",
    "adaptive_clip_grad_",
    "batchnorm_counterpart",
    "convert_official",
    "count_flops",
    "count_params",
    "create_model",
    "export_onnx",
    "list_models",
    "load_pretrained",
    "load_weights",
    "model_defaults",
    "optimizer_step",
    "param_groups",
    "peak_lr",
    "save_weights",
    "set_winograd",
    "sgd_agc",
    "signal_metrics",
    "signal_propagation",
    "use_winograd",
    "warmup_cosine",
    "warmup_cosine_lr",
]
