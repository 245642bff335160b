"""save_view_grid writes a readable PNG for RGB, 1-channel and multi-channel data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellssl.augment.grid import save_view_grid
from cellssl.augment.views import build_view_transform
from cellssl.config import DataConfig, ViewsConfig
from cellssl.data.datasets import build_dataset
from cellssl.plots import to_display


@pytest.mark.parametrize("c", [1, 3, 4])
def test_grid_png(tmp_path: Path, c: int) -> None:
    root = tmp_path / "d"
    root.mkdir()
    for i in range(3):
        tifffile.imwrite(root / f"{i}.tif", (np.random.default_rng(i).random((40, 40, c)) * 255).astype(np.uint8))
    data = DataConfig(image_size=32, modality="brightfield" if c == 3 else "fluorescence")
    ds = build_dataset(data, root)
    t = build_view_transform(ViewsConfig(n_views=3), data, ds.channels, seed=0)
    out = save_view_grid(ds, t, data, tmp_path / "g" / "views.png", n=2)
    with Image.open(out) as im:
        w, h = im.size
    assert w > h  # 2 rows x 4 columns
    assert w > 200


def test_to_display_modes() -> None:
    assert to_display(np.zeros((5, 5, 1))).shape == (5, 5)
    two = to_display(np.stack([np.ones((5, 5)), np.zeros((5, 5))], axis=2))
    assert two.shape == (5, 5, 3) and two[0, 0].tolist() == [0.0, 1.0, 0.0]
    assert to_display(np.zeros((5, 5, 6))).shape == (5, 5, 3)
