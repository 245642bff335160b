"""cellssl predict: from a fitted linear probe or a fine-tuned model to answers on a new folder."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellssl.apply.model import load_predictor
from cellssl.apply.predict import predict
from cellssl.errors import CheckpointError, DataError
from cellssl.eval.features import FeatureSet
from cellssl.eval.finetune import finetune
from cellssl.eval.linear import fit_probe, linear
from cellssl.eval.metrics import l2_normalize
from cellssl.eval.probes import softmax
from cellssl.eval.unsure import confidence_threshold, thresholds
from conftest import TINY_BACKBONE, TINY_FEATURES, make_image_folder

COLUMNS = ["path", "predicted", "probability", "top3", "unsure", "reason", "distance"]


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A linear probe on a random-init backbone (the colour classes are separable by any features)."""
    root = tmp_path_factory.mktemp("probe")
    train = make_image_folder(root / "train", n_per_class=30, size=24, seed=0)
    report = linear(f"random:{TINY_BACKBONE}", train, None, root / "eval" / "linear.json", split=0.2, image_size=32,
                    device="cpu", plots=False)
    return Path(report["classifier"]), root


def test_unsure_threshold_rule():
    conf = np.array([0.99, 0.98, 0.95, 0.90, 0.80, 0.70, 0.60, 0.55])
    correct = np.array([1, 1, 1, 0, 1, 1, 0, 0], dtype=bool)
    # error of the top k: 0, 0, 0, 1/4, 1/5, 1/6, 2/7, 3/8 -> the largest k with error <= 0.2 is 6
    t = confidence_threshold(conf, correct, 0.2)
    assert t["threshold"] == 0.70 and t["accepted"] == 6 / 8 and t["error"] == pytest.approx(1 / 6)
    assert confidence_threshold(conf, correct, 0.1)["threshold"] == 0.95
    assert confidence_threshold(conf, correct, 0.0)["threshold"] == 0.95
    assert confidence_threshold(conf[3:4], correct[3:4], 0.05)["threshold"] == float("inf")  # nothing qualifies
    # ties: never cut between equal confidences
    t = confidence_threshold(np.array([0.9, 0.9, 0.8]), np.array([1, 0, 1], bool), 0.0)
    assert t["threshold"] == float("inf")


