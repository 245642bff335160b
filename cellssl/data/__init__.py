"""Reading cell images and building datasets (folders, CSV manifests, MedMNIST .npz, synthetic)."""

from cellssl.data.forksafe import register_opencv_fork_hooks
from cellssl.data.datasets import ImageDataset, MultiViewDataset, build_dataset, split_indices
from cellssl.data.io import IMAGE_SUFFIXES, ImageReadError, read_image

register_opencv_fork_hooks()  # every DataLoader worker forked from here on starts without an OpenCV pool

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageDataset",
    "ImageReadError",
    "MultiViewDataset",
    "build_dataset",
    "read_image",
    "split_indices",
]
