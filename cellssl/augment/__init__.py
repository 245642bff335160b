"""Multi-view augmentation for bright-field and fluorescence cell images."""

from cellssl.augment.views import (
    MultiViewTransform,
    build_eval_transform,
    build_view_transform,
    denormalize,
)

__all__ = ["MultiViewTransform", "build_eval_transform", "build_view_transform", "denormalize"]
