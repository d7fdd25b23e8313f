from collections import Counter

import pytest

from eatdist.data.plan import plan_eval, plan_train, slice_sequence, train_steps
from eatdist.errors import DataError

UNEVEN = [("s0", 37), ("s1", 5), ("s2", 120), ("s3", 64), ("s4", 11)]


def positions(segments):
    return [(s.path, i) for s in segments for i in range(s.start, s.stop)]


@pytest.mark.parametrize("world,workers,batch", [(2, 2, 8), (3, 2, 5), (4, 3, 4), (8, 4, 2), (1, 1, 16)])
def test_train_plan_equal_steps_no_sample_twice(world, workers, batch):
    steps = train_steps(237, world, batch)
    seen = Counter()
    for rank in range(world):
        plans = plan_train(UNEVEN, world=world, rank=rank, workers=workers, batch_size=batch, seed=1, epoch=2)
        per_worker = [sum(s.count for s in p) for p in plans]
        # worker w delivers the batches w, w + workers, ... the DataLoader asks it for
        assert per_worker == [len(range(w, steps, workers)) * batch for w in range(workers)]
        for p in plans:
            seen.update(positions(p))
    assert max(seen.values()) == 1
    # only the documented remainder is left out: less than one batch per rank plus N % world
    assert 237 - sum(seen.values()) < world * batch + world


def test_fewer_shards_than_readers_still_balanced():
    plans = [plan_train([("only", 100)], world=4, rank=r, workers=2, batch_size=4, seed=0, epoch=0) for r in range(4)]
    counts = [sum(s.count for s in p) for rank_plans in plans for p in rank_plans]
    assert counts == [12] * 8


def test_shard_order_changes_with_epoch_and_is_shared_by_ranks():
    a = plan_train(UNEVEN, world=2, rank=0, workers=1, batch_size=4, seed=0, epoch=0)
    by_epoch = [plan_train(UNEVEN, world=2, rank=0, workers=1, batch_size=4, seed=0, epoch=e) for e in range(6)]
    assert len({tuple(p[0]) for p in by_epoch}) > 1
    assert a == plan_train(UNEVEN, world=2, rank=0, workers=1, batch_size=4, seed=0, epoch=0)


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2), (3, 4), (7, 2)])
def test_eval_plan_reads_every_sample_exactly_once(world, workers):
    seen = Counter()
    for rank in range(world):
        for p in plan_eval(UNEVEN, world=world, rank=rank, workers=workers):
            seen.update(positions(p))
    assert sum(seen.values()) == 237 and max(seen.values()) == 1


def test_slice_crosses_shard_boundaries():
    segs = slice_sequence([("a", 10), ("b", 10), ("c", 10)], 5, 25)
    assert [(s.path, s.start, s.stop) for s in segs] == [("a", 5, 10), ("b", 0, 10), ("c", 0, 5)]


def test_too_small_split_is_a_clear_error():
    with pytest.raises(DataError, match=r"fewer than 1 batch\(es\) per rank"):
        train_steps(10, 2, 8)


def test_steps_round_down_to_whole_accumulation_cycles():
    assert train_steps(237, 2, 8) == 14
    assert train_steps(237, 2, 8, multiple=4) == 12
    plans = plan_train(UNEVEN, world=2, rank=1, workers=2, batch_size=8, seed=0, epoch=0, step_multiple=4)
    assert sum(s.count for p in plans for s in p) == 12 * 8
    with pytest.raises(DataError, match="grad_accum 16"):
        train_steps(237, 2, 8, multiple=16)


def read_positions(intervals, phase, steps, seed, epoch, index):
    from eatdist.data.plan import consumed

    return consumed(intervals, phase, steps, seed, epoch, index)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3), (3, 2)])
@pytest.mark.parametrize("stop_at", [1, 5, 9])
def test_elastic_phases_never_read_a_sample_twice(before, after, stop_at):
    from eatdist.data.plan import Phase, plan_epoch

    first = Phase(world=before, workers=2, batch_size=4, shuffle_block=7)
    plan0 = plan_epoch(UNEVEN, seed=3, epoch=1, phases=[], current=first)
    done = min(stop_at, plan0.steps - 1)
    read = read_positions(plan0.intervals, first, done, 3, 1, 0)
    second = Phase(world=after, workers=3, batch_size=4, shuffle_block=5)
    finished = [Phase(**{**first.to_json(), "steps_done": done})]
    plan1 = plan_epoch(UNEVEN, seed=3, epoch=1, phases=finished, current=second)
    assert sum(hi - lo for lo, hi in plan1.intervals) == 237 - len(read)
    read += read_positions(plan1.intervals, second, plan1.steps, 3, 1, 1)
    assert len(read) == len(set(read))  # no sample twice in the epoch
    # what is left unread is the second phase's remainder only: < one batch per rank + M % world
    assert 237 - len(read) < after * 4 + after


def test_consumed_matches_what_the_workers_read():
    from eatdist.data.plan import Phase, block_order, consumed, delivered, plan_epoch, positions, take

    phase = Phase(world=2, workers=2, batch_size=3, shuffle_block=5)
    plan = plan_epoch(UNEVEN, seed=0, epoch=0, phases=[], current=phase)
    read = []
    for rank in range(2):
        for role in range(2):
            run = list(positions(plan.role_run(rank, role)))
            order = []
            for b in range(0, len(run), 5):
                order += block_order(run[b : b + 5], (0, 0, 0, rank, role, b // 5))
            read += order[: delivered(phase, role, 7)]
    assert sorted(read) == sorted(consumed(plan.intervals, phase, 7, 0, 0, 0))
    assert take([(0, 5), (10, 20)], 3, 9) == [(3, 5), (10, 14)]
