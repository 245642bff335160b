"""check_dataset report, and tile_image_to_folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellssl.data.check import check_dataset, format_check_report
from cellssl.data.io import read_image
from cellssl.data.tiles import tile_image_to_folder

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_check_reports_counts_duplicates_and_unreadable(tmp_path: Path) -> None:
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(np.full((10, 12, 3), 5, np.uint8)).save(root / "a" / "1.png")
    shutil.copy(root / "a" / "1.png", root / "b" / "copy.png")
    Image.fromarray(np.full((30, 20), 7, np.uint8)).save(root / "a" / "2.png")
    tifffile.imwrite(root / "b" / "3.tif", np.zeros((8, 9), np.uint16))
    (root / "b" / "broken.jpg").write_text("nope")
    (root / "readme.txt").write_text("ignored")
    rep = check_dataset(root)
    assert rep["n_files"] == 5 and rep["n_readable"] == 4
    assert rep["classes"] == {"a": 2, "b": 3}
    assert rep["min_size"] == (8, 9) and rep["max_size"] == (30, 20)
    assert rep["channels"] == {1: 2, 3: 2} and rep["dtypes"] == {"uint16": 1, "uint8": 3}
    assert rep["duplicates"] == [["a/1.png", "b/copy.png"]]
    assert [r for r, _ in rep["unreadable"]] == ["b/broken.jpg"]
    text = format_check_report(rep)
    assert "b/broken.jpg" in text and "a/1.png = b/copy.png" in text and "unreadable: 1" in text


def test_check_clean_folder(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.png")
    rep = check_dataset(tmp_path)
    assert rep["unreadable"] == [] and rep["duplicates"] == [] and rep["classes"] == {"(unlabelled)": 1}
    assert "unreadable: 0" in format_check_report(rep)


def test_tiles_on_grid_and_on_mask(tmp_path: Path) -> None:
    img = np.arange(100 * 80, dtype=np.uint16).reshape(100, 80)
    tifffile.imwrite(tmp_path / "big.tif", img)
    grid = tile_image_to_folder(tmp_path / "big.tif", None, tmp_path / "grid", size=32)
    assert len(grid) == 3 * 2
    first = tifffile.imread(grid[0])
    assert first.dtype == np.uint16 and np.array_equal(first, img[:32, :32])
    mask = np.zeros((100, 80), np.uint16)
    mask[40:51, 10:21] = 1  # centroid (45, 15)
    mask[90:99, 70:79] = 2  # near the border: reflect-padded
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    crops = tile_image_to_folder(tmp_path / "big.tif", tmp_path / "mask.tif", tmp_path / "nuc", size=16)
    assert len(crops) == 2
    c0 = tifffile.imread(crops[0])
    assert c0.shape == (16, 16) and c0[8, 8] == img[45, 15]


def test_real_stardist_tiles(tmp_path: Path) -> None:
    src = SHARED / "stardist_nuclei"
    if not (src / "img2d.tif").is_file():
        pytest.skip(f"shared data not present at {src} (real-data test)")
    crops = tile_image_to_folder(src / "img2d.tif", src / "mask2d.tif", tmp_path / "t", size=64)
    assert len(crops) > 100
    x = read_image(crops[0], modality="fluorescence")
    assert x.shape == (64, 64, 1)
    assert x[24:40, 24:40].mean() > x.mean()  # the nucleus is in the middle
