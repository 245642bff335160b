"""Reading cell images and building datasets (folders, CSV manifests, MedMNIST .npz, shards, synthetic).

- :mod:`cellssl.data.io` — reading an image of any format, bit depth and channel count into float32
  (H, W, C); listing images; output files and folders written whole
- :mod:`cellssl.data.datasets` — datasets of folders, CSV manifests, ``.npz`` and shards, their batches, splits
- :mod:`cellssl.data.shards` — cells as tar shards with an index (millions of cells)
- :mod:`cellssl.data.stream` — a shard source read as a stream (``pipe:``, ``file:``, ``http(s)://``): each
  rank and loader worker its own shards, for pretraining
- :mod:`cellssl.data.parts` — outputs of a long pass written in resumable parts (``embed``, ``predict``)
- :mod:`cellssl.data.stain` — stain normalisation (Macenko, Reinhard), applied while reading
- :mod:`cellssl.data.scale` — physical scale: µm per pixel, resampling to a model's scale, the apparent cell size
- :mod:`cellssl.data.check` — ``cellssl datasets check``: a health report of a folder
- :mod:`cellssl.data.synth` — the synthetic blood-smear set
- :mod:`cellssl.data.download` — public datasets, checksum-verified
- :mod:`cellssl.data.tiles` — a large image cut into cell-centred or grid crops
- :mod:`cellssl.data.forksafe` — OpenCV's thread pool around ``fork`` (DataLoader workers)
"""

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
