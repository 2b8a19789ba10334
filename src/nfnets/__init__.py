"""nfnets: Normalizer-Free Networks in PyTorch, exact to DeepMind's official code.

Models (NFNet F0–F7, F0+–F7+, NF-ResNet, NF-RegNet), Adaptive Gradient Clipping and the
paper's training recipe (Brock et al. 2021, arXiv 2102.06171 and 2101.08692).
"""

from .counting import count_flops, count_params
from .models import create_model, list_models, model_defaults, signal_metrics

__version__ = "0.1.0"

__all__ = [
    "count_flops",
    "count_params",
    "create_model",
    "list_models",
    "model_defaults",
    "signal_metrics",
]
