"""Animals with Attributes 2 (``AwA2-data.zip``, unpacked as ``Animals_with_Attributes2/``) into shards.

Attributes are class-level: every image takes its class's row of ``predicate-matrix-binary.txt``;
``class_attributes`` is ``predicate-matrix-continuous.txt`` / 100. The split is a seeded random
split per class: the official lists are zero-shot splits (disjoint classes), not what a
classifier trains on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eatdist.data.convert.common import (
    ConvertOptions,
    ConvertResult,
    SourceImage,
    list_images,
    read_id_names,
    read_matrix,
    readable,
    require_dir,
    require_file,
    split_images,
    stratified_split,
    unique_keys,
    write_corpus,
)
from eatdist.errors import DataError

HINT = "SRC must be the Animals_with_Attributes2 folder unpacked from AwA2-data.zip"


def convert_awa2(src: str | Path, opts: ConvertOptions) -> ConvertResult:
    """Convert AwA2 into train / val / test shards, split per class (``opts.val_fraction`` and
    ``opts.test_fraction``, seeded).

    Returns the corpus written. Raises:
        DataError: naming a missing file or class folder, or the file and line of a malformed file.
    """
    root = require_dir(Path(src), HINT)
    if not (root / "classes.txt").is_file() and (root / "Animals_with_Attributes2").is_dir():
        root = root / "Animals_with_Attributes2"
    class_ids = read_id_names(require_file(root / "classes.txt", HINT))
    predicate_ids = read_id_names(require_file(root / "predicates.txt", HINT))
    binary_path = require_file(root / "predicate-matrix-binary.txt", HINT)
    continuous_path = require_file(root / "predicate-matrix-continuous.txt", HINT)
    image_root = require_dir(root / "JPEGImages", HINT)
    folders = [class_ids[i] for i in sorted(class_ids)]
    binary = read_matrix(binary_path, len(folders), len(predicate_ids))
    if not np.isin(binary, (0.0, 1.0)).all():
        row = int(np.nonzero(~np.isin(binary, (0.0, 1.0)).all(axis=1))[0][0])
        raise DataError(f"{binary_path}: row {row + 1} holds values other than 0 and 1")
    continuous = read_matrix(continuous_path, len(folders), len(predicate_ids))

    relpaths: list[str] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        class_dir = require_dir(image_root / folder, f"the image folder of class '{folder}' in classes.txt")
        found = list_images(class_dir)
        if not found:
            raise DataError(f"no images in {class_dir} (class '{folder}' in classes.txt)")
        relpaths += [p.relative_to(image_root).as_posix() for p in found]
        labels += [label] * len(found)
    keys = unique_keys(relpaths)
    rows = binary.tolist()
    images = [
        SourceImage(key, str(image_root / rel), label, {"class": label, "attributes": rows[label], "source": rel})
        for key, rel, label in zip(keys, relpaths, labels, strict=True)
    ]
    split_of = stratified_split(labels, {"val": opts.val_fraction, "test": opts.test_fraction}, opts.seed)
    return write_corpus(
        split_images(images, split_of),
        opts,
        name="awa2",
        classes=[readable(f.replace("+", " ")) for f in folders],
        attributes=[readable(predicate_ids[i]) for i in sorted(predicate_ids)],
        class_attributes=np.round(np.clip(continuous / 100.0, 0.0, 1.0), 4).tolist(),
    )
