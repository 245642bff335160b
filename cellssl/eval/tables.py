"""Outputs that other tools open: AnnData ``.h5ad`` (scanpy) and Parquet tables (pandas / Arrow).

``cellssl embed --format h5ad`` writes an AnnData file: ``obsm["X_cellssl"]`` the features (N, F),
``obs`` one row per image (``path``, ``label``, ``folder``, ``lab``, ``height``, ``width``,
``channels``), ``uns["cellssl"]`` what produced them (checkpoint, recipe, cellssl version).
``--format parquet`` writes the same ``obs`` columns plus ``features`` (a fixed-size list of
float32) as one Parquet table; ``predict --format parquet`` writes ``predictions.parquet`` beside
``predictions.csv``, same columns, typed values. Every file is written to a temporary name in the
destination folder and renamed when complete, so an interrupted or failed write leaves nothing
that looks finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cellssl import __version__
from cellssl.data.io import ImageReadError, output_file, read_raw_image
from cellssl.errors import DataError
from cellssl.eval.features import FeatureSet, load_features, save_embeddings
from cellssl.eval.report import plot_embedding_groups
from cellssl.eval.settings import EMBED_FORMATS, PREDICT_FORMATS

__all__ = ["EMBED_FORMATS", "PREDICT_FORMATS", "SUFFIXES", "FEATURES_KEY", "resolve_output", "check_writable",
           "obs_frame", "uns_info", "write_h5ad", "write_parquet_features", "csv_to_parquet", "PREDICTION_TYPES",
           "embed_outputs", "npz_to_h5ad"]

SUFFIXES = {".npz": "npz", ".h5ad": "h5ad", ".parquet": "parquet", ".pq": "parquet"}
FEATURES_KEY = "X_cellssl"  # obsm key of the features (scanpy: use_rep="X_cellssl")
# predictions.csv columns that are not text, and how to read them
PREDICTION_TYPES: dict[str, Callable[[pd.Series], pd.Series]] = {
    "probability": lambda s: pd.to_numeric(s.replace("", np.nan), errors="coerce").astype("float64"),
    "distance": lambda s: pd.to_numeric(s.replace("", np.nan), errors="coerce").astype("float64"),
    "unsure": lambda s: s.str.lower().isin(["yes", "true", "1"]),
}


def resolve_output(out: str | Path, fmt: str = "auto") -> tuple[Path, str]:
    """The file ``embed`` writes and its format.

    ``fmt`` is ``auto`` (from the suffix of ``out``: ``.npz``, ``.h5ad``, ``.parquet``/``.pq``; a
    folder or another suffix: ``npz``, as before) or one of :data:`EMBED_FORMATS`. A folder gets
    ``embeddings.<suffix>``; a file whose suffix disagrees with ``fmt`` gets the right suffix.
    An unknown ``fmt`` raises DataError naming the choices."""
    out = Path(out)
    if fmt == "auto":
        fmt = SUFFIXES.get(out.suffix.lower(), "npz")
    if fmt not in EMBED_FORMATS:
        raise DataError(f"unknown output format {fmt!r}: use one of {', '.join(EMBED_FORMATS)}")
    suffix = "." + fmt
    if SUFFIXES.get(out.suffix.lower()) == fmt:
        return out, fmt
    if out.is_dir() or not out.suffix:
        return out / f"embeddings{suffix}", fmt
    return out.with_suffix(suffix), fmt


def check_writable(folder: str | Path, option: str = "--out") -> Path:
    """Check, before any work is done and without creating anything, that ``folder`` can be
    written: it, or its nearest existing ancestor (created later), must be a folder with write
    permission. DataError (one line, naming the folder and ``option``) otherwise. Returns ``folder``."""
    folder = Path(folder)
    probe = folder.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise DataError(f"cannot write to {folder}: {probe} is a file, not a folder; choose another {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DataError(f"cannot write to {folder}: no write permission on {probe}; choose a writable folder "
                        f"for {option}")
    return folder


def _image_shape(path: Path) -> tuple[int, int, int]:
    """(height, width, channels) of an image as cellssl reads it; (-1, -1, -1) when unreadable."""
    try:
        h, w, c = read_raw_image(path).shape
        return int(h), int(w), int(c)
    except (ImageReadError, OSError, ValueError):
        return -1, -1, -1


def obs_frame(fs: Any, lab: str | None = None, shapes: bool = True) -> pd.DataFrame:
    """One row per image of a FeatureSet ``fs``: ``path`` (relative to the data folder), ``label``
    (class name; missing when unlabelled), ``folder`` (the path's parent folder, ``.`` at the top:
    the batch / plate / slide when the folder tree encodes it), ``lab`` (``lab``, default the data
    folder's name), and with ``shapes`` the stored image's ``height``, ``width``, ``channels``
    (int32, -1 when unreadable). Text columns are pandas categoricals; index ``"0".."N-1"``."""
    n = len(fs.paths)
    labels = [fs.classes[y] if 0 <= y < len(fs.classes) else None for y in np.asarray(fs.labels).tolist()]
    root = Path(fs.root) if fs.root else None
    cols: dict[str, Any] = {
        "path": [str(p) for p in fs.paths],  # object strings: readable by older anndata too
        "label": pd.Categorical(labels, categories=list(fs.classes)) if fs.classes else pd.Categorical([None] * n),
        "folder": pd.Categorical([str(Path(p).parent) for p in fs.paths]),
        "lab": pd.Categorical([lab or (root.name if root else "")] * n),
    }
    if shapes:
        hwc = np.array([_image_shape(root / p if root and root.is_dir() else Path(p)) for p in fs.paths],
                       dtype=np.int32).reshape(n, 3)
        cols.update(height=hwc[:, 0], width=hwc[:, 1], channels=hwc[:, 2])
    return pd.DataFrame(cols, index=pd.Index([str(i) for i in range(n)]))


def uns_info(fs: Any) -> dict[str, str | int]:
    """What produced the features, as h5ad-storable scalars: ``checkpoint``, ``description``,
    ``method``, ``backbone``, ``recipe`` (the resolved recipe as JSON), ``recipe_name``,
    ``image_size``, ``in_chans``, ``adapt_bn``, ``data``, ``cellssl_version`` (None -> ""), and when
    known ``um_per_px`` (of the images) and ``model_um_per_px`` (the checkpoint's scale)."""
    info = fs.info or {}
    out: dict[str, str | int] = {
        "checkpoint": str(info.get("spec") or ""),
        "description": str(info.get("description") or ""),
        "method": str(info.get("method") or ""),
        "backbone": str(info.get("backbone") or ""),
        "recipe_name": str(info.get("recipe") or ""),
        "recipe": json.dumps(info.get("config") or {}, default=str),
        "adapt_bn": str(info.get("adapt_bn") or ""),
        "data": str(info.get("data") or fs.root or ""),
        "cellssl_version": __version__,
    }
    for key in ("image_size", "in_chans", "step"):
        if info.get(key) is not None:
            out[key] = int(info[key])
    for key in ("um_per_px", "model_um_per_px"):
        if info.get(key) is not None:
            out[key] = float(info[key])
    return out


def write_h5ad(fs: Any, path: str | Path, lab: str | None = None) -> Path:
    """Write ``fs`` as AnnData: no ``X`` (0 variables), ``obsm["X_cellssl"]`` float32 (N, F),
    ``obs`` from :func:`obs_frame`, ``uns["cellssl"]`` from :func:`uns_info`. Opens with
    ``anndata.read_h5ad``; ``scanpy.pp.neighbors(adata, use_rep="X_cellssl")`` runs on it."""
    path = Path(path)
    adata = anndata.AnnData(obs=obs_frame(fs, lab), obsm={FEATURES_KEY: np.asarray(fs.features, dtype=np.float32)},
                            uns={"cellssl": uns_info(fs)})
    with output_file(path) as tmp:
        adata.write_h5ad(tmp)
    return path


def write_parquet_features(fs: Any, path: str | Path, lab: str | None = None) -> Path:
    """Write ``fs`` as one Parquet table: the :func:`obs_frame` columns and ``features``
    (fixed-size list of float32, length F); the :func:`uns_info` dict is stored as JSON in the
    schema metadata under ``cellssl``. ``pandas.read_parquet`` reads it back."""
    path = Path(path)
    feats = np.ascontiguousarray(fs.features, dtype=np.float32)
    table = pa.Table.from_pandas(obs_frame(fs, lab), preserve_index=False)
    flat = pa.array(feats.reshape(-1), type=pa.float32())
    table = table.append_column("features", pa.FixedSizeListArray.from_arrays(flat, int(feats.shape[1])))
    meta = dict(table.schema.metadata or {})
    meta[b"cellssl"] = json.dumps(uns_info(fs)).encode()
    with output_file(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)
    return path


def csv_to_parquet(csv_path: str | Path, path: str | Path | None = None,
                   types: dict[str, Callable[[pd.Series], pd.Series]] | None = None) -> Path:
    """The CSV ``csv_path`` as Parquet (default: same name, ``.parquet``): the same columns in the
    same order, text as strings (empty cells stay ""), and the columns of ``types`` (default
    :data:`PREDICTION_TYPES`: probability and distance float64 with NaN for empty, unsure bool)
    converted. Returns the written path."""
    csv_path = Path(csv_path)
    path = Path(path) if path is not None else csv_path.with_suffix(".parquet")
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    for col, conv in (PREDICTION_TYPES if types is None else types).items():
        if col in df.columns:
            df[col] = conv(df[col])
    with output_file(path) as tmp:
        df.to_parquet(tmp, index=False, engine="pyarrow")
    return path


def embed_outputs(checkpoint: str | Path, data: str | Path, out: str | Path, *, fmt: str = "auto",
                  lab: str | None = None, plot: bool = False, **fields: Any) -> dict[str, Path]:
    """``cellssl embed`` with a format: the features of ``data`` (see
    :func:`~cellssl.eval.features.load_features`; ``fields`` are :class:`~cellssl.eval.features.FeatureOptions`)
    written to ``out`` as npz / h5ad / parquet (:func:`resolve_output`), and with ``plot`` a 2-D
    map beside it (``<stem>_map.png``: UMAP when umap-learn is installed, else t-SNE; coloured by
    class and by folder). The output folder is checked for write access before any feature is
    computed. Returns ``{"features": path, "plot": path}`` (plot only when drawn)."""
    path, fmt = resolve_output(out, fmt)
    check_writable(path.parent)
    fs = load_features(checkpoint, data, labelled=None, **fields)
    files: dict[str, Path] = {}
    if fmt == "npz":
        files["features"] = save_embeddings(fs, path)  # written under a temporary name, renamed at the end
    elif fmt == "h5ad":
        files["features"] = write_h5ad(fs, path, lab)
    else:
        files["features"] = write_parquet_features(fs, path, lab)
    if plot:
        groups = {"folder": np.array([str(Path(p).parent) for p in fs.paths])}
        if fs.labelled:
            groups = {"class": np.array([fs.classes[y] for y in fs.labels]), **groups}
        drawn = plot_embedding_groups(fs.features, groups, path.with_name(f"{path.stem}_map.png"),
                                      seed=int(fields.get("seed", 0)))
        if drawn:
            files["plot"] = drawn
    return files


def npz_to_h5ad(npz: str | Path, data: str | Path, path: str | Path | None = None, *, lab: str | None = None,
                info: dict | None = None) -> Path:
    """An embeddings ``.npz`` (what ``embed`` and ``select`` write: ``features``, ``paths``, and when
    labelled ``labels`` + ``classes``) of the images of ``data`` as an ``.h5ad`` (default: same
    name, ``.h5ad``) with :func:`write_h5ad`; ``info`` (e.g. ``{"spec": checkpoint}``) fills ``uns``."""
    npz = Path(npz)
    with np.load(npz) as z:
        feats, paths = z["features"], [str(p) for p in z["paths"]]
        labelled = "labels" in z.files and "classes" in z.files
        labels = z["labels"] if labelled else np.full(len(paths), -1, dtype=np.int64)
        classes = [str(c) for c in z["classes"]] if labelled else []
    root = Path(data)
    fs = FeatureSet(features=feats, labels=labels, paths=paths, classes=classes,
                    info={"data": str(data), **(info or {})}, root=str(root if root.is_dir() else root.parent))
    return write_h5ad(fs, Path(path) if path is not None else npz.with_suffix(".h5ad"), lab)
