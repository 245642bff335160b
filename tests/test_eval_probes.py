"""Linear probe and kNN on synthetic feature arrays; report writing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cellssl.errors import DataError
from cellssl.eval.features import FeatureSet, align_labels
from cellssl.eval.knn import knn_classify, knn_eval
from cellssl.eval.linear import linear_probe
from cellssl.eval.metrics import classification_metrics
from cellssl.eval.probes import split_featureset
from cellssl.eval.report import KNN, format_summary, report_paths, write_report

METRIC_KEYS = {"accuracy", "balanced_accuracy", "macro_f1", "confusion_matrix", "per_class_accuracy"}


def _structured(n_per: int = 40, k: int = 4, d: int = 32, sep: float = 1.5, seed: int = 0) -> FeatureSet:
    """Overlapping Gaussian clusters: clearly above chance, not trivially perfect."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, sep, (k, d))
    x = np.concatenate([centres[c] + rng.normal(0, 1, (n_per, d)) for c in range(k)]).astype(np.float32)
    y = np.repeat(np.arange(k), n_per)
    return FeatureSet(x, y, [f"c{c}/{i}.png" for c, i in zip(y, range(len(y)))], [f"class{c}" for c in range(k)],
                      root="mem")


def test_knn_classify_simple():
    train = np.array([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    labels = np.array([0, 0, 1, 1])
    pred = knn_classify(train, labels, np.array([[1.0, 0.05], [0.02, 1.0]]), k=3, temperature=0.07, n_classes=2)
    assert pred.tolist() == [0, 1]
    # k larger than the training set is capped
    assert knn_classify(train, labels, np.array([[1.0, 0.0]]), k=50).tolist() == [0]


def test_knn_and_linear_above_chance():
    fs = _structured()
    tr, te = split_featureset(fs, 0.3, seed=0)
    assert len(te) == pytest.approx(0.3 * len(fs), abs=4)
    chance = 0.25
    for report in (knn_eval(tr, te, k=10), linear_probe(tr, te)):
        assert METRIC_KEYS <= set(report)
        assert report["accuracy"] > chance + 0.4, report["accuracy"]
        cm = np.array(report["confusion_matrix"])
        assert cm.shape == (4, 4) and cm.sum() == len(te)
    lin = linear_probe(tr, te)
    assert lin["C"] in (0.01, 0.1, 1.0, 10.0, 100.0) and set(lin["validation"]) == {"0.01", "0.1", "1", "10", "100"}


def test_noise_is_near_chance():
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (600, 16)).astype(np.float32)
    y = np.repeat(np.arange(3), 200)
    fs = FeatureSet(x, y, [str(i) for i in range(600)], ["a", "b", "c"])
    tr, te = split_featureset(fs, 0.5, seed=0)
    for report in (knn_eval(tr, te, k=20), linear_probe(tr, te, Cs=(0.1,))):
        assert abs(report["accuracy"] - 1 / 3) < 0.12


def test_metrics_hand_example():
    m = classification_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.0}


def test_align_labels_by_name():
    a = FeatureSet(np.zeros((3, 2), np.float32), np.array([0, 1, 2]), ["x"] * 3, ["a", "b", "c"])
    b = FeatureSet(np.zeros((2, 2), np.float32), np.array([0, 1]), ["y"] * 2, ["c", "a"])
    classes, ytr, yte = align_labels(a, b)
    assert classes == ["a", "b", "c"] and yte.tolist() == [2, 0]
    bad = FeatureSet(np.zeros((1, 2), np.float32), np.array([0]), ["z"], ["zebra"], root="t")
    with pytest.raises(DataError, match="zebra"):
        align_labels(a, bad)


def test_split_requires_fraction():
    with pytest.raises(DataError, match="fraction"):
        split_featureset(_structured(), 1.5)


def test_write_report_names_and_summary(tmp_path):
    fs = _structured(n_per=10)
    tr, te = split_featureset(fs, 0.3)
    report = knn_eval(tr, te, k=5)
    report["checkpoint"] = {"spec": "random:resnet18", "description": "random / resnet18 (3 ch, 32 px), step 0"}
    out = tmp_path / "sub" / "knn.json"
    write_report(report, out, KNN, features=fs)
    paths = report_paths(out)
    assert paths["markdown"] == tmp_path / "sub" / "knn.md"
    assert paths["confusion"].name == "knn_confusion.png" and paths["confusion"].is_file()
    assert paths["embedding"].is_file()
    data = json.loads(out.read_text())
    assert METRIC_KEYS <= set(data) and data["kind"] == "knn"
    md = paths["markdown"].read_text()
    assert "Per-class accuracy" in md and "class0" in md and "knn_confusion.png" in md
    summary = format_summary(report)
    assert summary.strip().splitlines()[-1].endswith("knn.md")
    # a folder as --out, and too few points for an embedding
    tiny = fs.subset(np.arange(0, len(fs), 8))
    write_report(knn_eval(tiny, tiny, k=1), tmp_path / "dir", KNN, features=tiny)
    assert (tmp_path / "dir" / "report.json").is_file() and (tmp_path / "dir" / "report.md").is_file()
    assert not (tmp_path / "dir" / "embedding.png").exists()


def test_linear_with_one_validation_cell_saves_a_classifier(tmp_path):
    """Few labelled cells (2 + 2 + 4, as a first round of `cellssl select` can give): the probe's split
    holds out 1 cell, too few for the unsure thresholds, so the fitted cells stand in. Before: internal
    error ``cannot reshape array of size 15 into shape (4,newaxis)`` (the probabilities of every
    training row against the labels of the fitted rows only)."""
    from cellssl.eval.linear import linear
    from conftest import TINY_BACKBONE, make_image_folder

    folder = make_image_folder(tmp_path / "cells", n_per_class=4, size=16)
    for name in ("green", "red"):
        for extra in sorted((folder / name).glob("*.png"))[2:]:
            extra.unlink()
    with pytest.warns(UserWarning, match="no validation cells"):
        report = linear(f"random:{TINY_BACKBONE}", folder, None, tmp_path / "lin" / "linear.json", split=0.3,
                        image_size=16, device="cpu", plots=False)
    unsure = torch.load(report["classifier"], weights_only=True)["unsure"]
    assert unsure["reference"] == "training" and unsure["n_val"] == 4  # the fitted rows, one value each
