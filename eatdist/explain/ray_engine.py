"""The ``ray`` engine: a driver hands whole input shards to Ray actors that hold the model.

The driver (``eatdist explain --engine ray``) records the job in the output, lists the inputs
whose output shard does not exist yet and starts actors on the cluster, each with
``explain.ray_cpus_per_actor`` cores and, where the cluster has GPUs,
``explain.ray_gpus_per_actor`` of one. Each actor loads the model package (shipped through
Ray's object store, so nodes need no shared file system) and explains one shard per call with
the same :class:`~eatdist.explain.work.ShardWork` as the ``claims`` engine, publishing the
output shard whole through the output store before it answers.

**Exactly once.** An output shard appears under its final name only complete (a rename in a
folder, one upload to a bucket), so a shard is either done or not, never half. The driver
gives each shard to one actor at a time; when that actor dies (its process killed, its node
lost) the shard goes back to the queue and another actor redoes it from the start, and a new
actor is asked for in its place. A shard done twice (an actor presumed dead that still
finishes) is published twice as the same complete shard under the same name, so every input
key is in the output exactly once. A driver that dies takes its actors with it (they are not
detached); rerunning the command skips every shard already published.

A shard that cannot be read is recorded (``_reports/<name>.failed.json``) and the job goes on;
an error that is the job's (a store that refuses writes) stops it with one line.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eatdist.config import ExplainConfig
from eatdist.errors import ConfigError, DataError, EatdistError
from eatdist.explain.job import planned_counts, start_job, summarise
from eatdist.explain.work import ShardWork, output_name, record_failure
from eatdist.models.package import read_meta
from eatdist.store import open_store

log = logging.getLogger(__name__)
CLIENT_ATTEMPTS = 4  # tries to join through Ray Client (ray://) before giving up
# How long the driver waits without any live actor before it gives up (the cluster may be scaling up).
NO_ACTOR_TIMEOUT_S = 600.0


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("explain.engine=ray needs Ray: pip install 'eatdist[ray]'") from None
    return ray


def package_files(path: str | Path) -> dict[str, bytes]:
    """Return the files of the model package at ``path`` (name → bytes), checked to be a package first.

    Raises:
        ModelPackageError: when ``path`` is not an eatdist model package.
    """
    read_meta(path)
    folder = Path(path)
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


class ShardActor:
    """A Ray actor holding the model on its device; :meth:`explain` publishes one whole shard."""

    def __init__(self, package: dict[str, bytes], output: str, cfg: ExplainConfig, use_gpu: bool) -> None:
        import torch

        from eatdist.explain.explainer import Explainer
        from eatdist.hostmem import keep_freed_memory
        from eatdist.models.package import load_package

        keep_freed_memory()  # as the eatdist command does; Ray starts this process, not eatdist's CLI
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        folder = Path(tempfile.mkdtemp(prefix="eatdist-package-"))
        try:
            for name, data in package.items():
                (folder / name).write_bytes(data)
            model, meta = load_package(folder, device)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.store = open_store(output)
        self.label = f"{socket.gethostname()}:{os.getpid()}"
        self.work = ShardWork(Explainer(model, meta, cfg, device), self.store, cfg)

    def ready(self) -> str:
        """Return this actor's host:pid (the driver waits for it before handing work)."""
        return self.label

    def explain(self, url: str, clean: bool = True) -> dict[str, Any]:
        """Explain input ``url`` and publish its output shard; return its report, or ``{"failed": reason}``.
        ``clean`` first removes what a writer killed mid-way on this shard left (see :meth:`ShardWork.explain`)."""
        published: list[Any] = []
        reason = self.work.explain(url, self.label, published.append, clean=clean)
        if reason is not None:
            record_failure(self.store, url, reason, self.label)
            return {"input": url, "failed": reason, "owner": self.label}
        self.work.drain()
        return asdict(published[0])


