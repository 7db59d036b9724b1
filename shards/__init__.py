"""Audio into verified WebDataset shards with Parquet manifests.

Reading back::

    import shards
    for sample in shards.open("/data/librispeech-root"):
        sample.key, sample.waveform, sample.sample_rate, sample.meta
    one = shards.get("/data/librispeech-root", "103-1240-0000")
"""

import importlib

#: The package's names and where they live: imported when first asked for (PEP 562), so that
#: a process that needs one small module of the package (a k-means actor, ``shards.core``)
#: does not import pyarrow and the reader with it.
_EXPORTS = {
    "ShardingOptions": ("plan", "ShardingOptions"),
    "parse_size": ("plan", "parse_size"),
    "Index": ("reader", "Index"),
    "Sample": ("reader", "Sample"),
    "get": ("reader", "get"),
    "iter_shard": ("reader", "iter_shard"),
    "open": ("reader", "open_shards"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value  # Asked once.
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
