"""benchmarks/quality.py and benchmarks/crosslab.py: the cross-lab columns, the budgets, the report's tables.

Tiny synthetic folders stand in for PBC (source lab) and jtsc128 (target lab): colour-coded classes,
so that well-separated features must give accuracies far above chance.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import common, crosslab, quality
from cellssl.config import load_recipe
from cellssl.engine.fit import fit
from cellssl.errors import DataError
from cellssl.eval.features import FeatureExtractor
from conftest import REPO, make_image_folder, tiny_recipe_yaml

# basophil is red like neutrophil (make_image_folder colours class i by channel i % 3): a probe that saw
# it would call half the target's neutrophils basophils; the target lab has no basophil folder
SOURCE_CLASSES = ("neutrophil", "lymphocyte", "monocyte", "basophil")
TARGET_CLASSES = ("neutrophil", "lymphocyte", "monocyte")


@pytest.fixture
def labs(tmp_path: Path) -> tuple[Path, Path]:
    src = make_image_folder(tmp_path / "pbc", n_per_class=20, size=16, classes=SOURCE_CLASSES, seed=0)
    tgt = make_image_folder(tmp_path / "jtsc", n_per_class=20, size=16, classes=TARGET_CLASSES, seed=1)
    return src, tgt


def pixel_features(*folders: Path):
    ex = FeatureExtractor("pixels:4", image_size=16, device="cpu", progress=False)
    return [ex.features(f) for f in folders]


def test_restrict_classes_keeps_the_target_classes_in_their_order(labs):
    src, _ = pixel_features(*labs)
    out = crosslab.restrict_classes(src, ["monocyte", "neutrophil"])
    assert out.classes == ["monocyte", "neutrophil"]
    assert len(out) == 40 and set(out.labels.tolist()) == {0, 1}
    names = [src.classes[i] for i in src.labels]
    kept = [names[src.paths.index(p)] for p in out.paths]
    assert [["monocyte", "neutrophil"][y] for y in out.labels] == kept
    with pytest.raises(DataError, match="eosinophil"):
        crosslab.restrict_classes(src, ["eosinophil"])


def test_crosslab_columns_are_far_above_chance_on_separated_classes(labs):
    src, tgt = pixel_features(*labs)
    row = crosslab.crosslab_metrics(src, tgt, episodes=20)
    assert row["xl_ways"] == 3 and row["xl_classes"] == sorted(TARGET_CLASSES) and row["xl_n"] == 60
    # chance is 1/3; colour separates the classes in both labs
    assert row["xl_1shot"] > 0.8 and row["xl_5shot"] > 0.9
    assert row["xl_linear"] > 0.9 and row["xl_linear_bal"] > 0.9
    assert 0 <= row["xl_5shot_ci"] < 0.1


def test_transfer_probe_is_at_chance_when_the_labs_disagree(labs, tmp_path):
    """The transfer column can fail: a target lab whose folders name other colours scores near 0."""
    src_dir, _ = labs
    swapped = make_image_folder(tmp_path / "swapped", n_per_class=20, size=16,
                                classes=("lymphocyte", "monocyte", "neutrophil"), seed=2)
    src, tgt = pixel_features(src_dir, swapped)
    assert crosslab.transfer_probe(src, tgt)["xl_linear"] < 0.2


def test_objective_is_the_mean_of_in_domain_and_cross_lab_5shot_and_ranks_a_grid():
    assert crosslab.objective({"5shot": 0.6, "xl_5shot": 0.4}) == pytest.approx(0.5)
    res = {"a": {"objective": (0.4, 0.0)}, "raw": {}, "b": {"objective": (0.6, 0.0)}}
    assert list(quality.ranked(res)) == ["b", "a", "raw"]


def test_adaptation_columns_from_a_tiny_checkpoint(labs, tmp_path):
    src_dir, tgt_dir = labs
    recipe = load_recipe(str(tiny_recipe_yaml(tmp_path / "tiny.yaml", max_steps=2)),
                         [f"data.path={src_dir}", f"train.out={tmp_path / 'run'}", "train.device=cpu",
                          "model.backbone=resnet10t"])
    ckpt = fit(recipe).checkpoint
    source_fs = FeatureExtractor(ckpt, device="cpu", progress=False).features(src_dir)
    rows = {kind: crosslab.adapted_metrics(ckpt, src_dir, tgt_dir, source_fs, kind, tmp_path / kind, episodes=10,
                                           device="cpu", steps=2, overrides=["train.progress=false"])
            for kind in crosslab.ADAPT_KINDS}
    assert rows["continued"]["adapt_steps"] == 2 and rows["adabn"]["adapt_steps"] == 0
    for row in rows.values():
        assert all(0.0 <= row[k] <= 1.0 for k in quality.XL_METRICS)
        assert row["xl_5shot"] > 0.5  # chance 1/3: even a 2-step resnet keeps the colour
    again, info = crosslab.adapted_checkpoint(ckpt, tgt_dir, tmp_path / "continued", "continued", steps=2)
    assert info == {k: rows["continued"][k] for k in ("kind", "adapt_steps", "adapt_minutes")}  # reused, not rerun


def test_budgets_set_the_schedule_and_store_each_budget_apart():
    args = quality.parse_args(["--minutes", "20", "--cross-lab", "none"])
    budget = quality.run_budget(args)
    recipe = quality.row_recipe({"method": "vicreg"}, args, tuple(quality.budget_overrides(budget)))
    assert recipe.train.max_minutes == 20 and recipe.train.max_steps is None
    assert (recipe.train.batch_size, recipe.views.n_views) == (128, 2)  # TUNED still applies
    steps = quality.parse_args(["--steps", "7", "--cross-lab", "none"])
    recipe = quality.row_recipe({"method": "vicreg"}, steps, tuple(quality.budget_overrides(quality.run_budget(steps))))
    assert recipe.train.max_steps == 7 and recipe.train.max_minutes is None
    assert quality.store_name("VICReg", budget) != quality.store_name("VICReg", quality.run_budget(steps))


def fake_seed(acc: float, steps: int = 0) -> dict:
    row = {k: acc for k in common.METRICS + common.XL_METRICS}
    budget = {"steps": steps, "minutes": 20.0, "batch": 64, "n_views": 4, "views_per_s": 50.0} if steps else {}
    return {**row, **budget}


def test_report_puts_equal_minutes_first_and_untrained_rows_in_every_table():
    args = quality.parse_args(["--cross-lab", "none", "--eval-on", "val"])
    rows = {"raw pixels (16×16×3)": {"kind": "raw"}, "MSBReg": {"method": "msbreg"}}
    store = {}
    for name, budget, seed in [("raw pixels (16×16×3)", None, fake_seed(0.5)),
                               ("MSBReg", {"steps": 400}, fake_seed(0.6, 400)),
                               ("MSBReg", {"minutes": 20.0}, fake_seed(0.7, 277))]:
        store[quality.store_name(name, budget)] = {"row": name, "key": quality.row_key(name, rows[name], args),
                                                   "budget": budget, "seeds": {"0": seed},
                                                   "commands": [{"command": f"cmd {budget}", "date": "today"}]}
    tables = quality.collect(store, rows, args)
    assert list(tables) == ["20 min", "400 steps"]
    assert all(list(t["results"]) == ["raw pixels (16×16×3)", "MSBReg"] for t in tables.values())
    text = "\n".join(line for label, t in tables.items() for line in quality.budget_section(label, t, args))
    assert text.index("## Equal minutes: 20 min") < text.index("## Equal image-views: 400 steps")
    assert "| MSBReg | 0.700 |" in text and "| 277 | 64×4 | 50 |" in text and "**0.700**" in text


def test_variants_and_shipped_baseline_recipes_become_rows(tmp_path):
    (tmp_path / "blood_smear_vicreg.yaml").write_text("method: {name: vicreg}\n")
    (tmp_path / "blood_smear.yaml").write_text("method: {name: msbreg}\n")
    assert quality.recipe_rows(tmp_path) == {"`blood_smear_vicreg` recipe": {"method": "vicreg",
                                                                              "recipe": "blood_smear_vicreg"}}
    rows = quality.with_variants({"raw": {"kind": "raw"}, "MSBReg": {"method": "msbreg"}},
                                 ["weak colour=recipes/ablation/weak_colour.yaml", "grey=views.saturation=1.0"])
    assert list(rows) == ["raw", "MSBReg", "MSBReg + weak colour", "MSBReg + grey"]
    args = quality.parse_args(["--cross-lab", "none"])
    weak = quality.row_recipe(rows["MSBReg + weak colour"], args)
    assert (weak.views.hed_jitter, weak.views.brightness, weak.views.saturation, weak.views.hue) == (
        0.02, 0.1, 0.05, 0.0)
    assert quality.row_recipe(rows["MSBReg + grey"], args).views.saturation == 1.0
    assert quality.row_recipe(rows["MSBReg"], args).views.hed_jitter == 0.04  # the shipped recipe is untouched
    assert len({quality.row_key(n, s, args) for n, s in rows.items() if "method" in s}) == 3
    np.testing.assert_equal(quality.budget_order("20 min") < quality.budget_order("5 steps"), True)


def test_tuning_c_grid_tries_each_lab_view_switch_for_msbreg_and_vicreg() -> None:
    args = quality.parse_args(["--eval-on", "val", "--minutes", "10"])
    rows = quality.load_grid(str(REPO / "benchmarks" / "tuning_C_views.yaml"))
    switched = {}
    for name, spec in rows.items():
        r = quality.row_recipe(spec, args)
        assert r.method.name == spec["method"], name
        for key in ("grayscale_p", "zoom_out_p", "randstain_p"):
            if getattr(r.views, key) > 0:
                switched.setdefault(key, set()).add(r.method.name)
    assert switched == {k: {"msbreg", "vicreg"} for k in ("grayscale_p", "zoom_out_p", "randstain_p")}


def test_orientation_averaging_is_part_of_a_rows_key_and_plain_rows_keep_theirs():
    """``--tta none`` (plain features) keeps the key rows stored before ``--tta`` existed had, so they
    are still reported; the default (orientation-averaged features) is stored apart from them."""
    spec = {"method": "msbreg"}
    plain = quality.parse_args(["--cross-lab", "none", "--tta", "none"])
    default = quality.parse_args(["--cross-lab", "none"])
    assert default.tta == "auto"
    blob = [spec.get("kind", "ssl"), quality.row_overrides(spec, plain), [], plain.recipe,
            quality.recipe_text(plain.recipe), plain.eval_on, plain.episodes, plain.probe_max, str(plain.cross_lab)]
    before = hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]
    assert quality.row_key("MSBReg", spec, plain) == before
    assert quality.row_key("MSBReg", spec, default) != before
    assert quality.row_key("MSBReg", spec, default, features=False) == before  # the same trained runs
    lines = "\n".join(quality.TTA_LINES.values())
    assert "8 rotations and flips" in lines and "plain features" in lines


def test_feature_options_benchmark_reads_size_orientation_and_power_and_refuses_the_rest():
    from benchmarks import feature_options

    assert feature_options.parse_option("80:dihedral") == (80, "dihedral", 1.0)
    assert feature_options.parse_option("64:none:0.5") == (64, "none", 0.5)
    for bad in ("80", "x:none", "64:rot4", "64:none:0", "64:none:2", "64:none:half", "64:none:0.5:1"):
        with pytest.raises(SystemExit, match="is not SIZE:TTA"):
            feature_options.parse_option(bad)
    row = {"linear": 0.9, "knn": 0.8, "5shot": 0.6, "seconds": 12.0}
    line = feature_options.table_lines([("a.pt", 64, "dihedral", 1.0, row)])[-1]
    assert line == "| `a.pt` | 64 | mean of 8 rotations and flips | 0.900 | 0.800 | 0.600 | – | – | 12 |"
    assert "| one pass, x^0.5 |" in feature_options.table_lines([("a.pt", 64, "none", 0.5, row)])[-1]


def test_feature_options_power_transform_takes_the_root_of_each_feature():
    from benchmarks.feature_options import power_transform
    from cellssl.eval.features import FeatureSet

    fs = FeatureSet(np.array([[4.0, 0.0, 9.0]], dtype=np.float32), np.array([0]), ["a.png"], ["a"])
    assert power_transform(fs, 1.0) is fs
    out = power_transform(fs, 0.5)
    assert out.features.dtype == np.float32 and np.allclose(out.features, [[2.0, 0.0, 3.0]])
    assert out.paths == fs.paths and np.allclose(fs.features, [[4.0, 0.0, 9.0]])  # the input is kept"
