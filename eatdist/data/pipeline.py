"""Streaming training and evaluation data from the shards of a corpus.

Each DataLoader worker reads the samples :mod:`eatdist.data.plan` gives it, decodes and checks
every sample, and batches in the worker. Every planned position that gives no usable sample is
skipped and counted by cause (:data:`SKIP_CAUSES`): undecodable (image or labels), missing from
its shard (the shard holds fewer samples than ``dataset.json`` lists, is empty or unreadable),
bad key (a dot in the key: WebDataset merged or split the sample) and truncated (beyond the cut
of a truncated shard). The counts travel with the next batch (``batch["skipped"]``, and
``batch["skipped_by"]`` per cause) so the trainer can report exact totals. In training an
unusable sample keeps its place in the batch with ``weight`` 0 (see :class:`ShardStream`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from eatdist.data.boxes import as_fractions, record_boxes, to_decoded
from eatdist.data.corpus import DatasetInfo
from eatdist.data.decode import (  # noqa: F401  (BadSample, Preprocess and decode_image are re-exported)
    BadSample,
    Decoder,
    Preprocess,
    build_transform,
    decode_image,
    decode_sized,
    jpeg_bytes,
    parse_labels,
)
from eatdist.data.plan import (
    EpochPlan,
    Phase,
    Segment,
    block_order,
    delivered,
    interval_count,
    plan_epoch,
    plan_eval,
    take,
)
from eatdist.data.remote import redact
from eatdist.data.shards import KeyClash, TruncatedShard, iter_shard
from eatdist.data.tarscan import unmerge
from eatdist.errors import DataError

log = logging.getLogger(__name__)
MAX_LOGGED_PER_WORKER = 10
EPOCH_STATE_BYTES = 1 << 16


# Why a planned position gave no usable sample; counts travel in this order (``batch["skipped_by"]``).
SKIP_CAUSES = ("undecodable", "missing", "bad_key", "truncated")
_CAUSE_WORDS = {"undecodable": "undecodable", "missing": "missing from their shard", "bad_key": "with a bad key",
                "truncated": "cut off by a truncated shard"}  # fmt: skip


def skip_causes_line(counts: list[int] | dict[str, int]) -> str:
    """Return '6 undecodable, 16 missing from their shard, ...' for the non-zero counts (list in
    :data:`SKIP_CAUSES` order, or a dict by cause)."""
    by = counts if isinstance(counts, dict) else dict(zip(SKIP_CAUSES, counts, strict=True))
    return ", ".join(f"{int(by[c])} {_CAUSE_WORDS[c]}" for c in SKIP_CAUSES if by.get(c))


@dataclass(frozen=True)
class Gap:
    """A planned position whose shard gave no sample there, and why (one of :data:`SKIP_CAUSES`)."""

    cause: str


@dataclass
class SkipTally:
    """Unusable samples one worker met: counted by cause as they are met, the first few logged."""

    pending: list[int] = field(default_factory=lambda: [0] * len(SKIP_CAUSES))
    logged: int = 0

    def skip(self, what: str, reason: str, count: int = 1, cause: str = "undecodable") -> None:
        """Count ``count`` unusable samples of ``cause`` and log the first few (``count`` 0: log only)."""
        self.pending[SKIP_CAUSES.index(cause)] += count
        if self.logged < MAX_LOGGED_PER_WORKER:
            self.logged += 1
            log.warning("skipping %s: %s", redact(what), redact(reason))

    def count(self, gap: Gap) -> None:
        """Count one position that gave no sample (logged where its shard ended)."""
        self.pending[SKIP_CAUSES.index(gap.cause)] += 1

    def take(self) -> list[int]:
        """Return the skips not yet reported, per cause in :data:`SKIP_CAUSES` order, and reset them."""
        counts, self.pending = self.pending, [0] * len(SKIP_CAUSES)
        return counts


def read_segments(segments: list[Segment], tally: SkipTally, retries: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield the raw samples of ``segments``; the positions a shard did not give are counted."""
    for _, sample in read_positions([(0, seg) for seg in segments], tally, retries):
        if isinstance(sample, Gap):
            tally.count(sample)
        else:
            yield sample


