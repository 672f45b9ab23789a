"""Time to commit tiny shards (one small member each) the way writer.write_shard commits them: the tar
(fsync, rename, folder fsync), then the commit marker, durable (fsync of the marker and the folder again,
as before) or not (today). The two are interleaved round by round in one run, so the ratio survives a
noisy disk; fsyncs are counted per shard.

    python benchmarks/bench_shard_commit.py --shards 200 --rounds 5 --dir /some/disk

Measured on a local ext4 virtual disk: 1.9-2.2 ms per shard with 4 fsyncs, 1.2-1.5 ms with 2
(ratio 1.47-1.58 in three runs, 1.0-1.07 in two noisier ones). On NFS each fsync is a server round trip.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from cgn_dist.data.shards import AtomicTarWriter, write_json_atomic

_real_fsync = os.fsync
_count = [0]


def _counting_fsync(fd: int) -> None:
    _count[0] += 1
    _real_fsync(fd)


def commit_shards(folder: Path, n: int, durable_marker: bool) -> tuple[float, float]:
    """Seconds for n commits, and fsyncs per shard."""
    folder.mkdir(parents=True, exist_ok=True)
    _count[0] = 0
    t0 = time.perf_counter()
    for i in range(n):
        with AtomicTarWriter(folder / f"shard-{i:06d}.tar") as w:
            w.add(f"{i:06d}_000000", {"txt": f"sample {i}"})
            sha, size = w.commit()
        write_json_atomic(folder / f"shard-{i:06d}_stats.json", {"sha256": sha, "bytes": size},
                          durable=durable_marker)
    return time.perf_counter() - t0, _count[0] / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="a folder on the disk to measure (default: the temp folder)")
    args = ap.parse_args()
    os.fsync = _counting_fsync
    times: dict[str, list[float]] = {"durable_marker": [], "marker_not_fsynced": []}
    per_shard: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for r in range(args.rounds):
            order = list(times) if r % 2 == 0 else list(reversed(times))
            for name in order:
                secs, fs = commit_shards(Path(tmp) / f"{name}-{r}", args.shards, name == "durable_marker")
                times[name].append(secs)
                per_shard[name] = fs
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(json.dumps({"shards": args.shards, "rounds": args.rounds, "fsyncs_per_shard": per_shard,
                      "median_s": {k: round(v, 4) for k, v in med.items()},
                      "ms_per_shard": {k: round(1e3 * v / args.shards, 3) for k, v in med.items()},
                      "ratio_durable_over_not": round(med["durable_marker"] / med["marker_not_fsynced"], 2)}))


if __name__ == "__main__":
    main()
