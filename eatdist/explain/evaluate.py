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
from eatdist.data.remote import is_remote, join, redact
from eatdist.data.shards import iter_shard
from eatdist.errors import DataError
from eatdist.metrics.prototype import PROTOTYPE, prototype_metrics
from eatdist.store import Store, open_store

EVALUATION_FILE = "evaluation.json"
ATTRIBUTE_FILE = "attribute_metrics.json"
BREAKDOWN_FILE = "breakdown.json"


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
    # all-zero maps point nowhere and score nothing: counted here, never dropped silently
    zero_class_maps: int = 0
    zero_attr_maps: int = 0
    attr_maps: int = 0
    confusion: dict[tuple[int, int], int] = field(default_factory=dict)  # (true, predicted) → images
    class_names: dict[int, str] = field(default_factory=dict)
    attr_right: np.ndarray | None = None  # per attribute: correct answers, and answers counted
    attr_counted: np.ndarray | None = None
    # correctly classified images: attributes shown that the class's prototype lacks, and of those the named ones
    unusual_shown: int = 0
    unusual_named: int = 0
    named_absent: int = 0  # named attributes the model scores absent (p <= 0.5): the text must never do that

    def add_maps(self, scores: tuple[float, bool] | None, mass: list[float], hits: list[bool]) -> None:
        if scores is not None:
            mass.append(scores[0])
            hits.append(scores[1])


def _truth(data_dir: str, shard_name: str) -> dict[str, dict[str, Any]]:
    path = join(data_dir, shard_name)
    if not is_remote(path) and not Path(path).is_file():
        raise DataError(f"no input shard {redact(path)} for explanation shard {shard_name}")
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


def _attribute_names(data_dir: str) -> list[str]:
    try:
        from eatdist.data.corpus import load_dataset_info

        return list(load_dataset_info(data_dir).attributes)
    except Exception:  # bare shards without dataset.json: attributes are shown by index
        return []


def _prototypes(data_dir: Path) -> np.ndarray | None:
    """The corpus's ``[C, A]`` prototype membership (``class_attributes`` >= 0.5), or None without one."""
    try:
        from eatdist.data.corpus import load_dataset_info

        matrix = load_dataset_info(data_dir).class_attributes
    except Exception:  # bare shards without dataset.json: no prototypes to split by
        return None
    return None if matrix is None else np.asarray(matrix, np.float64) >= PROTOTYPE


def _breakdown(t: _Tally, attribute_names: list[str]) -> dict[str, Any]:
    """Per-class accuracy, per-attribute accuracy and the confusion counts, for the report."""
    classes = sorted({c for pair in t.confusion for c in pair})
    per_class = []
    for c in classes:
        total = sum(n for (true, _), n in t.confusion.items() if true == c)
        if total:
            per_class.append({"class": c, "name": t.class_names.get(c, str(c)), "images": total,
                              "top1": round(t.confusion.get((c, c), 0) / total, 5)})  # fmt: skip
    per_attribute = []
    if t.attr_right is not None and t.attr_counted is not None:
        names = attribute_names if len(attribute_names) == len(t.attr_right) else []
        for a, (right, counted) in enumerate(zip(t.attr_right, t.attr_counted, strict=True)):
            if counted:
                name = names[a] if names else f"attribute {a}"
                per_attribute.append({"index": a, "name": name, "acc": round(float(right / counted), 5)})
    confusion = [[true, pred, n] for (true, pred), n in sorted(t.confusion.items())]
    return {"per_class": per_class, "per_attribute": per_attribute, "confusion": confusion}


