"""Pretrained weights by name: DeepMind's released files as data, downloaded into a verified cache.

Each release is one :class:`OfficialRelease` record (as torchvision keeps its weights): the
official address and checksum, the train/test resolutions and the evaluation crop the model
was published with, its class names and the published top-1/top-5. ``fetch_release`` downloads
the file into PyTorch's hub cache (``torch.hub.get_dir()/checkpoints``, so ``TORCH_HOME`` moves
it) and returns its path; ``nfnets.create_model(name, pretrained=True)`` is built on it.

The download goes to a temp file beside the cache entry that is renamed only after its MD5
matches the record; a second call uses the cached file without touching the network. A cached
file that no longer matches its checksum (truncated by a full disk, edited, bit rot) is moved
aside and fetched again. ``NFNETS_WEIGHTS_URL`` replaces the official base address (a mirror,
a ``file://`` folder on an air-gapped cluster). Every failure is one line that names the URL,
the cache path and how to place the file by hand.

DeepMind released F0–F6 only (deepmind-research nfnets/README.md): no F7, no '+' variants,
no NF-ResNet or NF-RegNet weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, DownloadError, UsageError
from .files import atomic_write

__all__ = [
    "OFFICIAL_RELEASES",
    "URL_ENV",
    "OfficialRelease",
    "cache_dir",
    "cache_path",
    "check_override_shapes",
    "checksum_warning",
    "fetch_release",
    "file_md5",
    "get_release",
    "imagenet_classes",
    "missing_hint",
    "release_classes",
    "release_url",
]

#: Environment variable that replaces the official base address (mirrors, air-gapped clusters).
URL_ENV = "NFNETS_WEIGHTS_URL"
# deepmind-research nfnets/README.md and nfnet_demo_colab.ipynb.
OFFICIAL_BASE_URL = "https://storage.googleapis.com/dm-nfnets"
# The official evaluation squash-resizes to (S + 32)² and crops the centre S² (nfnets/dataset.py
# and the demo notebook); data.CROP_PADDING is the same constant for our own pipeline.
EVAL_CROP_PADDING = 32
_TIMEOUT_S = 60.0  # per socket operation, not for the whole download
_CHUNK = 1 << 20


@dataclass(frozen=True)
class OfficialRelease:
    """One released set of weights and everything needed to use it, as data.

    ``model_kwargs`` are the ``create_model`` options of the released architecture beyond its
    name (empty for DeepMind's files, which use the variant's defaults).
    """

    variant: str  # official name, e.g. "F0"
    model_name: str  # our model name, e.g. "nfnet_f0"
    md5: str  # third-party checksum: DeepMind's README lists none
    top1: float  # README = paper Table 3; non-SAM rows are 3-seed means
    top5: float
    train_size: int  # paper Table 1 / nfnets/base.py nfnet_params
    test_size: int
    num_params: int  # parameters stored in the file
    sam: bool  # F6 was trained with SAM (README "F6+SAM")
    file_size: int | None = None  # bytes, where known (F0: the demo's download log)
    num_classes: int = 1000
    classes: str = "imagenet"  # the class names: see release_classes()
    interpolation: str = "bicubic"  # the official demo resizes with PIL's bicubic
    crop_padding: int = EVAL_CROP_PADDING
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        """Name of the released file, e.g. ``F0_haiku.npz`` (a pickle despite the suffix)."""
        return f"{self.variant}_haiku.npz"

    @property
    def url(self) -> str:
        """The official download address."""
        return f"{OFFICIAL_BASE_URL}/{self.filename}"

    @property
    def eval_crop(self) -> float:
        """Fraction of the resized image the evaluation keeps: S / (S + 32) (0.889 for F0)."""
        return self.test_size / (self.test_size + self.crop_padding)

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON-ready data (for ``nfnets list --pretrained --json``)."""
        return {"model": self.model_name, "variant": self.variant, "url": release_url(self),
                "md5": self.md5, "file_size": self.file_size, "num_params": self.num_params,
                "train_size": self.train_size, "test_size": self.test_size,
                "eval_crop": round(self.eval_crop, 4), "interpolation": self.interpolation,
                "top1": self.top1, "top5": self.top5, "sam": self.sam,
                "num_classes": self.num_classes, "classes": self.classes}


