"""Decoding only a JPEG's crop (libjpeg-turbo's TurboJPEG 3 API through ctypes): the pixels
equal the whole image's decode cropped afterwards, for every subsampling, grey and progressive
files, odd sizes, crops touching every edge and each DCT scale; bad files raise; the fallback
without the library gives the same pixels."""

import importlib.util
import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

import nfnets.data.jpeg_region as jpeg_region
from nfnets.data import FastTrainTransform, train_crop_box
from nfnets.data.decode import jpeg_size
from nfnets.data.jpeg_region import decode_jpeg_region, turbojpeg_library, whole_image_decoding


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    """Texture with sharp colour edges: chroma upsampling errors at a crop edge would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = [128 + 100 * np.sin(x / (3 + c) + rng.uniform(0, 6)) * np.cos(y / (5 + c))
            for c in range(3)]
    image = np.stack(base, -1) + rng.normal(0, 12, (height, width, 3))
    image[:, width // 3 : width // 3 + 5] = (255, 0, 0)  # saturated stripes
    image[height // 2 : height // 2 + 3] = (0, 0, 255)
    return np.clip(image, 0, 255).astype(np.uint8)


def _jpeg(height, width, seed=0, **save) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(_photo(height, width, seed))
    if save.pop("grey", False):
        image = image.convert("L")
    image.save(buffer, format="JPEG", quality=save.pop("quality", 90), **save)
    return buffer.getvalue()


def _reference(data: bytes, box, scale: int) -> np.ndarray:
    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    whole = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // scale),
                                   min_width=-(-width // scale))
    top, left, h, w = box
    return whole[top : top + h, left : left + w]


def _boxes(height: int, width: int, rng: np.random.Generator, count: int):
    """Random boxes plus boxes at every edge, the whole image and single pixels."""
    yield 0, 0, height, width
    yield 0, 0, 1, 1
    yield height - 1, width - 1, 1, 1
    yield 0, width - 5, height, 5
    yield height - 3, 0, 3, width
    for _ in range(count):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        yield int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w


needs_turbo = pytest.mark.skipif(turbojpeg_library() is None,
                                 reason="no libturbojpeg 3 here (the fallback is tested below)")

FILES = {
    "420": dict(subsampling=2),
    "422": dict(subsampling=1),
    "444": dict(subsampling=0),
    "grey": dict(grey=True),
    "progressive": dict(progressive=True, subsampling=2),
    "q75": dict(quality=75, subsampling=2),
}


def test_the_bundled_library_is_found_where_the_turbojpeg_wheel_is_installed():
    if importlib.util.find_spec("turbojpeg") is None:
        pytest.skip("the turbojpeg wheel is not installed here")
    assert turbojpeg_library() is not None


@needs_turbo
@pytest.mark.parametrize("kind", sorted(FILES))
@pytest.mark.parametrize("shape", [(123, 171), (375, 500), (64, 48)])
def test_region_equals_the_whole_decode_cropped(kind, shape, monkeypatch):
    def no_fallback(*args):
        raise AssertionError("fell back to decoding the whole image")

    monkeypatch.setattr(jpeg_region, "_decode_whole_and_crop", no_fallback)
    data = _jpeg(*shape, seed=len(kind), **dict(FILES[kind]))
    rng = np.random.default_rng(sum(shape))
    for scale in (1, 2, 4, 8):
        height, width = -(-shape[0] // scale), -(-shape[1] // scale)
        for box in _boxes(height, width, rng, 25):
            out = decode_jpeg_region(data, box, scale, shape)
            assert out.flags.c_contiguous and out.dtype == np.uint8
            reference = _reference(data, box, scale)
            np.testing.assert_array_equal(out, reference,
                                          err_msg=f"{kind} {shape} scale {scale} box {box}")


@pytest.mark.parametrize("kind", ["420", "grey"])
def test_without_the_library_the_whole_image_is_decoded_and_cropped(kind, monkeypatch):
    monkeypatch.setitem(jpeg_region._state, "lib", None)
    monkeypatch.setitem(jpeg_region._state, "path", None)
    assert turbojpeg_library() is None
    data = _jpeg(90, 130, **dict(FILES[kind]))
    for box, scale in (((5, 7, 40, 61), 1), ((0, 3, 20, 30), 2), ((2, 1, 9, 14), 4)):
        out = decode_jpeg_region(data, box, scale)
        assert out.flags.c_contiguous
        np.testing.assert_array_equal(out, _reference(data, box, scale))


@needs_turbo
def test_whole_image_decoding_switches_the_library_off_in_its_context(monkeypatch):
    calls = []
    whole = jpeg_region._decode_whole_and_crop
    monkeypatch.setattr(jpeg_region, "_decode_whole_and_crop",
                        lambda *args: calls.append(1) or whole(*args))
    data, box = _jpeg(90, 130), (5, 7, 40, 61)
    region = decode_jpeg_region(data, box)
    assert not calls
    with whole_image_decoding():
        assert np.array_equal(decode_jpeg_region(data, box), region)
    assert calls == [1]
    decode_jpeg_region(data, box)
    assert calls == [1]


def test_the_environment_variable_chooses_or_refuses_the_library(tmp_path):
    code = ("from nfnets.data import turbojpeg_library as t, jpeg_decoding as j\n"
            "print(t()); print(j())")
    env = dict(os.environ, NFNETS_TURBOJPEG="off")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "None" and "decoded whole" in out[1]
    not_a_library = tmp_path / "libturbojpeg.so"
    not_a_library.write_bytes(b"not ELF")
    env[jpeg_region.ENV_VAR] = str(not_a_library)  # unloadable: the next candidates are tried
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] != str(not_a_library)
    if turbojpeg_library() is not None:
        env[jpeg_region.ENV_VAR] = turbojpeg_library()
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.splitlines()
        assert out[0] == turbojpeg_library() and "decoded alone" in out[1]


def test_fast_transform_gives_the_same_pixels_from_bytes_as_from_the_decoded_image():
    """Crop-only decoding changes no pixel: the transform on the file equals the transform on
    the decoded image, flipped or not (crops that allow no DCT scaling)."""
    data = _jpeg(375, 500, seed=7)
    image = torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1)
    fast = FastTrainTransform(192)
    flips = set()
    for seed in range(12):
        from_bytes = fast(data, torch.Generator().manual_seed(seed))
        assert torch.equal(from_bytes, fast(image, torch.Generator().manual_seed(seed))), seed
        generator = torch.Generator().manual_seed(seed)
        train_crop_box(375, 500, 192, generator)
        flips.add(float(torch.rand(1, generator=generator)) < 0.5)
    assert flips == {True, False}


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_bad_data_raises_value_error(damage):
    data = _jpeg(120, 160, seed=3)
    bad = data[: len(data) // 2] if damage == "truncated" else \
        data[:700] + bytes(range(256)) * 8 + data[700 + 2048:]
    with pytest.raises(ValueError):
        decode_jpeg_region(bad, (60, 10, 50, 100), 1, (120, 160))


def test_a_header_claiming_huge_dimensions_is_refused_before_decoding():
    data = bytearray(_jpeg(16, 16))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    with pytest.raises(ValueError, match="exceeds the limit"):
        jpeg_size(bytes(data))


def test_bytearrays_and_memoryviews_decode_like_bytes():
    data = _jpeg(60, 80)
    box = (3, 5, 40, 50)
    expected = _reference(data, box, 1)
    for view in (bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(decode_jpeg_region(view, box), expected)


@needs_turbo
def test_threads_use_their_own_decompressors():
    files = [_jpeg(100, 140, seed=s) for s in range(4)]
    box = (10, 21, 70, 90)
    expected = [_reference(f, box, 1) for f in files]
    errors = []

    def work(i):
        for _ in range(20):
            if not np.array_equal(decode_jpeg_region(files[i], box), expected[i]):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
