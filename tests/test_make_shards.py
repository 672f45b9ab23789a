"""cgn-dist make-shards on a small ILSVRC-style tree of real photos with every kind of bad file: exactly once,
right labels, original bytes, reject list, resume after a kill, Ray nodes = one process, then streaming."""
from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from cgn_dist.cli import main as cli_main
from cgn_dist.config import load_config
from cgn_dist.ingest.image_shards import read_and_check
from cgn_dist.ingest.image_tree import list_tree
from cgn_dist.ingest.make_shards import run_make_shards
from cgn_dist.data.shards import read_tar_samples
from cgn_dist.sharding.manifest import verify_output

sys.path.insert(0, str(Path(__file__).parent))
from imagenet_fixture import PHOTO_WNIDS, imagenet_label, make_imagenet_tree  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_imagenet_tree(tmp_path_factory.mktemp("imagenet") / "ILSVRC2012")


def _cfg(tree_dir, out, *extra):
    return load_config(None, [f"shards.root={tree_dir}", f"shards.out={out}", "shards.shard_size=5",
                              "shards.batch_size=2", "train.progress=false", "seed=7", *extra])


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def _samples(out: Path) -> list[dict]:
    return [s for p in sorted(out.glob("shard-*.tar")) for s in read_tar_samples(p)]


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "train_shards"
    summary = run_make_shards(_cfg(tree.train, out))
    return out, summary


def test_every_good_image_once_with_its_label_and_original_bytes(tree, reference):
    out, summary = reference
    assert (summary["listed"], summary["written"], summary["rejected"]) == (
        tree.listed, len(tree.good) + len(tree.converted), len(tree.rejected))
    samples = _samples(out)
    by_source = {}
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["source"] not in by_source, f"{meta['source']} written twice"
        by_source[meta["source"]] = (s, meta)
    assert set(by_source) == set(tree.good) | set(tree.converted)
    for rel, label in {**tree.good, **tree.converted}.items():
        s, meta = by_source[rel]
        assert meta["label"] == label == int(s["cls"]) and meta["wnid"] == rel.split("/")[0]
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and [meta["width"], meta["height"]] == list(img.size)
        if rel in tree.good:
            assert s["jpg"] == (tree.train / rel).read_bytes(), f"{rel}: bytes differ from the source"
            assert "converted" not in meta
        else:
            assert "converted" in meta and s["jpg"] != (tree.train / rel).read_bytes()
    assert by_source["n02124075/n02124075_1.JPEG"][1]["class_name"] == "Egyptian cat"
    # the seeded shuffle mixes classes within a shard; shards hold shard_size files (rejects included)
    first = [json.loads(s["json"])["label"] for s in read_tar_samples(out / "shard-000000.tar")]
    assert len(set(first)) > 1
    plan = json.loads((out / "manifest.json").read_text())["plan"]
    assert [p["n"] for p in plan] == [5, 5, 5, 5, 5, 1]


def test_rejects_listed_with_reasons_in_stats_and_manifest(tree, reference):
    out, _ = reference
    manifest = json.loads((out / "manifest.json").read_text())
    rejects = {r["source"]: r["reason"] for r in manifest["rejects"]}
    assert set(rejects) == set(tree.rejected)
    for rel, word in tree.rejected.items():
        assert word in rejects[rel], (rel, rejects[rel])
    in_stats = [r for p in out.glob("shard-*_stats.json") for r in json.loads(p.read_text())["rejects"]]
    assert sorted(r["source"] for r in in_stats) == sorted(tree.rejected)
    notes = " ".join(n["note"] for n in manifest["notes"])
    assert "CMYK to RGB" in notes and "L to RGB" in notes and "PNG data under a JPEG name" in notes
    assert manifest["total_samples"] + manifest["total_rejected"] == tree.listed
    assert json.loads((out / "sources.json").read_text())["ignored"] == ["n02124075/README.txt"]
    assert verify_output(out) == []


