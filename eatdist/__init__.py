"""eatdist: explainable attribute-based multi-task image classification (EAT), at scale."""

__version__ = "0.1.0"
