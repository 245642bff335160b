"""A PNG grid of augmented views, to check by eye that a recipe's augmentations look sensible."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellssl.augment.views import MultiViewTransform, denormalize
from cellssl.config import DataConfig
from cellssl.errors import ConfigError
from cellssl.plots import pyplot, save_figure, tile, to_display

GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".tif", ".tiff", ".webp")


def grid_path(out_path: str | Path) -> Path:
    """The file a view grid is written to: ``out_path`` with an image suffix (one of
    :data:`GRID_SUFFIXES`), ``.png`` added when it has none; ConfigError for another suffix or a folder."""
    out = Path(out_path)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: give an image file name, e.g. {out / 'views.png'}")
    if not out.suffix:
        return out.with_name(out.name + ".png")
    if out.suffix.lower() not in GRID_SUFFIXES:
        raise ConfigError(f"--out {out}: the view grid is an image; use one of {', '.join(GRID_SUFFIXES)}")
    return out


def save_view_grid(
    dataset,
    transform: MultiViewTransform,
    data_cfg: DataConfig,
    out_path: str | Path,
    n: int = 8,
    seed: int = 0,
) -> Path:
    """Write an image (PNG unless ``out_path`` says otherwise, see :func:`grid_path`) with ``n``
    rows: each row an image of ``dataset`` (an ImageDataset; its raw (H, W, C) arrays, not its own
    transform) followed by its M augmented views. Returns the path written."""
    plt = pyplot()
    out = grid_path(out_path)
    if n < 1:
        raise ConfigError(f"the view grid needs at least 1 image (row), got n={n}")
    rng = np.random.default_rng(seed)
    n = min(n, len(dataset))
    idx = rng.choice(len(dataset), size=n, replace=False)
    m = transform.n_views
    fig, axes = plt.subplots(n, m + 1, figsize=(1.4 * (m + 1), 1.4 * n), squeeze=False)
    for row, i in enumerate(idx):
        img, label = dataset.load(int(i))
        views = denormalize(transform(img)["views"], data_cfg)
        tiles = [tile(img, transform.size)] + list(views)
        for col, shown in enumerate(tiles):
            ax = axes[row, col]
            ax.imshow(to_display(shown), cmap="gray" if shown.shape[2] == 1 else None, vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                name = dataset.classes[label] if getattr(dataset, "classes", None) and label >= 0 else f"#{i}"
                ax.set_ylabel(str(name), fontsize=7)
            if row == 0:
                ax.set_title("original" if col == 0 else f"view {col}", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out, dpi=110, pad=0.2)
