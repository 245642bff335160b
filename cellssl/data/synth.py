"""A SYNTHETIC peripheral-blood-smear image set, generated procedurally (no real patient data).

Each image is one white blood cell (or, for class ``other``, only red cells and platelets) on a
Wright-Giemsa-like background: pink red cells with central pallor, purple nuclei, class-typical
cytoplasm and granules. Images are rendered in optical density (Beer-Lambert, so overlapping
stains add up) and then varied per image: stain intensity and hue, focus blur, an illumination
gradient, sensor noise, random orientation and cell size. It exists so that the toolkit runs
and its tests pass without downloads; results on it say nothing about real blood smears.

Classes: neutrophil (3-5 connected lobes, pale pink cytoplasm), lymphocyte (large round dark
nucleus, thin blue rim), monocyte (kidney/horseshoe nucleus, abundant grey-blue cytoplasm with
vacuoles, larger cell), eosinophil (bilobed nucleus, orange-red granules), basophil (dark
purple granules over the nucleus), other (red cells and small platelets only).
Everything is deterministic in ``seed``: image ``i`` uses ``numpy.random.default_rng([seed, i])``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

SYNTH_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil", "other")
_MARKER = "synth.json"


def _od(rgb: tuple[float, float, float]) -> np.ndarray:
    """Optical density (-log transmission) of an RGB colour; shape (3,)."""
    return -np.log(np.asarray(rgb, dtype=np.float32))


_PLASMA = _od((0.95, 0.91, 0.91))
_RBC = _od((0.90, 0.62, 0.64)) - _PLASMA
_NUCLEUS = _od((0.42, 0.24, 0.56))
_NUCLEUS_DARK = _od((0.30, 0.16, 0.46))
_NUCLEUS_LIGHT = _od((0.52, 0.38, 0.64))
_CYTO = {
    "neutrophil": _od((0.90, 0.81, 0.86)),
    "lymphocyte": _od((0.70, 0.79, 0.92)),
    "monocyte": _od((0.74, 0.74, 0.84)),
    "eosinophil": _od((0.91, 0.78, 0.74)),
    "basophil": _od((0.82, 0.76, 0.88)),
}
_EOS_GRANULE = _od((0.93, 0.52, 0.36))
_BASO_GRANULE = _od((0.28, 0.14, 0.38))
_PLATELET = _od((0.60, 0.45, 0.72))
# cell radius as a fraction of the image side (red cell ~ 0.12)
_RADIUS = {"neutrophil": 0.20, "lymphocyte": 0.155, "monocyte": 0.235, "eosinophil": 0.205, "basophil": 0.175}


class _Canvas:
    """Pixel grid helpers for soft-edged shapes on a size x size image."""

    def __init__(self, size: int):
        self.size = size
        self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    def ellipse(self, cy: float, cx: float, ry: float, rx: float, theta: float = 0.0, soft: float = 0.8) -> np.ndarray:
        """Anti-aliased ellipse coverage in [0, 1], shape (size, size)."""
        dy, dx = self.yy - cy, self.xx - cx
        c, s = np.cos(theta), np.sin(theta)
        u, v = c * dx + s * dy, -s * dx + c * dy
        d = np.sqrt((u / max(rx, 1e-3)) ** 2 + (v / max(ry, 1e-3)) ** 2)
        return np.clip((1.0 - d) * min(rx, ry) / soft + 0.5, 0.0, 1.0)

    def segment(self, p0: tuple[float, float], p1: tuple[float, float], width: float) -> np.ndarray:
        """Coverage of a thick line segment (a chromatin strand between lobes)."""
        (y0, x0), (y1, x1) = p0, p1
        vy, vx = y1 - y0, x1 - x0
        L2 = max(vy * vy + vx * vx, 1e-6)
        t = np.clip(((self.yy - y0) * vy + (self.xx - x0) * vx) / L2, 0, 1)
        d = np.hypot(self.yy - (y0 + t * vy), self.xx - (x0 + t * vx))
        return np.clip((width / 2 - d) / 0.8 + 0.5, 0.0, 1.0)


def _texture(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Smooth zero-mean, unit-ish-std noise field, shape (size, size)."""
    f = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return f / (f.std() + 1e-6)


