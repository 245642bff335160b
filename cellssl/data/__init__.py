"""Reading cell images and building datasets (folders, CSV manifests, MedMNIST .npz, synthetic)."""

from cellssl.data.datasets import ImageDataset, MultiViewDataset, build_dataset, split_indices
from cellssl.data.io import IMAGE_SUFFIXES, ImageReadError, read_image

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageDataset",
    "ImageReadError",
    "MultiViewDataset",
    "build_dataset",
    "read_image",
    "split_indices",
]
