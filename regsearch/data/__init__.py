"""Datasets held in memory as tensors on the training device."""

from regsearch.data._tensors import TensorData, load_dataset

__all__ = ["TensorData", "load_dataset"]