# Published accuracy: deepmind-research nfnets/README.md (= paper Table 3); resolutions: paper
# Table 1 / nfnets/base.py nfnet_params; checksums: a third-party port's (DeepMind list none);
# the F0 size is from nfnet_demo_colab.ipynb's download log, the others are not published.
OFFICIAL_RELEASES: dict[str, OfficialRelease] = {
    r.model_name: r
    for r in (
        OfficialRelease("F0", "nfnet_f0", "0a41039da1cb43adf47f1b7d86ddfe0f",
                        83.6, 96.8, 192, 256, 71_489_284, False, file_size=285_976_842),
        OfficialRelease("F1", "nfnet_f1", "c9126bbfaf855f9ddb7ff3b902558781",
                        84.7, 97.1, 224, 320, 132_634_256, False),
        OfficialRelease("F2", "nfnet_f2", "7a018d8d1498020e2f5a8719a1e7f53f",
                        85.1, 97.3, 256, 352, 193_779_228, False),
        OfficialRelease("F3", "nfnet_f3", "d8e1e78d26db659c486150dbaccbe78a",
                        85.7, 97.5, 320, 416, 254_924_200, False),
        OfficialRelease("F4", "nfnet_f4", "f5974a7e3388aa81b91a9f1403e759a4",
                        85.9, 97.6, 384, 512, 316_069_172, False),
        OfficialRelease("F5", "nfnet_f5", "8639e925de951030651ac775b9f915c3",
                        86.0, 97.6, 416, 544, 377_214_144, False),
        OfficialRelease("F6", "nfnet_f6", "b16cca40ac1ecec2bd5e3273866da0c1",
                        86.5, 97.9, 448, 576, 438_359_116, True),
    )
}


def _released_names() -> str:
    return ", ".join(OFFICIAL_RELEASES)


def get_release(model_name: str) -> OfficialRelease:
    """The release record of ``model_name`` (our spelling, e.g. ``nfnet_f0``).

    Raises UsageError for variants DeepMind never released (F7, the '+' models, NF-ResNets,
    NF-RegNets), naming what was released and what to do instead.
    """
    release = OFFICIAL_RELEASES.get(model_name)
    if release is not None:
        return release
    if model_name.startswith("nfnet_f") and model_name.endswith("_plus"):
        what = "the '+' variants"
    elif model_name.startswith("nfnet_f"):
        what = model_name
    else:
        what = "NF-ResNets and NF-RegNets"
    raise UsageError(
        f"DeepMind released no weights for {what} (released: {_released_names()}); train it "
        "with `nfnets train`, or pass a weights file or an 'hf-hub:' name as pretrained"
    )


# --------------------------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------------------------


@cache
def imagenet_classes() -> tuple[str, ...]:
    """ImageNet-1k's 1000 class names in label order, shipped with the package.

    The standard list (one readable name per WordNet synset, in the synset-sorted label order
    of DeepMind's TFDS ``imagenet2012`` labels), as torchvision spells it: duplicate names made
    unique ("crane bird" and "crane", "maillot" and "maillot tank suit").
    """
    text = resources.files("nfnets").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != 1000:  # a damaged installation, not a user error
        raise RuntimeError(f"nfnets/imagenet_classes.txt holds {len(names)} names, not 1000")
    return names


_CLASS_SOURCES: dict[str, Callable[[], tuple[str, ...]]] = {"imagenet": imagenet_classes}


def release_classes(release: OfficialRelease) -> list[str]:
    """The class names of a release, in label order."""
    return list(_CLASS_SOURCES[release.classes]())


# --------------------------------------------------------------------------------------------
# The download cache
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where downloaded weights live: ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cache_path(release: OfficialRelease) -> Path:
    """The cache entry of a release (it may not exist yet)."""
    return cache_dir() / release.filename


