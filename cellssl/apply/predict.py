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

import contextlib
import csv
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
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
from cellssl.data.parts import Parts, open_parts
from cellssl.data.shards import sha256_file
from cellssl.errors import DataError
from cellssl.eval.metrics import classification_metrics
from cellssl.eval.probes import softmax
from cellssl.eval.report import markdown_table, pct, write_json
from cellssl.eval.settings import DEFAULT_PART_ROWS, PREDICT_FORMATS
from cellssl.eval.unsure import MIN_CALIBRATION_CELLS, OODModel, thresholds
from cellssl.plots import image_sheet, tile

__all__ = ["predict", "format_predict_summary", "SIZE_TOLERANCE"]

SIZE_TOLERANCE = 2.0  # flag images whose height or width differs from the training median by more than this factor
CSV_NAME, SHEET_NAME, PARQUET_NAME = "predictions.csv", "least_certain.png", "predictions.parquet"
PARTS_NAME = "predictions.parts"  # the parts of a large set (resumable), in --out until the outputs are made
# what --overwrite may replace
PREDICT_FILES = (CSV_NAME, SHEET_NAME, "report.md", "report.json", PARQUET_NAME, OUTPUT_MARKER, PARTS_NAME)
PLAN_NAMES = {"model_sha256": "model checksum", "part_rows": "part rows"}  # how a plan's keys read in an error


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
            sheet: int = 48, progress: bool = True, overwrite: bool = False,
            part_rows: int = DEFAULT_PART_ROWS, fmt: str = "csv") -> dict:
    """Classify every image below ``data`` with the predictor ``model``; write ``out``.

    Writes ``out/predictions.csv`` (one row per image: path, predicted class, its probability,
    the top-3, ``unsure`` and why, the distance to the nearest training class, and the true class
    when ``data`` has class sub-folders named like the model's classes), ``out/report.md`` +
    ``report.json`` (the differential count: number and % per class, of all cells and of the
    confident ones; the unsure rule; accuracy when labels are known) and ``out/least_certain.png``
    (the ``sheet`` least certain cells); with ``fmt="parquet"`` also ``out/predictions.parquet`` (the
    same columns, typed: :class:`~cellssl.eval.tables.ParquetRows`). ``target_error`` / ``ood_quantile`` re-choose the
    ``unsure`` thresholds from the saved validation scores (default: the ones chosen at fit time).
    The files are written to a hidden temporary folder renamed to ``out`` at the end (an interrupted
    run leaves no ``out``, or the earlier one whole); an ``out`` that holds files is refused, and
    ``overwrite`` replaces an earlier prediction folder as a whole. Returns the report dict.

    A set of more than ``part_rows`` images is scored in parts (:mod:`cellssl.data.parts`): each
    part's per-cell results (probabilities, distance, size, why a cell has no prediction; never the
    features) go to ``out/predictions.parts/part-00000k.npz`` as soon as the part is done, a rerun
    of a killed run with the same model, data and ``part_rows`` keeps the complete parts and scores
    the rest, and the outputs are then made from the parts one part at a time (the same files and
    summary as one pass; the Parquet table one row group a part).
    """
    if fmt not in PREDICT_FORMATS:
        raise DataError(f"unknown output format {fmt!r}: use one of {', '.join(PREDICT_FORMATS)}")
    t0 = time.monotonic()
    out = _check_out(Path(out), overwrite)
    pred = load_predictor(model, device)
    ds, items = _items(pred, data)
    scorer = _Scorer(pred, items, batch_size, num_workers, progress, _ood(pred))
    parts = (_score_parts(scorer, data, out, part_rows)
             if len(items) > part_rows or (out / PARTS_NAME).is_dir() else None)
    chunks = _part_scores(parts) if parts is not None else [scorer.score(0, len(items))]
    th = thresholds(pred.unsure, target_error, ood_quantile) if pred.unsure else None
    with output_folder(out, replace=overwrite) as tmp:  # all files or none: renamed to out at the end
        mark_output_folder(tmp, "predict")  # a later predict on a folder holding `out` skips its images
        table = tmp / PARQUET_NAME if fmt == "parquet" else None
        tally = _write_csv(tmp / CSV_NAME, ds, pred, chunks, th, sheet, table)
        if not tally.n_used:
            raise DataError(f"no image in {data} could be classified (e.g. {ds.samples[0][0]}: {tally.first_reason})")
        report = _summary(pred, data, tally, th)
        report["files"] = {"csv": str(out / CSV_NAME), "markdown": str(out / "report.md"),
                           "json": str(out / "report.json")}
        if table is not None:
            report["files"]["parquet"] = str(out / PARQUET_NAME)
        if _contact_sheet(ds, tmp / SHEET_NAME, pred.classes, tally.least):
            report["files"]["contact_sheet"] = str(out / SHEET_NAME)
        report["seconds"] = round(time.monotonic() - t0, 1)
        _write_report(report, tmp)
        if parts is not None:
            parts.remove()  # `out` now holds nothing of this run: the finished folder replaces it
    return report


