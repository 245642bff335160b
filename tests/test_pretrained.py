"""Starting weights (model.pretrained): local files written by the test, timm tags without network."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from cellssl.config import ModelConfig, load_recipe
from cellssl.engine.checkpoint import load_backbone, load_checkpoint
from cellssl.engine.fit import fit
from cellssl.errors import CellSSLError, ConfigError
from cellssl.models import build_backbone
from conftest import CHILD_ENV, REPO, make_image_folder, run_cellssl


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A full timm resnet18 (with its 1000-class fc) with seeded random weights, as .safetensors and .pth."""
    torch.manual_seed(123)
    net = timm.create_model("resnet18", pretrained=False)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    d = tmp_path_factory.mktemp("weights")
    save_file(state, str(d / "r18.safetensors"))
    torch.save({"state_dict": state}, d / "r18.pth")
    return d, state


def _same_backbone(model: torch.nn.Module, state: dict) -> None:
    own = model.state_dict()
    assert not any(k.startswith("fc.") for k in own)
    for k, v in own.items():
        assert torch.equal(v, state[k]), k


def test_local_files_load_with_and_without_wrapping(weights):
    d, state = weights
    for name in ("r18.safetensors", "r18.pth"):
        net = build_backbone(ModelConfig(backbone="resnet18", pretrained=str(d / name)), 3, 32, load_pretrained=True)
        _same_backbone(net, state)
    # off unless asked (a checkpoint load right after would overwrite it)
    net = build_backbone(ModelConfig(backbone="resnet18", pretrained=str(d / "r18.safetensors")), 3, 32)
    assert not torch.equal(net.state_dict()["conv1.weight"], state["conv1.weight"])


def test_other_channel_counts_use_timm_adaptation(weights):
    from timm.models import adapt_input_conv

    d, state = weights
    for chans in (1, 4):
        net = build_backbone(ModelConfig(backbone="resnet18", pretrained=str(d / "r18.safetensors")), chans, 32,
                             load_pretrained=True)
        assert net.conv1.weight.shape[1] == chans
        assert torch.allclose(net.conv1.weight, adapt_input_conv(chans, state["conv1.weight"]))
        assert torch.equal(net.state_dict()["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    # a replaced stem keeps its random conv1 (warned), the rest is loaded
    with pytest.warns(UserWarning, match="conv1"):
        net = build_backbone(ModelConfig(backbone="resnet18", stem="pool", pretrained=str(d / "r18.safetensors")), 3,
                             32, load_pretrained=True)
    assert torch.equal(net.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_bad_weights_are_one_line(weights, tmp_path):
    d, _ = weights
    with pytest.raises(ConfigError, match="do not fit backbone resnet34"):
        build_backbone(ModelConfig(backbone="resnet34", pretrained=str(d / "r18.safetensors")), 3, 32,
                       load_pretrained=True)
    with pytest.raises(ConfigError, match="does not exist"):
        build_backbone(ModelConfig(backbone="resnet18", pretrained=str(tmp_path / "nope.safetensors")), 3, 32,
                       load_pretrained=True)
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(ConfigError, match="cannot read pretrained weights"):
        build_backbone(ModelConfig(backbone="resnet18", pretrained=str(tmp_path / "junk.pth")), 3, 32,
                       load_pretrained=True)
    with pytest.raises(ConfigError, match="holds resnet50 weights but model.backbone is resnet18"):
        build_backbone(ModelConfig(backbone="resnet18", pretrained="resnet50.a1_in1k"), 3, 32, load_pretrained=True)
    with pytest.raises(ConfigError, match="no pretrained tag 'resnet18.a9_in1k'.*resnet18.a1_in1k"):
        build_backbone(ModelConfig(backbone="resnet18", pretrained="resnet18.a9_in1k"), 3, 32, load_pretrained=True)


def test_pretrain_starts_from_the_file(weights, tmp_path):
    d, state = weights
    data = make_image_folder(tmp_path / "cells", n_per_class=4, size=20)
    r = load_recipe(str(REPO / "recipes" / "cpu_demo.yaml"), [
        f"data.path={data}", f"train.out={tmp_path / 'run'}", "train.max_steps=1", "train.batch_size=4",
        "data.image_size=16", "data.num_workers=0", "train.progress=false", "optim.lr=1e-12", "model.stem=default",
        f"model.pretrained={d / 'r18.safetensors'}", "model.proj_hidden=32", "model.pred_hidden=32",
        "model.proj_dim=16"])
    res = fit(r)
    ck = load_checkpoint(res.checkpoint)
    assert ck["config"]["model"]["pretrained"] == str(d / "r18.safetensors")
    for k in ("conv1.weight", "layer3.0.conv1.weight"):  # lr 1e-12: the weights are still the file's
        assert torch.allclose(ck["model"][f"backbone.{k}"], state[k], rtol=0, atol=1e-9)
        assert torch.allclose(ck["model"][f"target_backbone.{k}"], state[k], rtol=0, atol=1e-9)


def test_evaluation_and_adapt_specs(weights, tmp_path):
    from cellssl.adapt.continued import adapt
    from cellssl.eval.features import load_features

    d, state = weights
    spec = f"pretrained:resnet18={d / 'r18.safetensors'}"
    net, info = load_backbone(spec, image_size=32)
    _same_backbone(net, state)
    assert info["method"] == "pretrained" and info["config"]["model"]["pretrained"] == str(d / "r18.safetensors")
    data = make_image_folder(tmp_path / "cells", n_per_class=4, size=20)
    fs = load_features(spec, data, image_size=16, device="cpu", progress=False)
    assert fs.features.shape == (12, 512) and fs.info["method"] == "pretrained"
    with pytest.raises(CellSSLError, match="no config.json beside"):
        load_backbone(f"pretrained:{d / 'r18.safetensors'}")
    ckpt = adapt(spec, data, tmp_path / "adapted", max_steps=1,
                 overrides=["train.batch_size=4", "data.image_size=16", "data.num_workers=0", "train.progress=false",
                            "optim.lr=1e-12", "model.proj_hidden=32", "model.pred_hidden=32", "model.proj_dim=16"])
    ck = load_checkpoint(ckpt)
    assert ck["source_checkpoint"] == spec and torch.allclose(ck["model"]["backbone.layer2.0.conv1.weight"],
                                                              state["layer2.0.conv1.weight"], rtol=0, atol=1e-9)


@pytest.mark.slow
def test_download_impossible_is_one_line(tmp_path):
    """No network here: HF_HUB_OFFLINE makes the hub fail at once instead of waiting on timeouts."""
    data = make_image_folder(tmp_path / "cells", n_per_class=3, size=16)
    env = {**CHILD_ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # read when the hub client loads
    res = run_cellssl("linear", "--checkpoint", "imagenet:resnet18.a1_in1k", "--train", str(data), "--split", "0.3",
                      "--image-size", "16", "--out", str(tmp_path / "l"), env=env, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot get pretrained weights 'resnet18.a1_in1k'" in errors[0], res.stderr
    assert "model.pretrained to a local .safetensors/.pth file" in errors[0]


def test_unreachable_hub_fails_at_once(monkeypatch):
    """Without HF_HUB_OFFLINE the hub client would retry for about a minute: cellssl checks first."""
    import socket

    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ConfigError, match="not in the cache and huggingface.co cannot be reached"):
        build_backbone(ModelConfig(backbone="resnet18", pretrained="imagenet"), 3, 32, load_pretrained=True)
