"""The SUN Attribute database (Patterson & Hays) into shards.

``images.mat`` lists the images (``a/abbey/sun_aaa.jpg``, under ``SRC/images/``),
``attributes.mat`` the 102 attribute names, ``attributeLabels_continuous.mat`` the per-image
attribute strengths (the share of annotators who saw it, in [0, 1]). The class is the scene
category: the folders between the first-letter folder and the file (``abbey``,
``apartment_building/outdoor``). ``class_attributes`` is the mean over each class's train images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from eatdist.data.convert.common import (
    ConvertOptions,
    ConvertResult,
    SourceImage,
    check_images_exist,
    class_attribute_means,
    readable,
    require_dir,
    require_file,
    split_images,
    stratified_split,
    unique_keys,
    write_corpus,
)
from eatdist.errors import DataError

HINT = (
    "SRC must hold images.mat, attributes.mat, attributeLabels_continuous.mat and images/ of the SUN Attribute database"
)


def load_mat_variable(path: Path, variable: str) -> np.ndarray:
    """Return one variable of a MATLAB file.

    Raises:
        DataError: when the file is unreadable, in v7.3 format, or lacks the variable.
    """
    try:
        data = scipy.io.loadmat(str(path))
    except NotImplementedError:
        raise DataError(
            f"{path}: a MATLAB v7.3 file, which scipy cannot read; re-save it with save(..., '-v7')"
        ) from None
    except (ValueError, OSError, TypeError) as exc:
        raise DataError(f"{path}: not a readable .mat file ({exc})") from None
    if variable not in data:
        found = ", ".join(k for k in data if not k.startswith("__")) or "none"
        raise DataError(f"{path}: no variable '{variable}' (found: {found})")
    return data[variable]


def cell_strings(value: np.ndarray, path: Path, variable: str) -> list[str]:
    """Return the strings of a MATLAB cell array (or char matrix) as loaded by scipy.

    Raises:
        DataError: naming the entry that is not a string.
    """
    out: list[str] = []
    for i, item in enumerate(np.asarray(value, dtype=object).ravel()):
        # scipy gives each cell as a 1-element array of str (or an empty array for '').
        while isinstance(item, np.ndarray) and item.size <= 1:
            item = item.ravel()[0] if item.size else ""
        if not isinstance(item, str):
            raise DataError(f"{path}: '{variable}' entry {i + 1} is not a string")
        out.append(item.strip())
    return out


def scene_of(relpath: str) -> str | None:
    """Return the scene folder(s) of ``a/abbey/sun_aaa.jpg`` ("abbey"), or None when there is none."""
    parts = [p for p in relpath.replace("\\", "/").split("/") if p]
    return "/".join(parts[1:-1]) if len(parts) >= 3 else None


def convert_sun(src: str | Path, opts: ConvertOptions) -> ConvertResult:
    """Convert the SUN Attribute database into train / val / test shards, split per class
    (``opts.val_fraction`` and ``opts.test_fraction``, seeded).

    Returns the corpus written. Raises:
        DataError: naming a missing or malformed file (and the entry at fault).
    """
    root = require_dir(Path(src), HINT)
    mats = (
        root if (root / "images.mat").is_file() or not (root / "SUNAttributeDB").is_dir() else root / "SUNAttributeDB"
    )
    images_mat = require_file(mats / "images.mat", HINT)
    attributes_mat = require_file(mats / "attributes.mat", HINT)
    labels_mat = require_file(mats / "attributeLabels_continuous.mat", HINT)
    image_dir = require_dir(root / "images", HINT)

    relpaths = cell_strings(load_mat_variable(images_mat, "images"), images_mat, "images")
    attributes = [
        readable(a) for a in cell_strings(load_mat_variable(attributes_mat, "attributes"), attributes_mat, "attributes")
    ]
    labels_cv = np.asarray(load_mat_variable(labels_mat, "labels_cv"), dtype=np.float64)
    if labels_cv.shape != (len(relpaths), len(attributes)):
        raise DataError(
            f"{labels_mat}: 'labels_cv' is {' x '.join(map(str, labels_cv.shape))}, expected "
            f"{len(relpaths)} x {len(attributes)} (images.mat entries x attributes.mat names)"
        )
    bad = np.nonzero(~np.all((labels_cv >= 0.0) & (labels_cv <= 1.0), axis=1))[0]
    if len(bad):
        raise DataError(f"{labels_mat}: 'labels_cv' row {bad[0] + 1} has values outside [0, 1]")

    scenes: list[str] = []
    for i, relpath in enumerate(relpaths):
        scene = scene_of(relpath)
        if scene is None:
            raise DataError(f"{images_mat}: entry {i + 1} '{relpath}' has no scene folder (expected a/abbey/name.jpg)")
        scenes.append(scene)
    scene_names = sorted(set(scenes))
    class_index = {scene: i for i, scene in enumerate(scene_names)}
    keys = unique_keys(relpaths)
    values = np.round(labels_cv, 4)
    images = [
        SourceImage(
            keys[i],
            str(image_dir / relpath),
            class_index[scenes[i]],
            {"class": class_index[scenes[i]], "attributes": values[i].tolist(), "source": relpath},
        )
        for i, relpath in enumerate(relpaths)
    ]
    check_images_exist(images, str(images_mat))
    split_of = stratified_split(
        [im.label for im in images], {"val": opts.val_fraction, "test": opts.test_fraction}, opts.seed
    )
    return write_corpus(
        split_images(images, split_of),
        opts,
        name="sun",
        classes=[readable(s.replace("/", " ")) for s in scene_names],
        attributes=attributes,
        class_attributes=class_attribute_means(images, len(scene_names), len(attributes), split_of),
    )