def _check_out(out: Path, overwrite: bool) -> Path:
    """``--out``: a folder that holds no files (or, with ``overwrite``, an earlier prediction; or only
    the parts of a killed run, which this run continues); one-line errors."""
    if out.suffix:
        raise DataError(f"--out {out} must be a folder (predictions.csv, report.md and {SHEET_NAME} go in it)")
    if out.is_dir() and {p.name for p in out.iterdir()} == {PARTS_NAME}:
        return out
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
    """What the model made of the images ``start .. start + n - 1`` (n rows): ``proba`` (n, K) class
    probabilities (NaN rows: no prediction), ``reasons`` why an image has none ("" when it has one),
    ``sizes`` (n, 2) its height and width in pixels, ``dist`` (n,) the Mahalanobis distance to the
    nearest training class (NaN: no prediction, or a model without the unsure calibration). The
    derived arrays are computed once, when first read after :meth:`_Scorer.score` filled the rows."""

    start: int
    proba: np.ndarray
    reasons: list[str]
    sizes: np.ndarray
    dist: np.ndarray

    @classmethod
    def empty(cls, start: int, n: int, k: int) -> _Scores:
        """n rows without a score yet (K classes)."""
        return cls(start, np.full((n, k), np.nan), [""] * n, np.zeros((n, 2), dtype=np.int64), np.full(n, np.nan))

    def arrays(self) -> dict[str, np.ndarray]:
        """The rows as the arrays of a part (:mod:`cellssl.data.parts`)."""
        return {"start": np.asarray(self.start, dtype=np.int64), "proba": self.proba,
                "reasons": np.asarray(self.reasons, dtype=str), "sizes": self.sizes, "dist": self.dist}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> _Scores:
        """The rows of a part written by :meth:`arrays`."""
        return cls(int(arrays["start"]), arrays["proba"], [str(r) for r in arrays["reasons"]], arrays["sizes"],
                   arrays["dist"])

    @cached_property
    def rows(self) -> np.ndarray:
        """(n,) the images' indices in the dataset."""
        return np.arange(self.start, self.start + len(self.reasons))

    @cached_property
    def used(self) -> np.ndarray:
        """(n,) bool: the image has a prediction."""
        return np.array([r == "" for r in self.reasons], dtype=bool)

    @cached_property
    def conf(self) -> np.ndarray:
        """(n,) the top class's probability (NaN without a prediction)."""
        return np.where(self.used, np.nan_to_num(self.proba, nan=0.0).max(axis=1), np.nan)

    @cached_property
    def predicted(self) -> np.ndarray:
        """(n,) the predicted class (-1 without a prediction)."""
        return np.where(self.used, np.nan_to_num(self.proba, nan=-1.0).argmax(axis=1), -1)

    @cached_property
    def top(self) -> np.ndarray:
        """(n, 3) the three most probable classes, most probable first."""
        return np.argsort(-np.nan_to_num(self.proba, nan=-1.0), axis=1)[:, :3]


