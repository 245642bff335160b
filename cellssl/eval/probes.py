"""What the probe commands share, in one home (command modules do not import each other).

- the features of a probe: a train and a test folder with one backbone, or a stratified split of
  one folder (:func:`train_test_features`, :func:`split_featureset`; ``knn``, ``linear``);
- the logistic regression (:func:`fit_logreg`; ``linear``, ``fewshot``);
- the classifier a probe or a fine-tune saves and ``predict`` / ``export`` load: a backbone and a
  linear head (:class:`Classifier`), and :func:`softmax` of its logits (``finetune``, ``predict``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import nn

from cellssl.data.datasets import split_indices
from cellssl.errors import DataError
from cellssl.eval.features import FeatureExtractor, FeatureSet, check_min_images
from cellssl.models.orientation import orientation_mean

__all__ = ["split_featureset", "train_test_features", "fit_logreg", "Classifier", "softmax"]


def split_featureset(fs: FeatureSet, fraction: float, seed: int = 0) -> tuple[FeatureSet, FeatureSet]:
    """Stratified random split: ``(rest, held_out)`` with ``fraction`` of each class held out."""
    if not 0 < fraction < 1:
        raise DataError(f"--split must be a fraction between 0 and 1 (e.g. 0.3), got {fraction}")
    check_min_images(fs, "data", 4)
    train_idx, test_idx = split_indices(fs.labels, (1 - fraction, fraction), seed=seed, stratified=True)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise DataError(f"splitting {len(fs)} images of {fs.root} with fraction {fraction} leaves an empty part")
    return fs.subset(train_idx), fs.subset(test_idx)


def train_test_features(ex: FeatureExtractor, train: str | Path, test: str | Path | None,
                        split: float | None) -> tuple[FeatureSet, FeatureSet, dict]:
    """Features of a train and a test folder with the one backbone of ``ex`` (or, without ``test``,
    a stratified ``split`` fraction of train held out, drawn with the options' ``seed``).
    Returns ``(train_features, test_features, extractor description)``."""
    if test is None and split is None:
        raise DataError("give a test folder (--test) or a fraction of the training folder to hold out (--split 0.3)")
    seed = ex.options.seed
    tr = ex.features(train, labelled=True)
    if test is not None:
        te = ex.features(test, labelled=True)
    else:
        tr, te = split_featureset(tr, float(split), seed)
    check_min_images(tr, "training data", 2)
    desc = ex.describe(train)
    desc["test_data"] = str(test) if test is not None else f"{split:g} stratified split of {train} (seed {seed})"
    return tr, te, desc


def fit_logreg(x: np.ndarray, y: np.ndarray, C: float, seed: int = 0, max_iter: int = 2000) -> LogisticRegression:
    """Softmax regression ``p(c|x) ∝ exp(w_c·x + b_c)`` minimising cross-entropy + ||W||²/(2C).

    Runs with one BLAS/OpenMP thread: with torch loaded, the competing thread pools made lbfgs
    ~30x slower (62 s vs 1.9 s for 7,600 x 512 features on 2 cores).
    """
    clf = LogisticRegression(C=float(C), max_iter=max_iter, solver="lbfgs", random_state=seed)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


class Classifier(nn.Module):
    """``backbone`` (B, C, S, S) -> (B, F) followed by ``head`` = Linear(F, K) -> logits (B, K).

    ``normalize=True`` L2-normalises the features before the head (a linear probe's folded form,
    :meth:`cellssl.eval.linear.ProbeFit.folded`). ``tta="dihedral"`` averages the features over the
    image's 8 rotations and flips (:func:`cellssl.models.orientation.orientation_mean`), as the probe's
    training features were; fine-tuning trains with ``"none"``.
    """
    def __init__(self, backbone: nn.Module, n_features: int, n_classes: int, normalize: bool = False,
                 tta: str = "none"):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(n_features, n_classes)
        self.normalize = bool(normalize)
        self.tta = tta

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, F), orientation-averaged with ``tta``."""
        return orientation_mean(self.backbone, x, self.tta)

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        """Features (B, F) -> logits (B, K)."""
        return self.head(nn.functional.normalize(f, dim=1) if self.normalize else f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise ``exp(l - max) / sum exp(l - max)``: (N, K) -> (N, K)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)
