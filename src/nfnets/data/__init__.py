"""Datasets, transforms and loaders of the NFNet ImageNet recipe, plus the bundled digits demo.

Mirrors the official ``nfnets/dataset.py`` (deepmind-research; docs/data.md). Sources:

- an ImageNet-style folder tree ``root/{train,val}/<class>/<image>`` (``folder``);
- WebDataset tar shards, ``wds:PATTERN`` (``shards``), streamed;
- Hugging Face ``datasets``, ``hf:NAME_OR_PATH`` (``hf``);
- scikit-learn's offline handwritten digits (``digits``), the default demo.

``open_datasets(spec, train_size, eval_size)`` picks the source from ``--data``'s text.

Per-image work happens in DataLoader workers (decode, crop, flip, resize: ``transforms``); the
batch stage (MixUp/CutMix, RandAugment, normalisation, soft targets: ``loaders.BatchAugment``)
runs batched on the training device. The API the training loop uses::

    train_set, val_set = open_datasets(spec, train_size, eval_size)      # or digits_datasets(32)
    augment = AugmentConfig.from_name("cutmix_mixup_randaugment_405")
    loader, sampler = train_loader(train_set, batch_size=B, augment=augment, seed=0,
                                   rank=rank, world_size=world, num_workers=8, device=device)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch, skip_batches=k if resuming this epoch else 0)
        for images, targets, skipped in loader:   # B x 3 x S x S, B x K, int; on `device`
            ...
    for images, labels, skipped in eval_loader(val_set, batch_size=50):   # labels: B int64
        ...

Each training step's raw batch holds 2B images when MixUp or CutMix is on (as in
nfnets/dataset.py), B otherwise. Batches depend only on (seed, epoch, position): every sample
has its own seed, so results do not depend on ``num_workers`` and a run resumed with
``skip_batches`` sees exactly
the batches it would have seen (streamed shards: see ``shards``). An unreadable image is
replaced by the next readable one, a ``SkippedImageWarning`` names it, and ``skipped`` counts
replacements in the batch.
"""

from ..errors import DataError
from .decode import IMAGE_EXTENSIONS, decode_and_transform, load_rgb, pil_to_rgb
from .digits import TensorImageDataset, digits_datasets, digits_recipe_changes
from .folder import IgnoredFilesWarning, ImageFolderDataset, check_same_classes, imagenet_datasets
from .jpeg_region import (
    decode_jpeg_region,
    jpeg_decoding,
    turbojpeg_library,
    whole_image_decoding,
)
from .loaders import (
    MEAN_RGB,
    STD_RGB,
    Batch,
    BatchAugment,
    DeviceLoader,
    RawBatch,
    ResumableSampler,
    TrainCollate,
    collate_raw,
    eval_collate,
    eval_loader,
    normalize,
    train_loader,
    worker_init,
)
from .samples import MAX_CONSECUTIVE_SKIPS, Sample, SkippedImageWarning
from .sources import open_datasets
from .transforms import (
    CROP_PADDING,
    DIGITS_CROP_AREA,
    RANDOM_CROP_AREA,
    RANDOM_CROP_ASPECT,
    RANDOM_CROP_ATTEMPTS,
    RANDOM_CROP_MIN_COVERED,
    DigitsTrainTransform,
    EvalTransform,
    FastTrainTransform,
    TrainTransform,
    Transform,
    crop_resize_box,
    draft_scale,
    resize_uint8,
    sample_distorted_box,
    train_crop_box,
)

__all__ = [
    "CROP_PADDING", "DIGITS_CROP_AREA", "IMAGE_EXTENSIONS", "MAX_CONSECUTIVE_SKIPS", "MEAN_RGB",
    "RANDOM_CROP_AREA", "RANDOM_CROP_ASPECT", "RANDOM_CROP_ATTEMPTS", "RANDOM_CROP_MIN_COVERED",
    "STD_RGB", "Batch", "BatchAugment", "DataError", "DeviceLoader", "DigitsTrainTransform",
    "EvalTransform", "FastTrainTransform", "IgnoredFilesWarning", "ImageFolderDataset", "RawBatch",
    "ResumableSampler", "Sample", "SkippedImageWarning", "TensorImageDataset", "TrainCollate",
    "TrainTransform", "Transform", "check_same_classes", "collate_raw", "crop_resize_box",
    "decode_and_transform", "decode_jpeg_region", "digits_datasets", "digits_recipe_changes",
    "draft_scale", "eval_collate", "eval_loader", "imagenet_datasets", "jpeg_decoding", "load_rgb",
    "normalize", "open_datasets", "pil_to_rgb", "resize_uint8", "sample_distorted_box",
    "train_crop_box", "train_loader", "turbojpeg_library", "whole_image_decoding",
    "worker_init",
]
