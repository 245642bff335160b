"""Evaluation reports: ``report.json`` (machine-readable), ``report.md`` (human-readable), plots.

File names derive from the json path: ``dir/report.json`` -> ``dir/report.md``,
``dir/confusion.png``, ``dir/shots.png``, ``dir/embedding.png`` (and ``dir/classifier.pt``, the
saved linear probe); any other stem is used as a prefix: ``dir/fewshot.json`` -> ``dir/fewshot.md``,
``dir/fewshot_shots.png``, ...
A path without ``.json`` suffix is a folder: ``out/report.json``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from cellssl.eval.features import subsample_per_class
from cellssl.eval.metrics import l2_normalize
from cellssl.plots import pyplot, save_figure

__all__ = ["write_report", "format_summary", "ReportKind", "FEWSHOT", "LINEAR", "KNN", "FINETUNE", "REPORT_KINDS",
           "report_paths", "plot_confusion", "plot_shots", "plot_embedding", "markdown_table", "pct", "jsonable",
           "write_json", "tsne_2d", "umap_2d", "embedding_2d", "plot_rows", "plot_embedding_groups"]

MIN_EMBED_POINTS = 10


def report_paths(out: str | Path) -> dict[str, Path]:
    """Where the json, markdown and plots of a report go (see module docstring)."""
    out = Path(out)
    if out.suffix.lower() != ".json":
        out = out / "report.json"
    prefix = "" if out.stem == "report" else f"{out.stem}_"
    d = out.parent
    return {
        "json": out,
        "markdown": out.with_suffix(".md"),
        "confusion": d / f"{prefix}confusion.png",
        "shots": d / f"{prefix}shots.png",
        "embedding": d / f"{prefix}embedding.png",
        "classifier": d / f"{prefix}classifier.pt",
    }


def jsonable(obj: Any) -> Any:
    """numpy / Path / tuple -> plain JSON types; NaN/inf -> None; any other object -> its ``str``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    return str(obj)  # Path, device, dtype, ...


def write_json(obj: Any, path: str | Path) -> Path:
    """``obj`` as indented, valid JSON (:func:`jsonable`: no NaN, numpy as plain numbers) at ``path``."""
    path = Path(path)
    path.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")
    return path


def pct(x: Any) -> str:
    """A fraction as a percentage with one decimal (``0.4567`` -> ``"45.7"``); None / NaN -> ``"–"``."""
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * float(x):.1f}"


