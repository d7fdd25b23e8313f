"""Streaming training and evaluation data from the shards of a corpus.

Each DataLoader worker reads the samples :mod:`eatdist.data.plan` gives it, decodes and checks
every sample, and batches in the worker. A corrupt sample is skipped and counted; the count
travels with the next batch (``batch["skipped"]``) so the trainer can report an exact total.
In training it keeps its place in the batch with ``weight`` 0 (see :class:`ShardStream`).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2

from eatdist.data.corpus import IMAGE_EXTENSIONS, DatasetInfo
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
from eatdist.data.shards import iter_shard
from eatdist.errors import DataError

log = logging.getLogger(__name__)
MAX_LOGGED_PER_WORKER = 10


class BadSample(ValueError):
    """A sample that cannot be used; the message says why."""


@dataclass(frozen=True)
class Preprocess:
    """Input size and normalisation a model expects."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocess:
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]))  # type: ignore[arg-type]


def build_transform(pre: Preprocess, train: bool, crop_scale_min: float = 1.0, hflip: bool = True) -> v2.Compose:
    """Return the uint8 CHW tensor → normalised float tensor transform."""
    size = (pre.image_size, pre.image_size)
    steps: list[Any] = []
    if train and crop_scale_min < 1.0:
        steps.append(v2.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), antialias=True))
    else:
        steps.append(v2.Resize(size, antialias=True))
    if train and hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))]
    return v2.Compose(steps)


def decode_image(sample: dict[str, Any]) -> Image.Image:
    """Return the sample's image as RGB.

    Raises:
        BadSample: when there is no image or it cannot be decoded.
    """
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise BadSample(f"no image ({'/'.join(IMAGE_EXTENSIONS)})")
    try:
        with Image.open(io.BytesIO(sample[ext])) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises many types for broken bytes
        raise BadSample(f"undecodable {ext} image ({type(exc).__name__})") from None


def parse_labels(sample: dict[str, Any], num_classes: int, num_attributes: int) -> tuple[int, list[float], list[float]]:
    """Return (class, attributes, attr_mask) from the sample's ``json``, checked against the corpus.

    Raises:
        BadSample: when the json is missing, malformed or inconsistent with ``dataset.json``.
    """
    if "json" not in sample:
        raise BadSample("no json")
    try:
        record = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadSample("malformed json") from None
    if not isinstance(record, dict):
        raise BadSample("json is not an object")
    label = record.get("class")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_classes:
        raise BadSample(f"class {label!r} not an integer in [0, {num_classes})")
    attrs = record.get("attributes")
    if not isinstance(attrs, list) or len(attrs) != num_attributes:
        n = len(attrs) if isinstance(attrs, list) else type(attrs).__name__
        raise BadSample(f"attributes: expected {num_attributes} values, got {n}")
    mask = record.get("attr_mask", [1.0] * num_attributes)
    if not isinstance(mask, list) or len(mask) != num_attributes:
        raise BadSample(f"attr_mask: expected {num_attributes} values")
    try:
        values = [float(a) for a in attrs]
        mask_values = [float(m) for m in mask]
    except (TypeError, ValueError):
        raise BadSample("attributes or attr_mask hold non-numbers") from None
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise BadSample("attribute values outside [0, 1]")
    return label, values, mask_values


@dataclass
class SkipTally:
    """Unusable samples one worker met: counted as they are met, the first few logged."""

    pending: int = 0
    logged: int = 0

    def skip(self, what: str, reason: str, count: int = 1) -> None:
        self.pending += count
        if self.logged < MAX_LOGGED_PER_WORKER:
            self.logged += 1
            log.warning("skipping %s: %s", redact(what), redact(reason))

    def take(self) -> int:
        """Return the skips not yet reported and reset them."""
        count, self.pending = self.pending, 0
        return count


