"""Tests of nfnets.augment: MixUp/CutMix, soft targets, RandAugment ops and name parsing."""

import pytest
import torch

from nfnets.augment import (
    RAND_AUGMENT_OPS,
    AugmentConfig,
    RandAugmentLevel,
    apply_op,
    cutmix_box,
    make_targets,
    mix_batch,
    parse_augment_level,
    rand_augment,
    rand_augment_batch,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _indexed_batch(n: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Image k is the constant k; label k is 100 + k, so every output row names its sources."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size)
    return images.clone(), torch.arange(n) + 100


# ---- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "level, expected",
    [
        ("405", (4, 5)),
        ("410", (4, 10)),
        ("415", (4, 15)),
        (415, (4, 15)),
        ("15", (2, 15)),
        ("100", (2, 100)),
        ("cutmix_mixup_randaugment_405", (4, 5)),
        ("210", (2, 10)),
    ],
)
def test_parse_augment_level(level, expected):
    assert parse_augment_level(level) == RandAugmentLevel(*expected)


@pytest.mark.parametrize("bad", ["abc", "randaugment", "-5", "4.5"])
def test_parse_augment_level_rejects(bad):
    with pytest.raises(ValueError, match="RandAugment level must be"):
        parse_augment_level(bad)


def test_augment_config_from_name():
    nfnet = AugmentConfig.from_name("cutmix_mixup_randaugment_405")
    assert nfnet == AugmentConfig(True, True, 0.2, RandAugmentLevel(4, 5))
    assert nfnet.raw_batch_size(8) == 16
    custom = AugmentConfig.from_name("mixup_0.4_randaugment_415")
    assert (custom.mixup, custom.cutmix, custom.mixup_alpha) == (True, False, 0.4)
    assert custom.randaugment == (4, 15)
    assert AugmentConfig.from_name("cutmix").randaugment is None
    off = AugmentConfig.from_name("none")
    assert not off.mixing and off.raw_batch_size(8) == 8 and off.randaugment is None
    with pytest.raises(ValueError, match="unknown word 'cutmx'"):
        AugmentConfig.from_name("cutmx_mixup")
    with pytest.raises(ValueError, match="odd"):
        nfnet.raw_batch_size(7)


# ---- mixing ------------------------------------------------------------------------------------


def test_mix_batch_halves_use_official_partners():
    images, labels = _indexed_batch(16)  # 2B = 16, B = 8, q = 4
    out = mix_batch(images, labels, generator=_gen())
    assert out.images.shape == (8, 3, 8, 8)
    q = 4
    for i in range(q):  # MixUp rows: r * X[i] + (1 - r) * X[q + i]
        r = float(out.ratios[i])
        assert torch.allclose(out.images[i], torch.full((3, 8, 8), r * i + (1 - r) * (q + i)))
        assert (int(out.labels[i]), int(out.mix_labels[i])) == (100 + i, 100 + q + i)
    for i in range(q):  # CutMix rows: X[2q + i] inside the box, X[3q + i] outside
        row = out.images[q + i]
        assert set(row.unique().tolist()) <= {2 * q + i, 3 * q + i}
        inside = (row[0] == 2 * q + i).float().mean()
        assert float(out.ratios[q + i]) == pytest.approx(float(inside))
        assert (int(out.labels[q + i]), int(out.mix_labels[q + i])) == (
            100 + 2 * q + i,
            100 + 3 * q + i,
        )


@pytest.mark.parametrize("mixup, cutmix", [(True, False), (False, True)])
def test_single_mixing_mode_mixes_first_half_with_second(mixup, cutmix):
    images, labels = _indexed_batch(12)  # B = 6 (odd B is fine without the half/half split)
    out = mix_batch(images, labels, mixup=mixup, cutmix=cutmix, generator=_gen(1))
    assert out.images.shape[0] == 6
    assert out.labels.tolist() == list(range(100, 106))
    assert out.mix_labels.tolist() == list(range(106, 112))
    for i in range(6):
        r = float(out.ratios[i])
        assert float(out.images[i].mean()) == pytest.approx(r * i + (1 - r) * (6 + i), abs=1e-4)


def test_no_mixing_is_identity():
    images, labels = _indexed_batch(5)
    out = mix_batch(images, labels, mixup=False, cutmix=False)
    assert out.images is images and torch.equal(out.mix_labels, labels)
    assert torch.equal(out.ratios, torch.ones(5))


def test_mix_batch_rejects_bad_sizes():
    images, labels = _indexed_batch(6)  # B = 3 cannot be split half/half
    with pytest.raises(ValueError, match="even output batch"):
        mix_batch(images, labels)
    with pytest.raises(ValueError, match="even count"):
        mix_batch(*_indexed_batch(5), mixup=True, cutmix=False)


def test_cutmix_ratio_is_clipped_box_area():
    n, size = 64, 16
    ones, zeros = torch.ones(n, 3, size, size), torch.zeros(n, 3, size, size)
    out = mix_batch(
        torch.cat([ones, zeros]),
        torch.zeros(2 * n, dtype=torch.long),
        mixup=False,
        cutmix=True,
        generator=_gen(2),
    )
    for mask, ratio in zip(out.images[:, 0], out.ratios, strict=True):
        rows, cols = mask.any(dim=1), mask.any(dim=0)
        # the ones form one axis-aligned rectangle, and the ratio is its area
        assert mask.sum() == rows.sum() * cols.sum()
        assert float(ratio) == pytest.approx(float(rows.sum() * cols.sum()) / size**2)
    assert 0.0 <= float(out.ratios.min()) and float(out.ratios.max()) <= 1.0
    assert out.ratios.std() > 0.1  # box sizes vary


def test_cutmix_box_hand_cases():
    # W = H = 10, lam = 0.36 -> cut 0.8 -> r_w = 8, half 4; centre (1, 8): x [0, 5), y [4, 10)
    x1, y1, x2, y2 = cutmix_box(torch.tensor([1]), torch.tensor([8]), torch.tensor([0.36]), 10, 10)
    assert (int(x1), int(y1), int(x2), int(y2)) == (0, 4, 5, 10)
    # lam = 0 -> cut 1 -> half 5 on W = 10, centre 5: the whole width [0, 10)
    x1, _, x2, _ = cutmix_box(torch.tensor([5]), torch.tensor([5]), torch.tensor([0.0]), 10, 10)
    assert (int(x1), int(x2)) == (0, 10)
    # odd r_w loses a pixel: W = 9, cut 1 -> r_w 9, half 4 -> width 8 around centre 4
    x1, _, x2, _ = cutmix_box(torch.tensor([4]), torch.tensor([4]), torch.tensor([0.0]), 9, 9)
    assert (int(x1), int(x2)) == (0, 8)


def test_mixup_ratio_follows_beta_alpha():
    images, labels = _indexed_batch(4000, size=1)
    sharp = mix_batch(images, labels, cutmix=False, mixup_alpha=0.2, generator=_gen(3)).ratios
    flat = mix_batch(images, labels, cutmix=False, mixup_alpha=50.0, generator=_gen(3)).ratios
    assert 0.0 <= float(sharp.min()) and float(sharp.max()) <= 1.0
    # Beta(0.2, 0.2) piles up near 0 and 1 (about 61% outside [0.1, 0.9]); Beta(50, 50) never
    extreme = ((sharp < 0.1) | (sharp > 0.9)).float().mean()
    assert 0.5 < float(extreme) < 0.7
    assert float(((flat < 0.1) | (flat > 0.9)).float().mean()) == 0.0
    assert float(sharp.mean()) == pytest.approx(0.5, abs=0.03)


def test_mixing_is_reproducible_from_generator():
    images, labels = _indexed_batch(16)
    a = mix_batch(images, labels, generator=_gen(7))
    b = mix_batch(images, labels, generator=_gen(7))
    c = mix_batch(images, labels, generator=_gen(8))
    assert torch.equal(a.images, b.images) and torch.equal(a.ratios, b.ratios)
    assert not torch.equal(a.ratios, c.ratios)


# ---- targets -----------------------------------------------------------------------------------


def test_make_targets_formula():
    targets = make_targets(
        torch.tensor([0, 1]),
        torch.tensor([2, 1]),
        torch.tensor([0.7, 0.25]),
        num_classes=4,
        smoothing=0.1,
    )
    # mix first (0.7 / 0.3), then smooth: 0.9 * y + 0.1 / 4
    expected = torch.tensor(
        [[0.7 * 0.9 + 0.025, 0.025, 0.3 * 0.9 + 0.025, 0.025], [0.025, 0.9 + 0.025, 0.025, 0.025]]
    )
    assert torch.allclose(targets, expected)
    plain = make_targets(torch.tensor([3]), None, None, num_classes=4, smoothing=0.0)
    assert plain.tolist() == [[0.0, 0.0, 0.0, 1.0]]


def test_make_targets_rows_sum_to_one():
    labels = torch.randint(0, 1000, (64,), generator=_gen())
    mix = torch.randint(0, 1000, (64,), generator=_gen(1))
    targets = make_targets(labels, mix, torch.rand(64, generator=_gen(2)), 1000)
    assert torch.allclose(targets.sum(dim=1), torch.ones(64))
    assert float(targets.min()) >= 0.1 / 1000 - 1e-9
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        make_targets(torch.tensor([10]), None, None, 10)


# ---- RandAugment -------------------------------------------------------------------------------


def _ramp(height: int = 16, width: int = 16) -> torch.Tensor:
    """3 x H x W uint8 whose values cover 0..255 across the image."""
    values = torch.arange(height * width).view(height, width) * 255 // (height * width - 1)
    return values.to(torch.uint8).expand(3, height, width).clone()


@pytest.mark.parametrize("magnitude, bits", [(5, 2), (10, 4), (15, 6), (20, 8)])
def test_posterize_keeps_int_m_over_10_times_4_bits(magnitude, bits):
    image = _ramp()
    out = apply_op(image, "Posterize", magnitude)
    keep = (0xFF >> (8 - bits)) << (8 - bits)  # the top `bits` bits
    assert torch.equal(out, image & keep)
    assert len(out.unique()) == min(2**bits, len(image.unique()))


@pytest.mark.parametrize("magnitude", [10, 15])
def test_solarize_is_noop_from_m10(magnitude):
    image = _ramp()
    assert torch.equal(apply_op(image, "Solarize", magnitude), image)


def test_solarize_threshold_128_at_m5():
    image = torch.tensor([0, 127, 128, 200, 255], dtype=torch.uint8).view(1, 1, 5).expand(3, 1, 5)
    out = apply_op(image.clone(), "Solarize", 5)
    assert out[0, 0].tolist() == [0, 127, 127, 55, 0]


@pytest.mark.parametrize("magnitude, add", [(5, 55), (10, 110), (15, 165)])
def test_solarize_add(magnitude, add):
    image = torch.tensor([0, 100, 127, 128, 250], dtype=torch.uint8).view(1, 1, 5).expand(3, 1, 5)
    out = apply_op(image.clone(), "SolarizeAdd", magnitude)
    assert out[0, 0].tolist() == [add, min(100 + add, 255), min(127 + add, 255), 128, 250]


@pytest.mark.parametrize("op", ["Color", "Contrast", "Brightness", "Sharpness"])
def test_enhance_ops_are_identity_at_m5(op):
    image = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8, generator=_gen())
    assert torch.equal(apply_op(image, op, 5), image)


