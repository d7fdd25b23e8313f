"""The explanation job: input shards in, one explanation shard per input shard out.

Any number of processes — under a launcher or started by hand, on any machines that share the
output folder, at any time — cooperate on one job. Each claims a whole input shard at a time in
the output folder (:mod:`eatdist.explain.claims`), explains it through the pipeline (DataLoader
workers decode, the device runs the model, a writer thread encodes and writes), publishes the
output shard by renaming it into place and releases the claim. A process whose work is over
waits while others hold live claims, so it can take over any whose owner stops; every process
ends when each input has its output (or failed to be read during this run). Each then writes
the same ``explain_summary.json``, atomically: whoever finishes last leaves it complete.

The job's inputs are recorded in ``_job.json`` when it starts, so ``eatdist explain --status``
needs only the output folder, and a process started with other inputs is refused.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from eatdist import dist
from eatdist.config import ExplainConfig
from eatdist.data.corpus import DATASET_FILE
from eatdist.data.inputs import resolve_shards
from eatdist.errors import ConfigError, DataError
from eatdist.explain.claims import Claim, ClaimBoard, ClaimState
from eatdist.explain.encode import Outputs
from eatdist.explain.explainer import Explainer
from eatdist.explain.loader import ShardChunks, make_loader, shutdown
from eatdist.explain.writer import REPORTS, ShardReport, ShardWriterThread, Timings, write_json_atomic
from eatdist.models.package import load_package

log = logging.getLogger(__name__)
SUMMARY = "explain_summary.json"
JOB_FILE = "_job.json"
FAILED = ".failed.json"


def resolve_inputs(pattern: str | list[str]) -> list[str]:
    """Return the sorted input shards: see :func:`eatdist.data.inputs.resolve_shards` (folders, globs,
    brace patterns, URLs, ``pipe:`` commands, lists).

    Raises:
        DataError: when nothing matches, a listed file is missing, or two inputs share a file name.
    """
    return resolve_shards(pattern)


def output_name(url: str) -> str:
    """Return the output shard name of input ``url``: its last path component (paths and URLs alike)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


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


