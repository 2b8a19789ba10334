"""Write any source as WebDataset shards (what ``nfnets prepare`` runs).

Each split becomes ``OUT/{split}-{i:06d}.tar`` with ``shard_size`` samples per shard (the last
one fewer). A sample is ``KEY.<ext>`` (the original image bytes, or a re-encoded JPEG with
``max_size``), ``KEY.cls`` (the class index as text) and ``KEY.json`` (``label``,
``class_name``, ``source``). Indexable sources (folders, Hugging Face) are written in a seeded
random order so every shard mixes classes, as streaming needs; shards are read in their order.
``OUT/_info.json`` lists, per split, the shard file names and lengths (timm's format) and the
class names, which ``wds:OUT`` reads.

Resumable: the plan (source, seed, shard size, resize) is saved first; each shard is written to
a temporary file and renamed when complete, then read back and checked (sample count, image
and label present). A rerun with the same plan keeps the shards that read back complete.

``max_size`` resizes images whose shorter side exceeds it to that shorter side (bicubic,
antialiased, JPEG quality ``quality``). Effect on the official pipeline: the random crop keeps
its geometry as a fraction of the image, and each crop is resampled from fewer source pixels;
a crop whose shorter side stays at least the train size after the reduction loses nothing but
the re-encoding, so ``max_size >= 2 x`` the largest train size (e.g. 512 for F0's 192 and
eval's 256 + 32) changes few pixels, while the eval squash to S + 32 is unaffected as long as
``max_size >= S + 32``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..files import atomic_write
from .shards import IMAGE_KEYS, INFO_FILE, iter_shard

PLAN_FILE = ".nfnets-prepare.json"
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _source_items(dataset, seed: int) -> tuple[int, Iterator[tuple[bytes, int, str]]]:
    """(count, iterator of (image bytes, label, description)) of a dataset of this package."""
    from .folder import ImageFolderDataset
    from .hf import HFImageDataset
    from .shards import ShardDataset, _label

    if isinstance(dataset, ShardDataset):
        def stream():
            for url in dataset.split.urls:
                for sample in iter_shard(url):
                    key = next((k for k in IMAGE_KEYS if k in sample), None)
                    label = _label(sample) if key is not None else None
                    yield (sample[key] if key else None), label, f"{url}:{sample['__key__']}"

        return dataset.num_samples, stream()
    order = np.random.default_rng(seed).permutation(len(dataset))
    if isinstance(dataset, ImageFolderDataset):
        def folder():
            for i in order.tolist():
                path = dataset.path(i)
                yield path.read_bytes(), int(dataset._labels[i]), str(path)

        return len(dataset), folder()
    if isinstance(dataset, HFImageDataset):
        def rows():
            for i in order.tolist():
                row = dataset.rows[int(i)]
                image = row[dataset.image_column]
                data = image.get("bytes") or Path(image["path"]).read_bytes()
                yield data, int(row[dataset.label_column]), f"{dataset.name} row {i}"

        return len(dataset), rows()
    raise DataError(f"cannot write {type(dataset).__name__} as shards")


def _encode(data: bytes, max_size: int | None, quality: int) -> tuple[bytes, str]:
    """The bytes to store and their extension; re-encoded only when resizing."""
    with Image.open(io.BytesIO(data)) as img:
        ext = _EXTENSIONS.get(img.format or "", None)
        if max_size is None or min(img.size) <= max_size:
            if ext is None:  # a format shards readers do not know: store as PNG
                out = io.BytesIO()
                img.convert("RGB").save(out, format="PNG")
                return out.getvalue(), "png"
            return data, ext
        scale = max_size / min(img.size)
        size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
        rgb = img.convert("RGB").resize(size, Image.BICUBIC)
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=quality)
        return out.getvalue(), "jpg"


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o444
    tar.addfile(info, io.BytesIO(payload))


def _shard_complete(path: Path, expected: int) -> bool:
    if not path.exists():
        return False
    count = 0
    for sample in iter_shard(str(path)):
        if "cls" not in sample or not any(k in sample for k in IMAGE_KEYS):
            return False
        count += 1
    return count == expected


def write_shards(
    spec: str,
    out: str | os.PathLike,
    *,
    shard_size: int = 1000,
    max_size: int | None = None,
    quality: int = 90,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write the train and val splits of ``spec`` (any ``--data`` text) as shards in ``out``.

    Returns the ``_info.json`` contents, plus ``skipped``: samples left out because they had
    no image or label, or (with ``max_size``) did not decode.
    """
    from .sources import open_datasets

    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    if max_size is not None and max_size < 1:
        raise DataError(f"--max-size must be >= 1, got {max_size}")
    train, val = open_datasets(spec, 8, 8)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"source": spec, "seed": seed, "shard_size": shard_size, "max_size": max_size,
            "quality": quality, "classes": list(train.classes)}
    plan_path = out / PLAN_FILE
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        if previous != plan:
            changed = sorted(k for k in plan if previous.get(k) != plan[k])
            raise DataError(f"{out} holds shards of another plan (differs in {changed}); "
                            "use an empty folder or the same options")
    elif any(out.glob("*.tar")):
        raise DataError(f"{out} already holds .tar files not written by nfnets prepare")
    atomic_write(plan_path, lambda tmp: Path(tmp).write_text(json.dumps(plan)))
    info = {"name": os.path.basename(os.path.abspath(spec.split(":", 1)[-1])) or "nfnets",
            "classes": list(train.classes), "splits": {}, "skipped": 0}
    for split, dataset in (("train", train), ("val", val)):
        info["splits"][split] = _write_split(dataset, split, out, plan, progress, info)
        atomic_write(out / INFO_FILE, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
    return info


def _write_split(dataset, split: str, out: Path, plan: dict, progress: bool, info: dict) -> dict:
    count, items = _source_items(dataset, plan["seed"])
    shard_size = plan["shard_size"]
    classes = plan["classes"]
    bar = _progress_bar(count, f"{split} shards", progress)
    filenames, lengths = [], []
    index, shard = 0, 0
    done = False
    while not done:
        name = f"{split}-{shard:06d}.tar"
        batch = []
        while len(batch) < shard_size:
            item = next(items, None)
            if item is None:
                done = True
                break
            batch.append(item)
        if not batch:
            break
        path = out / name
        expected = len(batch)
        if _shard_complete(path, expected):  # written by an earlier run of the same plan
            bar.update(len(batch))
        else:
            written = _write_shard(path, batch, split, index, classes, plan, info)
            if not _shard_complete(path, written):
                raise DataError(f"{path} did not read back complete; disk full or failing?")
            expected = written
            bar.update(len(batch))
        filenames.append(name)
        lengths.append(expected)
        index += len(batch)
        shard += 1
    bar.close()
    return {"name": split, "num_samples": sum(lengths), "filenames": filenames,
            "shard_lengths": lengths}


def _write_shard(path: Path, batch, split: str, start: int, classes, plan: dict,
                 info: dict) -> int:
    written = 0

    def write(tmp: str) -> None:
        nonlocal written
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for offset, (data, label, source) in enumerate(batch):
                if data is None or label is None or not 0 <= label < len(classes):
                    info["skipped"] += 1
                    continue
                try:
                    payload, ext = _encode(data, plan["max_size"], plan["quality"])
                except Exception:  # an unreadable image cannot be resized: leave it out
                    info["skipped"] += 1
                    continue
                key = f"{split}_{start + offset:09d}"
                meta = {"label": label, "class_name": classes[label], "source": source}
                _add(tar, f"{key}.{ext}", payload)
                _add(tar, f"{key}.cls", str(label).encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                written += 1

    atomic_write(path, write)
    return written


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="img", mininterval=1.0, smoothing=0.05)
