"""Evaluation metrics shared by training and ``eatdist evaluate``."""

from eatdist.metrics.attributes import AttributeScores, attribute_table, average_precision, roc_auc, summary_line

__all__ = ["AttributeScores", "attribute_table", "average_precision", "roc_auc", "summary_line"]
