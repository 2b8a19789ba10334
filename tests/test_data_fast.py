"""The fast pipeline: uint8 per-image transform, JPEG decoding, the batched device stage and its
agreement with the per-image reference, and the folder scan's symlink handling."""

import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from nfnets.augment import (
    RAND_AUGMENT_OPS,
    AugmentConfig,
    RandAugmentLevel,
    apply_op,
    apply_op_batch,
    draw_rand_augment_choices,
    rand_augment,
    rand_augment_batch,
)
from nfnets.data import (
    BatchAugment,
    DeviceLoader,
    FastTrainTransform,
    IgnoredFilesWarning,
    ImageFolderDataset,
    ResumableSampler,
    TrainCollate,
    TrainTransform,
    collate_raw,
    decode_and_transform,
    draft_scale,
    imagenet_datasets,
    load_rgb,
    resize_uint8,
    train_loader,
)
from nfnets.data.decode import decode_jpeg, jpeg_size
from nfnets.data.jpeg_region import decode_jpeg_region


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth image with some texture (JPEG-friendly, like a photo)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    channels = [
        128 + 90 * np.sin(x / (9 + 3 * c) + rng.uniform(0, 3)) * np.cos(y / (13 + c))
        for c in range(3)
    ]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def _jpeg(height: int, width: int, seed: int = 0, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_photo(height, width, seed)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# ---- decoding ------------------------------------------------------------------------------


def test_decode_jpeg_equals_pil_full_and_reduced():
    data = _jpeg(75, 100)
    assert jpeg_size(data) == (75, 100)
    full = decode_jpeg(data)
    assert torch.equal(full, load_rgb(io.BytesIO(data)))
    half = decode_jpeg(data, 38, 50)
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (50, 37))
        assert torch.equal(half, torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1))
    assert half.shape == (3, 38, 50)
    with pytest.raises(ValueError):
        decode_jpeg(data[: len(data) // 2])  # truncated data raises, it is not padded grey


@pytest.mark.parametrize(("crop", "size", "scale"), [
    ((100, 100), 100, 1), ((199, 400), 100, 1), ((200, 400), 100, 2), ((400, 450), 100, 4),
    ((800, 900), 100, 8), ((5000, 5000), 100, 8),
])
def test_draft_scale_keeps_the_crop_at_least_size(crop, size, scale):
    assert draft_scale(*crop, size) == scale


# ---- the fast per-image transform ----------------------------------------------------------


def test_fast_transform_draws_the_exact_crop_and_flip():
    """Same seeds, same geometry: the fast uint8 output is the exact float output to within
    resampling and rounding (PSNR), for JPEG, PNG bytes and decoded tensors."""
    data = _jpeg(120, 160)
    image = load_rgb(io.BytesIO(data))
    png = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(png, format="PNG")
    fast, exact = FastTrainTransform(48), TrainTransform(48)
    for seed in range(6):
        reference = exact(image, _gen(seed)).clamp(0, 255)
        for source in (data, png.getvalue(), image):
            out = decode_and_transform(source, fast, _gen(seed)) if isinstance(source, bytes) \
                else fast(source, _gen(seed))
            assert out.dtype == torch.uint8 and out.shape == (3, 48, 48)
            assert _psnr(out, reference) > 30, seed


def test_fast_transform_uses_reduced_decoding_when_the_crop_allows(monkeypatch):
    """A big image with a small train size decodes at the reduction its crop allows, and only
    the crop: the region handed to the decoder is the crop box at that scale."""
    import nfnets.data.transforms as transforms

    decoded = []

    def recording_decode(data, box, scale=1, size=None):
        out = decode_jpeg_region(data, box, scale, size)
        decoded.append((scale, box, out.shape))
        return out

    monkeypatch.setattr(transforms, "decode_jpeg_region", recording_decode)
    data = _jpeg(600, 800, seed=1)
    fast, exact = FastTrainTransform(24), TrainTransform(24)
    image = load_rgb(io.BytesIO(data))
    scales = []
    for s in range(6):
        out = decode_and_transform(data, fast, _gen(s))
        top, left, h, w = transforms.train_crop_box(600, 800, 24, _gen(s))
        scales.append(draft_scale(h, w, 24))
        scale, box, shape = decoded[-1]
        assert scale == scales[-1]
        assert shape == (box[2], box[3], 3)
        assert abs(box[0] * scale - top) <= scale and abs(box[2] * scale - h) <= scale
        assert _psnr(out, exact(image, _gen(s)).clamp(0, 255)) > 18  # exact aliases at 1/25
    assert max(scales) > 1


def test_fast_folder_dataset_skips_unreadable(tmp_path):
    for i in range(3):
        path = tmp_path / "train" / "a" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(40, 50, seed=i))
    (tmp_path / "train" / "a" / "1.jpg").write_bytes(_jpeg(40, 50)[:300])  # truncated
    dataset = ImageFolderDataset(tmp_path, "train", FastTrainTransform(16))
    with pytest.warns(UserWarning, match="skipping unreadable image .*1.jpg"):
        sample = dataset[(1, 5)]
    assert sample.skipped == 1 and sample.image.dtype == torch.uint8


# ---- batched RandAugment against the per-image reference -----------------------------------


def test_rand_augment_batch_equals_the_per_image_reference():
    """Batched ops, per-image choices: the batch equals rand_augment image by image from the
    same generator, at the recipe's magnitudes, and every op is exercised."""
    images = torch.stack([torch.from_numpy(_photo(20, 24, s)).permute(2, 0, 1)
                          for s in range(12)])
    seen = set()
    for magnitude in (5, 10, 15):
        for seed in range(3):
            level = RandAugmentLevel(4, magnitude)
            batched = rand_augment_batch(images.float() + 0.7, level, _gen(seed))
            gen = _gen(seed)
            reference = torch.stack([
                rand_augment(img, 4, magnitude, gen) for img in images
            ]).float()  # + 0.7 truncates back to the same uint8
            assert torch.equal(batched, reference), (magnitude, seed)
            seen |= set(draw_rand_augment_choices(12, 4, 20, 24, _gen(seed)).ops.flatten().tolist())
    assert seen == set(range(len(RAND_AUGMENT_OPS)))


@pytest.mark.parametrize("magnitude", [1, 2.5, 5, 0.55])  # 10, 25, 50 px; 5.5 px: affine
@pytest.mark.parametrize("axis", ["TranslateX", "TranslateY"])
def test_batched_translate_copy_matches_the_affine(axis, magnitude):
    images = torch.stack([torch.from_numpy(_photo(30, 40, s)).permute(2, 0, 1) for s in range(2)])
    for negate in (False, True):
        out = apply_op_batch(images, axis, magnitude, torch.full((2,), negate), torch.zeros(2, 2))
        expected = torch.stack([apply_op(img, axis, magnitude, _seed_for_sign(negate))
                                for img in images])
        assert torch.equal(out, expected), (axis, magnitude, negate)


@pytest.mark.parametrize("name", RAND_AUGMENT_OPS)
def test_apply_op_batch_matches_apply_op(name):
    images = torch.stack([torch.from_numpy(_photo(18, 22, s)).permute(2, 0, 1) for s in range(6)])
    negate = torch.tensor([False, True, False, True, True, False])
    centres = torch.tensor([[0, 0], [17, 21], [9, 3], [4, 20], [10, 10], [2, 15]])
    out = apply_op_batch(images, name, 10.0, negate, centres)
    for i, image in enumerate(images):
        # replay the draws apply_op makes: a sign (rand < 0.5 negates) or a centre
        if name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
            gen = _seed_for_sign(bool(negate[i]))
        elif name == "Cutout":
            gen = None
        else:
            gen = _gen(0)
        if name == "Cutout":
            expected = image.clone()
            half = 40
            cy, cx = centres[i].tolist()
            expected[:, max(0, cy - half):cy + half, max(0, cx - half):cx + half] = 128
        else:
            expected = apply_op(image, name, 10.0, gen)
        assert torch.equal(out[i], expected), (name, i)


def _seed_for_sign(negate: bool) -> torch.Generator:
    for seed in range(100):
        if (float(torch.rand(1, generator=_gen(seed))) < 0.5) == negate:
            return _gen(seed)
    raise AssertionError


def test_cutout_batch_matches_per_image_cutout_draws():
    images = torch.stack([torch.from_numpy(_photo(30, 30, s)).permute(2, 0, 1) for s in range(4)])
    gen = _gen(3)
    expected = [apply_op(img, "Cutout", 5.0, gen) for img in images]
    gen = _gen(3)
    centres = torch.tensor([[int(torch.randint(0, 30, (1,), generator=gen)),
                             int(torch.randint(0, 30, (1,), generator=gen))] for _ in range(4)])
    out = apply_op_batch(images, "Cutout", 5.0, torch.zeros(4, dtype=torch.bool), centres)
    assert torch.equal(out, torch.stack(expected))


# ---- the batch stage ----------------------------------------------------------------------


def _raw(samples=8, size=16, dtype=torch.uint8):
    images = torch.stack([torch.from_numpy(_photo(size, size, s)).permute(2, 0, 1)
                          for s in range(samples)]).to(dtype)
    return images, torch.arange(samples) % 3


def test_batch_stage_takes_uint8_or_float_alike():
    images, labels = _raw()
    stage = BatchAugment(3, AugmentConfig.from_name("cutmix_mixup_randaugment_405"))
    from nfnets.data import RawBatch

    a = stage(RawBatch(images, labels, 2, 1234))
    b = stage(RawBatch(images.float(), labels, 2, 1234))
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert a.images.shape == (4, 3, 16, 16) and a.targets.shape == (4, 3) and a.skipped == 2
    assert torch.allclose(a.targets.sum(1), torch.ones(4))


def _folder(tmp_path, classes=2, per_class=8):
    for c in range(classes):
        for i in range(per_class):
            path = tmp_path / "train" / f"c{c}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_jpeg(40, 48, seed=c * 10 + i))
            if i == 0:
                (tmp_path / "val" / f"c{c}").mkdir(parents=True, exist_ok=True)
                (tmp_path / "val" / f"c{c}" / "0.jpg").write_bytes(_jpeg(40, 48))
    return tmp_path


def test_device_loader_equals_the_batch_stage_in_workers(tmp_path):
    """The device-side stage (here on the CPU) gives the batches TrainCollate gives in the
    workers: placement does not change the data."""
    train, _ = imagenet_datasets(_folder(tmp_path), 16, 16)
    augment = AugmentConfig.from_name("cutmix_mixup_randaugment_405")
    in_workers, sampler = train_loader(train, batch_size=4, augment=augment, seed=3)
    sampler.set_epoch(1)
    expected = list(in_workers)
    raw_loader = torch.utils.data.DataLoader(
        train, batch_size=8, sampler=sampler, collate_fn=collate_raw)
    on_device = DeviceLoader(raw_loader, "cpu", BatchAugment(2, augment))
    got = list(on_device)
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


def test_exact_mode_keeps_float_per_worker_pipeline(tmp_path):
    train, _ = imagenet_datasets(_folder(tmp_path), 16, 16, exact=True)
    assert isinstance(train.transform, TrainTransform)
    sampler = ResumableSampler(len(train), batch_size=8, seed=0)
    keys = list(sampler)[:8]
    batch = TrainCollate(2, AugmentConfig())([train[k] for k in keys])
    assert batch.images.dtype == torch.float32 and batch.images.shape == (8, 3, 16, 16)


# ---- folder scan: symlinks and what is ignored ---------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_symlinked_folders_are_walked_once(tmp_path):
    _folder(tmp_path, classes=2, per_class=2)
    (tmp_path / "train" / "c1" / "loop").symlink_to("..", target_is_directory=True)
    (tmp_path / "train" / "c0" / "also_c1").symlink_to("../c1", target_is_directory=True)
    (tmp_path / "train" / "c0" / "notes.txt").write_text("x")
    (tmp_path / "train" / "c0" / ".hidden").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ImageFolderDataset(tmp_path, "train", TrainTransform(8))
    # c0's link into c1 adds nothing (c1's images keep label 1); the loop back up to train/
    # reaches only class folders, which are not walked twice
    paths = [str(dataset.path(i).relative_to(tmp_path / "train")) for i in range(len(dataset))]
    assert paths == ["c0/0.jpg", "c0/1.jpg", "c1/0.jpg", "c1/1.jpg"]
    assert [int(x) for x in dataset._labels] == [0, 0, 1, 1]
    messages = [str(w.message) for w in caught if issubclass(w.category, IgnoredFilesWarning)]
    assert len(messages) == 1
    assert "1 hidden entries" in messages[0] and "1 non-image files" in messages[0]
    assert "folders already walked (symlinks)" in messages[0]


def test_loaders_freeze_the_gc_in_workers(tmp_path):
    """Workers freeze the GC's view of inherited objects (no copy-on-access of the parent's
    heap; bench_input.py measures the effect)."""
    from nfnets.data import eval_loader, worker_init

    train, val = imagenet_datasets(_folder(tmp_path, per_class=2), 16, 16)
    loader, _ = train_loader(train, batch_size=2, augment=AugmentConfig(), num_workers=1)
    assert loader.worker_init_fn is worker_init
    assert eval_loader(val, batch_size=2, num_workers=1).worker_init_fn is worker_init
    # and keep OpenCV (the fast resize) on the worker's thread
    threads = torch.utils.data.DataLoader(_CvThreads(), num_workers=1, batch_size=None,
                                          worker_init_fn=worker_init)
    assert list(threads) == [1]


class _CvThreads(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        import cv2

        return cv2.getNumThreads()


def test_resize_uint8_is_within_one_level_of_the_exact_resize():
    """The fast resize (OpenCV's fixed-point bicubic) against the exact mode's float32 resize,
    clamped and rounded: never more than one level apart, down- and upscaling; flipping the
    output instead of the crop moves no pixel by more than one level either; a strided crop
    gives what its contiguous copy gives."""
    gen = _gen(3)
    off_by_one = 0
    for _ in range(40):
        height, width = (int(x) for x in torch.randint(8, 300, (2,), generator=gen))
        image = torch.from_numpy(_photo(height + 7, width + 9, int(height))).permute(2, 0, 1)
        crop = image[:, 3 : 3 + height, 5 : 5 + width]  # strided, like a crop of a decode
        out = resize_uint8(crop, 48, 56)
        assert out.shape == (3, 48, 56) and out.dtype == torch.uint8
        exact = torch.nn.functional.interpolate(crop[None].float(), size=(48, 56),
                                                mode="bicubic")[0].clamp(0, 255).round()
        difference = (out.float() - exact).abs()
        assert difference.max() <= 1
        off_by_one += int(difference.sum())
        flipped = resize_uint8(crop.flip(-1), 48, 56).flip(-1)
        assert (flipped.int() - out.int()).abs().max() <= 1
        assert torch.equal(out, resize_uint8(crop.contiguous(), 48, 56))
    assert off_by_one < 0.001 * 40 * 3 * 48 * 56
