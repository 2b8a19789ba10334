"""WebDataset tar shards, streamed: ``--data wds:SPEC``.

A shard is a tar file whose members are grouped into samples by name: ``KEY.jpg`` (or .jpeg,
.png, .webp) holds the image, ``KEY.cls`` the class index as text, ``KEY.json`` optionally
``{"label": ..., "class_name": ...}``. SPEC is one of

- a folder or URL prefix holding ``_info.json`` (``nfnets prepare`` writes one; timm's
  ``wds/`` datasets such as ``timm/imagenet-1k-wds`` ship one): its ``splits`` give each
  split's ``filenames`` and ``shard_lengths``, and ``classes`` the class names;
- ``TRAIN_PATTERN|VAL_PATTERN``: two shard lists, each with brace ranges
  (``imagenet1k-train-{0000..1023}.tar``) or shell wildcards (local files); sample counts and
  class names come from an ``_info.json`` beside the shards, or from reading the tar headers
  (local files only).

Shards are read with ``webdataset``'s tar iterator, one sample at a time: nothing loads a
whole file.

Order and resuming. Each epoch, the shard list is shuffled with (seed, epoch); reader r of the
``world_size x num_workers`` readers (rank-major) takes shards r, r + readers, ...: the ranks'
and workers' shares are disjoint. A reader shuffles its samples through a seeded buffer, and
gives each sample a seed from (seed, epoch, reader, position), so batches are reproducible.
Every rank yields the same number of batches, ``(samples // world_size) // batch``; a reader
whose shards run out first starts them again in a new order. **Guarantee:** a run resumed
mid-epoch with the same number of ranks and ``num_workers`` sees exactly the batches it would
have seen, provided no sample of the consumed part was unreadable: each reader reads past
(without decoding) as many samples as its consumed batches held. With a different number of
readers the resumed epoch reads a different shard split (whole epochs stay exact).

Bad data: a sample without an image or label, an image that does not decode, or the samples a
truncated shard lost (known from its length) are skipped and counted like unreadable images.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError
from .decode import decode_and_transform
from .samples import MAX_CONSECUTIVE_SKIPS, Sample, SkippedImageWarning, seeded_generator
from .transforms import Transform

INFO_FILE = "_info.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 256  # samples held (undecoded) per reader for the in-shard shuffle
HTTP_TIMEOUT_S = 120  # a stalled server fails the shard (counted as lost) instead of hanging
_VAL_SPLITS = ("val", "validation")


@dataclass(frozen=True)
class ShardSplit:
    """One split's shards (paths or URLs, in order) and their sample counts."""

    urls: tuple[str, ...]
    lengths: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        """Samples in the split."""
        return sum(self.lengths)


def _is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def expand_pattern(pattern: str) -> list[str]:
    """Brace-expand a shard pattern; local entries may also be shell wildcards.

    Raises DataError when local entries match no files.
    """
    urls: list[str] = []
    for item in braceexpand(pattern):
        if _is_url(item):
            urls.append(item)
        elif glob.has_magic(item):
            urls += sorted(glob.glob(item))
        elif os.path.isfile(item):
            urls.append(item)
    if not urls:
        raise DataError(f"shard pattern {pattern!r} matched no files")
    return urls


