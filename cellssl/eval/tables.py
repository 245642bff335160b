"""Outputs that other tools open: AnnData ``.h5ad`` (scanpy) and Parquet tables (pandas / Arrow).

``cellssl embed --format h5ad`` writes an AnnData file: ``obsm["X_cellssl"]`` the features (N, F),
``obs`` one row per image (``path``, ``label``, ``folder``, ``lab``, ``height``, ``width``,
``channels``), ``uns["cellssl"]`` what produced them (checkpoint, recipe, cellssl version).
``--format parquet`` writes the same ``obs`` columns plus ``features`` (a fixed-size list of
float32) as one Parquet table; ``predict --format parquet`` writes ``predictions.parquet`` beside
``predictions.csv``, same columns, typed values. Every file is written to a temporary name in the
destination folder and renamed when complete, so an interrupted or failed write leaves nothing
that looks finished.

A set larger than ``--part-rows`` is embedded in resumable parts (:func:`~cellssl.eval.features.embedding_parts`)
and each format is assembled from them one part at a time: the ``.npz`` member by member, the
Parquet table one row group a part (``pyarrow.parquet.ParquetWriter``), the ``.h5ad`` by writing
``obsm["X_cellssl"]`` as an HDF5 dataset filled part by part (its ``obs``, a few short columns a
cell, is held whole). ``predict`` streams its table the same way (:class:`ParquetRows`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anndata
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cellssl import __version__
from cellssl.data.io import ImageReadError, output_file, read_raw_image
from cellssl.errors import DataError
from cellssl.eval.features import (
    EmbeddingParts,
    FeatureExtractor,
    FeatureSet,
    PartsTotals,
    assemble_npz,
    embedding_parts,
    save_embeddings,
)
from cellssl.eval.report import plot_embedding_groups, plot_rows
from cellssl.eval.settings import DEFAULT_PART_ROWS, EMBED_FORMATS, PREDICT_FORMATS

__all__ = ["EMBED_FORMATS", "PREDICT_FORMATS", "SUFFIXES", "FEATURES_KEY", "resolve_output", "check_writable",
           "obs_frame", "uns_info", "write_h5ad", "write_parquet_features", "csv_to_parquet", "PREDICTION_TYPES",
           "ParquetRows", "assemble_h5ad", "assemble_parquet", "embed_outputs", "npz_to_h5ad"]

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


def obs_frame(fs: Any, lab: str | None = None, shapes: bool = True, *, start: int = 0,
              folders: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per image of a FeatureSet ``fs``: ``path`` (relative to the data folder), ``label``
    (class name; missing when unlabelled), ``folder`` (the path's parent folder, ``.`` at the top:
    the batch / plate / slide when the folder tree encodes it), ``lab`` (``lab``, default the data
    folder's name), and with ``shapes`` the stored image's ``height``, ``width``, ``channels``
    (int32, -1 when unreadable). Text columns are pandas categoricals (``folder``'s categories:
    ``folders``, default the sorted folders of ``fs``); index ``str(start) .. str(start + N - 1)``
    (a part of a larger set passes its first row and the whole set's folders)."""
    n = len(fs.paths)
    labels = [fs.classes[y] if 0 <= y < len(fs.classes) else None for y in np.asarray(fs.labels).tolist()]
    root = Path(fs.root) if fs.root else None
    cols: dict[str, Any] = {
        "path": [str(p) for p in fs.paths],  # object strings: readable by older anndata too
        "label": pd.Categorical(labels, categories=list(fs.classes)) if fs.classes else pd.Categorical([None] * n),
        "folder": pd.Categorical([_folder(p) for p in fs.paths], categories=folders),
        "lab": pd.Categorical([lab or (root.name if root else "")] * n),
    }
    if shapes:
        hwc = np.array([_image_shape(root / p if root and root.is_dir() else Path(p)) for p in fs.paths],
                       dtype=np.int32).reshape(n, 3)
        cols.update(height=hwc[:, 0], width=hwc[:, 1], channels=hwc[:, 2])
    return pd.DataFrame(cols, index=pd.Index([str(start + i) for i in range(n)]))


def _folder(path: str) -> str:
    """The ``folder`` column of a relative image path: its parent folder (``.`` at the top)."""
    return str(Path(path).parent)


def _folders(done: EmbeddingParts) -> list[str]:
    """The sorted ``folder`` values of every row of the parts (one part's paths read at a time)."""
    seen: set[str] = set()
    for paths in done.parts.arrays("paths"):
        seen.update(_folder(str(p)) for p in paths)
    return sorted(seen)


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


