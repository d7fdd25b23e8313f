"""Explanations: closed-form maps, text, overlays and the distributed explanation job."""

from eatdist.explain.cam import closed_form_maps, gradcam_autograd, normalise_maps
from eatdist.explain.explainer import Explainer
from eatdist.explain.job import job_status, run_explain
from eatdist.explain.text import explanation_text

__all__ = [
    "Explainer",
    "closed_form_maps",
    "explanation_text",
    "gradcam_autograd",
    "job_status",
    "normalise_maps",
    "run_explain",
]
