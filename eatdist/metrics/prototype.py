"""Attribute accuracy split by whether an image agrees with its class's prototype.

A class's prototype is the set of attributes its images usually have (``class_attributes`` at
0.5 or more; CUB's class-level attribute strengths give the same). Most entries of an image
agree with it, so an attribute head that only recognises the class and answers with its
prototype scores well on the headline accuracy. The entries where an image *departs* from its
class's prototype show whether the head reads the image: their accuracy (``off_prototype``),
and the share of attributes an image shows although its class usually lacks them that the
model detects (``off_prototype_detected``: the words an explanation needs for an unusual image).

Pure functions over host arrays (``[N, A]`` probabilities, labels, mask and ``[N]`` true
classes), so the trainer (after gathering every rank's rows) and ``eatdist evaluate`` give the
same numbers. Average precision comes from :func:`eatdist.metrics.attributes.average_precision`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from eatdist.metrics.attributes import average_precision

DIGITS = 5
# an attribute belongs to a class's prototype when at least half of its images have it
PROTOTYPE = 0.5


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, DIGITS) if den > 0 else None


def _mean_ap(probs: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> float | None:
    """Mean over attributes of the AP of the weighted entries (attributes without a positive left out)."""
    values = [average_precision(probs[:, a], positive[:, a], weights[:, a]) for a in range(probs.shape[1])]
    defined = [v for v in values if v is not None]
    return round(float(np.mean(defined)), DIGITS) if defined else None


def prototype_metrics(
    probs: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray | None,
    labels: np.ndarray,
    class_attributes: Sequence[Sequence[float]] | np.ndarray | None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Return attribute accuracy and mean AP on the on- and off-prototype entries, and the detection share.

    ``probs``, ``truth`` and ``mask`` are ``[N, A]``; ``labels`` the ``[N]`` true classes;
    ``class_attributes`` the ``[C, A]`` matrix. Keys: ``attr_acc_on_prototype``,
    ``attr_acc_off_prototype``, ``attr_ap_on_prototype``, ``attr_ap_off_prototype``,
    ``off_prototype_detected`` (of the annotated entries an image has while its class's prototype
    lacks them, the share predicted present), and the entry counts ``on_prototype_entries``,
    ``off_prototype_entries``, ``off_prototype_present``. Empty when there is no matrix, or
    labels fall outside it (a corpus that does not match); a value is None when it has no entries.
    """
    if class_attributes is None or len(probs) == 0:
        return {}
    matrix = np.asarray(class_attributes, np.float64)
    probs = np.asarray(probs, np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != probs.shape[1]:
        return {}
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if labels.min() < 0 or labels.max() >= matrix.shape[0]:
        return {}
    truth = np.asarray(truth, np.float64).reshape(probs.shape)
    weights = np.ones_like(probs) if mask is None else np.asarray(mask, np.float64).reshape(probs.shape)
    positive = truth > 0.5
    in_prototype = matrix[labels] >= PROTOTYPE
    off = positive != in_prototype
    correct = (probs > threshold) == positive
    on_w, off_w = weights * ~off, weights * off
    present_w = weights * (off & positive)  # shown by the image, not by its class
    positive_f = positive.astype(np.float64)
    return {
        "attr_acc_on_prototype": _ratio(float((correct * on_w).sum()), float(on_w.sum())),
        "attr_acc_off_prototype": _ratio(float((correct * off_w).sum()), float(off_w.sum())),
        "attr_ap_on_prototype": _mean_ap(probs, positive_f, on_w),
        "attr_ap_off_prototype": _mean_ap(probs, positive_f, off_w),
        "off_prototype_detected": _ratio(float(((probs > threshold) * present_w).sum()), float(present_w.sum())),
        "on_prototype_entries": float(on_w.sum()),
        "off_prototype_entries": float(off_w.sum()),
        "off_prototype_present": float(present_w.sum()),
    }


def prototype_line(metrics: dict[str, Any], prefix: str = "") -> str:
    """Return one plain line: attribute accuracy where images agree with their class and where they depart."""
    on, off = metrics.get(f"{prefix}attr_acc_on_prototype"), metrics.get(f"{prefix}attr_acc_off_prototype")
    detected = metrics.get(f"{prefix}off_prototype_detected")
    if on is None or off is None:
        return "attribute accuracy by prototype: not measured (no class x attribute matrix)"
    line = f"attribute accuracy where the image matches its class's usual values {on:.3f}, where it departs {off:.3f}"
    if detected is not None:
        line += f"; unusual attributes it shows, detected {detected:.3f}"
    return line
