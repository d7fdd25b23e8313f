"""Encoding and writing explanation shards in a thread, behind a bounded queue.

The main thread hands over each batch's host arrays and goes on to the next batch; this thread
builds every image's json, text, ``heatmaps.npy``, the image itself, its class overlay and its
attribute-map strip, writes the tar through the job's output store and, at the end of a shard,
writes its report and publishes the shard whole (a rename in a folder, one upload to a bucket) —
if the claim is still held. The queue holds at most
``queue_batches`` batches, so memory stays flat whatever the speed of either side.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from eatdist.data.remote import name_of
from eatdist.explain.explainer import BatchResult
from eatdist.explain.loader import Chunk
from eatdist.explain.overlay import attribute_strip, encode, overlay
from eatdist.models.package import PackageMeta
from eatdist.store.base import ShardSink, Store

log = logging.getLogger(__name__)
REPORTS = "_reports"


@dataclass
class ShardReport:
    """What happened to one input shard."""

    input: str
    output: str
    rank: int = 0
    owner: str = ""
    explained: int = 0
    undecodable: list[dict[str, str]] = field(default_factory=list)
    # Samples whose keys hold a dot, explained under a safe key: key and original.
    renamed: list[dict[str, str]] = field(default_factory=list)
    # Set when the shard ended early: samples read before the cut, and why it ended.
    truncated: dict[str, Any] | None = None


@dataclass
class Timings:
    """Seconds spent per stage (decode is summed over the workers)."""

    decode: float = 0.0
    forward: float = 0.0
    maps: float = 0.0
    encode: float = 0.0
    write: float = 0.0


class ClaimLost(Exception):
    """Another process took this shard over; nothing of it is published."""


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@dataclass
class _Open:
    report: ShardReport
    key: str  # the shard's key in the output store


@dataclass
class _Close:
    still_held: Callable[[], bool]
    done: Callable[[ShardReport | None], None]


class ShardWriterThread:
    """One thread writing the explanation shards of this process, in order."""

    def __init__(
        self, meta: PackageMeta, overlay_format: str, overlay_alpha: float, queue_batches: int, store: Store
    ) -> None:
        self.meta, self.fmt, self.alpha, self.store = meta, overlay_format, overlay_alpha, store
        self.timings = Timings()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_batches))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="explain-writer", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def open(self, report: ShardReport, key: str) -> None:
        """Start the shard ``key`` of the output store (published whole when it closes)."""
        self._put(_Open(report, key))

    def write(self, chunk: Chunk, result: BatchResult) -> None:
        """Queue one batch (blocks while the queue is full)."""
        self._put((chunk, result))

    def close_shard(self, still_held: Callable[[], bool], done: Callable[[ShardReport | None], None]) -> None:
        """Finish the open shard: publish it if ``still_held()``; then call ``done(report or None)``."""
        self._put(_Close(still_held, done))

    def drain(self) -> None:
        """Wait until everything queued is written; re-raise the thread's error."""
        self._put(None)
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Stop the thread after the queued work (its error, if any, is re-raised)."""
        if self._thread.is_alive():
            self._put(StopIteration)
            self._thread.join()
        self._raise_if_failed()

    def _run(self) -> None:
        writer: ShardSink | None = None
        report: ShardReport | None = None
        try:
            while True:
                item = self._queue.get()
                try:
                    if item is StopIteration:
                        return
                    if isinstance(item, _Open):
                        report, writer = item.report, self.store.shard_writer(item.key)
                    elif isinstance(item, _Close):
                        assert writer is not None and report is not None
                        item.done(self._publish(writer, report, item.still_held))
                        writer, report = None, None
                    elif item is not None:
                        assert writer is not None and report is not None
                        self._encode(writer, report, *item)
                finally:
                    self._queue.task_done()
        except BaseException as exc:  # handed to the main thread, which raises it
            if isinstance(exc, OSError) and exc.filename is None and report is not None:
                exc.filename = report.output  # "disk full" alone does not say where
            self._error = exc
            if writer is not None:
                try:
                    writer.__exit__(type(exc), exc, None)
                except BaseException:  # noqa: BLE001  (the first error is the one to report)
                    pass
            while True:  # unblock a main thread waiting on a full queue or on join()
                try:
                    self._queue.get_nowait()
                    self._queue.task_done()
                except queue.Empty:
                    break

    def _encode(self, writer: ShardSink, report: ShardReport, chunk: Chunk, result: BatchResult) -> None:
        started = time.perf_counter()
        name = name_of(report.output)
        samples = []
        for b, key in enumerate(chunk.keys):
            record = dict(result.record(b, self.meta), source_shard=name)
            if chunk.truths[b] is not None:
                record["true_class"] = chunk.truths[b]
            if key in chunk.renamed:
                record["original_key"] = chunk.renamed[key]
                report.renamed.append({"key": key, "original": chunk.renamed[key]})
            maps = result.image_maps(b)
            image = Image.fromarray(chunk.images[b])
            heat = maps.astype(np.float32)
            sample = {
                "__key__": key,
                "json": json.dumps(record).encode(),
                "txt": record["text"].encode(),
                "heatmaps.npy": npy_bytes(maps),
                # the original beside the overlays, so people can compare colours and shapes
                f"image.{self.fmt}": encode(image, self.fmt),
                f"overlay.{self.fmt}": overlay(image, heat[0], self.alpha, self.fmt),
            }
            strip = attribute_strip(image, heat[1:], self.alpha, self.fmt)
            if strip is not None:
                sample[f"attr_maps.{self.fmt}"] = strip
            samples.append(sample)
        encoded = time.perf_counter()
        for sample in samples:
            writer.write(sample)
        report.explained += len(samples)
        self.timings.encode += encoded - started
        self.timings.write += time.perf_counter() - encoded

    def _publish(self, writer: ShardSink, report: ShardReport, still_held: Callable[[], bool]) -> ShardReport | None:
        started = time.perf_counter()
        try:
            if not still_held():
                raise ClaimLost(report.input)
            # The report lands before the shard: a finished shard always has its report.
            self.store.put_json(f"{REPORTS}/{name_of(report.output)}.json", asdict(report))
            writer.__exit__(None, None, None)
        except ClaimLost:
            writer.__exit__(ClaimLost, None, None)
            log.warning("shard %s was taken over by another process; this copy is dropped", report.input)
            return None
        finally:
            self.timings.write += time.perf_counter() - started
        return report
