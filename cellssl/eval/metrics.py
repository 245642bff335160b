"""Classification metrics shared by the linear probe, kNN and fine-tuning reports, and the 95 %
intervals every report and benchmark prints (:func:`mean_ci95`, :func:`proportion_ci95`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score


def l2_normalize(x: np.ndarray, eps: float = 1e-12, dtype: type = np.float32) -> np.ndarray:
    """Rows scaled to unit Euclidean norm: ``x / max(||x||_2, eps)``; (N, F) -> (N, F) in ``dtype``."""
    x = np.asarray(x, dtype=dtype)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, confusion matrix and per-class accuracy.

    Args:
        y_true, y_pred: int arrays (N,) with values in ``range(len(classes))``.

    Returns:
        ``accuracy`` = mean(y_true == y_pred); ``balanced_accuracy`` = mean over classes present
        in ``y_true`` of their recall; ``macro_f1`` = unweighted mean of per-class F1 over classes
        present in ``y_true`` or ``y_pred``; ``confusion_matrix`` K x K list (rows = true class,
        columns = predicted); ``per_class_accuracy`` {class: recall or None when absent};
        ``support`` {class: count}; ``n`` = N.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    k = len(classes)
    labels = list(range(k))
    cm = confusion_matrix(y_true, y_pred, labels=labels) if len(y_true) else np.zeros((k, k), dtype=np.int64)
    support = cm.sum(axis=1)
    per_class = {c: (float(cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    present = sorted(set(np.unique(y_true).tolist()) | set(np.unique(y_pred).tolist()))
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else float("nan"),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else float("nan"),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro",
                                   zero_division=0)) if len(y_true) else float("nan"),
        "confusion_matrix": cm.astype(int).tolist(),
        "per_class_accuracy": per_class,
        "support": {c: int(s) for c, s in zip(classes, support)},
        "n": int(len(y_true)),
    }


# --- 95 % intervals ----------------------------------------------------------------------------
def t95(n: int) -> float:
    """Two-sided 95 % Student-t quantile for the mean of ``n`` values: ``t_{0.975, n-1}``
    (12.706 for n = 2, 2.776 for n = 5, 2.045 for n = 30; tends to 1.960). ``n`` ≥ 2."""
    if n < 2:
        raise ValueError(f"a t-interval needs at least 2 values, got {n}")
    return float(stats.t.ppf(0.975, n - 1))


def mean_ci95(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """``(mean, half_width)`` of the 95 % Student-t interval of the mean of ``values``:
    ``half_width = t95(n) * std(values, ddof=1) / sqrt(n)``; 0 for one value, (nan, nan) for none.

    The one interval of a mean over seeds or episodes in cellssl and its benchmarks."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    if a.size < 2:
        return float(a.mean()), 0.0
    return float(a.mean()), float(t95(a.size) * a.std(ddof=1) / math.sqrt(a.size))


def proportion_ci95(p: float, n: int) -> float:
    """Half-width of the 95 % normal (Wald) interval of an accuracy ``p`` measured on ``n`` items:
    ``z * sqrt(p (1 - p) / n)`` with ``z = Φ⁻¹(0.975) ≈ 1.960``."""
    return float(stats.norm.ppf(0.975) * math.sqrt(max(p * (1.0 - p), 0.0) / n))
