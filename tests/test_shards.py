"""Shards (``cellssl datasets shard``): lossless round trip, training and embedding from shards,
bad shards named and refused or skipped."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import webdataset as wds

from cellssl.cli import main
from cellssl.config import DataConfig, load_recipe
from cellssl.data.datasets import ShardDataset, TransformedDataset, build_dataset
from cellssl.data.io import read_raw_image
from cellssl.data.shards import CELLS_NAME, INDEX_NAME, ShardReader, sha256_file, write_shards
from cellssl.engine.checkpoint import load_checkpoint
from cellssl.engine.fit import fit
from cellssl.errors import DataError
from cellssl.eval.features import embed
from conftest import make_image_folder, tiny_recipe_yaml


def shard(src: Path, out: Path, size: int) -> dict:
    return write_shards(build_dataset(DataConfig(), src), out, size)


def tiff_folder(root: Path, channels: int, n: int = 5, dtype=np.uint16) -> dict[str, np.ndarray]:
    """Two class folders of random full-range TIFF cells (H, W, C); returns {relative path: pixels}."""
    rng = np.random.default_rng(channels)
    cells = {}
    for k in range(n):
        rel = f"{'ab'[k % 2]}/cell_{k}.tif"
        arr = rng.integers(0, np.iinfo(dtype).max, size=(12 + k, 16, channels), dtype=dtype, endpoint=True)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if channels == 1:
            tifffile.imwrite(root / rel, arr[:, :, 0])
        else:
            tifffile.imwrite(root / rel, arr, photometric="minisblack", planarconfig="contig")
        cells[rel] = arr
    return cells


@pytest.mark.parametrize("channels", [1, 5])
def test_16bit_and_multichannel_cells_survive_bit_for_bit(tmp_path, channels):
    cells = tiff_folder(tmp_path / "src", channels)
    index = shard(tmp_path / "src", tmp_path / "sh", 2)
    assert index["count"] == 5 and [s["count"] for s in index["shards"]] == [2, 2, 1]
    assert index["classes"] == ["a", "b"] and index["channels"] == [channels] and index["dtypes"] == ["uint16"]
    for s in index["shards"]:
        assert sha256_file(tmp_path / "sh" / s["name"]) == s["sha256"]
    reader = ShardReader(tmp_path / "sh")
    for i, rel in enumerate(reader.paths):
        got = reader.raw(i)
        assert got.dtype == np.uint16 and np.array_equal(got, cells[rel]), rel
        assert reader.labels[i] == "ab".index(rel[0])
    # any WebDataset pipeline reads the same shards (plain tars: <key>.npy + <key>.json)
    meta = list(reader.iter_meta())
    assert [m["path"] for m in meta] == reader.paths and {m["channels"] for m in meta} == {channels}
    first = next(iter(wds.WebDataset(str(tmp_path / "sh" / index["shards"][0]["name"]), shardshuffle=False).decode()))
    assert np.array_equal(first["npy"].reshape(cells[reader.paths[0]].shape), cells[reader.paths[0]])


def test_rgb_folder_round_trip_and_dataset_matches_the_folder(tmp_path):
    src = make_image_folder(tmp_path / "src", n_per_class=3, size=16)
    shard(src, tmp_path / "sh", 4)
    folder, shards = build_dataset(DataConfig(), src), build_dataset(DataConfig(), tmp_path / "sh")
    assert isinstance(shards, ShardDataset) and len(shards) == len(folder) == 9
    assert shards.classes == folder.classes and shards.channels == 3
    assert np.array_equal(shards.labels, folder.labels)
    assert [str(p.relative_to(tmp_path / "sh")) for p, _ in shards.samples] == \
        [str(p.relative_to(src)) for p, _ in folder.samples]
    for i in range(len(folder)):
        assert np.array_equal(shards.raw(i), read_raw_image(folder.samples[i][0]))
        assert np.array_equal(shards.load(i)[0], folder.load(i)[0])


def test_cli_shard_and_its_one_line_refusals(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src", n_per_class=2, size=16)
    main(["datasets", "shard", str(src), str(tmp_path / "sh"), "--shard-size", "4"])
    assert "wrote 6 cells in 2 shard(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["datasets", "check", str(tmp_path / "sh")])
    assert exc.value.code == 0 and "6 cells in 2 shard(s), 3 classes" in capsys.readouterr().out
    for args, said in (([str(tmp_path / "sh")], "already exists: nothing is overwritten"),
                       ([str(tmp_path / "x"), "--shard-size", "0"], "--shard-size")):
        with pytest.raises(SystemExit) as exc:
            main(["datasets", "shard", str(src), *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and said in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_pretrain_from_shards_equals_the_folder_and_embed_reads_shards(tmp_path):
    src = make_image_folder(tmp_path / "src", n_per_class=6, size=16)
    shard(src, tmp_path / "sh", 5)
    weights = []
    for name, data in (("folder", src), ("shards", tmp_path / "sh")):
        r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=3, batch_size=4, checkpoint_every=3)),
                        [f"data.path={data}", f"train.out={tmp_path / name}"])
        res = fit(r)
        assert res.step == 3
        weights.append(load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")["model"])
    # same cells in the same order: the same sampler, views and weights, bit for bit (so the
    # folder path's exact resume carries over; a forked worker reading shards: the next test)
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
    ckpt = tmp_path / "shards" / "checkpoints" / "last.pt"
    a = np.load(embed(ckpt, src, tmp_path / "a.npz", image_size=16, batch_size=8, device="cpu"))
    b = np.load(embed(ckpt, tmp_path / "sh", tmp_path / "b.npz", image_size=16, batch_size=8, device="cpu"))
    assert list(a["paths"]) == list(b["paths"]) and "red/red_000.png" in list(b["paths"])
    assert np.array_equal(a["labels"], b["labels"])
    np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-6)


def test_forked_loader_workers_read_shards_in_any_order(tmp_path):
    """pread has no shared file position: workers forked after the parent opened a shard read the
    right cells (a seek + read on a shared descriptor would mix them up)."""
    src = make_image_folder(tmp_path / "src", n_per_class=4, size=16)
    shard(src, tmp_path / "sh", 3)
    ds = build_dataset(DataConfig(), tmp_path / "sh")
    expected = [ds.load(i)[0] for i in range(len(ds))]  # the parent holds open shard files now
    order = list(np.random.default_rng(0).permutation(len(ds)))
    data = TransformedDataset(ds, torch.from_numpy, order)
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, timeout=60,
                                         multiprocessing_context="fork")
    got = torch.cat([x for x, _ in loader])
    for k, i in enumerate(order):
        assert np.array_equal(got[k].numpy(), expected[i])


@pytest.fixture
def shards(tmp_path) -> Path:
    src = make_image_folder(tmp_path / "src", n_per_class=2, size=16)
    shard(src, tmp_path / "sh", 3)
    return tmp_path / "sh"


def test_truncated_shard_is_refused_by_name(shards):
    tar = shards / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:1500])
    with pytest.raises(DataError, match=r"shard .*shard-000001\.tar is truncated or altered \(1500 of \d+ bytes\)"):
        build_dataset(DataConfig(), shards)


def test_missing_index_is_one_line(shards):
    (shards / INDEX_NAME).unlink()
    with pytest.raises(DataError, match=r"holds \.tar shards but no index\.json: re-create it with 'cellssl datasets"):
        build_dataset(DataConfig(), shards)
    (shards / INDEX_NAME).write_text("{not json")
    with pytest.raises(DataError, match=r"cannot read shard index .*index\.json"):
        build_dataset(DataConfig(), shards)


def test_missing_cell_table_is_one_line(shards):
    (shards / CELLS_NAME).unlink()
    with pytest.raises(DataError, match=r"cannot read .*cells\.npy"):
        build_dataset(DataConfig(), shards)


def test_corrupt_member_is_named_and_skipped(shards, capsys):
    reader = ShardReader(shards)
    rec = reader.cells[4]
    tar = shards / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[int(rec["offset"]):int(rec["offset"]) + 8] = b"garbage!"  # same size: only the checksum knows
    tar.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:  # the channel probe may meet it first: one warning
        warnings.simplefilter("always")
        ds = build_dataset(DataConfig(max_bad_fraction=0.5), shards)
        img, label = ds.load(4)
    assert np.array_equal(img, ds.load(5)[0]) and label == ds.labels[5]
    msg = [str(w.message) for w in caught]
    assert sum("shard-000001.tar:000000004.npy" in m and "corrupt shard member" in m for m in msg) == 1, msg
    # datasets check reads every shard against its sha256 and names the damaged one (exit 1)
    with pytest.raises(SystemExit) as exc:
        main(["datasets", "check", str(shards)])
    out = capsys.readouterr().out
    assert exc.value.code == 1 and "1 shard(s) damaged" in out
    assert "shard-000001.tar does not match its sha256" in out and "shard-000000.tar" not in out