@pytest.mark.parametrize("n_classes", [2, 3])
def test_folded_probe_matches_sklearn(n_classes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 16)).astype(np.float32) + np.repeat(np.eye(16, dtype=np.float32)[:n_classes] * 3,
                                                                   90 // n_classes, axis=0)
    y = np.repeat(np.arange(n_classes), 90 // n_classes)
    fs = FeatureSet(x, y, [str(i) for i in range(len(y))], [f"c{i}" for i in range(n_classes)])
    fit = fit_probe(fs, Cs=(0.1, 1.0))
    W, b = fit.folded()
    p = softmax(l2_normalize(x) @ W.T + b)
    assert np.allclose(p, fit.predict_proba(x), atol=1e-4)
    assert len(fit.val_idx) == 18 and fit.val_proba.shape == (18, n_classes)


def test_linear_saves_a_weights_only_classifier(probe):
    path, _ = probe
    assert path.name == "linear_classifier.pt"
    ck = torch.load(path, weights_only=True)
    assert ck["kind"] == "linear" and ck["classes"] == ["blue", "green", "red"] and ck["head_normalize"]
    assert ck["model"]["head.weight"].shape == (3, TINY_FEATURES) and "backbone.conv1.0.weight" in ck["model"]
    assert ck["unsure"]["n_val"] == 15 and ck["unsure"]["reference"] == "validation"
    assert ck["native_size"] == [24, 24] and ck["config"]["data"]["image_size"] == 32
    th = thresholds(ck["unsure"])
    assert 0 < th["confidence_threshold"] <= 1 and th["distance_threshold"] > 0


def test_predict_end_to_end_flags_the_odd_ones(probe, tmp_path):
    path, _ = probe
    data = make_image_folder(tmp_path / "new", n_per_class=10, size=24, seed=1)
    odd = data / "odd"
    odd.mkdir()
    # confidently "green" to the classifier, but unlike any training cell: must be flagged
    Image.fromarray(np.stack([np.full((24, 24), v, np.uint8) for v in (230, 200, 60)], axis=2)).save(odd / "yellow.png")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(odd / "grey.png")  # 1 channel in an RGB folder
    (odd / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.full((120, 120, 3), (40, 60, 200), np.uint8)).save(odd / "zoomed.png")  # 5x the size

    out = tmp_path / "pred"
    report = predict(path.parent, data, out, device="cpu", progress=False, sheet=12)
    table = rows(out / "predictions.csv")
    # class folders named like the model's classes give the truth; "odd/" is not one of them
    assert list(table[0]) == COLUMNS + ["true_class"] and len(table) == 34
    assert {r["true_class"] for r in table if r["path"].startswith("odd/")} == {""}
    by = {r["path"]: r for r in table}
    cells = [r for r in table if not r["path"].startswith("odd/")]
    acc = np.mean([r["predicted"] == r["path"].split("/")[0] for r in cells])
    assert acc > 0.9
    assert all(r["predicted"] in ("blue", "green", "red") and 0 < float(r["probability"]) <= 1 for r in cells)
    assert all(len(r["top3"].split("; ")) == 3 for r in cells)
    assert by["odd/yellow.png"]["unsure"] == "yes" and "unlike the training cells" in by["odd/yellow.png"]["reason"]
    assert float(by["odd/yellow.png"]["distance"]) > 2 * max(float(r["distance"]) for r in cells)
    assert by["odd/grey.png"]["predicted"] == "" and "1 channel(s); the model takes 3" in by["odd/grey.png"]["reason"]
    assert by["odd/broken.png"]["predicted"] == "" and "unreadable" in by["odd/broken.png"]["reason"]
    assert by["odd/zoomed.png"]["unsure"] == "yes" and "size 120x120 px vs 24x24 px" in by["odd/zoomed.png"]["reason"]
    assert sum(r["unsure"] == "yes" for r in cells) <= 6  # ordinary cells are mostly confident

    assert report["n_images"] == 34 and report["n_classified"] == 32 and report["evaluation"]["n_labelled"] == 30
    assert sum(d["cells"] for d in report["differential"]) == 32
    assert sum(d["percent"] for d in report["differential"]) == pytest.approx(100.0)
    md = (out / "report.md").read_text()
    assert "## Differential count" in md and "| blue |" in md and "smallest threshold" in md
    assert (out / "least_certain.png").stat().st_size > 10_000 and "least_certain.png" in md
    # a stricter target flags more cells; the threshold is re-chosen from the saved validation scores
    strict = predict(path, data, tmp_path / "strict", device="cpu", progress=False, sheet=0, target_error=0.0,
                     ood_quantile=0.5)
    assert strict["n_unsure"] >= report["n_unsure"] and not (tmp_path / "strict" / "least_certain.png").exists()


def test_labelled_folder_is_scored(probe, tmp_path):
    path, _ = probe
    data = make_image_folder(tmp_path / "test", n_per_class=8, size=24, seed=2)
    report = predict(path, data, tmp_path / "p", device="cpu", progress=False, sheet=0)
    ev = report["evaluation"]
    assert ev["n_labelled"] == 24 and ev["accuracy"] > 0.9 and 0 <= ev["flagged_fraction"] <= 1
    assert rows(tmp_path / "p" / "predictions.csv")[0]["true_class"] == "blue"
    assert "accuracy, confident cells" in (tmp_path / "p" / "report.md").read_text()


def test_wrong_channel_count_is_one_line(probe, tmp_path, capsys):
    from cellssl.cli import main

    path, _ = probe
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(3):
        Image.fromarray(np.full((24, 24), 50 * i, np.uint8)).save(grey / f"{i}.png")
    with pytest.raises(DataError, match="have 1 channel.*trained on 3-channel"):
        predict(path, grey, tmp_path / "p", device="cpu", progress=False)
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", str(path), "--data", str(grey), "--out", str(tmp_path / "p"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and "1 channel(s)" in err[0], err


def test_pretraining_checkpoint_is_not_a_classifier(tmp_path):
    from test_eval_end_to_end import make_checkpoint

    ck = make_checkpoint(tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="has no classifier.*cellssl linear"):
        load_predictor(ck)
    with pytest.raises(CheckpointError, match="holds no model"):
        load_predictor(tmp_path)


def test_finetuned_model_predicts_from_the_cli(tmp_path, capsys):
    from cellssl.cli import main

    train = make_image_folder(tmp_path / "train", n_per_class=12, size=24, seed=0)
    finetune(f"random:{TINY_BACKBONE}", train, tmp_path / "ft", epochs=2, image_size=16, batch_size=16, device="cpu",
             progress=False)
    ck = torch.load(tmp_path / "ft" / "best.pt", weights_only=True)
    assert ck["unsure"]["n_val"] > 0 and ck["native_size"] == [24, 24] and not ck.get("head_normalize")
    new = make_image_folder(tmp_path / "new", n_per_class=4, size=24, seed=3)
    capsys.readouterr()
    main(["predict", "--model", str(tmp_path / "ft"), "--data", str(new), "--out", str(tmp_path / "pred"),
          "--device", "cpu", "--sheet", "8"])
    shown = capsys.readouterr().out
    assert "classified 12/12 images" in shown and "report:" in shown
    table = rows(tmp_path / "pred" / "predictions.csv")
    assert len(table) == 12 and {r["predicted"] for r in table} <= {"blue", "green", "red"}
    assert (tmp_path / "pred" / "least_certain.png").is_file()
    # a single image works too
    one = predict(tmp_path / "ft" / "best.pt", new / "red" / "red_000.png", tmp_path / "one", device="cpu",
                  progress=False, sheet=0)
    assert one["n_classified"] == 1 and rows(tmp_path / "one" / "predictions.csv")[0]["path"] == "red_000.png"
