"""What every converter shares: reading source tables, keys, splits, and writing the shards.

A converter reads its dataset's own files into :class:`SourceImage` records (key, image path,
class, contract-1 ``json``) split into train/val/test, then hands them to :func:`write_corpus`,
which writes the shards in parallel and ``dataset.json`` last.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from eatdist.data.corpus import DATASET_FILE, DatasetInfo, ShardInfo
from eatdist.data.shards import AtomicShardWriter, shard_pool
from eatdist.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Formats kept byte for byte; anything else is re-encoded (contract 1 allows only jpg, png,
# webp). PIL names the JPEG files of many phone cameras "MPO"; their first frame is a plain JPEG.
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
REPORT_FILE = "convert_report.json"
_NOT_KEY_CHAR = re.compile(r"[^A-Za-z0-9_/-]")
_STALE_SHARD = re.compile(r"^(train|val|test)-\d{6}\.tar$")


def default_workers() -> int:
    """Return the default number of converter processes: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class ConvertOptions:
    """Choices every converter shares.

    Raises:
        ConfigError: (on construction) for a shard size, side or fraction out of range.
    """

    out: Path
    shard_size: int = 1000
    max_side: int | None = None
    workers: int = field(default_factory=default_workers)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.max_side is not None and self.max_side < 8:
            raise ConfigError(f"--max-side must be at least 8 pixels, got {self.max_side}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        for name, value in (("--val-fraction", self.val_fraction), ("--test-fraction", self.test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("--val-fraction plus --test-fraction must be below 1")


@dataclass(frozen=True)
class SourceImage:
    """One image to convert: its sample key, file, class and contract-1 ``json`` record.

    Coordinates in ``record`` (``bbox``, ``parts``, ``attr_boxes``) are in the source image's
    pixels; they are rescaled when the image is.
    """

    key: str
    path: str
    label: int
    record: dict[str, Any]


@dataclass
class ConvertResult:
    """The corpus written and the source images left out (path and reason each)."""

    info: DatasetInfo
    skipped: list[dict[str, str]]

    def summary(self) -> str:
        """Return a one-line description of the corpus for people."""
        counts = ", ".join(f"{split} {self.info.num_samples(split)}" for split in self.info.splits)
        skipped = f"; {len(self.skipped)} unreadable images skipped (see {REPORT_FILE})" if self.skipped else ""
        return (
            f"{self.info.name} corpus in {self.info.root}: {self.info.num_classes} classes, "
            f"{self.info.num_attributes} attributes; {counts}{skipped}"
        )


# ----------------------------------------------------------------------------- source files


def require_file(path: Path, hint: str) -> Path:
    """Return ``path`` if it is a file.

    Raises:
        DataError: ``missing <path> (<hint>)`` otherwise.
    """
    if not path.is_file():
        raise DataError(f"missing {path} ({hint})")
    return path


def require_dir(path: Path, hint: str) -> Path:
    """Return ``path`` if it is a folder.

    Raises:
        DataError: ``source folder not found: <path> (<hint>)`` otherwise.
    """
    if not path.is_dir():
        raise DataError(f"source folder not found: {path} ({hint})")
    return path


def malformed(path: Path, line: int, why: str) -> DataError:
    """Return the error for a bad line of a source file (1-based line numbers)."""
    return DataError(f"{path}, line {line}: {why}")


def read_rows(path: Path, min_fields: int, max_fields: int | None = None) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` for each non-blank line, split at whitespace.

    Raises:
        DataError: naming the file and line when a line has too few or too many fields, or the
            file is not UTF-8 text.
    """
    limit = min_fields if max_fields is None else max_fields
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if not min_fields <= len(fields) <= limit:
                    expected = str(min_fields) if limit == min_fields else f"{min_fields} to {limit}"
                    raise malformed(path, number, f"expected {expected} fields, got {len(fields)}")
                yield number, fields
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None


def parse_number(path: Path, line: int, text: str, kind: type[int] | type[float], what: str) -> Any:
    """Return ``text`` as an int or float.

    Raises:
        DataError: naming the file, line and field when it is not a number of that kind.
    """
    try:
        value = kind(text)
    except ValueError:
        raise malformed(
            path, line, f"{what} must be {'an integer' if kind is int else 'a number'}, got '{text}'"
        ) from None
    if kind is float and not np.isfinite(value):
        raise malformed(path, line, f"{what} must be finite, got '{text}'")
    return value


def read_id_names(path: Path) -> dict[int, str]:
    """Read ``<id> <name>`` lines (name may hold spaces) into id → name, in file order.

    Raises:
        DataError: naming the file and line of a malformed or repeated id.
    """
    names: dict[int, str] = {}
    for line, fields in read_rows(path, 2, 10_000):
        ident = parse_number(path, line, fields[0], int, "the id")
        if ident in names:
            raise malformed(path, line, f"id {ident} appears twice")
        names[ident] = " ".join(fields[1:])
    return names


def read_matrix(path: Path, rows: int, cols: int) -> np.ndarray:
    """Read a whitespace-separated ``rows`` × ``cols`` matrix of numbers.

    Raises:
        DataError: naming the file and line of a short row or a non-number, or the row count.
    """
    values: list[list[float]] = []
    for line, fields in read_rows(path, cols):
        values.append([parse_number(path, line, x, float, f"column {i + 1}") for i, x in enumerate(fields)])
    if len(values) != rows:
        raise DataError(f"{path}: expected {rows} rows, got {len(values)}")
    return np.array(values, dtype=np.float64).reshape(rows, cols)


def readable(text: str) -> str:
    """Return a name for people: underscores become spaces, runs of spaces collapse."""
    return " ".join(text.replace("_", " ").split())


def list_images(folder: Path) -> list[Path]:
    """Return the image files under ``folder`` (recursively), sorted, hidden files left out."""
    found = [
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not any(s.startswith(".") for s in p.parts[-2:])
    ]
    return sorted(found)


def check_images_exist(images: Sequence[SourceImage], listed_in: str) -> None:
    """Make sure every image file is there before anything is written.

    Raises:
        DataError: naming the first missing image and how many are missing.
    """
    missing = [im.path for im in images if not os.path.isfile(im.path)]
    if missing:
        more = f"; {len(missing)} of {len(images)} listed images are missing" if len(missing) > 1 else ""
        raise DataError(f"image not found: {missing[0]} (listed in {listed_in}){more}")


# ----------------------------------------------------------------------------- keys and splits


def sample_key(relpath: str) -> str:
    """Return the contract-1 key of an image: its relative path without extension, with every
    character other than letters, digits, ``_``, ``-`` and ``/`` replaced by ``_``."""
    path = Path(relpath)
    stem = path.with_suffix("").as_posix() if path.suffix else path.as_posix()
    return _NOT_KEY_CHAR.sub("_", stem.strip("/")) or "_"


def unique_keys(relpaths: Sequence[str]) -> list[str]:
    """Return one key per path (:func:`sample_key`); clashes get ``_2``, ``_3``... in input order."""
    seen: set[str] = set()
    keys: list[str] = []
    for relpath in relpaths:
        base = key = sample_key(relpath)
        n = 1
        while key in seen:
            n += 1
            key = f"{base}_{n}"
        seen.add(key)
        keys.append(key)
    return keys


def stratified_split(labels: Sequence[int], fractions: dict[str, float], seed: int, rest: str = "train") -> list[str]:
    """Assign each item a split, class by class: a seeded share of each class goes to each split
    named in ``fractions`` (rounded), the remainder to ``rest``.

    Returns the split name of each item, in input order. The same labels and seed always give
    the same assignment; a class keeps at least one item in ``rest``.
    """
    assigned = [rest] * len(labels)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    for label in sorted(by_class):
        members = by_class[label]
        order = np.random.default_rng([seed, label]).permutation(len(members))
        start = 0
        for split, fraction in fractions.items():
            count = min(int(fraction * len(members) + 0.5), len(members) - 1 - start)
            for j in order[start : start + max(0, count)]:
                assigned[members[j]] = split
            start += max(0, count)
    return assigned


def class_attribute_means(
    images: Sequence[SourceImage], num_classes: int, num_attributes: int, split_of: Sequence[str]
) -> list[list[float]]:
    """Return the C × A mean of the train images' attributes, per class (0 for a class without
    train images). Train only, so the matrix says nothing about val or test."""
    sums = np.zeros((num_classes, num_attributes))
    counts = np.zeros(num_classes)
    for image, split in zip(images, split_of, strict=True):
        if split == "train":
            sums[image.label] += image.record["attributes"]
            counts[image.label] += 1
    means = sums / np.maximum(counts, 1)[:, None]
    return np.round(means, 4).tolist()


# ----------------------------------------------------------------------------- images


class UnreadableImage(ValueError):
    """A source image that cannot be read or decoded; the message says why."""


def load_image(path: str, max_side: int | None) -> tuple[str, bytes, float, float]:
    """Return ``(extension, bytes, x scale, y scale)`` for a source image.

    The original bytes are kept when the format is JPEG, PNG or WebP and the image is within
    ``max_side``; larger images are resized to fit and re-encoded as JPEG, other formats as PNG.
    Every image is decoded once here, so a broken file is found now, not in training.

    Raises:
        UnreadableImage: when the file cannot be read or decoded.
    """
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt, (width, height) = img.format, img.size
            if max_side is not None and max(width, height) > max_side:
                scale = max_side / max(width, height)
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                small = img.convert("RGB").resize(size, Image.Resampling.LANCZOS)
                return "jpg", _encode(small, "JPEG"), size[0] / width, size[1] / height
            if fmt in KEPT_FORMATS:
                return KEPT_FORMATS[fmt], data, 1.0, 1.0
            return "png", _encode(img.convert("RGBA" if "A" in img.getbands() else "RGB"), "PNG"), 1.0, 1.0
    except Exception as exc:  # PIL raises many types for broken bytes
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def scale_record(record: dict[str, Any], sx: float, sy: float) -> dict[str, Any]:
    """Return ``record`` with ``bbox``, ``parts`` and ``attr_boxes`` scaled to a resized image."""
    if sx == 1.0 and sy == 1.0:
        return record

    def box(b: list[float]) -> list[float]:
        return [round(b[0] * sx, 2), round(b[1] * sy, 2), round(b[2] * sx, 2), round(b[3] * sy, 2)]

    out = dict(record)
    if "bbox" in out:
        out["bbox"] = box(out["bbox"])
    if "parts" in out:
        out["parts"] = {k: [round(x * sx, 2), round(y * sy, 2)] for k, (x, y) in out["parts"].items()}
    if "attr_boxes" in out:
        out["attr_boxes"] = {k: box(b) for k, b in out["attr_boxes"].items()}
    return out


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _ShardJob:
    path: str
    images: list[SourceImage]
    max_side: int | None


def _write_shard(job: _ShardJob) -> tuple[int, list[dict[str, str]]]:
    skipped: list[dict[str, str]] = []
    try:
        with AtomicShardWriter(job.path) as writer:
            for image in job.images:
                try:
                    ext, data, sx, sy = load_image(image.path, job.max_side)
                except UnreadableImage as exc:
                    skipped.append({"path": image.path, "key": image.key, "reason": str(exc)})
                    continue
                record = json.dumps(scale_record(image.record, sx, sy), separators=(",", ":"))
                writer.write({"__key__": image.key, ext: data, "json": record.encode()})
            count = writer.count
    except OSError as exc:
        raise DataError(f"cannot write {job.path}: {exc.strerror or exc}") from None
    return count, skipped


def _shard_plan(images_by_split: dict[str, list[SourceImage]], opts: ConvertOptions) -> dict[str, list[_ShardJob]]:
    plan: dict[str, list[_ShardJob]] = {}
    for split, images in images_by_split.items():
        # Sorted then shuffled with a seed: the shards do not depend on the order the source
        # listed its images, and a shard holds many classes (the train stream only shuffles
        # within a bounded buffer).
        ordered = sorted(images, key=lambda im: im.key)
        perm = np.random.default_rng([opts.seed, zlib.crc32(split.encode())]).permutation(len(ordered))
        ordered = [ordered[i] for i in perm]
        plan[split] = [
            _ShardJob(str(opts.out / f"{split}-{n:06d}.tar"), ordered[start : start + opts.shard_size], opts.max_side)
            for n, start in enumerate(range(0, len(ordered), opts.shard_size))
        ]
    return plan


def _remove_stale_shards(out: Path, keep: set[str]) -> None:
    # A previous conversion into the same folder may have written more shards than this one.
    for path in out.iterdir():
        if _STALE_SHARD.match(path.name) and path.name not in keep:
            path.unlink()


def write_corpus(
    images_by_split: dict[str, list[SourceImage]],
    opts: ConvertOptions,
    *,
    name: str,
    classes: list[str],
    attributes: list[str],
    attribute_groups: dict[str, list[int]] | None = None,
    class_attributes: list[list[float]] | None = None,
) -> ConvertResult:
    """Write the shards of every split in parallel, then ``dataset.json`` and ``convert_report.json``.

    The same images and options always give the same shards. Images that cannot be decoded are
    left out, counted in ``dataset.json``'s sample counts, and listed in the report.

    Returns the corpus description and the skipped images. Raises:
        DataError: when keys are not unique or the output folder cannot be written.
    """
    keys = [im.key for images in images_by_split.values() for im in images]
    if len(set(keys)) != len(keys):
        raise DataError("converter produced duplicate sample keys (a bug: keys must be unique)")
    try:
        opts.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create output folder {opts.out}: {exc.strerror}") from None
    # An interrupted run must not leave the previous dataset.json describing half-new shards.
    (opts.out / DATASET_FILE).unlink(missing_ok=True)
    plan = _shard_plan(images_by_split, opts)
    jobs = [job for split_jobs in plan.values() for job in split_jobs]
    _remove_stale_shards(opts.out, {Path(job.path).name for job in jobs})
    counts: dict[str, int] = {}
    skipped: list[dict[str, str]] = []
    bar = tqdm(total=len(keys), desc=f"convert {name}", unit="img", disable=not opts.progress)
    results: Iterator[tuple[int, list[dict[str, str]]]]
    pool = None
    if opts.workers > 1 and len(jobs) > 1:
        pool = shard_pool(min(opts.workers, len(jobs)))
        results = pool.imap(_write_shard, jobs)
    else:
        results = map(_write_shard, jobs)
    try:
        for job, (count, job_skipped) in zip(jobs, results, strict=True):
            counts[job.path] = count
            skipped.extend(job_skipped)
            bar.update(len(job.images))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    for item in skipped[:10]:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    splits = {
        split: [ShardInfo(Path(j.path).name, counts[j.path]) for j in split_jobs] for split, split_jobs in plan.items()
    }
    info = DatasetInfo(
        name=name,
        classes=classes,
        attributes=attributes,
        splits=splits,
        attribute_groups=attribute_groups or {},
        class_attributes=class_attributes,
        root=opts.out,
    )
    info.save(opts.out)
    report = {"samples": {s: info.num_samples(s) for s in splits}, "skipped": skipped}
    (opts.out / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return ConvertResult(info, skipped)


def split_images(images: Sequence[SourceImage], split_of: Sequence[str]) -> dict[str, list[SourceImage]]:
    """Return the images grouped by split, train/val/test first and in that order."""
    grouped: dict[str, list[SourceImage]] = {s: [] for s in SPLITS}
    for image, split in zip(images, split_of, strict=True):
        grouped.setdefault(split, []).append(image)
    return grouped
