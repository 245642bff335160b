"""Multi-view augmentation for bright-field and fluorescence cell images.

- :mod:`cellssl.augment.views` — the multi-view transform (geometry, stain and colour or channel
  intensity, blur and noise), the evaluation transform, the channel statistics
- :mod:`cellssl.augment.grid` — a PNG grid of augmented views (``cellssl views``)
"""

from cellssl.augment.views import (
    MultiViewTransform,
    build_eval_transform,
    build_view_transform,
    denormalize,
)

__all__ = ["MultiViewTransform", "build_eval_transform", "build_view_transform", "denormalize"]