def evaluate_explanations(explanations: str | Path | Store, data: str | Path) -> dict[str, Any]:
    """Score every explanation shard in ``explanations`` against the same-named shard in ``data``.

    Either may be a folder or a URL; the results are written beside the explanations.

    Returns the metrics (also written to ``explanations/evaluation.json``): accuracies, map scores,
    the all-zero maps counted (``zero_class_maps``, and ``zero_attribute_maps`` of
    ``attribute_maps``: they point nowhere, so the map scores leave them out), and the path of
    ``breakdown.json``: ``per_class`` top-1, ``per_attribute`` accuracy and the ``confusion``
    counts as ``[true, predicted, images]``. With the corpus's ``class_attributes`` also the
    on/off-prototype split of :func:`eatdist.metrics.prototype.prototype_metrics` and
    ``off_prototype_named``: of the attributes correctly classified images show although their
    class usually lacks them, the share their explanation names.

    Raises:
        DataError: when there are no explanation shards or an input shard is missing;
        DiskError: naming the file, the size needed and the space free, on a full or read-only disk.
    """
    store = explanations if isinstance(explanations, Store) else open_store(explanations, "--explanations")
    data_dir = str(data)
    shards = sorted(n for n in store.list("") if n.endswith(".tar"))
    if not shards:
        raise DataError(f"no explanation shards (*.tar) in {store.root}")
    t = _Tally()
    attribute_rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per image: probabilities, labels, mask
    true_classes: list[int] = []
    prototypes = _prototypes(data_dir)
    for shard in shards:
        truth = _truth(data_dir, shard)
        for sample in iter_shard(store.url(shard)):
            record = truth.get(sample["__key__"])
            if record is None or "class" not in record or "heatmaps.npy" not in sample:
                t.unmatched += 1
                continue
            pred = json.loads(sample["json"])
            maps = np.load(io.BytesIO(sample["heatmaps.npy"]), allow_pickle=False).astype(np.float32)
            t.samples += 1
            t.correct += int(pred["class"] == record["class"])
            pair = (int(record["class"]), int(pred["class"]))
            t.confusion[pair] = t.confusion.get(pair, 0) + 1
            t.class_names[int(pred["class"])] = pred.get("class_name", str(pred["class"]))
            peaks = np.max(maps.reshape(len(maps), -1), axis=1) if maps.size else np.zeros(0)
            t.zero_class_maps += int(len(peaks) > 0 and peaks[0] <= 0)
            t.zero_attr_maps += int((peaks[1:] <= 0).sum())
            t.attr_maps += max(0, len(peaks) - 1)
            attrs = np.asarray(record.get("attributes", []), dtype=np.float32)
            probs = np.asarray(pred.get("attribute_probabilities", []), dtype=np.float32)
            if len(attrs) and len(attrs) == len(probs):
                mask = np.asarray(record.get("attr_mask", np.ones_like(attrs)), dtype=np.float32)
                hits = ((probs > 0.5) == (attrs > 0.5)) * mask
                t.attr_correct += float(hits.sum())
                t.attr_count += float(mask.sum())
                if t.attr_right is None or t.attr_counted is None:
                    t.attr_right, t.attr_counted = np.zeros(len(attrs)), np.zeros(len(attrs))
                if len(t.attr_right) == len(attrs):
                    t.attr_right += hits
                    t.attr_counted += mask
                attribute_rows.append((probs, attrs, mask))
                true_classes.append(int(record["class"]))
                named = {int(a["index"]) for a in pred.get("top_attributes", [])}
                t.named_absent += int(sum(probs[a] <= 0.5 for a in named if a < len(probs)))
                if prototypes is not None and pred["class"] == record["class"] and record["class"] < len(prototypes):
                    shown = np.flatnonzero((attrs > 0.5) & (mask > 0))
                    unusual = [a for a in shown if not prototypes[record["class"]][a]]
                    t.unusual_shown += len(unusual)
                    t.unusual_named += int(sum(int(a) in named for a in unusual))
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
        "zero_class_maps": t.zero_class_maps,
        "zero_attribute_maps": t.zero_attr_maps,
        "attribute_maps": t.attr_maps,
        "breakdown": store.url(BREAKDOWN_FILE),
        # of the attributes correctly classified images show although their class usually lacks them,
        # the share the explanation names (as a reason, "instead" or "against")
        "off_prototype_named": round(t.unusual_named / t.unusual_shown, 5) if t.unusual_shown else None,
        "off_prototype_shown": t.unusual_shown,
        "named_attributes_scored_absent": t.named_absent,
    }
    # Per-class and per-attribute tables are long (CUB: 200 and 312 rows): a file of their own.
    store.put_json(BREAKDOWN_FILE, _breakdown(t, _attribute_names(data_dir)))
    result.update(attribute_metrics(attribute_rows, data_dir, store))
    if attribute_rows and prototypes is not None:
        probs, truth, mask = (np.stack([r[i] for r in attribute_rows]) for i in range(3))
        result.update(prototype_metrics(probs, truth, mask, np.asarray(true_classes), prototypes))
    store.put_json(EVALUATION_FILE, result)
    return result


def attribute_metrics(
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], data_dir: str | Path, out: str | Path | Store
) -> dict[str, Any]:
    """Write per-attribute and per-group accuracy, AP and AUC to ``out_dir/attribute_metrics.json``.

    Names and groups come from the corpus's ``dataset.json`` (index names without one). Returns
    the summary for ``evaluation.json``: mean AP and AUC, the worst and best attributes by
    accuracy, and the tables' file; nothing when no image had attribute labels.
    """
    from eatdist.data.corpus import load_dataset_info
    from eatdist.metrics.attributes import attribute_table, ranked

    if not rows:
        return {}
    width = len(rows[0][0])
    try:
        info = load_dataset_info(data_dir)
        names, groups = list(info.attributes), dict(info.attribute_groups or {})
    except Exception:  # explanation shards scored against bare shards: no names to show
        names, groups = [], {}
    if len(names) != width:
        names, groups = [f"attribute {a}" for a in range(width)], {}
    probs, truth, mask = (np.stack([r[i] for r in rows]) for i in range(3))
    table = attribute_table(probs, truth, mask, names, groups)
    store = out if isinstance(out, Store) else open_store(out)
    store.put_json(ATTRIBUTE_FILE, table)
    worst, best = ranked(table, 3)
    return {
        "attr_mean_ap": table["mean_ap"],
        "attr_mean_auc": table["mean_auc"],
        "worst_attributes": ", ".join(f"{r['name']} {r['accuracy']:.3f}" for r in worst),
        "best_attributes": ", ".join(f"{r['name']} {r['accuracy']:.3f}" for r in best),
        "attribute_tables": store.url(ATTRIBUTE_FILE),
    }
