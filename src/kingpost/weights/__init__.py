"""Weights: mirror once into a content-addressed store, mount read-only everywhere."""

from kingpost.weights.blobs import BlobStore, GcReport, Manifest
from kingpost.weights.manager import MirrorState, MirrorStatus, WeightsManager, validate_weights
from kingpost.weights.patterns import selected

__all__ = [
    "BlobStore",
    "GcReport",
    "Manifest",
    "MirrorState",
    "MirrorStatus",
    "WeightsManager",
    "selected",
    "validate_weights",
]
