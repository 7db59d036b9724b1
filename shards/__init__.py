"""Audio into verified WebDataset shards with Parquet manifests.

Reading back::

    import shards
    for sample in shards.open("/data/librispeech-root"):
        sample.key, sample.waveform, sample.sample_rate, sample.meta
    one = shards.get("/data/librispeech-root", "103-1240-0000")
"""

from .plan import ShardingOptions, parse_size
from .reader import Index, Sample, get, iter_shard
from .reader import open_shards as open

__all__ = ["Index", "Sample", "ShardingOptions", "get", "iter_shard", "open", "parse_size"]
