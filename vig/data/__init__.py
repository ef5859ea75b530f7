"""Data: the embedded DigitScenes datasets, dataset layouts, WebDataset sharding and the shard readers."""
from vig.data.readers import (
    ShardPipeline,
    classification_pipeline,
    collate_lists,
    detection_pipeline,
    load_manifest,
    make_loader,
    segmentation_pipeline,
    shard_urls,
)

__all__ = [
    "ShardPipeline",
    "classification_pipeline",
    "collate_lists",
    "detection_pipeline",
    "load_manifest",
    "make_loader",
    "segmentation_pipeline",
    "shard_urls",
]
