"""Datasets: official formats, checksummed downloads, splits held as tensors."""

from bioplaus.orchestrator.data.datasets import DATASETS, DataSplits, data_root, load_raw, make_splits

__all__ = ["DATASETS", "DataSplits", "data_root", "load_raw", "make_splits"]