def _ood(pred: Predictor) -> OODModel | None:
    """The distance model of the predictor's unsure calibration (None without one)."""
    if not pred.unsure:
        return None
    return OODModel(pred.unsure["ood_means"].double().numpy(), pred.unsure["ood_precision"].double().numpy())


@dataclass
class _Scorer:
    """Runs the model over a range of ``items`` (batches of ``batch_size``, ``num_workers`` loader
    workers); ``ood`` gives each scored image its distance to the training classes."""

    pred: Predictor
    items: _Items
    batch_size: int
    num_workers: int
    progress: bool
    ood: OODModel | None

    def score(self, start: int, stop: int) -> _Scores:
        """Probabilities, distance, size and reason of the images ``start <= i < stop`` (the features
        of a batch are dropped once its distances are known)."""
        pred = self.pred
        loader = DataLoader(Subset(self.items, range(start, stop)), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers)
        scores = _Scores.empty(start, stop - start, len(pred.classes))
        batches: Any = (tqdm(loader, desc="predict", unit="batch", leave=False)
                        if self.progress and len(loader) > 2 else loader)
        with torch.no_grad():
            for x, idx, why, h, w in batches:
                idx = idx.numpy() - start
                scores.sizes[idx, 0], scores.sizes[idx, 1] = h.numpy(), w.numpy()
                ok = np.array([r == "" for r in why], dtype=bool)
                for i, r in zip(idx, why):
                    scores.reasons[i] = r
                if not ok.any():
                    continue
                f = pred.model.features(x[torch.as_tensor(ok)].to(pred.device).float())
                scores.proba[idx[ok]] = softmax(pred.model.classify(f).float().cpu().numpy())
                if self.ood is not None:
                    scores.dist[idx[ok]] = self.ood.distances(f.float().cpu().numpy())
        return scores


def _parts_plan(pred: Predictor, data: str | Path, n: int, part_rows: int) -> dict:
    """What the parts of one prediction depend on: the model file (path and checksum), the data,
    its number of images, the part size (a rerun keeps the parts only when they are the same)."""
    model = Path(pred.info["path"]).resolve()
    spec = Path(str(data)).expanduser()
    return {"model": str(model), "model_sha256": sha256_file(model),
            "data": str(spec.resolve()) if spec.exists() else str(data), "rows": int(n), "part_rows": int(part_rows)}


def _score_parts(scorer: _Scorer, data: str | Path, out: Path, part_rows: int) -> Parts:
    """Score the images part by part into ``out/predictions.parts`` (the parts a killed run of the
    same plan left are kept), one part in memory at a time."""
    n = len(scorer.items)
    parts = open_parts(out / PARTS_NAME, _parts_plan(scorer.pred, data, n, part_rows), out=out,
                       what="prediction", names=PLAN_NAMES)
    todo = parts.todo()
    for k in tqdm(todo, desc="predict parts", unit="part", disable=not scorer.progress or len(todo) < 2):
        parts.save(k, scorer.score(*parts.bounds(k)).arrays())
    return parts


def _part_scores(parts: Parts) -> Iterator[_Scores]:
    """The scores of each part in turn (one part read at a time)."""
    for k in range(len(parts.names)):
        yield _Scores.from_arrays(parts.load(k))


def _flags(scores: _Scores, th: dict | None, native: list[int]) -> list[list[str]]:
    """Why each image is unsure ([]: it is not): low confidence, unlike the training cells, another
    size than the training images, or no prediction at all."""
    used, conf, dist = scores.used, scores.conf, scores.dist
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


def _row_paths(samples: Sequence, rows: np.ndarray, root: Path) -> list[str]:
    """The ``path`` column of the images ``rows`` of ``samples``: relative to the folder, to a CSV
    manifest's folder (the path as the CSV gives it, so ``a/same.jpg`` and ``b/same.jpg`` stay apart),
    or the file name of a single image."""
    paths = [samples[int(i)][0] for i in rows]
    if root.is_file():
        return [relative_path(p, root.resolve().parent) if root.suffix.lower() == ".csv" else p.name for p in paths]
    return [relative_path(p, root) for p in paths]


