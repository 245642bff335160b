"""When not to trust a prediction: the ``unsure`` flag of ``cellssl predict``, chosen at fit time.

Two tests, both calibrated on cells the classifier was *not* fitted on (the validation part of
the labelled data that ``linear`` / ``finetune`` hold out), and stored in the saved model:

1. **Low confidence.** The confidence of a cell is its maximum softmax probability
   ``s(x) = max_c p(c | x)``. Sort the validation cells by ``s`` (highest first); the threshold
   ``t`` is the smallest confidence such that the cells with ``s >= t`` have an error rate of at
   most ``target_error`` (default 5 %): the largest confident set that meets the stated error.
   A new cell with ``s < t`` is flagged. When no threshold reaches the target, every cell is
   flagged (``t = inf``).
2. **Unlike any training class.** Class means ``mu_c`` and one shared covariance ``Sigma``
   (Ledoit-Wolf shrinkage) of the L2-normalised backbone features of the training cells give
   the Mahalanobis distance to the nearest class,
   ``d(x) = min_c sqrt((z - mu_c)^T Sigma^-1 (z - mu_c))``, ``z = f(x) / ||f(x)||`` (Lee et al.,
   NeurIPS 2018). A cell with ``d`` above the ``ood_quantile`` (default 99 %) of the validation
   cells' distances is flagged: about 1 % of ordinary cells are, and cells of another kind
   (debris, another stain, another cell type) mostly are.

Both thresholds can be re-chosen at prediction time (``--target-error``, ``--ood-quantile``)
from the validation confidences and distances saved with the model.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from threadpoolctl import threadpool_limits

from cellssl.eval.metrics import l2_normalize
from cellssl.eval.settings import DEFAULT_OOD_QUANTILE, DEFAULT_TARGET_ERROR

__all__ = ["confidence_threshold", "OODModel", "calibrate", "thresholds", "native_size",
           "MIN_CALIBRATION_CELLS"]

MIN_CALIBRATION_CELLS = 50  # fewer validation cells than this: thresholds are rough (said in the report)


def confidence_threshold(confidence: np.ndarray, correct: np.ndarray, target_error: float) -> dict:
    """The smallest confidence threshold whose accepted cells have error <= ``target_error``.

    Args:
        confidence: (V,) max softmax probability of each validation cell.
        correct: (V,) bool, prediction == truth.

    Math: sort by confidence descending; ``err_k = (# wrong among the top k) / k``; cut only
    between distinct confidences; ``k* = max {k : err_k <= target}``; ``t = s_(k*)``.

    Returns ``{"threshold": t (inf if no k qualifies), "accepted": k*/V, "error": err_k*,
    "n": V}``.
    """
    s = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct, dtype=bool).reshape(-1)
    n = len(s)
    if n == 0:
        return {"threshold": math.inf, "accepted": 0.0, "error": None, "n": 0}
    order = np.argsort(-s, kind="stable")
    s, wrong = s[order], ~ok[order]
    err = np.cumsum(wrong) / np.arange(1, n + 1)
    cut = np.r_[s[:-1] > s[1:], True]  # a threshold can only fall between distinct values
    good = np.flatnonzero(cut & (err <= target_error + 1e-12))
    if len(good) == 0:
        return {"threshold": math.inf, "accepted": 0.0, "error": None, "n": n}
    k = int(good[-1])
    return {"threshold": float(s[k]), "accepted": (k + 1) / n, "error": float(err[k]), "n": n}


class OODModel:
    """Mahalanobis distance to the nearest class (shared Ledoit-Wolf covariance).

    ``means``: (K, F) class means of L2-normalised features; ``precision``: (F, F) inverse of
    the shrunk shared within-class covariance.
    """

    def __init__(self, means: np.ndarray, precision: np.ndarray):
        self.means = np.asarray(means, dtype=np.float64)
        self.precision = np.asarray(precision, dtype=np.float64)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray) -> "OODModel":
        """Class means and shared covariance of ``features`` (N, F) with ``labels`` (N,)."""
        z = l2_normalize(features).astype(np.float64)
        labels = np.asarray(labels)
        classes = np.unique(labels)
        means = np.stack([z[labels == c].mean(axis=0) for c in classes])
        centred = z - means[np.searchsorted(classes, labels)]
        with threadpool_limits(1):  # torch's and numpy's thread pools fight on small CPUs
            lw = LedoitWolf(assume_centered=True).fit(centred)
        return cls(means, lw.precision_)

    def distances(self, features: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """(N, F) features -> (N,) ``min_c sqrt((z - mu_c)^T P (z - mu_c))``, ``z`` L2-normalised."""
        z = l2_normalize(features).astype(np.float64)
        out = np.empty(len(z))
        pm = self.means @ self.precision  # (K, F)
        mpm = np.einsum("kf,kf->k", pm, self.means)  # (K,)
        for i in range(0, len(z), chunk):
            x = z[i:i + chunk]
            xpx = np.einsum("nf,nf->n", x @ self.precision, x)
            d2 = xpx[:, None] - 2 * x @ pm.T + mpm[None, :]
            out[i:i + chunk] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
        return out


def calibrate(
    val_proba: np.ndarray,
    val_y: np.ndarray,
    train_features: np.ndarray,
    train_y: np.ndarray,
    val_features: np.ndarray,
    *,
    target_error: float = DEFAULT_TARGET_ERROR,
    ood_quantile: float = DEFAULT_OOD_QUANTILE,
    train_proba: np.ndarray | None = None,
) -> dict:
    """Everything ``predict`` needs to flag unsure cells, as a weights-only-loadable dict.

    Args:
        val_proba: (V, K) class probabilities of the held-out validation cells (from a classifier
            not fitted on them); ``val_y``: (V,) their true classes.
        train_features / train_y: (N, F), (N,) backbone features of the cells the classifier was fitted on.
        val_features: (V, F) backbone features of the validation cells.

    With fewer than 2 validation cells, the training cells (``train_proba`` (N, K)) stand in:
    optimistic, and said in ``reference``.
    """
    reference = "validation"
    if len(val_y) < 2 and train_proba is not None:
        warnings.warn("no validation cells: the unsure thresholds come from the training cells and are optimistic",
                      UserWarning, stacklevel=2)
        reference = "training"
        val_proba, val_y, val_features = train_proba, train_y, train_features
    val_proba = np.asarray(val_proba, dtype=np.float64).reshape(len(val_y), -1)
    conf = val_proba.max(axis=1) if len(val_proba) else np.zeros(0)
    correct = val_proba.argmax(axis=1) == np.asarray(val_y) if len(val_proba) else np.zeros(0, bool)
    ood = OODModel.fit(train_features, train_y)
    ref_d = ood.distances(val_features)
    return {
        "score": "max softmax probability",
        "target_error": float(target_error),
        "ood_quantile": float(ood_quantile),
        "reference": reference,
        "n_val": int(len(conf)),
        "val_confidence": torch.as_tensor(conf, dtype=torch.float32),
        "val_correct": torch.as_tensor(correct, dtype=torch.bool),
        "ood_means": torch.as_tensor(ood.means, dtype=torch.float32),
        "ood_precision": torch.as_tensor(ood.precision, dtype=torch.float32),
        "ood_reference_distances": torch.as_tensor(ref_d, dtype=torch.float32),
    }


def thresholds(unsure: dict, target_error: float | None = None, ood_quantile: float | None = None) -> dict:
    """The confidence and distance thresholds of a saved calibration (``target_error`` /
    ``ood_quantile`` default to the ones chosen at fit time)."""
    te = float(unsure["target_error"] if target_error is None else target_error)
    q = float(unsure["ood_quantile"] if ood_quantile is None else ood_quantile)
    conf = unsure["val_confidence"].double().numpy()
    ok = unsure["val_correct"].numpy().astype(bool)
    ct = confidence_threshold(conf, ok, te)
    ref = unsure["ood_reference_distances"].double().numpy()
    dt = float(np.quantile(ref, q)) if len(ref) else math.inf
    return {"target_error": te, "confidence_threshold": ct["threshold"], "val_accepted": ct["accepted"],
            "val_error": ct["error"], "n_val": ct["n"], "ood_quantile": q, "distance_threshold": dt,
            "reference": unsure.get("reference", "validation")}


def native_size(dataset: Any, n: int = 64) -> list[int]:
    """Median (height, width) in pixels of up to ``n`` evenly spaced readable images of an
    ImageDataset, before any resize (what the model was trained on)."""
    idx = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).astype(int))
    sizes = []
    for i in idx:
        try:
            img = dataset.read(int(i))
        except Exception:  # unreadable files are reported elsewhere
            continue
        sizes.append(img.shape[:2])
    if not sizes:
        return [0, 0]
    h, w = np.median(np.asarray(sizes), axis=0)
    return [int(h), int(w)]
