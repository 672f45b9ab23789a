"""`cgn-dist verify DIR` on real runs: a clean folder verifies clean; a truncated, a deleted, a bit-flipped
shard, one with a foreign key and one short of a sample are each listed once, and the printed rebuild
command, run as printed, restores the original bytes. Also on a bucket (a local S3 endpoint)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cgn_dist.cli import main
from cgn_dist.data.shards import read_tar_samples, write_tar

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import clear_fsspec_cache, make_bucket, s3_env, s3_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_cwd(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)  # the config paths are relative to the repository


def _generate(out_dir, name, shared_ref):
    ckpt = shared_ref / "original_mnist_checkpoints" / "cgn_colored_MNIST.pth"
    return main(["generate", "configs/debug/mnist_tiny.yaml", f"out_dir={out_dir}", f"name={name}",
                 f"generate.checkpoint={ckpt}", "generate.n_samples=15", "generate.shard_size=3",
                 "train.progress=false"])


def _tars(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.tar"))}


def _rewrite(run: Path, shard: int, samples) -> None:
    """Replace a shard by other samples and make its stats, manifest and index agree with the new bytes,
    as a foreign writer would: only the sample count and keys can tell."""
    name = f"shard-{shard:06d}.tar"
    write_tar(run / name, [(s["__key__"], {k: v for k, v in s.items() if k != "__key__"}) for s in samples])
    data = (run / name).read_bytes()
    sha, size = hashlib.sha256(data).hexdigest(), len(data)
    stats = json.loads((run / f"shard-{shard:06d}_stats.json").read_text())
    stats.update(sha256=sha, bytes=size)
    (run / f"shard-{shard:06d}_stats.json").write_text(json.dumps(stats))
    for fname, list_key, fields in (("manifest.json", "shards", ("sha256", "bytes")),
                                    ("index.json", "shardlist", ("sha256", "filesize"))):
        doc = json.loads((run / fname).read_text())
        entry = next(e for e in doc[list_key] if Path(e["url"]).name == name)
        entry[fields[0]], entry[fields[1]] = sha, size
        (run / fname).write_text(json.dumps(doc))


def test_verify_lists_each_problem_and_the_rebuild_restores_the_run(tmp_path, shared_ref, capsys):
    assert _generate(tmp_path, "cf", shared_ref) == 0
    run = tmp_path / "cf"
    clean = _tars(run)
    capsys.readouterr()
    assert main(["verify", str(run)]) == 0
    assert capsys.readouterr().out.strip() == (f"{run}: 5 shards, 15 samples, {sum(map(len, clean.values())):,} "
                                               "bytes: every shard matches manifest.json (size, sha256, samples, keys)")

    (run / "shard-000000.tar").write_bytes(clean["shard-000000.tar"][:5000])  # truncated
    (run / "shard-000001.tar").unlink()  # deleted
    flipped = bytearray(clean["shard-000002.tar"])
    flipped[600] ^= 0x01  # inside the first member's data: the tar still reads
    (run / "shard-000002.tar").write_bytes(bytes(flipped))
    s3 = list(read_tar_samples(run / "shard-000003.tar"))
    _rewrite(run, 3, [*s3[:2], {**s3[2], "__key__": "000009_000000"}])  # a key of no shard of this plan
    s4 = list(read_tar_samples(run / "shard-000004.tar"))
    _rewrite(run, 4, s4[:2])  # one sample short of the manifest's count

    assert main(["verify", str(run)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6, lines
    assert lines[0].startswith(f"{run}/shard-000000.tar: truncated or corrupt tar (5,000 of ")
    assert lines[1].startswith(f"{run}/shard-000001.tar: missing (manifest: 3 samples")
    assert lines[2] == f"{run}/shard-000002.tar: sha256 differs from manifest.json (the bytes changed after it was written)"
    assert lines[3].startswith(f"{run}/shard-000003.tar: unexpected keys ['000009_000000']")
    assert lines[4] == f"{run}/shard-000004.tar: 2 samples, manifest says 3"
    fix = lines[5]
    assert fix.startswith(f"5 problem(s) in {run} (5 shards); rebuild")
    command = fix.split(": ", 1)[1]
    assert command.startswith("rm -f ") and f"cgn-dist generate {run}/config.yaml out_dir={tmp_path} name=cf" in command

    # what the user does next: paste the command
    subprocess.run(command.replace("cgn-dist ", f"{sys.executable} -m cgn_dist.cli "), shell=True, check=True,
                   cwd=REPO, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert _tars(run) == clean
    assert main(["verify", str(run)]) == 0


def test_verify_of_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no generation run at") and "\n" not in err


def test_verify_a_bucket(tmp_path, shared_ref, monkeypatch, capsys):
    with s3_server() as endpoint:
        for k, v in s3_env(endpoint).items():
            monkeypatch.setenv(k, v)
        clear_fsspec_cache()
        try:
            bucket = make_bucket(endpoint)
            assert _generate(f"s3://{bucket}/runs", "cf", shared_ref) == 0
            capsys.readouterr()
            url = f"s3://{bucket}/runs/cf"
            assert main(["verify", url]) == 0
            assert "every shard matches manifest.json" in capsys.readouterr().out
            import fsspec

            fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint})
            data = fs.cat_file(f"{bucket}/runs/cf/shard-000002.tar")
            fs.pipe_file(f"{bucket}/runs/cf/shard-000002.tar", data[:4096])
            fs.rm_file(f"{bucket}/runs/cf/shard-000004.tar")
            clear_fsspec_cache()
            assert main(["verify", url]) == 1
            lines = capsys.readouterr().out.strip().splitlines()
            assert lines[0].startswith(f"{url}/shard-000002.tar: truncated or corrupt tar (4,096 of")
            assert lines[1].startswith(f"{url}/shard-000004.tar: missing")
            assert lines[2].startswith(f"2 problem(s) in {url}") and f"delete {url}/shard-000002.tar" in lines[2] \
                and f"cgn-dist generate <{url}/config.yaml, copied here> out_dir=s3://{bucket}/runs name=cf" in lines[2]
        finally:
            clear_fsspec_cache()


def test_verify_an_ingested_folder_names_make_shards(tmp_path, capsys):
    from imagenet_fixture import make_imagenet_tree

    tree = make_imagenet_tree(tmp_path / "ILSVRC2012", copies=1)
    out = tmp_path / "train_shards"
    assert main(["make-shards", "configs/shards/debug_tiny.yaml", f"shards.root={tree.train}",
                 f"shards.out={out}", "shards.shard_size=3"]) == 0
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    (out / "shard-000001.tar").unlink()
    assert main(["verify", str(out)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith(f"{out}/shard-000001.tar: missing")
    assert lines[-1].endswith(f"&& cgn-dist make-shards {out}/config.yaml shards.out={out}")
    command = lines[-1].split(": ", 1)[1].replace("cgn-dist ", f"{sys.executable} -m cgn_dist.cli ")
    subprocess.run(command, shell=True, check=True, cwd=REPO, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    assert main(["verify", str(out)]) == 0
