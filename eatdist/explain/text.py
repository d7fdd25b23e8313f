"""Textual explanations: what the model sees in *this* image that supports its class, in words.

The rule (documented in the README, section "Explanation"):

1. **Only what the model sees.** An attribute is named only when the model predicts it present,
   ``p(attribute) > explain.attr_threshold`` (0.5). A class's usual attributes that the image
   does not show are never listed as reasons.
2. **Ranked by evidence from this image.** Both heads read the same pooled feature vector
   ``f``. The share of the class score ``s_c = w_c · f`` that lies along attribute ``a``'s
   direction ``u_a`` (the attribute head's weight row) is ``(w_c · û_a)(û_a · f)``, with
   ``û_a = u_a / |u_a|``: how strongly the class score depends on that direction times how much
   of it this image's features carry. It is in class-logit units, differs from image to image,
   and is negative for an attribute that argues against the class. That is the
   ``contribution``; the text names the top ``explain.top_k`` present attributes with a
   positive contribution. Non-linear heads use the gradients at ``f`` in place of ``w_c`` and
   ``u_a`` (a first-order version of the same quantity). Ranking by the dataset's class ×
   attribute matrix instead would restate the class prior and name what the class usually
   has, not what the image shows.
3. **What the image lacks, said apart.** A characteristic attribute of the predicted class
   (``class_attributes[class, a] >= 0.5``) that the model finds absent is reported after the
   reasons (at most ``explain.max_contrasts``), together with what the image shows instead in
   the same group: "…, although it has a black top rather than a white top".
4. **What argues against the class, said as such.** An attribute the model sees in this image
   that the predicted class usually lacks (``class_attributes[class, a] < 0.5``) and that is
   not named already is said after the reasons: "…, although it has a cross shape". An unusual
   image is explained by what it shows, never by silently leaving it out.
5. **Grouped for reading.** Attributes of one group are joined ("bill shape: dagger and
   needle"); plain names read with an article ("a red body").
6. **A warning when the attributes cannot be trusted.** A model whose validation attribute
   accuracy is near chance (:func:`attribute_check`) gets a flag in every explanation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eatdist.models.eat import EATModel, linear_weight

# "characteristic of a class": at least half of its images have the attribute
CHARACTERISTIC = 0.5


@dataclass(frozen=True)
class Directions:
    """A model's attribute directions, computed once per model: the unit rows ``û_a`` (``[A, C]``)
    and each class's score along them, ``w_c · û_a`` (``[N, A]``); both None for MLP heads."""

    units: torch.Tensor | None
    alignment: torch.Tensor | None


def attribute_directions(model: EATModel) -> Directions:
    """Return ``model``'s :class:`Directions` (float32, on the model's device)."""
    w_class, w_attr = linear_weight(model.class_head), model.attribute_directions()
    if w_class is None or w_attr is None:
        return Directions(None, None)
    with torch.no_grad():
        unit = w_attr.float() / w_attr.float().norm(dim=1, keepdim=True).clamp(min=1e-12)
        return Directions(unit, w_class.float() @ unit.T)


def attribute_contributions(
    model: EATModel, features: torch.Tensor, classes: torch.Tensor, directions: Directions | None = None
) -> torch.Tensor:
    """Return ``[B, A]``: the part of each image's predicted-class score along each attribute direction.

    ``features`` is the ``[B, C, H, W]`` feature map; the contribution of attribute ``a`` to class
    ``c`` is ``(g_c · û_a)(û_a · f)`` with ``f`` the pooled features, ``g_c`` the class score's
    gradient at ``f`` and ``û_a`` the attribute logit's unit gradient (for linear heads: the
    weight rows; for a spatial head: its 1x1 convolution's rows, and ``f`` the features of the
    cells where the attribute is seen, weighted by its positive map). See the module docstring.
    ``directions``: :func:`attribute_directions` of ``model``, when a caller keeps them.
    """
    features = features.float()
    directions = directions or attribute_directions(model)
    unit, alignment = directions.units, directions.alignment
    if unit is not None and alignment is not None:
        if model.spatial:
            # A spatial head sees an attribute in some cells only: f is then the features of the
            # cells where it is seen (weighted by its positive map), not the mean over the image.
            seen = model.attr_head.maps(features).relu()  # type: ignore[operator]
            seen = seen / seen.flatten(2).sum(2).clamp(min=1e-12)[:, :, None, None]
            along = torch.einsum("bahw,bchw,ac->ba", seen, features, unit)  # û_a · f_a
        else:
            along = model.class_input(features) @ unit.T
        return alignment.index_select(0, classes) * along
    pooled = model.class_input(features)  # what the class head reads
    with torch.enable_grad():
        x = pooled.detach().requires_grad_(True)
        score = model.class_head(x).gather(1, classes[:, None]).sum()
        (g_class,) = torch.autograd.grad(score, x)
        attr = model.attr_head(x)  # [B, A]
        count = attr.shape[1]
        selectors = torch.eye(count, dtype=attr.dtype, device=attr.device)[:, None, :].expand(count, *attr.shape)
        (g_attr,) = torch.autograd.grad(attr, x, grad_outputs=selectors.contiguous(), is_grads_batched=True)
    unit = g_attr / g_attr.norm(dim=2, keepdim=True).clamp(min=1e-12)  # [A, B, C]
    return (torch.einsum("bc,abc->ba", g_class, unit) * torch.einsum("bc,abc->ba", x.detach(), unit)).detach()


