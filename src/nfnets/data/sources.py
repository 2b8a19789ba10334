"""``--data`` text to datasets: a folder, ``wds:SPEC``, ``hf:NAME_OR_PATH``."""

from __future__ import annotations

from torch.utils.data import Dataset

from ..errors import DataError
from .folder import imagenet_datasets
from .transforms import EvalTransform, FastTrainTransform, TrainTransform


def open_datasets(
    spec: str,
    train_size: int,
    eval_size: int,
    eval_mode: str = "resize_crop_32",
    *,
    exact: bool = False,
) -> tuple[Dataset, Dataset]:
    """Train and val datasets of ``spec`` with the official transforms.

    ``spec`` is an ImageNet-style folder, ``wds:SPEC`` (WebDataset shards, see
    ``nfnets.data.shards``) or ``hf:NAME_OR_PATH`` (Hugging Face datasets, see
    ``nfnets.data.hf``). ``exact`` picks the float ``TrainTransform`` over the fast uint8 one.
    Both datasets have ``classes``; problems raise ``DataError``.
    """
    train_transform = TrainTransform(train_size) if exact else FastTrainTransform(train_size)
    eval_transform = EvalTransform(eval_size, eval_mode)
    if spec.startswith("wds:"):
        try:
            from .shards import shard_datasets
        except ImportError as err:
            raise DataError(f"wds: sources need webdataset ({err}): pip install 'nfnets[data]'"
                            ) from None

        return shard_datasets(spec[4:], train_transform, eval_transform)
    if spec.startswith("hf:"):
        from .hf import hf_datasets

        return hf_datasets(spec[3:], train_transform, eval_transform)
    return imagenet_datasets(spec, train_size, eval_size, eval_mode, exact=exact)