def open_stream(url: str):
    """A binary stream of a local file, an http(s) URL, or anything webdataset opens."""
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)  # streamed, never read whole
    if _is_url(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


def _read_info(location: str) -> dict | None:
    url = location.rstrip("/") + "/" + INFO_FILE
    try:
        with open_stream(url) as f:
            return json.loads(f.read(16 << 20))  # an info file is small; never read more
    except (OSError, ValueError):
        return None


def _member_key(name: str) -> tuple[str, str]:
    """'dir/n0001.cls' -> ('dir/n0001', 'cls'), as webdataset's base_plus_ext."""
    base = os.path.basename(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return os.path.join(os.path.dirname(name), stem), ext.lower()


def scan_shard(path: str) -> tuple[int, dict[int, str]]:
    """Count a local shard's samples and collect its labels (and class names, when its
    ``.json`` members carry them) from the tar headers and the small members."""
    keys: set[str] = set()
    names: dict[int, str] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = _member_key(member.name)
            keys.add(key)
            if ext == "cls":
                label = int(tar.extractfile(member).read(64))
                names.setdefault(label, str(label))
            elif ext == "json" and member.size < 65536:
                meta = json.loads(tar.extractfile(member).read())
                if "label" in meta and "class_name" in meta:
                    names[int(meta["label"])] = str(meta["class_name"])
    return len(keys), names


def _split_from_info(info: dict, base: str, split: str) -> ShardSplit:
    entry = info["splits"][split]
    urls = tuple(base.rstrip("/") + "/" + f for f in entry["filenames"])
    return ShardSplit(urls, tuple(int(n) for n in entry["shard_lengths"]))


def _scan_split(urls: list[str], what: str) -> tuple[ShardSplit, dict[int, str]]:
    remote = [u for u in urls if _is_url(u)]
    if remote:
        raise DataError(
            f"{what}: sample counts of remote shards ({remote[0]} ...) are unknown; put an "
            f"{INFO_FILE} beside them (nfnets prepare writes one) or copy them locally"
        )
    lengths, names = [], {}
    for url in urls:
        count, found = scan_shard(url)
        lengths.append(count)
        names.update(found)
    return ShardSplit(tuple(urls), tuple(lengths)), names


def _classes(info: dict | None, scanned: dict[int, str], where: str) -> list[str]:
    if info and "classes" in info:
        return [str(c) for c in info["classes"]]
    if info and "num_classes" in info:
        return [str(i) for i in range(int(info["num_classes"]))]
    if not scanned:
        raise DataError(f"{where}: no class list ({INFO_FILE} 'classes') and no .cls labels")
    count = max(scanned) + 1
    return [scanned.get(i, str(i)) for i in range(count)]


def shard_splits(spec: str) -> tuple[ShardSplit, ShardSplit, list[str]]:
    """Train split, val split and class names of a ``wds:`` spec (without the prefix)."""
    if "|" in spec:
        train_pattern, val_pattern = spec.split("|", 1)
        train_urls, val_urls = expand_pattern(train_pattern), expand_pattern(val_pattern)
        info = _read_info(os.path.dirname(train_urls[0]))
        if info and "splits" in info:
            lengths = {}
            for entry in info["splits"].values():
                lengths.update(zip(entry["filenames"], entry["shard_lengths"], strict=True))
            try:
                train = ShardSplit(tuple(train_urls), tuple(
                    lengths[os.path.basename(u)] for u in train_urls))
                val = ShardSplit(tuple(val_urls), tuple(
                    lengths[os.path.basename(u)] for u in val_urls))
                return train, val, _classes(info, {}, spec)
            except KeyError:
                pass  # shards the info does not list: count them
        train, train_names = _scan_split(train_urls, spec)
        val, val_names = _scan_split(val_urls, spec)
        if set(train_names) != set(val_names):
            only_train = sorted(set(train_names) - set(val_names))
            only_val = sorted(set(val_names) - set(train_names))
            raise DataError(
                f"train and val shards of {spec} have different class sets: labels only in "
                f"train: {only_train[:10]}; only in val: {only_val[:10]}"
            )
        return train, val, _classes(info, {**val_names, **train_names}, spec)
    info = _read_info(spec)
    if info is None or "splits" not in info:
        raise DataError(
            f"wds:{spec}: no {INFO_FILE} with 'splits' there; give a folder written by nfnets "
            "prepare (or one with timm's _info.json), or 'wds:TRAIN_PATTERN|VAL_PATTERN'"
        )
    splits = info["splits"]
    val_name = next((s for s in _VAL_SPLITS if s in splits), None)
    if "train" not in splits or val_name is None:
        raise DataError(
            f"wds:{spec}: {INFO_FILE} has splits {sorted(splits)}; need 'train' and 'val' "
            "(or 'validation')"
        )
    train = _split_from_info(info, spec, "train")
    val = _split_from_info(info, spec, val_name)
    if "classes" in info or "num_classes" in info:
        return train, val, _classes(info, {}, spec)
    _, val_names = _scan_split(list(val.urls), spec)
    return train, val, _classes(None, val_names, spec)


def iter_shard(url: str) -> Iterator[dict]:
    """Samples of one shard as dicts {'__key__': ..., ext: bytes}, streamed. A read error
    (e.g. a truncated file) ends the shard with a warning; the caller counts what was lost."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def members(stream):
        for item in tar_file_iterator(stream, handler=_stop):
            item["__url__"] = url
            yield item

    try:
        with open_stream(url) as stream:
            yield from group_by_keys(members(stream), handler=_stop)
    except (OSError, tarfile.TarError, ValueError) as err:
        warnings.warn(f"shard {url} ends early: {err}", SkippedImageWarning, stacklevel=2)


def _stop(err: Exception) -> bool:
    raise err


def _label(sample: dict) -> int | None:
    if "cls" in sample:
        return int(sample["cls"])
    if "json" in sample:
        meta = json.loads(sample["json"])
        if "label" in meta:
            return int(meta["label"])
    return None


class ShardDataset(IterableDataset):
    """One split of WebDataset shards as a stream of ``Sample``s (see the module docstring).

    ``train_loader``/``eval_loader`` call ``configure``; the training loop calls
    ``set_epoch(epoch, skip_batches)`` as on ``ResumableSampler``, which it replaces.
    """

    def __init__(self, split: ShardSplit, classes: list[str], transform: Transform) -> None:
        self.split, self.classes, self.transform = split, classes, transform
        self.configure(batch_size=1)
        self.epoch, self.skip_batches = 0, 0

    def configure(
        self,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        """How the stream is read: raw batch size, seed, this rank among ``world_size``, the
        DataLoader's workers, shuffling and whether every rank yields equal full batches."""
        readers = world_size * max(1, num_workers)
        if drop_last and len(self.split.urls) < readers:  # evaluation: idle readers are fine
            raise DataError(
                f"{len(self.split.urls)} shards cannot feed {world_size} rank(s) x "
                f"{max(1, num_workers)} worker(s) = {readers} readers (each needs its own "
                "shards); use fewer workers or more, smaller shards (nfnets prepare "
                "--shard-size)"
            )
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.shuffle, self.drop_last = num_workers, shuffle, drop_last

    @property
    def num_samples(self) -> int:
        """Samples in the split."""
        return self.split.num_samples

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in an epoch (training: the same on every rank)."""
        per_rank = self.num_samples // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; skip its first ``skip_batches`` batches (for resuming)."""
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(
                f"skip_batches must be in [0, {self.batches_per_epoch}], got {skip_batches}"
            )
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        if self.drop_last:
            return (self.batches_per_epoch - self.skip_batches) * self.batch_size
        workers = max(1, self.num_workers)
        mine = range(self.rank * workers, (self.rank + 1) * workers)
        readers = self.world_size * workers
        return sum(n for i, n in enumerate(self.split.lengths) if i % readers in mine)

    def _shards(self, reader: int, readers: int, round_: int) -> list[int]:
        count = len(self.split.urls)
        if not self.shuffle:
            return list(range(count))[reader::readers]
        rng = np.random.default_rng([self.seed, self.epoch, round_])
        return rng.permutation(count)[reader::readers].tolist()

    def _pass(self, reader: int, readers: int, round_: int) -> Iterator[tuple[dict | None, int]]:
        """(sample or None, lost) from one pass over this reader's shards."""
        for shard in self._shards(reader, readers, round_):
            count = 0
            for sample in iter_shard(self.split.urls[shard]):
                count += 1
                yield sample, 0
            lost = self.split.lengths[shard] - count
            if lost > 0:  # a truncated shard: its missing samples count as skipped
                yield None, lost

    def _raw_samples(self, reader: int, readers: int) -> Iterator[tuple[dict | None, int]]:
        """Passes over this reader's shards, each shuffled on its own; training repeats
        passes (in new orders) until the quota is met."""
        round_ = 0
        while True:
            found = 0
            for item in self._shuffled(self._pass(reader, readers, round_), reader, round_):
                found += item[0] is not None
                yield item
            if not self.drop_last:
                return
            if not found:
                raise DataError(
                    f"shards {self._shards(reader, readers, round_)} of {self.split.urls[0]} ... "
                    "hold no samples; check the shards (truncated or empty files?)"
                )
            round_ += 1

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        # Batch g of the epoch comes from stream g % workers. DataLoader asks worker j % workers
        # for its j-th batch, and a resumed epoch starts at g = skip_batches, so this worker
        # plays stream (worker + skip_batches) % workers.
        stream_id = (worker + self.skip_batches) % workers
        reader, readers = self.rank * workers + stream_id, self.world_size * workers
        quota = len(range(stream_id, self.batches_per_epoch, workers)) * self.batch_size
        skip = len(range(stream_id, self.skip_batches, workers)) * self.batch_size
        rng = np.random.default_rng([self.seed, self.epoch, reader, 0x5EED])
        seeds = rng.integers(0, 2**62, size=max(quota, 0), dtype=np.int64)
        stream = self._raw_samples(reader, readers)
        position, skipped, failures = 0, 0, 0
        for sample, lost in stream:
            skipped += lost
            if sample is None:
                continue
            if self.drop_last and position >= quota:
                return
            if position < skip:  # resuming: consumed before, pass without decoding
                position += 1
                continue
            seed = int(seeds[position]) if self.drop_last else None
            image, label = self._decode(sample, seed)
            if image is None:
                skipped += 1
                failures += 1
                if failures >= MAX_CONSECUTIVE_SKIPS:
                    raise DataError(
                        f"{MAX_CONSECUTIVE_SKIPS} consecutive samples up to {sample['__url__']}:"
                        f"{sample['__key__']} could not be used; check the shards"
                    )
                continue
            failures = 0
            position += 1
            yield Sample(image, label, skipped, seed)
            skipped = 0

    def _shuffled(self, stream, reader: int, round_: int):
        """A seeded shuffle buffer over undecoded samples (training only)."""
        if not self.shuffle:
            yield from stream
            return
        rng = np.random.default_rng([self.seed, self.epoch, reader, round_, 0xB0F])
        buffer = []
        for item in stream:
            if item[0] is None:
                yield item
                continue
            buffer.append(item)
            if len(buffer) >= SHUFFLE_BUFFER:
                yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def _decode(self, sample: dict, seed: int | None):
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        try:
            label = _label(sample)
        except ValueError:
            label = None
        if key is None or label is None:
            missing = "image" if key is None else "label"
            warnings.warn(f"skipping sample {where}: no {missing}", SkippedImageWarning,
                          stacklevel=3)
            return None, None
        if not 0 <= label < len(self.classes):
            warnings.warn(f"skipping sample {where}: label {label} outside the "
                          f"{len(self.classes)} classes", SkippedImageWarning, stacklevel=3)
            return None, None
        try:
            image = decode_and_transform(
                io.BytesIO(sample[key]), self.transform, seeded_generator(seed)
            )
        except Exception as err:  # decoders raise many types
            warnings.warn(f"skipping unreadable image {where}: {err}", SkippedImageWarning,
                          stacklevel=3)
            return None, None
        return image, label


def shard_datasets(
    spec: str, train_transform: Transform, eval_transform: Transform
) -> tuple[ShardDataset, ShardDataset]:
    """Train and val ``ShardDataset``s of a ``wds:`` spec (without the prefix)."""
    train, val, classes = shard_splits(spec)
    return ShardDataset(train, classes, train_transform), ShardDataset(val, classes, eval_transform)


