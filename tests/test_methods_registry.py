"""A method is one file: its settings live beside it, and recipes, checkpoints and the CLI read the registry.

A toy method is declared in this file only (its settings dataclass and its loss), registered, trained
through the command line with ``--set method.name=toy --set method.toy_weight=0.5``, validated from its
field metadata and listed by ``cellssl list methods``; then removed again. Recipes and checkpoints
written when one flat ``MethodConfig`` held every method's fields still load.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import yaml
from torch import Tensor

from cellssl.config import (
    METHOD_SETTINGS,
    MethodConfig,
    Range,
    load_recipe,
    method_config,
    migrate_checkpoint_config,
    recipe_from_dict,
    recipe_to_dict,
    setting,
    validate,
    with_method,
)
from cellssl.engine.checkpoint import FORMAT, load_checkpoint
from cellssl.errors import ConfigError
from cellssl.methods import METHODS, SSLMethod, register_method
from cellssl.methods.base import unregister_method
from cellssl.methods.msbreg import MSBRegSettings
from cellssl.methods.simclr import SimCLRSettings
from cellssl.methods.vicreg import VICRegSettings
from conftest import one_error_line, run_cli, tiny_recipe_yaml

SEEN: dict[str, float] = {}  # what the toy's forward read from its settings


@dataclass
class ToySettings(MethodConfig):
    """The toy method's own recipe setting."""

    toy_weight: float = setting(1.0, Range(0, 1), "weight of the toy loss")


class Toy(SSLMethod):
    """Toy: the mean squared distance between the projections of the first two views, weighted."""

    loss_terms = {"loss_toy": ("toy_weight",)}

    def forward(self, views: Tensor) -> dict[str, Tensor]:
        x, b, m = self.flatten_views(views, min_views=2)
        z_flat = self.online(x)
        z = self.unflatten(z_flat, b, m)
        SEEN["toy_weight"] = self.cfg.toy_weight
        loss = self.cfg.toy_weight * (z[:, 0] - z[:, 1]).pow(2).mean()
        return {"loss": loss, "loss_toy": loss.detach(), "z": z_flat.detach()}


@pytest.fixture
def toy():
    register_method("toy", settings=ToySettings)(Toy)
    yield Toy
    unregister_method("toy")
    assert "toy" not in METHODS and "toy" not in METHOD_SETTINGS


def test_a_method_declared_in_one_file_trains_validates_and_is_listed(toy, tmp_path, tiny_folder, capsys):
    recipe = tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=2, checkpoint_every=2)
    common = ["pretrain", "--recipe", str(recipe), "--data", str(tiny_folder), "--set", "model.backbone=test_resnet",
              "--set", "method.name=toy"]
    code, out, err = run_cli(capsys, *common, "--out", str(tmp_path / "run"), "--set", "method.toy_weight=0.5")
    assert code == 0, err
    assert "pretrained 2/2 steps" in out
    assert SEEN["toy_weight"] == 0.5  # the setting reached the method
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method"]
    assert saved == {"name": "toy", "momentum_base": 0.99, "momentum_end": 1.0, "toy_weight": 0.5}

    code, _, err = run_cli(capsys, *common, "--out", str(tmp_path / "bad"), "--set", "method.toy_weight=2")
    assert one_error_line(code, err) == "error: method.toy_weight must be in [0, 1], got 2.0"  # its field's range
    code, _, err = run_cli(capsys, *common, "--out", str(tmp_path / "bad"), "--set", "method.sv_weight=0.5")
    line = one_error_line(code, err)
    assert "'method.sv_weight' for method 'toy' (a setting of msbreg)" in line and "method.toy_weight" in line

    code, out, _ = run_cli(capsys, "list", "methods")
    assert code == 0
    assert "toy      Toy: the mean squared distance" in out
    assert "method.toy_weight=1.0 (in [0, 1]): weight of the toy loss" in out


def test_a_key_of_another_method_is_one_line_naming_the_methods_keys():
    with pytest.raises(ConfigError) as exc:
        load_recipe("blood_smear", ["method.temperature=0.5"])
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("unknown recipe key 'method.temperature' for method 'msbreg' (a setting of simclr); "
                          "the keys of msbreg: method.name, method.momentum_base")
    assert "method.sv_weight" in msg and "method.sv_on" in msg
    with pytest.raises(ConfigError, match="unknown method.name 'vicrg' \\(did you mean 'vicreg'\\?\\); available: "):
        load_recipe("blood_smear", ["method.name=vicrg"])


