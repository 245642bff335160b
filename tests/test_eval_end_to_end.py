"""End-to-end evaluation commands on a few dozen small PNGs, random and checkpointed backbones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellssl.config import Recipe, recipe_to_dict
from cellssl.engine.checkpoint import FORMAT, load_backbone
from cellssl.errors import CellSSLError, CheckpointError, DataError
from cellssl.eval.features import embed, load_features
from cellssl.eval.fewshot import fewshot
from cellssl.eval.finetune import finetune
from cellssl.eval.knn import knn, online_knn_accuracy
from cellssl.eval.linear import linear
from cellssl.eval.report import format_summary
from conftest import TINY_BACKBONE, TINY_FEATURES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
_RANDOM = f"random:{TINY_BACKBONE}"  # a random-init backbone: any features separate colour classes
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_folder(root: Path, n_per: int = 12, size: int = 40, seed: int = 0, classes=tuple(COLOURS)) -> Path:
    """Colour-coded classes of noisy ``size`` px PNGs: one sub-folder per class."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per):
            img = np.array(COLOURS[c])[None, None, :] + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / c / f"{i:03d}.png")
    return root


def make_checkpoint(path: Path, backbone: str = TINY_BACKBONE, image_size: int = 32) -> Path:
    """A tiny checkpoint in the training format of engine/checkpoint.py."""
    recipe = Recipe()
    recipe.model.backbone = backbone
    recipe.data.image_size = image_size
    net, _ = load_backbone(f"random:{backbone}", in_chans=3, image_size=image_size)
    with torch.no_grad():  # differ from the random init so the test notices which weights were used
        for p in net.parameters():
            p.mul_(0.5)
    torch.save({
        "format": FORMAT, "config": recipe_to_dict(recipe), "in_chans": 3, "method": "msbreg", "step": 0,
        "model": {"backbone." + k: v for k, v in net.state_dict().items()},
    }, path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("cells") / "data")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def test_random_and_checkpoint_share_path(folder, ckpt):
    fr = load_features(_RANDOM, folder, image_size=32, device="cpu", progress=False)
    fc = load_features(ckpt, folder, device="cpu", progress=False)
    assert fr.features.shape == fc.features.shape == (36, TINY_FEATURES)
    assert fr.features.dtype == np.float32 and np.isfinite(fc.features).all()
    assert fr.classes == fc.classes == ["blue", "green", "red"]
    assert fr.paths[0] == "blue/000.png" and fr.labels.tolist() == fc.labels.tolist()
    assert fc.info["image_size"] == 32 and fc.info["method"] == "msbreg"
    assert fr.info["method"] == "random"
    assert not np.allclose(fr.features, fc.features)  # the checkpoint's weights were used
    # image_size override of a checkpoint
    f48 = load_features(ckpt, folder, image_size=48, device="cpu", progress=False, max_per_class=2)
    assert f48.features.shape == (6, TINY_FEATURES) and f48.info["image_size"] == 48


def test_checkpoint_channel_mismatch(tmp_path, ckpt):
    gray = tmp_path / "gray" / "a"
    gray.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 20), 100 + i, np.uint8)).save(gray / f"{i}.png")
    (tmp_path / "gray" / "b").mkdir()
    Image.fromarray(np.full((20, 20), 7, np.uint8)).save(tmp_path / "gray" / "b" / "0.png")
    with pytest.raises(CheckpointError, match="3-channel"):
        load_features(ckpt, tmp_path / "gray", device="cpu", progress=False)
    # the random baseline adapts to the folder's channels
    fs = load_features(_RANDOM, tmp_path / "gray", image_size=16, device="cpu", progress=False)
    assert fs.features.shape == (4, TINY_FEATURES) and fs.info["in_chans"] == 1


def test_fewshot_linear_knn_commands(folder, ckpt, tmp_path):
    r = fewshot(ckpt, folder, tmp_path / "fs" / "report.json", shots=(1, 5), queries=5, episodes=40, device="cpu")
    assert set(r["results"]) == {"1", "5"} and r["results"]["5"]["mean"] > 0.6
    assert {"mean", "ci95", "per_class_accuracy"} <= set(r["results"]["1"])
    for name in ("report.json", "report.md", "shots.png", "embedding.png"):
        assert (tmp_path / "fs" / name).is_file(), name
    assert format_summary(r).splitlines()[-1].endswith("report.md")

    keys = {"accuracy", "balanced_accuracy", "macro_f1", "confusion_matrix", "per_class_accuracy"}
    r = linear(_RANDOM, folder, None, tmp_path / "lin" / "linear.json", split=0.3, image_size=32,
               device="cpu")
    assert keys <= set(r) and "C" in r and r["accuracy"] > 0.6
    for name in ("linear.json", "linear.md", "linear_confusion.png", "linear_embedding.png"):
        assert (tmp_path / "lin" / name).is_file(), name

    test_dir = make_folder(tmp_path / "test", n_per=4, seed=1)
    r = knn(ckpt, folder, test_dir, tmp_path / "knn" / "report.json", k=5, device="cpu", plots=False)
    assert keys <= set(r) and r["settings"]["n_test"] == 12 and r["accuracy"] > 0.6
    saved = json.loads((tmp_path / "knn" / "report.json").read_text())
    assert keys <= set(saved) and (tmp_path / "knn" / "report.md").is_file()

    with pytest.raises(DataError, match="--split"):
        linear(ckpt, folder, None, tmp_path / "x.json", device="cpu")


