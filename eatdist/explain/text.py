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

import torch

from eatdist.models.eat import EATModel, linear_weight

# "characteristic of a class": at least half of its images have the attribute
CHARACTERISTIC = 0.5


def attribute_contributions(model: EATModel, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Return ``[B, A]``: the part of each image's predicted-class score along each attribute direction.

    ``features`` is the ``[B, C, H, W]`` feature map; the contribution of attribute ``a`` to class
    ``c`` is ``(g_c · û_a)(û_a · f)`` with ``f`` the pooled features, ``g_c`` the class score's
    gradient at ``f`` and ``û_a`` the attribute logit's unit gradient (for linear heads: the
    weight rows; for a spatial head: its 1x1 convolution's rows, and ``f`` the features of the
    cells where the attribute is seen, weighted by its positive map). See the module docstring.
    """
    features = features.float()
    pooled = model.class_input(features)  # what the class head reads
    w_class, w_attr = linear_weight(model.class_head), model.attribute_directions()
    if model.spatial and w_class is not None and w_attr is not None:
        # A spatial head sees an attribute in some cells only: f is then the features of the
        # cells where it is seen (weighted by its positive map), not the mean over the image.
        seen = model.attr_head.maps(features).relu()  # type: ignore[operator]
        seen = seen / seen.flatten(2).sum(2).clamp(min=1e-12)[:, :, None, None]
        unit = w_attr.float() / w_attr.float().norm(dim=1, keepdim=True).clamp(min=1e-12)  # [A, C]
        along = torch.einsum("bahw,bchw,ac->ba", seen, features, unit)  # û_a · f_a
        return (w_class.float()[classes] @ unit.T) * along
    if w_class is not None and w_attr is not None:
        g_class = w_class.float()[classes]  # [B, C]
        unit = w_attr.float() / w_attr.float().norm(dim=1, keepdim=True).clamp(min=1e-12)  # [A, C]
        return (g_class @ unit.T) * (pooled @ unit.T)
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


@dataclass
class Named:
    """One attribute the text names: its index, why it is named, and (for a contrast) what it replaces."""

    index: int
    # "supports": a reason for the class; "instead": shown where a characteristic one is missing;
    # "against": shown although the class usually lacks it
    role: str
    instead_of: int | None = None


def choose_attributes(
    probs: list[float],
    contributions: list[float],
    class_row: list[float] | None,
    groups: dict[int, str],
    top_k: int,
    threshold: float,
    max_contrasts: int,
) -> tuple[list[Named], list[tuple[int, int | None]]]:
    """Pick the attributes one image's text names; return (named, contrasts).

    ``named`` holds up to ``top_k`` present attributes (``p > threshold``) with a positive
    contribution, best first (role "supports"), then the attributes shown instead of missing
    characteristic ones that are not reasons already (role "instead"). ``contrasts`` pairs each
    of up to ``max_contrasts`` characteristic attributes of the class that the image lacks
    (``p <= threshold``; most characteristic first) with the most probable present attribute of
    its group, or None when the group shows nothing. Last come the present attributes the class
    usually lacks that are not named yet (role "against", most probable first).
    """
    present = [a for a, p in enumerate(probs) if p > threshold]
    # reverse=True keeps equal keys in index order, as sorting by the negated key does
    supports = sorted([a for a in present if contributions[a] > 0], key=contributions.__getitem__, reverse=True)
    supports = supports[:top_k]
    named = [Named(a, "supports") for a in supports]
    contrasts: list[tuple[int, int | None]] = []
    if class_row is not None and max_contrasts > 0:
        missing = [a for a, freq in enumerate(class_row) if freq >= CHARACTERISTIC and probs[a] <= threshold]
        taken = set(supports)
        for a in sorted(missing, key=lambda a: (-class_row[a], probs[a]))[:max_contrasts]:
            group = groups.get(a)
            shown = [b for b in present if groups.get(b) == group] if group is not None else []
            best = max(shown, key=probs.__getitem__) if shown else None
            contrasts.append((a, best))
            if best is not None and best not in taken:
                named.append(Named(best, "instead", instead_of=a))
                taken.add(best)
    if class_row is not None:
        taken = {n.index for n in named}
        unusual = [a for a in present if class_row[a] < CHARACTERISTIC and a not in taken]
        named += [Named(a, "against") for a in sorted(unusual, key=probs.__getitem__, reverse=True)]
    return named, contrasts


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
    if len(groups) == len(names) and all(g is None for g in groups):
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
        listed = "; ".join(phrases) if any(":" in ph for ph in phrases) else _join(phrases)
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
