"""Which samples each rank and worker reads: planned from shard counts before any byte is read.

The shards of a split, in a per-epoch shuffled order, are treated as one sequence of N samples;
a sample is named by its position in that sequence.

Training (equal-steps rule): every rank runs ``steps = (M // world) // batch_size`` steps (rounded
down to a multiple of the gradient-accumulation steps, so epochs end on an update), where M is
the number of samples still to read this epoch (N at the start). Rank ``r`` owns positions
``[r * (M // world), ...)`` of that sequence and reads the first ``steps * batch_size`` of them;
the remainder of its share (fewer than one batch per rank, plus ``M % world`` at the end) is not
read this epoch, and the shard shuffle hands it to a different place in the next epoch. Within a
rank, worker (role) ``w`` reads a contiguous run of whole batches: batches ``w, w + workers, ...``
in the order the DataLoader asks for them, so every worker delivers exactly its share. A worker
cuts its run into blocks of ``shuffle_block`` samples and reads each block in an order permuted by
a seed of its own: the shuffle is a pure function of (seed, epoch, phase, rank, role, block).

Because the reads are pure functions of the step count, the data position is tiny: an epoch is a
list of *phases* (world size, workers, batch size, steps run). Resuming with the same phase
continues it exactly (bitwise); resuming with another world size or worker count closes the
phase, removes the samples it consumed from the sequence and plans a new phase over what is
left — no sample is read twice in an epoch, and each phase leaves its own remainder (fewer than
one batch per rank plus ``M % world``).

Evaluation: rank ``r`` reads ``[N * r // world, N * (r + 1) // world)``, split across its
workers; every sample is read exactly once across all ranks, and ranks may run different step
counts because evaluation does no collective until the final sum.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from eatdist.data.corpus import ShardInfo
from eatdist.errors import DataError

Interval = tuple[int, int]  # positions [lo, hi) of the epoch sequence


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` (positions within the shard) of the shard at ``path``."""

    path: str
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Phase:
    """How one stretch of an epoch was read: its layout and the steps it ran."""

    world: int
    workers: int
    batch_size: int
    step_multiple: int = 1
    shuffle_block: int = 500
    steps_done: int = 0

    def layout(self) -> tuple[int, int, int, int, int]:
        """The fields that decide the reads (two phases with one layout read alike)."""
        return (self.world, self.workers, self.batch_size, self.step_multiple, self.shuffle_block)

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, int]) -> Phase:
        return cls(**{k: int(v) for k, v in data.items()})


