"""An image folder tree (``SRC/<class>/<image>``, as torchvision's ImageFolder reads it) plus a
CSV of attributes into shards.

The CSV's header row names the attributes (its first cell names the key column and is ignored);
each other row is either one image (first cell: its path relative to ``SRC``) or one class
(first cell: the class folder's name), with one value in [0, 1] per attribute. With per-class
rows every image takes its class's row and ``class_attributes`` is the CSV itself; with
per-image rows ``class_attributes`` is the mean over each class's train images.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from eatdist.data.convert.common import (
    ConvertOptions,
    ConvertResult,
    SourceImage,
    class_attribute_means,
    list_images,
    malformed,
    parse_number,
    readable,
    require_dir,
    require_file,
    split_images,
    stratified_split,
    unique_keys,
    write_corpus,
)
from eatdist.errors import DataError, close_matches

HINT = "SRC must hold one folder of images per class"


def read_attribute_csv(path: Path) -> tuple[list[str], list[tuple[int, str, list[float]]]]:
    """Return the attribute names and the rows as (line, first cell, values).

    Raises:
        DataError: naming the line of a row of the wrong length or a value not in [0, 1].
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or len(header) < 2:
                raise DataError(f"{path}: the first row must name the key column and at least one attribute")
            rows: list[tuple[int, str, list[float]]] = []
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue
                line = reader.line_num
                if len(cells) != len(header):
                    raise malformed(path, line, f"expected {len(header)} cells like the header, got {len(cells)}")
                values = [
                    parse_number(path, line, c.strip(), float, f"'{n}'")
                    for n, c in zip(header[1:], cells[1:], strict=True)
                ]
                if any(not 0.0 <= v <= 1.0 for v in values):
                    raise malformed(path, line, "attribute values must be in [0, 1]")
                rows.append((line, cells[0].strip(), values))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    return [readable(name) for name in header[1:]], rows


def _normalise(relpath: str) -> str:
    return Path(relpath.replace("\\", "/")).as_posix().removeprefix("./")


def convert_folder(src: str | Path, attributes_csv: str | Path, opts: ConvertOptions) -> ConvertResult:
    """Convert an image folder tree and its attribute CSV into train / val / test shards, split
    per class (``opts.val_fraction`` and ``opts.test_fraction``, seeded).

    Returns the corpus written. Raises:
        DataError: naming a missing folder or file, an image or class without a row, or the CSV
            line at fault.
    """
    root = require_dir(Path(src), HINT)
    csv_path = require_file(Path(attributes_csv), "the --attributes CSV")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"no class folders in {root} ({HINT})")
    relpaths: list[str] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        found = list_images(root / folder)
        if not found:
            raise DataError(f"no images in {root / folder} (every class folder needs at least one)")
        relpaths += [p.relative_to(root).as_posix() for p in found]
        labels += [label] * len(found)
    attributes, rows = read_attribute_csv(csv_path)

    by_class = all(name in folders for _, name, _ in rows)
    wanted = folders if by_class else relpaths
    index = {name: i for i, name in enumerate(wanted)}
    table: dict[int, list[float]] = {}
    first_line: dict[int, int] = {}
    for line, name, values in rows:
        i = index.get(name if by_class else _normalise(name))
        if i is None:
            hint = close_matches(name, folders) if "/" not in name else ""
            raise malformed(csv_path, line, f"'{name}' is neither a class folder nor an image under {root}{hint}")
        if i in table:
            raise malformed(csv_path, line, f"'{name}' appears twice (first on line {first_line[i]})")
        table[i], first_line[i] = values, line
    if len(table) < len(wanted):
        absent = [name for i, name in enumerate(wanted) if i not in table]
        what = "class" if by_class else "image"
        raise DataError(f"{csv_path}: no row for {what} '{absent[0]}' ({len(absent)} {what}s have none)")

    keys = unique_keys(relpaths)
    images = []
    for i, (key, rel, label) in enumerate(zip(keys, relpaths, labels, strict=True)):
        values = table[label] if by_class else table[i]
        images.append(SourceImage(key, str(root / rel), label, {"class": label, "attributes": values, "source": rel}))
    split_of = stratified_split(labels, {"val": opts.val_fraction, "test": opts.test_fraction}, opts.seed)
    class_attributes = (
        np.round([table[c] for c in range(len(folders))], 4).tolist()
        if by_class
        else class_attribute_means(images, len(folders), len(attributes), split_of)
    )
    return write_corpus(
        split_images(images, split_of),
        opts,
        name=root.name,
        classes=[readable(f) for f in folders],
        attributes=attributes,
        class_attributes=class_attributes,
    )
