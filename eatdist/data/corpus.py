"""``dataset.json``: the description of a corpus of WebDataset shards (contract 1)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eatdist.errors import DataError, close_matches

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
    root: Path = Path(".")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_attributes(self) -> int:
        return len(self.attributes)

    def shards(self, split: str) -> list[ShardInfo]:
        """Return the shards of ``split``.

        Raises:
            DataError: when the corpus has no such split.
        """
        if split not in self.splits:
            raise DataError(
                f"{self.root / DATASET_FILE}: no split '{split}'"
                f"{close_matches(split, list(self.splits))}; splits: {', '.join(self.splits)}"
            )
        return self.splits[split]

    def shard_paths(self, split: str, check: bool = True) -> list[str]:
        """Return the shard paths of ``split``; with ``check``, every file must exist.

        Raises:
            DataError: naming the first missing shard file.
        """
        paths = [str(self.root / s.file) for s in self.shards(split)]
        if check:
            for p in paths:
                if not Path(p).is_file():
                    raise DataError(f"shard file not found: {p} (listed in {self.root / DATASET_FILE})")
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
        """Write ``dataset.json`` into ``root`` and return its path."""
        path = Path(root) / DATASET_FILE
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path


def _require(data: dict[str, Any], key: str, kind: type, where: Path) -> Any:
    if key not in data:
        raise DataError(f"{where}: missing key '{key}'")
    if not isinstance(data[key], kind):
        raise DataError(f"{where}: '{key}' must be a {kind.__name__}")
    return data[key]


def load_dataset_info(root: str | Path) -> DatasetInfo:
    """Read ``root/dataset.json`` (``root`` may also be the file itself).

    Raises:
        DataError: when the file is missing, not JSON, or does not follow contract 1.
    """
    path = Path(root)
    if path.is_dir() or not path.name.endswith(".json"):
        path = path / DATASET_FILE
    if not path.is_file():
        raise DataError(
            f"no {DATASET_FILE} found at {path} (is this a corpus folder? run 'eatdist synth' or 'eatdist convert')"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    classes = _require(data, "classes", list, path)
    attributes = _require(data, "attributes", list, path)
    raw_splits = _require(data, "splits", dict, path)
    splits: dict[str, list[ShardInfo]] = {}
    for split, shards in raw_splits.items():
        try:
            splits[split] = [ShardInfo(str(s["file"]), int(s["samples"])) for s in shards]
        except (KeyError, TypeError, ValueError):
            raise DataError(f'{path}: split \'{split}\' must list {{"file", "samples"}} entries') from None
    class_attributes = data.get("class_attributes")
    if class_attributes is not None and (
        len(class_attributes) != len(classes) or any(len(row) != len(attributes) for row in class_attributes)
    ):
        raise DataError(f"{path}: class_attributes must be {len(classes)} x {len(attributes)}")
    return DatasetInfo(
        name=str(data.get("name", path.parent.name)),
        classes=[str(c) for c in classes],
        attributes=[str(a) for a in attributes],
        splits=splits,
        attribute_groups={k: [int(i) for i in v] for k, v in data.get("attribute_groups", {}).items()},
        class_attributes=class_attributes,
        root=path.parent,
    )