def test_killed_run_then_rerun_gives_identical_shards(tree, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "killed"
    script = f"""
import time
import cgn_dist.ingest.image_shards as m
slow = m.read_and_check
def read_slowly(*a, **k):
    time.sleep(0.15)
    return slow(*a, **k)
m.read_and_check = read_slowly
from cgn_dist.config import load_config
from cgn_dist.ingest.make_shards import run_make_shards
run_make_shards(load_config(None, ["shards.root={tree.train}", "shards.out={out}", "shards.shard_size=5",
                                   "shards.batch_size=2", "shards.num_workers=1", "train.progress=false",
                                   "seed=7"]))  # one process: the slowed reader is this process's
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not (out / "shard-000001_stats.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never committed shard 1"
        time.sleep(0.02)
    # Kill while shard 2 is half written: its temporary tar exists and its marker does not.
    while not list(out.glob(".tmp-shard-000002.tar.*")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never started shard 2"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert list(out.glob(".tmp-shard-000002.tar.*")), "shard 2 finished before the kill landed"
    assert not (out / "shard-000002_stats.json").exists(), "the kill did not land mid-shard"
    assert not (out / "manifest.json").exists(), "the run finished before it was killed"
    assert len(list(out.glob("shard-*_stats.json"))) < 6
    summary = run_make_shards(_cfg(tree.train, out))
    assert _tars(out) == _tars(ref_out)
    assert summary["written"] + summary["rejected"] == tree.listed
    assert (out / "index.json").read_bytes() == (ref_out / "index.json").read_bytes()


def test_flat_val_with_devkit_ground_truth(tree, tmp_path):
    listing = list_tree(tree.val, val_labels=str(tree.val_labels))
    assert {f.path: f.label for f in listing.files} == tree.val_good
    out = tmp_path / "val"
    run_make_shards(_cfg(tree.val, out, f"shards.val_labels={tree.val_labels}", "shards.shuffle=false"))
    got = {json.loads(s["json"])["source"]: json.loads(s["json"])["label"] for s in _samples(out)}
    assert got == tree.val_good
    # the devkit IDs are not sorted-order labels: reading them as such would be wrong for most files
    ids = [int(x) for x in tree.val_labels.read_text().split()]
    assert sum(i - 1 == lab for i, lab in zip(ids, tree.val_good.values())) < len(ids)
    # the other ground-truth forms give the same labels
    plain = tmp_path / "val_wnids.txt"
    inv = {imagenet_label(w): w for w in PHOTO_WNIDS.values()}
    plain.write_text("".join(f"{f} {inv[lab]}\n" for f, lab in tree.val_good.items()))
    assert {f.path: f.label for f in list_tree(tree.val, val_labels=str(plain)).files} == tree.val_good
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text("ImageId,PredictionString\n" + "".join(
        f"{Path(f).stem},{inv[lab]} 1 2 3 4\n" for f, lab in tree.val_good.items()))
    assert {f.path: f.label for f in list_tree(tree.val, val_labels=str(kaggle)).files} == tree.val_good


def test_bad_inputs_are_clear_errors(tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.mat"):
        list_tree(tree.val, val_labels=str(tree.val_labels), devkit_meta=str(tmp_path / "nope.mat"))
    with pytest.raises(ValueError, match="shards.val_labels"):
        list_tree(tree.val)
    other = tmp_path / "pets"
    (other / "dogs").mkdir(parents=True)
    (other / "dogs" / "a.jpg").write_bytes((tree.train / next(iter(tree.good))).read_bytes())
    with pytest.raises(ValueError, match="shards.labels=folders"):
        list_tree(other)
    assert [f.label for f in list_tree(other, labels="folders").files] == [0]
    assert cli_main(["make-shards", "configs/shards/debug_tiny.yaml"]) == 2  # shards.root unset


def test_byte_sized_shards_resize_and_dry_run(tree, tmp_path, capsys):
    out = tmp_path / "bytes"
    summary = run_make_shards(_cfg(tree.train, out, "shards.shard_size=1000", "shards.shard_bytes=300000",
                                   "shards.resize=160"))
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = [p["n"] for p in manifest["plan"]]
    assert len(sizes) > 3 and len(set(sizes)) > 1 and sum(sizes) == tree.listed
    for s in _samples(out):
        meta = json.loads(s["json"])
        img = Image.open(io.BytesIO(s["jpg"]))
        assert min(img.size) == 160 and [meta["width"], meta["height"]] == list(img.size)
        assert min(meta["resized_from"]) > 160
    assert summary["written"] + summary["rejected"] == tree.listed
    dry = run_make_shards(_cfg(tree.train, tmp_path / "never", "shards.dry_run=true"))
    assert not (tmp_path / "never").exists()
    ref_bytes = summary["source_bytes"]
    assert dry["dry_run"]["n_shards"] == 6 and 0.9 * ref_bytes < dry["dry_run"]["est_bytes"] < 1.3 * ref_bytes
    assert "plan: 26 samples in 6 shards" in capsys.readouterr().out


def test_read_and_check_keeps_clean_rgb_jpeg_bytes(tree):
    rel = next(iter(tree.good))
    data, fields = read_and_check(str(tree.train / rel))
    assert data == (tree.train / rel).read_bytes() and "converted" not in fields
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256((tree.train / rel).read_bytes()).hexdigest()


def test_package_category_order_is_the_reference(shared_ref):
    from importlib import resources
    ours = resources.files("cgn_dist.data").joinpath("imagenet_categories.txt").read_text()
    assert ours == (shared_ref / "eval" / "categories.txt").read_text()
    wnids = [line.split()[0] for line in ours.splitlines()]
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000


def test_shards_stream_with_their_labels(tree, reference):
    from cgn_dist.data.stream import make_loader

    out, _ = reference
    expected = sorted({**tree.good, **tree.converted}.values())
    seen = []
    for rank in range(2):
        loader = make_loader(out, 4, train=False, rank=rank, world_size=2, num_workers=2, decoder="pil_draft")
        for b in loader:
            assert b["image"].shape[1:] == (3, 224, 224)
            seen += b["label"].tolist()
    assert sorted(seen) == expected


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ray_nodes_give_the_shards_of_one_process(tree, reference, tmp_path):
    import os

    import ray

    from cgn_dist.distributed.ray_utils import LoopbackCluster, patched_environ

    ref_out, _ = reference
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    with patched_environ({"PYTHONPATH": path}):
        cluster = LoopbackCluster(num_nodes=2, cpus_per_node=1).start()
    try:
        cluster.connect()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        out = tmp_path / "ray"
        summary = run_make_shards(_cfg(tree.train, out, "shards.backend=ray", "shards.num_workers=2"))
        assert _tars(out) == _tars(ref_out)
        assert summary["written"] + summary["rejected"] == tree.listed
        pids = {json.loads(p.read_text())["pid"] for p in out.glob("shard-*_stats.json")}
        assert os.getpid() not in pids  # written by the Ray workers, not here
    finally:
        cluster.shutdown()


def test_rerun_with_another_listing_into_the_same_folder_is_refused(tree, reference):
    out, _ = reference
    before = _tars(out)
    with pytest.raises(ValueError, match="another listing"):
        run_make_shards(_cfg(tree.train, out, "shards.shuffle=false"))
    assert _tars(out) == before and json.loads((out / "sources.json").read_text())["n_listed"] == tree.listed