@dataclass
class _Tally:
    """What the summary and the contact sheet need, added up chunk by chunk (:meth:`add`): images,
    classified and unsure ones, the counts per class (all and confident), the counts per unsure
    reason, the true class, prediction and unsure flag of each labelled classified cell (for the
    accuracy), and the ``sheet`` least certain cells (``least``: arrays of their rows, confidence,
    prediction, unsure and far flags, least certain first)."""

    k: int
    sheet: int
    n_images: int = 0
    n_used: int = 0
    n_unsure: int = 0
    first_reason: str = ""
    all_counts: np.ndarray = field(init=False)
    conf_counts: np.ndarray = field(init=False)
    kinds: dict = field(default_factory=lambda: {"low confidence": 0, "unlike the training cells": 0, "size": 0,
                                                 "no prediction": 0})
    known: list = field(default_factory=list)  # (truth, predicted, unsure) of each chunk's labelled cells
    least: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.all_counts, self.conf_counts = np.zeros(self.k, np.int64), np.zeros(self.k, np.int64)

    def add(self, scores: _Scores, unsure: np.ndarray, flags: list[list[str]], truth: np.ndarray) -> None:
        """Count the chunk ``scores`` (its unsure flags (n,), reasons, true classes (n,))."""
        used, predicted = scores.used, scores.predicted
        if not self.n_images and len(scores.reasons):
            self.first_reason = scores.reasons[0]
        self.n_images += len(used)
        self.n_used += int(used.sum())
        self.n_unsure += int((unsure & used).sum())
        self.all_counts += np.bincount(predicted[used], minlength=self.k)
        self.conf_counts += np.bincount(predicted[used & ~unsure], minlength=self.k)
        for i, fl in enumerate(flags):
            for r in fl:
                self.kinds[_reason_kind(r, bool(used[i]))] += 1
        known = used & (truth >= 0)
        self.known.append((truth[known], predicted[known], unsure[known]))
        self._keep_least(scores, unsure, np.array([any(f.startswith("unlike") for f in fl) for fl in flags], bool))

    def _keep_least(self, scores: _Scores, unsure: np.ndarray, far: np.ndarray) -> None:
        """Keep the ``sheet`` least certain classified cells so far: those unlike the training cells
        first, then the other flagged ones, then the rest, each group by confidence (ties: by row)."""
        i = np.flatnonzero(scores.used)
        if self.sheet <= 0 or not len(i):
            return
        new = {"rows": scores.rows[i], "conf": scores.conf[i], "predicted": scores.predicted[i],
               "unsure": unsure[i], "far": far[i]}
        both = {key: np.concatenate([self.least[key], v]) if self.least else v for key, v in new.items()}
        order = np.lexsort((both["rows"], both["conf"], ~both["unsure"], ~both["far"]))[:self.sheet]
        self.least = {key: v[order] for key, v in both.items()}


def _reason_kind(reason: str, used: bool) -> str:
    """The unsure kind a flag counts as in the report."""
    return ("no prediction" if not used
            else "low confidence" if reason.startswith(("low confidence", "no confidence"))
            else "unlike the training cells" if reason.startswith("unlike") else "size")


def _write_csv(path: Path, ds: Any, pred: Predictor, chunks: Iterable[_Scores], th: dict | None,
               sheet: int, table: Path | None = None) -> _Tally:
    """predictions.csv: one row per image, written chunk by chunk as the scores come (to a temporary
    name, then renamed), and with ``table`` the same rows as Parquet there (one row group a chunk);
    returns the :class:`_Tally` of all chunks."""
    classes, root, truth = pred.classes, Path(ds.root), _truth(ds, pred.classes)
    header = ["path", "predicted", "probability", "top3", "unsure", "reason", "distance"]
    has_truth = bool((truth >= 0).any())
    if has_truth:
        header.append("true_class")
    tally = _Tally(len(classes), sheet)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f, _typed_rows(table, header) as typed:
        w = csv.writer(f)
        w.writerow(header)
        for scores in chunks:
            flags = _flags(scores, th, pred.native_size)
            unsure = np.array([bool(fl) for fl in flags], dtype=bool)
            rows = list(_csv_rows(scores, _row_paths(ds.samples, scores.rows, root), classes, unsure, flags,
                                  truth[scores.rows] if has_truth else None))
            w.writerows(rows)
            if typed is not None:
                typed.write(rows)
            tally.add(scores, unsure, flags, truth[scores.rows])
    tmp.replace(path)
    return tally


