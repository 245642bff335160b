"""Reliability, round three (issue 21 §4 items 1-3, 8 (npz), 9, 10, 12; §3 kill -9 of embed/select):
odd and unreadable files, CSV manifests, output folders inside the data, feature provenance,
truncated files. Each case is listed in docs/reliability.md."""

from __future__ import annotations

import csv
import functools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellssl.apply.predict import predict
from cellssl.apply.select import read_labelled_paths, select
from cellssl.config import DataConfig
from cellssl.data.datasets import DataWarning, MultiViewDataset, build_dataset, collate_readable
from cellssl.data.io import list_images
from cellssl.engine.checkpoint import load_checkpoint
from cellssl.errors import CheckpointError, ConfigError, DataError
from cellssl.eval.features import embed, load_features
from cellssl.eval.linear import linear
from conftest import TINY_BACKBONE, make_image_folder, one_error_line, run_cli, tiny_recipe_yaml

_one_line = functools.partial(one_error_line, alone=False)  # warnings naming bad files may come first

FAST = {"device": "cpu", "progress": False, "image_size": 16}
RANDOM = f"random:{TINY_BACKBONE}"  # a random-init backbone (tiny: seconds less per test)


def _rgb(path: Path, seed: int, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (size, size, 3)).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


def _grey(path: Path, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), 128, np.uint8)).save(path)
    return path


def _truncated_jpeg(path: Path) -> Path:
    _rgb(path, 99)
    Image.open(path).convert("RGB").save(path.with_suffix(".jpg"), quality=90)
    jpg = path.with_suffix(".jpg")
    if path != jpg:
        path.unlink()
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    return jpg


def _write_csv(path: Path, rows: list[list[str]], bom: bool = False) -> Path:
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))








# ---- item 1: one odd file decides the folder's channel count ---------------------------------
def _colour_folder_with_grey_first(root: Path, n: int = 8) -> Path:
    for i in range(n):
        _rgb(root / f"cell_{i}.jpg", i)
    _grey(root / "0_grey.jpg")  # sorts first
    return root


def test_one_grey_file_sorting_first_does_not_make_the_folder_grey(tmp_path):
    folder = _colour_folder_with_grey_first(tmp_path / "smear")
    ds = build_dataset(DataConfig(), folder)
    assert ds.channels == 3
    with pytest.warns(DataWarning, match="0_grey.jpg.*1 channel"):
        img, _, ok = ds.load_checked(0)
    assert not ok and img.shape[2] == 3
    # the recipe's data.channels converts it instead (as it says)
    fixed = build_dataset(DataConfig(channels=3), folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert fixed.read(0).shape[2] == 3


def test_pretrain_on_a_colour_folder_with_one_grey_file_trains_a_colour_model(tmp_path, capsys):
    folder = _colour_folder_with_grey_first(tmp_path / "smear")
    recipe = tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=2, batch_size=4, checkpoint_every=2)
    with pytest.warns(DataWarning, match="0_grey.jpg"):
        code, err = run_cli(capsys, "pretrain", "--recipe", str(recipe), "--data", str(folder), "--out",
                            str(tmp_path / "run"))[::2]
    assert code == 0, err
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["in_chans"] == 3


def test_features_leave_the_odd_file_out_and_predict_gives_it_its_own_row(tmp_path, classifier):
    folder = _colour_folder_with_grey_first(tmp_path / "smear")
    with pytest.warns(DataWarning, match="0_grey.jpg"):
        fs = load_features(RANDOM, folder, labelled=None, **FAST)
    assert fs.info["in_chans"] == 3 and len(fs) == 8 and "0_grey.jpg" not in fs.paths
    assert any(s.endswith("0_grey.jpg") for s in fs.info["skipped_images"])
    report = predict(classifier, folder, tmp_path / "pred", device="cpu", progress=False)
    rows = {r["path"]: r for r in _rows(tmp_path / "pred" / "predictions.csv")}
    assert report["n_images"] == 9 and report["n_classified"] == 8
    assert rows["0_grey.jpg"]["predicted"] == "" and "1 channel(s)" in rows["0_grey.jpg"]["reason"]


