"""Outputs biologists open (AnnData .h5ad, Parquet), lab-effect scores, UMAP, physical scale."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from cellssl.errors import DataError
from cellssl.eval.features import FeatureSet
from cellssl.eval.tables import csv_to_parquet, resolve_output
from conftest import TINY_BACKBONE, make_image_folder, make_plate_folder, run_cli


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    return make_plate_folder(tmp_path_factory.mktemp("bio"))


# ---- 1. AnnData -----------------------------------------------------------------------------
def test_embed_h5ad_opens_in_anndata(cells, tmp_path, capsys):
    code, out, err = run_cli(capsys, "embed", "--checkpoint", "pixels:4", "--data", str(cells), "--out",
                             str(tmp_path / "o"), "--format", "h5ad", "--image-size", "16", "--device", "cpu",
                             "--lab", "lab A")
    assert code == 0, err
    path = tmp_path / "o" / "embeddings.h5ad"
    assert path.is_file() and str(path) in out
    ad = anndata.read_h5ad(path)
    assert ad.n_obs == 14 and ad.obsm["X_cellssl"].shape == (14, 48) and ad.obsm["X_cellssl"].dtype == np.float32
    obs = ad.obs
    assert list(obs.columns) == ["path", "label", "folder", "lab", "height", "width", "channels"]
    # sub-folders below a class belong to the class (label) and show as the folder (batch / plate)
    big = obs[obs["path"].str.contains("big_")]
    assert len(big) == 2 and set(big["label"]) == {"green"} and set(big["folder"]) == {"green/plate2"}
    assert set(big["height"]) == {20} and set(obs.loc[~obs.index.isin(big.index), "height"]) == {16}
    assert set(obs["channels"]) == {3} and set(obs["lab"]) == {"lab A"}
    assert set(obs["label"].cat.categories) == {"red", "green"}
    info = ad.uns["cellssl"]
    assert info["checkpoint"] == "pixels:4" and info["cellssl_version"] and info["image_size"] == 16
    assert isinstance(json.loads(info["recipe"]), dict)
    # the same rows as the npz
    code, _, err = run_cli(capsys, "embed", "--checkpoint", "pixels:4", "--data", str(cells), "--out",
                           str(tmp_path / "f.npz"), "--image-size", "16", "--device", "cpu")
    assert code == 0, err
    z = np.load(tmp_path / "f.npz")
    np.testing.assert_allclose(z["features"], ad.obsm["X_cellssl"])
    assert list(z["paths"]) == list(obs["path"])


def test_h5ad_scanpy_neighbours(cells, tmp_path, capsys):
    sc = pytest.importorskip("scanpy")
    code, _, err = run_cli(capsys, "embed", "--checkpoint", "pixels:4", "--data", str(cells), "--out",
                           str(tmp_path / "e.h5ad"), "--image-size", "16", "--device", "cpu")
    assert code == 0, err
    ad = anndata.read_h5ad(tmp_path / "e.h5ad")
    sc.pp.neighbors(ad, use_rep="X_cellssl", n_neighbors=5)
    assert ad.obsp["connectivities"].shape == (14, 14)


# ---- 2. Parquet ------------------------------------------------------------------------------
def test_embed_parquet_round_trip(cells, tmp_path, capsys):
    code, _, err = run_cli(capsys, "embed", "--checkpoint", "pixels:4", "--data", str(cells), "--out",
                           str(tmp_path / "t.parquet"), "--image-size", "16", "--device", "cpu")
    assert code == 0, err
    df = pd.read_parquet(tmp_path / "t.parquet")
    assert list(df.columns) == ["path", "label", "folder", "lab", "height", "width", "channels", "features"]
    assert df["height"].dtype == np.int32 and len(df) == 14
    feats = np.stack(df["features"].to_numpy())
    assert feats.shape == (14, 48) and feats.dtype == np.float32
    ad_code, _, _ = run_cli(capsys, "embed", "--checkpoint", "pixels:4", "--data", str(cells), "--out",
                            str(tmp_path / "t.npz"), "--image-size", "16", "--device", "cpu")
    z = np.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(feats, z["features"])
    assert list(df["path"]) == list(z["paths"]) and df["label"].tolist()[0] in {"red", "green"}


def test_prediction_csv_to_parquet_types(tmp_path):
    csv = tmp_path / "predictions.csv"
    csv.write_text("path,predicted,probability,top3,unsure,reason,distance,true_class\n"
                   "a.png,red,0.9500,red 0.950; green 0.050,no,,1.25,red\n"
                   "b.png,,,,yes,cannot read image,,\n")
    df = pd.read_parquet(csv_to_parquet(csv))
    assert list(df.columns) == list(pd.read_csv(csv).columns)
    assert df["probability"].dtype == np.float64 and df["probability"][0] == 0.95 and np.isnan(df["probability"][1])
    assert df["unsure"].dtype == bool and df["unsure"].tolist() == [False, True]
    assert df["distance"][0] == 1.25 and df["predicted"].tolist() == ["red", ""]


def test_predict_writes_parquet(tmp_path, capsys):
    from cellssl.eval.linear import linear

    train = make_image_folder(tmp_path / "train", n_per_class=10, size=16, classes=("red", "green"))
    rep = linear(f"random:{TINY_BACKBONE}", train, None, tmp_path / "lin" / "linear.json", split=0.3, image_size=16,
                 device="cpu", plots=False)
    code, out, err = run_cli(capsys, "predict", "--model", rep["classifier"], "--data", str(train), "--out",
                             str(tmp_path / "pred"), "--device", "cpu", "--format", "parquet", "--sheet", "0")
    assert code == 0, err
    df = pd.read_parquet(tmp_path / "pred" / "predictions.parquet")
    csv = pd.read_csv(tmp_path / "pred" / "predictions.csv", keep_default_na=False, dtype=str)
    assert list(df.columns) == list(csv.columns) and len(df) == len(csv) == 20
    assert df["unsure"].dtype == bool and df["probability"].dtype == np.float64


# ---- bad output options ---------------------------------------------------------------------------
def test_resolve_output_formats(tmp_path):
    assert resolve_output(tmp_path / "x.h5ad") == (tmp_path / "x.h5ad", "h5ad")
    assert resolve_output(tmp_path / "x.pq") == (tmp_path / "x.pq", "parquet")
    assert resolve_output(tmp_path / "dir", "parquet") == (tmp_path / "dir" / "embeddings.parquet", "parquet")
    assert resolve_output(tmp_path / "x.csv") == (tmp_path / "x.npz", "npz")
    with pytest.raises(DataError, match="unknown output format 'xlsx'"):
        resolve_output(tmp_path / "x", "xlsx")


def test_unknown_format_is_an_error(cells, tmp_path, capsys):
    code, _, err = run_cli(capsys, "embed", "--checkpoint", "pixels:4", "--data", str(cells), "--out",
                           str(tmp_path / "o"), "--format", "xlsx")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert "--format must be one of auto, npz, h5ad, parquet, got 'xlsx'" in err
    code, _, err = run_cli(capsys, "predict", "--model", "m.pt", "--data", str(cells), "--out", str(tmp_path / "p"),
                           "--format", "parque")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "did you mean 'parquet'" in err


def test_unwritable_out_is_one_line_and_writes_nothing(cells, tmp_path, capsys, monkeypatch):
    from cellssl.eval import tables

    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run_cli(capsys, "embed", "--checkpoint", "pixels:4", "--data", str(cells), "--out",
                           str(afile / "sub" / "e.h5ad"), "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is a file" in err and "--out" in err
    # no write permission (faked: the tests may run as root, for whom chmod does not bind)
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(tables.os, "access", lambda p, mode: Path(p) != locked)
    code, _, err = run_cli(capsys, "embed", "--checkpoint", "pixels:4", "--data", str(cells), "--out",
                           str(locked / "new" / "e.parquet"), "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no write permission" in err
    assert list(locked.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from cellssl.eval import tables

    fs = FeatureSet(np.zeros((3, 2), np.float32), np.array([0, 1, 0]), ["a.png", "b.png", "c.png"], ["u", "v"])

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", boom)
    with pytest.raises(OSError):
        tables.write_h5ad(fs, tmp_path / "x.h5ad")
    assert list(tmp_path.iterdir()) == []


# ---- 3. lab-effect scores ----------------------------------------------------------------------
def _two_labs(shift: float, type_sep: float = 6.0, n: int = 60, seed: int = 0):
    """3 cell types (centres ``type_sep`` apart) in 2 labs; lab 1 is moved by ``shift`` along a
    direction orthogonal to the type centres."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((3, 8))
    centres[np.arange(3), np.arange(3)] = type_sep
    centres += 10.0  # away from the origin: cosine distances stay meaningful
    x, lab, typ = [], [], []
    for b in (0, 1):
        for t in range(3):
            p = centres[t] + rng.normal(size=(n, 8))
            p[:, 7] += shift * b
            x.append(p)
            lab += [b] * n
            typ += [f"t{t}"] * n
    return np.concatenate(x), np.array(lab), np.array(typ)


