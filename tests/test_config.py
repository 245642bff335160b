"""Typed recipes: YAML + overlays + --set overrides, validated once."""

import pytest
import yaml

from cellssl.config import available_recipes, load_recipe, recipe_from_dict, recipe_to_dict
from cellssl.errors import ConfigError


def test_shipped_recipes_load_and_round_trip():
    assert {"blood_smear", "fluorescence", "cpu_demo"} <= set(available_recipes())
    for name in available_recipes():
        r = load_recipe(name)
        assert recipe_from_dict(recipe_to_dict(r)) == r


def test_overrides_are_typed():
    r = load_recipe("blood_smear", ["views.crop_scale=[0.6, 1.0]", "train.max_steps=7", "model.stem=pool",
                                    "data.path=null", "train.compile=true"])
    assert r.views.crop_scale == [0.6, 1.0] and r.train.max_steps == 7 and r.model.stem == "pool"
    assert r.data.path is None and r.train.compile is True


def test_overlay_merges_one_section(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text(yaml.safe_dump({"method": {"sv_weight": 0.0}}))
    r = load_recipe("blood_smear", overlays=[str(overlay)])
    assert r.method.sv_weight == 0.0 and r.method.brownian_weight == 0.1  # the rest of the section stays


@pytest.mark.parametrize("override,fragment", [
    ("model.stem=wide", "model.stem: 'wide' is not one of"),
    ("views.n_views=1", "at least 2"),
    ("optim.name=adam", "did you mean 'adamw'"),
    ("modle.backbone=x", "unknown recipe key 'modle'"),
    ("train.epochs=1.5", "expected an integer"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_recipe("blood_smear", [override])


def test_legacy_loss_settings_are_migrated():
    """Recipes and checkpoints from before the per-view defaults still load, as what they meant."""
    old = recipe_from_dict({"method": {"centroid_variant": "centroid", "sv_per_view": False}})
    assert (old.method.centroid_variant, old.method.sv_on) == ("same_views", "stacked")
    assert recipe_from_dict({"method": {"sv_per_view": True}}).method.sv_on == "per_view"
    r = load_recipe("blood_smear", ["method.sv_per_view=false"])
    assert r.method.sv_on == "stacked"


def test_default_loss_forms_are_the_non_trivial_ones():
    for r in (recipe_from_dict({}), load_recipe("blood_smear")):
        assert r.method.centroid_variant == "per_view" and r.method.sv_on == "per_view"


def test_halves_needs_an_even_number_of_views():
    with pytest.raises(ConfigError, match="n_views must be even"):
        load_recipe("blood_smear", ["method.centroid_variant=halves", "views.n_views=3"])


def test_overlays_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # recipes/ is not below the working directory
    a = load_recipe("blood_smear", overlays=["ablation/centroid"])
    b = load_recipe("blood_smear", overlays=["recipes/ablation/centroid.yaml"])
    assert a == b and a.method.sv_weight == 0.0
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe("blood_smear", overlays=["recipes/ablation/nope.yaml"])


def test_model_pretrained_field():
    assert load_recipe("blood_smear").model.pretrained is None
    r = load_recipe("blood_smear", ["model.pretrained=resnet18.a1_in1k"])
    assert r.model.pretrained == "resnet18.a1_in1k"
