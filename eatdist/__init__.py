"""eatdist: explainable attribute-based multi-task image classification (EAT), at scale.

The Python API (:mod:`eatdist.api`): ``model = eatdist.load_model(path)``, then
``model.predict(images)`` and ``model.explain(images)``. Its names load on first use, so that
``import eatdist`` (and the ``eatdist`` command) stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["AttributeScore", "ExplainedModel", "Explanation", "Prediction", "load_model"]

if TYPE_CHECKING:
    from eatdist.api import AttributeScore, ExplainedModel, Explanation, Prediction, load_model


def __getattr__(name: str) -> Any:
    if name in __all__:
        from eatdist import api

        return getattr(api, name)
    raise AttributeError(f"module 'eatdist' has no attribute '{name}'")