def _typed_rows(table: Path | None, header: list[str]) -> contextlib.AbstractContextManager:
    """The :class:`~cellssl.eval.tables.ParquetRows` writer of ``table`` (None: no table, a context of None)."""
    if table is None:
        return contextlib.nullcontext(None)
    from cellssl.eval.tables import ParquetRows  # loads anndata (0.4 s): only with --format parquet

    return ParquetRows(table, header)


def _csv_rows(scores: _Scores, rel: list[str], classes: list[str], unsure: np.ndarray, flags: list[list[str]],
              truth: np.ndarray | None) -> Iterator[list[str]]:
    """The CSV rows of one chunk (``truth``: (n,) true classes, None: no ``true_class`` column)."""
    predicted, conf, proba, top, dist = scores.predicted, scores.conf, scores.proba, scores.top, scores.dist
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
        if truth is not None:
            row.append(classes[truth[i]] if truth[i] >= 0 else "")
        yield row


def _summary(pred: Predictor, data: str | Path, tally: _Tally, th: dict | None) -> dict:
    """The report dict (differential count, unsure share and reasons, accuracy on the labelled cells)."""
    n_used, n_conf = tally.n_used, int(tally.conf_counts.sum())
    differential = [
        {"class": c, "cells": int(tally.all_counts[j]), "percent": 100.0 * tally.all_counts[j] / max(1, n_used),
         "confident_cells": int(tally.conf_counts[j]),
         "confident_percent": 100.0 * tally.conf_counts[j] / max(1, n_conf)}
        for j, c in enumerate(pred.classes)
    ]
    report: dict = {
        "kind": "predict",
        "model": pred.info,
        "data": str(data),
        "classes": pred.classes,
        "n_images": tally.n_images,
        "n_classified": n_used,
        "n_unsure": tally.n_unsure,
        "unsure_fraction": tally.n_unsure / n_used if n_used else None,
        "unsure_reasons": dict(tally.kinds),
        "differential": differential,
        "unsure_rule": th,
    }
    truth, predicted, unsure = (np.concatenate([c[j] for c in tally.known]) for j in range(3))
    if len(truth):
        hit = predicted == truth
        report["evaluation"] = {
            "n_labelled": int(len(truth)),
            "accuracy": float(hit.mean()),
            "confident_accuracy": float(hit[~unsure].mean()) if (~unsure).any() else None,
            "unsure_accuracy": float(hit[unsure].mean()) if unsure.any() else None,
            "flagged_fraction": float(unsure.mean()),
            "metrics": classification_metrics(truth, predicted, pred.classes),
        }
    return report


def _contact_sheet(ds: Any, path: Path, classes: list[str], least: dict) -> Path | None:
    """PNG grid of the least certain classified cells (``least``, :class:`_Tally`'s)."""
    if not least:
        return None
    titles = [f"{classes[p][:12]} {c:.2f}{' far' if far else ''}"
              for p, c, far in zip(least["predicted"], least["conf"], least["far"])]
    return image_sheet([tile(ds.read(int(i)), 96) for i in least["rows"]], titles, path, cols=8,
                       colors=["crimson" if u else "black" for u in least["unsure"]],
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
    if files.get("parquet"):
        lines.append(f"- `{Path(files['parquet']).name}`: the same rows, typed (probability and distance float, "
                     "unsure bool)")
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