def release_url(release: OfficialRelease) -> str:
    """Download address of a release: ``$NFNETS_WEIGHTS_URL/<file>`` if set, else official."""
    base = os.environ.get(URL_ENV, "").strip()
    return f"{base.rstrip('/')}/{release.filename}" if base else release.url


def file_md5(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in chunks (the checksum is for integrity, not security)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _by_hand(url: str, path: Path, md5: str) -> str:
    return (f"to place the file by hand, download {url} and save it as {path} (MD5 {md5}), or "
            f"set {URL_ENV} to a mirror")


def _move_aside(path: Path, actual: str) -> Path:
    """Rename a cache entry that failed its checksum, keeping it for inspection."""
    aside = path.with_name(f"{path.name}.md5-{actual[:8]}.bad")
    os.replace(path, aside)
    return aside


def fetch_release(release: OfficialRelease | str, *, progress: bool = True) -> Path:
    """Path of a release's file in the cache, downloading and verifying it first if needed.

    ``release`` is a record or a model name. A cached file is checked against the record's
    MD5 on every call (about a second for F0's 286 MB); one that fails is moved aside
    (``<file>.md5-<digest>.bad``, with a warning) and fetched again. Raises DownloadError
    (one line: the URL, the cache path, how to place the file by hand) when the server cannot
    be reached, answers with an HTTP error or sends a file with the wrong checksum; the cache
    then holds nothing new.
    """
    if isinstance(release, str):
        release = get_release(release)
    path = cache_path(release)
    url = release_url(release)
    if path.is_file():
        actual = file_md5(path)
        if actual == release.md5:
            return path
        aside = _move_aside(path, actual)
        warnings.warn(f"{path}: MD5 {actual} does not match the expected {release.md5}; moved "
                      f"it to {aside.name} and downloading {url} again", stacklevel=2)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create the weights cache {path.parent} ({err}); set "
                            "TORCH_HOME to a writable folder") from None
    atomic_write(path, lambda tmp: _download(url, Path(tmp), path, release, progress))
    return path


def _download(url: str, tmp: Path, path: Path, release: OfficialRelease,
              progress: bool) -> None:
    """Stream ``url`` into ``tmp`` and check its MD5; DownloadError on any failure."""
    digest = hashlib.md5(usedforsecurity=False)
    by_hand = _by_hand(url, path, release.md5)
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, \
                open(tmp, "wb") as out, _progress_bar(response, release, progress) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar(len(chunk))
    except urllib.error.HTTPError as err:
        raise DownloadError(f"download of {url} failed: HTTP {err.code} {err.reason}; "
                            f"{by_hand}") from None
    except urllib.error.URLError as err:
        raise DownloadError(f"cannot reach {url} ({err.reason}); {by_hand}") from None
    except OSError as err:  # a dropped connection, a full disk, a timeout mid-stream
        raise DownloadError(f"download of {url} failed ({err}); {by_hand}") from None
    actual = digest.hexdigest()
    if actual != release.md5:
        raise DownloadError(f"{url} sent a file with MD5 {actual}, not the expected "
                            f"{release.md5} (truncated, or a different file); nothing was "
                            f"cached; {by_hand}")


@contextmanager
def _progress_bar(response: Any, release: OfficialRelease, enabled: bool
                  ) -> Iterator[Callable[[int], object]]:
    """``update(n_bytes)`` of a tqdm bar on stderr when tqdm is installed and ``enabled``."""
    tqdm = None
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional (the demo extra)
            pass
    if tqdm is None:
        yield lambda n: None
        return
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else release.file_size
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
              desc=release.filename) as bar:
        yield bar.update


# --------------------------------------------------------------------------------------------
# Using a release
# --------------------------------------------------------------------------------------------


