"""Lab-effect scores: are two labs' cells of the same type mixed, and are different types apart?

All scores work on L2-normalised features (so Euclidean neighbours are cosine neighbours), with
``lab`` (N,) and ``cell_type`` (N,) arrays of any labels. Definitions (also in docs/adaptation.md):

* :func:`lab_mixing` — within each cell type, the fraction of a cell's k nearest neighbours that
  come from another lab, divided by that fraction under perfect mixing. 1 = mixed, 0 = apart.
* :func:`ilisi` — the inverse Simpson index of the labs among a cell's k nearest neighbours (all
  types), rescaled so that 0 = one lab only and 1 = the value with the lab labels shuffled.
* :func:`type_silhouette` — the silhouette of the cell types (cosine distance), both labs pooled.
* :func:`cross_lab_knn_accuracy` — a kNN classifier fitted on one lab's cells predicts the other
  lab's cell types (both directions, mean); chance = 1 / number of types.

:func:`lab_effect_scores` computes all four for a source and a target set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import silhouette_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from threadpoolctl import threadpool_limits

from cellssl.eval.features import subsample_per_class
from cellssl.eval.metrics import l2_normalize

__all__ = ["neighbours", "lab_mixing", "ilisi", "type_silhouette", "cross_lab_knn_accuracy", "lab_effect_scores",
           "SCORE_NAMES"]

SCORE_NAMES = {
    "lab_mixing": "lab mixing within type (kNN)",
    "ilisi": "iLISI (normalised)",
    "type_silhouette": "type silhouette",
    "cross_lab_knn_acc": "cross-lab kNN type acc.",
}


def neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """Indices (N, k) of each row's ``k`` nearest other rows of ``x`` (N, F) by cosine distance
    (Euclidean on L2-normalised rows), nearest first, the row itself excluded; ``k`` is capped at N - 1."""
    x = l2_normalize(np.asarray(x, dtype=np.float64), dtype=np.float64)
    k = int(min(k, len(x) - 1))
    if k < 1:
        return np.zeros((len(x), 0), dtype=np.int64)
    with threadpool_limits(1):
        idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)
    # drop the row itself (usually first; with duplicates it can be anywhere among ties)
    out = np.empty((len(x), k), dtype=np.int64)
    for i, row in enumerate(idx):
        row = row[row != i]
        out[i] = row[:k]
    return out


def lab_mixing(x: np.ndarray, lab: np.ndarray, cell_type: np.ndarray, k: int = 15) -> dict[str, Any]:
    """kNN lab mixing within cell types.

    For every type t present in at least two labs and with more than k + 1 cells (fewer: every
    cell would be every other's neighbour and the score 1 by construction), take its n_t cells
    alone; for cell i (lab b_i) with its k nearest neighbours among them:

        f_i = |{j in kNN(i): b_j != b_i}| / k            (observed other-lab fraction)
        e_i = (n_t - n_{t, b_i}) / (n_t - 1)            (its mean when labs are mixed at random)
        s_t = mean_i f_i / mean_i e_i

    ``score`` = mean of s_t over types (each type counts once). 1 = the labs are as mixed as if
    the lab labels were random, 0 = every neighbour comes from the cell's own lab; above 1 = the
    labs alternate more than chance. Returns ``{"score", "per_type": {t: s_t}, "k"}`` (score NaN
    when no type has cells from two labs)."""
    lab, cell_type = np.asarray(lab), np.asarray(cell_type)
    per_type: dict[str, float] = {}
    for t in np.unique(cell_type):
        m = np.flatnonzero(cell_type == t)
        labs_t = lab[m]
        if len(np.unique(labs_t)) < 2 or len(m) <= k + 1:  # every cell a neighbour of every cell: 1 by construction
            continue
        nn = neighbours(x[m], k)
        observed = (labs_t[nn] != labs_t[:, None]).mean(axis=1)
        _, inv, counts = np.unique(labs_t, return_inverse=True, return_counts=True)
        expected = (len(m) - counts[inv]) / (len(m) - 1)
        per_type[str(t)] = float(observed.mean() / expected.mean())
    score = float(np.mean(list(per_type.values()))) if per_type else float("nan")
    return {"score": score, "per_type": per_type, "k": int(k)}


def _inverse_simpson(lab_codes: np.ndarray, nn: np.ndarray, n_labs: int) -> np.ndarray:
    """1 / sum_b p_b(i)^2 with p_b(i) the share of lab b among the neighbours ``nn[i]``: (N,)."""
    counts = np.stack([(lab_codes[nn] == b).sum(axis=1) for b in range(n_labs)], axis=1)
    p = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return 1.0 / np.maximum((p**2).sum(axis=1), 1e-12)


def ilisi(x: np.ndarray, lab: np.ndarray, k: int = 15, permutations: int = 5, seed: int = 0) -> dict[str, Any]:
    """Normalised integration LISI (Korsunsky et al., Nat. Methods 2019, with a plain kNN instead of
    the perplexity kernel) over all cells:

        L_i   = 1 / sum_b p_b(i)^2,  p_b(i) = share of lab b among the k nearest neighbours of i
        L     = mean_i L_i                         (1 = one lab only ... B = all B labs equally)
        L_mix = the same with the lab labels randomly permuted (mean of ``permutations`` draws):
                what perfect mixing gives with these lab sizes and this k
        score = (L - 1) / (L_mix - 1)

    1 = mixed as well as random labels, 0 = every neighbourhood holds one lab. Returns
    ``{"score", "ilisi", "ilisi_mixed", "k"}`` (NaN with fewer than two labs or k + 1 cells)."""
    _, codes = np.unique(np.asarray(lab), return_inverse=True)
    n_labs = int(codes.max()) + 1 if len(codes) else 0
    if n_labs < 2 or len(codes) <= k + 1:
        return {"score": float("nan"), "ilisi": float("nan"), "ilisi_mixed": float("nan"), "k": int(k)}
    nn = neighbours(x, k)
    observed = float(_inverse_simpson(codes, nn, n_labs).mean())
    rng = np.random.default_rng(seed)
    mixed = float(np.mean([_inverse_simpson(rng.permutation(codes), nn, n_labs).mean()
                           for _ in range(max(1, permutations))]))
    score = (observed - 1.0) / (mixed - 1.0) if mixed > 1.0 else float("nan")
    return {"score": float(score), "ilisi": observed, "ilisi_mixed": mixed, "k": int(k)}


def type_silhouette(x: np.ndarray, cell_type: np.ndarray) -> float:
    """Mean silhouette of the cell types, cosine distance, all cells (both labs) together:

        s_i = (b_i - a_i) / max(a_i, b_i)

    a_i = mean distance to the other cells of i's type, b_i = smallest mean distance to another
    type's cells. In [-1, 1]: near 1 = types compact and apart, 0 = types overlap. NaN with fewer
    than two types."""
    cell_type = np.asarray(cell_type)
    if len(np.unique(cell_type)) < 2 or len(cell_type) < 3:
        return float("nan")
    with threadpool_limits(1):
        return float(silhouette_score(l2_normalize(np.asarray(x, dtype=np.float64), dtype=np.float64), cell_type,
                                      metric="cosine"))


def cross_lab_knn_accuracy(x: np.ndarray, lab: np.ndarray, cell_type: np.ndarray, k: int = 15) -> float:
    """Cell-type accuracy of a k-nearest-neighbour vote (cosine) fitted on one lab's cells and
    tested on the other lab's, for each ordered pair of labs, averaged; only types that both labs
    have. High = a type looks the same in both labs (a classifier carries over); chance = 1/types."""
    x = l2_normalize(np.asarray(x, dtype=np.float64), dtype=np.float64)
    lab, cell_type = np.asarray(lab), np.asarray(cell_type)
    labs = np.unique(lab)
    accs = []
    for a in labs:
        for b in labs:
            if a == b:
                continue
            shared = np.intersect1d(cell_type[lab == a], cell_type[lab == b])
            tr = (lab == a) & np.isin(cell_type, shared)
            te = (lab == b) & np.isin(cell_type, shared)
            if len(shared) < 2 or tr.sum() < 2 or te.sum() < 1:
                continue
            clf = KNeighborsClassifier(n_neighbors=int(min(k, tr.sum())))
            with threadpool_limits(1):
                accs.append(float(clf.fit(x[tr], cell_type[tr]).score(x[te], cell_type[te])))
    return float(np.mean(accs)) if accs else float("nan")


def lab_effect_scores(xs: np.ndarray, types_s: Sequence[str], xt: np.ndarray, types_t: Sequence[str], k: int = 15,
                      max_per_type: int | None = 300, seed: int = 0) -> dict[str, Any]:
    """The four scores for source features ``xs`` (N, F) with type names ``types_s`` (N,) and
    target ``xt`` (M, F), ``types_t`` (M,), on the types both labs have (at most ``max_per_type``
    random cells per type and lab). Returns ``{"lab_mixing", "lab_mixing_per_type", "ilisi",
    "type_silhouette", "cross_lab_knn_acc", "types", "n_source", "n_target", "k"}``."""
    types_s, types_t = np.asarray(types_s, dtype=str), np.asarray(types_t, dtype=str)
    shared = sorted(set(types_s.tolist()) & set(types_t.tolist()))
    ks = np.flatnonzero(np.isin(types_s, shared))
    kt = np.flatnonzero(np.isin(types_t, shared))
    ks = ks[subsample_per_class(types_s[ks], max_per_type, seed)]
    kt = kt[subsample_per_class(types_t[kt], max_per_type, seed)]
    x = np.concatenate([np.asarray(xs)[ks], np.asarray(xt)[kt]]).astype(np.float64)
    lab = np.r_[np.zeros(len(ks), dtype=np.int64), np.ones(len(kt), dtype=np.int64)]
    cell_type = np.concatenate([types_s[ks], types_t[kt]])
    mix = lab_mixing(x, lab, cell_type, k)
    return {
        "lab_mixing": mix["score"],
        "lab_mixing_per_type": mix["per_type"],
        "ilisi": ilisi(x, lab, k, seed=seed)["score"],
        "type_silhouette": type_silhouette(x, cell_type),
        "cross_lab_knn_acc": cross_lab_knn_accuracy(x, lab, cell_type, k),
        "types": shared,
        "n_source": int(len(ks)),
        "n_target": int(len(kt)),
        "k": int(k),
    }