@dataclass(frozen=True, slots=True)  # named for every image: the chooser shares one per attribute and role
class Named:
    """One attribute the text names: its index, why it is named, and (for a contrast) what it replaces."""

    index: int
    # "supports": a reason for the class; "instead": shown where a characteristic one is missing;
    # "against": shown although the class usually lacks it
    role: str
    instead_of: int | None = None


class AttributeChooser:
    """Picks the attributes each image's text names, for a whole batch at once (rules 1-4 of the
    module docstring), with one package's class attributes and groups.

    :meth:`choose` works on ``[B, A]`` arrays: one sort per rule for the whole batch, not a
    Python loop over every attribute of every image. The :class:`Named` it returns are shared
    between images (they are frozen).
    """

    def __init__(
        self,
        class_attributes: list[list[float]] | None,
        groups: dict[int, str],
        num_attributes: int,
        top_k: int,
        threshold: float,
        max_contrasts: int,
    ) -> None:
        self.top_k, self.threshold, self.max_contrasts = top_k, threshold, max_contrasts
        self.rows = np.asarray(class_attributes, dtype=np.float64) if class_attributes is not None else None
        names = sorted(set(groups.values()))
        self.group = np.full(num_attributes, -1, dtype=np.int64)  # each attribute's group number, -1: none
        for a, name in groups.items():
            self.group[a] = names.index(name)
        self.grouped = bool((self.group >= 0).any())
        self._supports = [Named(a, "supports") for a in range(num_attributes)]
        self._against = [Named(a, "against") for a in range(num_attributes)]

    def choose(
        self, probs: np.ndarray, contributions: np.ndarray, classes: list[int]
    ) -> tuple[list[list[Named]], list[list[tuple[int, int | None]]]]:
        """Return, per image, (named, contrasts) for its ``[A]`` rows of float64 ``probs`` and
        ``contributions`` and its predicted class.

        ``named`` holds up to ``top_k`` present attributes (``p > threshold``) with a positive
        contribution, best first (role "supports"), then the attributes shown instead of missing
        characteristic ones that are not reasons already (role "instead"). ``contrasts`` pairs
        each of up to ``max_contrasts`` characteristic attributes of the class that the image
        lacks (``p <= threshold``; most characteristic first, then least probable) with the most
        probable present attribute of its group, or None when the group shows nothing. Last come
        the present attributes the class usually lacks that are not named yet (role "against",
        most probable first). Equal keys keep the attributes' order.
        """
        present = probs > self.threshold
        supports = self._supports.__getitem__
        taken = np.zeros_like(present)  # named already
        reasons = _ranked(
            present & (contributions > 0), -contributions, self.top_k, taken if self.rows is not None else None
        )
        named = [list(map(supports, row)) for row in reasons]
        if self.rows is None:
            return named, [[] for _ in classes]
        freq = self.rows[classes]
        contrasts: list[list[tuple[int, int | None]]] = [[] for _ in classes]
        if self.max_contrasts > 0:
            missing = (freq >= CHARACTERISTIC) & (probs <= self.threshold)
            lacked_rows = _ranked(missing, -freq, self.max_contrasts, then=probs)
            if not self.grouped:  # no group shows anything instead
                contrasts = [[(a, None) for a in row] for row in lacked_rows]
            else:
                self._instead(lacked_rows, present, probs, named, contrasts, taken)
        unusual = _ranked(present & (freq < CHARACTERISTIC) & ~taken, -probs, probs.shape[1])
        against = self._against.__getitem__
        for row, shown in zip(named, unusual, strict=True):
            row += map(against, shown)
        return named, contrasts

    def _instead(
        self,
        lacked_rows: list[list[int]],
        present: np.ndarray,
        probs: np.ndarray,
        named: list[list[Named]],
        contrasts: list[list[tuple[int, int | None]]],
        taken: np.ndarray,
    ) -> None:
        """Pair each lacked attribute with what its group shows instead (into ``contrasts``) and
        name what is shown (role "instead") where it is not named already (``taken``, kept up to date)."""
        images = [b for b, row in enumerate(lacked_rows) for _ in row]
        if not images:
            return
        lacked = np.asarray([a for row in lacked_rows for a in row])
        group = self.group[lacked][:, None]
        shown = present[images] & (self.group == group) & (group >= 0)
        best = np.where(shown, probs[images], -np.inf).argmax(1)  # the first of equal maxima
        for b, a, s, any_shown in zip(images, lacked.tolist(), best.tolist(), shown.any(1).tolist(), strict=True):
            contrasts[b].append((a, s if any_shown else None))
            if any_shown and not taken[b, s]:
                named[b].append(Named(s, "instead", instead_of=a))
                taken[b, s] = True


