"""Which cells to label first: pick a small, informative set of a pool's cells for an expert.

With good self-supervised embeddings, labelling *typical* cells from *every region* of the data
gives much better classifiers at a few labels than a random sample (the "cold start" of active
learning). Strategies, all on L2-normalised frozen features ``z`` (N, F):

* ``typiclust`` (default; Hacohen, Dekel & Weinshall, ICML 2022): k-means into
  ``n_labelled + budget`` clusters; clusters holding an already-labelled cell are covered; from
  each uncovered cluster, largest first, take its most *typical* cell,
  ``typicality(x) = 1 / mean_{x' in kNN(x)} ||x - x'||`` (k = 20 nearest cells of its cluster).
  scikit-activeml's ``TypiClust`` does this.
* ``probcover`` (Yehuda, Dekel, Hacohen & Weinshall, NeurIPS 2022): a ball of radius δ around
  every cell; greedily pick the cell whose ball covers the most not-yet-covered cells (balls of
  labelled cells are covered from the start). δ is the largest radius at which ≥ α = 95 % of the
  balls are *pure*, i.e. contain cells of one k-means cluster only (k = the expected number of
  classes). Written here (:func:`probcover`), see its docstring for why.
* ``coreset`` (Sener & Savarese, ICLR 2018): greedy k-center (farthest-first) from the labelled
  cells; good at large budgets, prone to outliers at small ones. scikit-activeml's ``CoreSet``.
* ``random``: a uniform sample of the unlabelled cells (scikit-activeml's ``RandomSampling``);
  the baseline to beat.

:func:`select_indices` runs a strategy on features; :func:`select` is the ``cellssl select``
command: embed a folder, select, and write ``to_label.csv`` (an empty ``label`` column for the
expert; once filled in it is a labelled dataset for ``linear``, ``knn``, ``fewshot``,
``finetune``), a numbered contact sheet, copies of the images, a 2-D map and ``report.md``.
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from skactiveml.pool import CoreSet, RandomSampling, TypiClust
from sklearn.cluster import KMeans
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits

from cellssl.apply.settings import DEFAULT_BUDGET, DEFAULT_N_CLASSES, STRATEGIES
from cellssl.config import DataConfig
from cellssl.data.datasets import DataWarning, build_dataset, manifest_columns, read_manifest
from cellssl.data.io import is_output_folder, mark_output_folder, output_folder, relative_path
from cellssl.errors import ConfigError, DataError, did_you_mean
from cellssl.eval.features import (
    FeatureExtractor,
    FeatureOptions,
    FeatureSet,
    feature_source,
    read_embeddings,
    save_embeddings,
    source_mismatch,
)
from cellssl.eval.metrics import l2_normalize
from cellssl.eval.report import MIN_EMBED_POINTS, embedding_2d, write_json
from cellssl.plots import image_sheet, pyplot

__all__ = [
    "STRATEGIES",
    "Selection",
    "select_indices",
    "typiclust",
    "probcover",
    "probcover_delta",
    "ball_graph",
    "coreset",
    "random_selection",
    "kmeans_labels",
    "typicality",
    "read_labelled_paths",
    "save_contact_sheet",
    "plot_selection_map",
    "select",
]

TYPICALITY_K = 20  # neighbours for typicality (TypiClust paper: 20)
PROBCOVER_ALPHA = 0.95  # purity the ProbCover radius must keep (paper: 0.95)
SHEET_MAX = 100  # cells per contact-sheet page


@dataclass
class Selection:
    """The result of a strategy.

    Attributes:
        indices: int64 (B,) pool rows, in the order picked (the most useful first for the greedy
            strategies, so an expert who stops early keeps the best part).
        strategy: its name; ``seconds``: wall-clock of the selection alone.
        info: strategy details (ProbCover: ``delta``, ``coverage``, ``gains``; TypiClust: ``n_clusters``).
        clusters: (N,) cluster of every pool row when the strategy clustered (TypiClust), else None.
    """
    indices: np.ndarray
    strategy: str
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
    clusters: np.ndarray | None = None


# --- helpers -----------------------------------------------------------------------------------
def _missing_y(n: int, labelled: np.ndarray) -> np.ndarray:
    """scikit-activeml's label vector: NaN = unlabelled, any number = labelled (values unused)."""
    y = np.full(n, np.nan)
    y[labelled] = 0.0
    return y


def _threads():
    """One BLAS/OpenMP thread: with torch loaded, competing pools made sklearn ~30x slower."""
    return threadpool_limits(1)