def _granules(rng: np.random.Generator, size: int, mask: np.ndarray, density: float, sigma: float) -> np.ndarray:
    """Field of small blobs inside ``mask``, values roughly in [0, 1], shape (size, size)."""
    spots = (rng.random((size, size)) < density).astype(np.float32) * mask
    f = gaussian_filter(spots, sigma)
    return np.clip(f / (f.max() + 1e-6) * 1.6, 0, 1)


def _red_cells(cv: _Canvas, rng: np.random.Generator, od: np.ndarray, k: int, r: float, avoid: float) -> None:
    """Add ``k`` red cells (pink discs with central pallor) of radius ~``r``, away from the centre by ``avoid``."""
    c = cv.size / 2
    for _ in range(k):
        for _try in range(8):
            cy, cx = rng.uniform(-0.1, 1.1, 2) * cv.size
            if np.hypot(cy - c, cx - c) > avoid:
                break
        rr = r * rng.uniform(0.85, 1.12)
        ecc = rng.uniform(0.88, 1.0)
        theta = rng.uniform(0, np.pi)
        disc = cv.ellipse(cy, cx, rr * ecc, rr, theta)
        pallor = cv.ellipse(cy, cx, rr * ecc * 0.5, rr * 0.5, theta, soft=rr * 0.35)
        od += (disc * (1.0 - 0.55 * pallor))[..., None] * _RBC * rng.uniform(0.8, 1.15)


def _lobed_nucleus(cv: _Canvas, rng: np.random.Generator, cy: float, cx: float, r: float, n_lobes: int, spread: float) -> np.ndarray:
    """Lobes (ellipses) along an arc joined by thin strands; coverage (size, size)."""
    arc_r = r * rng.uniform(0.38, 0.5) * spread
    start = rng.uniform(0, 2 * np.pi)
    step = rng.uniform(0.9, 1.35) * (2.2 if n_lobes == 2 else 1.0)
    pts = []
    cov = np.zeros((cv.size, cv.size), np.float32)
    for k in range(n_lobes):
        a = start + k * step / max(n_lobes - 1, 1) * (n_lobes - 1) * 0.75
        py, px = cy + arc_r * np.sin(a), cx + arc_r * np.cos(a)
        pts.append((py, px))
        lobe_r = r * rng.uniform(0.2, 0.27) * (1.25 if n_lobes == 2 else 1.0)
        cov = np.maximum(cov, cv.ellipse(py, px, lobe_r * rng.uniform(0.75, 0.95), lobe_r, rng.uniform(0, np.pi)))
    for p0, p1 in zip(pts[:-1], pts[1:]):
        cov = np.maximum(cov, cv.segment(p0, p1, r * rng.uniform(0.07, 0.14)))
    return cov


