"""Writing explanation shards in a thread, behind a bounded queue; encoding in processes around it.

The main thread hands over each batch's host arrays and goes on to the next batch. This thread
draws the batch's images on the device when that is where they are drawn
(:mod:`eatdist.explain.render`), hands the batch to the encoding processes
(:mod:`eatdist.explain.encode`: json, text, ``heatmaps.npy`` and the image parts of
``explain.outputs``), writes the samples they return to the tar in input order through the job's
output store and, at the end of a shard, writes its report and publishes the shard whole (a rename
in a folder, one upload to a bucket) — if the claim is still held. The queue holds at most
``queue_batches`` batches and the processes at most one more batch each than they work on, so
memory stays flat whatever the speed of either side.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from eatdist.config import ExplainConfig
from eatdist.data.remote import name_of
from eatdist.errors import ConfigError, EatdistError
from eatdist.explain.encode import Encoded, EncoderPool, EncodeTask, Outputs, encode_members, npy_bytes
from eatdist.explain.loader import Chunk
from eatdist.explain.records import BatchResult, Records
from eatdist.explain.render import render_batch
from eatdist.models.package import PackageMeta
from eatdist.store.base import ShardSink, Store

log = logging.getLogger(__name__)
REPORTS = "_reports"
POOL_DIED = (
    "an encoding process of explain died (killed, or out of memory?); nothing of the shard is published: "
    "rerun (with fewer explain.encode_workers or a smaller explain.batch_size if memory ran out)"
)


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
    render: float = 0.0  # drawing and encoding image parts on the device
    encode: float = 0.0  # CPU seconds of the encoding, summed over its processes
    write: float = 0.0


def _renamed(chunk: Chunk) -> list[dict[str, str]]:
    """The chunk's samples explained under a safe key: key and original, for the shard's report."""
    return [{"key": key, "original": chunk.renamed[key]} for key in chunk.keys if key in chunk.renamed]


class ClaimLost(Exception):
    """Another process took this shard over; nothing of it is published."""


__all__ = ["REPORTS", "ClaimLost", "ShardReport", "ShardWriterThread", "Timings", "npy_bytes"]


def draws_on_device(cfg: ExplainConfig, device: torch.device) -> bool:
    """Whether the image parts of ``cfg.outputs`` are drawn on ``device`` (see ``explain.render_device``)."""
    outputs = Outputs.from_config(cfg)
    return (
        cfg.render_device == "auto"
        and device.type == "cuda"
        and bool(outputs.drawn)  # a JPEG input is its own copy: nothing to draw
        and all(p.endswith(".jpg") for p in outputs.images)
    )


def default_encoders(cfg: ExplainConfig, outputs: Outputs, device: torch.device, on_device: bool) -> int:
    """The encoding processes of an unset ``explain.encode_workers``: none where nothing is drawn
    on the CPU; beside a GPU, one per loader worker (the device outruns a thread); beside a CPU
    forward, one when there are no loader workers, else none (the writer thread draws)."""
    if not outputs.drawn or on_device:
        return 0
    if device.type != "cpu":
        return cfg.num_workers
    return 1 if cfg.num_workers == 0 else 0


@dataclass
class _Open:
    report: ShardReport
    key: str  # the shard's key in the output store


@dataclass
class _Encoded:
    """A batch encoded by the thread that handed it over: only its writing is left (or the error
    encoding met, raised in this thread as if met here)."""

    encoded: Encoded | Exception
    renamed: list[dict[str, str]]


@dataclass
class _Close:
    still_held: Callable[[], bool]
    done: Callable[[ShardReport | None], None]


class ShardWriterThread:
    """One thread writing the explanation shards of this process, in order.

    With ``explain.encode_workers`` above 0 the samples are encoded in that many processes, forked
    here: make the writer before the process starts other threads. Unset, see
    :func:`default_encoders`: json, text, ``heatmaps.npy`` and a copy of the input JPEG cost less
    to encode than to ship to a process. Without processes, a model on the CPU has the samples
    encoded by the thread that hands them over (a second thread would only contend for the same
    cores and the interpreter lock), except pictures drawn while loader workers decode: PIL draws
    and encodes without the interpreter lock, so this thread draws them beside a forward that
    waits in its own native code, at less cost than shipping them to processes. On a GPU, this
    thread encodes while the device runs the next batch.
    Shards and reports are published through ``store``.
    """

    def __init__(self, meta: PackageMeta, cfg: ExplainConfig, store: Store, device: torch.device | None = None) -> None:
        self.meta, self.outputs, self.store = meta, Outputs.from_config(cfg), store
        self.records = Records(meta)
        self.device = device or torch.device("cpu")
        self.on_device = draws_on_device(cfg, self.device)
        workers = cfg.encode_workers
        if workers is None:
            workers = default_encoders(cfg, self.outputs, self.device, self.on_device)
        if workers < 0:
            raise ConfigError(f"config key 'explain.encode_workers': must be at least 0, got {workers}")
        self.timings = Timings()
        self.pool = EncoderPool(workers, meta, self.outputs) if workers > 0 else None
        drawn_beside_loaders = bool(self.outputs.drawn) and cfg.num_workers > 0
        self.inline = self.pool is None and self.device.type == "cpu" and not drawn_beside_loaders
        self._source = ""  # the output shard's name, for the samples encoded by the caller
        # Batches handed to the processes and not yet written: each process holds one, plus one queued.
        self._pending: deque[Future[Encoded]] = deque()
        self._in_flight = 2 * workers
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, cfg.queue_batches))
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
        self._source = name_of(report.output)
        self._put(_Open(report, key))

    def write(self, chunk: Chunk, result: BatchResult) -> None:
        """Queue one batch (blocks while the queue is full), encoded first when encoding is inline."""
        if not self.inline:
            self._put((chunk, result))
            return
        task = EncodeTask(chunk.keys, chunk.truths, self._source, result, renamed=chunk.renamed)
        task.images = chunk.images if self.outputs.images else None
        task.originals = chunk.originals
        try:
            encoded: Encoded | Exception = encode_members(task, self.records, self.outputs)
        except Exception as exc:  # noqa: BLE001  (the thread raises it, closing the shard unpublished)
            encoded = exc
        self._put(_Encoded(encoded, _renamed(chunk)))

    def close_shard(self, still_held: Callable[[], bool], done: Callable[[ShardReport | None], None]) -> None:
        """Finish the open shard: publish it if ``still_held()``; then call ``done(report or None)``."""
        self._put(_Close(still_held, done))

    def drain(self) -> None:
        """Wait until everything queued is written; re-raise the thread's error."""
        self._put(None)
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Stop the thread after the queued work, then the encoding processes (an error is re-raised)."""
        try:
            if self._thread.is_alive():
                self._put(StopIteration)
                self._thread.join()
        finally:
            if self.pool is not None:
                self.pool.close()
        self._raise_if_failed()

    def _run(self) -> None:
        writer: ShardSink | None = None
        report: ShardReport | None = None
        try:
            while True:
                try:  # with batches in the processes, write each as soon as it is back
                    item = self._queue.get(timeout=0.01 if self._pending else None)
                except queue.Empty:
                    self._write_done(writer, report, block=False)
                    continue
                try:
                    if isinstance(item, tuple):
                        assert writer is not None and report is not None
                        self._encode(writer, report, *item)
                        continue
                    if isinstance(item, _Encoded):
                        assert writer is not None and report is not None
                        if isinstance(item.encoded, Exception):
                            raise item.encoded
                        report.renamed += item.renamed
                        self._write(writer, report, item.encoded)
                        continue
                    self._write_done(writer, report, block=True)  # everything else comes after the batches
                    if item is StopIteration:
                        return
                    if isinstance(item, _Open):
                        report, writer = item.report, self.store.shard_writer(item.key)
                    elif isinstance(item, _Close):
                        assert writer is not None and report is not None
                        item.done(self._publish(writer, report, item.still_held))
                        writer, report = None, None
                finally:
                    self._queue.task_done()
        except BaseException as exc:  # handed to the main thread, which raises it
            if isinstance(exc, OSError) and exc.filename is None and report is not None:
                exc.filename = report.output  # "disk full" alone does not say where
            self._error = exc
            for future in self._pending:
                future.cancel()
            self._pending.clear()
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
        task = EncodeTask(chunk.keys, chunk.truths, name_of(report.output), result, renamed=chunk.renamed)
        report.renamed += _renamed(chunk)
        task.originals = chunk.originals
        if self.outputs.images and self.on_device:
            started = time.perf_counter()
            task.rendered = self._render(chunk, result)
            self.timings.render += time.perf_counter() - started
        elif self.outputs.images:
            task.images = chunk.images
        if self.pool is None:
            self._write(writer, report, encode_members(task, self.records, self.outputs))
            return
        try:
            self._pending.append(self.pool.submit(task))
        except BrokenProcessPool:
            raise EatdistError(POOL_DIED) from None
        self._write_done(writer, report, block=len(self._pending) > self._in_flight)

    def _render(self, chunk: Chunk, result: BatchResult) -> list[dict[str, bytes]]:
        with torch.inference_mode():
            images = [torch.from_numpy(a).to(self.device).permute(2, 0, 1) for a in chunk.images]
            maps = torch.from_numpy(result.maps).to(self.device)
            counts = [len(n) for n in result.named]
            parts = self.outputs.images
            if chunk.originals and all(o is not None for o in chunk.originals):  # the inputs are the copies
                parts = [p for p in parts if p != "image.jpg"]
            return render_batch(images, maps, counts, parts, self.outputs.alpha)

    def _write_done(self, writer: ShardSink | None, report: ShardReport | None, block: bool) -> None:
        """Write the batches back from the processes, oldest first: all of them when ``block``, else
        those done (and always the oldest while more are out than the processes can hold)."""
        while self._pending and (block or self._pending[0].done() or len(self._pending) > self._in_flight):
            try:
                encoded = self._pending.popleft().result()
            except BrokenProcessPool:
                raise EatdistError(POOL_DIED) from None
            assert writer is not None and report is not None
            self._write(writer, report, encoded)

    def _write(self, writer: ShardSink, report: ShardReport, encoded: Encoded) -> None:
        started = time.perf_counter()
        writer.write_members(encoded.members, encoded.offsets)
        report.explained += len(encoded.offsets)
        self.timings.encode += encoded.cpu_s
        self.timings.write += time.perf_counter() - started

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
