"""CUB-200-2011 (Caltech-UCSD Birds), as unpacked from ``CUB_200_2011.tgz``, into shards.

Each sample's ``json`` carries the class, the 312 per-image attribute labels with ``attr_mask``,
the bounding box and the visible part locations; ``dataset.json`` carries readable attribute
names ("bill shape: curved (up or down)"), groups by part ("bill shape" → indices) and the
class × attribute matrix (the continuous class labels / 100).

Per-image labels: by default an attribute is 1 when the annotator marked it present, else 0.
With ``certainty=True`` the annotator's certainty weighs the label: "not visible" (1) is masked
out (``attr_mask`` 0), and "guessing" (2), "probably" (3), "definitely" (4) give 0.75, 0.9, 1.0
when present and 0.25, 0.1, 0.0 when absent. An attribute never annotated for an image is masked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from eatdist.data.convert.common import (
    ConvertOptions,
    ConvertResult,
    SourceImage,
    check_images_exist,
    malformed,
    parse_number,
    read_id_names,
    read_matrix,
    read_rows,
    readable,
    require_dir,
    require_file,
    split_images,
    stratified_split,
    unique_keys,
    write_corpus,
)
from eatdist.errors import ConfigError, DataError

log = logging.getLogger(__name__)
HINT = "SRC must be the CUB_200_2011 folder unpacked from CUB_200_2011.tgz"
# Label weight per certainty id when present; absent gets 1 - weight; None masks the label out.
CERTAINTY_WEIGHTS: dict[int, float | None] = {1: None, 2: 0.75, 3: 0.9, 4: 1.0}
AttrSubset = Literal["all", "common"]


def find_root(src: Path) -> Path:
    """Return the ``CUB_200_2011`` folder: ``src`` itself, or the one inside it.

    Raises:
        DataError: when ``src`` is not a folder.
    """
    require_dir(src, HINT)
    inner = src / "CUB_200_2011"
    if not (src / "images.txt").is_file() and (inner / "images.txt").is_file():
        return inner
    return src


def find_attribute_names(root: Path) -> Path:
    """Return the attribute names file: beside ``CUB_200_2011/`` in the official archive, or inside.

    Raises:
        DataError: naming the expected place when neither exists.
    """
    candidates = [root.parent / "attributes.txt", root / "attributes" / "attributes.txt", root / "attributes.txt"]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(
        f"missing {candidates[0]} (the attribute names, beside CUB_200_2011/ in the official archive; "
        f"also looked for {candidates[1]})"
    )


def attribute_name_and_group(raw: str) -> tuple[str, str]:
    """Return (readable name, group) for ``has_bill_shape::curved_(up_or_down)``:
    ("bill shape: curved (up or down)", "bill shape")."""
    prefix, _, value = raw.partition("::")
    group = readable(prefix.removeprefix("has_"))
    return (f"{group}: {readable(value)}" if value else group), group


def class_display_name(raw: str) -> str:
    """Return "Black footed Albatross" for ``001.Black_footed_Albatross``."""
    number, dot, name = raw.partition(".")
    return readable(name) if dot and number.isdigit() else readable(raw)


def _per_image_rows(path: Path, image_ids: dict[int, int], fields: int) -> dict[int, tuple[int, list[str]]]:
    """Return image row → (line, fields) of a one-line-per-image file; every image must appear."""
    rows: dict[int, tuple[int, list[str]]] = {}
    for line, values in read_rows(path, fields):
        ident = parse_number(path, line, values[0], int, "the image id")
        if ident not in image_ids:
            raise malformed(path, line, f"unknown image id {ident} (not in images.txt)")
        rows[image_ids[ident]] = (line, values[1:])
    if len(rows) < len(image_ids):
        first = next(ident for ident, row in image_ids.items() if row not in rows)
        raise DataError(f"{path}: no line for image {first} ({len(image_ids) - len(rows)} images missing)")
    return rows


def read_image_attributes(
    path: Path, image_ids: dict[int, int], attr_ids: dict[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Return (is_present, certainty) as image × attribute int8 arrays; -1 / 0 where not annotated.

    Raises:
        DataError: naming the line of a short line, a non-integer or an unknown id.
    """
    log.info("reading %s", path)
    present = np.full((len(image_ids), len(attr_ids)), -1, dtype=np.int8)
    certainty = np.zeros((len(image_ids), len(attr_ids)), dtype=np.int8)
    # A few lines of the official file carry an extra field before the time
    # ("2275 8 0 1 0 14.117"): the first four fields still hold, the time is the last.
    for line, f in read_rows(path, 5, 16):
        try:
            image, attr, is_present, cert = int(f[0]), int(f[1]), int(f[2]), int(f[3])
        except ValueError:
            raise malformed(path, line, "image id, attribute id, is_present and certainty must be integers") from None
        row, col = image_ids.get(image), attr_ids.get(attr)
        if row is None:
            raise malformed(path, line, f"unknown image id {image} (not in images.txt)")
        if col is None:
            raise malformed(path, line, f"unknown attribute id {attr} (not in attributes.txt)")
        if is_present not in (0, 1) or cert not in CERTAINTY_WEIGHTS:
            raise malformed(path, line, f"is_present must be 0 or 1 and certainty 1 to 4, got {is_present} {cert}")
        present[row, col] = is_present
        certainty[row, col] = cert
    return present, certainty


