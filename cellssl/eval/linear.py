"""Linear probe: multinomial logistic regression on frozen, normalised features.

Features are L2-normalised per image, standardised per dimension (mean/std of the training
set), and classified by sklearn's ``LogisticRegression`` (lbfgs, softmax). The inverse
regularisation strength C is chosen on a stratified 20 % validation split of the training set,
then the model is refit on all training images with that C.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from cellssl.config import recipe_to_dict
from cellssl.data.datasets import split_indices
from cellssl.engine.checkpoint import FORMAT, save_atomic
from cellssl.eval.features import FeatureExtractor, FeatureOptions, FeatureSet, align_labels, check_min_images
from cellssl.eval.metrics import classification_metrics, l2_normalize
from cellssl.eval.probes import fit_logreg, train_test_features
from cellssl.eval.report import LINEAR, report_paths, write_report
from cellssl.eval.settings import DEFAULT_OOD_QUANTILE, DEFAULT_TARGET_ERROR
from cellssl.eval.unsure import calibrate, native_size

__all__ = ["linear_probe", "linear", "fit_probe", "ProbeFit", "save_classifier"]


@dataclass
class ProbeFit:
    """A fitted linear probe: ``p(c | x) = softmax(W z + b)``, ``z = StandardScaler(x / ||x||_2)``.

    Attributes:
        classes: K class names (the training folder's).
        scaler, clf: the StandardScaler and LogisticRegression refit on all training features.
        C: the chosen inverse regularisation; ``validation``: {C: validation accuracy}.
        val_idx: (V,) rows of the training set held out to choose C (empty without a split);
        val_proba: (V, K) their probabilities under the probe fitted on the other rows with the
            chosen C (held-out scores: what ``unsure`` thresholds are calibrated on).
    """
    classes: list[str]
    scaler: StandardScaler
    clf: LogisticRegression
    C: float
    validation: dict
    fit_idx: np.ndarray
    val_idx: np.ndarray
    val_proba: np.ndarray

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, F) raw backbone features -> (N, K) probabilities over all ``classes``."""
        return _proba(self.clf, self.scaler.transform(l2_normalize(features)), len(self.classes))

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W (K, F), b (K,))`` acting on L2-normalised features, with the standardisation folded in:
        ``W' = W / s``, ``b' = b - W (m / s)`` (scaler mean ``m``, scale ``s``). Classes the probe
        never saw get zero weights and bias -1e4 (probability 0)."""
        coef, icpt = self.clf.coef_, self.clf.intercept_
        if coef.shape[0] == 1 and len(self.clf.classes_) == 2:  # sklearn's binary form: logit of class 1
            coef, icpt = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, icpt]
        w = coef / self.scaler.scale_[None, :]
        b = icpt - w @ self.scaler.mean_
        W = np.zeros((len(self.classes), w.shape[1]))
        B = np.full(len(self.classes), -1e4)
        W[self.clf.classes_], B[self.clf.classes_] = w, b
        return W.astype(np.float32), B.astype(np.float32)


def _proba(clf: LogisticRegression, z: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, K) probabilities in the global label space (the model may have seen only some classes)."""
    out = np.zeros((len(z), n_classes))
    out[:, clf.classes_] = clf.predict_proba(z)
    return out


def fit_probe(
    train: FeatureSet,
    seed: int = 0,
    Cs: Sequence[float] = (0.01, 0.1, 1, 10, 100),
    val_fraction: float = 0.2,
    max_iter: int = 2000,
    hold_out: bool = True,
) -> ProbeFit:
    """Fit the linear probe on ``train``: choose C on a stratified ``val_fraction`` split, refit on all.

    For each C in ``Cs`` fit on ``1 - val_fraction`` of train (stratified, ``seed``), score
    accuracy on the rest; refit on all of train with the best C (ties -> smaller C). With a single
    C the split is made only when ``hold_out`` (for held-out probabilities).
    """
    check_min_images(train, "training data", 2)
    ytr = train.labels
    xtr = l2_normalize(train.features)
    Cs = [float(c) for c in Cs]
    k = len(train.classes)
    val_scores: dict[str, float] = {}
    best_c = Cs[0] if len(Cs) == 1 else 1.0
    fit_idx, val_idx = np.arange(len(ytr)), np.zeros(0, dtype=np.int64)
    val_proba = np.zeros((0, k))
    if len(Cs) > 1 or hold_out:
        f_idx, v_idx = split_indices(ytr, (1 - val_fraction, val_fraction), seed=seed, stratified=True)
        if len(v_idx) > 0 and len(np.unique(ytr[f_idx])) >= 2:
            fit_idx, val_idx = f_idx, v_idx
            scaler = StandardScaler().fit(xtr[fit_idx])
            zf, zv = scaler.transform(xtr[fit_idx]), scaler.transform(xtr[val_idx])
            best = -1.0
            for c in Cs:
                clf = fit_logreg(zf, ytr[fit_idx], c, seed, max_iter)
                proba = _proba(clf, zv, k)
                acc = float(np.mean(proba.argmax(axis=1) == ytr[val_idx]))
                if len(Cs) > 1:
                    val_scores[f"{c:g}"] = acc
                if acc > best + 1e-12:
                    best, best_c, val_proba = acc, c, proba
    scaler = StandardScaler().fit(xtr)
    clf = fit_logreg(scaler.transform(xtr), ytr, best_c, seed, max_iter)
    return ProbeFit(list(train.classes), scaler, clf, best_c, val_scores, fit_idx, val_idx, val_proba)


