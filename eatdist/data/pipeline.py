"""Streaming training and evaluation data from the shards of a corpus.

Each DataLoader worker reads the segments :mod:`eatdist.data.plan` gives it, decodes and checks
every sample, and batches in the worker. A corrupt sample is skipped and counted; the count
travels with the next batch (``batch["skipped"]``) so the trainer can report an exact total.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2

from eatdist.data.corpus import IMAGE_EXTENSIONS, DatasetInfo
from eatdist.data.plan import Segment, plan_eval, plan_train, train_steps
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
    """Corrupt samples one worker met this epoch; each is counted once, even when re-read."""

    pending: int = 0
    logged: int = 0
    seen: set[str] = field(default_factory=set)

    def skip(self, what: str, reason: str, count: int = 1) -> None:
        if what in self.seen:
            return
        self.seen.add(what)
        self.pending += count
        if self.logged < MAX_LOGGED_PER_WORKER:
            self.logged += 1
            log.warning("skipping %s: %s", what, reason)

    def take(self) -> int:
        """Return the skips not yet reported and reset them."""
        count, self.pending = self.pending, 0
        return count


def read_segments(segments: list[Segment], tally: SkipTally) -> Iterator[dict[str, Any]]:
    """Yield the raw samples of ``segments``; a shard that ends early counts its lost samples."""
    for seg in segments:
        position = 0
        try:
            for sample in iter_shard(seg.path):
                if position >= seg.stop:
                    break
                if position >= seg.start:
                    sample["__shard__"] = seg.path
                    yield sample
                position += 1
        except DataError as exc:
            log.warning("%s", exc)
        if position < seg.stop:
            missing = seg.stop - max(position, seg.start)
            tally.skip(f"{missing} samples of {seg.path}", f"the shard ended after {position} samples", missing)


class ShardStream(IterableDataset):
    """Batches of decoded, checked samples for one rank, planned by :mod:`eatdist.data.plan`.

    In ``train`` mode every worker yields exactly its planned number of full batches: if corrupt
    samples leave it short, it reads its segments again (with a new shuffle) to fill the gap, so
    every rank still runs the same number of steps.
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
    ) -> None:
        super().__init__()
        self.shards = list(zip(info.shard_paths(split), [s.samples for s in info.shards(split)], strict=True))
        self.split = split
        self.num_classes, self.num_attributes = info.num_classes, info.num_attributes
        self.batch_size, self.train = batch_size, train
        self.rank, self.world, self.workers = rank, world, max(1, num_workers)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.transform = build_transform(preprocess, train, crop_scale_min)
        self.epoch = 0
        # Training steps per epoch, equal on every rank (0 for evaluation, which reads all once).
        self.step_multiple = step_multiple
        self.steps = train_steps(sum(c for _, c in self.shards), world, batch_size, step_multiple) if train else 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the shard order and shuffle of ``epoch`` (call before iterating)."""
        self.epoch = epoch

    def _worker_plan(self) -> tuple[int, list[Segment]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = self.workers if info is not None else 1
        if self.train:
            plans = plan_train(
                self.shards,
                world=self.world,
                rank=self.rank,
                workers=workers,
                batch_size=self.batch_size,
                seed=self.seed,
                epoch=self.epoch,
                step_multiple=self.step_multiple,
            )
        else:
            plans = plan_eval(self.shards, world=self.world, rank=self.rank, workers=workers)
        return worker, plans[worker]

    def _decoded(self, raw: Iterator[dict[str, Any]], tally: SkipTally) -> Iterator[dict[str, Any]]:
        for sample in raw:
            try:
                label, attrs, mask = parse_labels(sample, self.num_classes, self.num_attributes)
                image = decode_image(sample)
            except BadSample as exc:
                tally.skip(f"sample {sample.get('__key__')} in {sample.get('__shard__')}", str(exc))
                continue
            tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
            yield {
                "key": sample["__key__"],
                "image": self.transform(tensor),
                "label": label,
                "attributes": attrs,
                "attr_mask": mask,
            }

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _collate(self, items: list[dict[str, Any]], tally: SkipTally) -> dict[str, Any]:
        batch = {
            "keys": [it["key"] for it in items],
            "image": torch.stack([it["image"] for it in items]),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "attributes": torch.tensor([it["attributes"] for it in items], dtype=torch.float32),
            "attr_mask": torch.tensor([it["attr_mask"] for it in items], dtype=torch.float32),
            "skipped": tally.take(),
        }
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, segments = self._worker_plan()
        tally = SkipTally()
        if not self.train:
            items: list[dict[str, Any]] = []
            for item in self._decoded(read_segments(segments, tally), tally):
                items.append(item)
                if len(items) == self.batch_size:
                    yield self._collate(items, tally)
                    items = []
            if items or tally.pending:
                yield self._collate(items, tally) if items else self._empty_batch(tally)
            return
        quota = sum(s.count for s in segments)
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        items = []
        delivered, passes = 0, 0
        while delivered < quota:
            before = delivered
            stream = self._shuffled(self._decoded(read_segments(segments, tally), tally), rng)
            for item in stream:
                items.append(item)
                delivered += 1
                if len(items) == self.batch_size:
                    yield self._collate(items, tally)
                    items = []
                if delivered == quota:
                    break
            passes += 1
            if delivered == before:
                raise DataError(f"no usable sample in {[s.path for s in segments]} (every sample is corrupt)")
            if delivered < quota and passes == 1:
                log.warning(
                    "worker %d of rank %d re-reads its share to replace %d skipped samples",
                    worker,
                    self.rank,
                    quota - delivered,
                )

    def _empty_batch(self, tally: SkipTally) -> dict[str, Any]:
        size = self.transform.transforms[0].size
        batch = {
            "keys": [],
            "image": torch.zeros(0, 3, *size),
            "label": torch.zeros(0, dtype=torch.long),
            "attributes": torch.zeros(0, self.num_attributes),
            "attr_mask": torch.zeros(0, self.num_attributes),
            "skipped": tally.take(),
        }
        return batch


def make_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    """Wrap a stream in a DataLoader that batches in its workers (``batch_size=None``)."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
