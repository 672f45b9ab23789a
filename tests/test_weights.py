"""The weights registry: listing, fetching (real HTTP on loopback), hash checks, the offline message, and
configs that name weights."""
import dataclasses
import functools
import hashlib
import http.server
import shutil
import threading

import pytest

from cgn_dist import weights
from cgn_dist.cli import main

MNIST_NAMES = {"colored": "cgn-mnist-colored", "double_colored": "cgn-mnist-double-colored",
               "wildlife": "cgn-mnist-wildlife"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on loopback serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _point(monkeypatch, name, url):
    monkeypatch.setitem(weights.REGISTRY, name, dataclasses.replace(weights.REGISTRY[name], url=url))


def test_registry_lists_every_weight_the_issue_names():
    assert set(weights.REGISTRY) >= {"biggan-deep-256", "u2net", "cgn-imagenet", "vgg16", "resnet50",
                                     "inception-v3", *MNIST_NAMES.values()}
    # torchvision names its files after the sha256's first hex digits; the registry says the same
    for name in ("vgg16", "resnet50", "inception-v3"):
        w = weights.REGISTRY[name]
        assert w.sha256_prefix and w.sha256_prefix in w.filename and w.filename in w.url


def test_mnist_hashes_match_the_released_files(shared_ref):
    # Independent of the registry: hashlib over the three files shipped in ../shared.
    for ds, name in MNIST_NAMES.items():
        data = (shared_ref / "original_mnist_checkpoints" / f"cgn_{ds}_MNIST.pth").read_bytes()
        w = weights.REGISTRY[name]
        assert (len(data), hashlib.sha256(data).hexdigest()) == (w.size, w.sha256)
        assert w.filename == f"cgn_{ds}_MNIST.pth"  # so the cache folder works as mnist_pipeline.released_dir


def test_listing_says_where_and_whether_present(cache, shared_ref, capsys):
    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    assert f"weights cache: {cache}" in out
    for name in weights.REGISTRY:
        assert name in out
    assert "cgn-mnist-colored          missing" in out
    cache.mkdir()
    shutil.copy(shared_ref / "original_mnist_checkpoints" / "cgn_colored_MNIST.pth", cache)
    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    assert "cgn-mnist-colored          present" in out
    assert "6b178e7c1924b9efc532c467e7f0b77d2702efb536de9816bbd7e92c26d9b3fe" in out


def test_fetch_downloads_checks_and_renames(cache, server, shared_ref, monkeypatch, capsys):
    root, url = server
    shutil.copy(shared_ref / "original_mnist_checkpoints" / "cgn_wildlife_MNIST.pth", root / "ckp.pth")
    _point(monkeypatch, "cgn-mnist-wildlife", f"{url}/ckp.pth")
    assert main(["weights", "fetch", "cgn-mnist-wildlife"]) == 0
    dest = cache / "cgn_wildlife_MNIST.pth"
    assert dest.read_bytes() == (root / "ckp.pth").read_bytes()
    assert "sha256 checked" in capsys.readouterr().out
    assert sorted(p.name for p in cache.iterdir()) == ["cgn_wildlife_MNIST.pth"]  # no partial file left


def test_fetch_refuses_a_file_with_the_wrong_hash(cache, server, shared_ref, monkeypatch, capsys):
    root, url = server
    # Same size, other bytes: the double-colored file served under the colored name.
    shutil.copy(shared_ref / "original_mnist_checkpoints" / "cgn_double_colored_MNIST.pth", root / "ckp.pth")
    _point(monkeypatch, "cgn-mnist-colored", f"{url}/ckp.pth")
    assert main(["weights", "fetch", "cgn-mnist-colored"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # above it: the progress bar
    assert err.startswith("error: ") and "sha256" in err and "6b178e7c" in err and "Traceback" not in err
    assert not any(cache.iterdir())  # nothing renamed into place, no partial file


def test_fetch_offline_says_which_file_to_copy_where(cache, monkeypatch, capsys):
    _point(monkeypatch, "cgn-mnist-colored", "http://127.0.0.1:9/ckp.pth")  # nothing listens there
    assert main(["weights", "fetch", "cgn-mnist-colored"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "cannot download cgn-mnist-colored" in err
    assert f"copy cgn_colored_MNIST.pth (2,661,744 bytes, sha256 6b178e7c" in err and f"to {cache}/" in err


def test_unknown_hash_is_recorded_on_first_fetch_and_checked_later(cache, server, monkeypatch):
    root, url = server
    (root / "u2net.pth").write_bytes(b"u2net bytes " * 1000)
    _point(monkeypatch, "u2net", f"{url}/u2net.pth")
    path = weights.fetch("u2net", progress=False)
    sidecar = path.with_name("u2net.pth.sha256").read_text()
    assert sidecar.split()[0] == hashlib.sha256(b"u2net bytes " * 1000).hexdigest()
    assert "first fetched" in sidecar
    assert weights.status("u2net")["sha256_source"] == "recorded on first fetch"
    weights.fetch("u2net", progress=False)  # present: checked, not downloaded
    path.write_bytes(b"tampered " * 1000)
    with pytest.raises(weights.WeightsError, match="sha256"):
        weights.fetch("u2net", progress=False)


def test_configs_take_weight_names(cache, tmp_path, shared_ref, capsys):
    args = ["generate", "configs/generate/mnist_colored.yaml", "generate.checkpoint=cgn-mnist-colored",
            f"out_dir={tmp_path / 'runs'}", "generate.n_samples=20", "generate.shard_size=20", "generate.no_cfs=1",
            "generate.grid_every=0", "train.progress=false", "name=by_name"]
    assert main(args) == 2  # not in the cache yet
    err = capsys.readouterr().err
    assert "generate.checkpoint=cgn-mnist-colored" in err and "cgn-dist weights fetch cgn-mnist-colored" in err
    cache.mkdir()
    shutil.copy(shared_ref / "original_mnist_checkpoints" / "cgn_colored_MNIST.pth", cache)
    assert main(args) == 0
    assert (tmp_path / "runs" / "by_name" / "manifest.json").is_file()


def test_u2net_by_name_missing_names_the_key(cache):
    from cgn_dist.models.u2net import build_u2net

    with pytest.raises(weights.WeightsError, match=r"imagenet.u2net=u2net.*weights fetch u2net"):
        build_u2net("u2net")
