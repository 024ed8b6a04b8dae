"""The plan: every sample once per epoch over all processes, same step count everywhere; contiguous eval shards."""

import collections
import itertools

import numpy as np
import pytest

from dist_bot.data.plan import MIN_PER_MICRO_BATCH, EpochStream, plan_epoch, shard_eval


@pytest.mark.parametrize(
    ("n", "batch", "world", "accum"),
    [(103, 8, 2, 1), (100, 10, 4, 1), (1437, 32, 2, 1), (57, 4, 3, 2), (9, 4, 2, 1), (1000, 16, 8, 4)],
)
def test_every_training_sample_once_per_epoch(n, batch, world, accum):
    plans = [plan_epoch(n, batch, r, world, accum, seed=0, epoch=3) for r in range(world)]
    assert len({len(p) for p in plans}) == 1, "every process must run the same number of steps"
    seen = collections.Counter(i for p in plans for step in p for mb in step.micro_batches for i in mb)
    assert sorted(seen) == list(range(n)) and set(seen.values()) == {1}
    for s in range(len(plans[0])):
        step_size = plans[0][s].step_size
        assert all(p[s].step_size == step_size for p in plans)
        assert sum(len(mb) for p in plans for mb in p[s].micro_batches) == step_size
        for p in plans:
            assert 1 <= len(p[s].micro_batches) <= accum
            assert all(len(mb) >= MIN_PER_MICRO_BATCH for mb in p[s].micro_batches)
            # a folded remainder adds at most MIN_PER_MICRO_BATCH images to a micro-batch
            assert all(len(mb) <= batch + MIN_PER_MICRO_BATCH for mb in p[s].micro_batches)


def test_full_steps_have_the_global_batch():
    plan = plan_epoch(1000, 16, 0, 4, 2, seed=0, epoch=0)
    assert [s.step_size for s in plan[:-1]] == [128] * (len(plan) - 1)
    assert [len(mb) for mb in plan[0].micro_batches] == [16, 16]


def test_order_is_fixed_by_seed_and_epoch():
    def order(seed, epoch):
        return [i for s in plan_epoch(200, 8, 1, 2, 1, seed, epoch) for mb in s.micro_batches for i in mb]

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)


def test_sharding_is_by_global_rank():
    # the 2 processes of node 1 in a 2x2 job are ranks 2 and 3, not 0 and 1: their shares differ
    a = plan_epoch(64, 4, 2, 4, 1, seed=0, epoch=0)
    b = plan_epoch(64, 4, 0, 4, 1, seed=0, epoch=0)
    assert not set(a[0].micro_batches[0]) & set(b[0].micro_batches[0])


def test_too_little_data_for_the_processes_is_an_error():
    with pytest.raises(ValueError, match="cannot feed 4 processes"):
        plan_epoch(5, 8, 0, 4, 1, seed=0, epoch=0)


@pytest.mark.parametrize(("n", "batch", "world"), [(103, 8, 2), (3925, 64, 3), (10, 4, 4), (3, 8, 4)])
def test_every_validation_sample_once_without_padding(n, batch, world):
    shards = [shard_eval(n, batch, r, world) for r in range(world)]
    seen = [i for s in shards for b in s for i in b]
    assert sorted(seen) == list(range(n))
    sizes = [sum(map(len, s)) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert all(0 < len(b) <= batch for s in shards for b in s)


def test_plan_is_cheap_for_imagenet():
    plan = plan_epoch(1_281_167, 128, 5, 8, 1, seed=0, epoch=7)
    assert len(plan) == int(np.ceil(1_281_167 / 1024)) - (1 if 1_281_167 % 1024 < 16 else 0)


def test_accumulation_sees_the_batches_more_processes_would():
    two_procs = [plan_epoch(103, 8, r, 2, 1, seed=0, epoch=1) for r in range(2)]
    one_proc = plan_epoch(103, 8, 0, 1, 2, seed=0, epoch=1)
    assert len(one_proc) == len(two_procs[0])
    for s, step in enumerate(one_proc):
        assert step.micro_batches == tuple(p[s].micro_batches[0] for p in two_procs)
        assert step.step_size == two_procs[0][s].step_size


def test_an_epoch_stream_runs_on_from_a_resumed_epoch_through_the_following_epochs():
    import functools
    import pickle

    planner = functools.partial(plan_epoch, 103, 8, 1, 2, 2, 0)  # 103 samples, rank 1 of 2, 2 micro-batches
    micro = {e: [mb for s in planner(epoch=e) for mb in s.micro_batches] for e in (3, 4, 5)}
    stream = EpochStream(planner, first_epoch=3, first_step=2)
    expected = [(3, mb) for mb in micro[3][4:]] + [(e, mb) for e in (4, 5) for mb in micro[e]]
    assert [stream[i] for i in range(len(expected))] == expected
    assert list(itertools.islice(iter(pickle.loads(pickle.dumps(stream))), len(expected))) == expected
    assert stream[len(expected) + 1] == (6, planner(epoch=6)[0].micro_batches[1])
