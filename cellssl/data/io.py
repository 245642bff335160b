"""Reading microscopy images into float32 arrays of shape (H, W, C) with values in [0, 1].

Bright-field images (JPEG/PNG/BMP, 8-bit RGB) are read with Pillow; fluorescence images
(TIFF / OME-TIFF: 8/16-bit or float, 2-D, channel-first or channel-last, multi-page stacks)
with tifffile. Every reader failure becomes :class:`ImageReadError`, a one-line
:class:`~cellssl.errors.DataError` that names the file and the reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from cellssl.errors import ConfigError, DataError

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = PIL_SUFFIXES | TIFF_SUFFIXES
INTENSITY_MODES = ("auto", "uint8", "percentile", "minmax", "none")

_CHANNEL_AXES = set("CS")


class ImageReadError(DataError):
    """An image file that cannot be read ("cannot read image FILE: reason")."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {path}: {reason}")


def is_image_file(path: str | Path) -> bool:
    """True when the file name ends with one of :data:`IMAGE_SUFFIXES` (``.ome.tif`` included)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_hidden_name(part: str) -> bool:
    """Hidden files/folders (``.x``, macOS ``._x`` copies) and macOS zip debris (``__MACOSX``)."""
    return part.startswith(".") or part == "__MACOSX"


OUTPUT_MARKER = ".cellssl-output"  # written into the folders a command fills (predict, select)


def is_output_folder(folder: str | Path) -> bool:
    """True for a folder that a cellssl command wrote its results into (it holds :data:`OUTPUT_MARKER`)."""
    return (Path(folder) / OUTPUT_MARKER).is_file()


def mark_output_folder(folder: str | Path, command: str) -> Path:
    """Mark ``folder`` as the output of ``cellssl COMMAND``: :func:`list_images` then never reads its
    pictures (contact sheets, copies of cells) back as data when it lies inside a data folder."""
    marker = Path(folder) / OUTPUT_MARKER
    marker.write_text(f"written by 'cellssl {command}': cellssl commands do not read the images below this folder "
                      "as data when it lies inside a data folder\n")
    return marker


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """The image files of ``folder`` (sorted), as every command sees them: files with an image
    suffix, skipping hidden files and folders (``.x``, macOS ``._x`` copies, ``__MACOSX``) and the
    output folders of cellssl commands below ``folder`` (:func:`is_output_folder`: e.g.
    ``predict --out DATA/predictions``, whose contact sheet is no cell)."""
    folder = Path(folder)
    if not recursive:
        return sorted(p for p in folder.iterdir() if is_image_file(p) and not is_hidden_name(p.name) and p.is_file())
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_hidden_name(d) and not is_output_folder(Path(here, d))]
        found += [Path(here, f) for f in files if is_image_file(f) and not is_hidden_name(f)]
    return sorted(p for p in found if p.is_file())


def relative_path(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root`` as a string, or ``path`` itself when it is not below ``root``."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def folder_to_folder_images(src: str | Path, out: str | Path) -> tuple[Path, Path, list[Path]]:
    """Image files below ``src`` for a command that writes a transformed copy into ``out``.

    Lists images as :func:`list_images` (hidden files skipped), without anything already inside
    ``out``; one-line errors for a missing ``src``, ``out == src``, an ``out`` that already holds
    files, or no images. Returns ``(src, out, sorted files)``.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise DataError(f"{src} is not a folder of images")
    if out.resolve() == src.resolve():
        raise ConfigError("the output folder must differ from the input folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists{'' if out.is_dir() else ' (a file)'}: nothing is overwritten; "
                          "choose another output folder or delete it")
    files = [q for q in list_images(src) if out.resolve() not in q.resolve().parents]
    if not files:
        raise DataError(f"no images found in {src}")
    return src, out, files


