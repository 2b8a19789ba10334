"""Tests of nfnets.data: folder datasets, decoding, transforms, digits, sampler and loaders."""

import io
import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nfnets.augment import AugmentConfig
from nfnets.data import (
    DIGITS_CROP_AREA,
    MEAN_RGB,
    STD_RGB,
    DataError,
    DigitsTrainTransform,
    EvalTransform,
    ImageFolderDataset,
    ResumableSampler,
    Sample,
    SkippedImageWarning,
    TrainCollate,
    TrainTransform,
    crop_resize_box,
    digits_datasets,
    digits_recipe_changes,
    eval_collate,
    eval_loader,
    imagenet_datasets,
    load_rgb,
    pil_to_rgb,
    sample_distorted_box,
    train_crop_box,
    train_loader,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _save_image(path: Path, color=(10, 20, 30), size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _make_tree(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    """root/split/class/i.png with a colour per class."""
    for split, classes in splits.items():
        for c, (name, count) in enumerate(classes.items()):
            for i in range(count):
                _save_image(root / split / name / f"{i}.png", color=(c * 50, i * 10, 7))
    return root


def _truncated_jpeg(path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 6 // 10])


# ---- folder errors -----------------------------------------------------------------------------


def test_missing_and_empty_root(tmp_path):
    with pytest.raises(
        DataError, match=r"does not exist; expected an ImageNet-style tree .*/train/"
    ):
        imagenet_datasets(tmp_path / "nope", 8, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        imagenet_datasets(tmp_path / "empty", 8, 8)
    assert issubclass(DataError, ValueError)


def test_missing_split(tmp_path):
    _make_tree(tmp_path, {"train": {"cat": 1}})
    with pytest.raises(DataError, match=r"has no 'val' folder \(it holds: train\)"):
        imagenet_datasets(tmp_path, 8, 8)


def test_class_folder_without_images(tmp_path):
    _make_tree(tmp_path, {"train": {"cat": 1}, "val": {"cat": 1}})
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder\(s\) with no images in .*train: dog"):
        imagenet_datasets(tmp_path, 8, 8)


def test_val_classes_differ(tmp_path):
    _make_tree(tmp_path, {"train": {"cat": 1, "dog": 1}, "val": {"bird": 1, "cat": 1}})
    with pytest.raises(DataError, match=r"only in train: \[dog\]; only in val: \[bird\]"):
        imagenet_datasets(tmp_path, 8, 8)


def test_flat_val_folder(tmp_path):
    _make_tree(tmp_path, {"train": {"cat": 1}})
    _save_image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataError, match="holds images directly but no class folders"):
        imagenet_datasets(tmp_path, 8, 8)


def test_tree_is_read_with_sorted_classes(tmp_path):
    _make_tree(tmp_path, {"train": {"b": 2, "a": 1}, "val": {"a": 1, "b": 1}})
    _save_image(tmp_path / "train" / "a" / "upper.JPEG")  # extensions are case-insensitive
    (tmp_path / "train" / "a" / "readme.txt").write_text("ignored")
    (tmp_path / "train" / ".cache").mkdir()  # hidden folders are not classes
    train, val = imagenet_datasets(tmp_path, 8, 8)
    assert train.classes == val.classes == ["a", "b"]
    assert len(train) == 4 and len(val) == 2
    assert [train[i].label for i in range(4)] == [0, 0, 1, 1]
    assert train[0].image.shape == (3, 8, 8) and train[0].image.dtype == torch.uint8  # fast
    exact, _ = imagenet_datasets(tmp_path, 8, 8, exact=True)
    assert exact[0].image.shape == (3, 8, 8) and exact[0].image.dtype == torch.float32


# ---- unreadable images -------------------------------------------------------------------------


def _tree_with_bad_files(root: Path) -> Path:
    _make_tree(root, {"train": {"a": 3, "b": 3}})
    (root / "train" / "a" / "1.png").write_bytes(b"this is not an image")
    (root / "train" / "b" / "1.png").unlink()
    _truncated_jpeg(root / "train" / "b" / "1.jpg")
    return root


def test_truncated_jpeg_does_not_load(tmp_path):
    _truncated_jpeg(tmp_path / "t.jpg")
    with pytest.raises(OSError, match="truncated"):
        load_rgb(tmp_path / "t.jpg")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_images_are_skipped_and_counted(tmp_path, num_workers):
    root = _tree_with_bad_files(tmp_path)
    dataset = ImageFolderDataset(root, "train", EvalTransform(8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(eval_loader(dataset, batch_size=3, num_workers=num_workers))
    assert sum(b.skipped for b in batches) == 2
    # each bad image is replaced by the next one, with that image's label
    assert torch.cat([b.targets for b in batches]).tolist() == [0, 0, 0, 1, 1, 1]
    if num_workers == 0:  # worker processes report on their own stderr
        messages = [str(w.message) for w in caught if w.category is SkippedImageWarning]
        assert any("a/1.png" in m for m in messages) and any("b/1.jpg" in m for m in messages)
    loader, sampler = train_loader(
        dataset, batch_size=3, augment=AugmentConfig(), num_workers=num_workers
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        assert sum(b.skipped for b in loader) == 2


def test_all_unreadable_raises(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.jpg").write_bytes(b"junk")
    dataset = ImageFolderDataset(tmp_path, "train", EvalTransform(8))
    with pytest.warns(SkippedImageWarning), pytest.raises(DataError, match="could not be read"):
        dataset[0]


# ---- decoding of odd modes ---------------------------------------------------------------------


def _pixel(img: Image.Image) -> list[int]:
    out = pil_to_rgb(img)
    assert out.dtype == torch.uint8 and out.shape == (3, img.height, img.width)
    return out[:, 0, 0].tolist()


def test_modes_convert_to_rgb():
    assert _pixel(Image.new("L", (2, 2), 77)) == [77, 77, 77]
    assert _pixel(Image.new("1", (2, 2), 1)) == [255, 255, 255]
    # alpha is composited onto white: round(c * a/255 + 255 * (1 - a/255))
    assert _pixel(Image.new("RGBA", (2, 2), (200, 100, 0, 128))) == [
        (c * 128 + 255 * 127 + 127) // 255 for c in (200, 100, 0)
    ]
    assert _pixel(Image.new("RGBA", (2, 2), (200, 100, 0, 255))) == [200, 100, 0]
    assert _pixel(Image.new("LA", (2, 2), (100, 0))) == [255, 255, 255]
    assert _pixel(Image.new("LA", (2, 2), (100, 255))) == [100, 100, 100]
    # CMYK: pure cyan ink -> (0, 255, 255); no ink -> white
    assert _pixel(Image.new("CMYK", (2, 2), (255, 0, 0, 0))) == [0, 255, 255]
    assert _pixel(Image.new("CMYK", (2, 2), (0, 0, 0, 0))) == [255, 255, 255]


def test_palette_with_transparency():
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 1  # palette entry 1 (blue) is transparent
    out = pil_to_rgb(img)
    assert out[:, 0, 0].tolist() == [255, 0, 0] and out[:, 0, 1].tolist() == [255, 255, 255]


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    img16 = Image.fromarray(values)
    assert img16.mode.startswith("I;16")
    assert pil_to_rgb(img16)[0, 0].tolist() == [0, 1, 128, 255]
    img32 = Image.fromarray(np.array([[65535, 70000, -5, 514]], dtype=np.int32))
    assert img32.mode == "I"
    assert pil_to_rgb(img32)[1, 0].tolist() == [255, 255, 0, 2]
    img16.save(tmp_path / "deep.png")  # through a file, as Pillow opens 16-bit PNGs
    assert load_rgb(tmp_path / "deep.png")[2, 0].tolist() == [0, 1, 128, 255]


# ---- transforms --------------------------------------------------------------------------------


def _coordinate_image(height: int, width: int) -> torch.Tensor:
    """R = x, G = y, B = 7, so every output pixel says where it came from."""
    image = torch.empty(3, height, width, dtype=torch.uint8)
    image[0] = torch.arange(width).view(1, width)
    image[1] = torch.arange(height).view(height, 1)
    image[2] = 7
    return image


def test_eval_resize_crop_32_geometry():
    size = 8
    # already (S+32)^2: the resize is the identity and the crop starts at ((40 - 8) + 1) // 2 = 16
    out = EvalTransform(size)(_coordinate_image(40, 40))
    assert out.dtype == torch.float32 and out.shape == (3, 8, 8)
    assert out[0, 0].tolist() == list(range(16, 24)) and out[1, :, 0].tolist() == list(
        range(16, 24)
    )
    # 40 x 80 is squashed (not aspect-preserving) to 40 x 40: x halves; bicubic keeps a ramp
    # linear away from the borders, so output x reads 2 * (x + 16) + 0.5
    out = EvalTransform(size)(_coordinate_image(40, 80))
    assert torch.allclose(out[0, 3], torch.tensor([2 * (x + 16) + 0.5 for x in range(8)]))
    assert torch.allclose(out[1, :, 3], torch.arange(16, 24).float())
    assert torch.allclose(out[2], torch.full((8, 8), 7.0))


def test_crop_resize_box_official_rule():
    # 375 x 500 at S=192: side int(375 / 224 * 192) = 321; offsets ((375 - 321) + 1) // 2 = 27
    # and ((500 - 321) + 1) // 2 = 90
    assert crop_resize_box(375, 500, 192) == (27, 90, 321, 321)
    assert crop_resize_box(10, 200, 8) == (4, 99, 2, 2)
    out = EvalTransform(4, "crop_resize")(_coordinate_image(36, 36))  # side int(36/36*4)=4 at 16
    assert out[0, 0].tolist() == [16.0, 17.0, 18.0, 19.0]


def test_random_crop_falls_back_to_crop_resize():
    # a 10 x 200 strip has no box of aspect 3/4..4/3 covering 10% of it: every attempt fails
    for seed in range(5):
        assert train_crop_box(10, 200, 8, _gen(seed)) == (4, 99, 2, 2)
    assert sample_distorted_box(10, 200, _gen()) == (0, 0, 10, 200)


def test_random_crop_respects_area_and_aspect():
    height, width = 100, 150
    areas = []
    for seed in range(300):
        top, left, h, w = sample_distorted_box(height, width, _gen(seed))
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        if (h, w) == (height, width):
            continue
        areas.append(h * w / (height * width))
        assert 0.1 <= areas[-1] <= 1.0  # min_object_covered 0.1 binds above the 0.08 area floor
        assert 0.75 - 0.5 / h <= w / h <= 4 / 3 + 0.5 / h  # width = round(aspect * height)
        assert top + h < height or h == height  # TF's offsets never reach the last row
    assert len(areas) > 250 and min(areas) < 0.2 and max(areas) > 0.8


def test_train_transform_flips_and_does_not_clamp():
    strip = _coordinate_image(10, 200)  # deterministic fallback crop: columns 99 and 100
    first_columns = {float(TrainTransform(8)(strip, _gen(s))[0, 0, 0]) for s in range(20)}
    assert len(first_columns) == 2  # flipped and unflipped both occur
    checker = ((torch.arange(32).view(-1, 1) // 4 + torch.arange(32) // 4) % 2 * 255).to(
        torch.uint8
    )
    out = TrainTransform(96)(checker.expand(3, 32, 32).clone(), _gen(1))
    assert out.shape == (3, 96, 96) and out.dtype == torch.float32
    assert float(out.min()) < 0 and float(out.max()) > 255  # bicubic overshoot is kept


# ---- digits ------------------------------------------------------------------------------------


def test_digits_split_is_stratified_and_deterministic():
    train, val = digits_datasets(16, seed=0)
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert train.classes == [str(d) for d in range(10)]
    all_counts = torch.bincount(torch.cat([train.labels, val.labels]), minlength=10)
    val_counts = torch.bincount(val.labels, minlength=10)
    assert ((val_counts - 0.2 * all_counts).abs() <= 1).all()
    again = digits_datasets(16, seed=0)[1]
    assert torch.equal(again.images, val.images) and torch.equal(again.labels, val.labels)
    other = digits_datasets(16, seed=1)[1]
    assert not torch.equal(other.labels, val.labels)
    sample = val[0]
    assert sample.image.shape == (3, 16, 16) and torch.equal(sample.image[0], sample.image[2])
    # 16 -> 255, plus bicubic overshoot of the sharp 8x8 edges (unclamped, as on ImageNet)
    assert 255 < float(val.images.max()) < 340 and float(val.images.min()) < 0


def test_digits_train_transform_is_mild_and_never_flips():
    ramp = torch.arange(32.0).view(1, 1, 32).expand(1, 32, 32) * 8
    for seed in range(20):
        out = DigitsTrainTransform(32)(ramp, _gen(seed))
        assert out.shape == (1, 32, 32)
        assert float(out[0, :, :16].mean()) < float(out[0, :, 16:].mean())  # still increasing
        top, left, h, w = sample_distorted_box(32, 32, _gen(seed), area_range=DIGITS_CROP_AREA)
        assert h * w >= 0.8 * 32 * 32


def test_digits_recipe_changes():
    changes = digits_recipe_changes(32, AugmentConfig.from_name("mixup"))
    assert {"dataset", "flip", "crop", "randaugment", "mixup/cutmix"} <= set(changes)
    assert all(isinstance(v, str) and v for v in changes.values())
    assert changes["mixup/cutmix"].startswith("MixUp (")
    assert changes["randaugment"].startswith("off")


# ---- sampler and loaders -----------------------------------------------------------------------


def test_sampler_rank_split_like_distributed_sampler():
    full = list(ResumableSampler(23, batch_size=4, seed=3, drop_last=False))
    assert sorted(i for i, _ in full) == list(range(23))
    shards = [
        list(ResumableSampler(23, batch_size=4, seed=3, drop_last=False, rank=r, world_size=3))
        for r in range(3)
    ]
    for r, shard in enumerate(shards):
        assert shard == full[r::3]  # rank r takes every 3rd key of the epoch's permutation
    dropped = [len(ResumableSampler(23, batch_size=2, rank=r, world_size=3)) for r in range(3)]
    assert dropped == [6, 6, 6]  # drop_last: equal full batches on every rank (7 // 2 = 3)


def test_sampler_epochs_seeds_and_resume():
    sampler = ResumableSampler(50, batch_size=4, seed=0)
    sampler.set_epoch(2)
    epoch2 = list(sampler)
    assert len(epoch2) == 48 and sampler.batches_per_epoch == 12
    sampler.set_epoch(2, skip_batches=5)
    assert list(sampler) == epoch2[20:] and len(sampler) == 28
    sampler.set_epoch(3)
    assert [i for i, _ in sampler] != [i for i, _ in epoch2]
    same = ResumableSampler(50, batch_size=4, seed=0)
    same.set_epoch(2)
    assert list(same) == epoch2
    ordered = list(ResumableSampler(5, batch_size=2, shuffle=False, drop_last=False))
    assert [i for i, _ in ordered] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"skip_batches must be in \[0, 12\]"):
        sampler.set_epoch(0, skip_batches=13)
    with pytest.raises(ValueError, match="rank must be in"):
        ResumableSampler(10, batch_size=2, rank=2, world_size=2)


def _batches(num_workers: int, skip: int = 0, count: int = 3):
    train, _ = digits_datasets(16)
    augment = AugmentConfig.from_name("cutmix_mixup_randaugment_405")
    loader, sampler = train_loader(
        train, batch_size=4, augment=augment, seed=5, num_workers=num_workers
    )
    sampler.set_epoch(1, skip_batches=skip)
    return list(itertools.islice(loader, count))


def test_train_loader_is_deterministic_across_workers_and_resume():
    main = _batches(num_workers=0)
    images, targets, skipped = main[0]
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert targets.shape == (4, 10) and torch.allclose(targets.sum(1), torch.ones(4))
    assert skipped == 0
    workers = _batches(num_workers=2)
    resumed = _batches(num_workers=0, skip=2, count=1)
    for a, b in zip(main, workers, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert torch.equal(resumed[0].images, main[2].images)
    assert not torch.equal(main[0].images, main[1].images)


def test_train_collate_without_mixing_normalises_and_smooths():
    mean_image = torch.tensor(MEAN_RGB).view(3, 1, 1).expand(3, 4, 4)
    samples = [
        Sample(mean_image, 1, 0, 11),
        Sample(mean_image + torch.tensor(STD_RGB).view(3, 1, 1), 2, 1, 12),
    ]
    batch = TrainCollate(3, AugmentConfig(), label_smoothing=0.3)(samples)
    assert torch.allclose(batch.images[0], torch.zeros(3, 4, 4), atol=1e-5)
    assert torch.allclose(batch.images[1], torch.ones(3, 4, 4), atol=1e-5)
    assert torch.allclose(batch.targets, torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]))
    assert batch.skipped == 1
    evaluated = eval_collate(samples)
    assert evaluated.targets.tolist() == [1, 2] and evaluated.targets.dtype == torch.int64


def test_train_loader_rejects_too_small_dataset(tmp_path):
    dataset = ImageFolderDataset(
        _make_tree(tmp_path, {"train": {"a": 3}}), "train", EvalTransform(8)
    )
    with pytest.raises(DataError, match=r"fewer than one step's 8 raw images \(batch 4 x 2"):
        train_loader(dataset, batch_size=4, augment=AugmentConfig(mixup=True))