def read_positions(
    segments: list[tuple[int, Segment]], tally: SkipTally | None, retries: int | None = None
) -> Iterator[tuple[int, dict[str, Any] | Gap]]:
    """Yield ``(position, raw sample)`` for every planned sample of ``segments``, in order.

    A position the shard does not give comes as a :class:`Gap` with its cause, so the caller keeps
    its place in the plan and counts it where it is used (a resumed run passes over positions
    read before without counting them again); the shard is logged once. Samples hidden inside
    others (keys with a dot, merged by WebDataset) make the shard end early: that many of its
    missing positions are counted as bad keys.
    """
    for first, seg in segments:
        count, hidden, reason, cause = 0, 0, "", "missing"
        try:
            for sample in iter_shard(seg.path, seg.start, seg.stop, retries=retries):
                sample["__shard__"] = seg.path
                hidden += len(unmerge(sample)) - 1
                yield first + count, sample
                count += 1
                if count == seg.count:
                    break
        except DataError as exc:
            reason = str(exc)
            if isinstance(exc, TruncatedShard):
                cause = "truncated"
            elif isinstance(exc, KeyClash):
                cause = "bad_key"
        if count < seg.count:
            missing = seg.count - count
            hidden = min(hidden, missing)
            if tally is not None:
                if hidden:
                    tally.skip(f"{hidden} samples of {seg.path}", "keys with a dot, merged by WebDataset", 0)
                if missing > hidden:
                    tally.skip(f"{missing - hidden} samples of {seg.path}",
                               reason or f"the shard ended after {seg.start + count}", 0)  # fmt: skip
            for i in range(count, seg.count):
                yield first + i, Gap("bad_key" if i - count < hidden else cause)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of one sample's random augmentation: the same whoever reads it, whenever."""
    return (seed * 1_000_003 + epoch) * 2**32 + position & (2**63 - 1)


