"""Explaining one whole input shard into its output shard: the work every engine schedules.

:class:`ShardWork` holds what one process needs for it — DataLoader workers that read and
decode, the model on its device, a writer thread that encodes and publishes through the output
store — and explains one shard per :meth:`ShardWork.explain` call. The ``claims`` engine
(:mod:`eatdist.explain.job`) calls it for each shard it claims, a Ray actor
(:mod:`eatdist.explain.ray_engine`) for each shard the driver hands it; both publish the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from eatdist.config import ExplainConfig
from eatdist.data.remote import name_of
from eatdist.errors import ConfigError
from eatdist.explain.encode import Outputs
from eatdist.explain.explainer import Explainer
from eatdist.explain.loader import Chunk, ShardChunks, decode_chunk, make_loader, merge_chunks, shutdown
from eatdist.explain.writer import REPORTS, ShardReport, ShardWriterThread, Timings
from eatdist.store import Store

log = logging.getLogger(__name__)
FAILED = ".failed.json"


def output_name(url: str) -> str:
    """Return the output shard name of input ``url``: its last path component (paths and URLs alike)."""
    return name_of(url)


def record_failure(store: Store, url: str, reason: str, owner: str) -> None:
    """Record in the store that input ``url`` could not be read (a later run retries it)."""
    store.put_json(f"{REPORTS}/{output_name(url)}{FAILED}", {"input": url, "reason": reason, "owner": owner})


class ShardWork:
    """One process's means to explain whole shards; close it when done."""

    def __init__(self, explainer: Explainer, store: Store, cfg: ExplainConfig, rank: int = 0) -> None:
        if cfg.group_images < 0:
            raise ConfigError(f"config key 'explain.group_images': must be at least 0, got {cfg.group_images}")
        self.explainer, self.store, self.cfg, self.rank = explainer, store, cfg, rank
        # The decoded images travel to this process only when image parts are drawn from them.
        outputs = Outputs.from_config(cfg)  # a bad explain.outputs fails before any work
        # Forwards of the shard not explained yet: explained together once they hold group_images;
        # not where pictures are drawn (their encoding dwarfs the cost per call, and a group would
        # hold its decoded images and leave the encoding processes one task at a time).
        self.group = cfg.group_images if explainer.groups and not outputs.drawn else 0
        self._held: list[tuple[Chunk, torch.Tensor | None, Any]] = []
        size = explainer.preprocess.image_size if cfg.decode_device == "model" else 0
        self.dataset = ShardChunks(explainer.transform, cfg.batch_size, keep_images=bool(outputs.images),
                                   jpegs_for=size, keep_originals=outputs.copies_input,
                                   drawn=bool(outputs.drawn))  # fmt: skip
        self.loader = make_loader(self.dataset, cfg.num_workers, pin_memory=explainer.on_gpu)
        # Start the workers before any thread exists (forking a threaded process is unsafe).
        self.dataset.select("")
        for _ in self.loader:
            pass
        # Forks its encoding processes: made before this process starts any thread.
        self.writer = ShardWriterThread(explainer.meta, cfg, store, explainer.device)
        self.timings: Timings = self.writer.timings

    def explain(
        self,
        url: str,
        owner: str,
        done: Callable[[ShardReport | None], None],
        still_held: Callable[[], bool] = lambda: True,
        lost: Callable[[], bool] = lambda: False,
        progress: Callable[[int], None] = lambda read: None,
        clean: bool = True,
    ) -> str | None:
        """Explain input shard ``url`` and queue its publishing; return None, or why it could not be read.

        The writer thread publishes the output shard if ``still_held()`` when it is complete, then
        calls ``done(report)`` (``done(None)`` when dropped); reading stops early once ``lost()``.
        ``progress(n)`` hears the samples read so far; ``clean`` first removes what a writer killed
        mid-way on this shard left in the store (a folder's listing: the claims engine asks only
        when it takes a shard over, as only a claimed shard can have such a writer; the Ray driver
        for shards its first listing showed leftovers of and those whose actor died). A shard that
        cannot be opened at all writes nothing and returns the reason; one that ends early keeps
        what it read (``report.truncated``).
        Raises the writer thread's error (a full disk, a store that refuses writes).
        """
        name = output_name(url)
        report = ShardReport(input=url, output=self.store.url(name), rank=self.rank, owner=owner)
        if clean:
            self.store.clean_partial(name)  # left by a process that died on it
        self.dataset.select(url)
        self._held = []  # nothing of a shard that failed before
        opened = False
        for chunk in self.loader:
            if chunk.error is not None and chunk.read == 0:
                return chunk.error
            if not opened:
                self.writer.open(report, name)
                opened = True
            self.timings.decode += chunk.decode_s
            if chunk.pixels is not None:
                self._infer(chunk)
            for bad in chunk.bad:
                report.undecodable.append(bad)
                log.warning("cannot explain %s in %s: %s", bad["key"], name, bad["reason"])
            progress(chunk.read)
            if chunk.error is not None:
                report.truncated = {"read": chunk.read, "reason": chunk.error}
                log.warning("%s ends after %d samples; those are explained, the rest reported: %s",
                            name, chunk.read, chunk.error)  # fmt: skip
                break
            if lost():
                break
        if not opened:  # an empty shard still gets its (empty) output
            self.writer.open(report, name)
        self._explain_held()
        self.writer.close_shard(still_held, done)
        return None

    def _infer(self, chunk: Chunk) -> None:
        explainer = self.explainer
        started = time.perf_counter()
        pixels = chunk.pixels
        if chunk.jpegs is not None:  # explain.decode_device=model
            pixels = decode_chunk(chunk, explainer.transform, explainer.device)
            decoded = time.perf_counter()
            self.timings.decode += decoded - started
            started = decoded
            if pixels is None:
                return
        with explainer.inference():
            batch, out = explainer.forward(pixels)
            if explainer.on_gpu:
                torch.cuda.synchronize(explainer.device)
        self.timings.forward += time.perf_counter() - started
        chunk.pixels = None  # held, a group keeps only what its outputs are made of
        self._held.append((chunk, None if explainer.groups else batch, out))
        if sum(len(c.keys) for c, _, _ in self._held) >= self.group:
            self._explain_held()

    def _explain_held(self) -> None:
        """Explain the forwards held (:meth:`Explainer.results_of`) and hand them to the writer as one batch."""
        if not self._held:
            return
        held, self._held = self._held, []
        started = time.perf_counter()
        with self.explainer.inference():
            result = self.explainer.results_of([(batch, out) for _, batch, out in held])
        self.timings.maps += time.perf_counter() - started
        self.writer.write(merge_chunks([chunk for chunk, _, _ in held]), result)

    def drain(self) -> None:
        """Wait until every queued shard is written and published; re-raise the writer's error."""
        self.writer.drain()

    def close(self) -> None:
        """Finish the queued writes, stop the writer thread and the loader workers."""
        try:
            self.writer.close()
        finally:
            shutdown(self.loader)