def connect(cfg: ExplainConfig) -> Any:
    """Join the Ray cluster ``explain.ray_address``, else ``RAY_ADDRESS``, else start a local one.

    ``auto`` joins the cluster ``ray start`` began on this machine. Without an address the driver
    starts its own cluster rather than look for one: Ray's record of the last local cluster may
    name one long gone, and joining that would hang. Returns the ``ray`` module. Raises:
        ConfigError: when Ray is not installed; DataError: when the cluster cannot be reached.
    """
    ray = _ray()
    if ray.is_initialized():
        return ray
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    # Ray Client's proxy forks a server per driver, and that child sometimes dies at birth (a gRPC
    # poller race, ray-project/ray#63202): the next attempt forks a fresh one.
    attempts = CLIENT_ATTEMPTS if address.startswith("ray://") else 1
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, configure_logging=False, log_to_driver=True)
            return ray
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if attempt == attempts or "Starting Ray client server failed" not in str(exc):
                raise DataError(f"cannot join the Ray cluster at {address}: {exc}") from None
            log.warning("Ray Client's server for this driver did not start (attempt %d of %d); trying again",
                        attempt, attempts)  # fmt: skip
            time.sleep(attempt)
    raise AssertionError("unreachable")


def actor_shape(cfg: ExplainConfig, resources: dict[str, float], shards: int) -> tuple[int, float, float]:
    """Return (actors, cores each, GPUs each) for a cluster with ``resources`` and ``shards`` to explain."""
    cpus = cfg.ray_cpus_per_actor or float(1 + cfg.num_workers)
    gpus = cfg.ray_gpus_per_actor if resources.get("GPU", 0.0) > 0 else 0.0
    if cfg.ray_actors > 0:
        actors = cfg.ray_actors
    elif gpus > 0:
        actors = int(resources["GPU"] // gpus)
    else:
        actors = int(resources.get("CPU", 1.0) // cpus)
    return max(1, min(actors, shards)), cpus, gpus


class RayDriver:
    """Hands shards to actors one at a time, replaces actors that die, and requeues their shards.

    An actor cleans a shard's leftovers (a folder listing each time) only where there can be any:
    shards the output's listing at the start showed some of (``partial``), and shards whose actor died.
    """

    def __init__(self, ray: Any, package: Any, output: str, cfg: ExplainConfig, actors: int, cpus: float,
                 gpus: float, partial: set[str] | None = None) -> None:  # fmt: skip
        self.ray, self.package, self.output, self.cfg = ray, package, output, cfg
        self.target = actors
        self.remote = ray.remote(ShardActor).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0)
        self.use_gpu = gpus > 0
        self.starting: dict[Any, Any] = {}  # ready() ref → actor
        self.busy: dict[Any, tuple[Any, str]] = {}  # explain() ref → (actor, input)
        self.idle: list[Any] = []
        self.partial = set(partial or ())  # output names whose shard a killed writer may have left a part of
        self.failed_starts = 0  # actors that died starting, in a row
        # What this run explained; the reports themselves stay in the store (100k shards: no memory).
        self.images, self.shards = 0, 0

    def _spawn(self) -> None:
        actor = self.remote.remote(self.package, self.output, self.cfg, self.use_gpu)
        self.starting[actor.ready.remote()] = actor

    def run(self, todo: list[str], bar: tqdm) -> None:
        """Explain every input of ``todo``; return when each is published or recorded as unreadable."""
        ray = self.ray
        queue = deque(todo)
        for _ in range(self.target):
            self._spawn()
        alone_since = time.monotonic()
        while queue or self.busy:
            while self.idle and queue:
                actor, url = self.idle.pop(), queue.popleft()
                self.busy[actor.explain.remote(url, output_name(url) in self.partial)] = (actor, url)
            if self.busy or self.idle:
                alone_since = time.monotonic()
            elif time.monotonic() - alone_since > NO_ACTOR_TIMEOUT_S:
                raise DataError(
                    f"no Ray actor started in {NO_ACTOR_TIMEOUT_S:.0f} s: the cluster lacks the resources of one "
                    "(explain.ray_cpus_per_actor, explain.ray_gpus_per_actor)"
                )
            done, _ = ray.wait([*self.starting, *self.busy], num_returns=1, timeout=1.0)
            for ref in done:
                if ref in self.starting:
                    self._started(ref)
                else:
                    self._finished(ref, queue, bar)
        for actor in [*self.idle, *self.starting.values()]:
            ray.kill(actor)

    def _started(self, ref: Any) -> None:
        actor = self.starting.pop(ref)
        try:
            label = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            cause = _cause(exc)
            if isinstance(cause, EatdistError):  # the same for every actor: the job's error
                raise cause from None
            self.failed_starts += 1
            if self.failed_starts > 3 * self.target:  # not a lost node: the actors cannot start at all
                raise DataError(f"Ray actors keep failing to start: {_first_line(exc)}") from None
            log.warning("a Ray actor failed to start (%s); asking for another", _first_line(exc))
            self._spawn()
            return
        self.failed_starts = 0
        log.debug("actor %s ready", label)
        self.idle.append(actor)

    def _finished(self, ref: Any, queue: deque[str], bar: tqdm) -> None:
        actor, url = self.busy.pop(ref)
        try:
            report = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:  # the work itself raised: the job's error
            cause = _cause(exc)
            raise (cause if isinstance(cause, EatdistError | OSError) else exc) from None
        except self.ray.exceptions.RayActorError as exc:  # the actor died: the shard is redone elsewhere
            log.warning("the actor explaining %s died (%s); the shard goes back to the queue", output_name(url),
                        _first_line(exc))  # fmt: skip
            queue.appendleft(url)
            self.partial.add(output_name(url))
            self._spawn()
            return
        if "failed" in report:
            log.error("shard %s not explained: %s", url, report["failed"])
        else:
            self.images += report["explained"]
            self.shards += 1
            bar.update(report["explained"])
        self.idle.append(actor)


def _cause(exc: BaseException) -> BaseException | None:
    return getattr(exc, "cause", None) or getattr(exc, "error", None) or exc.__cause__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def run_ray(model_path: str | Path, inputs: list[str], output: str | Path, cfg: ExplainConfig) -> dict[str, Any]:
    """Explain ``inputs`` into ``output`` on a Ray cluster; return the job's summary (as the ``claims`` engine does).

    Raises:
        ConfigError: when Ray is not installed or a Ray setting is out of range;
        DataError: when the cluster cannot be reached or the output holds another job;
        ModelPackageError: for a bad model package.
    """
    for key, value in (("explain.ray_actors", cfg.ray_actors), ("explain.ray_cpus_per_actor", cfg.ray_cpus_per_actor),
                       ("explain.ray_gpus_per_actor", cfg.ray_gpus_per_actor)):  # fmt: skip
        if value < 0:
            raise ConfigError(f"config key '{key}': must not be negative, got {value}")
    store = open_store(output)
    package = package_files(model_path)
    start_job(store, inputs, cfg.lease_s)
    present = set(store.list(""))
    todo = [url for url in inputs if output_name(url) not in present]
    partial = store.partial_among({output_name(url) for url in todo}, list(present))
    counts = planned_counts(inputs)
    known = len(counts) == len(inputs)
    bar = tqdm(total=sum(counts.values()) if known else None, desc="explain", unit="img", dynamic_ncols=True,
               initial=sum(counts[u] for u in inputs if u not in todo) if known else 0)  # fmt: skip
    images = shards = 0
    try:
        if todo:
            ray = connect(cfg)
            actors, cpus, gpus = actor_shape(cfg, ray.cluster_resources(), len(todo))
            log.info("explaining %d of %d shards with %d Ray actor(s) of %g core(s) and %g GPU(s)",
                     len(todo), len(inputs), actors, cpus, gpus)  # fmt: skip
            driver = RayDriver(ray, ray.put(package), str(output), cfg, actors, cpus, gpus, partial)
            try:
                driver.run(todo, bar)
            finally:
                ray.shutdown()
            images, shards = driver.images, driver.shards
    finally:
        bar.close()
    summary = summarise(store, inputs)
    summary["by_this_process"] = {"images": images, "shards": shards}
    return summary
