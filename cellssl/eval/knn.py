"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / DINO protocol).

For a query ``q`` and training features ``x_i`` (all L2-normalised), the k most cosine-similar
training images vote for their class with weight ``exp(s_i / T)``, ``s_i = <q, x_i>``; the
class with the largest summed weight wins. No training, no hyper-parameters besides k and T:
a quick, honest read-out of how well a representation clusters classes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from cellssl.augment.views import build_eval_transform
from cellssl.config import EvalConfig
from cellssl.data.datasets import TransformedDataset, build_dataset, split_indices
from cellssl.errors import ConfigError, DataError
from cellssl.eval.features import (
    FeatureExtractor,
    FeatureOptions,
    FeatureSet,
    align_labels,
    extract_features,
    subsample_per_class,
)
from cellssl.eval.metrics import classification_metrics
from cellssl.eval.probes import train_test_features
from cellssl.eval.report import KNN, write_report

__all__ = ["knn_classify", "knn_eval", "knn", "knn_monitor", "online_knn_accuracy"]

EVAL = EvalConfig()  # a recipe's evaluation defaults (k, temperature): the functions default to them


def knn_classify(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    k: int = EVAL.knn_k,
    temperature: float = EVAL.knn_temperature,
    n_classes: int | None = None,
    chunk: int = 1024,
) -> np.ndarray:
    """Weighted kNN predictions.

    Args:
        train_feats: (N, F) features; train_labels: (N,) ints in ``[0, n_classes)``.
        test_feats: (M, F) features.
        k: neighbours (capped at N); temperature: T of the vote weights.

    Math: rows are L2-normalised, ``S = Q X^T`` (M, N) cosine similarities; for each query the
    top-k ``s_j`` vote ``score_c = sum_{j in topk, y_j = c} exp(s_j / T)``; prediction
    ``argmax_c score_c``.

    Returns:
        int64 array (M,) of predicted classes.
    """
    train_labels = np.asarray(train_labels, dtype=np.int64)
    if len(train_labels) == 0:
        raise DataError("kNN needs at least one training image")
    n_classes = int(n_classes if n_classes is not None else train_labels.max() + 1)
    k = max(1, min(int(k), len(train_labels)))
    x = torch.nn.functional.normalize(torch.as_tensor(np.asarray(train_feats, dtype=np.float32)), dim=1)
    q_all = torch.nn.functional.normalize(torch.as_tensor(np.asarray(test_feats, dtype=np.float32)), dim=1)
    y = torch.as_tensor(train_labels)
    preds = []
    for start in range(0, q_all.shape[0], chunk):
        q = q_all[start:start + chunk]
        sim = q @ x.T  # (m, N)
        top_s, top_i = sim.topk(k, dim=1)  # (m, k)
        weights = (top_s / temperature).exp()
        votes = torch.zeros(q.shape[0], n_classes, dtype=weights.dtype)
        votes.scatter_add_(1, y[top_i], weights)
        preds.append(votes.argmax(dim=1))
    if not preds:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(preds).numpy().astype(np.int64)


def knn_eval(train: FeatureSet, test: FeatureSet, k: int = EVAL.knn_k,
             temperature: float = EVAL.knn_temperature) -> dict:
    """kNN classification of ``test`` by ``train`` features; classes matched by name.

    Returns a report dict: ``accuracy``, ``balanced_accuracy``, ``macro_f1``,
    ``confusion_matrix`` (K x K, rows = true), ``per_class_accuracy``, ``classes``, ``settings``
    (k, temperature, n_train, n_test, feature_dim).
    """
    classes, ytr, yte = align_labels(train, test)
    pred = knn_classify(train.features, ytr, test.features, k=k, temperature=temperature, n_classes=len(classes))
    report = {"kind": "knn", "classes": classes}
    report.update(classification_metrics(yte, pred, classes))
    report["settings"] = {
        "k": int(k),
        "k_used": int(min(k, len(ytr))),
        "temperature": float(temperature),
        "n_train": int(len(ytr)),
        "n_test": int(len(yte)),
        "feature_dim": int(train.features.shape[1]),
    }
    return report