def test_lab_mixing_hand_computed():
    from cellssl.eval.labmix import lab_mixing

    # one type, labs A A B B on a line: each cell's 1 neighbour is from its own lab -> 0
    x = np.array([[0.0, 1], [0.1, 1], [10, 1], [10.1, 1]])
    assert lab_mixing(x, np.array([0, 0, 1, 1]), np.array(["t"] * 4), k=1)["score"] == 0.0
    # pairs A B | A B: each cell's neighbour is from the other lab: f = 1, expected 2/3 -> 1.5
    x = np.array([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.05, 1.0]])
    r = lab_mixing(x, np.array([0, 1, 0, 1]), np.array(["t"] * 4), k=1)
    assert r["score"] == pytest.approx(1.5) and r["per_type"] == {"t": pytest.approx(1.5)}
    # a type seen in one lab only does not count
    r = lab_mixing(np.vstack([x, x + 5]), np.array([0, 1, 0, 1, 0, 0, 0, 0]), np.array(["t"] * 4 + ["u"] * 4), k=1)
    assert set(r["per_type"]) == {"t"}
    # k + 1 cells or fewer: every cell is every other's neighbour (1 by construction): undefined
    assert np.isnan(lab_mixing(x, np.array([0, 1, 0, 1]), np.array(["t"] * 4), k=3)["score"])


