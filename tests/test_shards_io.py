"""WebDataset shard helpers: deterministic bytes, atomic commit, readable by webdataset and wids."""
import json
import tarfile

import numpy as np
import pytest

from cgn_dist.data import shard_index as si
from cgn_dist.data import shards as sh


def _samples(n=3):
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        yield f"000000_{i:06d}", {"png": sh.encode_png(img), "json": {"i": i, "cls": np.int64(i % 2)},
                                  "mask.png": sh.encode_png(img[:, :, 0]), "cls": i}


def test_tar_bytes_are_deterministic_and_headers_fixed(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    sha_a, n_a = sh.write_tar(a, _samples())
    sha_b, n_b = sh.write_tar(b, _samples())
    assert (sha_a, n_a) == (sha_b, n_b)
    assert a.read_bytes() == b.read_bytes()
    assert sha_a == sh.sha256_file(a) and n_a == a.stat().st_size
    with tarfile.open(a) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == ["000000_000000.cls", "000000_000000.json",
                                             "000000_000000.mask.png", "000000_000000.png"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
    assert not list(tmp_path.glob(".tmp-*"))


def test_webdataset_groups_multi_dot_extensions(tmp_path):
    import webdataset as wds
    path = tmp_path / "s.tar"
    sh.write_tar(path, _samples())
    got = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in got] == [f"000000_{i:06d}" for i in range(3)]
    assert {k for k in got[0] if not k.startswith("__")} == {"png", "json", "mask.png", "cls"}
    assert json.loads(got[1]["json"]) == {"cls": 1, "i": 1}
    assert got[2]["cls"] == b"2"
    # the plain reader agrees with webdataset byte for byte
    plain = sh.read_tar_samples(path)
    assert [{k: v for k, v in s.items() if not k.startswith("__")} for s in got] == \
        [{k: v for k, v in s.items() if k != "__key__"} for s in plain]
    assert sh.read_sample(path, "000000_000001")["json"] == got[1]["json"]
    with pytest.raises(KeyError):
        sh.read_sample(path, "000000_000009")


def test_bad_keys_and_values_are_refused(tmp_path):
    with pytest.raises(sh.ShardFormatError, match="dot"):
        sh.encode_sample("a.b", {"png": b"x"})
    with pytest.raises(sh.ShardFormatError, match="encode_png"):
        sh.encode_sample("k", {"png": np.zeros((2, 2), np.uint8)})
    with pytest.raises(sh.ShardFormatError, match="no data"):
        sh.encode_sample("k", {"__key__": "k"})
    with pytest.raises(ValueError, match="uint8"):
        sh.encode_png(np.zeros((2, 2), np.float32))
    assert sh.encode_json({"b": 1, "a": np.float32(0.5)}) == b'{"a":0.5,"b":1}'


def test_aborted_writer_leaves_nothing_and_temp_files_are_hidden(tmp_path):
    with pytest.raises(RuntimeError):
        with sh.AtomicTarWriter(tmp_path / "shard-000000.tar") as w:
            w.add("k0", {"txt": "a"})
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    w = sh.AtomicTarWriter(tmp_path / "shard-000001.tar")  # as if the process were killed now
    w.add("k0", {"txt": "a"})
    assert not list(tmp_path.glob("shard-*")) and not list(tmp_path.glob("*.tar"))
    assert sh.remove_temp_files(tmp_path) == [w.tmp]
    assert list(tmp_path.iterdir()) == []


def test_json_atomic_and_truncated_tar_detected(tmp_path):
    sh.write_json_atomic(tmp_path / "x.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2]}
    path = tmp_path / "s.tar"
    sh.write_tar(path, _samples(5))
    data = path.read_bytes()
    for cut in (1500, 1024 * 3, len(data) - 10240):  # mid-header, at a header boundary, in the end blocks
        path.write_bytes(data[:cut])
        with pytest.raises((tarfile.TarError, sh.ShardFormatError)):
            sh.read_tar_samples(path)


def test_wids_index_is_read_by_wids(tmp_path):
    import wids
    entries = []
    for s in range(2):
        name = f"shard-{s:06d}.tar"
        sha, n = sh.write_tar(tmp_path / name, [(f"{s:06d}_{i:06d}", {"txt": f"{s}-{i}", "json": {"i": i}})
                                                for i in range(3 - s)])
        entries.append({"url": name, "nsamples": 3 - s, "filesize": n, "sha256": sha})
    sh.write_json_atomic(tmp_path / "index.json", si.build_wids_index(entries, name="t"))
    assert si.count_samples(tmp_path / "index.json") == 5
    assert si.shard_urls(tmp_path / "index.json") == [str(tmp_path / e["url"]) for e in entries]
    ds = wids.ShardListDataset(str(tmp_path / "index.json"), cache_dir=str(tmp_path / "cache"),
                                 transformations=[])
    assert len(ds) == 5
    assert ds[4]["__key__"] == "000001_000001" and ds[4][".txt"].read() == b"1-1"
