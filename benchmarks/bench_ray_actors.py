"""Ray at full size: 2 generation actors against 1, one CPU thread each, the model loaded once per actor,
timed after the load. Same total work: one actor writes 2 shards one after the other; two actors write one
shard each at the same time. The actors are the engine's own (ray_backend.ShardWorker, which builds the sampler
once); each writes an untimed warm-up shard first.

    source launch/env.sh; python benchmarks/bench_ray_actors.py                 # full size, bf16
    python benchmarks/bench_ray_actors.py --tiny --n 8                          # 32 px, seconds
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--n", type=int, default=4, help="images per timed shard")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--timeout-s", type=float, default=1800)
    args = ap.parse_args()

    import ray

    from cgn_dist.distributed.ray_utils import init_ray
    from cgn_dist.sharding.ray_backend import ShardWorker
    from cgn_dist.generate.imagenet.factory import ImagenetCounterfactualFactory
    from cgn_dist.sharding.plan import ShardSpec

    biggan, u2net = ("tiny", "tiny") if args.tiny else ("random-256", "random")
    # One thread per actor and nothing beside it: no overlap thread, no encoding threads.
    factory = ImagenetCounterfactualFactory(biggan=biggan, u2net=u2net, precision=args.precision, num_threads=1,
                                            forward_batch=args.n, overlap=False, encode_threads=0)
    out = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    init_ray(None, num_cpus=2)
    try:
        actor_cls = ray.remote(ShardWorker).options(num_cpus=1, max_restarts=0)
        t0 = time.perf_counter()
        actors = [actor_cls.remote(factory) for _ in range(2)]
        ray.get([a.__ray_ready__.remote() for a in actors], timeout=args.timeout_s)
        print(f"2 actors loaded the {biggan} model ({args.precision}) in {time.perf_counter() - t0:.0f} s "
              f"(both at once); {os.cpu_count()} CPUs", flush=True)
        ray.get([a.write.remote(ShardSpec(100 + i, args.n, 0), str(out), args.n, 1) for i, a in enumerate(actors)],
                timeout=args.timeout_s)  # warm-up

        def timed(jobs) -> float:
            t = time.perf_counter()
            ray.get(jobs(), timeout=args.timeout_s)
            return time.perf_counter() - t

        def one_actor():
            return [actors[0].write.remote(ShardSpec(0, args.n, 0), str(out / "one"), args.n, 1),
                    actors[0].write.remote(ShardSpec(1, args.n, 0), str(out / "one"), args.n, 1)]

        def two_actors():
            return [actors[i].write.remote(ShardSpec(i, args.n, 0), str(out / "two"), args.n, 1) for i in range(2)]

        t1 = timed(one_actor)
        t2 = timed(two_actors)
        n = 2 * args.n
        print(f"1 actor : {n} images in {t1:7.1f} s = {n / t1:.3f} img/s")
        print(f"2 actors: {n} images in {t2:7.1f} s = {n / t2:.3f} img/s")
        print(f"2 actors / 1 actor: {t1 / t2:.2f}x (goal >= 1.8x)")
        same = all((out / "one" / f"shard-{i:06d}.tar").read_bytes() == (out / "two" / f"shard-{i:06d}.tar").read_bytes()
                   for i in range(2))
        print(f"shards written by 1 and by 2 actors are byte-identical: {same}")
        for a in actors:
            ray.kill(a)
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
