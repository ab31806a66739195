"""Every registered recipe's full config resolves and validates, and every recipe YAML in the tree belongs to a
registered recipe (a YAML nobody registers would be a config no test checks)."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from recipes.engine.config import ConfigError, load_config
from recipes.engine.recipe import REGISTRY, get_recipe, recipe_names
from tests.conftest import ROOT

NAMES = recipe_names()


def test_every_method_registers_recipes():
    methods = {REGISTRY[n].method for n in NAMES}
    assert {"engine", "adamoe", "openmoe", "tokenformer", "fusechat", "twin_merging"} <= methods
    assert {"tiny", "tiny_moe", "adamoe", "adamoe_finetune", "openmoe", "tokenformer", "tokenformer_grow",
            "fusechat", "twin_merging", "twin_lora_ft"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_resolves(name):
    cfg = load_config(name)
    assert cfg.run.name == name
    r = get_recipe(name)
    for section in r.sections:
        assert section in cfg, f"{name}: section {section} missing from the resolved config"
    text = OmegaConf.to_yaml(cfg, resolve=True)  # every interpolation resolves
    assert f"name: {name}" in text
    # the resolved config round-trips as a saved run config (what resume and export read back)
    again = load_config(name, base=OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_every_yaml_is_a_registered_recipe():
    yamls = {p.resolve() for p in (ROOT / "recipes").rglob("*.yaml") if p.name != "base.yaml"}
    registered = {get_recipe(n).yaml.resolve() for n in NAMES}
    assert yamls == registered, f"unregistered: {sorted(map(str, yamls - registered))}"


def test_unknown_recipe_lists_the_recipes():
    with pytest.raises(ConfigError, match="Did you mean 'adamoe'") as e:
        load_config("adamo")
    assert "tokenformer_grow" in str(e.value)
