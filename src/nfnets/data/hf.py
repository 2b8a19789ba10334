"""Hugging Face ``datasets``: ``--data hf:NAME_OR_PATH``.

NAME_OR_PATH is a folder written by ``Dataset(Dict).save_to_disk``, a folder (or glob) of
parquet files whose names say their split (``train-00000-of-00004.parquet``,
``validation-...``), or a Hub name such as ``imagenet-1k`` (downloaded and cached by
``datasets``, so online the first time). The train split is ``train``, the val split
``validation`` or ``val``. The image column is the one with the ``Image`` feature (or named
image/img/jpg), the label column the ``ClassLabel`` one (or named label/labels/cls); class
names come from the ``ClassLabel``. Images are read as raw bytes (``Image(decode=False)``)
and decoded by this package's transforms, so reduced-size JPEG decoding applies. Rows are
indexed, so ``ResumableSampler`` gives exact order and resuming; the arrow files are
memory-mapped and shared by all workers.
"""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..errors import DataError
from .decode import decode_and_transform
from .folder import check_same_classes
from .samples import Sample, parse_key, read_with_skips, seeded_generator
from .transforms import Transform

_IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")
_LABEL_NAMES = ("label", "labels", "cls", "class")
_VAL_SPLITS = ("validation", "val")


def _parquet_files(spec: str) -> list[str] | None:
    """The parquet files a spec names (a folder of them, a glob, a file), or None for a
    Hub name."""
    path = Path(spec)
    if path.is_dir():
        return sorted(glob.glob(str(path / "**" / "*.parquet"), recursive=True))
    if glob.has_magic(spec) or spec.endswith(".parquet"):
        return sorted(glob.glob(spec))
    return None


def _split_of(file: str) -> str | None:
    name = os.path.basename(file).lower()
    parts = Path(file.lower()).parts
    for split in ("train", *_VAL_SPLITS):
        if name.startswith(split) or f"-{split}-" in name or split in parts[:-1]:
            return "val" if split in _VAL_SPLITS else "train"
    return None


def _load(spec: str):
    try:
        import datasets
    except ImportError as err:
        raise DataError("hf: sources need the datasets package: pip install 'nfnets[data]'"
                        ) from err
    path = Path(spec)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return datasets.load_from_disk(str(path))
    files = _parquet_files(spec)
    if files is None:  # a Hub name: downloaded (or found in the cache) by datasets
        try:
            return datasets.load_dataset(spec)
        except (FileNotFoundError, ConnectionError, ValueError) as err:
            raise DataError(f"hf:{spec}: not a local dataset, and datasets could not load it "
                            f"from the Hub: {str(err).splitlines()[0]}") from None
    if not files:
        raise DataError(f"hf:{spec}: no save_to_disk dataset and no parquet files there")
    by_split: dict[str, list[str]] = {}
    for f in files:
        split = _split_of(f)
        if split is not None:
            by_split.setdefault(split, []).append(f)
    if set(by_split) != {"train", "val"}:
        raise DataError(
            f"hf:{spec}: found parquet files for splits {sorted(by_split) or 'none'}; need "
            "train-*.parquet and validation-*.parquet (or val-*)"
        )
    return datasets.load_dataset(
        "parquet", data_files={"train": by_split["train"], "validation": by_split["val"]})


def _columns(split, where: str) -> tuple[str, str, list[str] | None]:
    import datasets

    features = split.features
    image = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    image = image or next((c for c in _IMAGE_NAMES if c in features), None)
    label = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    label = label or next((c for c in _LABEL_NAMES if c in features), None)
    if image is None or label is None:
        raise DataError(
            f"{where}: need an image column and a label column; found columns "
            f"{sorted(features)} (image: {image}, label: {label})"
        )
    names = features[label].names if isinstance(features[label], datasets.ClassLabel) else None
    return image, label, names


class HFImageDataset(Dataset):
    """One split of a Hugging Face dataset as ``Sample``s (keys as ``ImageFolderDataset``)."""

    def __init__(self, split, image_column: str, label_column: str, classes: list[str],
                 transform: Transform, name: str = "hf") -> None:
        import datasets

        self.rows = split.select_columns([image_column, label_column]).cast_column(
            image_column, datasets.Image(decode=False))
        self.image_column, self.label_column = image_column, label_column
        self.classes, self.transform, self.name = classes, transform, name

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        index, seed = parse_key(key, len(self))

        def read(i: int):
            row = self.rows[i]
            image, label = row[self.image_column], row[self.label_column]
            if image is None or label is None or not 0 <= int(label) < len(self.classes):
                raise ValueError(f"row {i} has no image or a label outside the classes")
            source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
            return decode_and_transform(source, self.transform, seeded_generator(seed)), int(label)

        image, label, skipped = read_with_skips(
            index, len(self), read, lambda i: f"{self.name} row {i}")
        return Sample(image, label, skipped, seed)


def hf_datasets(
    spec: str, train_transform: Transform, eval_transform: Transform
) -> tuple[HFImageDataset, HFImageDataset]:
    """Train and val datasets of an ``hf:`` spec (without the prefix)."""
    loaded = _load(spec)
    splits = list(loaded) if hasattr(loaded, "keys") else []
    val_name = next((s for s in _VAL_SPLITS if s in splits), None)
    if "train" not in splits or val_name is None:
        raise DataError(f"hf:{spec}: has splits {splits}; need 'train' and 'validation' (or 'val')")
    train, val = loaded["train"], loaded[val_name]
    image, label, names = _columns(train, f"hf:{spec} train")
    v_image, v_label, v_names = _columns(val, f"hf:{spec} {val_name}")
    if names is None:  # plain integer labels: classes 0..max, from both splits
        labels = np.concatenate([np.asarray(train[label]), np.asarray(val[v_label])])
        names = [str(i) for i in range(int(labels.max()) + 1)]
        v_names = names
    check_same_classes(names, v_names, f"hf:{spec}")
    return (HFImageDataset(train, image, label, names, train_transform, f"hf:{spec} train"),
            HFImageDataset(val, v_image, v_label, v_names, eval_transform,
                           f"hf:{spec} {val_name}"))
