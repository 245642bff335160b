"""Simulated lab/scanner shift: a deterministic, domain-shifted copy of a bright-field folder.

Used to test adaptation when no second lab is at hand: the same cells as if stained and scanned
elsewhere. A preset (:class:`ShiftPreset`, registry :data:`PRESETS`) applies, in this order:

1. **stain** — in HED space (``skimage.color.rgb2hed``): haematoxylin × ``h_scale``, eosin ×
   ``e_scale`` + ``e_offset``, DAB × ``d_scale``, back with ``hed2rgb``;
2. **optics** — Gaussian blur of ``blur_sigma`` pixels;
3. **resolution** — down-sampled by ``resize`` and back up (bilinear), i.e. a coarser sensor;
4. **illumination** — a linear gradient across the image, gain ``1 ± vignette`` between two
   opposite edges, direction random per image;
5. **compression** — JPEG re-encoding at ``jpeg_quality``.

Every image's randomness (gradient direction, a small per-image stain jitter) comes from a
generator seeded by ``(seed, relative path)``, so the output is identical across runs, file
orders and machines for the same seed.
"""

from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage.color import hed2rgb, rgb2hed

from cellssl.data.io import ImageReadError, folder_to_folder_images, output_folder, read_raw_image
from cellssl.errors import ConfigError, DataError, did_you_mean

__all__ = ["ShiftPreset", "PRESETS", "register_preset", "apply_shift", "shift_folder"]


@dataclass(frozen=True)
class ShiftPreset:
    """Parameters of one simulated scanner/lab."""

    h_scale: float = 1.0  # haematoxylin concentration factor
    e_scale: float = 1.0  # eosin concentration factor
    e_offset: float = 0.0  # added to the eosin concentration
    d_scale: float = 1.0  # DAB channel factor
    stain_jitter: float = 0.0  # per-image std of the H/E factors (relative)
    blur_sigma: float = 0.0  # Gaussian blur, pixels
    resize: float = 1.0  # down-sample factor before scaling back up (1 = none)
    vignette: float = 0.0  # illumination gradient: gain goes from 1 - v to 1 + v across the image
    jpeg_quality: int | None = None  # JPEG re-compression quality (None = none)
    description: str = ""


PRESETS: dict[str, ShiftPreset] = {}


def register_preset(name: str, preset: ShiftPreset) -> ShiftPreset:
    """Add (or replace) a named preset."""
    PRESETS[name] = preset
    return preset


register_preset("scanner_b", ShiftPreset(
    h_scale=1.25, e_scale=0.7, e_offset=0.01, stain_jitter=0.03, blur_sigma=1.0, resize=0.6, vignette=0.10,
    jpeg_quality=60,
    description="strong shift: H x1.25, E x0.7 + 0.01, blur sigma 1, resolution x0.6, +-10% gradient, JPEG q60",
))
register_preset("scanner_c", ShiftPreset(
    h_scale=1.1, e_scale=0.85, e_offset=0.0, stain_jitter=0.02, blur_sigma=0.6, resize=0.8, vignette=0.05,
    jpeg_quality=80,
    description="milder shift: H x1.1, E x0.85, blur sigma 0.6, resolution x0.8, +-5% gradient, JPEG q80",
))


def _preset(preset: str | ShiftPreset) -> ShiftPreset:
    if isinstance(preset, ShiftPreset):
        return preset
    if preset not in PRESETS:
        raise ConfigError(f"unknown shift preset '{preset}'{did_you_mean(str(preset), PRESETS)}; "
                          f"available: {', '.join(sorted(PRESETS))}")
    return PRESETS[preset]


def _stain(rgb: np.ndarray, p: ShiftPreset, rng: np.random.Generator) -> np.ndarray:
    """float RGB [0,1] -> stain-changed float RGB [0,1] (HED space)."""
    jh, je = (1.0 + p.stain_jitter * rng.standard_normal(2)) if p.stain_jitter else (1.0, 1.0)
    hed = rgb2hed(rgb)
    hed[..., 0] *= p.h_scale * jh
    hed[..., 1] = hed[..., 1] * p.e_scale * je + p.e_offset
    hed[..., 2] *= p.d_scale
    return np.clip(hed2rgb(hed), 0.0, 1.0)