def _ranked(
    keep: np.ndarray, key: np.ndarray, most: int, chosen: np.ndarray | None = None, then: np.ndarray | None = None
) -> list[list[int]]:
    """Return, per row, the first ``most`` columns where ``keep`` holds, by ascending ``key`` (ties:
    by ascending ``then``, then by column). One sort for the batch: the others go to the end.
    ``chosen``: a boolean array like ``keep``, set where a column is returned."""
    key = np.where(keep, key, np.inf)
    order = np.lexsort((then, key), axis=1) if then is not None else key.argsort(axis=1, kind="stable")
    counts = np.minimum(keep.sum(1), most)
    if chosen is not None:  # a column's place in its row's order: the inverse permutation
        chosen |= order.argsort(axis=1) < counts[:, None]
    widths = counts.tolist()
    return [row[:n] for row, n in zip(order[:, : max(widths, default=0)].tolist(), widths, strict=True)]


def choose_attributes(
    probs: list[float],
    contributions: list[float],
    class_row: list[float] | None,
    groups: dict[int, str],
    top_k: int,
    threshold: float,
    max_contrasts: int,
) -> tuple[list[Named], list[tuple[int, int | None]]]:
    """Pick the attributes one image's text names; return (named, contrasts). See :meth:`AttributeChooser.choose`."""
    chooser = AttributeChooser([class_row] if class_row is not None else None, groups, len(probs), top_k,
                               threshold, max_contrasts)  # fmt: skip
    as_rows = (np.asarray([values], dtype=np.float64) for values in (probs, contributions))
    named, contrasts = chooser.choose(*as_rows, [0])
    return named[0], contrasts[0]


@functools.lru_cache(maxsize=4096)  # names and groups are a package's few hundred
def _value(name: str, group: str | None) -> str | None:
    """The value part of a "group: value" name (CUB style), or None for a plain name."""
    head, sep, value = name.partition(": ")
    return value if sep and (group is None or head == group) else None


@functools.lru_cache(maxsize=4096)
def _phrase(name: str) -> str:
    if ":" in name:  # "bill shape: dagger" reads best as it is
        return name
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def grouped_phrases(names: list[str], groups: list[str | None]) -> list[str]:
    """Return reading phrases, one per group in first-seen order: "bill shape: dagger and needle", "a red body"."""
    if len(groups) == len(names) and groups.count(None) == len(groups):
        return [_phrase(name) for name in names]
    order: list[str | None] = []
    members: dict[str | None, list[str]] = {}
    for i, (name, group) in enumerate(zip(names, groups, strict=True)):
        key = group if group is not None and _value(name, group) is not None else f"\0{i}"
        if key not in members:
            order.append(key)
            members[key] = []
        members[key].append(name)
    phrases = []
    for key in order:
        items = members[key]
        if len(items) > 1:
            values = [_value(n, key) or n for n in items]
            phrases.append(f"{key}: {_join(values)}")
        else:
            phrases.append(_phrase(items[0]))
    return phrases