def _white_cell(cls: str, cv: _Canvas, rng: np.random.Generator, od: np.ndarray, scale: float) -> None:
    """Paint one white cell of class ``cls`` near the image centre into ``od`` (in place)."""
    size = cv.size
    r = _RADIUS[cls] * size * rng.uniform(0.87, 1.13) * scale
    cy, cx = size / 2 + rng.normal(0, 0.04 * size, 2)
    cell = cv.ellipse(cy, cx, r * rng.uniform(0.9, 1.0), r, rng.uniform(0, np.pi))
    cyto = _CYTO[cls] * rng.uniform(0.8, 1.2)
    layer = cell[..., None] * cyto
    tex = _texture(rng, size, 1.2 * size / 64)
    if cls == "neutrophil":
        nuc = _lobed_nucleus(cv, rng, cy, cx, r, int(rng.integers(3, 6)), 1.0)
        nuc_od = _NUCLEUS
        layer += (_granules(rng, size, cell, 0.25, 0.6) * 0.25)[..., None] * _CYTO["eosinophil"]
    elif cls == "eosinophil":
        nuc = _lobed_nucleus(cv, rng, cy, cx, r, 2, 1.15)
        nuc_od = _NUCLEUS
        gran = _granules(rng, size, cell * (1 - 0.7 * nuc), 0.35, 0.75 * size / 64)
        layer += gran[..., None] * _EOS_GRANULE * rng.uniform(0.8, 1.1)
    elif cls == "lymphocyte":
        nr = r * rng.uniform(0.74, 0.9)
        off = (r - nr) * rng.uniform(0, 0.8)
        a = rng.uniform(0, 2 * np.pi)
        nuc = cv.ellipse(cy + off * np.sin(a), cx + off * np.cos(a), nr * rng.uniform(0.88, 1.0), nr, rng.uniform(0, np.pi))
        nuc_od = _NUCLEUS_DARK
    elif cls == "monocyte":
        nr = r * rng.uniform(0.55, 0.68)
        a = rng.uniform(0, 2 * np.pi)
        ny, nx = cy + 0.15 * r * np.sin(a), cx + 0.15 * r * np.cos(a)
        body = cv.ellipse(ny, nx, nr * 0.8, nr, a + np.pi / 2)
        depth = rng.uniform(0.45, 0.85)  # kidney (shallow) to horseshoe (deep) notch
        notch = cv.ellipse(ny + nr * depth * np.sin(a), nx + nr * depth * np.cos(a), nr * 0.45, nr * 0.55, a + np.pi / 2)
        nuc = body * (1 - notch)
        nuc_od = _NUCLEUS_LIGHT
        vac = _granules(rng, size, cell * (1 - nuc), 0.006, 1.0 * size / 64)
        layer *= (1 - 0.6 * vac)[..., None]
    else:  # basophil
        nuc = _lobed_nucleus(cv, rng, cy, cx, r, int(rng.integers(2, 4)), 0.8)
        nuc_od = _NUCLEUS
        gran = _granules(rng, size, cell, 0.3, 0.8 * size / 64)
        layer += gran[..., None] * _BASO_GRANULE * rng.uniform(0.7, 1.0)
    chromatin = np.clip(1 + 0.22 * tex, 0.5, 1.5)
    layer += (nuc * chromatin)[..., None] * nuc_od * rng.uniform(0.85, 1.15)
    np.copyto(od, od * (1 - cell[..., None]) + layer + _PLASMA * cell[..., None])


def _platelets(cv: _Canvas, rng: np.random.Generator, od: np.ndarray, k: int) -> None:
    """Add ``k`` small irregular purple platelets."""
    for _ in range(k):
        cy, cx = rng.uniform(0.2, 0.8, 2) * cv.size
        pr = cv.size / 64 * rng.uniform(1.6, 3.2)
        blob = cv.ellipse(cy, cx, pr * rng.uniform(0.6, 1.0), pr, rng.uniform(0, np.pi))
        blob = blob * np.clip(1 + 0.4 * _texture(rng, cv.size, 0.8), 0, 1.5)
        od += blob[..., None] * _PLATELET * rng.uniform(0.7, 1.2)


