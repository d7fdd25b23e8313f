"""The explanation job: input shards in, one explanation shard per input shard out.

The output is a folder or an object store URL (:mod:`eatdist.store`); every record of the job
lives there. With the ``claims`` engine (this module), any number of processes — under a
launcher or started by hand, on any machines that reach the output, at any time — cooperate on
one job. Each claims a whole input shard at a time in the output (:mod:`eatdist.explain.claims`),
explains it (:class:`eatdist.explain.work.ShardWork`: DataLoader workers decode, the device runs
the model, a writer thread encodes and writes), publishes the output shard whole and releases
the claim. The ``ray`` engine (:mod:`eatdist.explain.ray_engine`) schedules the same work on a
Ray cluster instead. A process whose work is over
waits while others hold live claims, so it can take over any whose owner stops; every process
ends when each input has its output (or failed to be read during this run). Each then writes
the same ``explain_summary.json``, whole: whoever finishes last leaves it complete.

The job's inputs are recorded in ``_job.json`` when it starts, so ``eatdist explain --status``
needs only the output, and a process started with other inputs is refused.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eatdist import dist
from eatdist.config import ExplainConfig
from eatdist.data.corpus import DATASET_FILE
from eatdist.data.inputs import resolve_shards
from eatdist.errors import ConfigError, DataError
from eatdist.explain.claims import Claim, ClaimBoard, ClaimState
from eatdist.explain.encode import Outputs
from eatdist.explain.explainer import Explainer
from eatdist.explain.work import FAILED, ShardWork, output_name, record_failure
from eatdist.explain.writer import REPORTS, ShardReport, Timings
from eatdist.models.package import load_package
from eatdist.store import Store, open_store

log = logging.getLogger(__name__)
SUMMARY = "explain_summary.json"
JOB_FILE = "_job.json"
ENGINES = ("claims", "ray")
# Inputs found taken in a row, since the last view, before the next claim lists the output again
# (past that point the others have most likely explained what is left of the view).
MISSES = 8
BAR_REFRESH_S = 30.0  # how often a process that shows the bar lists the output for the others' progress


def resolve_inputs(pattern: str | list[str]) -> list[str]:
    """Return the sorted input shards: see :func:`eatdist.data.inputs.resolve_shards` (folders, globs,
    brace patterns, URLs, ``pipe:`` commands, lists).

    Raises:
        DataError: when nothing matches, a listed file is missing, or two inputs share a file name.
    """
    return resolve_shards(pattern)


def as_store(out: str | Path | Store) -> Store:
    """Return the output store of ``out`` (a folder, a URL or a store already)."""
    return out if isinstance(out, Store) else open_store(out)


def planned_counts(inputs: list[str]) -> dict[str, int]:
    """Return the sample count of each input whose folder's ``dataset.json`` lists it."""
    counts: dict[str, int] = {}
    for folder in {os.path.dirname(p) for p in inputs}:
        try:
            data = json.loads((Path(folder or ".") / DATASET_FILE).read_text())
            for shards in data.get("splits", {}).values():
                for s in shards:
                    counts[os.path.join(folder, s["file"])] = int(s["samples"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return {p: counts[p] for p in inputs if p in counts}


def start_job(out: str | Path | Store, inputs: list[str], lease_s: float) -> dict[str, Any]:
    """Record the job's inputs in the output's ``_job.json`` (first process) or check them (the others).

    Raises:
        DataError: when the output holds a job over other inputs, or cannot be written.
    """
    store = as_store(out)
    if not store.exists(JOB_FILE):
        record = json.dumps({"inputs": inputs, "lease_s": lease_s, "created": time.time()}, indent=1)
        store.create(JOB_FILE, record.encode())  # the first process to arrive records the job
    job = read_job(store)
    theirs, mine = sorted(map(output_name, job["inputs"])), sorted(map(output_name, inputs))
    if theirs != mine:
        raise DataError(
            f"{store.root} holds a job over {len(theirs)} other input shards (see {JOB_FILE}); "
            "explain these inputs into another folder"
        )
    return job


def read_job(out: str | Path | Store) -> dict[str, Any]:
    """Return the output's ``_job.json``.

    Raises:
        DataError: when there is none.
    """
    store = as_store(out)
    try:
        return json.loads(store.get(JOB_FILE))
    except (OSError, ValueError):
        raise DataError(f"no explanation job in {store.root} (no readable {JOB_FILE})") from None


def summarise(out: str | Path | Store, inputs: list[str]) -> dict[str, Any]:
    """Gather the per-shard reports of the job into one summary, write it and return it."""
    store = as_store(out)
    explained, undecodable, missing, truncated, renamed = 0, [], [], [], []
    present, listed = set(store.list("")), set(store.list(REPORTS))
    wanted = [f"{REPORTS}/{output_name(p)}.json" for p in inputs if output_name(p) in present]
    reports = store.get_many([k for k in wanted if k.rsplit("/", 1)[-1] in listed])
    for path in inputs:
        name = output_name(path)
        if f"{REPORTS}/{name}.json" not in reports:
            missing.append(path)
            continue
        report = json.loads(reports[f"{REPORTS}/{name}.json"])
        explained += report["explained"]
        undecodable += [dict(u, shard=name) for u in report["undecodable"]]
        renamed += [dict(r, shard=name) for r in report.get("renamed", [])]
        if report.get("truncated"):
            truncated.append(dict(report["truncated"], shard=name, explained=report["explained"]))
    summary = {
        "input_shards": len(inputs),
        "explained": explained,
        "undecodable": len(undecodable),
        "undecodable_samples": undecodable,
        "truncated_shards": truncated,
        "renamed": len(renamed),  # keys with a dot, explained under a safe key
        "renamed_samples": renamed,
        "incomplete_shards": missing,
        "output": store.root,
    }
    store.put_json(SUMMARY, summary)
    return summary


@dataclass
class JobView:
    """The state of every input of a job, from the files in its output folder."""

    done: list[str]
    claimed: list[tuple[str, ClaimState]]
    failed: list[tuple[str, str, float]]  # input, reason, when (the store's clock)
    remaining: list[str]
    leftover: list[ClaimState] = field(default_factory=list)  # claims on done shards (owner killed before release)


def view_job(out: str | Path | Store, inputs: list[str], board: ClaimBoard, owners: bool | None = None) -> JobView:
    """Sort the inputs into done, claimed, failed (unreadable) and remaining (``owners``: see ClaimBoard.scan)."""
    store = as_store(out)
    present = set(store.list(""))
    reports = set(store.list(REPORTS))
    claims = board.scan(owners)
    view = JobView([], [], [], [])
    for url in inputs:
        name = output_name(url)
        if name in present:
            view.done.append(url)
            if name in claims:
                view.leftover.append(claims[name])
        elif name in claims:
            view.claimed.append((url, claims[name]))
        elif name + FAILED in reports:
            key = f"{REPORTS}/{name}{FAILED}"
            try:
                when = store.mtime_ns(key)
                reason = json.loads(store.get(key))["reason"]
                if when is None:
                    raise FileNotFoundError(key)
                view.failed.append((url, reason, when / 1e9))
            except (OSError, ValueError, KeyError):  # replaced or removed meanwhile
                view.remaining.append(url)
        else:
            view.remaining.append(url)
    return view


def job_status(out: str | Path | Store) -> tuple[str, bool]:
    """Return a readable status of the job in the output ``out`` (a folder or URL) and whether it is complete.

    Raises:
        DataError: when ``out`` holds no job.
    """
    store = as_store(out)
    job = read_job(store)
    inputs, lease = job["inputs"], float(job.get("lease_s", 60.0))
    board = ClaimBoard(store, lease)
    try:
        view, now = view_job(store, inputs, board, owners=True), board.now()
    finally:
        board.close()
    counts = planned_counts(inputs)
    lines = [
        f"job in {store.root}: {len(inputs)} input shards, lease {lease:g} s",
        f"done {len(view.done)}, claimed {len(view.claimed)}, failed {len(view.failed)}, "
        f"remaining {len(view.remaining)}",
    ]
    if len(counts) == len(inputs):
        images = sum(counts[p] for p in view.done)
        lines.append(f"images in done shards: {images} of {sum(counts.values())}")
    for url, state in view.claimed:
        age = board.age(state, now)
        stale = "; stale, will be taken over" if board.is_stale(state, now) else ""
        lines.append(f"  claimed  {output_name(url)}  by {state.label} (heartbeat {age:.1f} s ago{stale})")
    for url, reason, _ in view.failed:
        lines.append(f"  failed   {output_name(url)}: {reason} (a new process retries it)")
    complete = len(view.done) == len(inputs)
    lines.append("complete" if complete else "not complete")
    return "\n".join(lines), complete


class ExplainJob:
    """One process's part in an explanation job (the ``claims`` engine); :meth:`run` returns when the job is over."""

    def __init__(self, explainer: Explainer, inputs: list[str], out: str | Path | Store, cfg: ExplainConfig) -> None:
        for key, value in (("explain.lease_s", cfg.lease_s), ("explain.num_workers", cfg.num_workers + 1)):
            if value <= 0:
                raise ConfigError(f"config key '{key}': must be positive, got {value}")
        self.store = as_store(out)
        self.explainer, self.inputs, self.cfg = explainer, inputs, cfg
        self.rank, world = dist.rank(), dist.world_size()
        Outputs.from_config(cfg)  # a bad explain.outputs fails before any work
        start_job(self.store, inputs, cfg.lease_s)
        # Where this process starts looking: its rank's share under a launcher, anywhere otherwise,
        # so that processes starting together rarely contend for the same claim.
        offset = self.rank * len(inputs) // world if world > 1 else random.randrange(len(inputs))
        self.order = inputs[offset:] + inputs[:offset]
        self.work = ShardWork(explainer, self.store, cfg, self.rank)
        self.board = ClaimBoard(self.store, cfg.lease_s)
        self.started = self.board.now()
        self.counts = planned_counts(inputs)
        self.timings: Timings = self.work.timings
        self.mine: list[ShardReport] = []
        self.reading: dict[str, int] = {}  # samples read of this process's unpublished shards
        known = len(self.counts) == len(inputs)
        # Rank 0 shows the bar; passing no ``disable`` there lets TQDM_DISABLE=1 turn it off.
        self.bar = tqdm(total=sum(self.counts.values()) if known else None, desc="explain", unit="img",
                        dynamic_ncols=True, **({} if self.rank == 0 else {"disable": True}))  # fmt: skip
        self.job_wide = known
        # Inputs free at the last view and not tried since, the next one last; the failed ones of
        # that view this process retries; when it was taken (time.monotonic).
        self._free: list[str] = []
        self._retry: set[str] = set()
        self._viewed = 0.0

    def run(self) -> None:
        """Claim and explain shards until every input has its output or failed in this run.

        The output is listed (:func:`view_job`) for the first claim, and again only once the inputs
        free at the last listing are used up or found taken ``MISSES`` times in a row (the others
        took them), or every ``BAR_REFRESH_S`` where the progress bar shows: each claim in between
        costs a conditional create and existence checks, not a listing of every shard done. While
        others hold the last claims, only the claims are listed (:meth:`_await_claims`).
        """
        waiting = False
        while True:
            got = self._claim_next()
            if got is None:
                got = self._claim(self._view())
            if got is not None:
                waiting = False
                self._explain(*got)
                continue
            self.work.drain()
            view = self._view()
            if not view.remaining and not view.claimed and not self._sweep(view.leftover):
                return
            if not view.remaining and view.claimed and not waiting:
                owners = sorted({s.label for _, s in view.claimed})
                log.info("waiting for %d shard(s) claimed by %s", len(view.claimed), ", ".join(owners))
            waiting = True
            self._await_claims(view)

    def _await_claims(self, view: JobView) -> None:
        """Sleep while others hold claims that are not stale, polling ``_claims/`` alone
        (:meth:`ClaimBoard.scan`): a claim released means its shard is published or failed, nothing
        left to do here, so the whole output is listed again only once a claim turns stale (to
        take it over), none is left (the job is over) or the progress bar is due."""
        every = min(5.0, max(0.05, self.cfg.lease_s / 10))
        if view.remaining:  # others took them between the view and the claim: look again
            time.sleep(every)
            return
        while not self._bar_due():
            time.sleep(every)
            claims, now = self.board.scan(), self.board.now()
            if not claims or any(self.board.is_stale(state, now) for state in claims.values()):
                return

    def _bar_due(self) -> bool:
        """Whether the progress bar shows and is due the others' progress (a listing of the output)."""
        return not self.bar.disable and time.monotonic() - self._viewed > BAR_REFRESH_S

    def _sweep(self, leftover: list[ClaimState]) -> bool:
        """Delete stale claims on published shards (their owner died before releasing); True while live ones remain."""
        now, live = self.board.now(), False
        for state in leftover:
            if self.board.is_stale(state, now):
                self.store.delete(state.key)
            else:
                live = True
        return live

    def _view(self) -> JobView:
        view = view_job(self.store, self.inputs, self.board)
        self._viewed = time.monotonic()
        # A shard that could not be read is retried by processes started after it failed (reruns).
        retry = [url for url, _, when in view.failed if when < self.started]
        view.remaining += retry
        self._retry = set(retry)
        if self.job_wide:
            done = sum(self.counts[p] for p in view.done)
            self.bar.n = done + sum(list(self.reading.values()))
            self.bar.refresh()
        return view

    def _claim(self, view: JobView) -> tuple[str, Claim] | None:
        now = self.board.now()
        claimable = {url: None for url in view.remaining} | {
            url: s for url, s in view.claimed if s.owner.get("token") != self.board.owner.token
        }
        order = [url for url in self.order if url in claimable]
        for i, url in enumerate(order):
            seen: ClaimState | None = claimable[url]
            if seen is not None and not self.board.is_stale(seen, now):
                continue
            claim = self.board.try_claim(output_name(url), seen, url)
            if claim is None or not self._still_to_do(url, claim):
                continue
            if seen is not None:
                log.warning("took over %s from %s (no heartbeat for %.0f s)", output_name(url), seen.label,
                            self.board.age(seen, now))  # fmt: skip
            self._free = [u for u in reversed(order[i + 1 :]) if claimable[u] is None]
            return url, claim
        self._free = []
        return None

    def _claim_next(self) -> tuple[str, Claim] | None:
        """Claim the next input that was free at the last view, without listing the output; None
        when it is time for a view (see :meth:`run`)."""
        if self._bar_due():
            return None
        misses = 0
        while self._free and misses < MISSES:
            url = self._free.pop()
            claim = self.board.try_claim(output_name(url), None, url)
            if claim is not None and self._still_to_do(url, claim):
                return url, claim
            misses += 1
        return None

    def _still_to_do(self, url: str, claim: Claim) -> bool:
        """Whether the input just claimed still needs this process (else the claim is released):
        not published since the view, nor failed since (failures before this process started
        are retried, later ones are not)."""
        name = output_name(url)
        if self.store.exists(name) or (url not in self._retry and self.store.exists(f"{REPORTS}/{name}{FAILED}")):
            claim.release()
            return False
        return True

    def _explain(self, url: str, claim: Claim) -> None:
        name = output_name(url)
        claim.__enter__()
        log.debug("claimed %s (generation %d)", name, claim.generation)
        self.reading[name] = 0

        def progress(read: int) -> None:
            self.bar.update(read - self.reading.get(name, 0))
            self.reading[name] = read

        try:
            reason = self.work.explain(
                url,
                claim.board.owner.label,
                lambda published: self._published(name, claim, published),
                still_held=claim.held,
                lost=lambda: claim.lost,
                progress=progress,
                clean=claim.generation > 0,  # taken over: its owner may have died mid-write
            )
            if reason is not None:
                self._failed(url, claim, reason)
        except BaseException:
            claim.release()
            raise

    def _published(self, name: str, claim: Claim, report: ShardReport | None) -> None:
        """Runs in the writer thread once the shard is published (``report``) or dropped (None)."""
        if report is not None:
            self.mine.append(report)
            self.store.delete(f"{REPORTS}/{name}{FAILED}")
        self.reading.pop(name, None)
        claim.release()

    def _failed(self, url: str, claim: Claim, reason: str) -> None:
        log.error("rank %d: shard %s not explained: %s", self.rank, url, reason)
        record_failure(self.store, url, reason, claim.board.owner.label)
        self.reading.pop(output_name(url), None)
        claim.release()

    def close(self) -> None:
        """Finish the queued writes, stop the workers and threads, drop this process's clock probe."""
        try:
            self.work.close()
        finally:
            self.bar.close()
            self.board.close()


def run_explain(
    model_path: str | Path, pattern: str | list[str], output: str | Path, cfg: ExplainConfig
) -> dict[str, Any] | None:
    """Take part in explaining ``pattern`` into ``output`` (a folder or URL) until the job is over; return its summary.

    ``cfg.engine`` chooses who schedules the shards: ``claims`` (this process cooperates with any
    others on the same output) or ``ray`` (this process drives a Ray cluster). Under a launcher
    only rank 0 writes and returns the summary (the others return None once the job is over):
    the summary reads every shard's report, once per launch rather than once per process.
    Raises:
        DataError: when no input matches, ``output`` holds a job over other inputs or cannot be written;
        ConfigError: for an unknown engine; ModelPackageError: for a bad model package.
    """
    if cfg.engine not in ENGINES:
        raise ConfigError(f"config key 'explain.engine': one of {', '.join(ENGINES)}, got '{cfg.engine}'")
    store = open_store(output)
    inputs = resolve_inputs(pattern)
    if cfg.engine == "ray":
        from eatdist.explain.ray_engine import run_ray

        return run_ray(model_path, inputs, output, cfg)
    device = dist.device()
    model, meta = load_package(model_path, device)
    job = ExplainJob(Explainer(model, meta, cfg, device), inputs, store, cfg)
    try:
        job.run()
    finally:
        job.close()
    mine = sum(r.explained for r in job.mine)
    log.info("this process explained %d images from %d shards", mine, len(job.mine))
    if dist.rank() != 0:
        return None
    summary = summarise(store, inputs)
    summary["by_this_process"] = {"images": mine, "shards": len(job.mine)}  # printed, not written
    return summary
