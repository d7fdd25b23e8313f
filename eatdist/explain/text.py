"""Textual explanations: the predicted class and the attributes that support it, in words."""

from __future__ import annotations

import torch


def attribute_contributions(
    attr_probs: torch.Tensor, classes: torch.Tensor, class_attributes: torch.Tensor | None
) -> torch.Tensor:
    """Return ``[B, A]`` contributions of each attribute to each image's predicted class.

    An attribute contributes what the image shows of it times how characteristic it is of the
    class: ``p(attribute) * class_attributes[class, attribute]``. Without a class × attribute
    matrix the contribution is the probability alone.
    """
    if class_attributes is None:
        return attr_probs
    return attr_probs * class_attributes.to(attr_probs)[classes]


def _phrase(name: str) -> str:
    if ":" in name:  # "bill shape: dagger" reads best as it is
        return name
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name}"


def explanation_text(class_name: str, confidence: float, attribute_names: list[str]) -> str:
    """Return e.g. ``"red disc (94%): because it has a red body, a striped pattern and a small size"``."""
    phrases = [_phrase(n) for n in attribute_names]
    if not phrases:
        return f"{class_name} ({confidence:.0%})"
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{class_name} ({confidence:.0%}): because it has {listed}"