# ---- item 2: an unreadable image is absent, not replaced by its neighbour --------------------
def _csv_with_broken_rows(root: Path) -> Path:
    """6 'red' and 6 'blue' cells, a truncated JPEG and a missing file labelled basophil."""
    rows = [["path", "label"]]
    for i in range(6):
        rows.append([_rgb(root / "img" / f"r{i}.png", i).relative_to(root).as_posix(), "red"])
        rows.append([_rgb(root / "img" / f"b{i}.png", 50 + i).relative_to(root).as_posix(), "blue"])
    rows.insert(3, [_truncated_jpeg(root / "img" / "trunc.png").relative_to(root).as_posix(), "basophil"])
    rows.insert(6, ["img/missing.png", "basophil"])
    return _write_csv(root / "cells.csv", rows)


def test_embed_and_linear_leave_unreadable_rows_out_and_count_them(tmp_path):
    manifest = _csv_with_broken_rows(tmp_path)
    with pytest.warns(DataWarning, match="trunc.jpg"):
        out = embed(RANDOM, manifest, tmp_path / "emb.npz", **FAST)
    with np.load(out) as z:
        paths, feats, skipped = [str(p) for p in z["paths"]], z["features"], [str(p) for p in z["skipped"]]
    assert len(paths) == len(feats) == 12
    assert not any("trunc" in p or "missing" in p for p in paths)
    assert sorted(Path(p).name for p in skipped) == ["missing.png", "trunc.jpg"]
    assert len({f.tobytes() for f in feats}) == 12  # no image stands in for another
    with pytest.warns(DataWarning):
        report = linear(RANDOM, manifest, None, tmp_path / "lin" / "linear.json", split=0.5,
                        image_size=16, device="cpu", plots=False)
    assert len(report["checkpoint"]["skipped_images"]) == 2
    assert "basophil" not in (report.get("classes") or [])


def test_select_leaves_an_unreadable_cell_out_of_the_pool_sheet_and_csv(tmp_path):
    pool = tmp_path / "pool"
    for i in range(10):
        _rgb(pool / f"c{i:02d}.png", i)
    broken = _truncated_jpeg(pool / "c04b.png")
    with pytest.warns(DataWarning, match=broken.name):
        rep = select(RANDOM, pool, tmp_path / "round1", budget=10, map_points=0, **FAST)
    assert rep["pool_size"] == 10 and [Path(p).name for p in rep["skipped_images"]] == [broken.name]
    sources = [r["source"] for r in _rows(tmp_path / "round1" / "to_label.csv")]
    assert len(set(sources)) == 10 and not any(broken.name in s for s in sources)
    assert len(list((tmp_path / "round1" / "images").iterdir())) == 10


def test_select_with_features_of_a_pool_with_a_bad_file(tmp_path):
    pool = tmp_path / "pool"
    for i in range(8):
        _rgb(pool / f"c{i}.png", i)
    _truncated_jpeg(pool / "c3b.png")
    with pytest.warns(DataWarning):
        npz = embed(RANDOM, pool, tmp_path / "emb.npz", **FAST)
        rep = select(RANDOM, pool, tmp_path / "sel", budget=3, features=npz, map_points=0, **FAST)
    assert rep["pool_size"] == 8 and len(rep["skipped_images"]) == 1


def test_training_batches_leave_a_bad_file_out(tmp_path):
    folder = tmp_path / "d"
    for i in range(4):
        _rgb(folder / f"{i}.png", i)
    (folder / "1b.png").write_text("not an image")
    with pytest.warns(DataWarning, match="1b.png"):
        ds = build_dataset(DataConfig(), folder)
    views = MultiViewDataset(ds, lambda img: {"views": np.stack([img.transpose(2, 0, 1)] * 2)})
    items = [views[i] for i in range(len(ds))]
    assert [it["readable"] for it in items] == [True, True, False, True, True]  # 0 1 1b 2 3
    batch = collate_readable(items)
    assert batch["index"].tolist() == [0, 1, 3, 4] and "readable" not in batch
    assert collate_readable([items[2]])["index"].tolist() == [2]  # a step is never empty


# ---- item 3: CSV manifests -------------------------------------------------------------------
def _two_class_files(root: Path, n: int = 3) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        out.append((_rgb(root / f"a{i}.png", i).name, "neutrophil"))
        out.append((_rgb(root / f"b{i}.png", 10 + i).name, "lymphocyte"))
    return out


@pytest.mark.parametrize("header", [["path", "label"], ["filepath", "label"], ["image", "class"],
                                    ["File", "Cell_Type"]])
