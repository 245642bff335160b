"""Classification metrics shared by the linear probe, kNN and fine-tuning reports."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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
