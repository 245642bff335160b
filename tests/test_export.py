"""cellssl export: safetensors that timm loads, ONNX that matches torch, a config and a model card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from cellssl.apply.export import export
from cellssl.apply.model import load_predictor
from cellssl.config import Recipe, recipe_to_dict
from cellssl.engine.checkpoint import FORMAT, load_backbone
from cellssl.eval.linear import linear
from conftest import TINY_BACKBONE, make_image_folder


def make_ckpt(path, in_chans=3, image_size=32, stem="default", step=7, backbone="resnet18"):
    """A training-format checkpoint with a non-random backbone (resnet18: the one the README's timm call
    names; ``backbone=TINY_BACKBONE`` where the architecture does not matter)."""
    recipe = Recipe()
    recipe.model.backbone, recipe.model.stem, recipe.data.image_size = backbone, stem, image_size
    recipe.name, recipe.description, recipe.data.path = "tiny", "a test recipe", "/data/cells"
    recipe.train.max_steps = 10
    from cellssl.models import build_backbone

    torch.manual_seed(1)
    net = build_backbone(recipe.model, in_chans, image_size)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "config": recipe_to_dict(recipe), "in_chans": in_chans, "method": "msbreg",
                "step": step, "model": {"backbone." + k: v for k, v in net.state_dict().items()}}, path)
    return path


def features(net, x):
    with torch.no_grad():
        return net.eval()(x)


def test_safetensors_load_in_timm_exactly_as_documented(tmp_path):
    ck = make_ckpt(tmp_path / "run" / "checkpoints" / "last.pt")
    (tmp_path / "run" / "fewshot.json").write_text(json.dumps({
        "kind": "fewshot", "results": {"5": {"ways": 8, "mean": 0.61, "ci95": 0.02}}}))
    torch.load(ck, weights_only=True)  # checkpoints stay weights-only
    out = tmp_path / "model"
    config = export(ck, out)
    ours, _ = load_backbone(ck)
    x = torch.randn(4, 3, 32, 32)
    want = features(ours, x)

    # the call from the issue, verbatim: timm's default (1000-class) model loads the file strictly
    m = timm.create_model("resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    with torch.no_grad():
        got = m.eval().forward_head(m.forward_features(x), pre_logits=True)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.count_nonzero(m.fc.weight) == 0  # the documented placeholder, not a classifier
    # and the features form
    m0 = timm.create_model("resnet18", pretrained=True, num_classes=0,
                           pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    assert torch.allclose(features(m0, x), want, atol=1e-5)

    assert config["architecture"] == "resnet18" and config["num_features"] == 512
    pre = config["preprocessing"]
    assert pre["channels"] == 3 and pre["image_size"] == 32 and pre["mean"] == [0.5] * 3 and pre["std"] == [0.25] * 3
    assert json.loads((out / "config.json").read_text())["cellssl"]["recipe"]["name"] == "tiny"
    card = (out / "README.md").read_text()
    for text in ("msbreg, step 7 (of 10)", "recipe: tiny", "`/data/cells`", "timm.create_model(\"resnet18\"",
                 "8-way 5-shot: 61.0", "## Preprocessing"):
        assert text in card, text
    # a colleague's cellssl reads the folder back with the same preprocessing
    back, info = load_backbone(out)
    assert torch.allclose(features(back, x), want, atol=1e-6) and info["image_size"] == 32


def test_one_channel_and_custom_stem(tmp_path):
    ck = make_ckpt(tmp_path / "fluo.pt", in_chans=1, image_size=32)
    out = tmp_path / "fluo"
    export(ck, out)
    x = torch.randn(2, 1, 32, 32)
    m = timm.create_model("resnet18", pretrained=True, num_classes=0, in_chans=1,
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), input_size=(1, 32, 32)))
    assert torch.allclose(features(m, x), features(load_backbone(ck)[0], x), atol=1e-5)
    assert "in_chans=1" in (out / "README.md").read_text()

    ck = make_ckpt(tmp_path / "pool.pt", stem="pool")
    out = tmp_path / "pool"
    config = export(ck, out)
    assert not config["cellssl"]["timm_loadable"] and "cannot hold" in (out / "README.md").read_text()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(features(load_backbone(out)[0], x), features(load_backbone(ck)[0], x), atol=1e-6)


def test_onnx_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    data = make_image_folder(tmp_path / "cells", n_per_class=10, size=20)
    rep = linear(f"random:{TINY_BACKBONE}", data, None, tmp_path / "eval", split=0.3, image_size=16, device="cpu",
                 plots=False)
    out = tmp_path / "clf"
    config = export(rep["classifier"], out, fmt="both")
    onnx = config["cellssl"]["onnx"]
    assert onnx["model"].startswith("classifier") and onnx["max_abs_diff_vs_torch"] < 1e-4
    assert config["cellssl"]["head"]["classes"] == ["blue", "green", "red"] and config["cellssl"]["head"]["normalize"]
    model = load_predictor(rep["classifier"], device="cpu").model
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # dynamic batch axis
        x = torch.randn(batch, 3, 16, 16)
        got = sess.run(None, {"images": x.numpy()})[0]
        want = features(model, x).numpy()
        assert got.shape == (batch, 3) and np.abs(got - want).max() < 1e-4
    # the head file reproduces the classifier on timm features
    from safetensors.torch import load_file

    head = load_file(str(out / "head.safetensors"))
    m = timm.create_model(TINY_BACKBONE, pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    x = torch.randn(3, 3, 16, 16)
    # the probe was fitted on features averaged over the 8 rotations and flips: the card says so and how
    card = (out / "README.md").read_text()
    assert config["cellssl"]["head"]["tta"] == "dihedral" and "for k in range(4)]).mean(0)" in card
    f = torch.stack([features(m, torch.rot90(v, k, (2, 3))) for v in (x, x.flip(3)) for k in range(4)]).mean(0)
    f = torch.nn.functional.normalize(f, dim=1)
    assert torch.allclose(f @ head["weight"].T + head["bias"], features(model, x), atol=1e-4)
    plain = torch.nn.functional.normalize(features(m, x), dim=1)  # one pass is another classifier
    assert not torch.allclose(plain @ head["weight"].T + head["bias"], features(model, x), atol=1e-3)
    assert "max abs difference to torch" in card


def test_cli_export_onnx_backbone(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from cellssl.cli import main

    ck = make_ckpt(tmp_path / "last.pt", image_size=16, backbone=TINY_BACKBONE)
    main(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "m"), "--format", "onnx"])
    assert "ONNX vs torch max abs difference" in capsys.readouterr().out and (tmp_path / "m" / "model.onnx").is_file()
    assert not (tmp_path / "m" / "model.safetensors").exists()
    with pytest.raises(SystemExit) as exc:
        main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and "does not exist" in err[0]
