"""Scores of an explanation job against the corpus it explained.

Accuracy of the predicted class and attributes, and where the heatmaps look: the share of the
class map's mass on the object's box, and how often its peak falls inside the box (the pointing
game). Attribute maps are scored the same way against each attribute's own box where the corpus
has ``attr_boxes``. These make the EAT claim measurable: an attribute task concentrates the
network's attention on the object.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from eatdist.data.corpus import IMAGE_EXTENSIONS
from eatdist.data.shards import iter_shard
from eatdist.errors import DataError

EVALUATION_FILE = "evaluation.json"


def box_scores(heatmap: np.ndarray, image_size: tuple[int, int], box: list[float]) -> tuple[float, bool] | None:
    """Return (mass inside ``box``, peak inside ``box``) for a map upsampled to the image.

    ``image_size`` is (width, height); ``box`` is [x0, y0, x1, y1] in pixels. None for an
    all-zero map, which points nowhere.
    """
    width, height = image_size
    small = Image.fromarray(np.asarray(heatmap, dtype=np.float32))
    full = np.clip(np.asarray(small.resize((width, height), Image.BILINEAR)), 0.0, None)
    total = float(full.sum())
    if total <= 0.0:
        return None
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(width, max(x1, x0 + 1)), min(height, max(y1, y0 + 1))
    inside = float(full[y0:y1, x0:x1].sum())
    peak_y, peak_x = np.unravel_index(int(full.argmax()), full.shape)
    return inside / total, bool(x0 <= peak_x < x1 and y0 <= peak_y < y1)


@dataclass
class _Tally:
    correct: int = 0
    samples: int = 0
    attr_correct: float = 0.0
    attr_count: float = 0.0
    class_mass: list[float] = field(default_factory=list)
    class_hits: list[bool] = field(default_factory=list)
    attr_mass: list[float] = field(default_factory=list)
    attr_hits: list[bool] = field(default_factory=list)
    box_area: list[float] = field(default_factory=list)
    unmatched: int = 0

    def add_maps(self, scores: tuple[float, bool] | None, mass: list[float], hits: list[bool]) -> None:
        if scores is not None:
            mass.append(scores[0])
            hits.append(scores[1])


def _truth(data_dir: Path, shard_name: str) -> dict[str, dict[str, Any]]:
    path = data_dir / shard_name
    if not path.is_file():
        raise DataError(f"no input shard {path} for explanation shard {shard_name}")
    truth = {}
    for sample in iter_shard(path):
        try:
            record = json.loads(sample["json"])
            ext = next(e for e in IMAGE_EXTENSIONS if e in sample)
            with Image.open(io.BytesIO(sample[ext])) as img:  # reads the header only
                record["_size"] = img.size
        except Exception:  # a sample without labels or image cannot be scored; counted below
            continue
        truth[sample["__key__"]] = record
    return truth


def _mean(values: list[float] | list[bool]) -> float | None:
    return round(float(np.mean(values)), 5) if values else None


def evaluate_explanations(explanations: str | Path, data: str | Path) -> dict[str, Any]:
    """Score every explanation shard in ``explanations`` against the same-named shard in ``data``.

    Returns the metrics (also written to ``explanations/evaluation.json``). Raises:
        DataError: when there are no explanation shards or an input shard is missing.
    """
    out_dir, data_dir = Path(explanations), Path(data)
    shards = sorted(out_dir.glob("*.tar"))
    if not shards:
        raise DataError(f"no explanation shards (*.tar) in {out_dir}")
    t = _Tally()
    for shard in shards:
        truth = _truth(data_dir, shard.name)
        for sample in iter_shard(shard):
            record = truth.get(sample["__key__"])
            if record is None or "class" not in record or "heatmaps.npy" not in sample:
                t.unmatched += 1
                continue
            pred = json.loads(sample["json"])
            maps = np.load(io.BytesIO(sample["heatmaps.npy"]), allow_pickle=False).astype(np.float32)
            t.samples += 1
            t.correct += int(pred["class"] == record["class"])
            attrs = np.asarray(record.get("attributes", []), dtype=np.float32)
            probs = np.asarray(pred.get("attribute_probabilities", []), dtype=np.float32)
            if len(attrs) and len(attrs) == len(probs):
                mask = np.asarray(record.get("attr_mask", np.ones_like(attrs)), dtype=np.float32)
                t.attr_correct += float((((probs > 0.5) == (attrs > 0.5)) * mask).sum())
                t.attr_count += float(mask.sum())
            if "bbox" in record:
                x0, y0, x1, y1 = record["bbox"]
                t.box_area.append((x1 - x0) * (y1 - y0) / (record["_size"][0] * record["_size"][1]))
                t.add_maps(box_scores(maps[0], record["_size"], record["bbox"]), t.class_mass, t.class_hits)
            boxes = record.get("attr_boxes", {})
            for k, attr in enumerate(pred.get("top_attributes", [])):
                box = boxes.get(str(attr["index"]))
                if box is not None:
                    t.add_maps(box_scores(maps[1 + k], record["_size"], box), t.attr_mass, t.attr_hits)
    result = {
        "samples": t.samples,
        "unmatched": t.unmatched,
        "top1": round(t.correct / t.samples, 5) if t.samples else None,
        "attr_acc": round(t.attr_correct / t.attr_count, 5) if t.attr_count else None,
        "class_map_mass_on_object": _mean(t.class_mass),
        # what a uniform map would score: the object's share of the image
        "object_area_fraction": _mean(t.box_area),
        "class_map_pointing": _mean(t.class_hits),
        "attribute_map_mass_on_box": _mean(t.attr_mass),
        "attribute_map_pointing": _mean(t.attr_hits),
        "scored_attribute_maps": len(t.attr_mass),
    }
    (out_dir / EVALUATION_FILE).write_text(json.dumps(result, indent=1))
    return result