def test_lab_effect_scores_mixed_vs_separated():
    from cellssl.eval.labmix import cross_lab_knn_accuracy, ilisi, lab_effect_scores, lab_mixing, type_silhouette

    x, lab, typ = _two_labs(shift=0.0)
    assert lab_mixing(x, lab, typ)["score"] == pytest.approx(1.0, abs=0.15)
    assert ilisi(x, lab)["score"] == pytest.approx(1.0, abs=0.1)
    assert cross_lab_knn_accuracy(x, lab, typ) > 0.95
    assert type_silhouette(x, typ) > 0.3
    x, lab, typ = _two_labs(shift=25.0)  # each lab a cluster of its own: labs apart, types still apart
    assert lab_mixing(x, lab, typ)["score"] < 0.05
    assert ilisi(x, lab)["score"] < 0.05
    x, lab, typ = _two_labs(shift=0.0, type_sep=0.0)  # types on top of each other
    assert abs(type_silhouette(x, typ)) < 0.05
    assert cross_lab_knn_accuracy(x, lab, typ) < 0.5  # chance = 1/3
    # the wrapper: only the types both labs have
    xs, ys = x[lab == 0], typ[lab == 0]
    r = lab_effect_scores(xs, ys, x[lab == 1][:60], typ[lab == 1][:60], max_per_type=50)
    assert r["types"] == ["t0"] and r["n_source"] == 50 and r["n_target"] == 50 and np.isnan(r["type_silhouette"])