# --- plots -------------------------------------------------------------------------------------
def plot_confusion(cm: list[list[int]], classes: list[str], path: Path, title: str = "") -> Path | None:
    """Row-normalised confusion matrix heat map (rows = true class), counts in each cell."""
    cm_a = np.asarray(cm, dtype=np.float64)
    if cm_a.size == 0 or cm_a.sum() == 0:
        return None
    plt = pyplot()
    k = len(classes)
    rows = cm_a.sum(axis=1, keepdims=True)
    norm = np.divide(cm_a, rows, out=np.zeros_like(cm_a), where=rows > 0)
    size = max(4.0, 0.6 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(cm_a[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_title(title or "confusion matrix")
    return save_figure(fig, path)


def plot_shots(results: dict, path: Path, title: str = "") -> Path | None:
    """Mean few-shot accuracy vs. K with 95 % CI error bars."""
    if not results:
        return None
    plt = pyplot()
    ks = sorted(int(k) for k in results)
    means = [100 * results[str(k)]["mean"] for k in ks]
    cis = [100 * (results[str(k)]["ci95"] or 0.0) for k in ks]
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.errorbar(ks, means, yerr=cis, marker="o", capsize=4)
    ax.set_xscale("log" if len(ks) > 1 and max(ks) / max(1, min(ks)) >= 8 else "linear")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("shots per class (K)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "few-shot accuracy (95 % CI)")
    return save_figure(fig, path)


def umap_2d(x: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """UMAP (umap-learn, optional: ``pip install cellssl[bio]``) of (N, F) features -> (N, 2):
    cosine metric, ``n_neighbors`` = min(15, N - 1), ``random_state=seed`` (which also makes
    umap-learn run single-threaded: reproducible), under one OpenMP/BLAS thread (the same
    thread-pool clash as :func:`tsne_2d`). ImportError when umap-learn is not installed."""
    import umap  # optional (umap-learn) and slow to import (numba): imported when used

    x = np.asarray(x, dtype=np.float32)
    with threadpool_limits(1):
        reducer = umap.UMAP(n_components=2, n_neighbors=int(max(2, min(n_neighbors, len(x) - 1))),
                            metric="cosine", random_state=seed, n_jobs=1)
        return np.asarray(reducer.fit_transform(x))


def embedding_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D map of (N, F) features: :func:`umap_2d` when umap-learn is installed, else PCA(50) +
    t-SNE (:func:`tsne_2d`). Returns ((N, 2), "UMAP" | "t-SNE")."""
    x = l2_normalize(features)
    try:
        return umap_2d(x, seed), "UMAP"
    except ImportError:
        pass
    except Exception as exc:  # UMAP failing (e.g. on a handful of points) falls back to t-SNE
        warnings.warn(f"UMAP failed ({type(exc).__name__}: {exc}); using t-SNE", UserWarning, stacklevel=2)
    return tsne_2d(x, seed), "t-SNE"


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """PCA(50) (when wider than 50) + t-SNE of (N, F) features -> (N, 2), perplexity
    ``min(30, max(2, (N - 1) / 3))``, run with ONE OpenMP thread: sklearn's and torch's libgomp
    copies otherwise busy-wait against each other (t-SNE of 36 points took 15 s after a torch
    forward pass; 0.1 s limited). Every t-SNE of cellssl goes through here."""
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    with threadpool_limits(1, user_api="openmp"):
        if x.shape[1] > 50 and n > 50:
            x = PCA(n_components=50, random_state=seed).fit_transform(x)
        perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        return tsne.fit_transform(x)


def plot_embedding(features: Any, path: Path, max_points: int = 2000, seed: int = 0, title: str = "") -> Path | None:
    """Scatter of a 2-D embedding of a FeatureSet (at most ``max_points``, class-balanced),
    coloured by class; None when there are fewer than 10 points."""
    x, y = np.asarray(features.features), np.asarray(features.labels)
    if len(x) < MIN_EMBED_POINTS or x.ndim != 2:
        return None
    classes = list(features.classes)
    n_cls = max(1, len(np.unique(y)))
    keep = subsample_per_class(y, int(np.ceil(max_points / n_cls)), seed)
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_points, replace=False))
    drawn = _quiet_embedding_2d(x[keep], seed)
    if drawn is None:
        return None
    xy, method = drawn
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    yk = y[keep]
    if classes and (yk >= 0).all():
        for c, name in enumerate(classes):
            m = yk == c
            if m.any():
                ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, color=cmap(c % cmap.N), label=name)
        ax.legend(markerscale=3, fontsize=8, loc="best", frameon=False)
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.7)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{method} of {len(keep)} image features")
    return save_figure(fig, path)


def _quiet_embedding_2d(x: np.ndarray, seed: int) -> tuple[np.ndarray, str] | None:
    """:func:`embedding_2d` of (N, F) ``x`` for a plot: its library warnings silenced, and None (with
    one warning) when it fails, since a plot must never fail an evaluation or a command."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return embedding_2d(x, seed)
    except Exception as exc:
        warnings.warn(f"skipping the embedding plot: {exc}", UserWarning, stacklevel=3)
        return None


def plot_rows(n: int, max_points: int = 2000, seed: int = 0) -> np.ndarray:
    """The rows (sorted, (min(n, max_points),)) of n that a map of at most ``max_points`` points
    draws: all of them, or ``max_points`` drawn without replacement with ``seed``."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def plot_embedding_groups(features: np.ndarray, groups: dict[str, np.ndarray], path: Path, max_points: int = 2000,
                          seed: int = 0, title: str = "") -> Path | None:
    """One 2-D map (:func:`embedding_2d`) of (N, F) ``features``, drawn once per entry of
    ``groups`` ({panel name: (N,) names, e.g. class, folder, lab}) with the points coloured by
    that grouping; at most ``max_points`` random points. None (and a warning) when there are
    fewer than 10 points or the map fails: a plot never fails a command."""
    x = np.asarray(features)
    if len(x) < MIN_EMBED_POINTS or x.ndim != 2 or not groups:
        return None
    keep = plot_rows(len(x), max_points, seed)
    drawn = _quiet_embedding_2d(x[keep], seed)
    if drawn is None:
        return None
    xy, method = drawn
    plt = pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(6.0 * len(groups), 5.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], groups.items()):
        values = np.asarray(values)[keep]
        names = sorted(set(values.tolist()))
        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        for c, v in enumerate(names):
            m = values == v
            ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.7, color=cmap(c % cmap.N), label=str(v))
        if len(names) <= 20:
            ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"by {name}")
    fig.suptitle(title or f"{method} of {len(keep)} image features")
    return save_figure(fig, path, dpi=110)


# --- markdown ----------------------------------------------------------------------------------
def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Lines of a GitHub-markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def _checkpoint_lines(report: dict) -> list[str]:
    ck = report.get("checkpoint") or {}
    if not ck:
        return []
    lines = ["## Backbone", ""]
    lines.append(f"- checkpoint: `{ck.get('spec', '?')}` — {ck.get('description', '')}")
    if ck.get("recipe"):
        lines.append(f"- recipe: {ck['recipe']}")
    lines.append(f"- input: {ck.get('in_chans', '?')} channel(s), {ck.get('image_size', '?')} px")
    if ck.get("data"):
        lines.append(f"- data: `{ck['data']}`")
    if ck.get("test_data"):
        lines.append(f"- test data: `{ck['test_data']}`")
    if ck.get("adapt_bn"):
        lines.append(f"- BatchNorm statistics re-estimated (AdaBN) on `{ck['adapt_bn']}`")
    if str(ck.get("spec", "")).startswith("random:"):
        lines.append("- *random initialisation: a baseline, not a trained model*")
    if str(ck.get("spec", "")).startswith("pixels:"):
        lines.append("- *raw pixels (area-averaged, flattened): a baseline, not a trained model*")
    return lines + [""]


def _settings_lines(report: dict) -> list[str]:
    st = report.get("settings") or {}
    if not st:
        return []
    rows = [[k, json.dumps(jsonable(v)) if isinstance(v, (list, dict)) else v] for k, v in st.items()]
    return ["## Settings", "", *markdown_table(["setting", "value"], rows), ""]


def _metrics_lines(m: dict, heading: str) -> list[str]:
    if not m or "accuracy" not in m:
        return []
    lines = [f"## {heading}", ""]
    lines += markdown_table(["metric", "value (%)"], [
        ["accuracy", pct(m.get("accuracy"))],
        ["balanced accuracy", pct(m.get("balanced_accuracy"))],
        ["macro-F1", pct(m.get("macro_f1"))],
    ])
    lines.append("")
    pc = m.get("per_class_accuracy") or {}
    sup = m.get("support") or {}
    if pc:
        lines += ["### Per-class accuracy", ""]
        lines += markdown_table(["class", "accuracy (%)", "images"],
                                [[c, pct(a), sup.get(c, "")] for c, a in pc.items()])
        lines.append("")
    cm = m.get("confusion_matrix")
    classes = m.get("classes") or list(pc)
    if cm and classes and len(classes) <= 20:
        lines += ["### Confusion matrix (rows = true, columns = predicted)", ""]
        lines += markdown_table(["true \\ pred", *classes], [[c, *row] for c, row in zip(classes, cm)])
        lines.append("")
    return lines


def _fewshot_lines(report: dict) -> list[str]:
    res = report.get("results") or {}
    if not res:
        return []
    st = report.get("settings", {})
    ks = sorted(res, key=int)
    lines = ["## Results", "",
             f"Accuracy over {st.get('episodes', '?')} episodes, {st.get('queries', '?')} queries per class, "
             f"classifier `{st.get('classifier', '?')}`; mean ± 95 % confidence interval.", ""]
    lines += markdown_table(["ways", "shots (K)", "accuracy (%)", "std (%)"],
                    [[res[k]["ways"], k, f"{pct(res[k]['mean'])} ± {pct(res[k]['ci95'])}",
                      pct(res[k].get("std"))] for k in ks])
    lines += ["", "### Per-class accuracy (%)", ""]
    classes = report.get("classes") or []
    lines += markdown_table(["class", *[f"{k}-shot" for k in ks]],
                    [[c, *[pct(res[k]["per_class_accuracy"].get(c)) for k in ks]] for c in classes])
    return lines + [""]


def _finetune_lines(report: dict) -> list[str]:
    lines = []
    hist = report.get("history") or []
    if hist:
        lines += ["## Training", "", f"Best epoch {report.get('best_epoch')} (validation accuracy "
                  f"{pct(report.get('best_val_accuracy'))} %); weights: `{report.get('best_checkpoint', '')}`", ""]
        lines += markdown_table(["epoch", "train loss", "train acc (%)", "val acc (%)"],
                        [[h["epoch"], f"{h['train_loss']:.4f}", pct(h.get("train_accuracy")),
                          pct(h.get("val_accuracy"))]
                         for h in hist])
        lines.append("")
    if report.get("test"):
        lines += _metrics_lines({**report["test"], "classes": report.get("classes")}, "Test set")
    if report.get("validation"):
        lines += _metrics_lines({**report["validation"], "classes": report.get("classes")},
                                "Validation set (best model)")
    return lines


def _own_metrics(report: dict) -> dict:
    return report


def _finetune_metrics(report: dict) -> dict | None:
    """A fine-tune's metrics: of the test set, else of the validation set."""
    return report.get("test") or report.get("validation")


def _linear_body(report: dict) -> list[str]:
    return _metrics_lines(report, "Results" + (f" (C = {report['C']:g})" if report.get("C") is not None else ""))


def _knn_body(report: dict) -> list[str]:
    return _metrics_lines(report, "Results")


def _confusion_plot(kind: "ReportKind", report: dict, paths: dict[str, Path]) -> dict[str, Path]:
    """The confusion matrix of ``kind.metrics(report)``, when it has one."""
    m = kind.metrics(report)
    if not (m and m.get("confusion_matrix")):
        return {}
    p = plot_confusion(m["confusion_matrix"], report.get("classes") or [], paths["confusion"], kind.title)
    return {"confusion": p} if p else {}


def _shots_plot(kind: "ReportKind", report: dict, paths: dict[str, Path]) -> dict[str, Path]:
    """Accuracy vs. shots with 95 % CIs."""
    p = plot_shots(report.get("results") or {}, paths["shots"])
    return {"shots": p} if p else {}


def _fewshot_summary(report: dict) -> list[str]:
    return [f"  {r['ways']}-way {k}-shot: {pct(r['mean'])} ± {pct(r['ci95'])} %"
            for k, r in sorted((report.get("results") or {}).items(), key=lambda kv: int(kv[0]))]


def _accuracy_line(m: dict, where: str = "test", extra: str = "") -> str:
    return (f"  {where} accuracy {pct(m.get('accuracy'))} %, balanced {pct(m.get('balanced_accuracy'))} %, "
            f"macro-F1 {pct(m.get('macro_f1'))} %{extra}")


def _knn_summary(report: dict) -> list[str]:
    return [_accuracy_line(report)]


def _linear_summary(report: dict) -> list[str]:
    return [_accuracy_line(report, extra=f", C={report['C']:g}" if report.get("C") is not None else "")]


def _finetune_summary(report: dict) -> list[str]:
    lines = []
    if report.get("best_epoch") is not None:
        lines.append(f"  best epoch {report['best_epoch']}, "
                     f"validation accuracy {pct(report.get('best_val_accuracy'))} %")
    m = _finetune_metrics(report)
    if m:
        lines.append(_accuracy_line(m, "test" if report.get("test") else "validation"))
    return lines


@dataclass(frozen=True)
class ReportKind:
    """What differs between the evaluation reports; the command passes its own to :func:`write_report`.

    Attributes:
        name: the report's ``kind`` in report.json (how :func:`format_summary` and ``export`` know a
            report read back from a file).
        title: the heading of report.md and of the terminal summary.
        body: report -> the markdown lines of its results.
        summary: report -> the terminal lines of its results.
        plot: ``(kind, report, paths)`` -> the plots of its results that were drawn, by name.
        metrics: report -> the metrics its confusion matrix comes from (None: none).
    """

    name: str
    title: str
    body: Callable[[dict], list[str]]
    summary: Callable[[dict], list[str]]
    plot: Callable[["ReportKind", dict, dict[str, Path]], dict[str, Path]] = _confusion_plot
    metrics: Callable[[dict], dict | None] = _own_metrics


FEWSHOT = ReportKind("fewshot", "Few-shot evaluation", _fewshot_lines, _fewshot_summary, plot=_shots_plot)
LINEAR = ReportKind("linear", "Linear probe", _linear_body, _linear_summary)
KNN = ReportKind("knn", "k-nearest-neighbour evaluation", _knn_body, _knn_summary)
FINETUNE = ReportKind("finetune", "Fine-tuning", _finetune_lines, _finetune_summary, metrics=_finetune_metrics)
REPORT_KINDS = {kind.name: kind for kind in (FEWSHOT, LINEAR, KNN, FINETUNE)}


def write_report(report: dict, out: str | Path, kind: ReportKind, *, features: Any = None, plots: bool = True,
                 embedding_max: int = 2000) -> Path:
    """Write ``report`` as json + markdown (+ plots) at ``out``; returns the json path.

    ``kind`` (:data:`FEWSHOT`, :data:`LINEAR`, :data:`KNN`, :data:`FINETUNE`) gives the title, the
    results section and the results plot (confusion matrix, or accuracy vs. shots with 95 % CI);
    with ``features`` (a FeatureSet) a 2-D t-SNE/UMAP map of at most ``embedding_max`` points,
    coloured by class, is drawn too (matplotlib Agg). Plots are skipped when there is too little to
    show. ``report["files"]`` is set to the written paths (as strings).
    """
    paths = report_paths(out)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    report.setdefault("kind", kind.name)
    made: dict[str, Path] = {}
    if plots:
        made.update(kind.plot(kind, report, paths))
        if features is not None:
            p = plot_embedding(features, paths["embedding"], max_points=embedding_max)
            if p:
                made["embedding"] = p
    report["files"] = {"json": str(paths["json"]), "markdown": str(paths["markdown"]),
                       "plots": [str(p) for p in made.values()]}
    lines = [f"# {kind.title}", "", *_checkpoint_lines(report), *kind.body(report), *_settings_lines(report)]
    if made:
        lines += ["## Plots", ""]
        for name, p in made.items():
            lines += [f"![{name}]({p.name})", ""]
    paths["markdown"].write_text("\n".join(lines).rstrip() + "\n")
    write_json(report, paths["json"])
    return paths["json"]


def format_summary(report: dict, kind: ReportKind | None = None) -> str:
    """A few readable lines for the terminal, ending with where ``report.md`` is. ``kind`` defaults
    to the :class:`ReportKind` the report's saved ``kind`` names (an unknown one: the metrics lines)."""
    name = report.get("kind", "")
    kind = kind or REPORT_KINDS.get(name) or ReportKind(name, name, _knn_body, _knn_summary)
    ck = report.get("checkpoint") or {}
    lines = [f"{kind.title} of {ck.get('spec', '?')} ({ck.get('description', '')})"] if ck else []
    lines += kind.summary(report)
    skipped = ck.get("skipped_images") or []
    if skipped:
        lines.append(f"  left out {len(skipped)} unreadable image(s) or of another channel count (e.g. {skipped[0]})")
    files = report.get("files") or {}
    if files.get("markdown"):
        lines.append(f"report: {files['markdown']}")
    return "\n".join(lines)
