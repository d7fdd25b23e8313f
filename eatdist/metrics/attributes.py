"""Per-attribute metrics: accuracy, average precision and ROC AUC, and their means per group.

torchmetrics computes them: :class:`AttributeScores` is a torchmetrics ``Metric`` the trainer
feeds batch by batch on every rank and that gathers every rank's entries itself when computed;
:func:`attribute_table`, :func:`average_precision` and :func:`roc_auc` are the same computation
over host arrays of a whole split (``eatdist evaluate``). An entry counts when its mask is
above 0 (1 = annotated, 0 = left out); a label is positive above 0.5 and a prediction is
positive above ``threshold``, as in the aggregate attribute accuracy, which is exactly
``correct / count`` of the table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_stat_scores
from torchmetrics.utilities import dim_zero_cat

DIGITS = 5


def _entries(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None) -> tuple[Tensor, Tensor, int, int]:
    """The annotated entries (weight above 0) as tensors: scores, 0/1 labels, positives and negatives."""
    s = torch.as_tensor(np.asarray(scores, np.float64)).flatten()
    y = (torch.as_tensor(np.asarray(labels, np.float64)).flatten() > 0.5).long()
    if weights is not None:
        keep = torch.as_tensor(np.asarray(weights, np.float64)).flatten() > 0
        s, y = s[keep], y[keep]
    positives = int(y.sum())
    return s, y, positives, len(y) - positives


def average_precision(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """Return the average precision (sum over thresholds of recall gained times precision).

    The step-wise definition of scikit-learn's ``average_precision_score``, with ties as one
    threshold (torchmetrics' ``binary_average_precision``). Entries of weight 0 are left out;
    labels are positive above 0.5; scores outside [0, 1] are taken as logits. Returns None when
    there is no positive among the entries left.
    """
    s, y, positives, _ = _entries(scores, labels, weights)
    if positives == 0:
        return None
    return float(binary_average_precision(s, y, thresholds=None, validate_args=False))


def roc_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """Return the area under the ROC curve (ties count half, as in the Mann-Whitney statistic).

    torchmetrics' ``binary_auroc`` over the entries of weight above 0. Returns None when those
    hold only one class.
    """
    s, y, positives, negatives = _entries(scores, labels, weights)
    if positives == 0 or negatives == 0:
        return None
    return float(binary_auroc(s, y, thresholds=None, validate_args=False))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, DIGITS)


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return round(float(np.mean(defined)), DIGITS) if defined else None


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, DIGITS) if den > 0 else None


def attribute_table(
    probs: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray | None,
    names: Sequence[str],
    groups: Mapping[str, Sequence[int]] | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Return per-attribute and per-group metrics of ``probs`` against ``truth`` (both ``[N, A]``).

    The result holds ``accuracy`` (pooled over all annotated entries: ``correct / count``),
    ``mean_ap`` and ``mean_auc`` (means over the attributes where they are defined), and the
    tables ``attributes`` (one row per attribute: index, name, accuracy, ap, auc, positives,
    correct, count) and ``groups`` (one row per group of ``groups``: its attributes pooled the
    same way). ``correct`` and ``count`` are counts of annotated entries, so the rows add up to
    the totals. Computed in this process alone (see :class:`AttributeScores` for ranks).
    Raises:
        ValueError: when the shapes disagree with each other or with ``names``.
    """
    probs = np.asarray(probs, np.float32).reshape(-1, len(names))
    truth = np.asarray(truth, np.float32).reshape(probs.shape)
    scores = AttributeScores(len(names), threshold, sync_on_compute=False)
    scores.update(
        torch.from_numpy(probs),
        torch.from_numpy(truth),
        None if mask is None else torch.from_numpy(np.asarray(mask, np.float32).reshape(probs.shape)),
    )
    return scores.table(names, groups)


def ranked(table: Mapping[str, Any], n: int = 3, key: str = "accuracy") -> tuple[list[dict], list[dict]]:
    """Return the ``n`` worst and ``n`` best attribute rows of ``table`` by ``key`` (rows without it left out)."""
    rows = sorted((r for r in table["attributes"] if r.get(key) is not None), key=lambda r: (r[key], r["index"]))
    return rows[:n], rows[::-1][:n]


def summary_line(table: Mapping[str, Any], n: int = 3) -> str:
    """Return one line: mean AP and AUC, then the worst and best attributes by accuracy."""

    def listed(rows: list[dict]) -> str:
        return ", ".join(f"{r['name']} {r['accuracy']:.3f}" for r in rows) or "-"

    worst, best = ranked(table, n)
    ap, auc = table.get("mean_ap"), table.get("mean_auc")
    means = f"mean AP {ap:.4f}, mean AUC {auc:.4f}" if ap is not None and auc is not None else "AP/AUC undefined"
    return f"{means}; worst attributes: {listed(worst)}; best: {listed(best)}"


class AttributeScores(Metric):
    """Per-attribute accuracy counts, AP and AUC through torchmetrics, gathered across ranks by it.

    ``update`` takes a batch's ``[B, A]`` probabilities, labels (positive above 0.5) and mask (an
    entry counts where the mask is above 0); ``compute`` gathers every rank's entries (torchmetrics
    syncs its states over ``torch.distributed`` when a process group is up, unless built with
    ``sync_on_compute=False``) and returns the unrounded per-attribute values, ``nan`` where
    undefined: ``ap`` and ``auc`` ``[A]`` and ``stats`` ``[A, 4]`` (true positives, false positives,
    true negatives, false negatives). :meth:`table` turns them into the rows of :func:`attribute_table`.
    """

    full_state_update = False
    # Flattened 1-D states: a rank that saw no batch syncs torchmetrics' empty 1-D placeholder.
    probs: list[Tensor]
    positive: list[Tensor]
    mask: list[Tensor]
    labels: list[Tensor]

    def __init__(self, num_attributes: int, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_attributes, self.threshold = num_attributes, threshold
        for name in ("probs", "positive", "mask", "labels"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, truth: Tensor, mask: Tensor | None = None, labels: Tensor | None = None) -> None:
        """Add a batch: ``probs``, ``truth`` and ``mask`` of shape ``[B, A]`` (no mask: all entries count),
        and optionally the ``[B]`` true classes (for the on/off-prototype split, :meth:`entries`)."""
        if labels is not None:
            self.labels.append(labels.detach().reshape(-1).float())
        probs = probs.detach().reshape(-1, self.num_attributes).float()
        self.probs.append(probs.flatten())
        self.positive.append((truth.detach().reshape(probs.shape) > 0.5).float().flatten())
        weights = torch.ones_like(probs) if mask is None else (mask.detach().reshape(probs.shape) > 0).float()
        self.mask.append(weights.flatten())

    def compute(self) -> dict[str, Tensor]:
        a = self.num_attributes
        probs, positive, mask = (
            # on the host: one small curve per attribute runs faster there than as many tiny kernels
            dim_zero_cat(s).double().cpu().reshape(-1, a) if len(s) else torch.zeros(0, a, dtype=torch.float64)
            for s in (self.probs, self.positive, self.mask)
        )
        ap = torch.full((a,), float("nan"), dtype=torch.float64)
        auc = ap.clone()
        stats = torch.zeros(a, 4, dtype=torch.float64)
        for k in range(a):
            keep = mask[:, k] > 0
            p, y = probs[keep, k], positive[keep, k].long()
            if not len(p):
                continue
            tp, fp, tn, fn, _ = binary_stat_scores(p, y.long(), threshold=self.threshold, validate_args=False).tolist()
            stats[k] = torch.tensor([tp, fp, tn, fn], dtype=torch.float64)
            if tp + fn > 0:
                ap[k] = binary_average_precision(p, y, thresholds=None, validate_args=False)
                if fp + tn > 0:
                    auc[k] = binary_auroc(p, y, thresholds=None, validate_args=False)
        labels = dim_zero_cat(self.labels).double().cpu() if len(self.labels) else torch.zeros(0, dtype=torch.float64)
        return {"ap": ap, "auc": auc, "stats": stats, "probs": probs, "positive": positive, "mask": mask,
                "labels": labels}  # fmt: skip

    def entries(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return every rank's entries: ``[N, A]`` probabilities, 0/1 labels and mask, and the ``[N]``
        true classes (empty unless every ``update`` passed them)."""
        result = self.compute()
        return result["probs"], result["positive"], result["mask"], result["labels"]

    def table(self, names: Sequence[str], groups: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
        """Return the table of :func:`attribute_table` from the entries seen (on every rank)."""
        result = self.compute()
        rows: list[dict[str, Any]] = []
        for a, name in enumerate(names):
            tp, fp, tn, fn = result["stats"][a].tolist()
            ap, auc = float(result["ap"][a]), float(result["auc"][a])
            rows.append(
                {
                    "index": a,
                    "name": name,
                    "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
                    "ap": None if math.isnan(ap) else _round(ap),
                    "auc": None if math.isnan(auc) else _round(auc),
                    "positives": tp + fn,
                    "correct": tp + tn,
                    "count": tp + fp + tn + fn,
                }
            )
        group_rows = []
        for group, members in (groups or {}).items():
            chosen = [rows[i] for i in members if 0 <= i < len(rows)]
            right, count = sum(r["correct"] for r in chosen), sum(r["count"] for r in chosen)
            group_rows.append(
                {
                    "name": group,
                    "attributes": len(chosen),
                    "accuracy": _ratio(right, count),
                    "mean_ap": _mean([r["ap"] for r in chosen]),
                    "mean_auc": _mean([r["auc"] for r in chosen]),
                    "correct": right,
                    "count": count,
                }
            )
        total_correct, total = sum(r["correct"] for r in rows), sum(r["count"] for r in rows)
        return {
            "accuracy": _ratio(total_correct, total),
            "mean_ap": _mean([r["ap"] for r in rows]),
            "mean_auc": _mean([r["auc"] for r in rows]),
            "correct": total_correct,
            "count": total,
            "attributes": rows,
            "groups": group_rows,
        }