def assemble_h5ad(done: EmbeddingParts, path: str | Path, lab: str | None = None) -> Path:
    """The parts ``done`` as the ``.h5ad`` :func:`write_h5ad` writes of the whole set: AnnData
    writes ``obs`` (built part by part, held whole: N rows of a few short columns) and ``uns``, then
    ``obsm["X_cellssl"]`` (N, F) float32 is added as an HDF5 dataset in AnnData's array encoding
    and filled part by part, so at most one part of features is in memory."""
    path, tot = Path(path), done.totals()
    folders = _folders(done)
    obs = pd.concat([obs_frame(fs, lab, start=start, folders=folders) for start, fs in done.chunks(features=False)])
    first = FeatureSet(np.zeros((0, tot.dim), np.float32), np.zeros(0, np.int64), [], done.classes, done.info,
                       done.root)
    with output_file(path) as tmp:
        anndata.AnnData(obs=obs, uns={"cellssl": uns_info(first)}).write_h5ad(tmp)
        del obs
        with h5py.File(tmp, "a") as f:
            x = f["obsm"].create_dataset(FEATURES_KEY, shape=(tot.n, tot.dim), dtype=np.float32)
            x.attrs["encoding-type"], x.attrs["encoding-version"] = "array", "0.2.0"
            start = 0
            for feats in done.parts.arrays("features"):
                x[start:start + len(feats)] = feats
                start += len(feats)
    return path


def _parquet_table(fs: Any, lab: str | None, start: int = 0, folders: Sequence[str] | None = None) -> pa.Table:
    """The rows of ``fs`` as an Arrow table: the :func:`obs_frame` columns and ``features``
    (fixed-size list of float32, length F)."""
    feats = np.ascontiguousarray(fs.features, dtype=np.float32)
    table = pa.Table.from_pandas(obs_frame(fs, lab, start=start, folders=folders), preserve_index=False)
    flat = pa.array(feats.reshape(-1), type=pa.float32())
    return table.append_column("features", pa.FixedSizeListArray.from_arrays(flat, int(feats.shape[1])))


def _with_info(schema: pa.Schema, fs: Any) -> pa.Schema:
    """``schema`` with the :func:`uns_info` of ``fs`` as JSON under ``cellssl`` in its metadata."""
    return schema.with_metadata({**(schema.metadata or {}), b"cellssl": json.dumps(uns_info(fs)).encode()})


def write_parquet_features(fs: Any, path: str | Path, lab: str | None = None) -> Path:
    """Write ``fs`` as one Parquet table: the :func:`obs_frame` columns and ``features``
    (fixed-size list of float32, length F); the :func:`uns_info` dict is stored as JSON in the
    schema metadata under ``cellssl``. ``pandas.read_parquet`` reads it back."""
    path = Path(path)
    table = _parquet_table(fs, lab)
    with output_file(path) as tmp:
        pq.write_table(table.replace_schema_metadata(_with_info(table.schema, fs).metadata), tmp)
    return path


def assemble_parquet(done: EmbeddingParts, path: str | Path, lab: str | None = None) -> Path:
    """The parts ``done`` as the table :func:`write_parquet_features` writes of the whole set (the
    same columns, categories, metadata and rows), one row group a part written with
    ``pyarrow.parquet.ParquetWriter``: at most one part in memory."""
    path, writer = Path(path), None
    done.totals()  # no rows: a DataError; skipped files: the warning
    folders = _folders(done)
    with output_file(path) as tmp:
        try:
            for start, fs in done.chunks():
                table = _parquet_table(fs, lab, start, folders)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, _with_info(table.schema, fs))
                writer.write_table(table.cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()
    return path


class ParquetRows:
    """A Parquet table written a chunk of text rows at a time (``with ParquetRows(path, columns) as
    t: t.write(rows)``, one row group a chunk): the columns of ``types`` (default
    :data:`PREDICTION_TYPES`) converted from text, the others strings. Written to a temporary name,
    renamed when the block completes (removed on an error)."""

    def __init__(self, path: str | Path, columns: Sequence[str],
                 types: dict[str, Callable[[pd.Series], pd.Series]] | None = None):
        self.path, self.columns = Path(path), list(columns)
        self.types = PREDICTION_TYPES if types is None else types
        empty = pd.Series([], dtype=str)
        self.schema = pa.schema([(c, pa.from_numpy_dtype(self.types[c](empty).dtype) if c in self.types
                                  else pa.string()) for c in self.columns])
        self._stack = contextlib.ExitStack()
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> "ParquetRows":
        with contextlib.ExitStack() as stack:  # the temporary file is removed if the writer cannot start
            tmp = stack.enter_context(output_file(self.path))
            self._writer = stack.enter_context(contextlib.closing(pq.ParquetWriter(tmp, self.schema)))
            self._stack = stack.pop_all()
        return self

    def write(self, rows: Sequence[Sequence[str]] | pd.DataFrame) -> None:
        """Append ``rows`` (text cells in the order of the columns) as one row group."""
        assert self._writer is not None, "write inside the with block"
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=self.columns, dtype=str)
        for col, conv in self.types.items():
            if col in df.columns:
                df[col] = conv(df[col])
        self._writer.write_table(pa.Table.from_pandas(df, schema=self.schema, preserve_index=False))

    def __exit__(self, *exc: Any) -> None:
        self._writer = None
        self._stack.__exit__(*exc)  # closes the writer, then renames (or on an error removes) the file


