"""Stain normalisation for bright-field RGB images (Macenko, Reinhard) on torchstain's numpy backend.

A second lab's smears or slides differ from the first lab's in stain batch, staining time and
scanner colour response. Stain normalisation maps every target image onto the colour statistics
of a *reference* (one image, or the pooled/mean statistics of a folder of source-lab images):

* **Macenko** (Macenko et al., ISBI 2009): per image, the two stain vectors are found in optical
  density space (OD = -log((I + 1) / Io)) from the angular extremes of the stained pixels on the
  plane of the two largest eigenvectors; concentrations are solved by least squares, rescaled so
  their 99th percentile matches the reference, and re-coloured with the reference stain matrix.
* **Reinhard** (Reinhard et al., 2001): per-channel mean/std matching in L*a*b* space.

Both use ``torchstain`` (numpy backend, ``torchstain.numpy.normalizers``) unchanged: its
``NumpyMacenkoNormalizer.fit`` takes any (..., 3) uint8 array, so a folder reference is fitted on
pixels pooled from up to 64 of its images; for Reinhard a folder reference is the *mean* of the
per-image L*a*b* means and stds, which we set on the torchstain object directly (its ``fit``
only takes one image). What torchstain does not do, and this module adds: float [0, 1] in/out,
a fallback to the identity (with a warning) for images with too little stain (blank background,
saturated or empty crops, where the Macenko eigen-decomposition is undefined and torchstain
raises or returns NaNs), and picklable callables for DataLoader worker processes.

Example::

    norm = build_stain_normalizer("macenko", "source_lab/")   # image or folder
    out = norm(img)   # img: float32 (H, W, 3) in [0, 1] -> same shape/dtype/range
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer
from torchstain.numpy.utils import get_mean_std, lab_split, rgb2lab

from cellssl.data.io import ImageReadError, folder_to_folder_images, list_images, output_folder, read_image
from cellssl.errors import ConfigError, DataError

__all__ = ["StainNormalizer", "build_stain_normalizer", "normalize_folder", "stain_statistics", "METHODS"]

METHODS = ("macenko", "reinhard")
_MAX_REF_IMAGES = 64  # images of a reference folder used for fitting
_MIN_STAINED_FRACTION = 0.01  # Macenko: below this fraction of stained pixels -> identity
_MIN_STAINED_PIXELS = 16
_IO = 240  # transmitted light intensity for optical density (torchstain's default)
_BETA = 0.15  # OD threshold of "stained" pixels (torchstain's default)


class StainWarning(UserWarning):
    """An image that could not be stain-normalised and was left unchanged."""


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _rgb(img: np.ndarray, what: str) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise DataError(
            f"stain normalisation needs RGB bright-field images (H, W, 3); {what} has shape {tuple(img.shape)}: "
            "set data.stain_normalize=none for fluorescence or grey-scale data"
        )
    return img


def _read_rgb_uint8(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) of an RGB file; ImageReadError (naming the file) for any other channel count."""
    img = read_image(path, modality="brightfield")
    if img.shape[2] != 3:
        raise ImageReadError(path, f"has {img.shape[2]} channel(s) ({'grey-scale' if img.shape[2] == 1 else 'not RGB'}); "
                                   "stain normalisation needs RGB bright-field images")
    return _to_uint8(img)


def _reference_images(reference: str | Path) -> list[np.ndarray]:
    """The reference as uint8 RGB arrays: one image, or up to 64 evenly spaced images of a folder."""
    ref = Path(reference).expanduser()
    if not ref.exists():
        raise ConfigError(f"stain reference {ref} does not exist: give a reference image or a folder of source images")
    if ref.is_file():
        try:
            return [_read_rgb_uint8(ref)]
        except ImageReadError as exc:
            raise DataError(f"stain reference {ref}: {exc.reason}") from None
    files = list_images(ref)
    if not files:
        raise DataError(f"stain reference folder {ref} holds no images")
    pick = np.unique(np.linspace(0, len(files) - 1, min(_MAX_REF_IMAGES, len(files))).astype(int))
    out = []
    for i in pick:
        try:
            out.append(_read_rgb_uint8(files[i]))
        except ImageReadError:
            continue
    if not out:
        raise DataError(f"none of the reference images in {ref} could be read")
    return out


def _stained_fraction(img_u8: np.ndarray) -> tuple[int, float]:
    od = -np.log((img_u8.reshape(-1, 3).astype(np.float64) + 1.0) / _IO)
    stained = int((~np.any(od < _BETA, axis=1)).sum())
    return stained, stained / max(1, od.shape[0])