@pytest.mark.parametrize("magnitude, factor", [(10, 1.9), (15, 2.8)])
def test_brightness_factor(magnitude, factor):
    image = torch.tensor([0, 50, 100], dtype=torch.uint8).view(1, 1, 3).expand(3, 1, 3).clone()
    out = apply_op(image, "Brightness", magnitude)
    assert out[0, 0].tolist() == [0, int(50 * factor), min(int(100 * factor), 255)]


def test_contrast_uses_official_pixel_count_grey():
    # official "mean" = pixel count / 256: 16 x 16 -> grey 1, whatever the image holds
    image = torch.full((3, 16, 16), 101, dtype=torch.uint8)
    out = apply_op(image, "Contrast", 10)  # factor 1.9: 1 + 1.9 * (101 - 1) = 191
    assert torch.equal(out, torch.full_like(image, 191))


def test_invert_autocontrast_equalize():
    image = torch.tensor([10, 20, 30, 40], dtype=torch.uint8).view(1, 2, 2).expand(3, 2, 2).clone()
    assert apply_op(image, "Invert", 5)[0].flatten().tolist() == [245, 235, 225, 215]
    # official TF: (x - 10) * 255 / 30 = [0, 85, 170, 255]; torchvision divides in float32 and
    # truncates, which may land one below (documented in docs/data.md)
    stretched = apply_op(image, "AutoContrast", 5)[0].flatten()
    assert (stretched - torch.tensor([0, 85, 170, 255])).abs().max() <= 1 and stretched[0] == 0
    # PIL/TF equalize: step = (1021 - 1) // 255 = 4; lut[v] = (pixels below v + 2) // 4
    values = torch.tensor([10] * 510 + [20] * 510 + [30], dtype=torch.uint8)
    out = apply_op(values.view(1, 1, -1).expand(3, 1, -1).clone(), "Equalize", 5)
    assert out[0, 0].unique().tolist() == [0, 128, 255]