def test_csv_with_a_bom_and_common_column_names(tmp_path, header):
    rows = _two_class_files(tmp_path)
    manifest = _write_csv(tmp_path / "m.csv", [header] + [list(r) for r in rows], bom=True)
    ds = build_dataset(DataConfig(), manifest, labelled=True)
    assert ds.classes == ["lymphocyte", "neutrophil"] and len(ds) == 6
    assert read_labelled_paths(manifest) == [(tmp_path / p).resolve() for p, _ in rows]


def test_csv_without_header_and_unknown_header(tmp_path, capsys):
    rows = _two_class_files(tmp_path)
    plain = _write_csv(tmp_path / "plain.csv", [list(r) for r in rows], bom=True)
    assert len(build_dataset(DataConfig(), plain, labelled=True)) == 6
    odd = _write_csv(tmp_path / "odd.csv", [["picture", "kind"]] + [list(r) for r in rows])
    with pytest.raises(DataError, match="odd.csv.*'picture,kind'.*path"):
        build_dataset(DataConfig(), odd, labelled=True)
    msg = _one_line(*run_cli(capsys, "embed", "--checkpoint", RANDOM, "--data", str(odd), "--out",
                             str(tmp_path / "e.npz"), "--device", "cpu")[::2])
    assert "picture,kind" in msg


def test_csv_case_duplicates_and_two_labels(tmp_path):
    rows = [list(r) for r in _two_class_files(tmp_path)]
    rows[0][1] = "Neutrophil"
    dup = _write_csv(tmp_path / "dup.csv", [["path", "label"]] + rows + [rows[1], rows[3]])
    with pytest.warns(DataWarning) as record:
        ds = build_dataset(DataConfig(), dup, labelled=True)
    text = " ".join(str(w.message) for w in record)
    assert "'Neutrophil' and 'neutrophil' differ only in case" in text
    assert "2 image(s) more than once" in text
    assert len(ds) == 6 and len(set(ds.paths)) == 6  # a duplicate cannot land on both sides of a split
    clash = _write_csv(tmp_path / "clash.csv", [["path", "label"]] + rows + [[rows[1][0], "eosinophil"]])
    with pytest.raises(DataError, match=f"{rows[1][0]} two labels.*'lymphocyte'.*'eosinophil'"):
        build_dataset(DataConfig(), clash, labelled=True)


# ---- item 9: a command's output folder inside --data is not read back -----------------------
def test_predict_and_select_outputs_inside_the_data_are_not_read_as_cells(tmp_path, classifier):
    pool = tmp_path / "nc2"
    for i in range(12):
        _rgb(pool / f"c{i:02d}.png", i)
    first = predict(classifier, pool, pool / "predictions", device="cpu", progress=False)
    again = predict(classifier, pool, pool / "predictions", device="cpu", progress=False, overwrite=True)
    assert first["n_images"] == again["n_images"] == 12
    assert not any("least_certain" in r["path"] for r in _rows(pool / "predictions" / "predictions.csv"))
    r1 = select(RANDOM, pool, pool / "round1", budget=3, map_points=0, **FAST)
    r2 = select(RANDOM, pool, pool / "round2", budget=3, labelled=[pool / "round1" / "to_label.csv"],
                map_points=0, **FAST)
    assert r1["pool_size"] == r2["pool_size"] == 12
    assert len(list_images(pool)) == 12


# ---- item 10: predict on a CSV writes the path as given --------------------------------------
def test_predict_on_a_csv_keeps_paths_apart(tmp_path, classifier, monkeypatch):
    _rgb(tmp_path / "a" / "same.png", 1)
    _rgb(tmp_path / "b" / "same.png", 2)
    _write_csv(tmp_path / "m.csv", [["path"], ["a/same.png"], ["b/same.png"]])
    monkeypatch.chdir(tmp_path)  # --data given relative to the working folder, as on the command line
    predict(classifier, Path("m.csv"), tmp_path / "pred", device="cpu", progress=False)
    assert [r["path"] for r in _rows(tmp_path / "pred" / "predictions.csv")] == ["a/same.png", "b/same.png"]