def start_job(out_dir: Path, inputs: list[str], lease_s: float) -> dict[str, Any]:
    """Record the job's inputs in ``out_dir/_job.json`` (first process) or check them (the others).

    Raises:
        DataError: when the folder holds a job over other inputs.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / JOB_FILE
    if not path.exists():
        tmp = out_dir / f".{JOB_FILE}.{os.getpid()}.{random.getrandbits(32):08x}.tmp"
        tmp.write_text(json.dumps({"inputs": inputs, "lease_s": lease_s, "created": time.time()}, indent=1))
        try:
            os.link(tmp, path)  # the first process to arrive records the job
        except FileExistsError:
            pass
        except OSError:
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    job = read_job(out_dir)
    theirs, mine = sorted(map(output_name, job["inputs"])), sorted(map(output_name, inputs))
    if theirs != mine:
        raise DataError(
            f"{out_dir} holds a job over {len(theirs)} other input shards (see {JOB_FILE}); "
            "explain these inputs into another folder"
        )
    return job


def read_job(out_dir: Path) -> dict[str, Any]:
    """Return ``_job.json`` of ``out_dir``.

    Raises:
        DataError: when there is none.
    """
    try:
        return json.loads((Path(out_dir) / JOB_FILE).read_text())
    except (OSError, ValueError):
        raise DataError(f"no explanation job in {out_dir} (no readable {JOB_FILE})") from None


def summarise(out_dir: Path, inputs: list[str]) -> dict[str, Any]:
    """Gather the per-shard reports of the job into one summary, write it and return it."""
    explained, undecodable, missing, truncated = 0, [], [], []
    for path in inputs:
        name = output_name(path)
        report_file = out_dir / REPORTS / f"{name}.json"
        if not (out_dir / name).is_file() or not report_file.is_file():
            missing.append(path)
            continue
        report = json.loads(report_file.read_text())
        explained += report["explained"]
        undecodable += [dict(u, shard=name) for u in report["undecodable"]]
        if report.get("truncated"):
            truncated.append(dict(report["truncated"], shard=name, explained=report["explained"]))
    summary = {
        "input_shards": len(inputs),
        "explained": explained,
        "undecodable": len(undecodable),
        "undecodable_samples": undecodable,
        "truncated_shards": truncated,
        "incomplete_shards": missing,
        "output": str(out_dir),
    }
    write_json_atomic(out_dir / SUMMARY, summary)
    return summary


@dataclass
class JobView:
    """The state of every input of a job, from the files in its output folder."""

    done: list[str]
    claimed: list[tuple[str, ClaimState]]
    failed: list[tuple[str, str, float]]  # input, reason, when (file server's clock)
    remaining: list[str]


def view_job(out_dir: Path, inputs: list[str], board: ClaimBoard) -> JobView:
    """Sort the inputs into done, claimed, failed (unreadable) and remaining."""
    present = set(os.listdir(out_dir))
    reports = set(os.listdir(out_dir / REPORTS)) if (out_dir / REPORTS).is_dir() else set()
    claims = board.scan()
    view = JobView([], [], [], [])
    for url in inputs:
        name = output_name(url)
        if name in present:
            view.done.append(url)
        elif name in claims:
            view.claimed.append((url, claims[name]))
        elif name + FAILED in reports:
            path = out_dir / REPORTS / (name + FAILED)
            try:
                view.failed.append((url, json.loads(path.read_text())["reason"], path.stat().st_mtime))
            except (OSError, ValueError, KeyError):  # replaced or removed meanwhile
                view.remaining.append(url)
        else:
            view.remaining.append(url)
    return view


def job_status(out_dir: str | Path) -> tuple[str, bool]:
    """Return a readable status of the job in ``out_dir`` and whether it is complete.

    Raises:
        DataError: when ``out_dir`` holds no job.
    """
    out_dir = Path(out_dir)
    job = read_job(out_dir)
    inputs, lease = job["inputs"], float(job.get("lease_s", 60.0))
    board = ClaimBoard(out_dir, lease)
    try:
        view, now = view_job(out_dir, inputs, board), board.now()
    finally:
        board.close()
    counts = planned_counts(inputs)
    lines = [
        f"job in {out_dir}: {len(inputs)} input shards, lease {lease:g} s",
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
    """One process's part in an explanation job; :meth:`run` returns when the job is over."""

    def __init__(self, explainer: Explainer, inputs: list[str], out_dir: Path, cfg: ExplainConfig) -> None:
        for key, value in (("explain.lease_s", cfg.lease_s), ("explain.num_workers", cfg.num_workers + 1)):
            if value <= 0:
                raise ConfigError(f"config key '{key}': must be positive, got {value}")
        self.explainer, self.inputs, self.out_dir, self.cfg = explainer, inputs, out_dir, cfg
        self.rank, world = dist.rank(), dist.world_size()
        images = bool(Outputs.from_config(cfg).images)  # a bad explain.outputs fails before any work
        start_job(out_dir, inputs, cfg.lease_s)
        # Where this process starts looking: its rank's share under a launcher, anywhere otherwise,
        # so that processes starting together rarely contend for the same claim.
        offset = self.rank * len(inputs) // world if world > 1 else random.randrange(len(inputs))
        self.order = inputs[offset:] + inputs[:offset]
        # The decoded images travel to this process only when image parts are drawn from them.
        self.dataset = ShardChunks(explainer.transform, cfg.batch_size, keep_images=images)
        self.loader = make_loader(self.dataset, cfg.num_workers, pin_memory=explainer.on_gpu)
        # Start the workers before any thread exists (forking a threaded process is unsafe).
        self.dataset.select("")
        for _ in self.loader:
            pass
        self.writer = ShardWriterThread(explainer.meta, cfg, explainer.device)  # forks its encoders: no thread yet
        self.board = ClaimBoard(out_dir, cfg.lease_s)
        self.started = self.board.now()
        self.counts = planned_counts(inputs)
        self.timings: Timings = self.writer.timings
        self.mine: list[ShardReport] = []
        self.reading: dict[str, int] = {}  # samples read of this process's unpublished shards
        known = len(self.counts) == len(inputs)
        self.bar = tqdm(total=sum(self.counts.values()) if known else None, desc="explain", unit="img",
                        disable=self.rank != 0, dynamic_ncols=True)  # fmt: skip
        self.job_wide = known

    def run(self) -> None:
        """Claim and explain shards until every input has its output or failed in this run."""
        waiting = False
        while True:
            view = self._view()
            got = self._claim(view)
            if got is not None:
                waiting = False
                self._explain(*got)
                continue
            self.writer.drain()
            view = self._view()
            if not view.remaining and not view.claimed:
                return
            if not view.remaining and not waiting:
                owners = sorted({s.label for _, s in view.claimed})
                log.info("waiting for %d shard(s) claimed by %s", len(view.claimed), ", ".join(owners))
            waiting = True
            time.sleep(min(5.0, max(0.05, self.cfg.lease_s / 10)))

    def _view(self) -> JobView:
        view = view_job(self.out_dir, self.inputs, self.board)
        # A shard that could not be read is retried by processes started after it failed (reruns).
        retry = [url for url, _, when in view.failed if when < self.started]
        view.remaining += retry
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
        for url in self.order:
            if url not in claimable:
                continue
            seen: ClaimState | None = claimable[url]
            if seen is not None and not self.board.is_stale(seen, now):
                continue
            claim = self.board.try_claim(output_name(url), seen, url)
            if claim is None:
                continue
            if (self.out_dir / output_name(url)).exists():  # published since the scan
                claim.release()
                continue
            if seen is not None:
                log.warning("took over %s from %s (no heartbeat for %.0f s)", output_name(url), seen.label,
                            self.board.age(seen, now))  # fmt: skip
            return url, claim
        return None

    def _explain(self, url: str, claim: Claim) -> None:
        name = output_name(url)
        claim.__enter__()
        log.debug("claimed %s (generation %d)", name, claim.generation)
        report = ShardReport(input=url, output=str(self.out_dir / name), rank=self.rank, owner=claim.board.owner.label)
        for stale in self.out_dir.glob(f".{glob.escape(name)}.*.tmp"):  # left by a process that died on it
            stale.unlink(missing_ok=True)
        self.dataset.select(url)
        self.reading[name] = 0
        opened = False
        try:
            for chunk in self.loader:
                if chunk.error is not None and chunk.read == 0:
                    self._failed(url, claim, chunk.error)
                    return
                if not opened:
                    self.writer.open(report, self.out_dir / name)
                    opened = True
                for bad in chunk.bad:
                    report.undecodable.append(bad)
                    log.warning("cannot explain %s in %s: %s", bad["key"], name, bad["reason"])
                self.timings.decode += chunk.decode_s
                if chunk.pixels is not None:
                    self._infer(chunk)
                self.bar.update(chunk.read - self.reading[name])
                self.reading[name] = chunk.read
                if chunk.error is not None:
                    report.truncated = {"read": chunk.read, "reason": chunk.error}
                    log.warning("%s ends after %d samples; those are explained, the rest reported: %s",
                                name, chunk.read, chunk.error)  # fmt: skip
                    break
                if claim.lost:
                    break
            if not opened:  # an empty shard still gets its (empty) output
                self.writer.open(report, self.out_dir / name)
            self.writer.close_shard(claim.held, lambda published: self._published(name, claim, published))
        except BaseException:
            claim.release()
            raise

    def _infer(self, chunk: Any) -> None:
        explainer = self.explainer
        mode = torch.inference_mode() if explainer.model.linear_heads else torch.no_grad()
        started = time.perf_counter()
        with mode:
            batch, out = explainer.forward(chunk.pixels)
            if explainer.on_gpu:
                torch.cuda.synchronize(explainer.device)
            forwarded = time.perf_counter()
            result = explainer.results(batch, out)
        self.timings.forward += forwarded - started
        self.timings.maps += time.perf_counter() - forwarded
        self.writer.write(chunk, result)

    def _published(self, name: str, claim: Claim, report: ShardReport | None) -> None:
        """Runs in the writer thread once the shard is published (``report``) or dropped (None)."""
        if report is not None:
            self.mine.append(report)
            (self.out_dir / REPORTS / (name + FAILED)).unlink(missing_ok=True)
        self.reading.pop(name, None)
        claim.release()

    def _failed(self, url: str, claim: Claim, reason: str) -> None:
        log.error("rank %d: shard %s not explained: %s", self.rank, url, reason)
        reports = self.out_dir / REPORTS
        reports.mkdir(exist_ok=True)
        record = {"input": url, "reason": reason, "owner": claim.board.owner.label}
        write_json_atomic(reports / (output_name(url) + FAILED), record)
        self.reading.pop(output_name(url), None)
        claim.release()

    def close(self) -> None:
        """Finish the queued writes, stop the workers and threads, drop this process's clock probe."""
        try:
            self.writer.close()
        finally:
            self.bar.close()
            self.board.close()
            shutdown(self.loader)


def run_explain(
    model_path: str | Path, pattern: str | list[str], output: str | Path, cfg: ExplainConfig
) -> dict[str, Any] | None:
    """Take part in explaining ``pattern`` into ``output`` until the job is over; return its summary.

    Under a launcher only rank 0 returns the summary (the others None); every process writes it.
    Raises:
        DataError: when no input matches, or ``output`` holds a job over other inputs;
        ModelPackageError: for a bad model package.
    """
    inputs = resolve_inputs(pattern)
    device = dist.device()
    model, meta = load_package(model_path, device)
    job = ExplainJob(Explainer(model, meta, cfg, device), inputs, Path(output), cfg)
    try:
        job.run()
    finally:
        job.close()
    mine = sum(r.explained for r in job.mine)
    log.info("this process explained %d images from %d shards", mine, len(job.mine))
    summary = summarise(Path(output), inputs)
    summary["by_this_process"] = {"images": mine, "shards": len(job.mine)}  # printed, not written
    return summary if dist.rank() == 0 else None
