"""``dataset.json``: the description of a corpus of WebDataset shards (contract 1).

A corpus root is a local folder or a URL (``https://``, ``s3://``, ``gs://``, ``pipe:CMD``, see
:mod:`eatdist.data.remote`); each shard ``file`` is relative to it, absolute, or a URL.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eatdist.data.remote import DEFAULT_RETRIES, is_pipe, is_remote, join, read_bytes, redact, with_retries
from eatdist.data.shardindex import load_index
from eatdist.errors import DataError, close_matches

log = logging.getLogger(__name__)

DATASET_FILE = "dataset.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard of a split and the number of samples it holds."""

    file: str
    samples: int


@dataclass
class DatasetInfo:
    """Names and shard plan of a corpus, read before any shard is opened."""

    name: str
    classes: list[str]
    attributes: list[str]
    splits: dict[str, list[ShardInfo]]
    attribute_groups: dict[str, list[int]] = field(default_factory=dict)
    class_attributes: list[list[float]] | None = None
    # A local folder (a Path, as it always was) or the URL of a remote corpus (a str).
    root: str | Path = Path(".")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_attributes(self) -> int:
        return len(self.attributes)

    @property
    def source(self) -> str:
        """Return where ``dataset.json`` was read, for messages (credentials stripped)."""
        return redact(str(self.root) if is_pipe(str(self.root)) else join(self.root, DATASET_FILE))

    def location(self, file: str) -> str:
        """Return the path or URL of a shard ``file`` listed in ``dataset.json``."""
        return join(self.root, file)

    def shards(self, split: str) -> list[ShardInfo]:
        """Return the shards of ``split``.

        Raises:
            DataError: when the corpus has no such split.
        """
        if split not in self.splits:
            raise DataError(
                f"{self.source}: no split '{split}'"
                f"{close_matches(split, list(self.splits))}; splits: {', '.join(self.splits)}"
            )
        return self.splits[split]

    def shard_paths(self, split: str, check: bool = True) -> list[str]:
        """Return the shard paths (or URLs) of ``split``.

        With ``check``, every local shard must exist, and a local shard holding another number of
        samples than ``dataset.json`` lists is warned about (counted from its index, built and
        cached when missing). Remote shards are not touched here, so a corpus of 10k shards starts
        without 10k requests: a missing one is reported by name when it is read, and a wrong count
        when its index is read or by ``eatdist check``. Raises:
            DataError: naming the first missing local shard file.
        """
        shards = self.shards(split)
        paths = [self.location(s.file) for s in shards]
        if check:
            for shard, p in zip(shards, paths, strict=True):
                if is_remote(p):
                    continue
                if not Path(p).is_file():
                    raise DataError(f"shard file not found: {p} (listed in {self.source})")
                index = load_index(p)
                if index is not None and index.count != shard.samples:
                    log.warning("shard %s holds %d samples, %s lists %d", p, index.count, DATASET_FILE, shard.samples)
        return paths

    def num_samples(self, split: str) -> int:
        return sum(s.samples for s in self.shards(split))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "classes": self.classes,
            "attributes": self.attributes,
            "attribute_groups": self.attribute_groups,
        }
        if self.class_attributes is not None:
            out["class_attributes"] = self.class_attributes
        out["splits"] = {
            split: [{"file": s.file, "samples": s.samples} for s in shards] for split, shards in self.splits.items()
        }
        return out

    def save(self, root: str | Path) -> Path:
        """Write ``dataset.json`` into the local folder ``root`` and return its path.

        Raises:
            DataError: when ``root`` is a URL (write the corpus locally, then upload it).
        """
        if is_remote(str(root)):
            raise DataError(f"cannot write {DATASET_FILE} to {redact(str(root))}: write it locally, then upload it")
        path = Path(root) / DATASET_FILE
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path


def _require(data: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise DataError(f"{where}: missing key '{key}'")
    if not isinstance(data[key], kind):
        raise DataError(f"{where}: '{key}' must be a {kind.__name__}")
    return data[key]


def _read_remote(root: str, retries: int) -> tuple[bytes, str, str]:
    """Return (``dataset.json`` bytes, the corpus root, a default name) for a URL or ``pipe:`` root."""
    if is_pipe(root):
        url, corpus_root = root, root
    else:
        base = root.split("?", 1)[0]
        url = root if base.endswith(".json") else join(root, DATASET_FILE)
        corpus_root = url.split("?", 1)[0].rsplit("/", 1)[0] + (f"?{url.split('?', 1)[1]}" if "?" in url else "")

    def fetch() -> bytes | None:
        try:
            return read_bytes(url)
        except FileNotFoundError:
            return None

    data = with_retries(url, fetch, retries)
    if not data:
        raise DataError(f"no {DATASET_FILE} found at {redact(url)} (is this a corpus? check the URL)")
    name = corpus_root.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] if not is_pipe(root) else "corpus"
    return data, corpus_root, name


def load_dataset_info(root: str | Path, retries: int | None = None) -> DatasetInfo:
    """Read ``root/dataset.json``: ``root`` is a corpus folder or URL, or the file itself.

    A URL is fetched with ``retries`` retries (default 3); a ``pipe:CMD`` root is a command that
    writes ``dataset.json``. The returned ``DatasetInfo.root`` is a ``Path`` for a local corpus and
    the URL (a ``str``) for a remote one. Raises:
        DataError: when the file is missing or unreadable, not JSON, or does not follow contract 1.
    """
    corpus_root: str | Path
    if is_remote(str(root)):
        raw, corpus_root, default_name = _read_remote(str(root), DEFAULT_RETRIES if retries is None else retries)
        where = redact(str(root) if is_pipe(str(root)) else join(corpus_root, DATASET_FILE))
    else:
        path = Path(str(root).removeprefix("file://"))
        if path.is_dir() or not path.name.endswith(".json"):
            path = path / DATASET_FILE
        if not path.is_file():
            raise DataError(
                f"no {DATASET_FILE} found at {path} (is this a corpus folder? run 'eatdist synth' or 'eatdist convert')"
            )
        raw, corpus_root, default_name, where = path.read_bytes(), path.parent, path.parent.name, str(path)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{where}: not a JSON object")
    classes = _require(data, "classes", list, where)
    attributes = _require(data, "attributes", list, where)
    raw_splits = _require(data, "splits", dict, where)
    splits: dict[str, list[ShardInfo]] = {}
    for split, shards in raw_splits.items():
        try:
            splits[split] = [ShardInfo(str(s["file"]), int(s["samples"])) for s in shards]
        except (KeyError, TypeError, ValueError):
            raise DataError(f'{where}: split \'{split}\' must list {{"file", "samples"}} entries') from None
    class_attributes = data.get("class_attributes")
    if class_attributes is not None and (
        len(class_attributes) != len(classes) or any(len(row) != len(attributes) for row in class_attributes)
    ):
        raise DataError(f"{where}: class_attributes must be {len(classes)} x {len(attributes)}")
    return DatasetInfo(
        name=str(data.get("name", default_name)),
        classes=[str(c) for c in classes],
        attributes=[str(a) for a in attributes],
        splits=splits,
        attribute_groups={k: [int(i) for i in v] for k, v in data.get("attribute_groups", {}).items()},
        class_attributes=class_attributes,
        root=corpus_root,
    )
