"""ImageNet-style folder trees: ``root/{train,val}/<class>/<image>``.

Class folders are searched recursively; directory symlinks are followed at most once per real
directory (a link back up the tree or a second link to the same folder is not walked again), and
what the scan passes over (hidden entries, files that are not images, folders already seen) is
reported in one ``IgnoredFilesWarning``.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..errors import DataError
from .decode import IMAGE_EXTENSIONS, decode_and_transform
from .samples import Sample, name_list, parse_key, read_with_skips, seeded_generator
from .transforms import EvalTransform, FastTrainTransform, TrainTransform, Transform


class IgnoredFilesWarning(UserWarning):
    """A data scan passed over entries (hidden, not images, folders already walked)."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _layout(root: Path) -> str:
    return f"expected an ImageNet-style tree {root}/train/<class>/<image> and {root}/val/<class>/"


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; {_layout(root)}")
    if not root.is_dir():
        raise DataError(f"data folder {root} is a file, not a folder; {_layout(root)}")
    if not any(root.iterdir()):
        raise DataError(f"data folder {root} is empty; {_layout(root)}")


def _list_images(class_dir: Path, seen: set[str], ignored: Counter) -> list[str]:
    """Image paths under class_dir, relative to its parent, in os.walk's top-down sorted order.

    Directory symlinks are followed, but each real directory is walked once per split:
    ``seen`` holds the real paths walked so far and, from the start, every class folder's, so
    a link that loops back, repeats a folder or points into another class adds nothing (its
    images keep their own class's label).
    """
    found: list[str] = []
    stack = [(str(class_dir), class_dir.name)]
    while stack:
        path, rel = stack.pop()
        real = os.path.realpath(path)
        if real in seen and path != str(class_dir):
            ignored["folders already walked (symlinks)"] += 1
            continue
        seen.add(real)
        subdirs = []
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.name.startswith("."):
                ignored["hidden entries"] += 1
            elif entry.is_dir():
                subdirs.append((entry.path, os.path.join(rel, entry.name)))
            elif entry.is_file() and _is_image(entry.name):
                found.append(os.path.join(rel, entry.name))
            else:
                ignored["non-image files"] += 1
        stack.extend(reversed(subdirs))
    return found


def _scan_split(root: Path, split: str) -> tuple[list[str], list[str], list[int], Counter]:
    """Classes (sorted folder names), image paths relative to root/split, labels, and counts
    of what was ignored."""
    split_dir = root / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        raise DataError(
            f"data folder {root} has no '{split}' folder (it holds: {name_list(present)}); "
            f"{_layout(root)}"
        )
    entries = sorted(
        (e for e in os.scandir(split_dir) if not e.name.startswith(".")), key=lambda e: e.name
    )
    classes = [e.name for e in entries if e.is_dir()]
    if not classes:
        if any(e.is_file() and _is_image(e.name) for e in entries):
            raise DataError(
                f"{split_dir} holds images directly but no class folders; move each image into "
                f"{split_dir}/<class>/ (ImageNet's val images must be sorted into the same "
                "synset folders as train)"
            )
        raise DataError(f"{split_dir} contains no class folders; {_layout(root)}")
    files: list[str] = []
    labels: list[int] = []
    empty = []
    seen = {os.path.realpath(split_dir / name) for name in classes}
    ignored: Counter = Counter()
    for label, name in enumerate(classes):
        found = _list_images(split_dir / name, seen, ignored)
        if not found:
            empty.append(name)
        files += found
        labels += [label] * len(found)
    if empty:
        raise DataError(
            f"class folder(s) with no images in {split_dir}: {name_list(empty)} (images are "
            f"files ending in {', '.join(IMAGE_EXTENSIONS)}; a folder linked twice is walked "
            "once); add images or remove the folder(s)"
        )
    return classes, files, labels, ignored


class ImageFolderDataset(Dataset):
    """Images of ``root/split/<class>/...``; classes are the sorted folder names.

    Items are ``Sample``s: the image passed through ``transform(image, generator)`` (a decoded
    uint8 tensor, or the undecoded file for a transform that ``decodes_itself``). Keys are an
    index or an (index, seed) pair from ``ResumableSampler``; the seed makes the random
    transform reproducible. An unreadable or truncated image is replaced by the next readable
    one (warning with its path; ``Sample.skipped`` counts the images passed over).
    ``ignored`` counts what the scan passed over.
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Transform) -> None:
        self.root = Path(root)
        _check_root(self.root)
        self.split_dir = self.root / split
        self._split_str = str(self.split_dir)
        self.classes, files, labels, self.ignored = _scan_split(self.root, split)
        if self.ignored:
            counts = ", ".join(f"{n} {what}" for what, n in sorted(self.ignored.items()))
            warnings.warn(
                f"{self.split_dir}: {len(files)} images in {len(self.classes)} classes; "
                f"ignored {counts}",
                IgnoredFilesWarning,
                stacklevel=2,
            )
        # numpy arrays rather than Python lists: workers share them without copy-on-access
        # (reading a list item touches its refcount, which copies the page in every worker)
        self._files = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)
        self._labels = np.array(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self._files)

    def path(self, index: int) -> Path:
        """Full path of image ``index``."""
        return self.split_dir / os.fsdecode(self._files[index])

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        index, seed = parse_key(key, len(self))

        def read(i: int):
            # a str path: cheaper per read than parsing a Path
            path = os.path.join(self._split_str, os.fsdecode(self._files[i]))
            image = decode_and_transform(path, self.transform, seeded_generator(seed))
            return image, int(self._labels[i])

        image, label, skipped = read_with_skips(index, len(self), read, lambda i: str(self.path(i)))
        return Sample(image, label, skipped, seed)


def check_same_classes(train_classes, val_classes, where: str) -> None:
    """Raise DataError naming the differences when the splits' class lists differ."""
    if list(train_classes) == list(val_classes):
        return
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    raise DataError(
        f"val classes differ from train classes in {where}: only in train: "
        f"[{name_list(only_train)}]; only in val: [{name_list(only_val)}]"
        + ("" if only_train or only_val else " (same names in a different order)")
        + ". Both splits need the same classes (a label is a class's position)"
    )


def imagenet_datasets(
    root: str | os.PathLike,
    train_size: int,
    eval_size: int,
    eval_mode: str = "resize_crop_32",
    *,
    exact: bool = False,
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Train and val datasets of an ImageNet-style tree, with the official transforms.

    ``exact`` selects ``TrainTransform`` (float32, today's pixels) over
    ``FastTrainTransform`` (uint8, reduced-size decoding). Raises ``DataError`` when the tree
    is missing, empty, lacks a split, has a class folder without images, or when val's classes
    differ from train's.
    """
    train_transform = TrainTransform(train_size) if exact else FastTrainTransform(train_size)
    train = ImageFolderDataset(root, "train", train_transform)
    val = ImageFolderDataset(root, "val", EvalTransform(eval_size, eval_mode))
    check_same_classes(train.classes, val.classes, str(root))
    return train, val