def check_override_shapes(model_name: str, release: OfficialRelease,
                          overrides: Mapping[str, Any]) -> None:
    """Refuse options that change the released architecture's parameter shapes.

    Both models are built on the meta device (no memory, no initialisation). Options that
    keep every shape (``drop_rate``, ``stochdepth_rate``, ``alpha``, ``activation``) pass;
    the classifier is compared separately by the caller (a new class count gets a fresh head).
    Raises UsageError listing the first differing shapes.
    """
    from .models import create_model

    released = dict(release.model_kwargs)
    asked = {**released, **overrides}
    if asked == released:
        return
    with torch.device("meta"):
        ref = create_model(model_name, num_classes=0, **released).state_dict()
        new = create_model(model_name, num_classes=0, **asked).state_dict()
    diffs = [f"{k} {tuple(ref[k].shape)} -> {tuple(new[k].shape)}"
             for k in ref.keys() & new.keys() if ref[k].shape != new[k].shape]
    diffs += [f"{k} missing" for k in ref.keys() - new.keys()]
    diffs += [f"{k} added" for k in new.keys() - ref.keys()]
    if diffs:
        diffs.sort()
        more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
        options = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise UsageError(
            f"pretrained weights of {model_name} do not fit the model built with {options}: "
            f"{'; '.join(diffs[:3])}{more}; drop the options that change shapes or pass "
            "pretrained=None"
        )


def missing_hint(path: str | os.PathLike) -> str:
    """For a missing file named like a release: where to get it (empty for other names)."""
    name = Path(path).name
    release = next((r for r in OFFICIAL_RELEASES.values() if r.filename == name), None)
    if release is None:
        return ""
    return (f"; it is DeepMind's {release.model_name}: download {release_url(release)}, or let "
            f"nfnets fetch and verify it (nfnets.create_model('{release.model_name}', "
            f"pretrained=True), or --model {release.model_name} --pretrained)")


def checksum_warning(path: Path, md5: str | None = None) -> str | None:
    """The one warning every loader gives for a file named like a release whose MD5 (``md5``,
    or computed) differs from the record's; None when it matches or the name is no release's."""
    release = next((r for r in OFFICIAL_RELEASES.values() if r.filename == path.name), None)
    if release is None:
        return None
    actual = md5 or file_md5(path)
    if actual == release.md5:
        return None
    return (f"{path}: MD5 {actual} does not match the expected {release.md5} of the released "
            f"{release.filename}; the download may be corrupt or incomplete (loading it "
            "anyway: its structure and every tensor are validated)")


# --------------------------------------------------------------------------------------------
# create_model(name, pretrained=...)
# --------------------------------------------------------------------------------------------

_LISTED_KEYS = 3


