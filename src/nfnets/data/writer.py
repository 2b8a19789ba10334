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
import itertools
import json
import multiprocessing
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


def _read_item(dataset, index: int) -> tuple[bytes | None, int | None, str]:
    """(image bytes, label, description) of item ``index`` of an indexable dataset."""
    from .folder import ImageFolderDataset
    from .hf import HFImageDataset

    if isinstance(dataset, ImageFolderDataset):
        path = dataset.path(index)
        return path.read_bytes(), int(dataset._labels[index]), str(path)
    if isinstance(dataset, HFImageDataset):
        row = dataset.rows[int(index)]
        image = row[dataset.image_column]
        if image is None:
            return None, None, f"{dataset.name} row {index}"
        data = image.get("bytes") or Path(image["path"]).read_bytes()
        label = row[dataset.label_column]
        return data, None if label is None else int(label), f"{dataset.name} row {index}"
    raise DataError(f"cannot write {type(dataset).__name__} as shards")


def _stream_items(dataset) -> Iterator[tuple[bytes | None, int | None, str]]:
    """(image bytes, label, description) of a ``ShardDataset``'s samples, in shard order."""
    from .shards import _label

    for url in dataset.split.urls:
        for sample in iter_shard(url):
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            try:
                label = _label(sample)
            except ValueError:
                label = None
            yield (sample[key] if key else None), label, f"{url}:{sample['__key__']}"


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


def _complete_count(path: Path, expected: int) -> int | None:
    """Samples in a shard written by an earlier run, or None when it must be (re)written.

    Present means complete (shards are renamed into place only when written); it must also
    read back with an image and a label in every sample, and at most ``expected`` samples
    (fewer when some were skipped).
    """
    if not path.exists():
        return None
    count = 0
    try:
        for sample in iter_shard(str(path)):
            if "cls" not in sample or not any(k in sample for k in IMAGE_KEYS):
                return None
            count += 1
    except Exception:
        return None
    return count if 0 < count <= expected else None


def write_shards(
    spec: str,
    out: str | os.PathLike,
    *,
    shard_size: int = 1000,
    max_size: int | None = None,
    quality: int = 90,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write the train and val splits of ``spec`` (any ``--data`` text) as shards in ``out``.

    ``workers`` processes write shards of indexable sources in parallel (streamed shards are
    read in order by one). Returns the ``_info.json`` contents, plus ``skipped``: samples left
    out because they had no image or label, or (with ``max_size``) did not decode.
    """
    from .sources import open_datasets

    if shard_size < 1 or workers < 1:
        raise DataError(f"--shard-size and --workers must be >= 1, got {shard_size}, {workers}")
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
        entry, skipped = _write_split(dataset, split, out, plan, workers, progress)
        info["splits"][split] = entry
        info["skipped"] += skipped
        atomic_write(out / INFO_FILE, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
    return info


def _chunks(dataset, plan: dict) -> Iterator[tuple[int, list]]:
    """(first sample number, items or indices) per shard, in shard order."""
    from .shards import ShardDataset

    size = plan["shard_size"]
    if isinstance(dataset, ShardDataset):  # a stream: items, read in order
        items = _stream_items(dataset)
        start = 0
        while chunk := list(itertools.islice(items, size)):
            yield start, chunk
            start += len(chunk)
        return
    order = np.random.default_rng(plan["seed"]).permutation(len(dataset)).tolist()
    for start in range(0, len(order), size):
        yield start, order[start : start + size]


_TASK: dict = {}  # the dataset and plan of the writing processes (set before they start)


def _set_task(dataset, split: str, out: Path, plan: dict) -> None:
    _TASK.update(dataset=dataset, split=split, out=out, plan=plan)


def _shard_task(job: tuple[int, int, list]) -> tuple[str, int, int]:
    """Write (or keep) one shard: (file name, samples in it, samples skipped)."""
    number, start, chunk = job
    split, out, plan = _TASK["split"], _TASK["out"], _TASK["plan"]
    name = f"{split}-{number:06d}.tar"
    path = out / name
    kept = _complete_count(path, len(chunk))
    if kept is not None:
        return name, kept, len(chunk) - kept
    items = [c if isinstance(c, tuple) else _read_item(_TASK["dataset"], c) for c in chunk]
    written, skipped = _write_shard(path, items, split, start, plan)
    if written and _complete_count(path, written) != written:
        raise DataError(f"{path} did not read back complete; disk full or failing?")
    return name, written, skipped


def _write_split(dataset, split: str, out: Path, plan: dict, workers: int,
                 progress: bool) -> tuple[dict, int]:
    from .shards import ShardDataset

    total = dataset.num_samples if isinstance(dataset, ShardDataset) else len(dataset)
    bar = _progress_bar(total, f"{split} shards", progress)
    jobs = ((number, start, chunk) for number, (start, chunk) in enumerate(_chunks(dataset, plan)))
    _set_task(dataset, split, out, plan)
    filenames, lengths, skipped = [], [], 0
    if workers > 1 and not isinstance(dataset, ShardDataset):
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        pool = context.Pool(workers, initializer=_set_task, initargs=(dataset, split, out, plan))
        results = pool.imap(_shard_task, jobs)
    else:
        pool, results = None, map(_shard_task, jobs)
    try:
        for name, written, lost in results:
            if written:
                filenames.append(name)
                lengths.append(written)
            skipped += lost
            bar.update(written + lost)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        bar.close()
    entry = {"name": split, "num_samples": sum(lengths), "filenames": filenames,
             "shard_lengths": lengths}
    return entry, skipped


def _write_shard(path: Path, items, split: str, start: int, plan: dict) -> tuple[int, int]:
    """Write items to ``path`` atomically; (samples written, samples skipped)."""
    classes = plan["classes"]
    counts = [0, 0]

    def write(tmp: str) -> None:
        counts[:] = [0, 0]
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for offset, (data, label, source) in enumerate(items):
                if data is None or label is None or not 0 <= label < len(classes):
                    counts[1] += 1
                    continue
                try:
                    payload, ext = _encode(data, plan["max_size"], plan["quality"])
                except Exception:  # an unreadable image cannot be resized: leave it out
                    counts[1] += 1
                    continue
                key = f"{split}_{start + offset:09d}"
                meta = {"label": label, "class_name": classes[label], "source": source}
                _add(tar, f"{key}.{ext}", payload)
                _add(tar, f"{key}.cls", str(label).encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
                counts[0] += 1

    if len(items) and all(item[0] is None for item in items):
        return 0, len(items)
    atomic_write(path, write)
    return counts[0], counts[1]


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
