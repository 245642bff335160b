"""benchmarks/cpu_speed.py: each setting is a valid recipe of the shape asked for, one measurement
reads fit's metrics, and the report compares each setting's loss with fp32's."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import cpu_speed
from cellssl.config import load_recipe
from conftest import make_image_folder


def _args(tmp_path: Path, data: Path, *extra: str):
    return cpu_speed.parse_args(["--data", str(data), "--work", str(tmp_path / "runs"), *extra])


@pytest.mark.parametrize("setting", sorted(cpu_speed.SETTINGS))
def test_every_setting_is_a_valid_recipe_at_equal_image_views(tmp_path: Path, setting: str) -> None:
    args = _args(tmp_path, tmp_path)
    for method, shape in (("msbreg", "64x4"), ("byol", "128x2")):
        r = load_recipe("blood_smear", cpu_speed.run_overrides(method, shape, setting, args, tmp_path / "o"))
        assert (r.method.name, r.train.batch_size, r.views.n_views) == (method, *cpu_speed.parse_shape(shape))
        assert r.train.batch_size * r.views.n_views == 256 and r.train.max_steps == args.warmup + args.steps
    r = load_recipe("blood_smear", cpu_speed.run_overrides("msbreg", "64x4", "bf16_cl_compile", args, tmp_path))
    assert (r.train.precision, r.model.channels_last_cpu, r.train.compile) == ("bf16", True, True)


def test_bad_options_are_one_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        cpu_speed.parse_args(["--data", str(tmp_path), "--settings", "fp32,amx"])
    assert "unknown amx" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="must look like IMAGESxVIEWS"):
        cpu_speed.parse_args(["--data", str(tmp_path), "--shapes", "64by4"])


def test_one_measurement_and_the_report(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "imgs", n_per_class=8, size=24)
    args = _args(tmp_path, data, "--steps", "2", "--warmup", "1", "--shapes", "8x2", "--image-size", "16",
                 "--set", "model.proj_hidden=32", "--set", "model.proj_dim=16", "--set", "model.pred_hidden=32",
                 "--set", "data.num_workers=0", "--set", "train.threads=1")
    r = cpu_speed.measure("msbreg", "8x2", "fp32", args, tmp_path / "runs")
    assert r["steps"] == 3 and r["step_s"] > 0 and r["views_per_s"] > 0 and r["loss"] == r["loss"]
    slower = {**r, "setting": "bf16", "step_s": 2 * r["step_s"], "loss": r["loss"] + 0.5}
    vic = {**r, "method": "vicreg", "step_s": r["step_s"] / 2}
    lines = cpu_speed.report([r, slower, vic, {**vic, "setting": "bf16"}, {"method": "byol", "shape": "8x2",
                                                                          "setting": "fp32", "error": "timed out"}],
                             ["fp32", "bf16"], ["msbreg", "vicreg", "byol"], ["8x2"])
    text = "\n".join(lines)
    assert "| bf16 | msbreg |" in text and "+0.5000 |" in text
    assert "- 8x2 fp32: 2.00×" in text and "- 8x2 bf16: 4.00×" in text
    assert "byol" not in text  # a failed measurement has no row
