"""``eatdist check``: read every sample of a corpus and verify it against contract 1.

Checks that every image decodes, every ``json`` has a class in range and attributes (and
``attr_mask``) of the length ``dataset.json`` names, optional geometry is well formed, keys
follow the contract and are unique (a dot in a key is named as such: WebDataset splits keys at
the first dot, merging ``img.001`` and ``img.002``), and every shard holds the sample count
``dataset.json`` plans with. The corpus may be remote (:mod:`eatdist.data.remote`); each local
shard leaves with its index (:mod:`eatdist.data.shardindex`), ready to be uploaded beside it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eatdist.data.corpus import DATASET_FILE, IMAGE_EXTENSIONS, load_dataset_info
from eatdist.data.pipeline import BadSample, decode_image, parse_labels
from eatdist.data.remote import is_remote, name_of
from eatdist.data.shardindex import load_index
from eatdist.data.shards import iter_shard, shard_pool
from eatdist.errors import DataError

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_/-]+$")
MAX_LISTED = 50
MAX_PER_SHARD = 20


@dataclass
class ShardCheck:
    """What one shard holds and what is wrong with it."""

    split: str
    file: str
    listed: int
    found: int = 0
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    keys: list[str] = field(default_factory=list)

    def problem(self, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PER_SHARD:
            self.problems.append(f"{self.file}: {message}")


@dataclass
class CheckReport:
    """The outcome of :func:`check_corpus`."""

    root: str | Path
    num_classes: int
    num_attributes: int
    shards: list[ShardCheck]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def problem_count(self) -> int:
        return len(self.problems) + sum(s.problem_count for s in self.shards)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def summary(self) -> str:
        """Return the report for people: per-split counts, then problems and notes."""
        lines = [f"corpus {self.root}: {self.num_classes} classes, {self.num_attributes} attributes"]
        splits: dict[str, list[ShardCheck]] = {}
        for shard in self.shards:
            splits.setdefault(shard.split, []).append(shard)
        for split, shards in splits.items():
            found, listed = sum(s.found for s in shards), sum(s.listed for s in shards)
            counted = f"{found} samples" if found == listed else f"{found} samples ({listed} listed)"
            lines.append(f"  {split}: {len(shards)} shard{'' if len(shards) == 1 else 's'}, {counted}")
        listed_problems = self.problems + [p for s in self.shards for p in s.problems]
        lines += [f"  problem: {p}" for p in listed_problems[:MAX_LISTED]]
        if self.problem_count > min(len(listed_problems), MAX_LISTED):
            lines.append(f"  ... and {self.problem_count - min(len(listed_problems), MAX_LISTED)} more problems")
        lines += [f"  note: {n}" for n in self.notes]
        if self.ok:
            lines.append("OK: every sample decodes and matches dataset.json")
        else:
            lines.append(f"FAILED: {self.problem_count} problems")
        return "\n".join(lines)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_box(box: Any) -> bool:
    return (
        isinstance(box, list)
        and len(box) == 4
        and all(_is_number(v) for v in box)
        and box[0] <= box[2]
        and box[1] <= box[3]
    )


def geometry_problems(record: dict[str, Any], num_attributes: int) -> list[str]:
    """Return what is wrong with a record's optional ``bbox``, ``parts`` and ``attr_boxes``."""
    problems = []
    if "bbox" in record and not _is_box(record["bbox"]):
        problems.append("bbox is not [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1")
    parts = record.get("parts")
    if parts is not None and not (
        isinstance(parts, dict)
        and all(isinstance(p, list) and len(p) == 2 and all(_is_number(v) for v in p) for p in parts.values())
    ):
        problems.append("parts is not {name: [x, y]}")
    boxes = record.get("attr_boxes")
    if boxes is not None and not (
        isinstance(boxes, dict)
        and all(k.isdigit() and int(k) < num_attributes and _is_box(b) for k, b in boxes.items())
    ):
        problems.append("attr_boxes is not {attribute index: [x0, y0, x1, y1]}")
    return problems


def dotted_members(sample: dict[str, Any]) -> list[str]:
    """Return the member names of a sample that WebDataset read from keys with a dot.

    ``img.001.jpg`` reads as key ``img`` with extension ``001.jpg``: an extension whose last part
    is an image or ``json`` but which has more parts before it gives it away.
    """
    known = (*IMAGE_EXTENSIONS, "json")
    return [
        f"{sample.get('__key__', '')}.{ext}"
        for ext in sample
        if not ext.startswith("__") and "." in ext and ext.rsplit(".", 1)[1] in known and ext not in known
    ]


