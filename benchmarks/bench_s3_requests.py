"""Requests per committed shard when generating into a bucket, counted at a real S3 endpoint (moto server on
127.0.0.1): a first run, a resume that finds everything committed (verify=size and verify=sha256), and
reading the shards back. Writes benchmarks/results/s3_requests.json.

    python benchmarks/bench_s3_requests.py --shards 20
"""
import argparse
import collections
import json
import logging
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from s3_server import make_bucket, s3_env, s3_server  # noqa: E402


class RequestCounter(logging.Handler):
    """Counts the server's access-log lines by HTTP method."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def emit(self, record):
        m = re.search(r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|POST|HEAD|DELETE) ', record.getMessage())
        if m:
            self.counts[m.group(1)] += 1

    def take(self):
        out, self.counts = dict(self.counts), collections.Counter()
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "s3_requests.json"))
    args = ap.parse_args()
    counter = RequestCounter()
    log = logging.getLogger("werkzeug")
    log.setLevel(logging.INFO)
    log.addHandler(counter)
    log.propagate = False

    with s3_server() as endpoint:
        os.environ.update(s3_env(endpoint))
        from cgn_dist.data.stream import make_loader
        from cgn_dist.sharding.run import generate_dataset
        from cgn_dist.sharding.toy import ToySamplerFactory

        bucket = make_bucket(endpoint)
        url = f"s3://{bucket}/bench"
        n = args.shards * args.shard_size
        factory = ToySamplerFactory(image_size=32)
        counter.take()
        rows = {}
        generate_dataset(factory, url, n, args.shard_size, 0, batch_size=8, progress=False)
        rows["first run"] = counter.take()
        generate_dataset(factory, url, n, args.shard_size, 0, batch_size=8, progress=False, verify="size")
        rows["resume, all committed (verify=size)"] = counter.take()
        generate_dataset(factory, url, n, args.shard_size, 0, batch_size=8, progress=False, verify="sha256")
        rows["resume, all committed (verify=sha256)"] = counter.take()
        seen = sum(len(b["__key__"]) for b in make_loader(url, 16, train=False, rank=0, world_size=1,
                                                               num_workers=0, labels=(), image_size=8, resize=8))
        assert seen == n
        rows["reading every shard once"] = counter.take()
    result = {"shards": args.shards, "shard_size": args.shard_size,
              "requests": rows,
              "per_shard": {k: round(sum(v.values()) / args.shards, 2) for k, v in rows.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