def csv_to_parquet(csv_path: str | Path, path: str | Path | None = None,
                   types: dict[str, Callable[[pd.Series], pd.Series]] | None = None,
                   chunk_rows: int = DEFAULT_PART_ROWS) -> Path:
    """The CSV ``csv_path`` as Parquet (default: same name, ``.parquet``): the same columns in the
    same order, text as strings (empty cells stay ""), and the columns of ``types`` (default
    :data:`PREDICTION_TYPES`: probability and distance float64 with NaN for empty, unsure bool)
    converted; read and written ``chunk_rows`` rows at a time (:class:`ParquetRows`). Returns the
    written path."""
    csv_path = Path(csv_path)
    path = Path(path) if path is not None else csv_path.with_suffix(".parquet")
    columns = list(pd.read_csv(csv_path, dtype=str, nrows=0).columns)
    with ParquetRows(path, columns, types) as table:
        for chunk in pd.read_csv(csv_path, dtype=str, keep_default_na=False, chunksize=chunk_rows):
            table.write(chunk)
    return path


def embed_outputs(checkpoint: str | Path, data: str | Path, out: str | Path, *, fmt: str = "auto",
                  lab: str | None = None, plot: bool = False, part_rows: int = DEFAULT_PART_ROWS,
                  **fields: Any) -> dict[str, Path]:
    """``cellssl embed`` with a format: the features of ``data`` (``fields`` are
    :class:`~cellssl.eval.features.FeatureOptions`) written to ``out`` as npz / h5ad / parquet
    (:func:`resolve_output`), and with ``plot`` a 2-D map beside it (``<stem>_map.png``: UMAP when
    umap-learn is installed, else t-SNE; coloured by class and by folder). The output folder is
    checked for write access before any feature is computed. A set of more than ``part_rows``
    images is embedded in resumable parts and the output assembled from them one part at a time
    (the same file as one pass; the map from the same sampled rows). Returns ``{"features": path,
    "plot": path}`` (plot only when drawn)."""
    path, fmt = resolve_output(out, fmt)
    check_writable(path.parent)
    ex = FeatureExtractor(checkpoint, **fields)
    ds, keep = ex.build(data, None, ex.options.max_per_class)
    if len(keep) > part_rows:
        done = embedding_parts(ex, ds, data, keep, path, part_rows)
        files = {"features": ASSEMBLERS[fmt](done, path, lab)}
        if plot:
            files.update(_plot(*_sampled_rows(done, done.totals(), ex.seed), path, ex.seed))
        done.parts.remove()
        return files
    fs = ex.dataset_features(ds, data, keep)
    files = {"features": WRITERS[fmt](fs, path, lab)}
    if plot:
        files.update(_plot(fs.features, _groups(fs.paths, fs.classes, fs.labels, fs.labelled), path, ex.seed))
    return files


WRITERS: dict[str, Callable[[FeatureSet, Path, str | None], Path]] = {
    "npz": lambda fs, path, lab: save_embeddings(fs, path),  # written under a temporary name, renamed at the end
    "h5ad": write_h5ad, "parquet": write_parquet_features}
ASSEMBLERS: dict[str, Callable[[EmbeddingParts, Path, str | None], Path]] = {
    "npz": lambda done, path, lab: assemble_npz(done, path), "h5ad": assemble_h5ad, "parquet": assemble_parquet}


def _groups(paths: Sequence[str], classes: Sequence[str], labels: np.ndarray, labelled: bool) -> dict[str, np.ndarray]:
    """The map's colourings of the rows: ``class`` (when every row is labelled) and ``folder``, (N,) each."""
    groups = {"folder": np.array([_folder(str(p)) for p in paths])}
    if labelled:
        groups = {"class": np.array([classes[y] for y in labels]), **groups}
    return groups


def _sampled_rows(done: EmbeddingParts, tot: PartsTotals, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(features (M, F), groups) of the rows a map of all ``tot.n`` rows would draw
    (:func:`~cellssl.eval.report.plot_rows`), gathered one part at a time."""
    rows = plot_rows(tot.n, seed=seed)
    feats, paths, labels = [], [], []
    for start, fs in done.chunks():
        pick = rows[(rows >= start) & (rows < start + len(fs))] - start
        feats.append(fs.features[pick])
        paths += [fs.paths[i] for i in pick]
        labels.append(fs.labels[pick])
    return (np.concatenate(feats).reshape(len(rows), tot.dim),
            _groups(paths, done.classes, np.concatenate(labels), tot.labelled))


def _plot(features: np.ndarray, groups: dict[str, np.ndarray], path: Path, seed: int) -> dict[str, Path]:
    """``{"plot": <stem>_map.png}`` of the map of ``features`` coloured by ``groups`` ({} when not drawn)."""
    drawn = plot_embedding_groups(features, groups, path.with_name(f"{path.stem}_map.png"), seed=seed)
    return {"plot": drawn} if drawn else {}


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