def _finish(od: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stain variation, blur, illumination gradient and noise; OD (H, W, 3) -> uint8 RGB (H, W, 3)."""
    size = od.shape[0]
    # stain: global strength and per-channel (hue) shift of the optical density
    od = od * rng.uniform(0.8, 1.2) * np.exp(rng.normal(0, 0.08, 3)).astype(np.float32)
    sigma = rng.uniform(0.0, 1.1) * size / 64
    if sigma > 0.15:
        od = gaussian_filter(od, (sigma, sigma, 0))
    rgb = np.exp(-od)
    a = rng.uniform(0, 2 * np.pi)
    ramp = ((np.arange(size)[:, None] * np.sin(a) + np.arange(size)[None, :] * np.cos(a)) / size - 0.5).astype(np.float32)
    rgb = rgb * (1 + rng.uniform(-0.12, 0.12) * ramp)[..., None] * rng.uniform(0.92, 1.04)
    rgb = rgb + rng.normal(0, rng.uniform(0.004, 0.02), rgb.shape)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def generate_smear_image(cls_name: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One synthetic smear image of class ``cls_name`` as uint8 RGB, shape (size, size, 3)."""
    if cls_name not in SYNTH_CLASSES:
        raise ValueError(f"unknown synthetic class {cls_name!r}; choose from {', '.join(SYNTH_CLASSES)}")
    cv = _Canvas(size)
    od = np.broadcast_to(_PLASMA, (size, size, 3)).copy()
    rbc_r = 0.12 * size * rng.uniform(0.9, 1.1)
    if cls_name == "other":
        _red_cells(cv, rng, od, int(rng.integers(5, 10)), rbc_r, avoid=0.0)
        _platelets(cv, rng, od, int(rng.integers(1, 5)))
    else:
        _red_cells(cv, rng, od, int(rng.integers(3, 8)), rbc_r, avoid=0.3 * size)
        _white_cell(cls_name, cv, rng, od, scale=rbc_r / (0.12 * size))
    return _finish(od, rng)


def _class_of(i: int) -> str:
    return SYNTH_CLASSES[i % len(SYNTH_CLASSES)]


def generate_dataset(out_dir: str | Path, n: int = 800, seed: int = 0, image_size: int = 64) -> Path:
    """Write ``n`` synthetic images as ``out_dir/<class>/<class>_<i>.png`` (balanced classes) and a
    ``synth.json`` marker; returns ``out_dir``. Same ``seed`` -> byte-identical files."""
    out = Path(out_dir)
    for cls in SYNTH_CLASSES:
        (out / cls).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cls = _class_of(i)
        img = generate_smear_image(cls, np.random.default_rng([seed, i]), image_size)
        Image.fromarray(img).save(out / cls / f"{cls}_{i:05d}.png", optimize=False)
    meta = {"n": n, "seed": seed, "image_size": image_size, "classes": list(SYNTH_CLASSES), "synthetic": True}
    (out / _MARKER).write_text(json.dumps(meta, indent=1))
    return out


def _is_complete(path: Path, n: int, seed: int, image_size: int) -> bool:
    """True when ``path`` holds a finished set made with these parameters."""
    try:
        meta = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("n") == n and meta.get("seed") == seed and meta.get("image_size") == image_size


def ensure_synthetic(cache_dir: str | Path, n: int = 800, seed: int = 0, image_size: int = 64) -> Path:
    """Return ``cache_dir`` holding the synthetic set, generating it first if absent or incomplete.

    Generation goes to a temporary sibling folder that is renamed into place, so readers never
    see a half-written set (and concurrent callers do not clash).
    """
    cache = Path(cache_dir)
    if _is_complete(cache, n, seed, image_size):
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".{cache.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate_dataset(tmp, n=n, seed=seed, image_size=image_size)
        if cache.exists() and not _is_complete(cache, n, seed, image_size):
            shutil.rmtree(cache, ignore_errors=True)
        try:
            os.rename(tmp, cache)
        except OSError:
            if not _is_complete(cache, n, seed, image_size):  # somebody else won the race, or not
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


def default_synth_dir(n: int, seed: int, image_size: int = 64) -> Path:
    """Cache folder of the built-in set: ``$CELLSSL_CACHE`` or ``~/.cache/cellssl``, then
    ``synth-<n>-<seed>`` (plus ``-<size>px`` when image_size is not 64)."""
    root = Path(os.environ.get("CELLSSL_CACHE") or Path.home() / ".cache" / "cellssl")
    name = f"synth-{n}-{seed}" + ("" if image_size == 64 else f"-{image_size}px")
    return root / name
