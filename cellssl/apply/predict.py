"""Classify new cells with a trained model: ``predictions.csv``, a differential count, the cells to check.

The model is a *predictor* (:mod:`cellssl.apply.model`: finetune's ``best.pt`` or linear's
``classifier.pt``), read with the preprocessing of the recipe it was trained with.

Every image of a folder (recursively; any format the data layer reads) is read with that
preprocessing and resized exactly as in training (the whole image to the model's input side).
Images that cannot be used are never silently replaced: a folder whose images have another
channel count than the model is a one-line error; a single unreadable file or an odd channel
count in a mixed folder gets a row without a prediction and a reason; images whose size differs
from the training images' by more than 2x (another magnification) are predicted but flagged.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cellssl.apply.model import Predictor, load_predictor
from cellssl.augment.views import build_eval_transform
from cellssl.data.datasets import build_dataset
from cellssl.data.io import (
    OUTPUT_MARKER,
    ImageReadError,
    check_output_folder,
    mark_output_folder,
    output_folder,
    relative_path,
)
from cellssl.errors import DataError
from cellssl.eval.metrics import classification_metrics
from cellssl.eval.probes import softmax
from cellssl.eval.report import markdown_table, pct, write_json
from cellssl.eval.unsure import MIN_CALIBRATION_CELLS, OODModel, thresholds
from cellssl.plots import image_sheet, tile

__all__ = ["predict", "format_predict_summary", "SIZE_TOLERANCE"]

SIZE_TOLERANCE = 2.0  # flag images whose height or width differs from the training median by more than this factor
CSV_NAME, SHEET_NAME = "predictions.csv", "least_certain.png"
# what --overwrite may replace
PREDICT_FILES = (CSV_NAME, SHEET_NAME, "report.md", "report.json", "predictions.parquet", OUTPUT_MARKER)


class _Items(Dataset):
    """Item i: ``(tensor (C, S, S), i, reason, height, width)``; ``reason`` is "" for a usable image,
    else why it has no prediction (the tensor is then zeros)."""

    def __init__(self, ds: Any, transform: Any, in_chans: int, size: int, convert: bool):
        self.ds, self.transform, self.in_chans, self.convert = ds, transform, in_chans, convert
        self.blank = torch.zeros(in_chans, size, size)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        try:
            img = self.ds.read(i, convert=self.convert)
        except ImageReadError as exc:
            return self.blank, i, f"unreadable: {exc.reason}", 0, 0
        h, w = img.shape[:2]
        if img.shape[2] != self.in_chans:
            return self.blank, i, f"has {img.shape[2]} channel(s); the model takes {self.in_chans}", h, w
        return self.transform(img), i, "", h, w


def _size_reason(h: int, w: int, native: list[int]) -> str:
    nh, nw = native
    if not (nh and nw and h and w):
        return ""
    ratio = max(h / nh, nh / h, w / nw, nw / w)
    return f"size {h}x{w} px vs {nh}x{nw} px in training" if ratio > SIZE_TOLERANCE else ""


def predict(model: str | Path, data: str | Path, out: str | Path, *, target_error: float | None = None,
            ood_quantile: float | None = None, batch_size: int = 128, device: str = "auto", num_workers: int = 0,
            sheet: int = 48, progress: bool = True, overwrite: bool = False) -> dict:
    """Classify every image below ``data`` with the predictor ``model``; write ``out``.

    Writes ``out/predictions.csv`` (one row per image: path, predicted class, its probability,
    the top-3, ``unsure`` and why, the distance to the nearest training class, and the true class
    when ``data`` has class sub-folders named like the model's classes), ``out/report.md`` +
    ``report.json`` (the differential count: number and % per class, of all cells and of the
    confident ones; the unsure rule; accuracy when labels are known) and ``out/least_certain.png``
    (the ``sheet`` least certain cells). ``target_error`` / ``ood_quantile`` re-choose the
    ``unsure`` thresholds from the saved validation scores (default: the ones chosen at fit time).
    The files are written to a hidden temporary folder renamed to ``out`` at the end (an interrupted
    run leaves no ``out``, or the earlier one whole); an ``out`` that holds files is refused, and
    ``overwrite`` replaces an earlier prediction folder as a whole. Returns the report dict.
    """
    t0 = time.monotonic()
    out = _check_out(Path(out), overwrite)
    pred = load_predictor(model, device)
    ds, items = _items(pred, data)
    scores = _score(pred, items, batch_size, num_workers, progress)
    if not scores.used.any():
        raise DataError(f"no image in {data} could be classified (e.g. {ds.samples[0][0]}: {scores.reasons[0]})")
    th = thresholds(pred.unsure, target_error, ood_quantile) if pred.unsure else None
    dist = _distances(pred, scores)
    flags = _flags(scores, dist, th, pred.native_size)
    unsure = np.array([bool(f) for f in flags])
    truth = _truth(ds, pred.classes)
    report = _summary(pred, data, scores.predicted, scores.used, unsure, flags, truth, th)
    report["files"] = {"csv": str(out / CSV_NAME), "markdown": str(out / "report.md"), "json": str(out / "report.json")}
    with output_folder(out, replace=overwrite) as tmp:  # all files or none: renamed to out at the end
        mark_output_folder(tmp, "predict")  # a later predict on a folder holding `out` skips its images
        _write_csv(tmp / CSV_NAME, _row_paths(ds.samples, Path(ds.root)), pred.classes, scores, unsure, flags, dist,
                   truth)
        if _contact_sheet(ds, tmp / SHEET_NAME, pred.classes, scores, unsure, flags, sheet):
            report["files"]["contact_sheet"] = str(out / SHEET_NAME)
        report["seconds"] = round(time.monotonic() - t0, 1)
        _write_report(report, tmp)
    return report


def _check_out(out: Path, overwrite: bool) -> Path:
    """``--out``: a folder that holds no files (or, with ``overwrite``, an earlier prediction); one-line errors."""
    if out.suffix:
        raise DataError(f"--out {out} must be a folder (predictions.csv, report.md and {SHEET_NAME} go in it)")
    check_output_folder(out, overwrite=overwrite, command="predict", own_files=PREDICT_FILES, marker=CSV_NAME)
    return out


def _items(pred: Predictor, data: str | Path) -> tuple[Any, _Items]:
    """The folder's dataset, read with the model's preprocessing, and its items for the model; a folder
    of another channel count than the model's is a one-line error."""
    convert = pred.data_cfg.channels is not None  # the recipe asked for a fixed channel count: convert as in training
    ds = build_dataset(pred.data_cfg, data, labelled=None)
    if not convert and ds.channels != pred.in_chans:
        first = next((p for p, _ in ds.samples if p not in ds.bad_files), ds.root)
        raise DataError(
            f"images in {data} have {ds.channels} channel(s) (e.g. {first}) but the model was trained on "
            f"{pred.in_chans}-channel images: predict with a model trained on images like these"
        )
    transform = build_eval_transform(pred.data_cfg, pred.in_chans)
    return ds, _Items(ds, transform, pred.in_chans, int(pred.data_cfg.image_size), convert)


@dataclass
class _Scores:
    """What the model made of every image (N rows): ``proba`` (N, K) class probabilities and ``feats``
    (N, F) backbone features (NaN rows: no prediction), ``reasons`` why an image has none ("" when it
    has one), ``sizes`` (N, 2) its height and width in pixels. The derived arrays are computed once, when
    first read after :func:`_score` filled the rows."""

    proba: np.ndarray
    feats: np.ndarray | None
    reasons: list[str]
    sizes: np.ndarray

    @cached_property
    def used(self) -> np.ndarray:
        """(N,) bool: the image has a prediction."""
        return np.array([r == "" for r in self.reasons])

    @cached_property
    def conf(self) -> np.ndarray:
        """(N,) the top class's probability (NaN without a prediction)."""
        return np.where(self.used, np.nan_to_num(self.proba, nan=0.0).max(axis=1), np.nan)

    @cached_property
    def predicted(self) -> np.ndarray:
        """(N,) the predicted class (-1 without a prediction)."""
        return np.where(self.used, np.nan_to_num(self.proba, nan=-1.0).argmax(axis=1), -1)

    @cached_property
    def top(self) -> np.ndarray:
        """(N, 3) the three most probable classes, most probable first."""
        return np.argsort(-np.nan_to_num(self.proba, nan=-1.0), axis=1)[:, :3]


def _score(pred: Predictor, items: _Items, batch_size: int, num_workers: int, progress: bool) -> _Scores:
    """One pass of the model over ``items``: probabilities and features of every usable image."""
    loader = DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    n = len(items)
    scores = _Scores(np.full((n, len(pred.classes)), np.nan), None, [""] * n, np.zeros((n, 2), dtype=np.int64))
    batches: Any = tqdm(loader, desc="predict", unit="batch", leave=False) if progress and len(loader) > 2 else loader
    with torch.no_grad():
        for x, idx, why, h, w in batches:
            idx = idx.numpy()
            scores.sizes[idx, 0], scores.sizes[idx, 1] = h.numpy(), w.numpy()
            ok = np.array([r == "" for r in why])
            for i, r in zip(idx, why):
                scores.reasons[i] = r
            if not ok.any():
                continue
            f = pred.model.features(x[torch.as_tensor(ok)].to(pred.device).float())
            if scores.feats is None:
                scores.feats = np.full((n, f.shape[1]), np.nan, dtype=np.float32)
            scores.proba[idx[ok]] = softmax(pred.model.classify(f).float().cpu().numpy())
            scores.feats[idx[ok]] = f.float().cpu().numpy()
    return scores


def _distances(pred: Predictor, scores: _Scores) -> np.ndarray:
    """(N,) Mahalanobis distance of each image to the nearest training class (NaN: no prediction,
    or a model without the unsure calibration)."""
    dist = np.full(len(scores.reasons), np.nan)
    if pred.unsure:
        ood = OODModel(pred.unsure["ood_means"].double().numpy(), pred.unsure["ood_precision"].double().numpy())
        dist[scores.used] = ood.distances(scores.feats[scores.used])
    return dist


def _flags(scores: _Scores, dist: np.ndarray, th: dict | None, native: list[int]) -> list[list[str]]:
    """Why each image is unsure ([]: it is not): low confidence, unlike the training cells, another
    size than the training images, or no prediction at all."""
    used, conf = scores.used, scores.conf
    flags: list[list[str]] = [[] for _ in range(len(used))]
    for i in np.flatnonzero(used):
        if th and conf[i] < th["confidence_threshold"]:
            flags[i].append(f"low confidence {conf[i]:.2f} < {th['confidence_threshold']:.2f}"
                            if math.isfinite(th["confidence_threshold"])
                            else "no confidence threshold meets the target")
        if th and dist[i] > th["distance_threshold"]:
            flags[i].append(f"unlike the training cells (distance {dist[i]:.1f} > {th['distance_threshold']:.1f})")
        size = _size_reason(int(scores.sizes[i, 0]), int(scores.sizes[i, 1]), native)
        if size:
            flags[i].append(size)
    for i in np.flatnonzero(~used):
        flags[i].append(scores.reasons[i])
    return flags


def _truth(ds: Any, classes: list[str]) -> np.ndarray:
    """(N,) the true class of each image when the folder has class sub-folders named like the model's
    classes (-1: unknown)."""
    if not ds.labelled:
        return np.full(len(ds), -1, dtype=np.int64)
    lut = np.array([classes.index(c) if c in classes else -1 for c in ds.classes], dtype=np.int64)
    return np.where(ds.labels >= 0, lut[np.maximum(ds.labels, 0)], -1)


def _row_paths(samples: list, root: Path) -> list[str]:
    """The ``path`` column: relative to the folder, to a CSV manifest's folder (the path as the CSV
    gives it, so ``a/same.jpg`` and ``b/same.jpg`` stay apart), or the file name of a single image."""
    if root.is_file():
        return [relative_path(p, root.resolve().parent) if root.suffix.lower() == ".csv" else p.name
                for p, _ in samples]
    return [relative_path(p, root) for p, _ in samples]


def _write_csv(path: Path, rel: list[str], classes: list[str], scores: _Scores, unsure: np.ndarray,
               flags: list[list[str]], dist: np.ndarray, truth: np.ndarray) -> None:
    """predictions.csv: one row per image (written to a temporary name, then renamed)."""
    predicted, conf, proba, top = scores.predicted, scores.conf, scores.proba, scores.top
    header = ["path", "predicted", "probability", "top3", "unsure", "reason", "distance"]
    has_truth = bool((truth >= 0).any())
    if has_truth:
        header.append("true_class")
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(len(rel)):
            ok = predicted[i] >= 0
            row = [
                rel[i],
                classes[predicted[i]] if ok else "",
                f"{conf[i]:.4f}" if ok else "",
                "; ".join(f"{classes[c]} {proba[i, c]:.3f}" for c in top[i]) if ok else "",
                "yes" if unsure[i] else "no",
                "; ".join(flags[i]),
                f"{dist[i]:.2f}" if np.isfinite(dist[i]) else "",
            ]
            if has_truth:
                row.append(classes[truth[i]] if truth[i] >= 0 else "")
            w.writerow(row)
    tmp.replace(path)


def _summary(pred: Predictor, data: str | Path, predicted: np.ndarray, used: np.ndarray,
             unsure: np.ndarray, flags: list[list[str]], truth: np.ndarray, th: dict | None) -> dict:
    k = len(pred.classes)
    n_used = int(used.sum())
    confident = used & ~unsure
    n_conf = int(confident.sum())
    all_counts = np.bincount(predicted[used], minlength=k)
    conf_counts = np.bincount(predicted[confident], minlength=k)
    differential = [
        {"class": c, "cells": int(all_counts[j]), "percent": 100.0 * all_counts[j] / max(1, n_used),
         "confident_cells": int(conf_counts[j]), "confident_percent": 100.0 * conf_counts[j] / max(1, n_conf)}
        for j, c in enumerate(pred.classes)
    ]
    kinds = {"low confidence": 0, "unlike the training cells": 0, "size": 0, "no prediction": 0}
    for i, fl in enumerate(flags):
        for r in fl:
            key = ("no prediction" if not used[i]
                   else "low confidence" if r.startswith(("low confidence", "no confidence"))
                   else "unlike the training cells" if r.startswith("unlike") else "size")
            kinds[key] += 1
    report: dict = {
        "kind": "predict",
        "model": pred.info,
        "data": str(data),
        "classes": pred.classes,
        "n_images": int(len(predicted)),
        "n_classified": n_used,
        "n_unsure": int((unsure & used).sum()),
        "unsure_fraction": float(unsure[used].mean()) if n_used else None,
        "unsure_reasons": kinds,
        "differential": differential,
        "unsure_rule": th,
    }
    known = used & (truth >= 0)
    if known.any():
        hit = predicted == truth
        report["evaluation"] = {
            "n_labelled": int(known.sum()),
            "accuracy": float(hit[known].mean()),
            "confident_accuracy": float(hit[known & ~unsure].mean()) if (known & ~unsure).any() else None,
            "unsure_accuracy": float(hit[known & unsure].mean()) if (known & unsure).any() else None,
            "flagged_fraction": float(unsure[known].mean()),
            "metrics": classification_metrics(truth[known], predicted[known], pred.classes),
        }
    return report


def _contact_sheet(ds: Any, path: Path, classes: list[str], scores: _Scores, unsure: np.ndarray,
                   flags: list[list[str]], n: int) -> Path | None:
    """PNG grid of the ``n`` least certain classified cells: those unlike the training cells first,
    then the other flagged ones, then the rest, each group by confidence."""
    predicted, conf = scores.predicted, scores.conf
    idx = np.flatnonzero(scores.used)
    if n <= 0 or len(idx) == 0:
        return None
    far = np.array([any(f.startswith("unlike") for f in fl) for fl in flags])
    order = idx[np.lexsort((conf[idx], ~unsure[idx], ~far[idx]))][:n]
    titles = [f"{classes[predicted[i]][:12]} {conf[i]:.2f}{' far' if far[i] else ''}" for i in order]
    return image_sheet([tile(ds.read(int(i)), 96) for i in order], titles, path, cols=8,
                       colors=["crimson" if unsure[i] else "black" for i in order],
                       title="least certain cells (red: flagged unsure; 'far': unlike the training cells)")


def _write_report(report: dict, out: Path) -> None:
    m = report["model"]
    lines = ["# Predictions", "",
             f"- model: `{m['path']}` ({m['kind']}; {m['description']})",
             f"- input: {m['in_chans']} channel(s), whole image resized to {m['image_size']} px as in training",
             f"- data: `{report['data']}`: {report['n_images']} images, {report['n_classified']} classified"
             + (f", {report['n_images'] - report['n_classified']} without a prediction (see the csv)"
                if report["n_images"] > report["n_classified"] else ""),
             f"- flagged unsure: {report['n_unsure']} ({pct(report['unsure_fraction'])} % of the classified cells)",
             ""]
    lines += ["## Differential count", "",
              "Number and share of each cell type among all classified cells, and among the confident ones "
              "(not flagged unsure). The confident cells over-represent the types the model finds easy: count "
              "all cells, and review the unsure ones (`least_certain.png`, the `unsure` column).", ""]
    rows = [[d["class"], d["cells"], f"{d['percent']:.1f}", d["confident_cells"], f"{d['confident_percent']:.1f}"]
            for d in report["differential"]]
    n_conf = sum(d["confident_cells"] for d in report["differential"])
    rows.append(["**total**", report["n_classified"], "100.0", n_conf, "100.0" if n_conf else "–"])
    lines += markdown_table(["class", "cells", "%", "confident cells", "% of confident"], rows) + [""]
    th = report.get("unsure_rule")
    lines += ["## Unsure cells", ""]
    if th:
        ct = th["confidence_threshold"]
        lines.append(
            f"- low confidence: max softmax probability below **{ct:.3f}**, the smallest threshold at which the "
            f"{th['n_val']} {th['reference']} cells it accepts ({pct(th['val_accepted'])} % of them) have an error "
            f"of at most {pct(th['target_error'])} % (measured: {pct(th['val_error'])} %)"
            if math.isfinite(ct) else
            f"- low confidence: no threshold keeps the {th['n_val']} {th['reference']} cells' error at "
            f"{pct(th['target_error'])} %, so every cell is flagged; raise --target-error or improve the model")
        lines.append(
            f"- unlike the training cells: Mahalanobis distance to the nearest class mean above "
            f"**{th['distance_threshold']:.2f}**, the {100 * th['ood_quantile']:g}th percentile of the "
            f"{th['reference']} cells' distances")
        if th["n_val"] < MIN_CALIBRATION_CELLS:
            lines.append(f"- only {th['n_val']} {th['reference']} cells chose these thresholds: treat them as rough")
    else:
        lines.append("- this model carries no unsure calibration (made by an older cellssl): only unusable images "
                     "and size mismatches are flagged; re-run `linear` or `finetune` to calibrate")
    lines.append(f"- image size more than {SIZE_TOLERANCE:g}x off the training images' (another magnification?)")
    lines.append("")
    lines += markdown_table(["reason", "cells"], [[k, v] for k, v in report["unsure_reasons"].items()]) + [""]
    ev = report.get("evaluation")
    if ev:
        lines += ["## Against the folder's labels", "",
                  f"{ev['n_labelled']} cells are in class folders named like the model's classes.", ""]
        lines += markdown_table(["", "value (%)"], [
            ["accuracy, all cells", pct(ev["accuracy"])],
            ["accuracy, confident cells", pct(ev["confident_accuracy"])],
            ["accuracy, unsure cells", pct(ev["unsure_accuracy"])],
            ["share flagged unsure", pct(ev["flagged_fraction"])],
            ["balanced accuracy, all cells", pct(ev["metrics"]["balanced_accuracy"])],
        ]) + [""]
    files = report["files"]
    lines += ["## Files", "", f"- `{Path(files['csv']).name}`: one row per image (path, predicted, probability, "
              "top3, unsure, reason, distance)"]
    if files.get("contact_sheet"):
        lines += [f"- `{Path(files['contact_sheet']).name}`: the least certain cells", "",
                  f"![least certain cells]({Path(files['contact_sheet']).name})"]
    (out / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    write_json(report, out / "report.json")


def format_predict_summary(report: dict) -> str:
    """A few lines for the terminal."""
    top = sorted(report["differential"], key=lambda d: -d["cells"])[:4]
    lines = [f"classified {report['n_classified']}/{report['n_images']} images in {report['seconds']} s; "
             f"unsure: {report['n_unsure']} ({pct(report['unsure_fraction'])} %)",
             "  " + ", ".join(f"{d['class']} {d['percent']:.1f} %" for d in top)]
    ev = report.get("evaluation")
    if ev:
        lines.append(f"  accuracy {pct(ev['accuracy'])} % (confident cells: {pct(ev['confident_accuracy'])} %, "
                     f"{pct(ev['flagged_fraction'])} % flagged)")
    lines.append(f"report: {report['files']['markdown']}")
    return "\n".join(lines)