def check_output_folder(out: str | Path, *, overwrite: bool, command: str, own_files: Iterable[str],
                        marker: str) -> None:
    """Refuse an ``--out`` that already holds files (nothing is overwritten silently). With
    ``overwrite`` an earlier output of ``command`` may be replaced: a folder that holds ``marker``
    and only files the command writes (``own_files``); a folder of the user's never is."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file: choose a folder")
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return
    listed = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
    if not overwrite:
        raise ConfigError(f"--out {out} already holds files ({listed}): nothing is overwritten; replace an earlier "
                          f"`cellssl {command}` output with --overwrite, or choose another --out")
    foreign = [n for n in present if n not in set(own_files)]
    if foreign or marker not in present:
        what = (f"holds {foreign[0]}, which `cellssl {command}` does not write" if foreign
                else f"has no {marker}, so it is not an earlier `cellssl {command}` output")
        raise ConfigError(f"--out {out} {what}: --overwrite replaces only an earlier {command} output; move "
                          f"{'it' if foreign else 'its files'} or choose another --out")


@contextlib.contextmanager
def output_folder(out: str | Path, replace: bool = False) -> Iterator[Path]:
    """Write a folder atomically: yields a hidden temporary sibling ``.<name>.partial-*`` that is
    renamed to ``out`` only when the block completes; on any error (or Ctrl-C) it is removed, so
    an interrupted command never leaves a half-written ``out`` that looks finished. ``replace``:
    an ``out`` that holds files (checked by :func:`check_output_folder`) is swapped out whole at
    the end, so no file of it stays beside the new ones."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty folder made beforehand (nothing is lost)
        old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
        if replace and out.is_dir():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old.is_dir():
                os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def output_file(path: str | Path) -> Iterator[Path]:
    """Write one file atomically: yields a hidden temporary sibling ``.<stem>.partial-*<suffix>``
    (same suffix, so e.g. ``np.savez`` keeps the name) that replaces ``path`` only when the block
    completes; on any error it is removed. A killed command leaves no ``path`` that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.partial-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_pil(path: Path) -> np.ndarray:
    """Decode a Pillow-readable file to a (H, W) or (H, W, C) array in its native dtype."""
    try:
        data = path.read_bytes()  # one read call: much faster than Pillow's chunked reads on slow disks
    except OSError as exc:
        raise ImageReadError(path, f"cannot open file ({exc})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # forces a full decode: truncated files fail here
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("1", "LA"):
                im = im.convert("L")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
                im = im.convert("RGB")
            arr = np.asarray(im)
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image Pillow can identify (wrong suffix or corrupt file)") from None
    except Image.DecompressionBombError as exc:  # a small file that declares a giant image
        raise ImageReadError(path, f"declares an image too large to decode safely ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, f"corrupt or truncated file ({exc})") from None
    if arr.ndim == 3 and arr.shape[2] == 4:  # RGBA: drop alpha
        arr = arr[:, :, :3]
    return arr


def _read_tiff(path: Path, page: int | None, projection: str) -> np.ndarray:
    """Read a TIFF series to (H, W, C): page axes are selected (``page``) or projected."""
    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            arr = series.asarray()
            axes = series.axes
    except Exception as exc:  # tifffile raises many types for broken files
        raise ImageReadError(path, f"unreadable TIFF ({type(exc).__name__}: {exc})") from None
    return _arrange_axes(path, np.asarray(arr), axes, page, projection)


def _arrange_axes(path: Path, arr: np.ndarray, axes: str, page: int | None, projection: str) -> np.ndarray:
    """Turn an array with tifffile ``axes`` (e.g. "ZCYX", "QYX", "YXS") into (H, W, C)."""
    if len(axes) != arr.ndim or "Y" not in axes or "X" not in axes:
        axes = _guess_axes(arr.shape)
    # An unnamed leading axis (Q/I) of at most 4 planes is read as channels unless a page is asked for.
    if page is None and not (set(axes) & _CHANNEL_AXES):
        for i, a in enumerate(axes):
            if a in "QI" and arr.shape[i] <= 4:
                axes = axes[:i] + "C" + axes[i + 1 :]
                break
    page_dims = [i for i, a in enumerate(axes) if a not in "YX" and a not in _CHANNEL_AXES]
    chan_dims = [i for i, a in enumerate(axes) if a in _CHANNEL_AXES]
    order = page_dims + [axes.index("Y"), axes.index("X")] + chan_dims
    arr = np.transpose(arr, order)
    n_pages = int(np.prod([arr.shape[i] for i in range(len(page_dims))])) if page_dims else 1
    arr = arr.reshape((n_pages, arr.shape[len(page_dims)], arr.shape[len(page_dims) + 1], -1))
    if page is not None:
        if not -n_pages <= page < n_pages:
            raise ImageReadError(path, f"has {n_pages} page(s); data.tiff_page={page} is out of range")
        return arr[page]
    if n_pages == 1:
        return arr[0]
    if projection == "max":
        return arr.max(axis=0)
    if projection == "mean":
        return arr.astype(np.float32).mean(axis=0)
    raise DataError(f"unknown tiff projection '{projection}': use max or mean")


def _guess_axes(shape: tuple[int, ...]) -> str:
    """Axes for an array without usable metadata: small last dim = channels, else leading = pages."""
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "YXC" if shape[2] <= 4 < shape[0] else "QYX"
    return "Q" * (len(shape) - 2) + "YX"


def _read_raw(path: Path, tiff_page: int | None, tiff_projection: str) -> np.ndarray:
    """Decode ``path`` to an (H, W, C) array in its stored dtype (no intensity scaling)."""
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty (0 bytes)")
    if path.suffix.lower() in TIFF_SUFFIXES:
        arr = _read_tiff(path, tiff_page, tiff_projection)
    else:
        arr = _read_pil(path)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] == 0:
        raise ImageReadError(path, f"unsupported array shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ImageReadError(path, f"image is {arr.shape[1]}x{arr.shape[0]} pixels; need at least 2x2")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if np.iscomplexobj(arr):
        raise ImageReadError(path, "complex-valued pixels are not supported")
    return arr


def scale_intensity(
    arr: np.ndarray,
    intensity: str = "auto",
    percentiles: Sequence[float] = (0.5, 99.5),
    value_range: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Map a raw (H, W, C) array to float32 in [0, 1]; non-finite pixels become 0.

    ``auto``: uint8 -> /255, anything else -> per-channel percentile scaling. ``uint8``: fixed
    range, divide by the integer dtype's maximum (255 or 65535; floats are only clipped).
    ``percentile``: per channel, ``percentiles`` low/high -> 0/1. ``minmax``: per-channel min/max.
    ``none``: cast and clip to [0, 1]. ``value_range`` = (lo, hi) per channel overrides the
    per-image statistics (dataset-wide percentiles).
    """
    if intensity not in INTENSITY_MODES:
        raise DataError(f"unknown data.intensity '{intensity}': use one of {', '.join(INTENSITY_MODES)}")
    if intensity == "auto":
        intensity = "uint8" if arr.dtype == np.uint8 else "percentile"
    if intensity == "uint8" and arr.dtype == np.uint8 and value_range is None:  # fast path
        return np.multiply(arr, np.float32(1 / 255), dtype=np.float32)
    x = arr.astype(np.float32, copy=True)
    if np.issubdtype(arr.dtype, np.floating):
        x[~np.isfinite(x)] = np.nan
    if value_range is not None and intensity in ("percentile", "minmax"):
        lo, hi = (np.asarray(v, np.float32).reshape(1, 1, -1) for v in value_range)
        x = _stretch(x, lo, hi)
    elif intensity == "uint8":
        if np.issubdtype(arr.dtype, np.integer):
            x /= float(np.iinfo(arr.dtype).max)
    elif intensity in ("percentile", "minmax"):
        lo, hi = channel_range(x, percentiles if intensity == "percentile" else (0.0, 100.0))
        x = _stretch(x, lo.reshape(1, 1, -1), hi.reshape(1, 1, -1))
    np.nan_to_num(x, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    np.clip(x, 0.0, 1.0, out=x)
    return x


def channel_range(x: np.ndarray, percentiles: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, high) percentiles of an (H, W, C) array, ignoring NaN; each of shape (C,)."""
    flat = x.reshape(-1, x.shape[-1])
    if np.isnan(flat).any():
        with warnings.catch_warnings():  # an all-NaN channel gives NaN, handled below
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanpercentile(flat, list(percentiles), axis=0)
    else:
        lo, hi = np.percentile(flat, list(percentiles), axis=0)
    # a channel whose percentiles coincide (sparse signal) falls back to its min/max
    flat_ch = ~(hi > lo)
    if flat_ch.any():
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mn, mx = np.nanmin(flat, axis=0), np.nanmax(flat, axis=0)
        lo = np.where(flat_ch, mn, lo)
        hi = np.where(flat_ch, mx, hi)
    return np.nan_to_num(lo.astype(np.float32)), np.nan_to_num(hi.astype(np.float32))


def _stretch(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(x - lo) / (hi - lo) per channel; a constant channel maps to 0."""
    span = hi - lo
    safe = np.where(span > 0, span, 1.0).astype(np.float32)
    out = (x - lo) / safe
    return np.where(span > 0, out, 0.0).astype(np.float32)


def convert_channels(arr: np.ndarray, channels: int, path: str | Path = "<array>") -> np.ndarray:
    """Make an (H, W, C) array have ``channels`` channels: 1 -> 3 replicates, 3 -> 1 averages."""
    c = arr.shape[2]
    if c == channels:
        return arr
    if c == 1 and channels == 3:
        return np.repeat(arr, 3, axis=2)
    if c == 3 and channels == 1:
        return arr.mean(axis=2, keepdims=True, dtype=np.float32)
    raise ImageReadError(path, f"has {c} channel(s) but {channels} are expected (data.channels)")


def read_image(
    path: str | Path,
    *,
    modality: str = "brightfield",
    intensity: str = "auto",
    percentiles: Sequence[float] = (0.5, 99.5),
    tiff_page: int | None = None,
    tiff_projection: str = "max",
    channels: int | None = None,
    value_range: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Read one image file as float32 (H, W, C) in [0, 1].

    JPEG/PNG/BMP via Pillow (RGB -> C=3, grayscale -> C=1, RGBA -> alpha dropped); TIFF via
    tifffile (2-D, (C, H, W), (H, W, C), multi-page: ``tiff_page`` picks a page, otherwise the
    pages are projected with ``tiff_projection`` max/mean). Intensity handling: see
    :func:`scale_intensity`. ``channels`` converts 1 <-> 3 channels, other mismatches raise.
    ``modality`` is accepted for symmetry with :class:`~cellssl.config.DataConfig`; the
    ``auto`` intensity rule already follows the dtype. Raises :class:`ImageReadError`.
    """
    path = Path(path)
    arr = _read_raw(path, tiff_page, tiff_projection)
    out = scale_intensity(arr, intensity, percentiles, value_range)
    if channels is not None:
        out = convert_channels(out, channels, path)
    return np.ascontiguousarray(out, dtype=np.float32)


def read_raw_image(path: str | Path, *, tiff_page: int | None = None, tiff_projection: str = "max") -> np.ndarray:
    """The stored pixels of an image as (H, W, C) in the file's dtype (no scaling); raises ImageReadError."""
    return _read_raw(Path(path), tiff_page, tiff_projection)


def array_to_float(arr: np.ndarray, intensity: str = "auto", percentiles: Sequence[float] = (0.5, 99.5)) -> np.ndarray:
    """An in-memory (H, W) / (H, W, C) array -> float32 (H, W, C) in [0, 1] (same rules as files)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(scale_intensity(arr, intensity, percentiles))
