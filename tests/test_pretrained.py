"""Pretrained weights by name: release records, the verified download cache, class names.

Downloads go to a real HTTP server on 127.0.0.1 (http.server in a thread) serving a tiny
NFNet written in DeepMind's format; TORCH_HOME is a temp folder. No other network.
"""

import hashlib
import http.server
import socket
import threading
from dataclasses import replace
from functools import partial

import pytest
import torch
from official_format import to_official, write_official

import nfnets
from nfnets import pretrained
from nfnets.errors import DownloadError, UsageError
from nfnets.pretrained import OFFICIAL_RELEASES, OfficialRelease, fetch_release, get_release

TINY_F0 = dict(widths=(32, 64, 96, 96), depths=(1, 2, 2, 1), group_width=16)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Server:
    """http.server on 127.0.0.1 in a thread, serving ``root``; ``requests`` counts GETs."""

    def __init__(self, root):
        self.requests = 0
        outer = self

        class Handler(_Quiet):
            def do_GET(self):  # noqa: N802 - http.server's name
                outer.requests += 1
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def serve_release(tmp_path, monkeypatch, model_kwargs, num_classes):
    """(record, source model, server): a small NFNet written in the official format, served
    over HTTP and registered as the release of nfnet_f0; TORCH_HOME and NFNETS_WEIGHTS_URL
    point at tmp_path and the server."""
    torch.manual_seed(0)
    source = nfnets.create_model("nfnet_f0", num_classes=num_classes, **model_kwargs).eval()
    with torch.no_grad():
        for p in source.parameters():  # skip gains start at 0: make every weight matter
            p.add_(0.1 * torch.randn_like(p))
    served = tmp_path / "served"
    served.mkdir()
    path = write_official(served / "tiny_haiku.npz", to_official(source.state_dict(), "nfnet"))
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    record = OfficialRelease("tiny", "nfnet_f0", md5, 1.0, 2.0, 32, 48,
                             sum(p.numel() for p in source.parameters()), False,
                             file_size=path.stat().st_size, num_classes=num_classes,
                             model_kwargs=model_kwargs)
    monkeypatch.setitem(OFFICIAL_RELEASES, "nfnet_f0", record)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    server = Server(served)
    monkeypatch.setenv(pretrained.URL_ENV, server.url + "/")
    return record, source, server


@pytest.fixture
def tiny_release(tmp_path, monkeypatch):
    record, source, server = serve_release(tmp_path, monkeypatch, TINY_F0, 10)
    yield record, source, server
    server.stop()


def cache_files():
    folder = pretrained.cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_download_verifies_then_reuses_the_cache_without_network(tiny_release):
    record, source, server = tiny_release
    model = nfnets.create_model("nfnet_f0", pretrained=True, num_classes=10).eval()
    assert pretrained.cache_path(record).is_file()
    assert str(pretrained.cache_path(record)).startswith(str(pretrained.cache_dir()))
    assert cache_files() == ["tiny_haiku.npz"]  # no temp file left beside it
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    assert model.pretrained_cfg["test_size"] == 48 and server.requests == 1
    server.stop()  # a second call needs no network
    again = nfnets.create_model("nfnet_f0", pretrained=True, num_classes=10).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), source(x))
    assert server.requests == 1
    server.stop = lambda: None  # already stopped for the fixture


def test_another_class_count_keeps_the_body_and_a_fresh_classifier(tiny_release):
    record, source, _ = tiny_release
    model = nfnets.create_model("nfnet_f0", pretrained=True, num_classes=3)
    assert model.fc.out_features == 3 and not model.fc.weight.is_meta
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            torch.testing.assert_close(model.state_dict()[key], value)