def knn(checkpoint: str | Path, train: str | Path, test: str | Path | None, out: str | Path, *,
        k: int = EVAL.knn_k, temperature: float = EVAL.knn_temperature, split: float | None = None, plots: bool = True,
        options: FeatureOptions | None = None, **fields: Any) -> dict:
    """kNN evaluation of a checkpoint: features of ``train`` and ``test`` (or a stratified
    ``split`` fraction of ``train`` held out; settings :class:`FeatureOptions`), :func:`knn_eval`,
    report written to ``out`` (``report.json`` + ``.md`` + confusion-matrix and embedding plots).
    Returns the report."""
    ex = FeatureExtractor(checkpoint, options, **fields)
    tr, te, desc = train_test_features(ex, train, test, split)
    report = knn_eval(tr, te, k=k, temperature=temperature)
    report["checkpoint"] = desc
    report["settings"].update({"seed": ex.options.seed, "split": split, "max_per_class": ex.options.max_per_class})
    write_report(report, out, KNN, features=tr if plots else None, plots=plots)
    return report


def online_knn_accuracy(
    backbone: nn.Module,
    dataset: Any,
    transform: Any,
    device: str | torch.device,
    k: int = EVAL.knn_k,
    temperature: float = EVAL.knn_temperature,
    val_fraction: float = 0.3,
    seed: int = 0,
    max_images: int = 2000,
) -> float:
    """kNN accuracy monitor used during pretraining.

    At most ``max_images`` images of the labelled ``dataset`` (an ImageDataset read without a
    transform; class-balanced cap, fixed by ``seed``) are passed through ``transform`` and the
    backbone (eval mode, no grad; the caller restores train mode); a stratified
    ``val_fraction`` of them is classified by :func:`knn_classify` against the rest.

    Returns:
        accuracy in [0, 1] (float).
    """
    labels = np.asarray(dataset.labels)
    n_cls = max(1, len(np.unique(labels)))
    keep = subsample_per_class(labels, max(1, int(np.ceil(max_images / n_cls))), seed)
    if len(keep) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_images, replace=False))
    ds = TransformedDataset(dataset, transform, keep) if transform is not None else Subset(dataset, keep)
    feats = extract_features(backbone, ds, device, batch_size=256, num_workers=0, progress=False)
    y = labels[keep]
    tr, va = split_indices(y, (1 - val_fraction, val_fraction), seed=seed, stratified=True)
    if len(tr) == 0 or len(va) == 0:
        raise DataError(f"the kNN monitor needs more labelled images than {len(keep)}")
    pred = knn_classify(feats[tr], y[tr], feats[va], k=k, temperature=temperature, n_classes=int(labels.max()) + 1)
    return float(np.mean(pred == y[va]))


def knn_monitor(recipe: Any) -> Callable[[nn.Module], float] | None:
    """The online kNN monitor of ``recipe.eval`` for :func:`cellssl.engine.fit.fit`: a callable
    backbone -> :func:`online_knn_accuracy` on the labelled folder ``eval.knn_data`` (read with the
    recipe's data settings, run on the backbone's device). None when ``eval.knn_every`` is 0."""
    ev = recipe.eval
    if not ev.knn_every:
        return None
    if not ev.knn_data:
        raise ConfigError("eval.knn_every is set but eval.knn_data (a labelled folder) is not")
    ds = build_dataset(recipe.data, ev.knn_data, labelled=True)
    transform = build_eval_transform(recipe.data, ds.channels)

    def run(backbone: nn.Module) -> float:
        device = next(backbone.parameters()).device
        return online_knn_accuracy(backbone, ds, transform, device, k=ev.knn_k, temperature=ev.knn_temperature)

    return run
