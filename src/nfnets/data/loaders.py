"""Sampling, batching and the batched augmentation stage.

Workers do the per-image work (decode, crop, resize, flip) and ``collate_raw`` stacks the
2B raw images; ``BatchAugment`` then runs MixUp/CutMix, RandAugment, normalisation and the soft
targets batched (deepmind-research nfnets/dataset.py: mixing, then RandAugment), on
whatever device the batch is on. ``train_loader``
puts that stage on the training device when it is a GPU (uint8 batches cross the bus, pinned,
without blocking) and in the workers otherwise.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ..augment import (
    DEFAULT_LABEL_SMOOTHING,
    AugmentConfig,
    make_targets,
    mix_batch,
    rand_augment_batch,
)
from ..errors import DataError
from .samples import Sample

# nfnets/dataset.py MEAN_RGB / STDDEV_RGB (ImageNet statistics x 255)
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_BATCH_SEED_SALT = 0x5DEECE66D  # decorrelates a batch's stream from its first sample's


class Batch(NamedTuple):
    """What the loaders yield: normalised images, targets (train: B x K soft targets;
    eval: B int64 labels) and the number of unreadable images replaced in this batch."""

    images: Tensor
    targets: Tensor
    skipped: int


class RawBatch(NamedTuple):
    """Stacked per-image results before the batch stage: images (N x 3 x S x S, uint8 or
    float), int64 labels, skipped count, and the batch's seed (None when unseeded)."""

    images: Tensor
    labels: Tensor
    skipped: int
    seed: int | None


