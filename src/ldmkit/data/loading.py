"""The loading names in one place, for callers that import them from here: the code lives in
``decode`` (raw tar members -> samples -> batches), ``stream`` (which shards each rank and
worker reads, resumably) and ``loader`` (the data config, ``build_dataloader``,
``build_dataset``)."""

from ldmkit.data.decode import SampleDecoder, SampleError, collate
from ldmkit.data.loader import (
    CONFIG_DEFAULTS,
    ShardDataset,
    ShardLoader,
    build_dataloader,
    build_dataset,
    data_config,
    dataset_dir,
    ensure_prepared,
    load_manifest,
    transform_from,
)
from ldmkit.data.stream import POSITION, SKIPPED, ShardStream

__all__ = [
    "CONFIG_DEFAULTS",
    "POSITION",
    "SKIPPED",
    "SampleDecoder",
    "SampleError",
    "ShardDataset",
    "ShardLoader",
    "ShardStream",
    "build_dataloader",
    "build_dataset",
    "collate",
    "data_config",
    "dataset_dir",
    "ensure_prepared",
    "load_manifest",
    "transform_from",
]