def read_segments(segments: list[Segment], tally: SkipTally, retries: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield the raw samples of ``segments``; a shard that ends early counts its lost samples."""
    for _, sample in read_positions([(0, seg) for seg in segments], tally, retries):
        if sample is not None:
            yield sample


def read_positions(
    segments: list[tuple[int, Segment]], tally: SkipTally | None, retries: int | None = None
) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Yield ``(position, raw sample)`` for every planned sample of ``segments``, in order.

    A sample that cannot be read (a missing, unreadable or short shard) comes as ``None``, so
    the caller keeps its place in the plan; its shard is logged once.
    """
    for first, seg in segments:
        count = 0
        reason = ""
        try:
            for sample in iter_shard(seg.path, seg.start, seg.stop, retries=retries):
                sample["__shard__"] = seg.path
                yield first + count, sample
                count += 1
                if count == seg.count:
                    break
        except DataError as exc:
            reason = str(exc)
        if count < seg.count:
            missing = seg.count - count
            if tally is not None:
                tally.skip(f"{missing} samples of {seg.path}", reason or f"the shard ended after {seg.start + count}")
            for i in range(count, seg.count):
                yield first + i, None


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
    ) -> None:
        super().__init__()
        self.shards = list(zip(info.shard_paths(split), [s.samples for s in info.shards(split)], strict=True))
        self.split = split
        self.num_classes, self.num_attributes = info.num_classes, info.num_attributes
        self.image_size = preprocess.image_size
        self.batch_size, self.train = batch_size, train
        self.rank, self.world, self.workers = rank, world, max(1, num_workers)
        self.seed, self.retries = seed, retries
        self.transform = build_transform(preprocess, train, crop_scale_min)
        self.phase = Phase(world, self.workers, batch_size, step_multiple, max(1, shuffle_buffer))
        self.epoch, self.phases, self.start_step = 0, [], 0
        self.plan: EpochPlan | None = None
        # Training steps of the current phase, equal on every rank (0 for evaluation).
        self.steps = self.set_epoch(0) if train else 0

    def set_epoch(self, epoch: int, phases: list[Phase] | None = None, start_step: int = 0) -> int:
        """Plan ``epoch`` after its finished ``phases``, resuming at ``start_step``; return the phase's steps."""
        self.epoch, self.phases, self.start_step = epoch, list(phases or []), start_step
        if self.train:
            self.plan = plan_epoch(self.shards, seed=self.seed, epoch=epoch, phases=self.phases, current=self.phase)
            self.steps = self.plan.steps
        return self.steps

    def _decode(self, position: int, sample: dict[str, Any] | None, tally: SkipTally) -> dict[str, Any] | None:
        if sample is None:
            return None
        try:
            label, attrs, mask = parse_labels(sample, self.num_classes, self.num_attributes)
            image = decode_image(sample)
        except BadSample as exc:
            tally.skip(f"sample {sample.get('__key__')} in {sample.get('__shard__')}", str(exc))
            return None
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        if self.train:  # augmentation drawn from the sample's own seed: resumable, order-free
            torch.manual_seed(sample_seed(self.seed, self.epoch, position))
        return {
            "key": sample["__key__"],
            "image": self.transform(tensor),
            "label": label,
            "attributes": attrs,
            "attr_mask": mask,
        }

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
        if batch or tally.pending:
            yield self._collate(batch, tally)

    def _collate(self, items: list[dict[str, Any] | None], tally: SkipTally) -> dict[str, Any]:
        """Stack ``items``; an unusable one (``None``) is a zero-weight copy of a usable one."""
        valid = [it for it in items if it is not None]
        size, zeros = self.image_size, [0.0] * self.num_attributes
        filler = valid[0] if valid else {"image": torch.zeros(3, size, size), "label": 0, "attributes": zeros}
        filled = [it if it is not None else filler for it in items]
        images = [it["image"] for it in filled]
        return {
            "keys": [it["key"] for it in valid],
            "image": torch.stack(images) if images else torch.zeros(0, 3, size, size),
            "label": torch.tensor([it["label"] for it in filled], dtype=torch.long),
            "attributes": torch.tensor([it["attributes"] for it in filled], dtype=torch.float32).view(-1, len(zeros)),
            "attr_mask": torch.tensor([it["attr_mask"] if it else zeros for it in items]).view(-1, len(zeros)),
            "weight": torch.tensor([1.0 if it is not None else 0.0 for it in items]),
            "skipped": tally.take(),
        }


def make_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    """Wrap a stream in a DataLoader that batches in its workers (``batch_size=None``).

    The loader draws its worker seeds from a generator of its own, not from the global RNG, so
    starting a loader mid-epoch (a resume) leaves the training RNG where an uninterrupted run
    has it; augmentation is seeded per sample anyway.
    """
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(stream.seed),
    )