def _natural(key: str) -> list[Any]:
    """Sort key that puts blocks.2 before blocks.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str:
    """One line describing how ``state_dict`` differs from ``model`` outside the classifier
    (empty if it fits): counts, the first keys, and the variant the weights belong to."""
    from .weights import detect_variant

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}
    found = {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith("fc.")}
    wrong = sorted((k for k in expected.keys() & found.keys() if expected[k] != found[k]),
                   key=_natural)
    missing = sorted(expected.keys() - found.keys(), key=_natural)
    unexpected = sorted(found.keys() - expected.keys(), key=_natural)
    if not (wrong or missing or unexpected):
        return ""
    listed = ([f"{k} is {found[k]} in the weights, {expected[k]} in the model" for k in wrong]
              + [f"{k} missing from the weights" for k in missing]
              + [f"{k} not in the model" for k in unexpected])
    more = f" and {len(listed) - _LISTED_KEYS} more" if len(listed) > _LISTED_KEYS else ""
    try:
        looks = f"; they are {detect_variant(state_dict)} weights"
    except CheckpointError:
        looks = ""
    return (f"{len(wrong)} wrong-shape, {len(missing)} missing, {len(unexpected)} unexpected "
            f"keys{looks}: {'; '.join(listed[:_LISTED_KEYS])}{more}")


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                         source: str) -> nn.Module:
    """Adopt ``state_dict`` (our names) into a model built on the meta device.

    The classifier is loaded when its shape fits and otherwise left freshly initialised (a new
    class count); every other key must fit, else CheckpointError in one line naming the first
    mismatched keys and the variant the weights belong to.
    """
    mismatch = _mismatch(model, state_dict)
    if mismatch:
        raise CheckpointError(f"{source} does not fit {model.model_name} ({mismatch})")
    head = {k: v for k, v in state_dict.items() if k.startswith("fc.")}
    body = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    model_head = {k: v for k, v in model.state_dict().items() if k.startswith("fc.")}
    fits = head.keys() == model_head.keys() and all(
        head[k].shape == model_head[k].shape for k in head)
    model.load_state_dict({**body, **(head if fits else {})}, strict=fits, assign=True)
    if not fits:  # a new class count: a fresh classifier, as timm's pretrained=True
        model.reset_classifier(model.num_classes)
    return model


def _official_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from .weights import official_to_state_dict, read_official_checkpoint

    return official_to_state_dict(read_official_checkpoint(path))[1]


def build_pretrained(name: str, pretrained: bool | str | os.PathLike, num_classes: int,
                     overrides: Mapping[str, Any]) -> nn.Module:
    """``create_model(name, num_classes, pretrained, **overrides)`` for a given ``pretrained``.

    ``True``: DeepMind's released file for ``name`` (downloaded and verified by
    ``fetch_release``); options that change parameter shapes are refused before any download.
    ``"hf-hub:ORG/NAME"``: a timm ``dm_nfnet`` checkpoint from the Hugging Face Hub. A path:
    any weights file nfnets reads, a timm checkpoint included. With True or a Hub name, a
    ``num_classes`` other than the checkpoint's keeps everything but the classifier, which is
    freshly initialised (fine-tuning); a path must match ``num_classes``.
    """
    from .models import create_model
    from .timm_compat import HF_HUB_PREFIX, hf_hub_state_dict

    kwargs = dict(overrides)
    if pretrained is True:
        release = get_release(name)
        check_override_shapes(name, release, overrides)
        kwargs = {**release.model_kwargs, **overrides}
        source: str = release.filename
        state_dict = _official_state_dict(fetch_release(release))
        cfg: dict[str, Any] = {"source": release_url(release), **release.to_dict()}
    elif isinstance(pretrained, str) and pretrained.startswith(HF_HUB_PREFIX):
        source = pretrained
        state_dict = hf_hub_state_dict(pretrained)
        cfg = {"source": pretrained}
    else:  # a file or run of any kind nfnets.weights reads (timm checkpoints included)
        from .weights import load_pretrained

        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes, **kwargs)
        load_pretrained(model, pretrained, assign=True)
        model.pretrained_cfg = {"source": str(pretrained)}
        return model
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **kwargs)
    load_state_dict_into(model, state_dict, source)
    model.pretrained_cfg = cfg
    return model


def named_weights(spec: str) -> tuple[str, dict[str, torch.Tensor], str] | None:
    """``(model name, state dict in our names, source)`` of a released model name
    (``nfnet_f0``, ``F0``) or an ``hf-hub:`` name; None for anything else (a path).

    The Hub's model name is read from the weights (timm's dm_nfnet_f0 … f6 are F0 … F6).
    """
    from .models import _canonical as canonical
    from .models import list_models
    from .timm_compat import HF_HUB_PREFIX, hf_hub_state_dict
    from .weights import detect_variant

    if spec.startswith(HF_HUB_PREFIX):
        state_dict = hf_hub_state_dict(spec)
        return detect_variant(state_dict), state_dict, spec
    name = canonical(spec)
    if name not in list_models() or Path(spec).exists():
        return None
    release = get_release(name)
    return name, _official_state_dict(fetch_release(release)), release_url(release)


def load_backbone(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
                  ) -> nn.Module:
    """Load everything but the classifier (fine-tuning); CheckpointError in one line if the
    rest does not fit."""
    mismatch = _mismatch(model, state_dict)
    if mismatch:
        raise CheckpointError(f"{source} does not fit {model.model_name} ({mismatch})")
    body = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    missing = model.load_state_dict(body, strict=False).missing_keys
    assert all(k.startswith("fc.") for k in missing), missing  # checked by _mismatch
    return model


def weights_model_name(spec: str) -> str | None:
    """The model a released name or ``hf-hub:`` name holds, without downloading weights
    (``hf-hub:timm/dm_nfnet_f3.dm_in1k`` → ``nfnet_f3``); None for anything else."""
    from .models import _canonical as canonical
    from .models import list_models
    from .timm_compat import HF_HUB_PREFIX

    if spec.startswith(HF_HUB_PREFIX):
        match = re.search(r"dm_nfnet_(f\d)\b", spec)
        return f"nfnet_{match.group(1)}" if match else None
    name = canonical(spec)
    return name if name in list_models() and not Path(spec).exists() else None


def load_named(spec: str, model_name: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode, info)`` for ``nfnets eval/predict``: DeepMind's release of
    ``spec`` (a model name such as ``nfnet_f0``) or an ``hf-hub:`` name.

    ``info`` has the keys of ``nfnets.weights.load_model``'s: the class names and
    test resolution come from the release record (the Hub's timm copies are the same
    releases), so evaluation uses the published preprocessing unless told otherwise.
    """
    from .models import create_model, model_defaults

    named = named_weights(spec)
    if named is None:
        raise UsageError(f"{spec!r} is neither a released model name ({_released_names()}) "
                         "nor an 'hf-hub:' name")
    name, state_dict, source = named
    if model_name is not None:
        from .models import _canonical as canonical

        if canonical(model_name) != name:
            raise UsageError(f"{spec} holds {name} weights, not {model_name}")
    num_classes = state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else 0
    release = OFFICIAL_RELEASES.get(name)
    kwargs = dict(release.model_kwargs) if release and not spec.startswith("hf-hub:") else {}
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **kwargs)
    load_state_dict_into(model, state_dict, source)
    test_size = release.test_size if release else model_defaults(name)["test_size"]
    classes = release_classes(release) if release and num_classes == release.num_classes \
        else None
    model.pretrained_cfg = {"source": source, **(release.to_dict() if release else {})}
    info = {"classes": classes, "test_size": test_size, "source": source, "model_name": name,
            "ema": False, "data": None, "seed": 0}
    return model.eval(), info


