"""The GPU path checked on the CPU: a compiled forward without graph breaks in bf16, channels-last
batches, the on-device non-finite check (no host read per step), DDP BatchNorm statistics."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import cellssl.engine.fit as fit_mod
from cellssl.config import ModelConfig, OptimConfig, load_recipe, method_config
from cellssl.engine.checkpoint import load_checkpoint
from cellssl.engine.fit import autocast_for, fit
from cellssl.engine.optim import build_optimizer
from cellssl.errors import TrainingError
from cellssl.methods import build_method
from cellssl.methods.msbreg import MSBReg, singular_value_loss
from cellssl.models import build_backbone
from conftest import tiny_recipe_yaml

# Inductor compiles C++ on this 2-core CPU for minutes; aot_eager traces the same graph (forward and
# backward, through AOT autograd) with fullgraph=True, so a graph break or a dtype error still fails.
BACKEND = "aot_eager"


def _tiny_msbreg(**method) -> MSBReg:
    torch.manual_seed(0)
    model_cfg = ModelConfig(backbone="test_resnet", proj_hidden=32, proj_dim=16, pred_hidden=32)
    method = build_method(method_config("msbreg", **method), model_cfg, build_backbone(model_cfg, 3, 32))
    method.seed(0)
    return method


def test_msbreg_forward_compiles_with_fullgraph_and_trains_two_bf16_steps():
    """torch.compile(fullgraph=True) fails on any graph break (the Brownian sampling on a CPU
    generator, a bool() of a tensor in the SV loss); two optimiser steps under bf16 autocast give
    float32 losses that are finite, move the weights, and equal the eager forward on the same inputs."""
    method = _tiny_msbreg()
    compiled = torch.compile(method, fullgraph=True, backend=BACKEND)
    opt = build_optimizer(method, OptimConfig(lr=1e-3), 8)
    autocast, precision = autocast_for(torch.device("cpu"), "bf16")
    assert precision == "bf16"
    views = torch.randn(8, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = next(method.backbone.parameters()).detach().clone()
    for step in range(2):
        inputs = method.step_inputs(8, torch.device("cpu"))
        assert inputs["directions"].shape == (8, 16)
        with autocast:
            out = compiled(views, **inputs)
            eager = method(views, **inputs)
        for k in ("loss", "loss_centroid", "loss_sv", "loss_brownian"):
            assert out[k].dtype == torch.float32 and torch.isfinite(out[k]), k
            torch.testing.assert_close(out[k], eager[k], rtol=2e-2, atol=2e-2)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        method.after_step(step + 1, 10)
    assert not torch.equal(before, next(method.backbone.parameters()))


def test_the_directions_a_compiled_step_draws_are_the_ones_the_eager_forward_draws():
    a, b = _tiny_msbreg(), _tiny_msbreg()
    views = torch.randn(4, 2, 3, 32, 32)
    a.eval(), b.eval()
    with torch.no_grad():
        eager = [a(views)["loss_brownian"] for _ in range(2)]
        passed = [b(views, **b.step_inputs(4, torch.device("cpu")))["loss_brownian"] for _ in range(2)]
    assert eager == passed and eager[0] != eager[1]


def test_channels_last_reaches_the_batch_the_backbone_sees():
    method = _tiny_msbreg()
    seen = []
    method.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    views = torch.randn(4, 2, 3, 32, 32)
    method(views)
    assert not seen[-1].is_contiguous(memory_format=torch.channels_last)
    method.use_channels_last()
    method(views)
    assert seen[-1].is_contiguous(memory_format=torch.channels_last) and seen[-1].shape == (8, 3, 32, 32)


@pytest.mark.parametrize("shape,eps", [((64, 16), 1e-4), ((12, 32), 1e-4), ((12, 32), 1e-9), ((40, 64), 1e-11)])
def test_sv_loss_cholesky_equals_the_svd_reference_without_a_host_read(shape, eps, monkeypatch):
    """The Cholesky path of the SV loss matches the SVD reference, also where float32 Cholesky
    fails (rank-deficient batch, tiny eps), and never turns a tensor into a Python bool."""
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ref = singular_value_loss(z.double(), eps, method="svd")

    def no_bool(self):
        raise AssertionError("singular_value_loss read a tensor back to the host")

    monkeypatch.setattr(torch.Tensor, "__bool__", no_bool)
    got = singular_value_loss(z, eps)
    monkeypatch.undo()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_sv_loss_of_non_finite_embeddings_is_nan_not_an_error():
    z = torch.randn(16, 8)
    z[3, 2] = float("nan")
    assert torch.isnan(singular_value_loss(z))


class _HostReads:
    """Counts what would make a GPU wait for the host: Tensor -> bool/float/int, item(), tolist()."""

    def __init__(self, monkeypatch):
        self.n = 0
        for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _f=original, **k):
                self.n += 1
                return _f(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_device_checked_steps_read_nothing_back_and_skip_a_nan_step(tmp_path, tiny_folder, monkeypatch):
    """With the check on the device (the CUDA path, forced on the CPU here), a step that neither logs
    nor checkpoints reads no tensor back to the host (data, forward, guard, backward, optimiser,
    EMA); a NaN step is skipped by the optimiser itself (found_inf), warned about and counted at the
    next log step, and not logged."""
    monkeypatch.setattr(fit_mod, "DEVICE_CHECKED", ("cuda", "cpu"))
    original, calls, marks = MSBReg.forward, {"n": 0}, {}
    counter = _HostReads(monkeypatch)
    next_step = fit_mod.Training.next_step

    def forward(self, views):
        out = original(self, views)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss_sv"] = torch.tensor(float("nan"))
            out["loss"] = out["loss"] + out["loss_sv"]
        return out

    def marked(self):
        next_step(self)
        marks[self.step] = counter.n

    monkeypatch.setattr(MSBReg, "forward", forward)
    monkeypatch.setattr(fit_mod.Training, "next_step", marked)
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=6, log_every=3, monitor_every=100)),
                    [f"data.path={tiny_folder}", f"train.out={tmp_path / 'run'}"])
    with pytest.warns(UserWarning, match=r"step 3: non-finite loss \(terms: loss_sv\); update skipped"):
        res = fit(r)
    assert res.step == 6 and res.skipped_steps == 1
    # steps 3 (the NaN one) and 6 follow steps that neither logged nor checkpointed (2 and 5)
    assert marks[3] - marks[2] == 0 and marks[6] - marks[5] == 0, marks
    assert marks[2] - marks[1] > 0  # step 1 logged (loss values, the collapse monitor): the counter counts
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 6]  # step 3 (a log step) was skipped: not logged
    for v in load_checkpoint(res.checkpoint)["model"].values():
        assert torch.isfinite(v.float()).all()


def test_device_checked_streak_and_all_nan_runs_stop_with_the_host_messages(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setattr(fit_mod, "DEVICE_CHECKED", ("cuda", "cpu"))
    original = MSBReg.forward

    def forward(self, views):
        out = original(self, views)
        out["loss_brownian"] = torch.tensor(float("nan"))
        out["loss"] = out["loss"] + out["loss_brownian"]
        return out

    monkeypatch.setattr(MSBReg, "forward", forward)
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=20, checkpoint_every=2, max_nonfinite=3,
                                         log_every=1)),
                    [f"data.path={tiny_folder}", f"train.out={tmp_path / 'run'}"])
    with warnings.catch_warnings(), pytest.raises(TrainingError) as exc:
        warnings.simplefilter("ignore")
        fit(r)
    assert str(exc.value).startswith("stopped at step 3: 3 non-finite losses in a row in loss_brownian")
    assert "no checkpoint was written" in str(exc.value)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_host_read_counter_counts():
    """The counter above can fail: a bool() of a tensor is counted."""
    mp = pytest.MonkeyPatch()
    try:
        counter = _HostReads(mp)
        assert bool(torch.tensor(1.0)) and float(torch.tensor(2.0)) == 2.0
        assert counter.n == 2
    finally:
        mp.undo()


def test_a_compiled_msbreg_with_forces_off_still_has_a_loss_to_differentiate():
    """Inductor (not aot_eager) returned the loss without gradient when a force that is off reported a
    zero made from no input (``new_zeros``); the centroid-only ablation then failed at ``backward``."""
    method = _tiny_msbreg(sv_weight=0.0, brownian_weight=0.0)
    compiled = torch.compile(method, fullgraph=True)
    views = torch.randn(4, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = compiled(views, **method.step_inputs(4, torch.device("cpu")))
    assert out["loss"].requires_grad and out["loss_sv"] == 0 and out["loss_brownian"] == 0
    out["loss"].backward()
    assert method.predictor[0].weight.grad.abs().sum() > 0


def test_a_compiled_step_whose_loss_has_no_gradient_stops_with_one_line(tmp_path, tiny_folder, monkeypatch):
    """A torch.compile fault of that kind (above) must not reach ``backward`` as an internal error."""
    def forward(self, views, local):
        return {"loss": torch.tensor(1.0)}  # what the faulty compiled graph returned: no grad_fn

    monkeypatch.setattr(fit_mod.Training, "forward", forward)
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=2)),
                    [f"data.path={tiny_folder}", f"train.out={tmp_path / 'run'}", "train.compile=true"])
    with pytest.raises(TrainingError, match=r"compiled step's loss has no gradient .*--set train.compile=false$"):
        fit(r)