def test_embed_npz(folder, tmp_path):
    out = embed(_RANDOM, folder, tmp_path / "emb.npz", image_size=32, device="cpu", max_per_class=3)
    z = np.load(out)
    assert z["features"].shape == (9, TINY_FEATURES) and z["features"].dtype == np.float32
    assert z["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert list(z["classes"]) == ["blue", "green", "red"] and str(z["paths"][0]).startswith("blue/")


def test_finetune_low_label(folder, ckpt, tmp_path):
    r = finetune(ckpt, folder, tmp_path / "ft", split=0.3, labels_per_class=2, epochs=2, batch_size=8,
                 device="cpu", progress=False)
    assert r["settings"]["n_train"] == 6 and len(r["history"]) <= 2 and r["best_epoch"] in (1, 2)
    assert {"train_loss", "val_accuracy"} <= set(r["history"][0])
    assert {"accuracy", "balanced_accuracy", "macro_f1", "confusion_matrix"} <= set(r["test"])
    for name in ("best.pt", "report.json", "report.md", "confusion.png"):
        assert (tmp_path / "ft" / name).is_file(), name
    state = torch.load(tmp_path / "ft" / "best.pt", weights_only=True)
    assert state["classes"] == ["blue", "green", "red"] and "head.weight" in state["model"]
    # the fine-tuned backbone loads like any checkpoint
    net, info = load_backbone(tmp_path / "ft" / "best.pt")
    assert info["method"] == "finetune"
    with pytest.raises(DataError, match="'blue' has only"):
        finetune(ckpt, folder, tmp_path / "ft2", labels_per_class=50, epochs=1, device="cpu", progress=False)


def test_finetune_frozen_head_learns(folder, tmp_path):
    r = finetune(_RANDOM, folder, tmp_path / "ftf", freeze_backbone=True, epochs=3, lr=1e-2,
                 image_size=32, batch_size=16, device="cpu", progress=False, val_fraction=0.3)
    assert r["settings"]["backbone_lr"] is None and "validation" in r and "test" not in r


def test_online_knn_monitor(folder):
    from cellssl.augment.views import build_eval_transform
    from cellssl.config import DataConfig
    from cellssl.data.datasets import build_dataset

    cfg = DataConfig(image_size=32)
    ds = build_dataset(cfg, folder, labelled=True)
    net, _ = load_backbone(_RANDOM, in_chans=3, image_size=32)
    net.train()
    acc = online_knn_accuracy(net, ds, build_eval_transform(cfg, ds.channels), "cpu", k=5, max_images=30)
    assert 0.6 < acc <= 1.0


@pytest.mark.skipif(not (SHARED / "pbc128").is_dir(), reason=f"shared data {SHARED / 'pbc128'} not present")
def test_pbc_features_smoke():
    fs = load_features(_RANDOM, SHARED / "pbc128", image_size=32, device="cpu", max_per_class=2,
                       progress=False)
    assert fs.features.shape == (16, TINY_FEATURES) and len(fs.classes) == 8


def test_load_features_with_adabn(folder, ckpt, tmp_path):
    target = make_folder(tmp_path / "target", n_per=4, seed=2, classes=("red", "blue"))
    plain = load_features(ckpt, folder, device="cpu", progress=False, max_per_class=3)
    adapted = load_features(ckpt, folder, device="cpu", progress=False, max_per_class=3, adapt_bn=target)
    assert adapted.features.shape == plain.features.shape and not np.allclose(adapted.features, plain.features)
    assert adapted.info["adapt_bn"] == str(target)


def test_raw_pixel_baseline_spec(tmp_path):
    """``pixels:<side>`` goes through the same evaluation path: features are the area-averaged
    image (C·side·side values) and separate colour-coded classes."""
    folder = make_folder(tmp_path / "cells", n_per=10)
    fs = load_features("pixels:4", folder, image_size=16, device="cpu", progress=False)
    assert fs.features.shape == (30, 3 * 4 * 4) and fs.info["method"] == "raw pixels"
    r = linear("pixels:4", folder, None, tmp_path / "lin" / "linear.json", split=0.3, image_size=16, device="cpu")
    assert r["accuracy"] > 0.6
    assert "raw pixels" in (tmp_path / "lin" / "linear.md").read_text()
    with pytest.raises(CellSSLError, match="pixels:16"):
        load_features("pixels:abc", folder, image_size=16, device="cpu", progress=False)


def test_demo_report_compares_with_random_init_and_raw_pixels(tmp_path, quick_maps):
    from cellssl.config import load_recipe
    from cellssl.demo import run_demo

    recipe = load_recipe("cpu_demo", ["train.max_steps=3", "data.synth_n=96", "data.image_size=16",
                                      "train.batch_size=16", "data.num_workers=0", "train.progress=false",
                                      "eval.episodes=20", "eval.shots=[1]", "model.proj_hidden=32",
                                      "model.pred_hidden=32", "model.proj_dim=16", f"model.backbone={TINY_BACKBONE}",
                                      "model.stem=default"])
    report = run_demo(recipe, tmp_path / "demo").read_text()
    assert "cellssl MSBReg" in report and f"random-init {TINY_BACKBONE}" in report and "raw pixels" in report
    assert (tmp_path / "demo" / "pixels" / "linear.md").is_file()
