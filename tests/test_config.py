"""Typed recipes: YAML + overlays + --set overrides, validated once."""

import pytest
import yaml

import cellssl.methods  # noqa: F401  (registers the methods' settings, which recipes are built from)
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


# ---- every value checked: types, finiteness, ranges (docs/reliability.md) -------------------
import dataclasses  # noqa: E402
import math  # noqa: E402
import typing  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cellssl.config import METHOD_SETTINGS, Recipe, value_range, value_type  # noqa: E402

# each method.* key -> a method it belongs to (the method section's fields are those of the method named)
OWNER = {f"method.{f.name}": name for name, cls in sorted(METHOD_SETTINGS.items()) for f in dataclasses.fields(cls)}
FIELDS = [f"{s.name}.{f.name}" for s in dataclasses.fields(Recipe) if dataclasses.is_dataclass(s.default_factory)
          for f in dataclasses.fields(s.default_factory)] + sorted(OWNER)
NUMERIC = [k for k in FIELDS if value_type(k, element=True) in (int, float)]


def _nested(key: str, value) -> dict:
    section, name = key.split(".")
    return {section: {**({"name": OWNER[key]} if key in OWNER else {}), name: value}}


def _wrong_type(key: str) -> st.SearchStrategy:
    """Values of the wrong type for ``key`` (never convertible to it)."""
    tp, elem = value_type(key), value_type(key, element=True)
    is_list = typing.get_origin(tp) is list or list in [typing.get_origin(a) for a in typing.get_args(tp)]
    junk = st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2)
    words = st.text(alphabet="abcxyz_-", min_size=1, max_size=6).filter(
        lambda s: s.lower() not in ("none", "null", "true", "false", "yes", "no", "nan", "inf", "infinity"))
    if elem is bool:
        bad = st.one_of(words, st.integers(2, 99), st.floats(0.1, 0.9), junk)
    elif elem is int:
        bad = st.one_of(words, st.booleans(), st.floats(0.1, 0.9).map(lambda x: x + 1), junk)
    elif elem is float:
        bad = st.one_of(words, st.booleans(), junk)
    else:  # str: a mapping is never a string
        bad = junk
    return st.one_of(bad, bad.map(lambda v: [v])) if is_list and elem is not str else bad


def _out_of_range(key: str) -> st.SearchStrategy:
    """Finite values just or far outside ``key``'s range, and non-finite numbers."""
    rng, elem = value_range(key), value_type(key, element=True)
    options = [st.sampled_from([math.nan, math.inf, -math.inf, "nan", "-inf"])] if elem is float else []
    if rng is not None:
        if rng.lo is not None:
            below = st.floats(-1e12, rng.lo, exclude_max=not rng.lo_open)
            options.append(below.map(math.floor) if elem is int else below)
        if rng.hi is not None:
            above = st.floats(rng.hi, 1e12, exclude_min=not rng.hi_open)
            options.append(above.map(math.ceil).filter(lambda v: v > rng.hi or rng.hi_open) if elem is int else above)
    return st.one_of(*options)


@pytest.mark.parametrize("key", FIELDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_every_recipe_field_rejects_wrong_types_in_one_line(key, data):
    value = data.draw(_wrong_type(key))
    with pytest.raises(ConfigError) as exc:
        recipe_from_dict(_nested(key, value))
    assert key in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("key", [k for k in NUMERIC if value_range(k) is not None or value_type(k, True) is float])
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_every_numeric_field_rejects_out_of_range_and_non_finite_values(key, data):
    value = data.draw(_out_of_range(key))
    with pytest.raises(ConfigError) as exc:
        recipe_from_dict(_nested(key, [value, value] if typing.get_origin(value_type(key)) is list
                                 or "list" in str(value_type(key)) else value))
    msg = str(exc.value)
    assert key in msg and "\n" not in msg
    assert "finite" in msg or value_range(key).describe() in msg


def test_every_numeric_field_has_a_range():
    """A new numeric recipe value needs its allowed range in config._RANGES (tiff_page: any index;
    data.mean: any finite number)."""
    assert {k for k in NUMERIC if value_range(k) is None} == {"data.tiff_page", "data.mean"}


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(FIELDS),
       value=st.recursive(st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats() | st.text(max_size=8),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=2),
                          max_leaves=4))
def test_any_value_gives_a_recipe_or_a_one_line_config_error(key, value):
    try:
        r = recipe_from_dict(_nested(key, value))
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(r, Recipe)


def test_lab_view_values_are_checked() -> None:
    from cellssl.config import load_recipe

    r = load_recipe("blood_smear")
    assert (r.views.grayscale_p, r.views.zoom_out_p, r.views.randstain_p) == (0.0, 0.0, 0.0)  # off by default
    with pytest.raises(ConfigError, match="views.randstain_mean must hold 6 numbers"):
        load_recipe("blood_smear", overrides=["views.randstain_mean=[80, 10, 7]"])
    with pytest.raises(ConfigError, match="LAB stds and must be > 0"):
        load_recipe("blood_smear", overrides=["views.randstain_mean=[80, 10, 7, 0, 8, 13]"])
    with pytest.raises(ConfigError, match="views.zoom_out_max must be at least 1"):
        load_recipe("blood_smear", overrides=["views.zoom_out_max=0.5"])
    with pytest.raises(ConfigError, match="views.grayscale_p must be in \\[0, 1\\]"):
        load_recipe("blood_smear", overrides=["views.grayscale_p=1.5"])