def attribute_labels(present: np.ndarray, certainty: np.ndarray, weighted: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels in [0, 1], mask) per image and attribute (the scheme in the module doc)."""
    mask = present >= 0
    if weighted:
        weight_of = np.array([0.0] + [w or 0.0 for w in CERTAINTY_WEIGHTS.values()])
        weight = weight_of[certainty]
        values = np.where(present == 1, weight, 1.0 - weight)
        mask &= certainty != 1
    else:
        values = (present == 1).astype(np.float64)
    return np.round(np.where(mask, values, 0.0), 4), mask


def common_attributes(present: np.ndarray, labels: np.ndarray, num_classes: int, min_classes: int) -> list[int]:
    """Return the attributes present, by majority over a class's images, in at least
    ``min_classes`` classes (the 112-attribute subset of Koh et al. 2020 on CUB's train split).

    Raises:
        ConfigError: when no attribute qualifies.
    """
    votes = np.zeros(present.shape[1], dtype=np.int64)
    for c in range(num_classes):
        rows = present[labels == c]
        annotated = (rows >= 0).sum(axis=0)
        votes += (rows == 1).sum(axis=0) > annotated / 2
    keep = [int(a) for a in np.nonzero(votes >= min_classes)[0]]
    if not keep:
        raise ConfigError(f"--attr-subset common: no attribute is present in at least {min_classes} classes")
    return keep


FILES = (
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "classes.txt",
    "bounding_boxes.txt",
    "parts/parts.txt",
    "parts/part_locs.txt",
    "attributes/image_attribute_labels.txt",
    "attributes/class_attribute_labels_continuous.txt",
)


@dataclass
class CubSource:
    """The annotations of CUB-200-2011, one row per image in ``images.txt`` order."""

    root: Path
    image_ids: list[int]
    relpaths: list[str]
    classes: list[str]
    labels: np.ndarray
    is_train: np.ndarray
    boxes: list[list[float]]
    parts: list[dict[str, list[float]]]
    attribute_names: list[str]
    present: np.ndarray
    certainty: np.ndarray
    continuous: np.ndarray


def _read_classes(need: dict[str, Path], image_ids: dict[int, int]) -> tuple[list[str], np.ndarray]:
    class_ids = read_id_names(need["classes.txt"])
    class_index = {ident: i for i, ident in enumerate(sorted(class_ids))}
    labels = np.zeros(len(image_ids), dtype=np.int64)
    path = need["image_class_labels.txt"]
    for row, (line, (value,)) in _per_image_rows(path, image_ids, 2).items():
        ident = parse_number(path, line, value, int, "the class id")
        if ident not in class_index:
            raise malformed(path, line, f"unknown class id {ident} (not in classes.txt)")
        labels[row] = class_index[ident]
    return [class_display_name(class_ids[ident]) for ident in sorted(class_ids)], labels


def _read_split(path: Path, image_ids: dict[int, int]) -> np.ndarray:
    is_train = np.zeros(len(image_ids), dtype=bool)
    for row, (line, (value,)) in _per_image_rows(path, image_ids, 2).items():
        if value not in ("0", "1"):
            raise malformed(path, line, f"is_training_image must be 0 or 1, got '{value}'")
        is_train[row] = value == "1"
    return is_train


def _read_boxes(path: Path, image_ids: dict[int, int]) -> list[list[float]]:
    boxes: list[list[float]] = [[] for _ in image_ids]
    for row, (line, fields) in _per_image_rows(path, image_ids, 5).items():
        x, y, w, h = (parse_number(path, line, v, float, "the box") for v in fields)
        boxes[row] = [x, y, x + w, y + h]
    return boxes


def _read_parts(names_path: Path, path: Path, image_ids: dict[int, int]) -> list[dict[str, list[float]]]:
    part_names = {ident: readable(name) for ident, name in read_id_names(names_path).items()}
    parts: list[dict[str, list[float]]] = [{} for _ in image_ids]
    for line, fields in read_rows(path, 5):
        image, part, visible = (parse_number(path, line, fields[i], int, "an id or flag") for i in (0, 1, 4))
        if image not in image_ids or part not in part_names:
            raise malformed(path, line, f"unknown image id {image} or part id {part}")
        if visible == 1:
            xy = [parse_number(path, line, v, float, "a coordinate") for v in fields[2:4]]
            parts[image_ids[image]][part_names[part]] = xy
    return parts


def read_cub(src: str | Path) -> CubSource:
    """Read every annotation file of CUB-200-2011 (``src`` is ``CUB_200_2011/`` or its parent).

    Returns the annotations. Raises:
        DataError: naming a missing file, or the file and line of a malformed one.
    """
    root = find_root(Path(src))
    need = {name: require_file(root / name, HINT) for name in FILES}
    names_path = find_attribute_names(root)
    relpaths = read_id_names(need["images.txt"])
    image_ids = {ident: row for row, ident in enumerate(relpaths)}
    classes, labels = _read_classes(need, image_ids)
    raw_names = read_id_names(names_path)
    attr_order = sorted(raw_names)
    continuous_path = need["attributes/class_attribute_labels_continuous.txt"]
    # The small files first, so a mistake in one shows before the long read of the labels.
    is_train = _read_split(need["train_test_split.txt"], image_ids)
    boxes = _read_boxes(need["bounding_boxes.txt"], image_ids)
    parts = _read_parts(need["parts/parts.txt"], need["parts/part_locs.txt"], image_ids)
    continuous = read_matrix(continuous_path, len(classes), len(attr_order))
    attr_ids = {ident: col for col, ident in enumerate(attr_order)}
    present, certainty = read_image_attributes(need["attributes/image_attribute_labels.txt"], image_ids, attr_ids)
    return CubSource(
        root=root,
        image_ids=list(relpaths),
        relpaths=list(relpaths.values()),
        classes=classes,
        labels=labels,
        is_train=is_train,
        boxes=boxes,
        parts=parts,
        attribute_names=[raw_names[ident] for ident in attr_order],
        present=present,
        certainty=certainty,
        continuous=continuous,
    )


def convert_cub(
    src: str | Path,
    opts: ConvertOptions,
    *,
    certainty: bool = False,
    attr_subset: AttrSubset = "all",
    min_classes: int = 10,
) -> ConvertResult:
    """Convert CUB-200-2011 into train / val / test shards; val is carved from the official train
    split (``opts.val_fraction`` of each class, seeded), test is the official test split.

    Returns the corpus written. Raises:
        DataError: naming a missing file, or the file and line of a malformed one.
        ConfigError: for an attribute subset that leaves no attribute.
    """
    cub = read_cub(src)
    values, mask = attribute_labels(cub.present, cub.certainty, certainty)
    keep = list(range(len(cub.attribute_names)))
    if attr_subset == "common":
        keep = common_attributes(cub.present[cub.is_train], cub.labels[cub.is_train], len(cub.classes), min_classes)
    attributes: list[str] = []
    groups: dict[str, list[int]] = {}
    for index, col in enumerate(keep):
        name, group = attribute_name_and_group(cub.attribute_names[col])
        attributes.append(name)
        groups.setdefault(group, []).append(index)

    keys = unique_keys(cub.relpaths)
    images: list[SourceImage] = []
    for row, (ident, relpath) in enumerate(zip(cub.image_ids, cub.relpaths, strict=True)):
        record = {
            "class": int(cub.labels[row]),
            "attributes": values[row, keep].tolist(),
            "attr_mask": mask[row, keep].astype(int).tolist(),
            "bbox": cub.boxes[row],
            "parts": cub.parts[row],
            "source": relpath,
            "image_id": ident,
        }
        images.append(SourceImage(keys[row], str(cub.root / "images" / relpath), int(cub.labels[row]), record))
    check_images_exist(images, str(cub.root / "images.txt"))

    train_rows = np.nonzero(cub.is_train)[0]
    carved = stratified_split(cub.labels[train_rows].tolist(), {"val": opts.val_fraction}, opts.seed)
    split_of = ["test"] * len(images)
    for row, split in zip(train_rows.tolist(), carved, strict=True):
        split_of[row] = split
    return write_corpus(
        split_images(images, split_of),
        opts,
        name="cub",
        classes=cub.classes,
        attributes=attributes,
        attribute_groups=groups,
        class_attributes=np.round(np.clip(cub.continuous[:, keep] / 100.0, 0.0, 1.0), 4).tolist(),
    )