def test_switching_method_drops_the_recipes_other_settings_at_their_defaults():
    """``--method vicreg`` on an MSBReg recipe: its MSBReg keys hold MSBReg's defaults and are dropped;
    a value the user changed for MSBReg would be lost silently, so it is an error."""
    r = load_recipe("blood_smear", ["method.name=vicreg", "method.vicreg_sim=10"])
    assert type(r.method) is VICRegSettings and r.method.vicreg_sim == 10.0 and r.method.momentum_base == 0.99
    assert not hasattr(r.method, "sv_weight")
    assert recipe_to_dict(r)["method"] == {"name": "vicreg", "momentum_base": 0.99, "momentum_end": 1.0,
                                           "vicreg_sim": 10.0, "vicreg_var": 25.0, "vicreg_cov": 1.0}
    with pytest.raises(ConfigError, match="'method.sv_weight' for method 'vicreg' \\(a setting of msbreg\\)"):
        load_recipe("blood_smear", ["method.name=vicreg"], overlays=["ablation/centroid"])  # sv_weight: 0.0


def test_every_shipped_recipe_and_overlay_loads_with_its_methods_settings():
    from cellssl.config import RECIPES_DIR, available_recipes

    loaded = {name: load_recipe(name) for name in available_recipes()}
    for recipe in loaded.values():
        assert type(recipe.method) is METHOD_SETTINGS[recipe.method.name]
        assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
    assert type(loaded["blood_smear"].method) is MSBRegSettings  # blood_smear stays MSBReg's recipe (issue 20)
    assert type(loaded["blood_smear_vicreg"].method) is VICRegSettings
    overlays = sorted(RECIPES_DIR.glob("ablation/*.yaml"))
    assert len(overlays) >= 9
    for path in overlays:
        recipe = load_recipe("blood_smear", overlays=[str(path)])
        assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


# The method section of a checkpoint or run folder written before the split (cellssl at 0b36dc7):
# every method's fields, at their defaults unless the run changed them.
OLD_FLAT = {"name": "msbreg", "momentum_base": 0.99, "momentum_end": 1.0, "centroid_weight": 1.0, "sv_weight": 0.1,
            "brownian_weight": 0.1, "centroid_variant": "per_view", "sv_variant": "logdet", "sv_eps": 0.0001,
            "sv_on": "per_view", "temperature": 0.2, "vicreg_sim": 25.0, "vicreg_var": 25.0, "vicreg_cov": 1.0,
            "barlow_lambda": 0.0051}


def _old_config(**method) -> dict:
    config = recipe_to_dict(load_recipe("blood_smear"))
    config["method"] = {**OLD_FLAT, **method}
    return config


def test_an_old_checkpoint_with_every_methods_fields_loads_with_its_own(tmp_path):
    """Its own settings keep their values; another method's fields are dropped whatever they hold
    (they never acted on the run)."""
    path = tmp_path / "old.pt"
    torch.save({"format": FORMAT, "config": _old_config(name="vicreg", vicreg_sim=10.0, sv_weight=0.3), "model": {}},
               path)
    recipe = recipe_from_dict(load_checkpoint(path)["config"])
    assert recipe.method == VICRegSettings(name="vicreg", vicreg_sim=10.0)
    old = _old_config(sv_weight=0.3, sv_on="centroid", temperature=0.5, momentum_base=0.95)
    recipe = recipe_from_dict(migrate_checkpoint_config(old))
    assert recipe.method == MSBRegSettings(sv_weight=0.3, sv_on="centroid", momentum_base=0.95)


def test_an_old_run_folders_config_yaml_still_loads(tmp_path):
    """``--resume`` reads RUN/config.yaml: the other methods' fields hold their defaults there."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_old_config(name="simclr", temperature=0.5)))
    recipe = load_recipe(str(path))
    assert recipe.method == SimCLRSettings(temperature=0.5)
    assert recipe.method.name == "simclr"


def test_settings_and_their_name_stay_together():
    assert method_config("vicreg", vicreg_cov=2.0) == VICRegSettings(vicreg_cov=2.0)
    recipe = load_recipe("blood_smear")
    recipe.method.name = "vicreg"  # MSBReg's settings under another name
    with pytest.raises(ConfigError, match="does not match its settings \\(MSBRegSettings\\)"):
        validate(recipe)
    values = {"method": {"name": "msbreg", "sv_weight": 0.3, "momentum_base": 0.9}}
    assert with_method(values, "simclr") == {"method": {"name": "simclr", "momentum_base": 0.9}}
    assert with_method(values, "msbreg") == values


def test_adapt_with_another_method_starts_from_that_methods_settings(tmp_path):
    """``cellssl adapt --method simclr`` on an MSBReg run: SimCLR's own settings (a ``--set`` among
    them), the shared EMA settings kept; the source's tuned MSBReg values do not follow."""
    from cellssl.adapt.continued import adapted_recipe

    source = recipe_to_dict(load_recipe("blood_smear", ["method.sv_weight=0.3"]))
    r = adapted_recipe(source, tmp_path / "target", tmp_path / "out", method="simclr",
                       overrides=["method.temperature=0.1"])
    assert r.method == SimCLRSettings(temperature=0.1, momentum_base=r.adapt.momentum_base)
    same = adapted_recipe(source, tmp_path / "target", tmp_path / "out", method="msbreg")
    assert same.method.sv_weight == 0.3
