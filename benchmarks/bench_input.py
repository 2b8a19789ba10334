"""Training input pipeline throughput per CPU core: nfnets (fast and exact) against timm.

Builds an ImageNet-like folder (``--classes`` classes of ``--per-class`` JPEGs at quality 90,
made from scikit-image's bundled colour photos resized to 500x375 and 375x500), then, in one
process and one thread, by the process's CPU time (so samples/s is per core, and time lost to
other processes on a shared machine does not count), times these cases interleaved over
``--rounds`` rounds after a warm-up, and reports the median and the spread:

- ``ours_cpu``: what nfnets' workers do in the default fast mode (``FastTrainTransform``:
  decoding only the crop through libturbojpeg, at reduced size when the crop allows, uint8
  resize, flip; 2B images per B output samples, stacked by ``collate_raw``);
- ``ours_cpu_whole_decode``: the same where libturbojpeg is missing: whole images decoded
  (simplejpeg), then cropped (``whole_image_decoding``; the same pixels);
- ``ours_total``: the same plus the batch stage on the CPU (``BatchAugment``: half MixUp, half
  CutMix, RandAugment 4 layers M=5, normalisation, soft targets): F0's recipe;
- ``exact_total``: the exact mode (``TrainTransform`` in float32, then the batch stage), the
  pipeline before the fast mode existed;
- ``timm``: timm's training loader at the same output batch and size, ``rand-m5-n4``,
  bicubic, then ``timm.data.Mixup`` (batch mode, MixUp 0.2 / CutMix 1.0 switching, smoothing
  0.1) on each batch (B images per B samples: timm decodes half as many images);
- ``decode``: the floor, PIL decoding each JPEG at full size (images/s);
- ``decode_simplejpeg``: the same with the decoder the fast mode uses (same pixels).

Worker memory: two DataLoader workers read a 100,000-entry file list (tiny JPEGs, so the epoch
is quick) once through; each reports its private memory (USS: Private_Clean + Private_Dirty
from /proc/self/smaps_rollup, the pages no longer shared with the parent) after its first and
last batch. nfnets keeps the list in numpy arrays; the same dataset with Python lists is the
baseline that shows the growth copy-on-access causes (reading a list item writes its
refcount, so each touched page is copied into the worker).

It also measures the fast mode's deviation from the exact mode: the PSNR of the per-image stage
(same seeds, so the same crops and flips; exact values clipped to 0-255) and of whole batches
after the batch stage (the same random choices in both), over the same batch.

Usage::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_input.py [--rounds 7]

Prints a JSON object (``ours_cpu_per_core``, ``ours_total_per_core``, ``timm_per_core``,
``decode_per_core`` and the rest) and writes it to ``--out``. Needs timm and scikit-image
(``pip install timm scikit-image``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from report import save_result

from nfnets.augment import AugmentConfig
from nfnets.data import (
    BatchAugment,
    ImageFolderDataset,
    ResumableSampler,
    collate_raw,
    imagenet_datasets,
    turbojpeg_library,
    whole_image_decoding,
    worker_init,
)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
          "coins", "camera", "cat", "retina")  # greys are converted to RGB


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=3, help="batches per case per round")
    parser.add_argument("--batch", type=int, default=16, help="output batch B")
    parser.add_argument("--size", type=int, default=192, help="train size (F0: 192)")
    parser.add_argument("--augment", default="cutmix_mixup_randaugment_405")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=24)
    parser.add_argument("--memory-entries", type=int, default=100_000,
                        help="file-list length of the worker memory check (0: skip it)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/input.json"))
    return parser.parse_args()


def make_folder(root: Path, classes: int, per_class: int) -> list[Path]:
    """ImageNet-like JPEGs from real photos, half landscape 500x375, half portrait 375x500."""
    import skimage.data

    photos = []
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        photos.append(Image.fromarray(array).convert("RGB"))
    files = []
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class if split == "train" else 1):
                photo = photos[(c * per_class + i) % len(photos)]
                size = (500, 375) if i % 2 == 0 else (375, 500)
                # a different crop of the photo each time, so images differ
                w, h = photo.size
                box = (i % 7 * w // 40, i % 5 * h // 30, w - i % 3 * w // 50, h - i % 4 * h // 40)
                path = folder / f"{i:04d}.jpg"
                photo.resize(size, Image.BICUBIC, box=box).save(path, quality=90)
                files.append(path)
    return files


class OursCase:
    """nfnets' loader work for one batch, in this process: keys -> samples -> raw batch
    (-> the batch stage)."""

    def __init__(self, dataset, batch: int, augment: AugmentConfig, stage: bool,
                 whole_decode: bool = False) -> None:
        self.dataset = dataset
        self.whole_decode = whole_decode
        self.raw = augment.raw_batch_size(batch)
        self.sampler = ResumableSampler(len(dataset), batch_size=self.raw, seed=0)
        self.stage = BatchAugment(len(dataset.classes), augment) if stage else None
        self.keys = iter(())
        self.epoch = 0

    def _key(self):
        key = next(self.keys, None)
        if key is None:
            self.epoch += 1
            self.sampler.set_epoch(self.epoch)
            self.keys = iter(self.sampler)
            key = next(self.keys)
        return key

    def __call__(self) -> None:
        with whole_image_decoding() if self.whole_decode else contextlib.nullcontext():
            raw = collate_raw([self.dataset[self._key()] for _ in range(self.raw)])
        if self.stage is not None:
            self.stage(raw)


class TimmCase:
    def __init__(self, root: Path, batch: int, size: int, classes: int) -> None:
        from timm.data import Mixup, create_dataset, create_loader

        dataset = create_dataset("", root=str(root), split="train", is_training=True)
        self.loader = create_loader(
            dataset, input_size=(3, size, size), batch_size=batch, is_training=True,
            auto_augment="rand-m5-n4", interpolation="bicubic", use_prefetcher=False,
            num_workers=0, persistent_workers=False, device=torch.device("cpu"))
        self.mixup = Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, mode="batch",
                           label_smoothing=0.1, num_classes=classes)
        self.batches = iter(())

    def __call__(self) -> None:
        batch = next(self.batches, None)
        if batch is None:
            self.batches = iter(self.loader)
            batch = next(self.batches)
        self.mixup(*batch)


def decode_case(files: list[bytes], turbo: bool = False) -> Callable[[], None]:
    """Decode the next file at full size: PIL, or simplejpeg (what the fast mode uses)."""
    from nfnets.data.decode import decode_jpeg

    state = {"i": 0}

    def run() -> None:
        data = files[state["i"] % len(files)]
        state["i"] += 1
        if turbo:
            decode_jpeg(data)
            return
        with Image.open(io.BytesIO(data)) as img:
            img.load()

    return run


def timed(fn: Callable[[], None], repeats: int) -> float:
    """CPU seconds this process spent on ``repeats`` calls: per-core work, which time spent
    waiting for a core that other processes hold on a shared machine does not inflate."""
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return time.process_time() - start


def _private_mb() -> float:
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


class _ListFiles(ImageFolderDataset):
    """The baseline: the same dataset holding its file list and labels in Python lists."""

    def __init__(self, base: ImageFolderDataset) -> None:
        self.__dict__.update(base.__dict__)
        self._files = [os.fsdecode(f) for f in base._files]
        self._labels = [int(x) for x in base._labels]

    def path(self, index: int) -> Path:
        return self.split_dir / self._files[index]


def _memory_collate(samples):
    return _private_mb()


class _ReadOnly:
    """Reads the file, returns a constant: the memory check times file-list access, not
    decoding."""

    decodes_itself = True

    def __call__(self, data, generator=None):
        return torch.zeros(3, 1, 1, dtype=torch.uint8)


def worker_memory(root: Path, entries: int = 100_000, workers: int = 2) -> dict[str, dict]:
    """Growth of each worker's private memory over one pass of ``entries`` items."""
    base = ImageFolderDataset(root, "train", _ReadOnly())
    reps = -(-entries // len(base))
    base._files = np.tile(base._files, reps)[:entries]
    base._labels = np.tile(base._labels, reps)[:entries]
    results = {}
    for name, dataset in (("numpy_arrays", base), ("python_lists", _ListFiles(base))):
        # interleaved order, so every worker walks the whole list
        loader = torch.utils.data.DataLoader(dataset, batch_size=500, num_workers=workers,
                                             collate_fn=_memory_collate, shuffle=False,
                                             worker_init_fn=worker_init)
        readings = list(loader)
        first, last = readings[:workers], readings[-workers:]
        results[name] = {"private_mb_first_batch": [round(x, 1) for x in first],
                         "private_mb_last_batch": [round(x, 1) for x in last],
                         "growth_mb": round(max(b - a for a, b in zip(first, last,
                                                                      strict=True)), 1)}
    return results


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two 0-255 batches."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def deviation(root: Path, batch: int, size: int, augment: AugmentConfig) -> dict[str, float]:
    """Fast vs exact on the same keys and batch seed."""
    fast, _ = imagenet_datasets(root, size, size)
    exact, _ = imagenet_datasets(root, size, size, exact=True)
    raw = augment.raw_batch_size(batch)
    sampler = ResumableSampler(len(fast), batch_size=raw, seed=1)
    keys = list(sampler)[:raw]
    fast_raw = collate_raw([fast[k] for k in keys])
    exact_raw = collate_raw([exact[k] for k in keys])
    stage = BatchAugment(len(fast.classes), augment)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    fast_out = stage(fast_raw).images * std + mean
    exact_out = stage(exact_raw).images * std + mean
    no_ra = BatchAugment(len(fast.classes), AugmentConfig(augment.mixup, augment.cutmix))
    return {
        "psnr_per_image_db": round(psnr(fast_raw.images, exact_raw.images.clamp(0, 255)), 2),
        # the same against the exact pixels rounded to uint8 (what rounding alone costs is
        # about 58.9 dB: uniform error of half a level)
        "psnr_per_image_vs_rounded_exact_db": round(
            psnr(fast_raw.images, exact_raw.images.clamp(0, 255).round()), 2),
        "pixels_differing_from_rounded_exact": round(float(
            (fast_raw.images.float() != exact_raw.images.clamp(0, 255).round()).float().mean()),
            6),
        "psnr_after_mixing_db": round(psnr(no_ra(fast_raw).images * std + mean,
                                           no_ra(exact_raw).images * std + mean), 2),
        "psnr_batch_db": round(psnr(fast_out, exact_out), 2),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # the fast resize, on this thread only (as in nfnets' workers)
    augment = AugmentConfig.from_name(args.augment)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        memory = {}
        if args.memory_entries:  # first, while this process holds little besides the imports
            tiny = root / "tiny"
            for c in range(2):
                (tiny / "train" / f"c{c}").mkdir(parents=True)
                for i in range(50):
                    Image.new("RGB", (16, 12), (c * 90, i * 5, 30)).save(
                        tiny / "train" / f"c{c}" / f"{i:08d}.jpg")
            memory = {"worker_memory": {"entries": args.memory_entries, "workers": 2,
                                        **worker_memory(tiny, args.memory_entries)}}
        files = make_folder(root, args.classes, args.per_class)
        train_files = [p.read_bytes() for p in files if "/train/" in str(p)]
        fast = ImageFolderDataset(root, "train", imagenet_datasets(root, args.size, 8)[0].transform)
        exact = imagenet_datasets(root, args.size, 8, exact=True)[0]
        b = args.batch
        cases: dict[str, tuple[Callable[[], None], int]] = {
            # (one call, output samples per call)
            "ours_cpu": (OursCase(fast, b, augment, stage=False), b),
            "ours_cpu_whole_decode": (OursCase(fast, b, augment, stage=False,
                                               whole_decode=True), b),
            "ours_total": (OursCase(fast, b, augment, stage=True), b),
            "exact_total": (OursCase(exact, b, augment, stage=True), b),
            "timm": (TimmCase(root, b, args.size, args.classes), b),
            "decode": (decode_case(train_files), 1),
            "decode_simplejpeg": (decode_case(train_files, turbo=True), 1),
        }
        repeats = {name: args.batches * (b if name.startswith("decode") else 1)
                   for name in cases}
        for fn, _ in cases.values():  # warm-up
            timed(fn, 1)
        rates: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (fn, per_call) in cases.items():
                seconds = timed(fn, repeats[name])
                rates[name].append(repeats[name] * per_call / seconds)
        dev = deviation(root, b, args.size, augment)
    median = {name: round(statistics.median(r), 1) for name, r in rates.items()}
    result = {
        "command": "PYTHONPATH=src OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
        "versions": {"torch": torch.__version__, "pillow": Image.__version__,
                     "timm": __import__("timm").__version__},
        "libturbojpeg": turbojpeg_library(),
        "settings": {"batch": b, "size": args.size, "augment": args.augment,
                     "rounds": args.rounds, "batches_per_round": args.batches,
                     "images": "500x375 / 375x500 JPEG q90 from scikit-image photos",
                     "threads": 1, "clock": "process CPU time",
                     "unit": "output samples/s (decode: images/s), one core"},
        **{f"{name}_per_core": value for name, value in median.items()},
        "spread_per_core": {name: [round(min(r), 1), round(max(r), 1)]
                            for name, r in rates.items()},
        "samples_per_core": {name: [round(x, 1) for x in r] for name, r in rates.items()},
        "ratios": {
            "ours_cpu / timm": round(median["ours_cpu"] / median["timm"], 2),
            "ours_cpu_whole_decode / timm": round(median["ours_cpu_whole_decode"]
                                                  / median["timm"], 2),
            "ours_total / timm": round(median["ours_total"] / median["timm"], 2),
            "exact_total / timm": round(median["exact_total"] / median["timm"], 2),
            "ours_total / exact_total": round(median["ours_total"] / median["exact_total"], 2),
        },
        # each round's cases run back to back, so a ratio within a round is less exposed to
        # a shared machine's slow and fast phases than the ratio of medians over rounds
        "ratios_per_round_median": {
            f"{a} / {b}": round(statistics.median(x / y for x, y in zip(rates[a], rates[b],
                                                                        strict=True)), 2)
            for a, b in (("ours_cpu", "timm"), ("ours_cpu_whole_decode", "timm"),
                         ("ours_cpu", "ours_cpu_whole_decode"), ("ours_total", "timm"))
        },
        **dev,
        **memory,
    }
    save_result(args.out, result)


if __name__ == "__main__":
    main()