class StainNormalizer:
    """Callable float32 (H, W, 3) in [0, 1] -> normalised float32 (H, W, 3) in [0, 1].

    Picklable (plain numpy state). Images that cannot be normalised (too little stain, a
    numerical failure) are returned unchanged; the first few such cases warn (:class:`StainWarning`),
    ``n_fallback`` counts all of them in this process.
    """

    def __init__(self, method: str, reference: str | Path | None = None, *, images: list[np.ndarray] | None = None):
        method = str(method).lower()
        if method not in METHODS:
            raise ConfigError(f"unknown stain normalisation '{method}': use one of {', '.join(METHODS)}")
        self.method = method
        self.reference = str(reference) if reference is not None else None
        self.n_fallback = 0
        self._warned = 0
        refs = images if images is not None else _reference_images(reference) if reference is not None else None
        if refs is None:
            raise ConfigError(f"stain normalisation '{method}' needs a reference image or folder (data.stain_reference)")
        refs = [_rgb(np.asarray(r), "the reference") for r in refs]
        refs = [r if r.dtype == np.uint8 else _to_uint8(r) for r in refs]
        self._norm = self._fit(refs)

    # ---- fitting ------------------------------------------------------------------------
    def _fit(self, refs: list[np.ndarray]):
        if self.method == "macenko":
            # Pool the stained pixels of all reference images (torchstain reshapes to (-1, 3)).
            pix = np.concatenate([r.reshape(-1, 3) for r in refs])
            stained, _ = _stained_fraction(pix)
            if stained < _MIN_STAINED_PIXELS * 4:
                raise DataError(
                    f"the stain reference {self.reference or ''} has almost no stained pixels "
                    f"({stained}); choose a reference with cells/tissue in it"
                )
            norm = NumpyMacenkoNormalizer()
            try:
                with np.errstate(all="ignore"):
                    norm.fit(pix[:, None, :], Io=_IO, beta=_BETA)
            except Exception as exc:  # torchstain raises LinAlgError/IndexError on degenerate input
                raise DataError(f"cannot fit Macenko stain vectors on {self.reference}: {exc}") from None
            if not (np.isfinite(norm.HERef).all() and np.isfinite(norm.maxCRef).all()):
                raise DataError(f"cannot fit Macenko stain vectors on {self.reference}: non-finite result")
            he = np.asarray(norm.HERef, dtype=np.float64)
            cos = abs(float(he[:, 0] @ he[:, 1]) / max(float(np.linalg.norm(he[:, 0]) * np.linalg.norm(he[:, 1])), 1e-12))
            if cos > 0.995:
                raise DataError(f"the stain reference {self.reference} shows only one stain colour (Macenko needs two); "
                                "use a folder of source images as the reference, or method reinhard")
            return norm
        norm = NumpyReinhardNormalizer()
        stats = np.array([_lab_stats(r) for r in refs])  # (n, 2, 3): mean, std per L, a, b
        norm.target_means = stats[:, 0].mean(axis=0)
        norm.target_stds = stats[:, 1].mean(axis=0)
        if not (norm.target_stds > 1e-6).all():
            raise DataError(f"the stain reference {self.reference} has a flat colour channel; choose another reference")
        return norm

    # ---- applying -----------------------------------------------------------------------
    def _fallback(self, why: str) -> None:
        self.n_fallback += 1
        if self._warned < 3:
            self._warned += 1
            more = " (further cases are not reported)" if self._warned == 3 else ""
            warnings.warn(f"{self.method} stain normalisation skipped for an image: {why}; left unchanged{more}",
                          StainWarning, stacklevel=3)

    def normalize_uint8(self, img_u8: np.ndarray) -> np.ndarray | None:
        """uint8 (H, W, 3) -> normalised uint8 (H, W, 3), or None when the image cannot be normalised."""
        if self.method == "macenko":
            stained, frac = _stained_fraction(img_u8)
            if stained < _MIN_STAINED_PIXELS or frac < _MIN_STAINED_FRACTION:
                self._fallback(f"too little stain ({100 * frac:.1f}% stained pixels)")
                return None
            try:
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = self._macenko(img_u8)
            except Exception as exc:  # LinAlgError / IndexError on degenerate images
                self._fallback(f"{type(exc).__name__}: {exc}")
                return None
            if out is None:
                self._fallback("stain vectors could not be estimated")
            return out
        stds = _lab_stats(img_u8)[1]
        if not (stds > 1e-3).all():
            self._fallback("flat colour channel")
            return None
        with np.errstate(all="ignore"):
            out = self._norm.normalize(img_u8.astype(np.float32))
        return out

    def _macenko(self, img_u8: np.ndarray) -> np.ndarray | None:
        """Macenko with the image's stain vectors matched to the reference ones.

        torchstain estimates the image's stain matrix (``fit`` on the image); unlike torchstain's
        ``normalize`` (which orders H/E by "larger red OD first", a heuristic that flips on
        shifted or weak stains and then swaps the colours) the two vectors are ordered to match
        the reference vectors (larger |cosine| of the assignment). Concentrations: least squares
        ``OD = HE·C``; each stain is scaled so its 99th percentile matches the reference;
        ``I = Io·exp(-HE_ref·C')``, as torchstain.
        """
        est = NumpyMacenkoNormalizer()
        est.fit(img_u8, Io=_IO, beta=_BETA)
        he, ref = np.asarray(est.HERef, dtype=np.float64), np.asarray(self._norm.HERef, dtype=np.float64)
        if not np.isfinite(he).all():
            return None
        cos = np.abs((he / np.linalg.norm(he, axis=0)).T @ (ref / np.linalg.norm(ref, axis=0)))  # (2, 2)
        if cos[0, 1] + cos[1, 0] > cos[0, 0] + cos[1, 1]:
            he = he[:, ::-1]
        h, w, _ = img_u8.shape
        od = -np.log((img_u8.reshape(-1, 3).astype(np.float64) + 1.0) / _IO)
        conc = np.linalg.lstsq(he, od.T, rcond=None)[0]  # (2, N)
        max_c = np.percentile(conc, 99, axis=1)
        if not (np.isfinite(max_c).all() and (max_c > 1e-6).all()):
            return None
        scale = np.clip(np.asarray(self._norm.maxCRef, dtype=np.float64) / max_c, 0.2, 5.0)  # no blow-ups
        conc = conc * scale[:, None]
        out = np.clip(_IO * np.exp(-ref @ conc), 0, 255)
        return out.T.reshape(h, w, 3).astype(np.uint8)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[2] != 3:
            self._fallback(f"not an RGB image (shape {tuple(img.shape)})")
            return img
        out = self.normalize_uint8(_to_uint8(img))
        if out is None:
            return np.asarray(img, dtype=np.float32)
        res = out.astype(np.float32) / 255.0
        if not np.isfinite(res).all():
            self._fallback("non-finite result")
            return np.asarray(img, dtype=np.float32)
        return res

    def __repr__(self) -> str:
        return f"StainNormalizer({self.method!r}, reference={self.reference!r})"