class ShardStream(IterableDataset):
    """Batches of decoded, checked samples for one rank, planned by :mod:`eatdist.data.plan`.

    In ``train`` mode every worker yields exactly its planned number of full batches. A sample
    that cannot be used (corrupt, or its shard unreadable) keeps its place in the batch as a
    copy of another sample of the batch with ``weight`` 0, so the loss ignores it, every rank
    runs the same steps and no sample is read twice in an epoch. ``set_epoch`` can resume a
    phase at any step: consumed samples are passed over unread where whole blocks went before,
    and undecoded inside the block in progress.
    """

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        *,
        preprocess: Preprocess,
        batch_size: int,
        train: bool,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 500,
        crop_scale_min: float = 1.0,
        step_multiple: int = 1,
        retries: int | None = None,
        decoder: Decoder = "auto",
        decode_device: str = "cpu",
        boxes: bool = False,
    ) -> None:
        super().__init__()
        self.shards = list(zip(info.shard_paths(split), [s.samples for s in info.shards(split)], strict=True))
        self.split = split
        self.num_classes, self.num_attributes = info.num_classes, info.num_attributes
        self.image_size = preprocess.image_size
        self.batch_size, self.train = batch_size, train
        self.rank, self.world, self.workers = rank, world, max(1, num_workers)
        self.seed, self.retries, self.decoder, self.decode_device = seed, retries, decoder, decode_device
        self.boxes = boxes  # attribute boxes in each batch (attr_boxes, box_mask), for the localisation loss
        # Batches leave the workers as uint8; Preprocess.normalize finishes the job on the device.
        self.transform = build_transform(preprocess, train, crop_scale_min, normalize=False)
        self.phase = Phase(world, self.workers, batch_size, step_multiple, max(1, shuffle_buffer))
        self.epoch, self.phases, self.start_step = 0, [], 0
        self.plan: EpochPlan | None = None
        # Persistent workers keep the copy of this object they were started with: the epoch's
        # position reaches them through this shared buffer (JSON, length-prefixed), read at the
        # start of every pass.
        self._shared = torch.zeros(EPOCH_STATE_BYTES, dtype=torch.uint8).share_memory_()
        # Training steps of the current phase, equal on every rank (0 for evaluation).
        self.steps = self.set_epoch(0) if train else 0

    def set_epoch(self, epoch: int, phases: list[Phase] | None = None, start_step: int = 0) -> int:
        """Plan ``epoch`` after its finished ``phases``, resuming at ``start_step``; return the phase's steps.

        Call it before each pass over a loader, whose workers may be persistent.
        """
        state = {"epoch": epoch, "phases": [p.to_json() for p in phases or []], "start_step": start_step}
        data = json.dumps(state).encode()
        if len(data) + 4 > EPOCH_STATE_BYTES:
            raise DataError(f"an epoch resumed {len(state['phases'])} times: too many phases to track")
        self._shared[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
        self._shared[4 : 4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return self._load_epoch()

    def _load_epoch(self) -> int:
        """Take the epoch position from the shared buffer (in the main process or a worker)."""
        size = int.from_bytes(bytes(self._shared[:4].tolist()), "little")
        state = json.loads(bytes(self._shared[4 : 4 + size].tolist()))
        self.epoch, self.start_step = int(state["epoch"]), int(state["start_step"])
        self.phases = [Phase.from_json(p) for p in state["phases"]]
        if self.train:
            self.plan = plan_epoch(
                self.shards, seed=self.seed, epoch=self.epoch, phases=self.phases, current=self.phase
            )
            self.steps = self.plan.steps
        return self.steps

    def _decode(self, position: int, sample: dict[str, Any] | Gap, tally: SkipTally) -> dict[str, Any] | None:
        if isinstance(sample, Gap):
            tally.count(sample)
            return None
        seed = sample_seed(self.seed, self.epoch, position) if self.train else 0
        try:
            label, attrs, mask = parse_labels(sample, self.num_classes, self.num_attributes)
            jpeg = jpeg_bytes(sample) if self.decode_device != "cpu" else None
            tensor, stored = decode_sized(sample, self.image_size, self.decoder) if jpeg is None else (None, None)
        except BadSample as exc:
            where = f"sample {sample.get('__key__')} in {sample.get('__shard__')}"
            parts = unmerge(sample)
            if parts[0] is not sample:  # a key with a dot: WebDataset cut it there
                keys = ", ".join(f"'{p['__key__']}'" for p in parts)
                tally.skip(where, f"key {keys} holds a dot; WebDataset splits keys at the first dot", cause="bad_key")
            else:
                tally.skip(where, str(exc))
            return None
        item = {"key": sample["__key__"], "label": label, "attributes": attrs, "attr_mask": mask, "seed": seed}
        if jpeg is not None:  # decoded with the rest of the batch on the device (decode_on_device)
            item["image"], item["jpeg"] = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), jpeg
            return item
        if self.train:  # augmentation drawn from the sample's own seed: resumable, order-free
            torch.default_generator.manual_seed(seed)  # the CPU generator alone: cheap
        if not self.boxes:
            item["image"] = self.transform(tensor)
            return item
        found = record_boxes(sample, self.num_attributes)
        boxes = to_decoded(found, self.num_attributes, stored, (tensor.shape[1], tensor.shape[2]))
        item["image"], moved = self.transform(tensor, boxes)  # the same crop and flip for both
        item["boxes"], item["box_mask"] = as_fractions(moved, self.image_size)
        return item

    def _role_items(self, role: int, first_block: int, tally: SkipTally) -> Iterator[tuple[int, Any]]:
        """Yield ``(position, raw sample or None)`` of role ``role`` from block ``first_block`` on, shuffled."""
        assert self.plan is not None
        block_size = self.phase.shuffle_block
        run = self.plan.role_run(self.rank, role)
        run = take(run, first_block * block_size, interval_count(run))
        block: list[tuple[int, Any]] = []
        index = first_block

        def shuffled() -> Iterator[tuple[int, Any]]:
            by_position = dict(block)
            key = (self.seed, self.epoch, self.plan.index, self.rank, role, index)  # type: ignore[union-attr]
            for position in block_order([p for p, _ in block], key):
                yield position, by_position[position]

        for item in read_positions(self.plan.segments(run), tally, self.retries):
            block.append(item)
            if len(block) == block_size:
                yield from shuffled()
                block, index = [], index + 1
        if block:
            yield from shuffled()

    def _role_batches(self, role: int) -> Iterator[dict[str, Any]]:
        """Yield the batches role ``role`` still owes in the current phase."""
        tally = SkipTally()
        done = delivered(self.phase, role, self.start_step)
        quota = delivered(self.phase, role, self.steps) - done
        first_block = done // self.phase.shuffle_block
        skip = done - first_block * self.phase.shuffle_block
        items: list[dict[str, Any] | None] = []
        for n, (position, sample) in enumerate(self._role_items(role, first_block, tally)):
            if n < skip:  # read before the interruption: never decoded again
                continue
            items.append(self._decode(position, sample, tally))
            if len(items) == self.batch_size:
                yield self._collate(items, tally)
                items = []
            if n - skip + 1 == quota:
                return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if self.train:
            self._load_epoch()
            if info is not None:
                # DataLoader worker i serves batches i, i + workers, ... from the resume step on.
                yield from self._role_batches((info.id + self.start_step) % self.workers)
                return
            roles = [self._role_batches(r) for r in range(self.workers)]
            for step in range(self.start_step, self.steps):
                yield next(roles[step % self.workers])
            return
        worker = info.id if info is not None else 0
        workers = self.workers if info is not None else 1
        segments = plan_eval(self.shards, world=self.world, rank=self.rank, workers=workers)[worker]
        tally = SkipTally()
        batch: list[dict[str, Any] | None] = []
        for sample in read_segments(segments, tally, self.retries):
            item = self._decode(0, sample, tally)
            if item is None:
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self._collate(batch, tally)
                batch = []
        if batch or any(tally.pending):
            yield self._collate(batch, tally)

    def _collate(self, items: list[dict[str, Any] | None], tally: SkipTally) -> dict[str, Any]:
        """Stack ``items``; an unusable one (``None``) is a zero-weight copy of a usable one."""
        valid = [it for it in items if it is not None]
        size, zeros = self.image_size, [0.0] * self.num_attributes
        blank = torch.zeros(3, size, size, dtype=torch.uint8)
        filler = valid[0] if valid else {"image": blank, "label": 0, "attributes": zeros}
        filled = [it if it is not None else filler for it in items]
        images = [it["image"] for it in filled]
        skipped = tally.take()
        return {
            "keys": [it["key"] for it in valid],
            "image": torch.stack(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8),
            "label": torch.tensor([it["label"] for it in filled], dtype=torch.long),
            "attributes": torch.tensor([it["attributes"] for it in filled], dtype=torch.float32).view(-1, len(zeros)),
            "attr_mask": torch.tensor([it["attr_mask"] if it else zeros for it in items]).view(-1, len(zeros)),
            "weight": torch.tensor([1.0 if it is not None else 0.0 for it in items]),
            "skipped": sum(skipped),
            "skipped_by": torch.tensor(skipped, dtype=torch.long),
            **self._device_decoding(filled),
            **self._boxes(items, filled),
        }

    def _boxes(self, items: list[dict[str, Any] | None], filled: list[dict[str, Any]]) -> dict[str, Any]:
        """The ``[B, A, 4]`` attribute boxes (fractions of the input side) and ``[B, A]`` mask, if asked for."""
        if not self.boxes:
            return {}
        none = [[0.0] * 4] * self.num_attributes
        return {
            "attr_boxes": torch.tensor([it.get("boxes", none) for it in filled]).view(-1, self.num_attributes, 4),
            "box_mask": torch.tensor(
                [it.get("box_mask", [0.0] * self.num_attributes) if it else [0.0] * self.num_attributes for it in items]
            ).view(-1, self.num_attributes),
        }

    def _device_decoding(self, filled: list[dict[str, Any]]) -> dict[str, Any]:
        """The JPEG bytes and augmentation seeds the device decodes (``decode_device``), if any."""
        if self.decode_device == "cpu":
            return {}
        return {"jpeg": [it.get("jpeg") for it in filled], "seeds": [it["seed"] for it in filled]}


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Wrap a stream in a DataLoader that batches in its workers (``batch_size=None``).

    Workers persist across passes (no re-fork per epoch or evaluation): call
    ``stream.set_epoch`` before each pass. Each worker keeps ``prefetch_factor`` batches ready:
    4 when there are fewer than 4 workers, else 2 — about 8 batches in flight either way, enough
    to hide the jitter of decoding without holding much memory (``pin_memory`` for a GPU).
    The loader draws its worker seeds from a generator of its own, not from the global RNG, so
    starting a loader mid-epoch (a resume) leaves the training RNG where an uninterrupted run
    has it; augmentation is seeded per sample anyway.
    """
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=(4 if num_workers < 4 else 2) if num_workers > 0 else None,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(stream.seed),
    )
