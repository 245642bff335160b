"""build_dataset layouts, broken-file handling, MultiViewDataset and split_indices."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from cellssl.augment.views import build_view_transform
from cellssl.config import DataConfig, ViewsConfig
from cellssl.data.datasets import DataWarning, ImageDataset, MultiViewDataset, build_dataset, split_indices
from cellssl.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _png(path: Path, value: int, size: int = 16, gray: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size) if gray else (size, size, 3), value, np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _labelled(root: Path, per_class: int = 3) -> Path:
    for k, cls in enumerate(["b_cls", "a_cls"]):
        for i in range(per_class):
            _png(root / cls / f"{i}.png", 40 * k + i)
    return root


def test_labelled_folder(tmp_path: Path) -> None:
    ds = build_dataset(DataConfig(), _labelled(tmp_path / "d"))
    assert ds.labelled and ds.classes == ["a_cls", "b_cls"] and ds.channels == 3
    assert len(ds) == 6 and list(ds.labels) == [0, 0, 0, 1, 1, 1]
    img, y = ds[4]
    assert img.shape == (16, 16, 3) and img.dtype == np.float32 and y == 1
    assert img[0, 0, 0] == pytest.approx(1 / 255.0)  # b_cls/1.png has value 40*0+1
    assert ds.paths[4].name == "1.png"


def test_labelled_false_and_nested_unlabelled(tmp_path: Path) -> None:
    root = _labelled(tmp_path / "d")
    ds = build_dataset(DataConfig(), root, labelled=False)
    assert not ds.labelled and ds.classes == [] and (ds.labels == -1).all() and len(ds) == 6
    flat = tmp_path / "flat"
    _png(flat / "x.png", 1)
    _png(flat / "deep" / "er" / "y.png", 2)
    ds2 = build_dataset(DataConfig(path=str(flat)))
    assert not ds2.labelled and len(ds2) == 2


def test_transform_is_applied(tmp_path: Path) -> None:
    ds = build_dataset(DataConfig(), _labelled(tmp_path / "d"), transform=lambda a: a.shape)
    assert ds[0] == ((16, 16, 3), 0)


def test_empty_and_missing_paths(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match=f"no images found in {empty}"):
        build_dataset(DataConfig(), empty)
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        build_dataset(DataConfig(path=str(missing)))


def test_channel_detection_and_override(tmp_path: Path) -> None:
    root = tmp_path / "g"
    _png(root / "a.png", 9, gray=True)
    _png(root / "b.png", 9, gray=True)
    assert build_dataset(DataConfig(), root).channels == 1
    forced = build_dataset(DataConfig(channels=3), root)
    assert forced.channels == 3 and forced[0][0].shape == (16, 16, 3)
    tif = tmp_path / "t"
    tif.mkdir()
    tifffile.imwrite(tif / "a.tif", np.zeros((4, 12, 12), np.uint16), photometric="minisblack")
    assert build_dataset(DataConfig(modality="fluorescence"), tif).channels == 4


def test_broken_file_is_skipped_with_warning(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for i in range(5):
        _png(root / f"{i}.png", 10 * i)
    bad = root / "2.png"
    bad.write_text("not an image")
    with pytest.warns(DataWarning, match=str(bad)):  # at build (the channel probe reads it) or at first use
        ds = build_dataset(DataConfig(), root)
        img, _ = ds[2]
    assert img[0, 0, 0] == pytest.approx(30 / 255.0)  # replaced by the next index, deterministically
    assert ds.bad_files == {bad}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file only
        again, _ = ds[2]
    assert again[0, 0, 0] == pytest.approx(30 / 255.0)
    assert len(ds.bad_files) == 1


def test_mostly_broken_dataset_raises(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for i in range(10):
        p = _png(root / f"{i}.png", i)
        if i % 3 != 0:  # 6 of 10 unreadable, readable files first so build works
            p.write_bytes(b"")
    with pytest.raises(DataError, match="unreadable"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        ds = build_dataset(DataConfig(max_bad_fraction=0.5), root)  # the channel probe may already stop it
        for i in range(len(ds)):
            ds[i]


def test_all_broken_fails_at_build(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for i in range(3):
        (root).mkdir(exist_ok=True)
        (root / f"{i}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match=str(root)), warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        build_dataset(DataConfig(), root)


def test_csv_manifest(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "a.png", 1)
    _png(tmp_path / "imgs" / "b.png", 2)
    _png(tmp_path / "imgs" / "c.png", 3)
    man = tmp_path / "m.csv"
    man.write_text("path,label\nimgs/a.png,tumour\nimgs/b.png,normal\nimgs/c.png,tumour\n")
    ds = build_dataset(DataConfig(), man)
    assert ds.classes == ["normal", "tumour"] and list(ds.labels) == [1, 0, 1]
    assert ds[1][0][0, 0, 0] == pytest.approx(2 / 255.0)
    nolab = tmp_path / "n.csv"
    nolab.write_text("imgs/a.png\nimgs/c.png\n")
    ds2 = build_dataset(DataConfig(), nolab)
    assert not ds2.labelled and len(ds2) == 2


def test_csv_manifest_blank_labels(tmp_path: Path) -> None:
    """A partly filled manifest (e.g. select's to_label.csv): labelled use keeps the labelled rows
    with a warning; auto mode keeps every row (blank = -1); an unfilled one is unlabelled."""
    for i, v in enumerate((1, 2, 3)):
        _png(tmp_path / "imgs" / f"{i}.png", v)
    part = tmp_path / "part.csv"
    part.write_text("path,label,row\nimgs/0.png,b,1\nimgs/1.png,,2\nimgs/2.png,a,3\n")
    with pytest.warns(DataWarning, match="1 of 3 rows have no label"):
        ds = build_dataset(DataConfig(), part, labelled=True)
    assert ds.classes == ["a", "b"] and list(ds.labels) == [1, 0] and ds.paths[1].name == "2.png"
    auto = build_dataset(DataConfig(), part)
    assert list(auto.labels) == [1, -1, 0]
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\nimgs/0.png,\nimgs/1.png,\n")
    assert not build_dataset(DataConfig(), empty).labelled
    with pytest.raises(DataError, match="no labels yet: fill in its label column"):
        build_dataset(DataConfig(), empty, labelled=True)


def test_npz_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f = tmp_path / "bloodmnist.npz"
    np.savez(
        f,
        train_images=rng.integers(0, 255, (10, 28, 28, 3), dtype=np.uint8),
        train_labels=np.arange(10).reshape(10, 1) % 8,
        test_images=rng.integers(0, 255, (4, 28, 28, 3), dtype=np.uint8),
        test_labels=np.array([[1], [2], [3], [7]]),
    )
    ds = build_dataset(DataConfig(), f)
    assert len(ds) == 10 and ds.channels == 3 and ds.classes[3] == "ig"
    img, y = ds[9]
    assert img.shape == (28, 28, 3) and y == 1
    test = build_dataset(DataConfig(), f"{f}:test")
    assert list(test.labels) == [1, 2, 3, 7]
    with pytest.raises(DataError, match="no split 'val'"):
        build_dataset(DataConfig(), f"{f}:val")
    gray = tmp_path / "g.npz"
    np.savez(gray, train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.zeros((3, 1)))
    assert build_dataset(DataConfig(), gray).channels == 1


def test_dataset_percentile_scope(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    tifffile.imwrite(root / "dim.tif", np.full((8, 8), 100, np.uint16) + np.eye(8, dtype=np.uint16))
    tifffile.imwrite(root / "bright.tif", np.full((8, 8), 1000, np.uint16) + np.eye(8, dtype=np.uint16))
    per_image = build_dataset(DataConfig(modality="fluorescence"), root)
    scoped = build_dataset(DataConfig(modality="fluorescence", percentile_scope="dataset", percentiles=[0, 100]), root)
    # per image both look the same; with one dataset-wide range the bright image stays brighter
    assert per_image[0][0].mean() == pytest.approx(per_image[1][0].mean())
    assert scoped[0][0].mean() > 0.8 > 0.2 > scoped[1][0].mean()


def test_stain_hook_applied_before_transform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cellssl.data.stain

    monkeypatch.setattr(cellssl.data.stain, "build_stain_normalizer",
                        lambda method, reference: (lambda img: np.ones_like(img)))
    ds = build_dataset(DataConfig(stain_normalize="reinhard"), _labelled(tmp_path / "d"),
                       transform=lambda a: float(a.mean()))
    assert ds[0][0] == 1.0


def test_multiview_dataset_and_loader(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for i in range(6):
        _png(root / ("x" if i % 2 else "y") / f"{i}.png", 20 * i, size=40)
    data = DataConfig(image_size=32)
    ds = build_dataset(data, root)
    views = ViewsConfig(n_views=3, local_views=2, local_size=16)
    mv = MultiViewDataset(ds, build_view_transform(views, data, ds.channels, seed=0))
    item = mv[3]
    assert item["views"].shape == (3, 3, 32, 32) and item["views"].dtype == torch.float32
    assert item["local"].shape == (2, 3, 16, 16)
    assert item["index"] == 3 and item["label"] == ds.labels[3]
    batch = next(iter(torch.utils.data.DataLoader(mv, batch_size=4)))
    assert batch["views"].shape == (4, 3, 3, 32, 32) and batch["label"].shape == (4,)
    no_local = MultiViewDataset(ds, build_view_transform(ViewsConfig(), data, ds.channels))
    assert "local" not in no_local[0]


def test_workers_do_not_repeat_augmentations(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for i in range(4):
        _png(root / f"{i}.png", 128, size=32)
    for i in range(4):  # identical images: any difference comes from the augmentation
        arr = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i}.png")
    data = DataConfig(image_size=16)
    ds = build_dataset(data, root)
    mv = MultiViewDataset(ds, build_view_transform(ViewsConfig(), data, 3, seed=0))
    loader = torch.utils.data.DataLoader(mv, batch_size=1, num_workers=2)
    views = [b["views"][0, 0] for b in loader]
    assert not torch.equal(views[0], views[1])  # first items of worker 0 and worker 1


def test_split_indices_stratified() -> None:
    labels = np.repeat(np.arange(3), [10, 20, 30])
    train, test = split_indices(labels, (0.8, 0.2), seed=1)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 60
    assert np.bincount(labels[test]).tolist() == [2, 4, 6]
    again = split_indices(labels, (0.8, 0.2), seed=1)
    assert np.array_equal(again[0], train)
    other = split_indices(labels, (0.8, 0.2), seed=2)
    assert not np.array_equal(other[0], train)
    parts = split_indices(labels, (1, 1, 2), stratified=False)
    assert [len(p) for p in parts] == [15, 15, 30]


def test_synthetic_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLSSL_CACHE", str(tmp_path))
    ds = build_dataset(DataConfig(path=None, synth_n=24, synth_seed=3))
    assert ds.labelled and len(ds) == 24 and ds.channels == 3 and len(ds.classes) == 6
    assert ds.root == tmp_path / "synth-24-3"
    assert ds[0][0].shape == (64, 64, 3)


def test_real_pbc_folder() -> None:
    root = SHARED / "pbc128"
    if not root.is_dir():
        pytest.skip(f"shared data not present at {root} (real-data test)")
    ds = build_dataset(DataConfig(), root)
    assert len(ds) == 13674 and len(ds.classes) == 8 and ds.channels == 3
    assert isinstance(ds, ImageDataset)
    img, y = ds[100]
    assert img.shape == (128, 128, 3) and 0 <= y < 8
