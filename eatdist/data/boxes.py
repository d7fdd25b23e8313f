"""Attribute boxes for training (``loss.localisation_weight``): read, scaled, augmented with the image.

A record's optional ``attr_boxes`` (contract 1: ``{attribute index: [x0, y0, x1, y1]}`` in the
stored image's pixels) says where each attribute the image shows is. For the localisation loss
the boxes travel with their image through the training transform (torchvision's v2 transforms
move ``BoundingBoxes`` exactly as they crop, resize and flip the pixels, from the same random
draw) and leave the loader in the model input's frame, as fractions of its side.

A box that is malformed, empty or cropped away counts as absent: the attribute's entry gets no
localisation loss, its class and attribute labels still train. ``eatdist check`` reports
malformed boxes.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torchvision import tv_tensors


def record_boxes(sample: dict[str, Any], num_attributes: int) -> dict[int, list[float]]:
    """Return the well-formed, non-empty ``attr_boxes`` of the sample's record, by attribute index."""
    try:
        boxes = json.loads(sample["json"]).get("attr_boxes")
    except (KeyError, ValueError, AttributeError, UnicodeDecodeError):
        return {}
    if not isinstance(boxes, dict):
        return {}
    found = {}
    for key, box in boxes.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < num_attributes):
            continue
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            continue
        x0, y0, x1, y1 = (float(v) for v in box)
        if x1 > x0 and y1 > y0:
            found[int(key)] = [x0, y0, x1, y1]
    return found


def to_decoded(
    boxes: dict[int, list[float]], num_attributes: int, stored: tuple[int, int], decoded: tuple[int, int]
) -> tv_tensors.BoundingBoxes:
    """Return all attributes' boxes (zeros where absent) in the decoded image's pixels.

    ``stored`` is the (width, height) the record's coordinates refer to, ``decoded`` the
    (height, width) of the tensor the decoder gave (smaller for a JPEG decoded reduced).
    """
    sx, sy = decoded[1] / stored[0], decoded[0] / stored[1]
    rows = [[0.0] * 4] * num_attributes
    for index, (x0, y0, x1, y1) in boxes.items():
        rows[index] = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
    return tv_tensors.BoundingBoxes(torch.tensor(rows), format="XYXY", canvas_size=decoded)


def as_fractions(boxes: torch.Tensor, size: int) -> tuple[list[list[float]], list[float]]:
    """Return ``[A, 4]`` transformed boxes as fractions of the model input's side, and 1/0 per box kept."""
    frac = (boxes.as_subclass(torch.Tensor).float() / size).clamp(0.0, 1.0)
    kept = ((frac[:, 2] > frac[:, 0]) & (frac[:, 3] > frac[:, 1])).float()
    return frac.tolist(), kept.tolist()
