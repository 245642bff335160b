"""The loss a method trains with is the loss the tests test: VICReg's and Barlow Twins' ``forward``
compute their terms with the module's tested functions (``vicreg_terms``, ``barlow_terms``) on the
same projector outputs, and weight them as ``vicreg_loss`` / ``barlow_loss`` do."""

from __future__ import annotations

import itertools

import pytest
import torch

from cellssl.config import ModelConfig, method_config
from cellssl.methods import barlow, build_method, vicreg
from cellssl.models import build_backbone

MODEL_CFG = ModelConfig(backbone="test_resnet", proj_hidden=32, proj_dim=16, pred_hidden=32)
SETTINGS = {"vicreg": {"vicreg_sim": 3.0, "vicreg_var": 7.0, "vicreg_cov": 2.0}, "barlow": {"barlow_lambda": 0.02}}
TERMS = {"vicreg": ("loss_invariance", "loss_variance", "loss_covariance"), "barlow": ("loss_on_diag", "loss_off_diag")}


def _method_and_views(name: str, m: int = 3):
    torch.manual_seed(0)
    method = build_method(method_config(name, **SETTINGS[name]), MODEL_CFG, build_backbone(MODEL_CFG, 3, 32))
    return method, torch.randn(8, m, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["vicreg", "barlow"])
def test_forward_equals_the_tested_loss_on_its_projections(name):
    """Non-default weights, 3 views: the loss and each term are the tested functions' mean over the 3 pairs."""
    method, views = _method_and_views(name)
    out = method(views)
    z = out["z"].reshape(3, 8, -1)  # view-major: z[i] is view i of the 8 images
    pairs = list(itertools.combinations(range(3), 2))
    if name == "vicreg":
        w = SETTINGS["vicreg"]
        ref = [vicreg.vicreg_loss(z[i], z[j], w["vicreg_sim"], w["vicreg_var"], w["vicreg_cov"]) for i, j in pairs]
        terms = [vicreg.vicreg_terms(z[i], z[j]) for i, j in pairs]
    else:
        ref = [barlow.barlow_loss(z[i], z[j], SETTINGS["barlow"]["barlow_lambda"]) for i, j in pairs]
        terms = [barlow.barlow_terms(z[i], z[j], SETTINGS["barlow"]["barlow_lambda"]) for i, j in pairs]
    assert out["loss"].item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-5)
    for key, values in zip(TERMS[name], zip(*terms)):
        assert out[key].item() == pytest.approx(torch.stack(values).mean().item(), rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("name,module,function",
                         [("vicreg", vicreg, "vicreg_terms"), ("barlow", barlow, "barlow_terms")])
def test_forward_calls_the_tested_terms_function(name, module, function, monkeypatch):
    """Doubling what the tested function returns doubles forward's loss and terms: forward has no copy of its own."""
    method, views = _method_and_views(name)
    before = method(views)
    original, calls = getattr(module, function), []

    def doubled(*args, **kwargs):
        calls.append(1)
        return tuple(2 * t for t in original(*args, **kwargs))

    monkeypatch.setattr(module, function, doubled)
    after = method(views)
    assert len(calls) == 3  # once per pair of the 3 views
    for key in ("loss", *TERMS[name]):
        assert after[key].item() == pytest.approx(2 * before[key].item(), rel=1e-5, abs=1e-7), key
