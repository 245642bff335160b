"""``predict`` on a large set: scored in parts (``OUT/predictions.parts``), resumable, the same outputs
as one pass; a shard folder as input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cellssl.apply.predict as predict_module
from cellssl.apply.predict import predict
from cellssl.config import DataConfig
from cellssl.data.datasets import build_dataset
from cellssl.data.parts import Parts
from cellssl.data.shards import write_shards
from conftest import make_image_folder, one_error_line, run_cli

OPTS = {"device": "cpu", "progress": False, "batch_size": 7, "sheet": 6}  # batches of 7: the same in parts of 7


def cells(root: Path) -> Path:
    """30 colour cells, plus an unreadable file and a 1-channel image (rows without a prediction) in odd/."""
    data = make_image_folder(root, n_per_class=10, size=20, seed=4)
    (data / "odd").mkdir()
    (data / "odd" / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(data / "odd" / "grey.png")
    return data


def same_run(report: dict) -> dict:
    """The report without what differs between two runs of the same prediction (time, file names)."""
    return {k: v for k, v in report.items() if k not in ("seconds", "files")}


@pytest.fixture(scope="module")
def one_pass(classifier, tmp_path_factory):
    """(data, out, report, contact sheet titles) of a one-pass prediction."""
    root = tmp_path_factory.mktemp("onepass")
    data = cells(root / "cells")
    titles: list = []
    sheet = predict_module.image_sheet
    predict_module.image_sheet = lambda images, t, *a, **kw: (titles.append(list(t)), sheet(images, t, *a, **kw))[1]
    try:
        report = predict(classifier, data, root / "pred", **OPTS)
    finally:
        predict_module.image_sheet = sheet
    return data, root / "pred", report, titles


def test_parts_give_the_rows_summary_and_sheet_of_one_pass(classifier, one_pass, tmp_path, monkeypatch):
    data, whole, report, whole_titles = one_pass
    assert report["n_images"] == 32 and report["n_classified"] == 30 and report["evaluation"]["n_labelled"] == 30
    saved, titles = [], []
    original_save, sheet = Parts.save, predict_module.image_sheet
    monkeypatch.setattr(Parts, "save", lambda parts, k, arrays: (saved.append(sorted(arrays)),
                                                                 original_save(parts, k, arrays)))
    monkeypatch.setattr(predict_module, "image_sheet",
                        lambda images, t, *a, **kw: (titles.append(list(t)), sheet(images, t, *a, **kw))[1])
    out = tmp_path / "pred"
    got = predict(classifier, data, out, part_rows=7, **OPTS)
    # 32 rows in parts of 7: 5 parts of the small per-cell arrays (no features), then removed
    assert saved == [["dist", "proba", "reasons", "sizes", "start"]] * 5
    assert sorted(p.name for p in out.iterdir()) == [".cellssl-output", "least_certain.png", "predictions.csv",
                                                     "report.json", "report.md"]
    assert (out / "predictions.csv").read_text() == (whole / "predictions.csv").read_text()
    assert same_run(got) == same_run(report)
    assert same_run(json.loads((out / "report.json").read_text())) == \
        same_run(json.loads((whole / "report.json").read_text()))
    assert titles == whole_titles and len(titles[0]) == 6  # the same least certain cells, in the same order


def test_a_killed_run_keeps_its_parts_and_the_rerun_scores_only_the_rest(classifier, one_pass, tmp_path,
                                                                        monkeypatch, capsys):
    data, whole, report, _ = one_pass
    starts, score = [], predict_module._Scorer.score

    def killed_in_part_3(scorer, start, stop):
        if len(starts) == 2:
            raise KeyboardInterrupt
        starts.append(start)
        return score(scorer, start, stop)

    monkeypatch.setattr(predict_module._Scorer, "score", killed_in_part_3)
    out = tmp_path / "pred"
    with pytest.raises(KeyboardInterrupt):
        predict(classifier, data, out, part_rows=7, **OPTS)
    parts = out / "predictions.parts"
    assert [p.name for p in out.iterdir()] == ["predictions.parts"]
    assert sorted(p.name for p in parts.iterdir()) == ["part-000000.npz", "part-000001.npz", "plan.json"]
    kept = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*")}

    # the parts of another run: one line naming the folder and the fix, the parts left as they were
    other = make_image_folder(tmp_path / "other", n_per_class=11, size=20, seed=5)
    args = ["predict", "--model", str(classifier), "--out", str(out), "--device", "cpu", "--batch-size", "7",
            "--sheet", "6"]
    msg = one_error_line(*run_cli(capsys, *args, "--data", str(other), "--part-rows", "7")[::2])
    assert f"{parts} holds the parts of another prediction (theirs vs this one: data {data.resolve()} vs " \
           f"{other.resolve()}; rows 32 vs 33)" in msg and f"delete it, or choose another --out than {out}" in msg
    msg = one_error_line(*run_cli(capsys, *args, "--data", str(data), "--part-rows", "8")[::2])
    assert "part rows 7 vs 8" in msg
    with pytest.raises(predict_module.DataError, match="; rows 32 vs 33; part rows 7 vs 40\\): delete it"):
        predict(classifier, other, out, part_rows=40, **OPTS)  # a small set too: the parts are checked, not lost
    assert kept == {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*")}

    starts.clear()
    monkeypatch.setattr(predict_module._Scorer, "score", lambda scorer, start, stop: (starts.append(start),
                                                                                     score(scorer, start, stop))[1])
    code, shown, err = run_cli(capsys, *args, "--data", str(data), "--part-rows", "7")
    assert code == 0, err
    assert starts == [14, 21, 28] and "classified 30/32" in shown  # parts 1-2 were kept, not recomputed
    assert not parts.exists()
    assert (out / "predictions.csv").read_text() == (whole / "predictions.csv").read_text()
    assert same_run(json.loads((out / "report.json").read_text())) == \
        same_run(json.loads((whole / "report.json").read_text()))


def test_a_shard_folder_is_predicted_in_parts_like_its_folder(classifier, tmp_path):
    data = make_image_folder(tmp_path / "cells", n_per_class=8, size=20, seed=6)
    write_shards(build_dataset(DataConfig(), data), tmp_path / "sh", 5)
    folder = predict(classifier, data, tmp_path / "folder", **OPTS)
    shards = predict(classifier, tmp_path / "sh", tmp_path / "shards", part_rows=7, **OPTS)
    rows = (tmp_path / "shards" / "predictions.csv").read_text().splitlines()
    assert rows[0].endswith(",true_class") and len(rows) == 25 and rows[1].startswith("blue/blue_000.png,")
    assert rows == (tmp_path / "folder" / "predictions.csv").read_text().splitlines()
    assert {k: v for k, v in same_run(shards).items() if k != "data"} == \
        {k: v for k, v in same_run(folder).items() if k != "data"}
    assert shards["evaluation"]["accuracy"] > 0.8