def test_translate_is_absolute_pixels_with_grey_fill():
    image = torch.arange(120, dtype=torch.uint8).view(1, 1, 120).expand(3, 4, 120).clone()
    for seed in range(4):  # both signs occur
        row = apply_op(image, "TranslateX", 5, _gen(seed))[0, 0]  # +-50 px
        if int(row[0]) == 50:  # shifted left: input x + 50
            assert row[:70].tolist() == list(range(50, 120)) and set(row[70:].tolist()) == {128}
        else:
            assert set(row[:50].tolist()) == {128} and row[50:].tolist() == list(range(70))


def test_shear_matches_tf_projective_transform():
    # TF ShearX samples input (x + c * y, y); at M = 10, c = +-0.3 -> rows 10 and 20 move 3 and 6
    image = torch.arange(40, dtype=torch.uint8).view(1, 1, 40).expand(3, 30, 40).clone()
    out = apply_op(image, "ShearX", 10, _gen(0))[0]
    assert torch.equal(out[0], image[0, 0])
    shift = 3 if int(out[10, 0]) == 3 else -3
    for y, s in ((10, shift), (20, 2 * shift)):
        if s > 0:
            assert out[y, : 40 - s].tolist() == list(range(s, 40))
        else:
            assert set(out[y, :-s].tolist()) == {128} and out[y, -s:].tolist() == list(
                range(40 + s)
            )


