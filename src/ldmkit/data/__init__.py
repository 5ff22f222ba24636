"""ldmkit.data: WebDataset shards - preparation from sources, loading, robustness.

    ldmkit data prepare fashion_mnist out=data/fashion_mnist
    loader = build_dataloader(cfg.data, batch_size=64, num_workers=4)

See docs/data.md for the on-disk format, the batch keys and the sources (plugins add more
through the ``ldmkit_register_data_sources`` hook).

Owns the shard format, data sources (plugins through ``ldmkit_register_data_sources``),
preparation, loading and collation. May import the foundation (``errors``,
``registry``, ``hookspecs``) and ``plugins``; never ``training``, ``pipeline`` or ``cli``.
"""

from typing import Any

from ldmkit.data.errors import DataError, SourceNotFoundError
from ldmkit.data.location import verify, verify_shards
from ldmkit.data.manifest import Manifest, read_manifest
from ldmkit.data.prepare import prepare
from ldmkit.data.sources import SOURCES, Source, SourceSample, create_source, source_class
from ldmkit.data.stats import DataStats, SkipEvent

# the loader's names, imported when asked for (PEP 562) as are ShardStream and ImageTransform:
# their modules import torch, which reading a manifest (`ldmkit data info`) does not need
_LOADER = ("ShardDataset", "ShardLoader", "build_dataloader", "build_dataset", "data_config", "dataset_dir",
           "ensure_prepared")  # fmt: skip

__all__ = [
    "SOURCES",
    "DataError",
    "DataStats",
    "ImageTransform",
    "Manifest",
    "ShardDataset",
    "ShardLoader",
    "ShardStream",
    "SkipEvent",
    "Source",
    "SourceNotFoundError",
    "SourceSample",
    "build_dataloader",
    "build_dataset",
    "create_source",
    "data_config",
    "dataset_dir",
    "ensure_prepared",
    "prepare",
    "read_manifest",
    "source_class",
    "verify",
    "verify_shards",
]


def __getattr__(name: str) -> Any:
    if name in _LOADER:
        from ldmkit.data import loader

        return getattr(loader, name)
    if name == "ShardStream":
        from ldmkit.data.stream import ShardStream

        return ShardStream
    if name == "ImageTransform":
        from ldmkit.data.transforms import ImageTransform

        return ImageTransform
    raise AttributeError(f"module 'ldmkit.data' has no attribute {name!r}")
