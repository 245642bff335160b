"""read_image: formats, channel layouts, intensity scaling and broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellssl.data.io import IMAGE_SUFFIXES, ImageReadError, read_image, scale_intensity
from cellssl.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rgb(h: int = 20, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp"])
def test_lossless_rgb_roundtrip(tmp_path: Path, suffix: str) -> None:
    arr = _rgb()
    p = tmp_path / f"a{suffix}"
    Image.fromarray(arr).save(p)
    out = read_image(p)
    assert out.shape == (20, 24, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, arr / 255.0, atol=1e-6)


def test_jpeg_grayscale_and_rgba(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:20, 0:24]
    smooth = np.dstack([xx * 10, yy * 12, 255 - xx * 10]).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    jpg = read_image(tmp_path / "a.jpg")
    assert jpg.shape == (20, 24, 3)
    assert np.abs(jpg - smooth / 255.0).mean() < 0.03  # lossy but close
    arr = _rgb()
    Image.fromarray(arr[:, :, 0]).save(tmp_path / "g.png")
    g = read_image(tmp_path / "g.png")
    assert g.shape == (20, 24, 1)
    np.testing.assert_allclose(g[:, :, 0], arr[:, :, 0] / 255.0, atol=1e-6)
    rgba = np.dstack([arr, np.full((20, 24), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a4.png")
    out = read_image(tmp_path / "a4.png")
    assert out.shape == (20, 24, 3)  # alpha dropped
    np.testing.assert_allclose(out, arr / 255.0, atol=1e-6)


def test_suffixes_include_common_formats() -> None:
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"} <= IMAGE_SUFFIXES


def test_tiff_uint8_is_divided_by_255(tmp_path: Path) -> None:
    arr = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16).astype(np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", arr)
    out = read_image(tmp_path / "a.tif")
    assert out.shape == (16, 16, 1)
    np.testing.assert_allclose(out[:, :, 0], arr / 255.0, atol=1e-6)


def test_tiff_uint16_percentile_scaling(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(1000, 3000, (32, 32)).astype(np.uint16)
    arr[0, 0] = 60000  # a hot pixel must not squash the range
    tifffile.imwrite(tmp_path / "a.tif", arr)
    out = read_image(tmp_path / "a.tif", modality="fluorescence")
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.3 < np.median(out) < 0.7  # percentile scaling, not /65535 or min-max
    mm = read_image(tmp_path / "a.tif", intensity="minmax")
    assert np.median(mm) < 0.05  # min-max is dominated by the hot pixel
    fixed = read_image(tmp_path / "a.tif", intensity="uint8")
    np.testing.assert_allclose(fixed[:, :, 0], arr / 65535.0, atol=1e-6)


def test_tiff_float_none_clips_and_nan_becomes_zero(tmp_path: Path) -> None:
    arr = np.linspace(-0.5, 1.5, 16 * 16, dtype=np.float32).reshape(16, 16)
    arr[3, 4] = np.nan
    arr[5, 5] = np.inf
    tifffile.imwrite(tmp_path / "f.tif", arr)
    out = read_image(tmp_path / "f.tif", intensity="none")
    assert np.isfinite(out).all() and out.min() == 0.0 and out.max() == 1.0
    assert out[3, 4, 0] == 0.0
    auto = read_image(tmp_path / "f.tif")
    assert np.isfinite(auto).all() and auto[3, 4, 0] == 0.0
    assert auto.max() == 1.0 and auto.min() == 0.0


def test_all_nan_float_image_is_finite(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "n.tif", np.full((8, 8), np.nan, np.float32))
    out = read_image(tmp_path / "n.tif")
    assert np.isfinite(out).all() and (out == 0).all()


def test_channel_first_and_last_tiff_agree(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 60000, (24, 20, 4)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "last.tif", hwc)
    tifffile.imwrite(tmp_path / "first.tif", np.moveaxis(hwc, 2, 0), photometric="minisblack")  # 4 pages
    tifffile.imwrite(tmp_path / "ome.ome.tif", np.moveaxis(hwc, 2, 0), ome=True, metadata={"axes": "CYX"})
    outs = [read_image(tmp_path / n) for n in ("last.tif", "first.tif", "ome.ome.tif")]
    for out in outs:
        assert out.shape == (24, 20, 4)
        np.testing.assert_allclose(out, outs[0])
    # channel 2 of the file is channel 2 of the output
    assert np.corrcoef(outs[1][:, :, 2].ravel(), hwc[:, :, 2].ravel().astype(float))[0, 1] > 0.99


def test_multipage_stack_page_and_projection(tmp_path: Path) -> None:
    stack = np.zeros((6, 10, 12), np.uint8)
    for k in range(6):
        stack[k] = 10 * k
    stack[2, 0, 0] = 255
    tifffile.imwrite(tmp_path / "z.tif", stack, metadata={"axes": "ZYX"})
    page = read_image(tmp_path / "z.tif", tiff_page=3)
    np.testing.assert_allclose(page, 30 / 255.0, atol=1e-6)
    mx = read_image(tmp_path / "z.tif", tiff_projection="max")
    assert mx.shape == (10, 12, 1)
    assert mx[0, 0, 0] == 1.0 and mx[5, 5, 0] == pytest.approx(50 / 255.0, abs=1e-6)
    mean = read_image(tmp_path / "z.tif", tiff_projection="mean", intensity="none")  # mean is float
    assert mean[5, 5, 0] == pytest.approx(1.0)  # float 25 clipped to 1 with intensity=none
    with pytest.raises(ImageReadError, match="out of range"):
        read_image(tmp_path / "z.tif", tiff_page=6)


def test_channel_conversion(tmp_path: Path) -> None:
    arr = _rgb()
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr[:, :, 0]).save(tmp_path / "g.png")
    one = read_image(tmp_path / "a.png", channels=1)
    assert one.shape == (20, 24, 1)
    np.testing.assert_allclose(one[:, :, 0], (arr / 255.0).mean(axis=2), atol=1e-6)
    three = read_image(tmp_path / "g.png", channels=3)
    assert three.shape == (20, 24, 3) and np.array_equal(three[:, :, 0], three[:, :, 2])
    tifffile.imwrite(tmp_path / "four.tif", np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(ImageReadError, match="4 channel"):
        read_image(tmp_path / "four.tif", channels=3)


def test_broken_files_raise_image_read_error(tmp_path: Path) -> None:
    buf = tmp_path / "full.jpg"
    Image.fromarray(_rgb(64, 64)).save(buf, quality=90)
    data = buf.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("this is not a png\n")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "tiny.png")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage" * 3)
    for name, reason in [
        ("trunc.jpg", "truncated"),
        ("text.png", "not an image"),
        ("empty.png", "empty"),
        ("tiny.png", "at least 2x2"),
        ("bad.tif", "TIFF"),
    ]:
        with pytest.raises(ImageReadError, match=reason) as info:
            read_image(tmp_path / name)
        msg = str(info.value)
        assert msg.startswith(f"cannot read image {tmp_path / name}: ") and "\n" not in msg
        assert isinstance(info.value, DataError)


def test_scale_intensity_rejects_unknown_mode() -> None:
    with pytest.raises(DataError, match="data.intensity"):
        scale_intensity(np.zeros((4, 4, 1), np.uint8), "gamma")


def test_constant_image_maps_to_zero_not_nan() -> None:
    out = scale_intensity(np.full((4, 4, 2), 700, np.uint16), "percentile")
    assert np.isfinite(out).all() and (out == 0).all()


def test_real_stardist_tiff() -> None:
    path = SHARED / "stardist_nuclei" / "img2d.tif"
    if not path.is_file():
        pytest.skip(f"shared data not present at {path} (real-data test)")
    out = read_image(path, modality="fluorescence")
    assert out.shape == (512, 512, 1) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.0 < out.mean() < 0.5  # dark background, bright nuclei
