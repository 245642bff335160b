"""Physical scale: micrometres per pixel, resampling to a model's scale, the apparent cell size.

Microscopes differ in µm per pixel, so the same cell type can fill a crop 1.5x more in one lab
than in another (jtsc128 vs pbc128). A recipe declares the scale of its images as
``data.um_per_px``; a folder read with another declared scale (``--um-per-px``) is resampled so
that one pixel covers the same distance as in the model's images (:class:`ScaleMatcher`), and
``cellssl datasets check`` reports the apparent cell size (:func:`apparent_cell_size`) so that a
mismatch is visible before training.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import label, regionprops

from cellssl.errors import ConfigError

__all__ = ["scale_factor", "resample_to_scale", "ScaleMatcher", "object_diameter", "apparent_cell_size",
           "summarise_sizes", "compose", "match_scale"]


def scale_factor(images_um_per_px: float | None, model_um_per_px: float | None) -> float:
    """How much an image must be enlarged so its pixels match the model's: ``f = d / r`` for
    images at ``d`` µm/px and a model trained at ``r`` µm/px (f < 1 shrinks: the images' pixels
    are smaller). 1.0 when either scale is unknown. ConfigError for a scale that is not > 0."""
    for name, v in (("the images' µm per pixel", images_um_per_px), ("the model's µm per pixel", model_um_per_px)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{name} must be > 0, got {v}")
    if images_um_per_px is None or model_um_per_px is None:
        return 1.0
    return float(images_um_per_px) / float(model_um_per_px)


def resample_to_scale(img: np.ndarray, factor: float) -> np.ndarray:
    """``img`` (H, W, C) float32 resized by ``factor`` (area interpolation when shrinking, bilinear
    when enlarging), then centre-cropped (f > 1) or padded with the median colour of its border
    (f < 1) back to (H, W): the same crop size, each pixel now covering the model's distance.
    ``factor`` 1 returns ``img`` unchanged."""
    if abs(factor - 1.0) < 1e-6:
        return img
    img = np.ascontiguousarray(img, dtype=np.float32)
    h, w, c = img.shape
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    out = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    out = out.reshape(nh, nw, c)
    if factor > 1:
        top, left = (nh - h) // 2, (nw - w) // 2
        return np.ascontiguousarray(out[top:top + h, left:left + w])
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    canvas = np.empty((h, w, c), dtype=np.float32)
    canvas[:] = np.median(border, axis=0)
    top, left = (h - nh) // 2, (w - nw) // 2
    canvas[top:top + nh, left:left + nw] = out
    return canvas


class ScaleMatcher:
    """Picklable pre-transform: :func:`resample_to_scale` with a fixed ``factor`` (a DataLoader
    worker can use it)."""

    def __init__(self, factor: float):
        self.factor = float(factor)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return resample_to_scale(img, self.factor)

    def __repr__(self) -> str:
        return f"ScaleMatcher(factor={self.factor:.3f})"


def compose(*steps: Callable[[np.ndarray], np.ndarray] | None) -> Callable[[np.ndarray], np.ndarray] | None:
    """The steps that are not None, applied left to right (None when there is none)."""
    todo = [s for s in steps if s is not None]
    if not todo:
        return None
    if len(todo) == 1:
        return todo[0]
    return _Compose(todo)


class _Compose:
    def __init__(self, steps: list[Callable[[np.ndarray], np.ndarray]]):
        self.steps = steps

    def __call__(self, img: np.ndarray) -> np.ndarray:
        for s in self.steps:
            img = s(img)
        return img


def match_scale(pre_transform: Callable[[np.ndarray], np.ndarray] | None, images_um_per_px: float | None,
                model_um_per_px: float | None) -> Callable[[np.ndarray], np.ndarray] | None:
    """``pre_transform`` followed by a :class:`ScaleMatcher` when both scales are known and differ
    (:func:`scale_factor`); ``pre_transform`` unchanged otherwise, with a warning when only the
    images' scale is known (nothing to match it to)."""
    if images_um_per_px is not None and model_um_per_px is None:
        warnings.warn(f"the images are at {images_um_per_px:g} µm/px but the model's recipe has no data.um_per_px: "
                      "they are not resampled", UserWarning, stacklevel=3)
    f = scale_factor(images_um_per_px, model_um_per_px)
    return compose(pre_transform, ScaleMatcher(f)) if abs(f - 1.0) > 1e-6 else pre_transform


def object_diameter(img: np.ndarray) -> float:
    """Equivalent diameter ``sqrt(4 A / π)`` in pixels of the foreground object in the middle of
    a cell crop ``img`` (H, W[, C]).

    Grey = mean over channels; the background is the side of an Otsu threshold that holds the
    median of the border pixels (bright-field: bright background, fluorescence: dark); the
    foreground mask is opened (3x3) and its holes filled; the object is the connected component
    under the centre pixel, else the largest one. NaN for a flat image or no object."""
    g = np.asarray(img, dtype=np.float32)
    if g.ndim == 3:
        g = g.mean(axis=2)
    if float(g.max() - g.min()) < 1e-6:
        return float("nan")
    t = threshold_otsu(g)
    border = np.median(np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]]))
    fg = g < t if border >= t else g > t
    fg = ndimage.binary_fill_holes(ndimage.binary_opening(fg, np.ones((3, 3), bool)))
    lab = label(fg)
    if lab.max() == 0:
        return float("nan")
    centre = lab[g.shape[0] // 2, g.shape[1] // 2]
    regions = regionprops(lab)
    region = next((r for r in regions if r.label == centre), None) if centre else None
    region = region or max(regions, key=lambda r: r.area)
    return float(math.sqrt(4.0 * region.area / math.pi))


def summarise_sizes(diameters: Sequence[float], um_per_px: float | None = None) -> dict:
    """Median and quartiles of the finite ``diameters`` (px): ``{"median_px", "q25_px", "q75_px",
    "n_measured", "um_per_px", "median_um"}`` (``median_um`` = median_px · ``um_per_px`` when
    given, else None; NaN sizes when nothing was measured)."""
    sizes = [d for d in diameters if math.isfinite(d)]
    if not sizes:
        return {"median_px": float("nan"), "q25_px": float("nan"), "q75_px": float("nan"), "n_measured": 0,
                "um_per_px": um_per_px, "median_um": None}
    q25, med, q75 = (float(v) for v in np.percentile(sizes, [25, 50, 75]))
    return {"median_px": med, "q25_px": q25, "q75_px": q75, "n_measured": len(sizes), "um_per_px": um_per_px,
            "median_um": med * um_per_px if um_per_px else None}


def apparent_cell_size(paths: Sequence[Path], read: Callable[[Path], np.ndarray], max_images: int = 200,
                       um_per_px: float | None = None) -> dict:
    """:func:`summarise_sizes` of :func:`object_diameter` over up to ``max_images`` evenly spaced
    ``paths`` (read with ``read``; unreadable ones skipped)."""
    paths = list(paths)
    if len(paths) > max_images:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_images).round().astype(int)]
    sizes = []
    for p in paths:
        try:
            sizes.append(object_diameter(read(p)))
        except Exception:  # an unreadable file is reported elsewhere; it just has no size
            continue
    return summarise_sizes(sizes, um_per_px)