def _lab_stats(img_u8: np.ndarray) -> np.ndarray:
    """(2, 3): mean and std of L, a, b (torchstain's conventions) of a uint8 RGB image."""
    lab = rgb2lab(img_u8.astype(np.float32) / 255.0)
    st = np.array([get_mean_std(x) for x in lab_split(lab)], dtype=np.float64)  # (3, 2)
    return st.T


def stain_statistics(img: np.ndarray) -> dict[str, np.ndarray]:
    """Colour statistics used to compare stains: ``od_mean`` (3,) mean optical density of the
    stained pixels (all pixels when none is stained), ``lab_mean`` / ``lab_std`` (3,)."""
    u8 = img if np.asarray(img).dtype == np.uint8 else _to_uint8(img)
    od = -np.log((u8.reshape(-1, 3).astype(np.float64) + 1.0) / 256.0)
    stained = od[(od > _BETA).any(axis=1)]
    lab = _lab_stats(u8)
    return {"od_mean": (stained if len(stained) else od).mean(axis=0), "lab_mean": lab[0], "lab_std": lab[1]}


def build_stain_normalizer(method: str, reference: str | Path | None) -> Callable[[np.ndarray], np.ndarray]:
    """A picklable stain normaliser fitted on ``reference`` (an image, or a folder: pooled /
    mean statistics of up to 64 of its images). ``method``: ``macenko`` | ``reinhard``.

    The callable maps float32 (H, W, 3) in [0, 1] to float32 (H, W, 3) in [0, 1]; images with too
    little stain come back unchanged (one :class:`StainWarning` for the first few).
    """
    if reference is None or str(reference) == "":
        raise ConfigError(f"stain normalisation '{method}' needs a reference: set data.stain_reference "
                          "(an image or a folder of source-lab images)")
    return StainNormalizer(method, reference)


def _save_like(arr: np.ndarray, src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    suffix = src.suffix.lower()
    im = Image.fromarray(arr)
    if suffix in (".jpg", ".jpeg"):
        im.save(dst, quality=95)
    elif suffix in (".png", ".bmp", ".tif", ".tiff", ".webp"):
        im.save(dst)
    else:  # .gif and friends: write PNG next to the original name
        im.save(dst.with_suffix(".png"))


def normalize_folder(src: str | Path, out: str | Path, reference: str | Path, method: str = "macenko") -> int:
    """Stain-normalise every image below ``src`` into ``out`` (same sub-folders and file names,
    same format: PNG stays PNG, JPEG stays JPEG at quality 95). Returns the number of images written.

    ``reference``: an image or a folder (e.g. the source lab's images). Images with too little
    stain are copied unchanged (warning); unreadable and non-RGB (e.g. grey-scale) files are
    skipped with a warning naming each. ``out`` must not hold files yet; it is written as a
    hidden temporary folder renamed to ``out`` only when every image is done, so an interrupted
    run leaves no ``out`` at all.
    """
    src, out, files = folder_to_folder_images(src, out)
    norm = StainNormalizer(method, reference)
    n, skipped = 0, 0
    with output_folder(out) as tmp:
        for p in files:
            try:
                img = _read_rgb_uint8(p)
            except ImageReadError as exc:
                warnings.warn(f"skipping {p}: {exc.reason}", StainWarning, stacklevel=2)
                skipped += 1
                continue
            res = norm.normalize_uint8(img)
            _save_like(img if res is None else res, p, tmp / p.relative_to(src))
            n += 1
    if skipped:
        warnings.warn(f"{skipped} of {len(files)} images skipped (named above); {n} written to {out}", StainWarning,
                      stacklevel=2)
    return n
