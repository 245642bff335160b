"""CPU fast paths (issue 20 §3): native-bf16 detection, ``train.precision: fast``/``auto``, and
channels-last on the CPU; a CPU without bf16 hardware keeps float32."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import cellssl.engine.hardware as hw
from cellssl.config import load_recipe, recipe_from_dict, recipe_to_dict
from cellssl.engine.fit import autocast_for, fit
from cellssl.errors import ConfigError
from conftest import tiny_recipe_yaml

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def bf16_cpu(monkeypatch):
    """Set whether the CPU has native bf16 (AMX-BF16) for the test."""
    def set_to(has: bool) -> None:
        monkeypatch.setattr(hw, "cpu_has_fast_bf16", lambda: has)
    return set_to


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\n")
    old = tmp_path / "old"
    old.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert {"amx_bf16", "avx512f"} <= hw.cpu_flags.__wrapped__(amx)
    assert "amx_bf16" not in hw.cpu_flags.__wrapped__(old)
    assert hw.cpu_flags.__wrapped__(tmp_path / "missing") == frozenset()  # not Linux: no flags, fp32 stays


@pytest.mark.parametrize("flags,expected", [({"fpu", "avx2"}, False), ({"avx512_bf16"}, False), ({"amx_bf16"}, True)])
def test_native_bf16_detection(monkeypatch, flags, expected) -> None:
    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset(flags))
    assert hw.cpu_has_fast_bf16() is expected


def test_fast_precision_is_bf16_only_where_the_hardware_has_it(bf16_cpu) -> None:
    bf16_cpu(False)  # a CPU without AMX-BF16
    ctx, precision = autocast_for(CPU, "fast")
    assert precision == "fp32" and isinstance(ctx, contextlib.nullcontext)
    assert hw.resolve_precision(CUDA, "fast") == "bf16"
    bf16_cpu(True)
    ctx, precision = autocast_for(CPU, "fast")
    assert precision == "bf16" and isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_auto_keeps_fp32_on_the_cpu_and_explicit_values_win(bf16_cpu, monkeypatch) -> None:
    bf16_cpu(True)
    assert hw.resolve_precision(CPU, "auto") == "fp32"  # today's CPU default (AUTO_FAST_ON_CPU is off)
    assert hw.resolve_precision(CUDA, "auto") == "bf16"
    monkeypatch.setattr(hw, "AUTO_FAST_ON_CPU", True)  # the default the benchmark may flip
    assert hw.resolve_precision(CPU, "auto") == "bf16"
    bf16_cpu(False)
    assert hw.resolve_precision(CPU, "auto") == "fp32"  # ... never on a CPU without it
    for explicit in ("bf16", "fp16", "fp32"):
        assert hw.resolve_precision(CPU, explicit) == explicit


def test_channels_last_on_the_cpu_is_its_own_switch() -> None:
    assert hw.use_channels_last(CUDA, True, False) and not hw.use_channels_last(CPU, True, False)
    assert hw.use_channels_last(CPU, False, True) and not hw.use_channels_last(CUDA, False, True)


def test_fit_with_fast_precision_and_cpu_channels_last(tmp_path: Path, tiny_folder: Path, bf16_cpu) -> None:
    bf16_cpu(False)
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=2, log_every=1, monitor_every=100)),
                    [f"data.path={tiny_folder}", f"train.out={tmp_path / 'run'}", "train.precision=fast",
                     "model.channels_last_cpu=true", "data.num_workers=0"])
    res = fit(r)
    assert res.step == 2 and res.method.channels_last
    assert next(res.method.backbone.parameters()).dtype == torch.float32
    assert torch.isfinite(torch.tensor(res.last_metrics["loss"]))


def test_recipes_and_checkpoints_without_the_new_values_still_load() -> None:
    old = recipe_to_dict(load_recipe("blood_smear"))
    old["model"].pop("channels_last_cpu")
    r = recipe_from_dict(old)
    assert (r.train.precision, r.model.channels_last_cpu) == ("auto", False)
    assert load_recipe("blood_smear", ["train.precision=fast"]).train.precision == "fast"
    with pytest.raises(ConfigError, match="train.precision: 'amx' is not one of auto, fast, bf16"):
        load_recipe("blood_smear", ["train.precision=amx"])


@pytest.mark.parametrize("flags,run,device,setting,expected", [
    ({"avx512f", "avx2"}, "fp32", CPU, "auto", None),  # a CPU without bf16 dot products: fp32 as the run
    ({"avx512_bf16"}, "fp32", CPU, "auto", torch.bfloat16),  # AVX512-BF16 alone: a bf16 forward pays
    ({"amx_bf16"}, "fp32", CPU, "auto", torch.bfloat16),
    ({"avx512_bf16"}, "bf16", CPU, "auto", None),  # the run is already bf16: its own autocast
    ({"avx512_bf16"}, "fp32", CPU, "same", None),
    ({"avx512f"}, "fp32", CPU, "bf16", torch.bfloat16),  # asked for: on any CPU
    (set(), "bf16", CUDA, "auto", None),
])
def test_target_forward_precision(monkeypatch, flags, run, device, setting, expected) -> None:
    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset(flags))
    assert hw.target_autocast_dtype(device, run, setting) is expected


def test_a_bf16_target_forward_keeps_the_target_float32_and_close() -> None:
    import cellssl.methods  # noqa: F401  (registers the methods)
    from cellssl.methods.base import build_method
    from cellssl.models.backbone import build_backbone

    torch.manual_seed(0)
    r = load_recipe("blood_smear", ["model.backbone=resnet18", "model.proj_hidden=64", "model.proj_dim=32",
                                    "model.pred_hidden=64"])
    method = build_method(r.method, r.model, build_backbone(r.model, 3, 32)).train()
    x = torch.rand(16, 3, 32, 32)
    ref = method.target(x)
    method.use_target_dtype(torch.bfloat16)
    fast = method.target(x)
    assert fast.dtype == torch.float32 and not fast.requires_grad
    assert next(method.target_backbone.parameters()).dtype == torch.float32  # the EMA keeps fp32 weights
    cos = torch.nn.functional.cosine_similarity(fast, ref, dim=-1)
    assert cos.min() > 0.99, cos  # bf16 rounding, not a different target
    assert not torch.equal(fast, ref)  # ... and it did run in bf16
    vicreg = build_method(load_recipe("blood_smear_vicreg").method, r.model, build_backbone(r.model, 3, 32))
    assert vicreg.use_target_dtype(torch.bfloat16).target_dtype is None  # no target, nothing to speed up


@pytest.mark.parametrize("has_dot,expected", [(False, None), (True, torch.bfloat16)])
def test_fit_runs_the_target_in_bf16_only_where_the_cpu_has_it(tmp_path: Path, tiny_folder: Path, monkeypatch,
                                                             has_dot, expected) -> None:
    monkeypatch.setattr(hw, "cpu_has_bf16_dot", lambda: has_dot)
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=2, log_every=1, monitor_every=100)),
                    [f"data.path={tiny_folder}", f"train.out={tmp_path / 'run'}", "data.num_workers=0"])
    assert r.train.target_precision == "auto"
    res = fit(r)
    assert res.method.target_dtype is expected
    assert torch.isfinite(torch.tensor(res.last_metrics["loss"]))
    with pytest.raises(ConfigError, match="train.target_precision: 'fp16' is not one of auto, same, bf16"):
        load_recipe("blood_smear", ["train.target_precision=fp16"])
