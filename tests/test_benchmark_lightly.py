"""benchmarks/lightly_vicreg.py without lightly: its training loop with a stand-in lightly package
(same names and call shapes), the checkpoint it writes read back by cellssl's evaluation, and the
one-line errors when lightly or the images are missing."""

from __future__ import annotations

import argparse
import sys
import textwrap

import numpy as np
import pytest
import torch

from benchmarks import lightly_vicreg as lv
from cellssl.engine.checkpoint import load_backbone
from cellssl.eval.features import FeatureExtractor
from cellssl.models import build_backbone
from conftest import make_image_folder

STAND_IN = {
    "lightly/__init__.py": "",
    "lightly/loss.py": """
        import torch
        class VICRegLoss(torch.nn.Module):  # invariance term only: enough to move the weights
            def forward(self, a, b):
                return ((a - b) ** 2).mean() + (1 - a.std(0)).clamp(min=0).mean()
    """,
    "lightly/models/__init__.py": "",
    "lightly/models/modules.py": """
        import torch
        class BarlowTwinsProjectionHead(torch.nn.Sequential):
            def __init__(self, i, h, o):
                super().__init__(torch.nn.Linear(i, h), torch.nn.ReLU(), torch.nn.Linear(h, o))
    """,
    "lightly/transforms.py": """
        import numpy as np, torch
        class VICRegTransform:
            def __init__(self, input_size):
                self.size = input_size
            def __call__(self, im):
                x = torch.from_numpy(np.asarray(im.resize((self.size, self.size)), dtype=np.float32) / 255)
                x = x.permute(2, 0, 1)
                return [x, x.flip(-1)]
    """,
}


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    site = tmp_path / "site"
    for rel, text in STAND_IN.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(textwrap.dedent(text))
    for name in [m for m in sys.modules if m == "lightly" or m.startswith("lightly.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", list(sys.path))  # import_lightly prepends the site
    yield site
    for name in [m for m in sys.modules if m == "lightly" or m.startswith("lightly.")]:
        del sys.modules[name]


def test_the_loop_trains_for_its_minutes_and_writes_a_checkpoint_cellssl_evaluates(tmp_path, stand_in):
    data = make_image_folder(tmp_path / "cells", n_per_class=4, size=24)
    args = argparse.Namespace(lightly=str(stand_in), image_size=32, lr=0.1, momentum=0.9, weight_decay=0.0,
                              batch_size=4, workers=0, minutes=0.01, parts={"pretrain": data})
    ckpt, info = lv.train(0, args, tmp_path / "run")
    assert info["steps"] >= 1 and info["image_views"] == info["steps"] * 8 and info["views_per_s"] > 0
    assert info["minutes"] >= 0.01  # it trains until the budget is spent (then ends the step it is in)
    trained, meta = load_backbone(ckpt)
    torch.manual_seed(0)
    fresh = build_backbone(lv.eval_recipe(32).model, 3, 32)
    moved = [k for k, v in trained.state_dict().items() if v.is_floating_point()
             and not torch.equal(v, fresh.state_dict()[k])]
    assert moved, "training changed no weight"
    assert meta["config"]["data"]["mean"] == lv.IMAGENET["mean"] and meta["method"] == "lightly-vicreg"
    fs = FeatureExtractor(ckpt, device="cpu", progress=False).features(data)
    assert fs.features.shape == (12, trained.num_features) and np.isfinite(fs.features).all()


def test_without_lightly_it_says_how_to_install_it_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lightly", None)  # import lightly -> ImportError, wherever it is
    with pytest.raises(SystemExit) as exc:
        lv.import_lightly(str(tmp_path / "empty"))
    msg = str(exc.value)
    assert "\n" not in msg and "lightly is not importable from" in msg and "--install DIR" in msg


def test_a_folder_without_images_is_a_one_line_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(SystemExit, match=r"^error: no images under .*; pass --data"):
        lv.ImageFiles(tmp_path, transform=None)


def test_the_defaults_are_lightlys_example():
    a = lv.parse_args(["--minutes", "20"])
    assert (a.lr, a.momentum, a.batch_size, a.workers) == (0.06, 0.0, 128, 2)  # lightly's example
    assert lv.parse_args(["--cross-lab", "none"]).cross_lab is None


def test_its_recipe_builds_in_a_fresh_interpreter():
    """Nothing else imported first (as ``python -m benchmarks.lightly_vicreg`` runs): the methods are
    registered by the script itself before the recipe is read."""
    import subprocess

    from benchmarks.common import child_env

    code = ("from benchmarks.lightly_vicreg import eval_recipe; r = eval_recipe(64); "
            "assert r.method.name == 'vicreg' and r.data.mean == [0.485, 0.456, 0.406], r")
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