def kmeans_labels(z: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """k-means (scikit-learn, k-means++) cluster of each row of ``z`` (N, F) -> (N,) int64."""
    n_clusters = int(max(1, min(n_clusters, len(z))))
    with _threads(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicates -> "fewer distinct clusters" warning
        return KMeans(n_clusters=n_clusters, random_state=seed, n_init="auto").fit_predict(z).astype(np.int64)


def typicality(z: np.ndarray, clusters: np.ndarray, k: int = TYPICALITY_K, eps: float = 1e-7) -> np.ndarray:
    """TypiClust's typicality of every row within its cluster, (N,) float64.

    ``typ(x) = k / sum_{x' in kNN(x) ∪ {x}} ||x - x'||`` with the k nearest cells of the same
    cluster (k capped at cluster size − 1; a singleton cluster gets 1) — the formula of
    scikit-activeml's ``TypiClust``, computed here for every strategy's report.
    """
    out = np.ones(len(z), dtype=np.float64)
    with _threads():
        for c in np.unique(clusters):
            idx = np.flatnonzero(clusters == c)
            if len(idx) < 2:
                continue
            kk = int(min(len(idx) - 1, k))
            dist, _ = NearestNeighbors(n_neighbors=kk + 1).fit(z[idx]).kneighbors(z[idx])
            out[idx] = kk / (dist.sum(axis=1) + eps)
    return out


def _distance_chunks(z: np.ndarray, chunk: int | None = None):
    """Yield ``(start, D)`` with D (c, N) float32 Euclidean distances of rows start..start+c to all
    rows of the L2-normalised ``z``: ``||a - b|| = sqrt(2 - 2 a·b)``. Memory O(chunk · N); the
    default chunk keeps each (c, N) block near 8 M values (32 MB)."""
    chunk = chunk or int(np.clip(2**23 // max(len(z), 1), 64, 4096))
    for s in range(0, len(z), chunk):
        g = z[s:s + chunk] @ z.T
        yield s, np.sqrt(np.maximum(2.0 - 2.0 * g, 0.0, dtype=np.float32))


# --- strategies --------------------------------------------------------------------------------
def typiclust(z: np.ndarray, budget: int, labelled: np.ndarray, seed: int = 0, k: int = TYPICALITY_K) -> Selection:
    """TypiClust via scikit-activeml (see the module docstring); records the k-means clusters."""
    fitted: dict[str, np.ndarray] = {}

    class _RecordingKMeans(KMeans):
        """KMeans that keeps the labels TypiClust fits (to report each cell's cluster)."""

        def fit_predict(self, X, y=None, sample_weight=None):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # duplicates -> "fewer distinct clusters"; handled below
                fitted["labels"] = super().fit_predict(X, y, sample_weight=sample_weight)
            return fitted["labels"]

    qs = TypiClust(random_state=seed, cluster_algo=_RecordingKMeans, cluster_algo_dict={"n_init": "auto"}, k=k)
    idx = np.asarray(qs.query(z, _missing_y(len(z), labelled), batch_size=budget), dtype=np.int64)
    clusters = np.asarray(fitted["labels"], dtype=np.int64)
    idx = _unique_topped_up(idx, budget, labelled, z, clusters, k)
    return Selection(idx, "typiclust", info={"n_clusters": int(len(labelled) + budget), "k": k}, clusters=clusters)


def _unique_topped_up(idx: np.ndarray, budget: int, labelled: np.ndarray, z: np.ndarray, clusters: np.ndarray,
                      k: int) -> np.ndarray:
    """Guard for k-means with fewer distinct clusters than asked (duplicate images): scikit-activeml
    then may repeat a pick. Keep first occurrences; fill up with the most typical remaining cells."""
    _, first = np.unique(idx, return_index=True)
    idx = idx[np.sort(first)]
    if len(idx) >= budget:
        return idx[:budget]
    taken = np.zeros(len(z), dtype=bool)
    taken[idx] = True
    taken[labelled] = True
    typ = typicality(z, clusters, k)
    rest = [i for i in np.argsort(-typ, kind="stable") if not taken[i]]
    return np.concatenate([idx, np.asarray(rest[: budget - len(idx)], dtype=np.int64)])


def coreset(z: np.ndarray, budget: int, labelled: np.ndarray, seed: int = 0) -> Selection:
    """Greedy k-center (farthest-first) via scikit-activeml's ``CoreSet``; without labelled cells
    the first centre is random."""
    idx = CoreSet(random_state=seed).query(z, _missing_y(len(z), labelled), batch_size=budget)
    return Selection(np.asarray(idx, dtype=np.int64), "coreset")


def random_selection(z: np.ndarray, budget: int, labelled: np.ndarray, seed: int = 0) -> Selection:
    """Uniform sample of the unlabelled rows (scikit-activeml's ``RandomSampling``)."""
    idx = RandomSampling(random_state=seed).query(z, _missing_y(len(z), labelled), batch_size=budget)
    return Selection(np.asarray(idx, dtype=np.int64), "random")


def probcover_delta(z: np.ndarray, n_classes: int, alpha: float = PROBCOVER_ALPHA, seed: int = 0,
                    chunk: int | None = None) -> tuple[float, float]:
    """ProbCover's ball radius: the largest δ at which ≥ ``alpha`` of the δ-balls are pure.

    Cells are k-means clustered into ``n_classes`` groups; the ball of x is pure when no cell of
    another group lies within δ, i.e. when δ < r(x) = min over other-group cells x' of ||x − x'||.
    Purity(δ) = mean_x [r(x) > δ] falls with δ, so the largest δ with purity ≥ α is just below
    the m-th smallest r, m = floor((1 − α) N) (exact, no grid). Returns ``(delta, purity)``.
    """
    groups = kmeans_labels(z, n_classes, seed)
    n = len(z)
    r = np.full(n, np.inf, dtype=np.float32)
    with _threads():
        for s, d in _distance_chunks(z, chunk):
            d[groups[s:s + len(d)][:, None] == groups[None, :]] = np.inf
            r[s:s + len(d)] = d.min(axis=1)
    if not np.isfinite(r).any():  # one group only: every ball is pure at any radius
        return 2.0, 1.0
    rs = np.sort(r)
    m = min(int(math.floor((1.0 - alpha) * n)), n - 1)
    delta = float(max(0.0, np.nextafter(np.float32(rs[m]), np.float32(0.0))))
    return delta, float(np.mean(r > delta))


def ball_graph(z: np.ndarray, delta: float, chunk: int | None = None):
    """Sparse (N, N) CSR adjacency of the δ-ball graph: ``A[i, j] = 1`` iff ``||z_i − z_j|| <= δ``
    (self loops included). Built chunk by chunk: memory O(edges + chunk · N), not O(N²)."""
    rows, cols = [], []
    with _threads():
        for s, d in _distance_chunks(z, chunk):
            r, c = np.nonzero(d <= delta)
            rows.append(r.astype(np.int64) + s)
            cols.append(c.astype(np.int64))
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    return sparse.csr_array((np.ones(len(r), dtype=np.int32), (r, c)), shape=(len(z), len(z)))


def probcover(z: np.ndarray, budget: int, labelled: np.ndarray, seed: int = 0, n_classes: int = DEFAULT_N_CLASSES,
              alpha: float = PROBCOVER_ALPHA, delta: float | None = None) -> Selection:
    """ProbCover: greedy maximum coverage of δ-balls (Yehuda et al., NeurIPS 2022).

    Graph ``A`` = :func:`ball_graph` with δ from :func:`probcover_delta` (or ``delta``). Cells in
    the ball of a labelled cell start covered. Each step picks the unpicked cell with the most
    uncovered cells in its ball (ties: random, ``seed``), marks them covered and lowers the
    out-degree of every cell whose ball holds a newly covered cell; once all is covered the
    rest of the budget is drawn at random (as in the paper).

    Written here rather than taken from scikit-activeml, whose ``ProbCover`` picks the same way
    but holds the dense N×N distance and edge matrices and copies the edge matrix at every pick:
    about 20 s and 0.7 GB of arrays for 80 picks from 10,000 cells, growing as N² (~18 GB at
    50,000). This version builds a sparse graph chunk by chunk and updates the degrees
    incrementally (about 3 s and 0.15 GB at 10,000; benchmarks/selection.py prints both), and
    chooses δ exactly instead of on a grid; tests check its degrees equal scikit-activeml's.
    """
    n = len(z)
    info: dict[str, Any] = {"alpha": alpha, "n_classes": int(n_classes)}
    if delta is None:
        delta, purity = probcover_delta(z, n_classes, alpha, seed)
        info["purity"] = purity
    info["delta"] = float(delta)
    a = ball_graph(z, delta)
    at = a.T.tocsr()  # column access: which balls hold a cell
    info["mean_ball_size"] = float(a.nnz / max(n, 1))
    covered = np.zeros(n, dtype=bool)
    if len(labelled):
        covered[a[np.asarray(labelled)].indices] = True
    deg = a @ (~covered).astype(np.int64)  # uncovered cells in each ball, (N,)
    available = np.ones(n, dtype=bool)
    available[labelled] = False
    rng = np.random.default_rng(seed)
    picks, gains = [], []
    for _ in range(budget):
        cand = np.where(available, deg, -1)
        best = cand.max()
        if best <= 0:  # everything covered: random, as in the paper
            i = int(rng.choice(np.flatnonzero(available)))
        else:
            i = int(rng.choice(np.flatnonzero(cand == best)))
        ball = a.indices[a.indptr[i]:a.indptr[i + 1]]
        new = ball[~covered[ball]]
        covered[new] = True
        if len(new):
            deg -= np.bincount(at[new].indices, minlength=n)
        available[i] = False
        picks.append(i)
        gains.append(int(len(new)))
    info["gains"] = gains
    info["coverage"] = float(covered.mean())
    return Selection(np.asarray(picks, dtype=np.int64), "probcover", info=info)


def select_indices(
    features: np.ndarray,
    budget: int,
    strategy: str = STRATEGIES[0],
    *,
    labelled: Sequence[int] | np.ndarray = (),
    seed: int = 0,
    n_classes: int = DEFAULT_N_CLASSES,
) -> Selection:
    """Choose ``budget`` rows of ``features`` (N, F) to label with ``strategy`` (:data:`STRATEGIES`).

    Features are L2-normalised first. ``labelled``: rows already labelled (never picked; the
    strategies treat their neighbourhoods as covered). ``n_classes``: expected number of cell
    types, used by ProbCover's radius only. Deterministic in ``seed``. Raises ConfigError for an
    unknown strategy and DataError when fewer than ``budget`` unlabelled rows exist.
    """
    _check_strategy(strategy, "selection strategy")
    z = l2_normalize(np.asarray(features, dtype=np.float32))
    lab = np.unique(np.asarray(labelled, dtype=np.int64))
    free = len(z) - len(lab)
    if budget < 1:
        raise DataError(f"budget {budget}: select at least 1 cell")
    if budget > free:
        raise DataError(f"budget {budget} is more than the {free} unlabelled cells of the pool: "
                        f"lower it to {free} or fewer")
    t0 = time.perf_counter()
    with _threads():
        if strategy == "typiclust":
            sel = typiclust(z, budget, lab, seed)
        elif strategy == "probcover":
            sel = probcover(z, budget, lab, seed, n_classes=n_classes)
        elif strategy == "coreset":
            sel = coreset(z, budget, lab, seed)
        else:
            sel = random_selection(z, budget, lab, seed)
    sel.seconds = time.perf_counter() - t0
    if len(np.unique(sel.indices)) != budget or np.isin(sel.indices, lab).any():
        raise RuntimeError(f"{strategy} returned repeated or labelled rows")  # an internal bug
    return sel


# --- reading the pool and the labelled cells ------------------------------------------------------
def _manifest_rows(path: Path) -> list[str]:
    """Image paths of a CSV manifest (:func:`~cellssl.data.datasets.read_manifest`: BOM and the
    common column names accepted): its ``source`` column when it has one (``to_label.csv``, whose
    ``path`` may point at copies), else the path column. Relative to the CSV's folder."""
    header, rows = read_manifest(path)
    if not rows:
        return []
    col = header.index("source") if "source" in header else manifest_columns(header, len(rows[0][1]))[0]
    return [r[col] if len(r) > col and r[col] else r[0] for _, r in rows]


def read_labelled_paths(spec: str | Path, data_cfg: Any = None) -> list[Path]:
    """Resolved image files of a labelled set: a CSV manifest (``path[,label,...]``, or a previous
    ``to_label.csv``), a folder, or anything :func:`~cellssl.data.datasets.build_dataset` reads.
    Every listed image counts, labelled or not (it has been shown to the expert)."""
    p = Path(spec).expanduser()
    if not p.exists():
        raise DataError(f"--labelled {spec} does not exist: pass the CSV of cells already labelled "
                        "(e.g. a filled-in to_label.csv)")
    if p.is_file() and p.suffix.lower() == ".csv":
        rows = _manifest_rows(p)
        if not rows:
            raise DataError(f"--labelled {spec} lists no images: expected rows 'path,label'")
        return [(p.parent / r).resolve() for r in rows]
    ds = build_dataset(data_cfg or DataConfig(), p, labelled=False)
    return [Path(x).resolve() for x in ds.paths]


def _labelled_rows(specs: Sequence[str | Path], pool_files: Sequence[Path], data: Any, data_cfg: Any) -> np.ndarray:
    """Pool rows of the ``--labelled`` sets (matched by resolved path); DataError when some
    listed image is not in the pool."""
    index = {str(Path(p).resolve()): i for i, p in enumerate(pool_files)}
    rows: list[int] = []
    for spec in specs:
        files = read_labelled_paths(spec, data_cfg)
        missing = [f for f in files if str(f) not in index]
        if missing:
            raise DataError(
                f"--labelled {spec}: {len(missing)} of its {len(files)} images are not in the pool {data} "
                f"(e.g. {missing[0]}): list only cells of --data, or add those images to --data"
            )
        rows += [index[str(f)] for f in files]
    return np.unique(np.asarray(rows, dtype=np.int64))


def _pool_features(ex: Any, ds: Any, data: Any, features: str | Path | None, out: Path) -> tuple[Any, bool]:
    """The pool's FeatureSet (``rows``: the dataset rows it holds; bad files have none): from
    ``features`` (an ``embed``/``select`` .npz of the same folder made with the same backbone,
    re-ordered to the pool) or computed now and cached as ``out/embeddings.npz``."""
    root = Path(ds.root)
    rel = [relative_path(p, root) for p, _ in ds.samples]
    if features is None:
        fs = ex.dataset_features(ds, data)
        save_embeddings(fs, out / "embeddings.npz")  # what 'cellssl embed' writes: reusable with --features
        return fs, True
    npz = read_embeddings(features)
    current = feature_source(ex.describe(data))
    if npz["source"] is None:
        warnings.warn(f"--features {features} does not record which backbone made it (written by an older cellssl): "
                      f"it is taken to be {ex.spec}", DataWarning, stacklevel=2)
    elif source_mismatch(npz["source"], current):
        raise ConfigError(f"--features {features} was computed with another model than --checkpoint {ex.spec} "
                          f"({'; '.join(source_mismatch(npz['source'], current))}): pass the checkpoint that made "
                          "them, or leave out --features to embed the pool again")
    where = {p: i for i, p in enumerate(npz["paths"])}
    skipped = set(npz["skipped"])
    missing = [p for p in rel if p not in where and p not in skipped]
    if missing:
        raise DataError(f"--features {features} has no features for {len(missing)} of the {len(rel)} images "
                        f"of {data} (e.g. {missing[0]}): embed this folder again (leave out --features)")
    rows = np.asarray([k for k, p in enumerate(rel) if p in where], dtype=np.int64)
    if len(rows) < len(rel):
        ex.skipped += [str(ds.samples[k][0]) for k, p in enumerate(rel) if p not in where]
        warnings.warn(f"{len(rel) - len(rows)} of {len(rel)} images of {data} are left out: unreadable when "
                      f"{features} was made", DataWarning, stacklevel=2)
    order = np.asarray([where[rel[k]] for k in rows], dtype=np.int64)
    fs = FeatureSet(npz["features"][order], ds.labels[rows], [rel[k] for k in rows], list(ds.classes),
                    ex.describe(data), str(root), rows=rows)
    return fs, False


def _check_out(out: Path) -> None:
    """``select --out``: a new or empty folder, or an earlier selection (replaced) whose
    ``to_label.csv`` has no labels yet; one-line errors otherwise."""
    csv_path = out / "to_label.csv"
    if csv_path.exists() and _filled_labels(csv_path):
        raise DataError(f"{csv_path} already has {_filled_labels(csv_path)} labels filled in: choose another --out "
                        f"(and pass --labelled {csv_path} to select the next cells)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (is_output_folder(out) or (out / "selection.json").is_file()):
        raise ConfigError(f"--out {out} already holds other files: nothing is overwritten; choose a new or empty "
                          "folder")


# --- outputs ---------------------------------------------------------------------------------------
def save_contact_sheet(ds: Any, rows: Sequence[int], numbers: Sequence[int], path: str | Path,
                       title: str = "") -> Path:
    """A PNG grid of the images ``rows`` of ``ds`` (an ImageDataset), each headed by its number
    (the ``row`` of to_label.csv) in large type, so an expert can label from one picture."""
    cols = int(min(10, max(4, math.ceil(math.sqrt(len(rows))))))
    return image_sheet([ds.read(int(i)) for i in rows], [str(num) for num in numbers], path, cols=cols,
                       title=title or "cells to label — the number is the 'row' of to_label.csv", title_size=15,
                       bold=True, dpi=100)


def plot_selection_map(features: Any, selected: np.ndarray, labelled: np.ndarray, path: str | Path,
                       numbers: Sequence[int] | None = None, max_points: int = 2000, seed: int = 0,
                       title: str = "") -> Path | None:
    """2-D map (:func:`~cellssl.eval.report.embedding_2d`: UMAP or PCA + t-SNE) of the pool
    ``features`` (a FeatureSet; at most ``max_points`` rows, always including the selected and
    labelled ones), coloured by class when the pool has class folders, grey otherwise; selected
    cells are black rings numbered as in to_label.csv, labelled ones grey squares. None when the
    pool is too small to map."""
    n = len(features)
    if n < MIN_EMBED_POINTS:
        return None
    rng = np.random.default_rng(seed)
    must = np.unique(np.concatenate([selected, labelled]).astype(np.int64))
    others = np.setdiff1d(np.arange(n), must)
    extra = max(0, max_points - len(must))
    if len(others) > extra:
        others = np.sort(rng.choice(others, size=extra, replace=False))
    keep = np.concatenate([must, others])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xy, method = embedding_2d(features.features[keep], seed)
    except Exception as exc:  # a plot must never fail the selection
        warnings.warn(f"skipping the selection map: {exc}", UserWarning, stacklevel=2)
        return None
    pos = {int(r): k for k, r in enumerate(keep)}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 7))
    y = np.asarray(features.labels)[keep]
    classes = list(features.classes)
    if classes and (y >= 0).any():
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for c, name in enumerate(classes):
            m = y == c
            if m.any():
                ax.scatter(xy[m, 0], xy[m, 1], s=5, alpha=0.45, color=cmap(c % cmap.N), label=name)
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=5, alpha=0.35, color="0.55", label="pool")
    if len(labelled):
        p = np.asarray([pos[int(i)] for i in labelled])
        ax.scatter(xy[p, 0], xy[p, 1], marker="s", s=40, facecolors="none", edgecolors="0.35", linewidths=1.2,
                   label="already labelled")
    p = np.asarray([pos[int(i)] for i in selected])
    ax.scatter(xy[p, 0], xy[p, 1], s=80, facecolors="none", edgecolors="black", linewidths=1.8, label="selected")
    if numbers is not None and len(selected) <= SHEET_MAX:
        for k, num in zip(p, numbers):
            ax.annotate(str(num), xy[k], xytext=(4, 4), textcoords="offset points", fontsize=8, fontweight="bold")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=2, fontsize=7, loc="best", frameon=False)
    ax.set_title(title or f"{method} of {len(keep)} of {n} cells; rings = selected (numbers = rows of to_label.csv)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _filled_labels(csv_path: Path) -> int:
    """Number of rows of an existing to_label.csv whose label column is filled in."""
    try:
        with csv_path.open(newline="") as f:
            return sum(1 for r in csv.DictReader(f) if (r.get("label") or "").strip())
    except (OSError, csv.Error, UnicodeDecodeError):
        return 0


def _place_images(ds: Any, rows: np.ndarray, numbers: list[int], img_dir: Path, link: bool) -> list[Path]:
    """Copy (or symlink) the selected images to ``img_dir/<row>_<name>``; old ones are removed."""
    img_dir.mkdir(parents=True, exist_ok=True)
    for old in img_dir.iterdir():
        if re.match(r"^\d+_", old.name) and (old.is_file() or old.is_symlink()):
            old.unlink()
    width = max(3, len(str(max(numbers))))
    out = []
    for i, num in zip(rows, numbers):
        src = Path(ds.samples[int(i)][0])
        dst = img_dir / f"{num:0{width}d}_{src.name}"
        if link:
            os.symlink(src.resolve(), dst)
        else:
            shutil.copy2(src, dst)
        out.append(dst)
    return out


def _rel(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` (with ``..``; posix separators) when they share a folder
    below the file-system root, else absolute (a relative path through ``/`` helps nobody)."""
    p, s = Path(path).absolute(), Path(start).absolute()
    if os.path.commonpath([p, s]) == p.anchor:
        return p.as_posix()
    return Path(os.path.relpath(p, s)).as_posix()


def _fmt_report(rep: dict, table: list[dict]) -> str:
    """report.md of a selection."""
    ck = rep["checkpoint"]
    out = Path(rep["out"])
    lines = [f"# Cells to label: {rep['budget']} of {rep['pool_size']:,} ({rep['strategy']})", ""]
    lines += [
        f"- pool: `{rep['data']}` ({rep['pool_size']:,} images); already labelled: {rep['n_labelled']}"
        + (f" (from {', '.join(f'`{s}`' for s in rep['labelled_from'])})" if rep["labelled_from"] else ""),
        *([f"- left out: {len(rep['skipped_images'])} unreadable image(s) or of another channel count "
           f"(e.g. `{rep['skipped_images'][0]}`)"] if rep.get("skipped_images") else []),
        f"- features: `{ck.get('spec', '?')}` — {ck.get('description', '')}"
        + (" (read from `" + str(rep["features_from"]) + "`)" if rep.get("features_from") else ""),
        f"- strategy: **{rep['strategy']}**, seed {rep['seed']}; selection took {rep['seconds']:.1f} s "
        f"(embedding not included)",
        f"- k-means regions ({rep['n_regions']}, as TypiClust clusters the pool) with a selected or labelled cell: "
        f"{rep['regions_covered']} of {rep['n_regions']}",
    ]
    if rep["strategy"] == "probcover":
        info = rep["info"]
        lines.append(f"- ProbCover ball radius δ = {info['delta']:.3f} (purity {info.get('purity', float('nan')):.3f} "
                     f"with {info['n_classes']} k-means groups); the selection covers {100 * info['coverage']:.1f} % "
                     f"of the pool")
    if rep.get("classes_in_pool"):
        lines.append(f"- the pool has class folders (not used by the selection): the selected cells come from "
                     f"{rep['classes_covered']} of its {len(rep['classes_in_pool'])} classes")
    csv_rel = _rel(Path(rep["files"]["csv"]), out)
    lines += [
        "",
        "## Next steps",
        "",
        f"1. **Label**: open `{Path(rep['files']['sheets'][0]).name}` (or the numbered copies in `images/`) and write "
        f"each cell's class in the `label` column of `{csv_rel}` (the `row` column is the number on the picture). "
        "Leave a cell blank if unsure: blank rows are left out.",
        "2. **Train and evaluate** on the filled-in CSV (it is a labelled dataset for every command):",
        "",
        "```bash",
        f"cellssl linear   --checkpoint {ck.get('spec', 'CKPT')} --train {rep['files']['csv']} --test TEST_FOLDER "
        "--out eval/linear",
        f"cellssl finetune --checkpoint {ck.get('spec', 'CKPT')} --data {rep['files']['csv']} --out runs/finetuned",
        "```",
        "",
        "3. **Classify the whole pool** with the trained model: "
        f"`cellssl predict --model runs/finetuned/best.pt --data {rep['data']} --out predictions/`.",
        "4. **Next round**: choose more cells, away from those already labelled:",
        "",
        "```bash",
        f"cellssl select --checkpoint {ck.get('spec', 'CKPT')} --data {rep['data']} --budget {rep['budget']} "
        f"--labelled {rep['files']['csv']} --features {rep['files']['embeddings']} --out NEXT_ROUND/",
        "```",
        "",
    ]
    if rep["files"].get("map"):
        lines += ["## Map of the pool", "", f"![map]({Path(rep['files']['map']).name})", ""]
    lines += ["## Contact sheet", ""] + [f"![contact sheet]({Path(s).name})" for s in rep["files"]["sheets"]] + [""]
    lines += ["## Selected cells", "", "| row | image | cluster | typicality |", "|---|---|---|---|"]
    lines += [f"| {t['row']} | `{t['source']}` | {t['cluster']} | {t['typicality']:.3f} |" for t in table]
    return "\n".join(lines) + "\n"


def select(checkpoint: str | Path, data: str | Path, out: str | Path, *, budget: int = DEFAULT_BUDGET,
           strategy: str = STRATEGIES[0], labelled: Sequence[str | Path] = (), features: str | Path | None = None,
           n_classes: int = DEFAULT_N_CLASSES, link: bool = False, map_points: int = 2000,
           options: FeatureOptions | None = None, **fields: Any) -> dict:
    """``cellssl select``: embed the pool ``data``, choose ``budget`` cells, write the expert's files.

    Writes into ``out``: ``to_label.csv`` (``path`` = the copy in ``images/``, an empty ``label``
    column, ``row``, ``cluster``, ``typicality``, ``source`` = the pool image, relative to the
    CSV), ``contact_sheet.png`` (numbered; ``contact_sheet_2.png``, ... past 100 cells),
    ``images/<row>_<name>`` (copies, or symlinks with ``link``), ``map.png``, ``report.md``,
    ``selection.json`` and ``embeddings.npz`` (the pool's features; pass it back as ``features``
    to skip embedding in the next round). ``labelled``: CSVs / folders of cells already
    labelled. ``map_points=0`` skips the map (its t-SNE is the slowest part after embedding).
    Everything is written into a hidden temporary folder renamed to ``out`` at the end (a killed run
    leaves no ``out`` that looks complete); ``out`` is marked as an output folder, so a later
    round on a pool that holds it does not read its images as cells. Refuses to overwrite a
    ``to_label.csv`` that already has labels, or an ``out`` holding other files. Bad files of the
    pool are left out and counted (``skipped_images``). Feature settings:
    :class:`~cellssl.eval.features.FeatureOptions` (its ``seed`` also seeds the strategy). Returns the report.
    """
    out = Path(out)
    _check_out(out)
    _check_strategy(strategy, "--strategy")
    ex = FeatureExtractor(checkpoint, options, **fields)
    seed = ex.options.seed
    ds = build_dataset(ex.data_cfg, data, labelled=None)
    lab_ds_rows = _labelled_rows(labelled, ds.paths, data, ex.data_cfg)
    _check_budget(budget, len(ds), len(lab_ds_rows), data)
    with output_folder(out, replace=True) as tmp:
        _keep_features(features, out, tmp)
        fs, embedded = _pool_features(ex, ds, data, features, tmp)
        # from here on rows are positions in fs (bad files left out); fs.rows maps them to ds rows
        pos = {int(r): k for k, r in enumerate(fs.rows)}
        lab_rows = np.asarray([pos[int(r)] for r in lab_ds_rows if int(r) in pos], dtype=np.int64)
        _check_budget(budget, len(fs), len(lab_rows), data)
        sel = select_indices(fs.features, budget, strategy, labelled=lab_rows, seed=seed, n_classes=n_classes)
        clusters, typ = _regions(fs.features, sel, len(lab_rows) + budget, seed)
        mark_output_folder(tmp, "select")
        table = _write_to_label(tmp, out, ds, fs, sel.indices, clusters, typ, link)
        sheets = _write_sheets(tmp, out, ds, fs.rows[sel.indices])
        map_path = (plot_selection_map(fs, sel.indices, lab_rows, tmp / "map.png", [t["row"] for t in table],
                                       max_points=map_points, seed=seed) if map_points > 0 else None)
        report = _report(data, out, ex, fs, sel, lab_rows, labelled, features, n_classes, clusters, table)
        report["files"].update({"sheets": sheets, "map": str(out / "map.png") if map_path else None})
        report.update(_classes_covered(ds, fs.rows[sel.indices]))
        (tmp / "report.md").write_text(_fmt_report(report, table))
        write_json(report, tmp / "selection.json")
    report["embedded"] = embedded
    return report


def _check_strategy(strategy: str, what: str) -> None:
    """ConfigError for a strategy not in :data:`STRATEGIES` (``what``: how the user named it)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown {what} '{strategy}'{did_you_mean(strategy, STRATEGIES)}: "
                          f"use one of {', '.join(STRATEGIES)}")


def _keep_features(features: str | Path | None, out: Path, tmp: Path) -> None:
    """A ``--features`` file inside the ``out`` being replaced is copied into the new folder ``tmp`` first."""
    if features is not None and out.resolve() in Path(features).resolve().parents:
        kept = tmp / Path(features).resolve().relative_to(out.resolve())
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(features, kept)


def _regions(features: np.ndarray, sel: Selection, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The cluster (k-means region) and the typicality of every pool row, for the table (TypiClust's
    own clustering when it made one)."""
    z = l2_normalize(features)
    clusters = sel.clusters if sel.clusters is not None else kmeans_labels(z, n_clusters, seed)
    return clusters, typicality(z, clusters)


def _write_to_label(tmp: Path, out: Path, ds: Any, fs: FeatureSet, rows: np.ndarray, clusters: np.ndarray,
                    typ: np.ndarray, link: bool) -> list[dict]:
    """The numbered copies (or links) in ``images/`` and ``to_label.csv``; returns the CSV's rows."""
    numbers = list(range(1, len(rows) + 1))
    copies = _place_images(ds, fs.rows[rows], numbers, tmp / "images", link)
    samples = ds.samples  # one lookup a selected cell (``ds.paths`` builds the list of all N paths)
    table = [{"row": num, "path": _rel(cp, tmp), "label": "", "cluster": int(clusters[i]),
              "typicality": float(typ[i]), "source": _rel(Path(samples[int(fs.rows[i])][0]), out)}
             for num, i, cp in zip(numbers, rows, copies)]
    with (tmp / "to_label.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "row", "cluster", "typicality", "source"])
        w.writeheader()
        for t in table:
            w.writerow({**t, "typicality": f"{t['typicality']:.4f}"})
    return table


def _write_sheets(tmp: Path, out: Path, ds: Any, ds_rows: np.ndarray) -> list[str]:
    """The numbered contact sheets, :data:`SHEET_MAX` cells a page; returns their final paths."""
    sheets = []
    for page, start in enumerate(range(0, len(ds_rows), SHEET_MAX)):
        name = "contact_sheet.png" if page == 0 else f"contact_sheet_{page + 1}.png"
        numbers = list(range(start + 1, min(start + SHEET_MAX, len(ds_rows)) + 1))
        save_contact_sheet(ds, ds_rows[start:start + SHEET_MAX], numbers, tmp / name)
        sheets.append(str(out / name))
    return sheets


def _report(data: str | Path, out: Path, ex: Any, fs: FeatureSet, sel: Selection, lab_rows: np.ndarray,
            labelled: Sequence[str | Path], features: str | Path | None, n_classes: int, clusters: np.ndarray,
            table: list[dict]) -> dict[str, Any]:
    """selection.json's content (the sheets and the map are added by the caller)."""
    return {
        "kind": "select",
        "data": str(data),
        "out": str(out),
        "pool_size": len(fs),
        "skipped_images": list(ex.skipped),
        "budget": int(len(sel.indices)),
        "strategy": sel.strategy,
        "seed": int(ex.options.seed),
        "n_classes": int(n_classes),
        "seconds": float(sel.seconds),
        "n_labelled": int(len(lab_rows)),
        "labelled_from": [str(s) for s in labelled],
        "features_from": str(features) if features is not None else None,
        "checkpoint": {k: v for k, v in fs.info.items() if k != "config"},
        "n_regions": int(len(np.unique(clusters))),
        "regions_covered": int(len(np.unique(clusters[np.concatenate([sel.indices, lab_rows])]))),
        "info": dict(sel.info),
        "selected": table,
        "files": {"csv": str(out / "to_label.csv"), "sheets": [], "map": None, "images": str(out / "images"),
                  "embeddings": str(features if features is not None else out / "embeddings.npz"),
                  "markdown": str(out / "report.md"), "json": str(out / "selection.json")},
    }


def _classes_covered(ds: Any, ds_rows: np.ndarray) -> dict[str, Any]:
    """When the pool has class folders (not used by the selection): its classes and how many the
    selected cells come from."""
    if not (ds.classes and (ds.labels[ds_rows] >= 0).all()):
        return {}
    return {"classes_in_pool": list(ds.classes), "classes_covered": int(len(np.unique(ds.labels[ds_rows])))}


def _check_budget(budget: int, pool: int, n_labelled: int, data: Any) -> None:
    """DataError when ``budget`` exceeds the ``pool - n_labelled`` unlabelled cells of ``data``."""
    free = pool - n_labelled
    if budget > free:
        extra = f" ({pool} images, {n_labelled} already labelled)" if n_labelled else ""
        raise DataError(f"--budget {budget} is more than the {free} unlabelled cells in {data}{extra}: "
                        f"use --budget {free} or fewer")


def format_selection(report: dict) -> str:
    """A few terminal lines for ``cellssl select``."""
    f = report["files"]
    avoid = f" avoiding {report['n_labelled']} labelled" if report["n_labelled"] else ""
    lines = [
        f"selected {report['budget']} of {report['pool_size']:,} cells ({report['strategy']}, "
        f"{report['seconds']:.1f} s){avoid}",
        *([f"  left out {len(report['skipped_images'])} unreadable image(s) (e.g. {report['skipped_images'][0]})"]
          if report.get("skipped_images") else []),
        f"  label them: {f['sheets'][0]} (numbers = 'row'), fill in the 'label' column of {f['csv']}",
    ]
    if report.get("classes_in_pool"):
        lines.append(f"  the pool's class folders: {report['classes_covered']} of {len(report['classes_in_pool'])} "
                     "classes among the selected cells")
    lines.append(f"report: {f['markdown']}")
    return "\n".join(lines)
