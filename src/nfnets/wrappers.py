"""The model inside the wrappers that training and deployment put around it.

``torch.compile`` returns an ``OptimizedModule`` holding the model as ``_orig_mod``;
``DataParallel`` and ``DistributedDataParallel`` hold it as ``module``. Code that needs the
model's own attributes (``model_name``, ``get_classifier``, its state dict keys without
prefixes) looks through them with ``unwrap``. Kept in its own module so that ``weights`` and
``optim`` can both import it without importing each other.
"""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside any nesting of torch.compile / DataParallel / DDP wrappers."""
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model