def test_features_only_load_pretrained_weights(tiny_release):
    _, source, _ = tiny_release
    backbone = nfnets.create_model("nfnet_f0", pretrained=True, features_only=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = source.forward_intermediates(x, intermediates_only=True)
        for got, expected in zip(backbone(x), want, strict=True):
            torch.testing.assert_close(got, expected)


def test_corrupted_download_leaves_nothing_and_names_url_cache_and_fix(tiny_release, tmp_path):
    record, _, server = tiny_release
    served = tmp_path / "served" / "tiny_haiku.npz"
    served.write_bytes(served.read_bytes()[:-100])  # truncated on the server
    with pytest.raises(DownloadError) as info:
        fetch_release(record, progress=False)
    message = str(info.value)
    assert "\n" not in message
    assert f"{server.url}/tiny_haiku.npz" in message
    assert str(pretrained.cache_path(record)) in message
    assert record.md5 in message and "by hand" in message
    assert cache_files() == []


def test_http_404(tiny_release, monkeypatch):
    record, _, server = tiny_release
    monkeypatch.setenv(pretrained.URL_ENV, server.url + "/missing")
    with pytest.raises(DownloadError, match=r"missing/tiny_haiku.npz failed: HTTP 404 .*by hand"):
        fetch_release(record, progress=False)
    assert cache_files() == []


def test_connection_refused(tiny_release, monkeypatch):
    record, _, _ = tiny_release
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(pretrained.URL_ENV, f"http://127.0.0.1:{port}")
    with pytest.raises(DownloadError, match=r"cannot reach http://127\.0\.0\.1:\d+/tiny_haiku"):
        fetch_release(record, progress=False)
    assert cache_files() == []


def test_cached_file_failing_its_checksum_is_moved_aside_and_fetched_again(tiny_release):
    record, _, server = tiny_release
    path = fetch_release(record, progress=False)
    good = path.read_bytes()
    path.write_bytes(good[:1000])  # e.g. truncated by a full disk
    with pytest.warns(UserWarning, match="does not match"):
        again = fetch_release(record, progress=False)
    assert again.read_bytes() == good and server.requests == 2
    assert len([n for n in cache_files() if n.endswith(".bad")]) == 1


def test_shape_changing_overrides_are_refused_before_any_download(tiny_release, monkeypatch):
    monkeypatch.setenv(pretrained.URL_ENV, "http://127.0.0.1:9")  # never contacted
    with pytest.raises(UsageError, match=r"built with widths=.*"
                       r"blocks\.0\.conv0\.weight \(16, 16, 1, 1\) -> \(32, 32, 1, 1\)"):
        nfnets.create_model("nfnet_f0", pretrained=True, widths=(64, 64, 96, 96))
    assert cache_files() == []
    # Options that keep every shape are fine.
    pretrained.check_override_shapes("nfnet_f0", get_release("nfnet_f0"),
                                     {"drop_rate": 0.5, "stochdepth_rate": 0.0})


def test_official_address_and_mirror(monkeypatch):
    monkeypatch.delenv(pretrained.URL_ENV, raising=False)
    f0 = get_release("nfnet_f0")
    assert pretrained.release_url(f0) == "https://storage.googleapis.com/dm-nfnets/F0_haiku.npz"
    monkeypatch.setenv(pretrained.URL_ENV, "file:///mnt/mirror/nfnets/")
    assert pretrained.release_url(f0) == "file:///mnt/mirror/nfnets/F0_haiku.npz"


def test_file_url_mirror_for_air_gapped_clusters(tiny_release, tmp_path, monkeypatch):
    record, _, _ = tiny_release
    monkeypatch.setenv(pretrained.URL_ENV, (tmp_path / "served").as_uri())
    assert fetch_release(record, progress=False).is_file()


@pytest.mark.parametrize("name", ["nfnet_f7", "nfnet_f0_plus", "nf_resnet50", "nf_regnet_b0"])
def test_unreleased_variants_say_so(name):
    with pytest.raises(UsageError, match="DeepMind released no weights"):
        nfnets.create_model(name, pretrained=True)


# deepmind-research nfnets/README.md = paper Table 3 (accuracy), paper Table 1 (resolutions).
PUBLISHED = {"F0": (83.6, 96.8, 192, 256), "F1": (84.7, 97.1, 224, 320),
             "F2": (85.1, 97.3, 256, 352), "F3": (85.7, 97.5, 320, 416),
             "F4": (85.9, 97.6, 384, 512), "F5": (86.0, 97.6, 416, 544),
             "F6": (86.5, 97.9, 448, 576)}


def test_release_records_pin_the_published_figures():
    assert {r.variant for r in OFFICIAL_RELEASES.values()} == set(PUBLISHED)
    for release in OFFICIAL_RELEASES.values():
        assert (release.top1, release.top5, release.train_size,
                release.test_size) == PUBLISHED[release.variant]
        assert release.num_classes == 1000 and release.interpolation == "bicubic"
    f0 = get_release("nfnet_f0")
    assert f0.md5 == "0a41039da1cb43adf47f1b7d86ddfe0f" and f0.file_size == 285_976_842
    assert f0.eval_crop == pytest.approx(256 / 288)
    assert f0.to_dict()["url"].endswith("F0_haiku.npz")


def test_imagenet_class_names_are_shipped():
    names = pretrained.imagenet_classes()
    assert len(names) == len(set(names)) == 1000
    assert names[0] == "tench" and names[945] == "bell pepper"  # the demo's answer
    from torchvision.models._meta import _IMAGENET_CATEGORIES  # the list we ship, checked

    assert list(names) == list(_IMAGENET_CATEGORIES)
    assert pretrained.release_classes(get_release("nfnet_f0")) == list(names)


def test_record_is_data(tiny_release):
    record, _, _ = tiny_release
    assert replace(record, md5="0" * 32).md5 == "0" * 32


def test_pretrained_false_or_none_builds_a_fresh_model():
    # The first report: pretrained=False used to be taken for a path.
    for value in (False, None):
        model = nfnets.create_model("nfnet_f0", pretrained=value, **TINY_F0)
        assert not next(model.parameters()).is_meta
