"""``embed`` to ``.parquet`` / ``.h5ad`` and ``predict --format parquet`` on a set larger than
``--part-rows``: assembled from resumable parts one part at a time, the same file as one pass."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cellssl.apply.predict import predict
from cellssl.data.parts import Parts
from cellssl.eval import report as report_module
from cellssl.eval.tables import csv_to_parquet
from conftest import make_image_folder, make_plate_folder, run_cli

EMBED = ("--checkpoint", "pixels:4", "--image-size", "16", "--device", "cpu")


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    """14 cells: 6 red, 6 green and 2 larger ones in green/a_plate (a third folder, before green in path order)."""
    return make_plate_folder(tmp_path_factory.mktemp("parts"), "a_plate")


def embed_cli(capsys, data: Path, out: Path, *extra: str) -> str:
    code, stdout, err = run_cli(capsys, "embed", "--data", str(data), "--out", str(out), *EMBED, *extra)
    assert code == 0, err
    return stdout


def spy(monkeypatch, owner, name: str, rows) -> list:
    """Record ``rows(args)`` of every call of ``owner.name`` (still calling it)."""
    seen, original = [], getattr(owner, name)

    def wrapped(*args, **kwargs):
        seen.append(rows(args))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)
    return seen


def test_parquet_in_parts_is_the_one_pass_table_one_row_group_a_part(cells, tmp_path, capsys, monkeypatch):
    embed_cli(capsys, cells, tmp_path / "whole.parquet")
    written = spy(monkeypatch, pq.ParquetWriter, "write_table", lambda a: a[1].num_rows)
    saved = spy(monkeypatch, Parts, "save", lambda a: a[1])
    out = tmp_path / "emb.parquet"
    assert str(out) in embed_cli(capsys, cells, out, "--part-rows", "2")
    # 14 rows in parts of 2: each part computed once, written as its own row group, parts removed
    assert saved == list(range(7)) and written == [2] * 7 and pq.read_metadata(out).num_row_groups == 7
    assert not (tmp_path / "emb.parquet.parts").exists()
    whole, got = pd.read_parquet(tmp_path / "whole.parquet"), pd.read_parquet(out)
    assert got.columns.tolist() == ["path", "label", "folder", "lab", "height", "width", "channels", "features"]
    pd.testing.assert_frame_equal(got.drop(columns="features"), whole.drop(columns="features"))
    # part 0 holds only green/a_plate, part 1 only green: the parts still share the one-pass (sorted) categories
    assert got["folder"].unique().tolist() == ["green/a_plate", "green", "red"]
    assert got["folder"].cat.categories.tolist() == ["green", "green/a_plate", "red"]
    assert set(got["height"]) == {16, 20}
    np.testing.assert_array_equal(np.stack(got["features"]), np.stack(whole["features"]))
    meta = [json.loads(pq.read_schema(p).metadata[b"cellssl"]) for p in (out, tmp_path / "whole.parquet")]
    assert meta[0] == meta[1] and meta[0]["checkpoint"] == "pixels:4"


def test_h5ad_in_parts_is_the_one_pass_anndata_filled_a_part_at_a_time(cells, tmp_path, capsys, monkeypatch):
    embed_cli(capsys, cells, tmp_path / "whole.h5ad", "--lab", "lab A")
    filled = spy(monkeypatch, h5py.Dataset, "__setitem__", lambda a: np.shape(a[2]))
    out = tmp_path / "emb.h5ad"
    embed_cli(capsys, cells, out, "--lab", "lab A", "--part-rows", "4")
    assert filled == [(4, 48), (4, 48), (4, 48), (2, 48)]  # the features, never more than one part at once
    assert not (tmp_path / "emb.h5ad.parts").exists()
    whole, got = anndata.read_h5ad(tmp_path / "whole.h5ad"), anndata.read_h5ad(out)
    assert got.shape == whole.shape == (14, 0)
    pd.testing.assert_frame_equal(got.obs, whole.obs)
    assert got.obs.index.tolist() == [str(i) for i in range(14)] and set(got.obs["lab"]) == {"lab A"}
    assert got.obsm["X_cellssl"].dtype == np.float32
    np.testing.assert_array_equal(got.obsm["X_cellssl"], whole.obsm["X_cellssl"])
    assert got.uns["cellssl"] == whole.uns["cellssl"]
    # and the rows of the parted .npz, in the same order
    z = np.load(Path(embed_cli(capsys, cells, tmp_path / "e.npz", "--part-rows", "4").split()[-1]))
    assert z["paths"].tolist() == got.obs["path"].tolist()
    np.testing.assert_array_equal(z["features"], got.obsm["X_cellssl"])


def test_a_killed_parquet_embed_keeps_its_parts_and_the_rerun_finishes(cells, tmp_path, capsys, monkeypatch):
    original, saved = Parts.save, []

    def killed_in_part_3(parts, k, arrays):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(k)
        original(parts, k, arrays)

    monkeypatch.setattr(Parts, "save", killed_in_part_3)
    out = tmp_path / "emb.parquet"
    code, _, _ = run_cli(capsys, "embed", "--data", str(cells), "--out", str(out), *EMBED, "--part-rows", "4")
    assert code != 0 and not out.exists() and len(list((tmp_path / "emb.parquet.parts").glob("part-*.npz"))) == 2
    monkeypatch.setattr(Parts, "save", original)
    rerun = spy(monkeypatch, Parts, "save", lambda a: a[1])
    embed_cli(capsys, cells, out, "--part-rows", "4")
    assert rerun == [2, 3]
    embed_cli(capsys, cells, tmp_path / "whole.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(out).drop(columns="features"),
                                  pd.read_parquet(tmp_path / "whole.parquet").drop(columns="features"))


def test_the_map_of_a_parted_embed_draws_the_points_of_one_pass(cells, tmp_path, capsys, monkeypatch):
    drawn = []
    monkeypatch.setattr(report_module, "_quiet_embedding_2d",
                        lambda x, seed: (drawn.append(np.array(x)), (np.asarray(x)[:, :2], "t-SNE"))[1])
    monkeypatch.setattr(report_module, "plot_rows", lambda n, max_points=2000, seed=0:
                        np.sort(np.random.default_rng(seed).choice(n, size=min(n, 11), replace=False)))
    monkeypatch.setattr("cellssl.eval.tables.plot_rows", report_module.plot_rows)  # 11 of the 14 points
    embed_cli(capsys, cells, tmp_path / "whole.parquet", "--plot")
    embed_cli(capsys, cells, tmp_path / "emb.parquet", "--plot", "--part-rows", "4")
    assert (tmp_path / "emb_map.png").stat().st_size > 0
    assert len(drawn) == 2 and drawn[0].shape == (11, 48)
    np.testing.assert_array_equal(drawn[1], drawn[0])


def test_predict_parquet_in_parts_is_the_one_pass_table(classifier, tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "cells", n_per_class=10, size=20, seed=4)
    (data / "red" / "broken.png").write_bytes(b"not a png")  # a row without a prediction: NaN, unsure
    opts = {"device": "cpu", "progress": False, "batch_size": 7, "sheet": 0, "fmt": "parquet"}
    whole = predict(classifier, data, tmp_path / "whole", **opts)
    written = spy(monkeypatch, pq.ParquetWriter, "write_table", lambda a: a[1].num_rows)
    got = predict(classifier, data, tmp_path / "parts", part_rows=7, **opts)
    assert written == [7, 7, 7, 7, 3]  # 31 rows, one row group a part, never the whole table
    table = Path(got["files"]["parquet"])
    assert table == tmp_path / "parts" / "predictions.parquet" and pq.read_metadata(table).num_row_groups == 5
    df = pd.read_parquet(table)
    pd.testing.assert_frame_equal(df, pd.read_parquet(whole["files"]["parquet"]))
    # the typed CSV, and what the earlier one-piece conversion of the CSV gives
    pd.testing.assert_frame_equal(df, pd.read_parquet(csv_to_parquet(tmp_path / "parts" / "predictions.csv",
                                                                      tmp_path / "conv.parquet")))
    assert df["probability"].dtype == np.float64 and df["unsure"].dtype == bool and len(df) == 31
    broken = df[df["path"].str.endswith("broken.png")].iloc[0]
    assert np.isnan(broken["probability"]) and broken["unsure"] and broken["predicted"] == ""
    assert "predictions.parquet" in (tmp_path / "parts" / "report.md").read_text()
    # csv: no table
    csv_only = predict(classifier, data, tmp_path / "csv", **{**opts, "fmt": "csv"})
    assert "parquet" not in csv_only["files"] and not (tmp_path / "csv" / "predictions.parquet").exists()