# create_model options a fine-tuning run sets itself (nfnets.train passes them explicitly).
_RUN_OPTIONS = ("num_classes", "drop_rate", "stochdepth_rate")


def weights_architecture(spec: str) -> tuple[str, dict[str, Any]] | None:
    """``(model name, create_model options)`` of what ``--init-from spec`` holds, read without
    loading any weights: a released or ``hf-hub:`` name, an nfnets safetensors file or run
    directory (from its metadata), or a run still going or one of its checkpoints (from the
    run's ``config.json``); None when it cannot be told (then --model decides).

    The options leave out the class count, dropout and stochastic depth, which the fine-tuning
    run sets itself.
    """
    from .checkpoint import is_sharded_checkpoint
    from .weights import RUN_WEIGHTS, read_weights_metadata

    name = weights_model_name(spec)
    if name is not None:
        return name, {}
    path = Path(spec)
    is_run = path.is_dir() and not is_sharded_checkpoint(path)
    files = [path / RUN_WEIGHTS[True], path / RUN_WEIGHTS[False]] if is_run else [path]
    for file in files:
        try:
            metadata = read_weights_metadata(file)
        except (OSError, CheckpointError):  # absent, or not our safetensors
            continue
        return metadata["model_name"], _architecture_options(metadata["model_kwargs"])
    # a run without final weights yet, or a checkpoint inside RUN/checkpoints/
    run = path if is_run else path.parent.parent if path.parent.name == "checkpoints" else None
    return None if run is None else _run_architecture(run / "config.json")


def _architecture_options(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model_kwargs.items() if k not in _RUN_OPTIONS}


def _run_architecture(config: Path) -> tuple[str, dict[str, Any]] | None:
    """The model name and options a run's config.json records (written by nfnets.train)."""
    try:
        recorded = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    name = recorded.get("model") if isinstance(recorded, dict) else None
    kwargs = recorded.get("model_kwargs") if isinstance(recorded, dict) else None
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        return None
    return name, _architecture_options(kwargs)
