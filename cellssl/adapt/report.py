"""Transfer report: what each adaptation step buys on a new lab's labelled images.

Rows (all on the labelled *target* folder unless said otherwise):

* ``source_domain`` — the source model on the labelled *source* folder (the reference: what the
  model does at home);
* ``source`` — the source model as is on the target;
* ``adabn`` — + AdaBN: BatchNorm statistics re-estimated on the target images;
* ``stain`` — + stain normalisation: target images normalised to the source folder's stain
  (``stain_method``: Macenko by default, or Reinhard; the row label names the one used);
* ``scale`` — + scale matched: with ``source_um_per_px`` and ``target_um_per_px`` (µm per pixel of
  each folder), the target images resampled to the source's scale (:mod:`cellssl.data.scale`);
* ``continued`` — + continued SSL: the ``adapted`` checkpoint from ``cellssl adapt`` (when given).

For each: few-shot accuracy (all-way SimpleShot, K in ``shots``, ``episodes`` episodes, mean ±
95 % CI over episodes) and linear-probe accuracy (stratified 50/50 split of the folder, fixed
seed; 95 % CI = normal binomial interval over the test images). Domain gap of each variant
(source features vs. target features as that variant produces them — AdaBN uses the source BN
statistics for source images and the target ones for target images): cross-validated accuracy of
a linear source-vs-target classifier (0.5 = indistinguishable) and the RBF-kernel MMD² (unbiased,
median-heuristic bandwidth). Outputs in ``out``: ``transfer.json``, ``transfer.md``,
``transfer_accuracy.png`` (bars with CI error bars) and ``transfer_embedding.png`` (t-SNE of
source+target features, coloured by domain and by class).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cellssl.data.datasets import split_indices
from cellssl.data.scale import scale_factor
from cellssl.data.stain import normalize_folder
from cellssl.errors import DataError
from cellssl.eval.features import FeatureExtractor, FeatureOptions, subsample_per_class
from cellssl.eval.fewshot import run_fewshot
from cellssl.eval.labmix import SCORE_NAMES, lab_effect_scores
from cellssl.eval.linear import linear_probe
from cellssl.eval.metrics import l2_normalize, proportion_ci95
from cellssl.eval.report import embedding_2d, write_json
from cellssl.plots import pyplot, save_figure

__all__ = ["transfer_report", "domain_gap", "domain_classifier_accuracy", "mmd2_rbf", "lab_effect", "ROW_LABELS"]

ROW_LABELS = {
    "source_domain": "source model on the source lab (reference)",
    "source": "source model",
    "adabn": "+ AdaBN",
    "stain": "+ stain normalisation ({method})",  # the method actually used, e.g. Macenko / Reinhard
    "scale": "+ scale matched (target x{factor:.2f})",
    "continued": "+ continued SSL",
}


# ---- domain gap -------------------------------------------------------------------------------
def _balanced(xs: np.ndarray, xt: np.ndarray, max_per_domain: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = min(len(xs), len(xt), max_per_domain)
    return xs[rng.choice(len(xs), n, replace=False)], xt[rng.choice(len(xt), n, replace=False)]


def domain_classifier_accuracy(xs: np.ndarray, xt: np.ndarray, seed: int = 0, folds: int = 5,
                               max_per_domain: int = 1000) -> float:
    """Cross-validated accuracy of logistic regression telling source (``xs``) from target
    (``xt``) features: equal numbers of each (so chance = 0.5), L2-normalised and standardised,
    ``folds``-fold stratified CV. 1.0 = the domains are linearly separable."""
    a, b = _balanced(l2_normalize(xs, dtype=np.float64), l2_normalize(xt, dtype=np.float64), max_per_domain, seed)
    if len(a) < 4:
        return float("nan")
    x = np.concatenate([a, b])
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    k = int(min(folds, len(a)))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = cross_val_score(clf, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed))
    return float(np.mean(scores))


def mmd2_rbf(xs: np.ndarray, xt: np.ndarray, seed: int = 0, max_per_domain: int = 500) -> tuple[float, float]:
    """Unbiased MMD² between L2-normalised ``xs`` and ``xt`` with ``k(x, y) = exp(-||x-y||² / (2σ²))``,
    σ = median pairwise distance of the pooled sample (median heuristic). Returns ``(mmd2, sigma)``."""
    a, b = _balanced(l2_normalize(xs, dtype=np.float64), l2_normalize(xt, dtype=np.float64), max_per_domain, seed)
    m = len(a)
    if m < 2:
        return float("nan"), float("nan")
    z = np.concatenate([a, b])
    sq = np.maximum((z**2).sum(1)[:, None] + (z**2).sum(1)[None, :] - 2 * z @ z.T, 0.0)
    iu = np.triu_indices(len(z), 1)
    sigma = float(np.sqrt(np.median(sq[iu]))) or 1.0
    k = np.exp(-sq / (2 * sigma**2))
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    mmd2 = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())
    return float(mmd2), sigma


def domain_gap(xs: np.ndarray, xt: np.ndarray, seed: int = 0) -> dict:
    """``{"domain_classifier_acc", "mmd2", "mmd_sigma", "n_per_domain"}`` for source/target features."""
    mmd2, sigma = mmd2_rbf(xs, xt, seed)
    return {"domain_classifier_acc": domain_classifier_accuracy(xs, xt, seed), "mmd2": mmd2, "mmd_sigma": sigma,
            "n_per_domain": int(min(len(xs), len(xt)))}


def lab_effect(fs: Any, ft: Any, seed: int = 0, k: int = 15, max_per_type: int = 300) -> dict:
    """:func:`~cellssl.eval.labmix.lab_effect_scores` of a source and a target FeatureSet (types
    matched by class name; only the classes both folders have)."""
    names_s = np.array([fs.classes[y] for y in fs.labels], dtype=str)
    names_t = np.array([ft.classes[y] for y in ft.labels], dtype=str)
    return lab_effect_scores(fs.features, names_s, ft.features, names_t, k=k, max_per_type=max_per_type, seed=seed)


# ---- accuracy ---------------------------------------------------------------------------------
def _plan_fewshot(labels: np.ndarray, shots: Sequence[int], queries: int) -> tuple[list[int], int]:
    """Shots that fit the smallest class, and the number of queries (≤ ``queries``)."""
    _, counts = np.unique(labels[labels >= 0], return_counts=True)
    smallest = int(counts.min()) if len(counts) else 0
    ok = [int(k) for k in shots if k + 1 <= smallest]
    if not ok:
        return [], 0
    return ok, int(max(1, min(queries, smallest - max(ok))))


def evaluate_features(fs: Any, shots: Sequence[int], episodes: int, queries: int, seed: int) -> dict:
    """Few-shot (SimpleShot, all ways) and linear-probe accuracy of a labelled FeatureSet."""
    out: dict[str, Any] = {"n_images": len(fs), "fewshot": {}, "linear": None}
    ok, q = _plan_fewshot(fs.labels, shots, queries)
    if len(np.unique(fs.labels)) < 2:
        raise DataError(f"{fs.root}: the transfer report needs at least 2 classes")
    if ok:
        rep = run_fewshot(fs, ways=None, shots=ok, queries=q, episodes=episodes, classifier="prototype", seed=seed)
        out["fewshot"] = {k: {"mean": v["mean"], "ci95": v["ci95"], "ways": v["ways"]}
                          for k, v in rep["results"].items()}
        out["queries"] = q
    tr_idx, te_idx = split_indices(fs.labels, (0.5, 0.5), seed=seed, stratified=True)
    if len(tr_idx) >= 2 and len(te_idx) >= 1 and len(np.unique(fs.labels[tr_idx])) >= 2:
        rep = linear_probe(fs.subset(tr_idx), fs.subset(te_idx), seed=seed)
        p, n = float(rep["accuracy"]), len(te_idx)
        out["linear"] = {"accuracy": p, "ci95": proportion_ci95(p, n),
                         "balanced_accuracy": rep.get("balanced_accuracy"), "C": rep.get("C"),
                         "n_train": int(len(tr_idx)), "n_test": int(n)}
    return out


# ---- plots ------------------------------------------------------------------------------------
def _plot_bars(rows: list[dict], shots: list[int], path: Path) -> Path | None:
    metrics = [(f"{k}-shot", lambda r, k=k: (r["fewshot"].get(str(k)) or {})) for k in shots]
    metrics.append(("linear", lambda r: r["linear"] or {}))
    if not rows:
        return None
    means = [[100 * (get(r).get("mean", get(r).get("accuracy")) or np.nan) for _, get in metrics] for r in rows]
    cis = [[100 * (get(r).get("ci95") or 0.0) for _, get in metrics] for r in rows]
    fig, ax = _grouped_bars([r["label"] for r in rows], means, [m for m, _ in metrics], errors=cis,
                            title="target-lab accuracy (95 % CI)", legend_loc="lower right",
                            figsize=(max(6.0, 1.6 * len(metrics) * len(rows) / 2.5), 4.2))
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    return save_figure(fig, path)


def _grouped_bars(labels: list[str], values: list[list[float]], groups: list[str], *, title: str, legend_loc: str,
                  figsize: tuple[float, float], errors: list[list[float]] | None = None,
                  group_size: float | None = None):
    """A figure of grouped bars: one group per entry of ``groups`` (x tick labels, font size
    ``group_size``), in each group one bar per variant (``labels[i]``, ``values[i]``: one value per
    group, optional ``errors``) side by side, one colour per variant; y grid, legend at
    ``legend_loc``, ``title``. Returns (figure, axes) for the caller's own limits and lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    width = 0.8 / len(labels)
    cmap = plt.get_cmap("tab10")
    for i, (label, vals) in enumerate(zip(labels, values)):
        xs = np.arange(len(vals)) + (i - (len(labels) - 1) / 2) * width
        extra = {"yerr": errors[i], "capsize": 3} if errors is not None else {}
        ax.bar(xs, vals, width, color=cmap(i % 10), label=label, **extra)
    ax.set_xticks(np.arange(len(groups)), groups, fontsize=group_size)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc=legend_loc, frameon=True)
    ax.set_title(title)
    return fig, ax