def test_rotate_keeps_centre_and_fills_corners():
    image = torch.full((3, 21, 21), 7, dtype=torch.uint8)
    out = apply_op(image, "Rotate", 5, _gen())  # +-15 degrees about the centre
    assert int(out[0, 10, 10]) == 7 and int(out[0, 0, 0]) == 128
    assert int((out[0] == 128).sum()) > 0


@pytest.mark.parametrize("magnitude, side", [(5, 40), (10, 80), (15, 120)])
def test_cutout_half_size(magnitude, side):
    image = torch.zeros(3, 200, 200, dtype=torch.uint8)
    sizes = set()
    for seed in range(8):
        grey = apply_op(image, "Cutout", magnitude, _gen(seed))[0] == 128
        rows, cols = int(grey.any(1).sum()), int(grey.any(0).sum())
        assert int(grey.sum()) == rows * cols and rows <= side and cols <= side
        sizes.add((rows, cols))
    assert (side, side) in sizes  # an unclipped square is 2 x half-size per side


def test_rand_augment_chooses_all_ops_and_is_reproducible():
    image = _ramp(24, 24)
    a = rand_augment(image, 4, 10, _gen(5))
    assert torch.equal(a, rand_augment(image, 4, 10, _gen(5)))
    assert a.dtype == torch.uint8 and a.shape == image.shape
    assert torch.equal(rand_augment(image, 0, 10, _gen(5)), image)
    draws = torch.randint(0, len(RAND_AUGMENT_OPS), (2000,), generator=_gen())
    assert len(draws.unique()) == 16  # sanity of the uniform choice used per layer
    assert RAND_AUGMENT_OPS[0] == "AutoContrast" and RAND_AUGMENT_OPS[-1] == "SolarizeAdd"


def test_rand_augment_batch_clips_and_truncates():
    images = torch.tensor([-5.0, 12.7, 300.0, 254.99]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    out = rand_augment_batch(images, RandAugmentLevel(0, 5))
    assert out.dtype == torch.float32 and out[0, 0, 0].tolist() == [0.0, 12.0, 255.0, 254.0]


def test_apply_op_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown RandAugment op 'Blur'"):
        apply_op(_ramp(), "Blur", 5)
    with pytest.raises(ValueError, match="uint8 image"):
        apply_op(_ramp().float(), "Invert", 5)
