"""Corpora: the shard format, the synthetic corpus, the streaming pipeline and its plan."""

from eatdist.data.corpus import DatasetInfo, ShardInfo, load_dataset_info
from eatdist.data.pipeline import Preprocess, ShardStream, make_loader
from eatdist.data.plan import Segment, plan_eval, plan_train

__all__ = [
    "DatasetInfo",
    "Preprocess",
    "Segment",
    "ShardInfo",
    "ShardStream",
    "load_dataset_info",
    "make_loader",
    "plan_eval",
    "plan_train",
]
