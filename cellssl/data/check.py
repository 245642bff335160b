"""``cellssl datasets check DIR``: a quick health report of an image folder before training."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from cellssl.data.io import ImageReadError, list_images, read_raw_image
from cellssl.data.scale import object_diameter, summarise_sizes
from cellssl.errors import DataError

SIZE_SAMPLE = 200  # images whose cell size is measured (evenly spaced over the folder)


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _class_of(root: Path, path: Path) -> str:
    """The class sub-folder of ``path`` below ``root``, or "(unlabelled)" for top-level files."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else "(unlabelled)"


def check_dataset(path: str | Path, um_per_px: float | None = None) -> dict[str, Any]:
    """Read every image below ``path`` (listed as training lists them: :func:`~cellssl.data.io.list_images`,
    hidden files such as macOS ``._x.png`` copies skipped) and summarise it. A folder without
    images raises DataError.

    Returns a dict: ``root``, ``n_files``, ``n_readable``, ``classes`` {name: count} (first-level
    sub-folder, "(unlabelled)" for top-level files), ``min_size``/``max_size`` as (H, W),
    ``channels`` {C: count}, ``dtypes`` {dtype: count}, ``duplicates`` (groups of paths with the
    same SHA1), ``unreadable`` (list of (path, reason)) and ``cell_size``: the apparent cell size
    (:func:`~cellssl.data.scale.object_diameter`, median over up to 200 evenly spaced images;
    in µm too when ``um_per_px`` is given), so that a scale mismatch between two labs is visible.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: pass the folder that holds the images")
    files = list_images(root)
    if not files:
        raise DataError(f"no images found in {root}: expected image files (.png .jpg .tif ...) or one sub-folder "
                        "per class")
    classes: Counter[str] = Counter()
    channels: Counter[int] = Counter()
    dtypes: Counter[str] = Counter()
    hashes: dict[str, list[str]] = defaultdict(list)
    unreadable: list[tuple[str, str]] = []
    min_hw, max_hw = None, None
    measure = set(np.linspace(0, len(files) - 1, min(SIZE_SAMPLE, len(files))).round().astype(int).tolist())
    diameters: list[float] = []
    for i, f in enumerate(files):
        rel = str(f.relative_to(root))
        classes[_class_of(root, f)] += 1
        try:
            hashes[_sha1(f)].append(rel)
            arr = read_raw_image(f)
        except ImageReadError as exc:
            unreadable.append((rel, exc.reason))
            continue
        except OSError as exc:
            unreadable.append((rel, str(exc)))
            continue
        h, w, c = arr.shape
        if i in measure:
            diameters.append(object_diameter(arr))
        channels[c] += 1
        dtypes[str(arr.dtype)] += 1
        min_hw = (h, w) if min_hw is None else (min(min_hw[0], h), min(min_hw[1], w))
        max_hw = (h, w) if max_hw is None else (max(max_hw[0], h), max(max_hw[1], w))
    return {
        "root": str(root),
        "n_files": len(files),
        "n_readable": len(files) - len(unreadable),
        "classes": dict(sorted(classes.items())),
        "min_size": min_hw,
        "max_size": max_hw,
        "channels": dict(sorted(channels.items())),
        "dtypes": dict(sorted(dtypes.items())),
        "duplicates": [sorted(v) for v in hashes.values() if len(v) > 1],
        "unreadable": unreadable,
        "cell_size": summarise_sizes(diameters, um_per_px),
    }


def format_check_report(report: dict[str, Any]) -> str:
    """Human-readable text of a :func:`check_dataset` report (several lines)."""
    lines = [f"{report['root']}: {report['n_files']} image files, {report['n_readable']} readable"]
    if report["n_files"] == 0:
        lines.append("  no images found: expected image files (.png .jpg .tif ...) or one sub-folder per class")
        return "\n".join(lines)
    lines.append("  classes: " + ", ".join(f"{k} {v}" for k, v in report["classes"].items()))
    if report["min_size"]:
        (h0, w0), (h1, w1) = report["min_size"], report["max_size"]
        lines.append(f"  size (HxW): min {h0}x{w0}, max {h1}x{w1}")
        lines.append("  channels: " + ", ".join(f"{k}: {v}" for k, v in report["channels"].items()))
        lines.append("  dtypes: " + ", ".join(f"{k}: {v}" for k, v in report["dtypes"].items()))
    size = report.get("cell_size") or {}
    if size.get("n_measured"):
        um = f" = {size['median_um']:.1f} µm at {size['um_per_px']:g} µm/px" if size.get("median_um") else \
            " (give --um-per-px for µm)"
        lines.append(f"  apparent cell size (diameter of the centre object): median {size['median_px']:.1f} px{um}, "
                     f"IQR {size['q25_px']:.1f}-{size['q75_px']:.1f} px over {size['n_measured']} images")
    dups = report["duplicates"]
    lines.append(f"  duplicate files (same SHA1): {len(dups)} group(s)")
    for group in dups[:20]:
        lines.append("    " + " = ".join(group))
    if len(dups) > 20:
        lines.append(f"    ... and {len(dups) - 20} more")
    bad = report["unreadable"]
    lines.append(f"  unreadable: {len(bad)}")
    for rel, reason in bad[:50]:
        lines.append(f"    {rel}: {reason}")
    if len(bad) > 50:
        lines.append(f"    ... and {len(bad) - 50} more")
    return "\n".join(lines)
