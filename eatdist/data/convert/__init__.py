"""Converters from downloaded datasets (CUB-200-2011, SUN Attribute, AwA2, an image folder) to shards."""

from eatdist.data.convert.awa2 import convert_awa2
from eatdist.data.convert.common import ConvertOptions, ConvertResult, default_workers, sample_key
from eatdist.data.convert.cub import convert_cub
from eatdist.data.convert.folder import convert_folder
from eatdist.data.convert.sun import convert_sun

__all__ = [
    "ConvertOptions",
    "ConvertResult",
    "convert_awa2",
    "convert_cub",
    "convert_folder",
    "convert_sun",
    "default_workers",
    "sample_key",
]