class ResumableSampler(Sampler):
    """Seeded, DDP-aware, resumable sampler yielding ``(index, sample_seed)`` keys.

    Each epoch draws a permutation of the dataset (or keeps order when ``shuffle`` is False)
    and one seed per position from (seed, epoch); rank r takes every ``world_size``-th position
    starting at r, like ``DistributedSampler`` but without padding. With ``drop_last`` every
    rank gets the same number of full batches (needed so DDP ranks step together); without it
    each sample is seen exactly once across ranks (for evaluation).
    ``set_epoch(epoch, skip_batches=k)`` starts the epoch after its first k batches, so a run
    resumed mid-epoch sees the same remaining keys.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples < 1 or batch_size < 1 or seed < 0:
            raise ValueError(
                f"need num_samples >= 1, batch_size >= 1, seed >= 0; got "
                f"{num_samples}, {batch_size}, {seed}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip_batches = 0

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in a whole epoch."""
        if self.drop_last:
            return (self.num_samples // self.world_size) // self.batch_size
        return math.ceil(len(range(self.rank, self.num_samples, self.world_size)) / self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; skip its first ``skip_batches`` batches (for resuming)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(
                f"skip_batches must be in [0, {self.batches_per_epoch}], got {skip_batches}"
            )
        self.epoch, self.skip_batches = epoch, skip_batches

    def _bounds(self) -> tuple[int, int]:
        start = self.skip_batches * self.batch_size
        rank_count = len(range(self.rank, self.num_samples, self.world_size))
        stop = self.batches_per_epoch * self.batch_size if self.drop_last else rank_count
        return start, stop

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        seeds = rng.integers(0, 2**62, size=self.num_samples, dtype=np.int64)
        order = order[self.rank :: self.world_size]
        seeds = seeds[self.rank :: self.world_size]
        start, stop = self._bounds()
        yield from zip(order[start:stop].tolist(), seeds[start:stop].tolist(), strict=True)

    def __len__(self) -> int:
        start, stop = self._bounds()
        return stop - start


def normalize(images: Tensor) -> Tensor:
    """(x - MEAN_RGB) / STD_RGB on a B x 3 x H x W batch on the 0-255 scale (any device;
    uint8 input gives float32)."""
    dtype = images.dtype if images.is_floating_point() else torch.float32
    mean = torch.tensor(MEAN_RGB, dtype=dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD_RGB, dtype=dtype, device=images.device).view(1, 3, 1, 1)
    return (images.to(dtype) - mean) / std


def collate_raw(samples: Sequence[Sample]) -> RawBatch:
    """Stack samples; the batch seed comes from the first sample's, so batches do not depend
    on the number of workers."""
    seed = samples[0].seed
    return RawBatch(
        torch.stack([s.image for s in samples]),
        torch.tensor([s.label for s in samples], dtype=torch.long),
        sum(s.skipped for s in samples),
        None if seed is None else int(seed) ^ _BATCH_SEED_SALT,
    )


class BatchAugment:
    """The batch stage: 2B raw images -> ``Batch`` of B, on the raw batch's device.

    MixUp/CutMix (official halves) on float 0-255, then RandAugment per image (clip, truncate
    to uint8, augment, float), then normalisation (nfnets/dataset.py, augment_before_mix
    False); targets are the mixed, smoothed soft labels (nfnets/experiment.py). Every random
    draw comes from a CPU generator seeded with the batch seed, so the result does not depend
    on the device or the number of workers.
    """

    def __init__(
        self,
        num_classes: int,
        augment: AugmentConfig,
        label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    ) -> None:
        self.num_classes, self.augment, self.label_smoothing = num_classes, augment, label_smoothing

    def __call__(self, raw: RawBatch) -> Batch:
        generator = None if raw.seed is None else torch.Generator().manual_seed(raw.seed)
        aug = self.augment
        images = raw.images if raw.images.is_floating_point() else raw.images.float()
        mixed = mix_batch(
            images,
            raw.labels,
            mixup=aug.mixup,
            cutmix=aug.cutmix,
            mixup_alpha=aug.mixup_alpha,
            generator=generator,
        )
        images = mixed.images
        if aug.randaugment is not None:
            images = rand_augment_batch(images, aug.randaugment, generator)
        targets = make_targets(
            mixed.labels, mixed.mix_labels, mixed.ratios, self.num_classes, self.label_smoothing
        )
        return Batch(normalize(images), targets, raw.skipped)


class TrainCollate:
    """Collate for training in the workers: raw samples (2B when mixing, else B) -> ``Batch``
    of B (``collate_raw`` then ``BatchAugment``)."""

    def __init__(
        self,
        num_classes: int,
        augment: AugmentConfig,
        label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    ) -> None:
        self.stage = BatchAugment(num_classes, augment, label_smoothing)

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        return self.stage(collate_raw(samples))


def eval_collate(samples: Sequence[Sample]) -> Batch:
    """Collate for evaluation: normalised images, int64 labels, skipped count."""
    images = torch.stack([s.image for s in samples])
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    return Batch(normalize(images), labels, sum(s.skipped for s in samples))


class DeviceLoader:
    """Iterate a loader of ``RawBatch``es as ``Batch``es on ``device``: each raw batch is
    copied without blocking (from pinned memory) and goes through ``stage`` there."""

    def __init__(self, loader: DataLoader, device: torch.device, stage: BatchAugment) -> None:
        self.loader, self.device, self.stage = loader, torch.device(device), stage

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for raw in self.loader:
            yield self.stage(
                RawBatch(
                    raw.images.to(self.device, non_blocking=True),
                    raw.labels.to(self.device, non_blocking=True),
                    raw.skipped,
                    raw.seed,
                )
            )


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: freeze the garbage collector's view of the objects the
    worker inherited. Otherwise the first collection in each worker walks the parent's whole
    heap, writing to every object's header, which copies those pages into the worker (tens
    of MB per worker, measured in benchmarks/bench_input.py). And keep OpenCV (the fast
    resize) on the worker's own thread, as PyTorch keeps its ops: its default pool, one
    thread per core in every worker, would oversubscribe the cores the workers share."""
    gc.freeze()
    cv2.setNumThreads(1)


def train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    augment: AugmentConfig,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    device: torch.device | str | None = None,
) -> tuple[DataLoader | DeviceLoader, Sampler]:
    """Training loader yielding ``Batch(images B x 3 x S x S, targets B x K, skipped)``.

    ``batch_size`` is B per rank (the output batch); the loader reads
    ``augment.raw_batch_size(B)`` images per step. With a GPU ``device`` the batch stage
    (``BatchAugment``) runs there on pinned, non-blocking copies and batches arrive on it;
    otherwise it runs in the workers and batches arrive on the CPU. Call
    ``sampler.set_epoch(epoch, skip_batches=k)`` before each epoch; a streamed dataset
    (``IterableDataset``) is its own sampler.
    """
    raw = augment.raw_batch_size(batch_size)
    on_device = device is not None and torch.device(device).type != "cpu"
    collate = collate_raw if on_device else TrainCollate(
        len(dataset.classes), augment, label_smoothing
    )
    if isinstance(dataset, IterableDataset):
        dataset.configure(batch_size=raw, seed=seed, rank=rank, world_size=world_size,
                          num_workers=num_workers)
        sampler = dataset
        loader = DataLoader(dataset, batch_size=raw, collate_fn=collate, num_workers=num_workers,
                            pin_memory=pin_memory or on_device, worker_init_fn=worker_init)
    else:
        sampler = ResumableSampler(
            len(dataset), batch_size=raw, seed=seed, rank=rank, world_size=world_size
        )
        loader = DataLoader(
            dataset,
            batch_size=raw,
            sampler=sampler,
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=pin_memory or on_device,
            persistent_workers=num_workers > 0,
            worker_init_fn=worker_init,
        )
    if sampler.batches_per_epoch == 0:
        size = sampler.num_samples
        raise DataError(
            f"the training set has {size} images ({size // world_size} per "
            f"rank), fewer than one step's {raw} raw images (batch {batch_size}"
            f"{' x 2 for MixUp/CutMix' if augment.mixing else ''}); lower the batch size"
        )
    if on_device:
        stage = BatchAugment(len(dataset.classes), augment, label_smoothing)
        return DeviceLoader(loader, torch.device(device), stage), sampler
    return loader, sampler


def eval_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Evaluation loader yielding ``Batch(images, labels, skipped)`` in dataset order; each
    sample is seen once across ranks (rank r gets samples r, r + world_size, ...)."""
    if isinstance(dataset, IterableDataset):
        dataset.configure(batch_size=batch_size, seed=0, rank=rank, world_size=world_size,
                          num_workers=num_workers, shuffle=False, drop_last=False)
        return DataLoader(dataset, batch_size=batch_size, collate_fn=eval_collate,
                          num_workers=num_workers, pin_memory=pin_memory,
                          worker_init_fn=worker_init)
    sampler = ResumableSampler(
        len(dataset),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        rank=rank,
        world_size=world_size,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=eval_collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=worker_init,
    )