def apply_shift(img: np.ndarray, preset: str | ShiftPreset = "scanner_b",
                rng: np.random.Generator | None = None, *, jpeg: bool = True) -> np.ndarray:
    """Shift one image: uint8 (H, W, 3) (or (H, W) / (H, W, 1): no stain step) -> uint8, same shape.

    ``jpeg=False`` leaves out the JPEG step (for callers that write the result as JPEG anyway).
    """
    p = _preset(preset)
    rng = rng if rng is not None else np.random.default_rng(0)
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise DataError(f"apply_shift expects a uint8 image, got {img.dtype}")
    squeeze = img.ndim == 2
    x = (img[:, :, None] if squeeze else img).astype(np.float64) / 255.0
    h, w, c = x.shape
    if c == 3 and (p.h_scale != 1 or p.e_scale != 1 or p.e_offset or p.d_scale != 1 or p.stain_jitter):
        x = _stain(x, p, rng)
    if p.blur_sigma > 0:
        x = gaussian_filter(x, sigma=(p.blur_sigma, p.blur_sigma, 0), mode="reflect")
    if p.resize and p.resize != 1.0:
        small = (max(1, round(w * p.resize)), max(1, round(h * p.resize)))
        chans = []
        for k in range(c):
            im = Image.fromarray(x[:, :, k].astype(np.float32), mode="F")
            chans.append(np.asarray(im.resize(small, Image.BILINEAR).resize((w, h), Image.BILINEAR)))
        x = np.stack(chans, axis=-1).astype(np.float64)
    if p.vignette:
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        t = (xx - (w - 1) / 2) * np.cos(theta) + (yy - (h - 1) / 2) * np.sin(theta)
        t = t / max(np.abs(t).max(), 1e-9)  # [-1, 1] along the gradient
        x = x * (1.0 + p.vignette * t)[:, :, None]
    out = (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if p.jpeg_quality and jpeg:
        buf = io.BytesIO()
        Image.fromarray(out[:, :, 0] if c == 1 else out).save(buf, format="JPEG", quality=int(p.jpeg_quality))
        buf.seek(0)
        with Image.open(buf) as im:
            out = np.asarray(im.convert("L" if c == 1 else "RGB"))
        if c == 1:
            out = out[:, :, None]
    return out[:, :, 0] if squeeze else out


def _image_seed(seed: int, rel: str) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(rel.encode())]).generate_state(1)[0])


def shift_folder(src: str | Path, out: str | Path, preset: str = "scanner_b", seed: int = 0) -> int:
    """Write a domain-shifted copy of every image below ``src`` into ``out`` (same class
    sub-folders and file names, same format; JPEGs are written at the preset's quality, other
    formats losslessly after the in-memory JPEG step). Deterministic in ``seed``. Returns the count.

    Bright-field 8-bit images (RGB or grey); other dtypes (16-bit TIFF) are refused.
    """
    p = _preset(preset)
    src, out, files = folder_to_folder_images(src, out)
    n = 0
    with output_folder(out) as tmp:  # renamed to ``out`` only when complete
        for f in files:
            rel = f.relative_to(src)
            try:
                raw = read_raw_image(f)
            except ImageReadError as exc:
                warnings.warn(f"skipping unreadable image {f}: {exc.reason}", UserWarning, stacklevel=2)
                continue
            if raw.dtype != np.uint8 or raw.shape[2] not in (1, 3):
                raise DataError(f"{f}: shift presets are for 8-bit bright-field images (got {raw.dtype}, "
                                f"{raw.shape[2]} channel(s))")
            img = raw[:, :, 0] if raw.shape[2] == 1 else raw
            is_jpeg = f.suffix.lower() in (".jpg", ".jpeg")
            res = apply_shift(img, p, np.random.default_rng(_image_seed(seed, rel.as_posix())), jpeg=not is_jpeg)
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(res)
            if is_jpeg:
                im.save(dst, quality=int(p.jpeg_quality or 95))
            elif f.suffix.lower() in (".gif",):
                im.save(dst.with_suffix(".png"))
            else:
                im.save(dst)
            n += 1
    return n
