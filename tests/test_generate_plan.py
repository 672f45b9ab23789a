"""Plans, keys and seeds: derived from (run seed, shard, index) alone."""
import numpy as np
import pytest

from cgn_dist.sharding.plan import (SEED_DERIVATION, ShardSpec, batch_bounds, make_plan, parse_key, sample_key,
                                    sample_refs, sample_seed)
from cgn_dist.sharding.sampler import build_factory, describe_factory
from cgn_dist.sharding.toy import ToySamplerFactory


def test_plan_sizes_and_last_shard():
    plan = make_plan(10, 4, run_seed=3)
    assert plan == [ShardSpec(0, 4, 3), ShardSpec(1, 4, 3), ShardSpec(2, 2, 3)]
    assert make_plan(8, 4, 0)[-1].n == 4
    assert ShardSpec.from_dict(plan[2].to_dict()) == plan[2]
    for bad in [(0, 4, 0), (5, 0, 0), (5, 4, -1), (5, 4, 1.5)]:
        with pytest.raises(ValueError):
            make_plan(*bad)


def test_keys_have_no_dots_and_round_trip():
    assert sample_key(12, 345) == "000012_000345"
    assert parse_key("000012_000345") == (12, 345)
    with pytest.raises(ValueError):
        parse_key("a.b")


def _seed_by_documented_derivation(run_seed, shard, index):
    # SEED_DERIVATION, written a second way: one uint64 word of the SeedSequence is the two uint32 words
    # little-endian, so swapping its halves gives "words[0] high, words[1] low"; then drop the low bit.
    word = int(np.random.SeedSequence([run_seed, shard, index]).generate_state(1, np.uint64)[0])
    return (((word & 0xFFFFFFFF) << 32) | (word >> 32)) >> 1


def test_sample_seeds_follow_the_documented_derivation():
    assert "SeedSequence([run_seed, shard_id, index])" in SEED_DERIVATION  # what manifests promise
    grid = [(r, s, i) for r in (0, 1, 2**40 + 3) for s in (0, 1, 7, 999_999) for i in (0, 1, 5, 123_456)]
    for args in grid:
        assert sample_seed(*args) == _seed_by_documented_derivation(*args), args
    seeds = {sample_seed(0, s, i) for s in range(20) for i in range(50)}
    assert len(seeds) == 1000
    assert all(0 <= x < 2 ** 63 for x in seeds)
    assert max(seeds) >= 2 ** 62  # all 63 bits in use, not a narrower hash


def test_refs_and_batches():
    spec = ShardSpec(2, 5, 9)
    refs = sample_refs(spec)
    assert [r.key for r in refs] == [f"000002_{i:06d}" for i in range(5)]
    assert refs[3] == sample_refs(spec, 3, 4)[0]
    assert refs[3].seed == sample_seed(9, 2, 3) and refs[3].run_seed == 9
    assert batch_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]


def test_dataclass_factory_round_trips_through_its_description():
    f = ToySamplerFactory(image_size=8, image_format="jpg")
    desc = describe_factory(f)
    assert desc == {"target": "cgn_dist.sharding.toy:ToySamplerFactory", "kwargs": {
        "image_size": 8, "num_classes": 10, "image_format": "jpg", "with_mask": True, "sleep_s": 0.0,
        "crash_on_key": "", "crash_marker": "", "odd_info_marker": ""}}
    assert build_factory(desc) == f
    assert "repr" in describe_factory(lambda: None)


def test_a_folder_written_before_the_engine_moved_is_still_the_same_run(tmp_path):
    """plan.json / manifest.json of older folders name the toy factory under cgn_dist.generate.toy: it still
    rebuilds, and a rerun with the factory of today is the same run (no 'another run' refusal)."""
    import json

    from cgn_dist.sharding.manifest import build_plan_doc, check_or_write_plan
    from cgn_dist.sharding.sampler import build_factory, describe_factory
    from cgn_dist.sharding.toy import ToySamplerFactory

    today = describe_factory(ToySamplerFactory(image_size=8))
    assert today["target"] == "cgn_dist.sharding.toy:ToySamplerFactory"
    old = dict(today, target="cgn_dist.generate.toy:ToySamplerFactory")
    assert build_factory(old) == ToySamplerFactory(image_size=8)
    (tmp_path / "plan.json").write_text(json.dumps(build_plan_doc(7, 4, old)))
    check_or_write_plan(tmp_path, build_plan_doc(7, 4, today))  # raises when it takes them for two runs
