"""Datasets held in memory as tensors on the training device, or streamed from a decode-once image cache."""

from regsearch.data._tensors import TensorData, load_dataset
from regsearch.data.images import images_from_dataset, load_images

__all__ = ["TensorData", "images_from_dataset", "load_dataset", "load_images"]
