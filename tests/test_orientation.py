"""Orientation-averaged features (``eval.tta``, ``--tta``): the mean over D4 is invariant to the
rotations and flips of a cell, the plain features are not, and every command that reads features
(the probes, a saved classifier, predict) computes them the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellssl.apply.model import load_predictor
from cellssl.config import Recipe
from cellssl.errors import ConfigError
from cellssl.eval.features import FeatureExtractor, feature_source, source_mismatch
from cellssl.eval.linear import linear
from cellssl.models.orientation import D4_SIZE, dihedral, orientation_mean, resolve_tta
from conftest import TINY_BACKBONE, make_image_folder, run_cli


def _key(x: torch.Tensor) -> bytes:
    return x.contiguous().numpy().tobytes()


def test_dihedral_is_the_group_of_eight():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)  # no symmetry of its own
    orbit = [dihedral(x, k) for k in range(D4_SIZE)]
    assert torch.equal(orbit[0], x)
    for k in range(4):  # quarter turns as torch.rot90 makes them (the export writes them without it)
        assert torch.equal(orbit[k], torch.rot90(x, k, (2, 3)))
        assert torch.equal(orbit[k + 4], torch.flip(torch.rot90(x, k, (2, 3)), (3,)))
    assert len({_key(o) for o in orbit}) == 8
    # the orbit of a turned or mirrored image is the same set of 8 (closed under the group)
    for g in (torch.rot90(x, 1, (2, 3)), torch.flip(x, (2,)), torch.flip(x, (3,))):
        assert {_key(dihedral(g, k)) for k in range(D4_SIZE)} == {_key(o) for o in orbit}
    with pytest.raises(ValueError, match="not in 0..7"):
        dihedral(x, 8)


def test_orientation_mean_is_invariant_and_the_plain_features_are_not():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2),
                              torch.nn.Flatten())  # position-sensitive: its plain features change with a turn
    x = torch.randn(4, 3, 11, 11)
    turned, mirrored = torch.rot90(x, 1, (2, 3)), torch.flip(x, (2,))
    assert not torch.allclose(net(x), net(turned), atol=1e-3)
    f = orientation_mean(net, x, "dihedral")
    assert f.shape == (4, 8 * 4 * 4)
    assert torch.allclose(orientation_mean(net, turned, "dihedral"), f, atol=1e-5)
    assert torch.allclose(orientation_mean(net, mirrored, "dihedral"), f, atol=1e-5)
    assert torch.equal(orientation_mean(net, x, "none"), net(x))
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        orientation_mean(net, x, "auto")


def test_auto_follows_the_views_the_model_was_trained_with():
    recipe = Recipe()
    assert recipe.eval.tta == "auto" and recipe.views.rotate and recipe.views.flip
    assert resolve_tta(None, recipe) == "dihedral"
    assert resolve_tta("none", recipe) == "none"
    assert resolve_tta(None, recipe, pixels=True) == "none"  # raw pixels stay the plain reference
    assert resolve_tta("dihedral", recipe, pixels=True) == "dihedral"
    recipe.views.rotate = False  # orientation carries meaning for this model: auto leaves it alone
    assert resolve_tta(None, recipe) == "none"
    recipe.eval.tta = "dihedral"
    assert resolve_tta(None, recipe) == "dihedral"
    with pytest.raises(ConfigError, match="not one of auto, none, dihedral"):
        resolve_tta("rot4", recipe)


def _turned_copy(src: Path, dst: Path) -> Path:
    """Every image of the class folder ``src`` turned by a quarter turn, in ``dst`` (same names)."""
    for p in sorted(src.rglob("*.png")):
        out = dst / p.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rot90(np.asarray(Image.open(p))).copy()).save(out)
    return dst


def test_feature_extractor_features_of_a_turned_folder(tmp_path):
    cells = make_image_folder(tmp_path / "cells", n_per_class=3, size=16)
    turned = _turned_copy(cells, tmp_path / "turned")
    spec = f"random:{TINY_BACKBONE}"
    by_tta = {}
    for tta in ("dihedral", "none"):
        ex = FeatureExtractor(spec, image_size=16, device="cpu", progress=False, tta=tta)
        a, b = ex.features(cells), ex.features(turned)
        assert a.paths == b.paths and a.info["tta"] == tta
        by_tta[tta] = (a.features, b.features)
    assert np.allclose(*by_tta["dihedral"], atol=1e-4)
    assert not np.allclose(*by_tta["none"], atol=1e-2)
    # features made one way are not mixed with features made the other way
    plain = FeatureExtractor(spec, image_size=16, device="cpu", progress=False, tta="none").describe()
    assert FeatureExtractor(spec, image_size=16, device="cpu", progress=False).tta == "dihedral"  # the default
    mismatch = source_mismatch(feature_source(plain), feature_source({**plain, "tta": "dihedral"}))
    assert mismatch == ["orientation averaging (--tta) none vs dihedral"]


def test_saved_classifier_predicts_from_the_features_its_probe_was_fitted_on(tmp_path):
    train = make_image_folder(tmp_path / "train", n_per_class=12, size=16, seed=0)
    report = linear(f"random:{TINY_BACKBONE}", train, None, tmp_path / "eval" / "linear.json", split=0.25,
                    image_size=16, device="cpu", plots=False, progress=False)
    pred = load_predictor(report["classifier"], device="cpu")
    assert pred.model.tta == "dihedral" and pred.info["tta"] == "dihedral"
    ex = FeatureExtractor(f"random:{TINY_BACKBONE}", image_size=16, device="cpu", progress=False)
    fs = ex.features(train)
    x = torch.stack([ex_image for ex_image in _eval_images(ex, train)])
    with torch.no_grad():
        f = pred.model.features(x)
    assert np.allclose(f.numpy(), fs.features, atol=1e-4)
    # the same classifier with the plain features would see other inputs
    pred.model.tta = "none"
    with torch.no_grad():
        assert not np.allclose(pred.model.features(x).numpy(), fs.features, atol=1e-3)


def _eval_images(ex: FeatureExtractor, folder: Path) -> list[torch.Tensor]:
    from cellssl.augment.views import build_eval_transform

    ds, keep = ex.build(folder)
    transform = build_eval_transform(ex.data_cfg, ds.channels)
    return [transform(ds.read(int(i))) for i in keep]


def test_cli_tta_option_reaches_the_features(tmp_path, capsys):
    data = make_image_folder(tmp_path / "cells", n_per_class=4, size=16)
    for tta in ("none", "dihedral"):
        out = tmp_path / f"emb_{tta}.npz"
        code, stdout, stderr = run_cli(capsys, "embed", "--checkpoint", f"random:{TINY_BACKBONE}", "--data", str(data),
                                       "--out", str(out), "--image-size", "16", "--device", "cpu", "--tta", tta)
        assert code == 0, stderr
    a, b = np.load(tmp_path / "emb_none.npz"), np.load(tmp_path / "emb_dihedral.npz")
    assert a["features"].shape == b["features"].shape and not np.allclose(a["features"], b["features"], atol=1e-3)
    code, stdout, stderr = run_cli(capsys, "embed", "--checkpoint", f"random:{TINY_BACKBONE}", "--data", str(data),
                                   "--out", str(tmp_path / "x.npz"), "--tta", "rot4")
    assert code != 0 and "rot4" in stderr and "Traceback" not in stderr
