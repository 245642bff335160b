"""Figure plumbing shared by every command that draws: matplotlib on the Agg backend (figures are
files, never windows), saving a finished figure (:func:`save_figure`), how an image of any channel
count is shown, and a grid of cell images with a title each (``select``'s contact sheet,
``predict``'s least certain cells)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

# colours for a per-channel composite when there are 2 channels (green, magenta)
_TWO_CHANNEL = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=np.float32)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib  # slow to import: only when a figure is drawn

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # slow to import: only when a figure is drawn

    return plt


def save_figure(fig, path: str | Path, *, dpi: int = 120, **layout) -> Path:
    """Lay out ``fig`` (``tight_layout(**layout)``), write it to ``path`` and close it (a figure left
    open keeps its memory for the life of the process). Returns ``path``."""
    fig.tight_layout(**layout)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def to_display(img: np.ndarray) -> np.ndarray:
    """(H, W, C) float in [0, 1] -> something ``imshow`` shows: (H, W) grey for C=1, RGB for C=3,
    a green/magenta composite for C=2, and the first three channels as RGB for C>3."""
    c = img.shape[2]
    if c == 1:
        return img[:, :, 0]
    if c == 2:
        return np.clip(img @ _TWO_CHANNEL, 0, 1)
    return np.clip(img[:, :, :3], 0, 1)


def tile(img: np.ndarray, size: int) -> np.ndarray:
    """``img`` (H, W, C) resized to (size, size, C) for display (area-averaged when shrinking)."""
    out = cv2.resize(np.ascontiguousarray(img, dtype=np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return out[:, :, None] if out.ndim == 2 else out


def image_sheet(images: Sequence[np.ndarray], titles: Sequence[str], path: str | Path, *, cols: int, title: str = "",
                title_size: float = 7, bold: bool = False, colors: Sequence[str] | None = None,
                dpi: int = 110) -> Path:
    """A PNG grid of ``images`` ((H, W, C) floats in [0, 1], any C), ``cols`` per row, each headed by
    its entry of ``titles`` (in ``colors``, default black); ``title`` above the grid. Returns ``path``."""
    plt = pyplot()
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (ax, img, text) in enumerate(zip(axes.ravel(), images, titles)):
        ax.imshow(to_display(img), cmap="gray" if img.shape[2] == 1 else None, vmin=0, vmax=1)
        ax.set_title(text, fontsize=title_size, fontweight="bold" if bold else "normal", pad=3,
                     color=colors[k] if colors is not None else "black")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=dpi, rect=(0, 0, 1, 0.97), pad=0.3)
