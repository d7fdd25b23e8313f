"""Training: the Trainer, its schedule and its logs."""

from eatdist.train.trainer import Trainer

__all__ = ["Trainer"]
