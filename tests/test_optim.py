"""Optimisers and schedules: LARS adapts only weights, warm-up + cosine, weight-decay exclusions."""

import math

import pytest
import torch
from torch import nn

from cellssl.config import OptimConfig
from cellssl.engine.optim import LARS, build_optimizer, lr_at, param_groups
from cellssl.models import cosine_momentum


def test_weight_decay_excludes_norms_and_biases():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    decay, no_decay = param_groups(model, 0.1)
    assert {tuple(p.shape) for p in decay["params"]} == {(8, 4), (2, 8)}
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_each_optimizer_minimises_a_regression(name):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    model = nn.Linear(8, 1)
    opt = build_optimizer(model, OptimConfig(name=name, lr=0.05 if name != "lars" else 1.0, weight_decay=0.0), 256)
    first = None
    for _ in range(100):
        loss = ((model(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_lars_trust_ratio_scales_weight_update_not_bias():
    w = nn.Parameter(torch.full((4,), 2.0))
    b = nn.Parameter(torch.zeros(1))
    opt = LARS([{"params": [w], "lars": True, "weight_decay": 0.0},
                {"params": [b], "lars": False, "weight_decay": 0.0}], lr=1.0, momentum=0.0, eta=0.01)
    w.grad = torch.full((4,), 100.0)
    b.grad = torch.full((1,), 100.0)
    opt.step()
    # trust = eta * |w| / |g| = 0.01 * 4 / 200: the step is 0.01 * |w|-sized, whatever |g| is
    assert torch.allclose(w.detach(), torch.full((4,), 2.0 - 100.0 * 0.01 * 4.0 / 200.0))
    assert torch.allclose(b.detach(), torch.tensor([-100.0]))


def test_lr_warmup_then_cosine_and_momentum_schedule():
    assert lr_at(0, 100, 1.0, 10, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, 10, 0.01) == pytest.approx(0.01)
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert not math.isnan(lr_at(5, 0, 1.0, 0, 0.0))


def test_predictor_gets_its_own_lr_scale_and_constant_schedule():
    from cellssl.engine.optim import set_lr

    model = nn.Module()
    model.backbone = nn.Linear(4, 4)
    model.predictor = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    cfg = OptimConfig(name="adamw", lr=0.01, warmup_steps=2, min_lr_ratio=0.0,
                      predictor_lr_scale=10.0, predictor_lr_schedule="constant")
    opt = build_optimizer(model, cfg, 256)
    pred_ids = {id(p) for p in model.predictor.parameters()}
    is_pred = [all(id(p) in pred_ids for p in g["params"]) and g["params"] for g in opt.param_groups]
    assert sum(bool(x) for x in is_pred) == 2  # predictor weights and its biases/norms
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    set_lr(opt, 100, 100, cfg)  # end of the run: the backbone has decayed, the predictor has not
    for g, pred in zip(opt.param_groups, is_pred):
        assert g["lr"] == pytest.approx(0.1 if pred else 0.0, abs=1e-6)
    set_lr(opt, 0, 100, cfg)  # both warm up
    for g, pred in zip(opt.param_groups, is_pred):
        assert g["lr"] == pytest.approx(0.05 if pred else 0.005)
    same = build_optimizer(model, OptimConfig(name="adamw", lr=0.01), 256)
    assert len(same.param_groups) == 2  # default: one schedule for all


def test_lars_skips_a_step_on_the_device_when_found_inf_is_set():
    """found_inf = 1 (a non-finite loss, decided on the device) leaves weights and momentum as they
    were; found_inf = 0 is a normal step."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = LARS([{"params": [w], "lars": True, "weight_decay": 0.0}], lr=0.1)
    w.grad = torch.randn(4, 3)
    opt.step()
    before, buf = w.detach().clone(), opt.state[w]["momentum_buffer"].clone()
    w.grad = torch.full((4, 3), float("nan"))
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(w.detach(), before) and torch.equal(opt.state[w]["momentum_buffer"], buf)
    w.grad = torch.ones(4, 3)
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    plain = LARS([{"params": [p := torch.nn.Parameter(before.clone())], "lars": True, "weight_decay": 0.0}], lr=0.1)
    plain.state[p]["momentum_buffer"] = buf.clone()
    p.grad = torch.ones(4, 3)
    plain.step()
    assert torch.allclose(w.detach(), p.detach()) and not torch.equal(w.detach(), before)