# ---- item 12: select --features made by another model ---------------------------------------
def test_select_refuses_features_of_another_model(tmp_path, capsys):
    pool = tmp_path / "pool"
    for i in range(8):
        _rgb(pool / f"c{i}.png", i)
    npz = embed(RANDOM, pool, tmp_path / "emb.npz", **FAST)
    with pytest.raises(ConfigError, match=f"another model.*{RANDOM} vs random:resnet18"):
        select("random:resnet18", pool, tmp_path / "s1", budget=2, features=npz, map_points=0, **FAST)
    msg = _one_line(*run_cli(capsys, "select", "--checkpoint", "random:resnet18", "--data", str(pool), "--features",
                             str(npz), "--budget", "2", "--out", str(tmp_path / "s2"), "--device", "cpu",
                             "--image-size", "16")[::2])
    assert RANDOM in msg and not (tmp_path / "s2").exists()
    ok = select(RANDOM, pool, tmp_path / "s3", budget=2, features=npz, map_points=0, **FAST)
    assert ok["checkpoint"]["spec"] == RANDOM
    # a file from before the source was recorded: used, with a warning saying whose it is taken to be
    with np.load(npz) as z:
        old = {k: z[k] for k in ("features", "paths")}
    np.savez(tmp_path / "old.npz", **old)
    with pytest.warns(DataWarning, match="does not record which backbone"):
        select(RANDOM, pool, tmp_path / "s4", budget=2, features=tmp_path / "old.npz", map_points=0,
               **FAST)


# ---- item 8 (npz) and §3: truncated files, killed runs ----------------------------------------
def test_truncated_npz_is_one_line(tmp_path, capsys):
    pool = tmp_path / "pool"
    for i in range(6):
        _rgb(pool / f"c{i}.png", i)
    npz = embed(RANDOM, pool, tmp_path / "emb.npz", **FAST)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    msg = _one_line(*run_cli(capsys, "select", "--checkpoint", RANDOM, "--data", str(pool), "--features",
                             str(cut), "--budget", "2", "--out", str(tmp_path / "s"), "--device", "cpu")[::2])
    assert "cut.npz" in msg and "truncated" in msg
    with pytest.raises(DataError, match="cut.npz.*truncated"):
        build_dataset(DataConfig(), cut)


def test_truncated_checkpoint_is_one_line_for_embed_select_and_pretrained(tmp_path, trained_checkpoint, capsys):
    folder = make_image_folder(tmp_path / "cells", n_per_class=4, size=24)
    recipe = tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=2, batch_size=4, checkpoint_every=2)
    good = trained_checkpoint
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(cut)
    for args in (["embed", "--checkpoint", str(cut), "--data", str(folder), "--out", str(tmp_path / "e.npz")],
                 ["select", "--checkpoint", str(cut), "--data", str(folder), "--budget", "2", "--out",
                  str(tmp_path / "sel")],
                 ["pretrain", "--recipe", str(recipe), "--data", str(folder), "--out", str(tmp_path / "run2"),
                  "--set", f"model.pretrained={cut}"]):
        assert "cut.pt" in _one_line(*run_cli(capsys, *args)[::2]), args


def test_killed_embed_and_select_leave_no_output_that_looks_complete(tmp_path, monkeypatch):
    import cellssl.apply.select as select_module
    import cellssl.eval.features as features_module

    pool = tmp_path / "pool"
    for i in range(8):
        _rgb(pool / f"c{i}.png", i)
    out = tmp_path / "emb.npz"
    real_savez = np.savez

    def dies_while_writing(file, **arrays):
        Path(file).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # stands in for kill -9 between the first byte and the last

    monkeypatch.setattr(features_module.np, "savez", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        embed(RANDOM, pool, out, **FAST)
    assert not out.exists() and not list(tmp_path.glob(".emb*"))
    monkeypatch.setattr(features_module.np, "savez", real_savez)

    def dies_at_the_sheet(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(select_module, "save_contact_sheet", dies_at_the_sheet)
    with pytest.raises(KeyboardInterrupt):
        select(RANDOM, pool, tmp_path / "sel", budget=2, map_points=0, **FAST)
    assert not (tmp_path / "sel").exists() and not list(tmp_path.glob(".sel*"))
    # an earlier selection in that folder is replaced only by a complete one
    monkeypatch.undo()
    select(RANDOM, pool, tmp_path / "sel", budget=2, map_points=0, **FAST)
    before = json.loads((tmp_path / "sel" / "selection.json").read_text())
    monkeypatch.setattr(select_module, "save_contact_sheet", dies_at_the_sheet)
    with pytest.raises(KeyboardInterrupt):
        select(RANDOM, pool, tmp_path / "sel", budget=3, map_points=0, **FAST)
    assert json.loads((tmp_path / "sel" / "selection.json").read_text()) == before