def linear_probe(
    train: FeatureSet,
    test: FeatureSet,
    seed: int = 0,
    Cs: Sequence[float] = (0.01, 0.1, 1, 10, 100),
    val_fraction: float = 0.2,
    max_iter: int = 2000,
    fit: ProbeFit | None = None,
) -> dict:
    """Train a logistic-regression probe on ``train`` features (:func:`fit_probe`, or the given
    ``fit``), evaluate on ``test``.

    Pipeline: ``z = StandardScaler(x / ||x||_2)`` (scaler fit on train); for each C in ``Cs``
    fit on 80 % of train (stratified, ``seed``) and score accuracy on the other 20 %; refit on
    all of train with the best C (ties -> smaller C); predict test. Classes are matched by name.

    Returns a report dict: ``accuracy``, ``balanced_accuracy``, ``macro_f1``,
    ``confusion_matrix`` (K x K, rows = true), ``per_class_accuracy``, ``classes``, ``C``
    (chosen), ``validation`` {C: val accuracy}, ``train_accuracy``, ``settings``.
    """
    classes, ytr, yte = align_labels(train, test)
    if fit is None:
        fit = fit_probe(train, seed=seed, Cs=Cs, val_fraction=val_fraction, max_iter=max_iter, hold_out=False)
    pred = fit.predict_proba(test.features).argmax(axis=1)
    report: dict = {"kind": "linear", "classes": classes}
    report.update(classification_metrics(yte, pred, classes))
    report["C"] = fit.C
    report["validation"] = fit.validation
    report["train_accuracy"] = float(np.mean(fit.predict_proba(train.features).argmax(axis=1) == ytr))
    report["settings"] = {
        "Cs": [float(c) for c in Cs],
        "val_fraction": val_fraction,
        "seed": seed,
        "max_iter": max_iter,
        "n_train": int(len(ytr)),
        "n_test": int(len(yte)),
        "feature_dim": int(train.features.shape[1]),
        "preprocessing": "L2-normalise, then standardise (train mean/std)",
    }
    return report


def save_classifier(fit: ProbeFit, train: FeatureSet, extractor: Any, path: str | Path, *,
                    target_error: float = DEFAULT_TARGET_ERROR, ood_quantile: float = DEFAULT_OOD_QUANTILE) -> Path:
    """Write the probe and its backbone as one weights-only checkpoint ``path`` for ``cellssl predict``.

    ``model`` holds ``backbone.*`` (the extractor's backbone, AdaBN statistics included) and
    ``head.*`` (:meth:`ProbeFit.folded`, acting on L2-normalised features: ``head_normalize``);
    ``tta`` the extractor's orientation averaging (``predict`` computes the features the same way);
    ``unsure`` holds the thresholds calibrated on the held-out validation rows
    (:func:`~cellssl.eval.unsure.calibrate`); ``native_size`` the training images' median size.
    """
    W, b = fit.folded()
    fit_rows = fit.fit_idx if len(fit.val_idx) else np.arange(len(train))
    unsure = calibrate(fit.val_proba, train.labels[fit.val_idx], train.features[fit_rows], train.labels[fit_rows],
                       train.features[fit.val_idx], target_error=target_error, ood_quantile=ood_quantile,
                       train_proba=fit.predict_proba(train.features[fit_rows]))
    config = recipe_to_dict(extractor.recipe)
    config["data"] = dataclasses.asdict(extractor.data_cfg)
    try:
        size = native_size(extractor.build(train.root, labelled=True)[0])
    except Exception:  # e.g. a .npz split: the size check at prediction time is then skipped
        size = [0, 0]
    state = {f"backbone.{k}": v.detach().cpu().clone() for k, v in extractor.backbone.state_dict().items()}
    state["head.weight"], state["head.bias"] = torch.from_numpy(W), torch.from_numpy(b)
    return save_atomic({
        "format": FORMAT,
        "kind": "linear",
        "method": "linear probe",
        "step": 0,
        "config": config,
        "in_chans": int(extractor.info["in_chans"]),
        "classes": list(fit.classes),
        "head_normalize": True,
        "C": float(fit.C),
        "source": extractor.spec,
        "source_description": extractor.describe()["description"],
        "adapt_bn": extractor.adapt_bn,
        "tta": extractor.tta,  # the probe's features were orientation-averaged: predict averages too
        "native_size": size,
        "unsure": unsure,
        "model": state,
    }, path)


def linear(checkpoint: str | Path, train: str | Path, test: str | Path | None, out: str | Path, *,
           split: float | None = None, Cs: Sequence[float] = (0.01, 0.1, 1, 10, 100), plots: bool = True,
           classifier: bool = True, options: FeatureOptions | None = None, **fields: Any) -> dict:
    """Linear-probe evaluation of a checkpoint on labelled folders ``train`` / ``test`` (feature
    settings :class:`~cellssl.eval.features.FeatureOptions`).

    With ``test=None`` a stratified ``split`` fraction of ``train`` (the options' ``seed``) is held out
    as the test set; neither raises DataError. Writes ``out`` (report.json + .md + plots) and, with
    ``classifier``, the probe with its backbone and ``unsure`` calibration beside it
    (``classifier.pt``, or ``<stem>_classifier.pt`` for ``out=<stem>.json``) for ``cellssl predict``.
    Returns the report.
    """
    ex = FeatureExtractor(checkpoint, options, **fields)
    seed = ex.options.seed
    tr, te, desc = train_test_features(ex, train, test, split)
    fit = fit_probe(tr, seed=seed, Cs=Cs)
    report = linear_probe(tr, te, seed=seed, Cs=Cs, fit=fit)
    report["checkpoint"] = desc
    report["settings"].update({"split": split, "max_per_class": ex.options.max_per_class})
    if classifier:
        path = save_classifier(fit, tr, ex, report_paths(out)["classifier"])
        report["classifier"] = str(path)
    write_report(report, out, LINEAR, features=tr if plots else None, plots=plots)
    return report
