"""Few-shot evaluation: N-way K-shot episodes on frozen features.

Each episode draws ``ways`` classes, ``shots`` support and ``queries`` query images per class
(disjoint). The default classifier is SimpleShot (Wang et al. 2019) with CL2N normalisation
computed on the episode's own support set: subtract the support mean, L2-normalise, assign each
query to the nearest class centroid (Euclidean). ``logreg`` fits a logistic regression on the
same normalised support features instead. Accuracy is averaged over episodes and reported with
a 95 % Student-t interval ``t95(episodes) * std / sqrt(episodes)`` (:func:`cellssl.eval.metrics.mean_ci95`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellssl.config import EvalConfig
from cellssl.errors import ConfigError, DataError
from cellssl.eval.features import FeatureOptions, FeatureSet, feature_options, load_features
from cellssl.eval.metrics import l2_normalize, mean_ci95
from cellssl.eval.probes import fit_logreg
from cellssl.eval.report import FEWSHOT, write_report
from cellssl.eval.settings import FEWSHOT_CLASSIFIERS

__all__ = [
    "Episode",
    "sample_episodes",
    "cl2n",
    "prototype_classify",
    "logreg_classify",
    "mean_ci95",
    "run_fewshot",
    "fewshot",
]

EVAL = EvalConfig()  # a recipe's evaluation defaults (shots, queries, episodes): the functions default to them


@dataclass
class Episode:
    """Indices into the feature array and their (global) class labels.

    ``support_idx`` / ``support_y``: (ways * shots,), ``query_idx`` / ``query_y``: (ways * queries,),
    grouped by class in the order of ``classes`` (ways,).
    """
    support_idx: np.ndarray
    support_y: np.ndarray
    query_idx: np.ndarray
    query_y: np.ndarray
    classes: np.ndarray


def sample_episodes(
    labels: np.ndarray,
    ways: int | None,
    shots: int,
    queries: int,
    episodes: int,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> list[Episode]:
    """Draw ``episodes`` N-way K-shot episodes from ``labels`` (N,), deterministic in ``seed``.

    Every chosen class contributes exactly ``shots`` support and ``queries`` query indices,
    sampled without replacement, so no query is in the support. Classes with fewer than
    ``shots + queries`` images raise DataError naming them, unless ``ways`` is smaller than the
    number of classes and enough other classes are large enough: then only those are sampled
    (with a warning). ``ways=None`` means all classes.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if shots < 1 or queries < 1 or episodes < 1:
        raise ConfigError(f"shots, queries and episodes must be at least 1 (got {shots}, {queries}, {episodes})")
    present, counts = np.unique(labels[labels >= 0], return_counts=True)
    n_classes = len(present)
    if ways is None:
        ways = n_classes
    if ways < 2:
        raise ConfigError(f"ways must be at least 2, got {ways}")
    if ways > n_classes:
        raise DataError(f"{ways}-way episodes need {ways} classes but the data has {n_classes}")

    def name(c: int) -> str:
        return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)

    need = shots + queries
    small = [(int(c), int(n)) for c, n in zip(present, counts) if n < need]
    eligible = np.array([c for c, n in zip(present, counts) if n >= need], dtype=np.int64)
    if small:
        detail = ", ".join(f"'{name(c)}' has {n}" for c, n in small)
        if ways < n_classes and len(eligible) >= ways:
            warnings.warn(
                f"{shots}-shot episodes with {queries} queries need {need} images per class; {detail}: "
                f"sampling only the other {len(eligible)} classes",
                UserWarning,
                stacklevel=2,
            )
        else:
            raise DataError(
                f"{shots}-shot episodes with {queries} queries need {need} images per class but class {detail} "
                f"image(s): add images, lower --queries/--shots, or use --ways {max(2, len(eligible))}"
                if len(eligible) >= 2
                else f"{shots}-shot episodes with {queries} queries need {need} images per class but class {detail} "
                f"image(s): add images or lower --queries/--shots"
            )
    by_class = {int(c): np.flatnonzero(labels == c) for c in eligible}
    rng = np.random.default_rng(seed)
    out: list[Episode] = []
    for _ in range(episodes):
        chosen = np.sort(rng.choice(eligible, size=ways, replace=False)) if ways < len(eligible) else eligible
        s_idx, q_idx = [], []
        for c in chosen:
            pick = rng.choice(by_class[int(c)], size=need, replace=False)
            s_idx.append(pick[:shots])
            q_idx.append(pick[shots:])
        out.append(
            Episode(
                support_idx=np.concatenate(s_idx),
                support_y=np.repeat(chosen, shots),
                query_idx=np.concatenate(q_idx),
                query_y=np.repeat(chosen, queries),
                classes=np.asarray(chosen, dtype=np.int64),
            )
        )
    return out


