"""wds: and hf: sources, and nfnets prepare: tiny shards and datasets built on the fly."""

import functools
import http.server
import io
import json
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from nfnets.data import DataError, FastTrainTransform, collate_raw, open_datasets
from nfnets.data.shards import ShardDataset, shard_splits


class Probe:
    """A transform that returns the pixel that encodes the sample's index (3 x 1 x 1)."""

    def __call__(self, image, generator=None):
        return image[:, :1, :1].clone()


def _index(image: torch.Tensor) -> int:
    return int(image[0, 0, 0]) + 256 * int(image[1, 0, 0])


def _png(index: int, label: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 6), (index % 256, index // 256, label * 40)).save(out, format="PNG")
    return out.getvalue()


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _shard(path: Path, samples) -> None:
    """samples: (index, label or None, image bytes or None)."""
    with tarfile.open(path, "w") as tar:
        for index, label, image in samples:
            if image is not None:
                _add(tar, f"s{index:05d}.png", image)
            if label is not None:
                _add(tar, f"s{index:05d}.cls", str(label).encode())


def _shards(root: Path, split: str, shards: int, per_shard: int, start: int = 0,
            classes: int = 3) -> tuple[list[str], list[int]]:
    names, lengths = [], []
    for s in range(shards):
        indices = range(start + s * per_shard, start + (s + 1) * per_shard)
        name = f"{split}-{s:04d}.tar"
        _shard(root / name, [(i, i % classes, _png(i, i % classes)) for i in indices])
        names.append(name)
        lengths.append(per_shard)
    return names, lengths


def _wds_folder(root: Path, train=(6, 5), val=(2, 3), info=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    train_names, train_lengths = _shards(root, "train", *train)
    val_names, val_lengths = _shards(root, "val", *val, start=1000)
    if info:
        (root / "_info.json").write_text(json.dumps({
            "splits": {
                "train": {"name": "train", "num_samples": sum(train_lengths),
                          "filenames": train_names, "shard_lengths": train_lengths},
                "validation": {"name": "validation", "num_samples": sum(val_lengths),
                               "filenames": val_names, "shard_lengths": val_lengths}},
            "classes": ["ant", "bee", "cat"]}))
    return root


def _epoch(dataset: ShardDataset, *, batch=2, seed=0, rank=0, world=1, workers=0, epoch=0,
           skip=0) -> list[list[int]]:
    dataset.configure(batch_size=batch, seed=seed, rank=rank, world_size=world,
                      num_workers=workers)
    dataset.set_epoch(epoch, skip_batches=skip)
    loader = DataLoader(dataset, batch_size=batch, collate_fn=collate_raw, num_workers=workers)
    return [[_index(img) for img in raw.images] for raw in loader]


def _train_set(root: Path) -> ShardDataset:
    train, _, classes = shard_splits(str(root))
    return ShardDataset(train, classes, Probe())


# ---- wds: ---------------------------------------------------------------------------------


def test_wds_info_folder_gives_splits_classes_and_every_sample(tmp_path):
    root = _wds_folder(tmp_path / "shards")
    train, val = open_datasets(f"wds:{root}", 16, 16)
    assert train.classes == val.classes == ["ant", "bee", "cat"]
    assert train.num_samples == 30 and val.num_samples == 6
    assert isinstance(train.transform, FastTrainTransform)
    val.transform = Probe()
    val.configure(batch_size=4, shuffle=False, drop_last=False)
    seen = [_index(s.image) for s in val]
    assert sorted(seen) == list(range(1000, 1006))


def test_wds_ranks_read_disjoint_shares_with_equal_batches(tmp_path):
    dataset = _train_set(_wds_folder(tmp_path / "shards"))
    per_rank = [sum(_epoch(dataset, batch=3, rank=r, world=2, epoch=1), []) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == (30 // 2) // 3 * 3
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0])) == len(per_rank[0])  # no repeats within an epoch's share
    # a new epoch shuffles shards and samples differently; the same epoch repeats exactly
    assert _epoch(dataset, batch=3, epoch=1) == _epoch(dataset, batch=3, epoch=1)
    assert _epoch(dataset, batch=3, epoch=1) != _epoch(dataset, batch=3, epoch=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_wds_resume_mid_epoch_sees_the_same_batches(tmp_path, workers):
    dataset = _train_set(_wds_folder(tmp_path / "shards"))
    full = _epoch(dataset, batch=2, workers=workers, epoch=3, seed=5)
    # two workers split the rank's 15 batches 8 / 7 over 15 samples each: worker 0 starts its
    # shards again for its last sample, worker 1 leaves one out
    assert len(full) == 15 and len(set(sum(full, []))) == (30 if workers == 0 else 29)
    resumed = _epoch(dataset, batch=2, workers=workers, epoch=3, seed=5, skip=7)
    assert resumed == full[7:]


def test_wds_too_few_shards_for_the_readers(tmp_path):
    dataset = _train_set(_wds_folder(tmp_path / "shards"))
    with pytest.raises(DataError, match=r"6 shards cannot feed 2 rank\(s\) x 4 worker\(s\)"):
        dataset.configure(batch_size=2, world_size=2, num_workers=4)


def test_wds_bad_samples_and_truncated_shard_are_skipped_and_counted(tmp_path):
    root = tmp_path / "shards"
    _wds_folder(root)
    # shard 0: a sample without label, one without image, one that is not an image
    _shard(root / "train-0000.tar", [(0, 0, _png(0, 0)), (1, None, _png(1, 1)),
                                     (2, 2, None), (3, 0, b"not an image"), (4, 1, _png(4, 1))])
    data = (root / "train-0001.tar").read_bytes()
    (root / "train-0001.tar").write_bytes(data[: len(data) // 2])  # truncated
    dataset = _train_set(root)
    dataset.configure(batch_size=1, shuffle=False, drop_last=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = list(dataset)
    read = [_index(s.image) for s in samples]
    assert {0, 4} <= set(read) and not {1, 2, 3} & set(read)
    assert len(read) + sum(s.skipped for s in samples) == 30 - 0  # every sample is accounted


def test_wds_patterns_without_info_are_scanned(tmp_path):
    root = _wds_folder(tmp_path / "shards", info=False)
    train, val = open_datasets(f"wds:{root}/train-{{0000..0005}}.tar|{root}/val-*.tar", 16, 16)
    assert train.num_samples == 30 and val.num_samples == 6
    assert train.classes == ["0", "1", "2"]


def test_wds_errors_name_what_was_found(tmp_path):
    root = _wds_folder(tmp_path / "shards", info=False)
    with pytest.raises(DataError, match="matched no files"):
        open_datasets(f"wds:{root}/nope-{{0..3}}.tar|{root}/val-*.tar", 16, 16)
    with pytest.raises(DataError, match="no _info.json"):
        open_datasets(f"wds:{root}", 16, 16)
    _shard(root / "val-0000.tar", [(9, 7, _png(9, 7))])  # a class train never has
    with pytest.raises(DataError, match=r"different class sets: .* only in val: \[7\]"):
        open_datasets(f"wds:{root}/train-*.tar|{root}/val-*.tar", 16, 16)


def test_wds_over_http(tmp_path):
    root = _wds_folder(tmp_path / "shards")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        train, _ = open_datasets(f"wds:{url}", 16, 16)
        assert train.split.urls[0].startswith(url)
        train.transform = Probe()
        assert sorted(sum(_epoch(train, batch=5), [])) == list(range(30))
    finally:
        server.shutdown()
        server.server_close()


# ---- hf: ----------------------------------------------------------------------------------


def _hf_dict(val_names=("ant", "bee", "cat")):
    datasets = pytest.importorskip("datasets")

    def split(start, count, names):
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=list(names))})
        images = [Image.new("RGB", (8, 6), (i % 256, i // 256, 0)) for i in
                  range(start, start + count)]
        return datasets.Dataset.from_dict(
            {"image": images, "label": [i % len(names) for i in range(count)]},
            features=features)

    return datasets.DatasetDict({"train": split(0, 9, ("ant", "bee", "cat")),
                                 "validation": split(100, 3, val_names)})


def test_hf_save_to_disk_and_parquet(tmp_path):
    data = _hf_dict()
    data.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "pq").mkdir()
    data["train"].to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    data["validation"].to_parquet(str(tmp_path / "pq" / "validation-00000-of-00001.parquet"))
    for spec in (f"hf:{tmp_path / 'disk'}", f"hf:{tmp_path / 'pq'}"):
        train, val = open_datasets(spec, 8, 8)
        assert train.classes == val.classes == ["ant", "bee", "cat"]
        assert len(train) == 9 and len(val) == 3
        sample = train[(4, 123)]
        assert sample.label == 1 and sample.image.shape == (3, 8, 8)
        assert sample.image.dtype == torch.uint8
        train.transform = Probe()
        assert _index(train[4].image) == 4


def test_hf_errors(tmp_path):
    data = _hf_dict(val_names=("ant", "bee", "dog"))
    data.save_to_disk(str(tmp_path / "differ"))
    with pytest.raises(DataError, match=r"only in train: \[cat\]; only in val: \[dog\]"):
        open_datasets(f"hf:{tmp_path / 'differ'}", 8, 8)
    data = _hf_dict().remove_columns("label")
    data.save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(DataError, match=r"need an image column and a label column; found "
                                        r"columns \['image'\]"):
        open_datasets(f"hf:{tmp_path / 'nolabel'}", 8, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no save_to_disk dataset and no parquet files"):
        open_datasets(f"hf:{tmp_path / 'empty'}", 8, 8)


# ---- nfnets prepare -----------------------------------------------------------------------


def _folder(root: Path, per_class=5) -> Path:
    for split, count in (("train", per_class), ("val", 2)):
        for c, name in enumerate(("ant", "bee")):
            for i in range(count):
                path = root / split / name / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                rng = np.random.default_rng(c * 100 + i)
                Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(path)
    return root


def test_prepare_folder_to_shards_reads_back_and_resumes(tmp_path, capsys):
    from nfnets.cli import main

    src = _folder(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["prepare", str(src), "-o", str(out), "--shard-size", "3", "--workers", "2",
                 "--no-progress"]) == 0
    assert "train: 10 samples in 4 shards" in capsys.readouterr().out
    info = json.loads((out / "_info.json").read_text())
    assert info["classes"] == ["ant", "bee"] and info["splits"]["train"]["shard_lengths"] == [
        3, 3, 3, 1]
    train, val = open_datasets(f"wds:{out}", 16, 16)
    train.transform = Probe()
    train.configure(batch_size=1, shuffle=False, drop_last=False)
    labels = sorted(s.label for s in train)
    assert labels == [0] * 5 + [1] * 5
    # the original bytes are stored: sample 0 of shard 0 is one of the source files
    with tarfile.open(out / "train-000000.tar") as tar:
        first = tar.getmembers()[0]
        meta = json.loads(tar.extractfile(tar.getmembers()[2]).read())
        assert tar.extractfile(first).read() == Path(meta["source"]).read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "train-000002.tar").unlink()  # an interrupted run: one shard missing
    assert main(["prepare", str(src), "-o", str(out), "--shard-size", "3", "--no-progress"]) == 0
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert {k for k in again if again[k] != mtimes.get(k)} == {"train-000002.tar"}
    assert main(["prepare", str(src), "-o", str(out), "--shard-size", "4", "--no-progress"]) == 2


def test_prepare_max_size_resizes(tmp_path):
    from nfnets.data.writer import write_shards

    src = _folder(tmp_path / "src", per_class=1)
    info = write_shards(str(src), tmp_path / "out", shard_size=10, max_size=30, progress=False)
    assert info["splits"]["train"]["num_samples"] == 2
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        with Image.open(io.BytesIO(tar.extractfile(jpg).read())) as img:
            assert img.size == (40, 30)


def test_prepare_help(capsys):
    from nfnets.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--help"])
    assert exit_info.value.code == 0 and "--max-size" in capsys.readouterr().out


@pytest.mark.slow
def test_train_from_prepared_shards(tmp_path, capsys):
    """End to end: a folder -> nfnets prepare -> nfnets train --data wds:..."""
    from nfnets.cli import main

    src = tmp_path / "src"
    for split in ("train", "val"):
        for c, name in enumerate(("ant", "bee", "cat")):
            (src / split / name).mkdir(parents=True)
            for i in range(8):
                pixels = np.full((20, 24, 3), 60 * c + 3 * i, dtype=np.uint8)
                Image.fromarray(pixels).save(src / split / name / f"{i}.jpg")
    assert main(["prepare", str(src), "-o", str(tmp_path / "wds"), "--shard-size", "4",
                 "--no-progress"]) == 0
    code = main(["train", "--out", str(tmp_path / "run"), "--data", f"wds:{tmp_path / 'wds'}",
                 "--model-arg", "widths=[16,16,16,16]", "--model-arg", "depths=[1,1,1,1]",
                 "--model-arg", "group_width=8", "--train-size", "16", "--test-size", "16",
                 "--epochs", "1", "--batch-size", "4", "--num-workers", "2",
                 "--augment", "cutmix_mixup_randaugment_405", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 24 // 8 and summary["skipped_images"] == 0


def test_wds_shards_without_samples_stop_with_a_message(tmp_path):
    root = _wds_folder(tmp_path / "shards", train=(2, 3))
    for name in ("train-0000.tar", "train-0001.tar"):
        _shard(root / name, [(i, None, _png(i, 0)) for i in range(3)])  # no labels
    dataset = _train_set(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="hold no samples|could not be used"):
            _epoch(dataset, batch=2)
    # evaluation may have more readers than shards: idle readers yield nothing
    dataset.configure(batch_size=2, world_size=4, rank=3, shuffle=False, drop_last=False)
    assert list(dataset) == []


def test_prepare_from_shards_and_hf(tmp_path):
    """Any source can be written: streamed shards (in order) and a Hugging Face dataset."""
    from nfnets.data.writer import write_shards

    src = _wds_folder(tmp_path / "src", train=(2, 3), val=(1, 2))
    info = write_shards(f"wds:{src}", tmp_path / "from_wds", shard_size=4, progress=False)
    assert info["classes"] == ["ant", "bee", "cat"]
    assert info["splits"]["train"]["shard_lengths"] == [4, 2]
    train, _ = open_datasets(f"wds:{tmp_path / 'from_wds'}", 8, 8)
    train.transform = Probe()
    train.configure(batch_size=1, shuffle=False, drop_last=False)
    assert [_index(s.image) for s in train] == list(range(6))  # shard order is kept
    _hf_dict().save_to_disk(str(tmp_path / "hf"))
    info = write_shards(f"hf:{tmp_path / 'hf'}", tmp_path / "from_hf", shard_size=5,
                        workers=2, progress=False)
    assert info["splits"]["train"]["num_samples"] == 9 and info["skipped"] == 0