def test_transfer_report_has_lab_effect_scores_and_plots(tmp_path, quick_maps):
    import warnings

    from cellssl.adapt.report import transfer_report
    from cellssl.adapt.shift import shift_folder

    source = make_image_folder(tmp_path / "source", n_per_class=12, size=24)
    shift_folder(source, tmp_path / "target", preset="scanner_b", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = transfer_report(f"random:{TINY_BACKBONE}", source, tmp_path / "target", tmp_path / "rep", episodes=5,
                             device="cpu", shots=(1,), embedding_max=60, stain_method="reinhard",
                             source_um_per_px=2.0, target_um_per_px=1.0)
    rep = json.loads((tmp_path / "rep" / "transfer.json").read_text())
    assert set(rep["lab_effect"]) == {"source", "adabn", "stain", "scale"}
    scale = next(r for r in rep["rows"] if r["key"] == "scale")
    assert scale["label"] == "+ scale matched (target x0.50)"
    assert rep["lab_effect"]["scale"]["type_silhouette"] != rep["lab_effect"]["source"]["type_silhouette"]
    for scores in rep["lab_effect"].values():
        assert scores["types"] == ["blue", "green", "red"] and scores["n_source"] == scores["n_target"] == 36
        assert 0 <= scores["lab_mixing"] < 3 and 0 <= scores["cross_lab_knn_acc"] <= 1
        assert -1 <= scores["type_silhouette"] <= 1 and np.isfinite(scores["ilisi"])
    text = md.read_text()
    assert "## Lab effect" in text and "iLISI" in text and "transfer_scores.png" in text
    assert (tmp_path / "rep" / "transfer_scores.png").stat().st_size > 0
    assert (tmp_path / "rep" / "transfer_embedding.png").stat().st_size > 0


# ---- 4. UMAP (t-SNE without umap-learn) -------------------------------------------------------
def test_embed_plot_draws_class_and_folder_map(cells, tmp_path, capsys):
    code, out, err = run_cli(capsys, "embed", "--checkpoint", "pixels:4", "--data", str(cells), "--out",
                             str(tmp_path / "e.h5ad"), "--image-size", "16", "--device", "cpu", "--plot")
    assert code == 0, err
    png = tmp_path / "e_map.png"
    assert png.stat().st_size > 0 and str(png) in out
    from PIL import Image

    w, h = Image.open(png).size
    assert w > 1.8 * h  # two panels side by side: by class, by folder


def test_embedding_2d_falls_back_to_tsne_without_umap(monkeypatch):
    import sys

    from cellssl.eval.report import embedding_2d

    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` now raises ImportError
    xy, method = embedding_2d(np.random.default_rng(0).normal(size=(30, 8)), seed=0)
    assert method == "t-SNE" and xy.shape == (30, 2)


def test_umap_2d_is_seeded():
    pytest.importorskip("umap")  # optional (pip install cellssl[bio]); slow to import (numba)
    from cellssl.eval.report import embedding_2d, umap_2d

    x = np.random.default_rng(0).normal(size=(40, 8))
    a, b = umap_2d(x, seed=3), umap_2d(x, seed=3)
    assert a.shape == (40, 2) and np.allclose(a, b)
    assert embedding_2d(x, seed=3)[1] == "UMAP"


# ---- 5. physical scale -------------------------------------------------------------------------
def _disk_image(size: int, radius: float, dark_on_bright: bool = True) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= radius**2
    img = np.where(disk, 0.2, 0.9) if dark_on_bright else np.where(disk, 0.8, 0.05)
    return np.repeat(img[:, :, None], 3, axis=2).astype(np.float32)


def test_scale_factor_and_resample_hand_computed():
    from cellssl.data.scale import resample_to_scale, scale_factor
    from cellssl.errors import ConfigError

    assert scale_factor(0.5, 0.25) == 2.0 and scale_factor(None, 0.25) == 1.0 and scale_factor(0.3, None) == 1.0
    with pytest.raises(ConfigError, match="> 0"):
        scale_factor(0.0, 0.25)
    img = np.zeros((8, 8, 1), np.float32)
    img[2:6, 2:6] = 1.0  # a 4x4 square in the middle
    half = resample_to_scale(img, 0.5)  # pixels twice as large in the model: content shrinks, padded
    assert half.shape == (8, 8, 1) and half.sum() == pytest.approx(4.0) and half[3:5, 3:5].min() == 1.0
    double = resample_to_scale(img, 2.0)  # centre crop of the enlarged image: the square fills it
    assert double.shape == (8, 8, 1) and double[1:7, 1:7].min() == 1.0 and double.mean() > 0.8
    assert resample_to_scale(img, 1.0) is img


@pytest.mark.parametrize("dark_on_bright", [True, False])
def test_object_diameter_of_a_disk(dark_on_bright):
    from cellssl.data.scale import object_diameter

    assert object_diameter(_disk_image(64, 10, dark_on_bright)) == pytest.approx(20.0, abs=1.0)
    assert np.isnan(object_diameter(np.ones((16, 16, 3), np.float32)))


def test_datasets_check_reports_the_apparent_cell_size(tmp_path, capsys):
    from PIL import Image

    for lab, radius in (("small", 8), ("large", 12)):
        d = tmp_path / lab / "cells"
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray((_disk_image(48, radius) * 255).astype(np.uint8)).save(d / f"c{i}.png")
    code, out, err = run_cli(capsys, "datasets", "check", str(tmp_path / "small"), "--um-per-px", "0.5")
    assert code == 0, err
    assert "apparent cell size" in out and "median 16.3 px = 8.1 µm at 0.5 µm/px" in out
    code, out, _ = run_cli(capsys, "datasets", "check", str(tmp_path / "large"))
    assert "median 23.9 px (give --um-per-px for µm)" in out  # 1.5x the small cells: the mismatch shows


def test_um_per_px_must_be_positive(tmp_path, capsys):
    from cellssl.config import load_recipe
    from cellssl.errors import ConfigError

    make_image_folder(tmp_path / "c", n_per_class=2, size=16, classes=("a",))
    for bad in ("0", "-0.3"):
        code, _, err = run_cli(capsys, "datasets", "check", str(tmp_path / "c"), "--um-per-px", bad)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--um-per-px" in err and "> 0" in err
        code, _, err = run_cli(capsys, "embed", "--checkpoint", "pixels:4", "--data", str(tmp_path / "c"), "--out",
                               str(tmp_path / "e.h5ad"), "--um-per-px", bad)
        assert code == 2 and "> 0" in err and not (tmp_path / "e.h5ad").exists()
    with pytest.raises(ConfigError, match="data.um_per_px"):
        load_recipe("blood_smear", ["data.um_per_px=0"])


def test_features_are_resampled_to_the_model_scale(tmp_path):
    from cellssl.data.scale import ScaleMatcher
    from cellssl.eval.features import FeatureExtractor

    folder = make_image_folder(tmp_path / "c", n_per_class=3, size=16, classes=("a", "b"))
    plain = FeatureExtractor("pixels:4", device="cpu", image_size=16, progress=False)
    scaled = FeatureExtractor("pixels:4", device="cpu", image_size=16, progress=False, um_per_px=0.25)
    plain.data_cfg.um_per_px = scaled.data_cfg.um_per_px = 0.5  # the model's (recipe's) scale
    ds, _ = scaled.build(folder)
    assert isinstance(ds.pre_transform, ScaleMatcher) and ds.pre_transform.factor == 0.5
    assert plain.build(folder)[0].pre_transform is None
    assert not np.allclose(plain.features(folder).features, scaled.features(folder).features)
    with pytest.warns(UserWarning, match="no data.um_per_px"):
        FeatureExtractor("pixels:4", device="cpu", image_size=16, progress=False, um_per_px=0.25).build(folder)


def test_transfer_report_needs_both_scales(tmp_path, capsys):
    code, _, err = run_cli(capsys, "transfer-report", "--checkpoint", f"random:{TINY_BACKBONE}", "--source",
                           str(tmp_path), "--target", str(tmp_path), "--out", str(tmp_path / "r"),
                           "--target-um-per-px", "0.5")
    assert code == 2 and "give both --source-um-per-px and --target-um-per-px" in err


def test_select_writes_the_pool_as_h5ad(cells, tmp_path, capsys):
    code, out, err = run_cli(capsys, "select", "--checkpoint", "pixels:4", "--data", str(cells), "--budget", "3",
                             "--no-map", "--image-size", "16", "--device", "cpu", "--format", "h5ad", "--out",
                             str(tmp_path / "sel"))
    assert code == 0, err
    ad = anndata.read_h5ad(tmp_path / "sel" / "embeddings.h5ad")
    z = np.load(tmp_path / "sel" / "embeddings.npz")
    np.testing.assert_array_equal(ad.obsm["X_cellssl"], z["features"])
    assert list(ad.obs["path"]) == list(z["paths"]) and set(ad.obs["height"]) == {16, 20}
    assert ad.uns["cellssl"]["checkpoint"] == "pixels:4"


def test_embed_um_per_px_is_recorded(cells, tmp_path, capsys):
    with pytest.warns(UserWarning, match="not resampled"):  # pixels: baselines have no recipe scale
        code, _, err = run_cli(capsys, "embed", "--checkpoint", "pixels:4", "--data", str(cells), "--out",
                               str(tmp_path / "e.h5ad"), "--image-size", "16", "--device", "cpu",
                               "--um-per-px", "0.35")
    assert code == 0, err
    info = anndata.read_h5ad(tmp_path / "e.h5ad").uns["cellssl"]
    assert info["um_per_px"] == 0.35 and "model_um_per_px" not in info