def sample_problems(sample: dict[str, Any], num_classes: int, num_attributes: int) -> list[str]:
    """Return what is wrong with one raw sample (empty when it is fine)."""
    key = sample.get("__key__", "")
    dotted = dotted_members(sample)
    if dotted:
        # Said plainly: otherwise the merged sample only shows as "no json" / "no image".
        return [
            f"keys with a dot: members {', '.join(dotted[:4])} are read as one sample '{key}' "
            "(WebDataset splits keys at the first dot); rename the keys without dots"
        ]
    problems = []
    if not KEY_PATTERN.match(key):
        problems.append("key has characters other than letters, digits, _ - /")
    images = [e for e in IMAGE_EXTENSIONS if e in sample]
    if len(images) > 1:
        problems.append(f"more than one image ({', '.join(images)})")
    for step in (lambda: parse_labels(sample, num_classes, num_attributes), lambda: decode_image(sample)):
        try:
            step()
        except BadSample as exc:
            problems.append(str(exc))
    if "json" in sample:
        try:
            record = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict):
            problems += geometry_problems(record, num_attributes)
    return problems


def check_shard(job: tuple[str, str, int, int, int]) -> ShardCheck:
    """Read one shard (split, path, listed count, classes, attributes) and return its check."""
    split, path, listed, num_classes, num_attributes = job
    result = ShardCheck(split, name_of(path), listed)
    try:
        if not is_remote(path):
            load_index(path)  # built and cached when missing: the shard is ready to upload with it
        for sample in iter_shard(path):
            result.found += 1
            result.keys.append(sample["__key__"])
            for problem in sample_problems(sample, num_classes, num_attributes):
                result.problem(f"sample '{sample['__key__']}': {problem}")
    except DataError as exc:
        result.problem(f"unreadable after {result.found} samples ({exc})")
    if result.found != listed:
        result.problem(f"holds {result.found} samples, {DATASET_FILE} lists {listed}")
    return result


def check_corpus(root: str | Path, workers: int = 1, progress: bool = True) -> CheckReport:
    """Read every shard of the corpus at ``root`` (``workers`` shards at a time) and check it.

    Returns the report; problems in samples or shards are in it, not raised. Raises:
        DataError: when ``dataset.json`` is missing or malformed.
    """
    info = load_dataset_info(root)
    report = CheckReport(info.source.removesuffix(f"/{DATASET_FILE}"), info.num_classes, info.num_attributes, [])
    for group, indices in info.attribute_groups.items():
        if any(not 0 <= i < info.num_attributes for i in indices):
            report.problems.append(f"{DATASET_FILE}: attribute group '{group}' has indices out of range")
    jobs = []
    for split, shards in info.splits.items():
        for shard in shards:
            path = info.location(shard.file)
            # A remote shard is not probed first: reading it names it when it is missing.
            if is_remote(path) or Path(path).is_file():
                jobs.append((split, path, shard.samples, info.num_classes, info.num_attributes))
            else:
                report.problems.append(f"shard file not found: {shard.file} (listed in {DATASET_FILE})")
    listed = {name_of(j[1]) for j in jobs}
    local_root = None if is_remote(str(info.root)) else Path(info.root)
    unlisted = sorted(p.name for p in local_root.glob("*.tar") if p.name not in listed) if local_root else []
    if unlisted:
        report.notes.append(f"{len(unlisted)} tar files not in {DATASET_FILE} (ignored): {', '.join(unlisted[:5])}")

    bar = tqdm(total=sum(j[2] for j in jobs), desc="check", unit="img", disable=not progress)
    results: Iterator[ShardCheck]
    pool = None
    if workers > 1 and len(jobs) > 1:
        pool = shard_pool(min(workers, len(jobs)))
        results = pool.imap(check_shard, jobs)
    else:
        results = map(check_shard, jobs)
    try:
        for result in results:
            report.shards.append(result)
            bar.update(result.listed)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    where: dict[str, list[str]] = {}
    counts = Counter(key for checked in report.shards for key in checked.keys)
    for checked in report.shards:
        for key in checked.keys:
            if counts[key] > 1:
                where.setdefault(key, []).append(checked.file)
        checked.keys = []
    for key, files in list(where.items())[:MAX_LISTED]:
        report.problems.append(f"key '{key}' appears {len(files)} times ({', '.join(sorted(set(files)))})")
    if len(where) > MAX_LISTED:
        report.problems += [f"key '{key}' is not unique" for key in list(where)[MAX_LISTED:]]
    return report