def _plot_scores(rows: list[dict], path: Path) -> Path | None:
    """The lab-effect scores of every variant on the same axes: one group of bars per score, one
    bar per variant."""
    rows = [r for r in rows if r.get("lab_effect")]
    if not rows:
        return None
    keys = list(SCORE_NAMES)
    vals = [[float(r["lab_effect"].get(k) if r["lab_effect"].get(k) is not None else np.nan) for k in keys]
            for r in rows]
    fig, ax = _grouped_bars([r["label"] for r in rows], vals, [SCORE_NAMES[k] for k in keys], group_size=8,
                            title="lab effect: mixing of the labs within a type (left), separation of types "
                                  "(right); 1 = ideal", legend_loc="upper left", figsize=(8.0, 4.2))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_ylim(min(-0.2, ax.get_ylim()[0]), max(1.1, ax.get_ylim()[1]))
    return save_figure(fig, path)


def _plot_embedding(panels: list[tuple[str, Any, Any]], path: Path, seed: int, max_points: int) -> Path | None:
    """One row per variant (title, source FeatureSet, target FeatureSet): a 2-D map (UMAP when
    umap-learn is installed, else t-SNE) coloured by lab | by class."""
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4.8 * len(panels)), squeeze=False)
    for row, (title, s, t) in enumerate(panels):
        names = sorted(set(s.classes) | set(t.classes))
        per = max(1, int(max_points // 2 // max(1, len(names))))
        ks, kt = subsample_per_class(s.labels, per, seed), subsample_per_class(t.labels, per, seed)
        x = np.concatenate([s.features[ks], t.features[kt]])
        if len(x) < 10:
            plt.close(fig)
            return None
        dom = np.r_[np.zeros(len(ks)), np.ones(len(kt))]
        cls = np.array([names.index(s.classes[c]) for c in s.labels[ks]]
                       + [names.index(t.classes[c]) for c in t.labels[kt]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xy, method = embedding_2d(x, seed)
        a, b = axes[row]
        for d, (lab, col) in enumerate([("source lab", "tab:blue"), ("target lab", "tab:orange")]):
            m = dom == d
            a.scatter(xy[m, 0], xy[m, 1], s=5, alpha=0.6, color=col, label=lab)
        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        for c, name in enumerate(names):
            for d, marker in ((0, "o"), (1, "^")):
                m = (cls == c) & (dom == d)
                if m.any():
                    b.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.6, color=cmap(c % cmap.N), marker=marker,
                              label=name if d == 0 else None)
        a.legend(markerscale=3, fontsize=8, frameon=False)
        b.legend(markerscale=3, fontsize=7, frameon=False, ncol=2)
        a.set_title(f"{title}: by lab ({method})")
        b.set_title(f"{title}: by class (o source, ^ target)")
        for ax in (a, b):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("source + target features, one row per variant")
    return save_figure(fig, path, dpi=110, rect=(0, 0, 1, 1 - 0.25 / (4.8 * len(panels))))  # room for the suptitle


# ---- markdown ---------------------------------------------------------------------------------
def _pm(entry: dict | None, key: str = "mean") -> str:
    if not entry or entry.get(key) is None or not math.isfinite(float(entry[key])):
        return "–"
    return f"{100 * entry[key]:.1f} ± {100 * (entry.get('ci95') or 0.0):.1f}"


def _num(x: Any, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def format_table(report: dict) -> str:
    """The markdown table of a transfer report (accuracies in %, mean ± 95 % CI)."""
    shots = report["settings"]["shots"]
    head = ["model", "evaluated on"] + [f"{k}-shot" for k in shots] + ["linear probe", "domain clf. acc", "MMD²"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in report["rows"]:
        gap = r.get("domain_gap") or {}
        cells = [r["label"], r["data"]] + [_pm(r["fewshot"].get(str(k))) for k in shots]
        cells += [_pm(r["linear"], "accuracy"), _num(gap.get("domain_classifier_acc"), ".3f"),
                  _num(gap.get("mmd2"), ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_lab_effect(report: dict) -> str:
    """The markdown table of the lab-effect scores, one row per variant."""
    head = ["model", *SCORE_NAMES.values(), "types", "cells (source / target)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "|".join(["---:"] * (len(head) - 1)) + "|"]
    for r in report["rows"]:
        le = r.get("lab_effect")
        if not le:
            continue
        cells = [r["label"]] + [_num(le.get(k), ".3f") for k in SCORE_NAMES]
        cells += [str(len(le["types"])), f"{le['n_source']} / {le['n_target']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# Transfer report", "",
             f"- source checkpoint: `{report['checkpoint']}`"
             + (f" ({report['description']})" if report.get("description") else ""),
             f"- adapted checkpoint: `{report['adapted']}`" if report.get("adapted")
             else "- adapted checkpoint: none given",
             f"- source lab: `{report['source']}` ({s['n_source']} images); target lab: `{report['target']}` "
             f"({s['n_target']} images), {len(report['classes'])} classes", "",
             "Accuracy in % (mean ± 95 % CI). Few-shot: all-way SimpleShot (CL2N nearest centroid), "
             f"{s['episodes']} episodes, {s.get('queries', '?')} queries per class; CI over episodes. Linear probe: "
             "logistic regression on a stratified 50/50 split of the folder (seed "
             f"{s['seed']}); CI = 1.96·sqrt(p(1-p)/n_test).", "",
             format_table(report), "",
             "Domain gap (source vs. target features of each variant): *domain clf. acc* = 5-fold "
             "cross-validated accuracy of a linear source-vs-target classifier on balanced samples "
             "(0.5 = indistinguishable, 1.0 = separable); *MMD²* = unbiased RBF-kernel MMD² on "
             "L2-normalised features, bandwidth = median pairwise distance (0 = same distribution).", ""]
    if report.get("lab_effect"):
        lines += ["## Lab effect", "", format_lab_effect(report), "",
                  "Lab mixing: within each cell type, the fraction of a cell's k nearest neighbours from the other "
                  "lab over its value under random mixing (1 = mixed, 0 = apart). iLISI: inverse Simpson index of the "
                  "labs among the k nearest neighbours, rescaled to 0 (one lab) .. 1 (shuffled lab labels). Type "
                  "silhouette: cosine silhouette of the cell types, both labs pooled (1 = compact and apart, 0 = "
                  "overlapping). Cross-lab kNN: type accuracy of a kNN vote fitted on one lab, tested on the other "
                  "(both ways). Formulas: docs/adaptation.md.", ""]
    files = report.get("files", {})
    for key in ("bars", "scores", "embedding"):
        if files.get(key):
            lines += [f"![{key}]({Path(files[key]).name})", ""]
    return "\n".join(lines)


# ---- the report -------------------------------------------------------------------------------
def transfer_report(
    checkpoint: str | Path,
    source: str | Path,
    target: str | Path,
    out: str | Path,
    *,
    adapted: str | Path | None = None,
    episodes: int = 300,
    device: str = "auto",
    shots: Sequence[int] = (1, 5, 10),
    seed: int = 0,
    queries: int = 15,
    max_per_class: int | None = None,
    stain_method: str = "macenko",
    source_um_per_px: float | None = None,
    target_um_per_px: float | None = None,
    batch_size: int = 256,
    embedding_max: int = 1200,
    progress: bool = False,
) -> Path:
    """Write the transfer report (see module docstring) to ``out``; returns ``out/transfer.md``.

    ``source`` and ``target`` are labelled folders (one sub-folder per class, same class names);
    ``max_per_class`` caps the images per class read from each (quick runs). With both
    ``source_um_per_px`` and ``target_um_per_px`` a ``scale`` row is added: the target images
    resampled by target/source µm per pixel (the declared source scale is the model's here).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shots = [int(k) for k in shots]
    options = FeatureOptions(batch_size=batch_size, device=device, max_per_class=max_per_class, seed=seed,
                             progress=progress)
    base = FeatureExtractor(checkpoint, options)
    features = variant_features(base, checkpoint, source, target, adapted, stain_method, options)
    scale = scale_factor(target_um_per_px, source_um_per_px)
    if source_um_per_px and target_um_per_px:  # the target resampled to the source's scale
        matched = FeatureExtractor(checkpoint, options, um_per_px=target_um_per_px)
        matched.data_cfg.um_per_px = source_um_per_px
        features = dict(features)
        features["scale"] = (features["source"][0], matched.features(target, labelled=True))
        if "continued" in features:
            features["continued"] = features.pop("continued")
    f_src, f_tgt = features["source"]
    rows = [{"key": "source_domain", "label": ROW_LABELS["source_domain"], "data": "source",
             **evaluate_features(f_src, shots, episodes, queries, seed), "domain_gap": None}]
    for key, (fs, ft) in features.items():
        rows.append({"key": key, "label": ROW_LABELS[key].format(method=stain_method.capitalize(), factor=scale),
                     "data": "target",
                     **evaluate_features(ft, shots, episodes, queries, seed),
                     "domain_gap": domain_gap(fs.features, ft.features, seed),
                     "lab_effect": lab_effect(fs, ft, seed)})
    report: dict[str, Any] = {
        "kind": "transfer",
        "checkpoint": str(checkpoint),
        "description": base.describe(source).get("description"),
        "adapted": str(adapted) if adapted is not None else None,
        "source": str(source),
        "target": str(target),
        "classes": list(f_tgt.classes),
        "rows": rows,
        "domain_gap": {r["key"]: r["domain_gap"] for r in rows if r["domain_gap"]},
        "lab_effect": {r["key"]: r["lab_effect"] for r in rows if r.get("lab_effect")},
        "settings": {"shots": shots, "episodes": int(episodes), "queries": rows[1].get("queries", queries),
                     "ways": "all", "classifier": "prototype (SimpleShot, CL2N)", "linear_split": [0.5, 0.5],
                     "seed": int(seed), "stain_method": stain_method, "max_per_class": max_per_class,
                     "source_um_per_px": source_um_per_px, "target_um_per_px": target_um_per_px,
                     "n_source": len(f_src), "n_target": len(f_tgt), "feature_dim": int(f_src.features.shape[1])},
    }
    report["files"] = {"json": str(out / "transfer.json"), "markdown": str(out / "transfer.md"),
                       **_plots(rows, shots, features, out, seed, embedding_max)}
    write_json(report, out / "transfer.json")  # NaN (a metric undefined on a tiny folder) -> null: valid JSON
    md = out / "transfer.md"
    md.write_text(_markdown(report))
    return md


def variant_features(base: FeatureExtractor, checkpoint: str | Path, source: str | Path, target: str | Path,
                     adapted: str | Path | None, stain_method: str, options: FeatureOptions) -> dict[str, tuple]:
    """``{row key: (source FeatureSet, target FeatureSet)}`` as each variant sees the two labs: the
    source model as is, with AdaBN on the target, on the stain-normalised target, and the
    ``adapted`` checkpoint (when given)."""
    f_src = base.features(source, labelled=True)
    f_tgt = base.features(target, labelled=True)
    missing = sorted(set(f_tgt.classes) - set(f_src.classes))
    if missing:
        warnings.warn(f"target classes not in the source folder: {', '.join(missing)}", UserWarning, stacklevel=3)
    features: dict[str, tuple] = {"source": (f_src, f_tgt)}
    features["adabn"] = (f_src, FeatureExtractor(checkpoint, options, adapt_bn=target).features(target, labelled=True))
    with tempfile.TemporaryDirectory(prefix="cellssl-stain-") as tmp:
        stained = Path(tmp) / "target"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a few blank crops falling back to identity is expected
            normalize_folder(target, stained, reference=source, method=stain_method)
        f_st = base.features(stained, labelled=True)
        f_st.root = str(target)
    features["stain"] = (f_src, f_st)
    if adapted is not None:
        ad = FeatureExtractor(adapted, options)
        features["continued"] = (ad.features(source, labelled=True), ad.features(target, labelled=True))
    return features


def _plots(rows: list[dict], shots: list[int], features: dict[str, tuple], out: Path, seed: int,
           embedding_max: int) -> dict[str, str]:
    """The accuracy bars, the lab-effect scores of every variant on the same axes, and the 2-D
    maps (one row per variant: source model, stain normalisation, AdaBN, continued SSL); a plot
    never fails the report (a warning instead). Returns ``{"bars", "scores", "embedding"}`` paths as made."""
    files: dict[str, str] = {}
    try:
        p = _plot_bars(rows, [k for k in shots if any(str(k) in r["fewshot"] for r in rows)],
                       out / "transfer_accuracy.png")
        if p:
            files["bars"] = str(p)
        titles = {"source": "source model", "stain": "+ stain normalisation", "adabn": "+ AdaBN",
                  "scale": "+ scale matched", "continued": "+ continued SSL"}
        p = _plot_scores(rows, out / "transfer_scores.png")
        if p:
            files["scores"] = str(p)
        p = _plot_embedding([(titles[key], *features[key]) for key in titles if key in features],
                            out / "transfer_embedding.png", seed, embedding_max)
        if p:
            files["embedding"] = str(p)
    except Exception as exc:  # a plot must never fail the report
        warnings.warn(f"transfer plots skipped: {type(exc).__name__}: {exc}", UserWarning, stacklevel=3)
    return files