def cl2n(support: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CL2N: centre both sets on the support mean ``mu = mean(support)``, then L2-normalise rows.

    (S, F), (Q, F) -> (S, F), (Q, F) float32: ``z = (x - mu) / ||x - mu||_2``.
    """
    mu = support.mean(axis=0, keepdims=True)
    return l2_normalize(support - mu), l2_normalize(query - mu)


def prototype_classify(support: np.ndarray, support_y: np.ndarray, query: np.ndarray) -> np.ndarray:
    """SimpleShot nearest centroid on CL2N features.

    ``p_c = mean_{i: y_i = c} z_i`` over the normalised support; query ``z`` gets
    ``argmin_c ||z - p_c||_2``. Returns predicted labels (Q,) in ``support_y``'s label space.
    """
    zs, zq = cl2n(support, query)
    classes = np.unique(support_y)
    protos = np.stack([zs[support_y == c].mean(axis=0) for c in classes])  # (W, F)
    d2 = (zq**2).sum(1, keepdims=True) - 2 * zq @ protos.T + (protos**2).sum(1)[None, :]
    return classes[d2.argmin(axis=1)]


def logreg_classify(support: np.ndarray, support_y: np.ndarray, query: np.ndarray, C: float = 10.0,
                    seed: int = 0) -> np.ndarray:
    """Logistic regression (lbfgs, softmax, inverse regularisation ``C``) on CL2N support features.

    Returns predicted labels (Q,) in ``support_y``'s label space.
    """
    zs, zq = cl2n(support, query)
    clf = fit_logreg(zs, support_y, C, seed, max_iter=1000)
    return clf.predict(zq).astype(np.int64)


def run_fewshot(
    features: FeatureSet,
    ways: int | None = None,
    shots: Sequence[int] | int = tuple(EVAL.shots),
    queries: int = EVAL.queries,
    episodes: int = EVAL.episodes,
    classifier: str = FEWSHOT_CLASSIFIERS[0],
    seed: int = 0,
) -> dict:
    """Few-shot accuracy of frozen ``features`` for each K in ``shots``.

    Episodes for shot K use seed ``[seed, K]`` (stable when the list of shots changes).

    Returns a report dict: ``results`` {str(K): {shots, ways, mean, ci95, std, min, max,
    per_class_accuracy {class: query accuracy over all episodes}, classes_used}}, ``classes``,
    and ``settings`` (ways, shots, queries, episodes, classifier, seed, n_images, n_classes,
    feature_dim).
    """
    if classifier not in FEWSHOT_CLASSIFIERS:
        raise ConfigError(f"unknown few-shot classifier '{classifier}': use one of {', '.join(FEWSHOT_CLASSIFIERS)}")
    if not features.labelled:
        raise DataError(f"few-shot evaluation needs labelled data (one sub-folder per class) in {features.root}")
    shots = [int(shots)] if isinstance(shots, (int, np.integer)) else [int(s) for s in shots]
    x = np.asarray(features.features, dtype=np.float32)
    y = np.asarray(features.labels, dtype=np.int64)
    names = list(features.classes)
    results: dict[str, dict] = {}
    for k in shots:
        k_seed = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        eps = sample_episodes(y, ways, k, queries, episodes, seed=k_seed,
                              class_names=names)
        accs = np.empty(len(eps))
        correct = np.zeros(len(names), dtype=np.int64)
        total = np.zeros(len(names), dtype=np.int64)
        for i, ep in enumerate(eps):
            s, q = x[ep.support_idx], x[ep.query_idx]
            if classifier == "prototype":
                pred = prototype_classify(s, ep.support_y, q)
            else:
                pred = logreg_classify(s, ep.support_y, q, seed=seed)
            hit = pred == ep.query_y
            accs[i] = hit.mean()
            np.add.at(correct, ep.query_y, hit.astype(np.int64))
            np.add.at(total, ep.query_y, 1)
        mean, ci = mean_ci95(accs)
        used = [names[c] for c in range(len(names)) if total[c] > 0]
        results[str(k)] = {
            "shots": k,
            "ways": int(len(eps[0].classes)),
            "mean": mean,
            "ci95": ci,
            "std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
            "min": float(accs.min()),
            "max": float(accs.max()),
            "per_class_accuracy": {names[c]: float(correct[c] / total[c]) for c in range(len(names)) if total[c] > 0},
            "classes_used": used,
        }
    return {
        "kind": "fewshot",
        "classes": names,
        "results": results,
        "settings": {
            "ways": ways if ways is not None else "all",
            "shots": shots,
            "queries": queries,
            "episodes": episodes,
            "classifier": classifier,
            "normalisation": "CL2N (subtract support mean, L2-normalise)",
            "seed": seed,
            "n_images": int(len(y)),
            "n_classes": int(len(np.unique(y))),
            "feature_dim": int(x.shape[1]),
        },
    }


def fewshot(checkpoint: str | Path, data: str | Path, out: str | Path, *, ways: int | None = None,
            shots: Sequence[int] = tuple(EVAL.shots), queries: int = EVAL.queries, episodes: int = EVAL.episodes,
            classifier: str = FEWSHOT_CLASSIFIERS[0],
            plots: bool = True, options: FeatureOptions | None = None, **fields: Any) -> dict:
    """Few-shot evaluation of a checkpoint on a labelled folder: features computed once
    (:func:`load_features`; settings :class:`FeatureOptions`, whose ``seed`` also draws the episodes),
    :func:`run_fewshot` for every K, report written to ``out`` (json + md + accuracy-vs-shots and
    embedding plots). Returns the report."""
    if classifier not in FEWSHOT_CLASSIFIERS:
        raise ConfigError(f"unknown few-shot classifier '{classifier}': use one of {', '.join(FEWSHOT_CLASSIFIERS)}")
    opts = feature_options(options, **fields)
    fs = load_features(checkpoint, data, labelled=True, options=opts)
    report = run_fewshot(fs, ways=ways, shots=shots, queries=queries, episodes=episodes, classifier=classifier,
                         seed=opts.seed)
    report["checkpoint"] = fs.info
    report["settings"]["max_per_class"] = opts.max_per_class
    write_report(report, out, FEWSHOT, features=fs if plots else None, plots=plots)
    return report