def _pairs(shards: list[ShardInfo] | list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [(s.file, s.samples) if isinstance(s, ShardInfo) else s for s in shards]


def epoch_order(shards: list[tuple[str, int]], seed: int, epoch: int) -> list[tuple[str, int]]:
    """Return the shards in the order of ``epoch``: a permutation every rank computes alike."""
    order = list(shards)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def slice_sequence(shards: list[tuple[str, int]], start: int, stop: int) -> list[Segment]:
    """Return the segments covering positions ``[start, stop)`` of the concatenated shards."""
    segments: list[Segment] = []
    offset = 0
    for path, count in shards:
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            segments.append(Segment(path, lo - offset, hi - offset))
        offset += count
        if offset >= stop:
            break
    return segments


def train_steps(total: int, world: int, batch_size: int, multiple: int = 1) -> int:
    """Return the equal number of steps every rank runs over ``total`` samples.

    The count is rounded down to a ``multiple`` (the gradient-accumulation steps), so every
    epoch ends on an optimizer update. Raises:
        DataError: when the split holds less than that many batches per rank.
    """
    steps = (total // world) // batch_size // multiple * multiple
    if steps == 0:
        raise DataError(
            f"the training split has {total} samples, fewer than {multiple} batch(es) per rank "
            f"({world} ranks x batch_size {batch_size} x grad_accum {multiple}); lower data.batch_size"
        )
    return steps


# ------------------------------------------------------------------------------ intervals
def interval_count(intervals: list[Interval]) -> int:
    return sum(hi - lo for lo, hi in intervals)


def take(intervals: list[Interval], start: int, stop: int) -> list[Interval]:
    """Return items ``[start, stop)`` of the sequence the intervals list, as intervals."""
    out: list[Interval] = []
    offset = 0
    for lo, hi in intervals:
        a, b = max(start, offset), min(stop, offset + hi - lo)
        if a < b:
            out.append((lo + a - offset, lo + b - offset))
        offset += hi - lo
        if offset >= stop:
            break
    return out


def subtract(intervals: list[Interval], removed: list[int]) -> list[Interval]:
    """Return ``intervals`` without the positions in ``removed`` (order kept)."""
    gone = sorted(set(removed))
    out: list[Interval] = []
    for lo, hi in intervals:
        i = bisect.bisect_left(gone, lo)
        cursor = lo
        while i < len(gone) and gone[i] < hi:
            if cursor < gone[i]:
                out.append((cursor, gone[i]))
            cursor = gone[i] + 1
            i += 1
        if cursor < hi:
            out.append((cursor, hi))
    return out


def positions(intervals: list[Interval]) -> Iterator[int]:
    for lo, hi in intervals:
        yield from range(lo, hi)


# ------------------------------------------------------------------------------ phases
def phase_steps(count: int, phase: Phase) -> int:
    """Return the equal steps of every rank when ``phase`` reads from ``count`` samples (may be 0)."""
    return (count // phase.world) // phase.batch_size // phase.step_multiple * phase.step_multiple


def role_runs(intervals: list[Interval], phase: Phase, rank: int) -> list[list[Interval]]:
    """Return the run of positions each worker role of ``rank`` reads in ``phase``."""
    steps = phase_steps(interval_count(intervals), phase)
    start = rank * (interval_count(intervals) // phase.world)
    runs = []
    for w in range(phase.workers):
        n = len(range(w, steps, phase.workers)) * phase.batch_size
        runs.append(take(intervals, start, start + n))
        start += n
    return runs


def delivered(phase: Phase, role: int, steps: int) -> int:
    """Samples worker ``role`` has delivered after ``steps`` steps of its rank."""
    return len(range(role, steps, phase.workers)) * phase.batch_size


def block_order(block: list[int], key: tuple[int, ...]) -> list[int]:
    """Return the positions of one shuffle block in the order they are read."""
    order = list(block)
    random.Random("-".join(map(str, key))).shuffle(order)
    return order


def consumed(intervals: list[Interval], phase: Phase, steps: int, seed: int, epoch: int, index: int) -> list[int]:
    """Return the positions that ``steps`` steps of ``phase`` read on all ranks (partial blocks).

    Whole blocks read are returned as well; their order does not matter for a set.
    """
    used: list[int] = []
    for rank in range(phase.world):
        for role, run in enumerate(role_runs(intervals, phase, rank)):
            n = delivered(phase, role, steps)
            whole = n // phase.shuffle_block * phase.shuffle_block
            used += positions(take(run, 0, whole))
            if n > whole:
                block = list(positions(take(run, whole, whole + phase.shuffle_block)))
                key = (seed, epoch, index, rank, role, whole // phase.shuffle_block)
                used += block_order(block, key)[: n - whole]
    return used


def remaining(total: int, phases: list[Phase], seed: int, epoch: int) -> list[Interval]:
    """Return the positions of the epoch not read by the finished ``phases`` (in sequence order)."""
    intervals: list[Interval] = [(0, total)]
    for index, phase in enumerate(phases):
        if phase.steps_done:
            intervals = subtract(intervals, consumed(intervals, phase, phase.steps_done, seed, epoch, index))
    return intervals


@dataclass(frozen=True)
class EpochPlan:
    """The reads of one rank in the current phase of an epoch."""

    order: list[tuple[str, int]]  # the shards in this epoch's order
    starts: list[int]  # the position of each shard's first sample, then N
    intervals: list[Interval]  # positions not read by earlier phases
    phase: Phase
    index: int  # this phase's index in the epoch
    steps: int  # steps every rank runs in this phase

    def role_run(self, rank: int, role: int) -> list[Interval]:
        return role_runs(self.intervals, self.phase, rank)[role]

    def segments(self, run: list[Interval]) -> list[tuple[int, Segment]]:
        """Return ``(first position, segment)`` pairs covering ``run`` in order."""
        out = []
        for lo, hi in run:
            i = bisect.bisect_right(self.starts, lo) - 1
            while lo < hi:
                path, count = self.order[i]
                stop = min(hi, self.starts[i] + count)
                if stop > lo:
                    out.append((lo, Segment(path, lo - self.starts[i], stop - self.starts[i])))
                lo, i = max(lo, stop), i + 1
        return out


def plan_epoch(
    shards: list[ShardInfo] | list[tuple[str, int]], *, seed: int, epoch: int, phases: list[Phase], current: Phase
) -> EpochPlan:
    """Return the plan of phase ``current`` after the finished ``phases`` of ``epoch``.

    A later phase may find too few samples left for one more step per rank (0 steps). Raises:
        DataError: when a fresh epoch holds less than one step per rank.
    """
    pairs = _pairs(shards)
    total = sum(c for _, c in pairs)
    intervals = remaining(total, phases, seed, epoch)
    if phases:
        steps = phase_steps(interval_count(intervals), current)
    else:
        steps = train_steps(total, current.world, current.batch_size, current.step_multiple)
    order = epoch_order(pairs, seed, epoch)
    starts = [0]
    for _, count in order:
        starts.append(starts[-1] + count)
    return EpochPlan(order, starts, intervals, current, len(phases), steps)


def plan_train(
    shards: list[ShardInfo] | list[tuple[str, int]],
    *,
    world: int,
    rank: int,
    workers: int,
    batch_size: int,
    seed: int,
    epoch: int,
    step_multiple: int = 1,
) -> list[list[Segment]]:
    """Return, for each worker of ``rank``, the segments it reads in a fresh ``epoch``.

    Worker ``w`` reads exactly ``len(range(w, steps, workers)) * batch_size`` samples.
    """
    phase = Phase(world, workers, batch_size, step_multiple)
    plan = plan_epoch(shards, seed=seed, epoch=epoch, phases=[], current=phase)
    return [[seg for _, seg in plan.segments(plan.role_run(rank, w))] for w in range(workers)]


def plan_eval(
    shards: list[ShardInfo] | list[tuple[str, int]], *, world: int, rank: int, workers: int
) -> list[list[Segment]]:
    """Return, for each worker of ``rank``, the segments it reads once (no shuffle, no drop)."""
    pairs = _pairs(shards)
    total = sum(c for _, c in pairs)
    lo, hi = total * rank // world, total * (rank + 1) // world
    plans = []
    for w in range(workers):
        a = lo + (hi - lo) * w // workers
        b = lo + (hi - lo) * (w + 1) // workers
        plans.append(slice_sequence(pairs, a, b))
    return plans