def explanation_text(
    class_name: str,
    confidence: float,
    attribute_names: list[str],
    contrasts: list[tuple[str, str | None]] | None = None,
    groups: list[str | None] | None = None,
    warning: str | None = None,
    against: list[str] | None = None,
) -> str:
    """Return e.g. ``"red disc (94%): because it has a red body and a striped pattern"``.

    ``attribute_names`` are the reasons, best first (``groups`` gives each one's group, to join
    values of one group); ``contrasts`` are (characteristic attribute the image lacks, what it
    shows instead or None), said after the reasons ("although it has a black top rather than a
    white top"; "although it lacks a white top" when the black top is a reason already);
    ``against`` are attributes the image shows that the class usually lacks
    ("although it has a cross shape"); ``warning`` is appended in brackets.
    """
    text = f"{class_name} ({confidence:.0%})"
    if attribute_names:
        phrases = grouped_phrases(attribute_names, groups or [None] * len(attribute_names))
        # "group: a and b" phrases would run together joined by "and": list them with semicolons
        listed = "; ".join(phrases) if ":" in "".join(phrases) else _join(phrases)
        text += f": because it has {listed}"
    clauses = []
    for lacked, shown in contrasts or []:
        lacked_value = _value(lacked, None)
        if shown is None or shown in attribute_names:  # what it shows instead is a reason already
            clauses.append(f"it lacks {_phrase(lacked)}")
        elif lacked_value is not None and _value(shown, None) is not None:
            group = lacked.partition(": ")[0]
            clauses.append(f"its {group} is {_value(shown, None)}, not {lacked_value}")
        else:
            clauses.append(f"it has {_phrase(shown)} rather than {_phrase(lacked)}")
    if against:
        shown = _join([_phrase(name) for name in against])
        clauses.append(f"it also has {shown}" if clauses else f"it has {shown}")
    if clauses:
        text += (", although " if attribute_names else ": although ") + " and ".join(clauses)
    if warning:
        text += f" [{warning}]"
    return text


def attribute_check(
    metrics: dict[str, float], class_attributes: list[list[float]] | None, min_acc: float, min_gain: float
) -> dict[str, Any]:
    """Judge whether a package's attribute predictions can be trusted; return a json-ready verdict.

    Reads the validation attribute accuracy the trainer stored in the package's ``metrics``
    (``val_attr_acc``, or any ``*_attr_acc`` of a validation split). *Chance* is what always
    answering each attribute's more common value scores, with classes equally likely (from
    ``class_attributes``; 0.5 without it). The verdict is ``near_chance`` when the accuracy is
    below ``min_acc`` or not more than ``min_gain`` above chance (a model trained with
    ``loss.attr_weight=0`` lands here: its attribute head is untrained), ``unknown`` when the
    package records no attribute accuracy, else ``ok``; a package whose ``metrics`` record
    ``attr_weight`` 0 (the trainer stores ``loss.attr_weight``) is ``near_chance`` whatever its
    accuracy. Keys: ``status``, ``reliable``
    (False only for ``near_chance``), ``val_attr_acc``, ``chance``, ``message``.
    """
    acc = metrics.get("val_attr_acc")
    if acc is None:
        acc = next((v for k, v in sorted(metrics.items()) if k.endswith("_attr_acc") and "val" in k), None)
    if class_attributes:
        columns = list(zip(*class_attributes, strict=True))
        chance = sum(max(sum(col) / len(col), 1 - sum(col) / len(col)) for col in columns) / len(columns)
    else:
        chance = 0.5
    verdict: dict[str, Any] = {"val_attr_acc": acc, "chance": round(chance, 4)}
    if metrics.get("attr_weight") == 0.0:  # the trainer records loss.attr_weight: the baseline said so
        message = "attributes unreliable: the model was trained without the attribute task (loss.attr_weight=0)"
        return {**verdict, "status": "near_chance", "reliable": False, "message": message}
    if acc is None:
        return {**verdict, "status": "unknown", "reliable": True,
                "message": "the package records no validation attribute accuracy"}  # fmt: skip
    if acc < min_acc or acc <= chance + min_gain:
        message = (f"attributes unreliable: validation attribute accuracy {acc:.2f} is near chance "
                   f"({chance:.2f}); was the attribute head trained (loss.attr_weight > 0)?")  # fmt: skip
        return {**verdict, "status": "near_chance", "reliable": False, "message": message}
    return {**verdict, "status": "ok", "reliable": True, "message": ""}
