"""Expert demonstrations for imitation learning: collection (``collect``) and loading (``DemoDataset``)."""

from roadloop.data.collect import Manifest, collect, load_manifest
from roadloop.data.dataset import DemoDataset, collate_samples

__all__ = ["DemoDataset", "Manifest", "collate_samples", "collect", "load_manifest"]
