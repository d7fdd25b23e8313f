"""Which samples each rank and worker reads: planned from shard counts before any byte is read.

The shards of a split, in a per-epoch shuffled order, are treated as one sequence of N samples.

Training (equal-steps rule): every rank runs ``steps = (N // world) // batch_size`` steps (rounded
down to a multiple of the gradient-accumulation steps, so epochs end on an update). Rank
``r`` owns samples ``[r * (N // world), ...)`` of the sequence and reads the first
``steps * batch_size`` of them; the remainder of its share (fewer than one batch per rank, plus
``N % world`` at the end) is not read this epoch, and the shard shuffle hands it to a different
place in the next epoch. No sample is read twice in an epoch. Within a rank, worker ``w`` reads a
contiguous run of whole batches: batches ``w, w + workers, ...`` in the order the DataLoader
asks for them, so every worker delivers exactly its share and no rank runs dry.

Evaluation: rank ``r`` reads ``[N * r // world, N * (r + 1) // world)``, split across its
workers; every sample is read exactly once across all ranks, and ranks may run different step
counts because evaluation does no collective until the final sum.

Because a range may start or end inside a shard, a reader skips the first samples of a shard it
starts in the middle of; with many more shards than readers, that is a small share of the I/O.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from eatdist.data.corpus import ShardInfo
from eatdist.errors import DataError


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` (positions within the shard) of the shard at ``path``."""

    path: str
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


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
    """Return the equal number of steps every rank runs in one epoch.

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
    """Return, for each worker of ``rank``, the segments it reads in ``epoch``.

    Worker ``w`` reads exactly ``len(range(w, steps, workers)) * batch_size`` samples.
    """
    pairs = [(s.file, s.samples) if isinstance(s, ShardInfo) else s for s in shards]
    total = sum(c for _, c in pairs)
    steps = train_steps(total, world, batch_size, step_multiple)
    order = epoch_order(pairs, seed, epoch)
    start = rank * (total // world)
    plans = []
    for w in range(workers):
        n = len(range(w, steps, workers)) * batch_size
        plans.append(slice_sequence(order, start, start + n))
        start += n
    return plans


def plan_eval(
    shards: list[ShardInfo] | list[tuple[str, int]], *, world: int, rank: int, workers: int
) -> list[list[Segment]]:
    """Return, for each worker of ``rank``, the segments it reads once (no shuffle, no drop)."""
    pairs = [(s.file, s.samples) if isinstance(s, ShardInfo) else s for s in shards]
    total = sum(c for _, c in pairs)
    lo, hi = total * rank // world, total * (rank + 1) // world
    plans = []
    for w in range(workers):
        a = lo + (hi - lo) * w // workers
        b = lo + (hi - lo) * (w + 1) // workers
        plans.append(slice_sequence(pairs, a, b))
    return plans
