"""Config errors: each kind names what went wrong; the CLI exits non-zero without a traceback."""
import subprocess
import sys

import pytest

from recipes.engine.config import ConfigError, available_recipes, load_config, parse_overrides
from tests.conftest import ROOT


def test_recipes_listed():
    names = available_recipes()
    assert "tiny" in names and "tiny_moe" in names and "base" not in names


def test_layering_and_overrides():
    cfg = load_config("tiny", ["trainer.max_steps=7", "data.block_size=64", "optim.betas=[0.8,0.9]"])
    assert cfg.trainer.max_steps == 7 and cfg.data.block_size == 64
    assert list(cfg.optim.betas) == [0.8, 0.9]
    assert cfg.model.arch == "llama"  # from tiny.yaml
    assert cfg.trainer.val_check_interval == 50  # from base.yaml
    assert cfg.run.name == "tiny"


def test_unknown_recipe_lists_recipes():
    with pytest.raises(ConfigError) as e:
        load_config("tinyy")
    msg = str(e.value)
    assert "Unknown recipe 'tinyy'" in msg and "tiny_moe" in msg and "Did you mean 'tiny'" in msg


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["trainer.max_step=5"])
    msg = str(e.value)
    assert "trainer.max_step" in msg and "trainer.max_steps" in msg


def test_unknown_section():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["trainr.max_steps=5"])
    assert "'trainr'" in str(e.value) and "trainer" in str(e.value)


def test_wrong_type_names_key_type_value():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["data.block_size=big"])
    msg = str(e.value)
    assert "data.block_size" in msg and "int" in msg and "big" in msg


def test_free_dict_accepts_any_key():
    cfg = load_config("tiny", ["model.overrides.rope_theta=5000.0"])
    assert cfg.model.overrides.rope_theta == 5000.0


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["trainer.max_steps"])


@pytest.mark.parametrize("args,needle", [
    (["tinyy"], "Available recipes"),
    (["tiny", "trainer.max_stepz=3"], "trainer.max_steps"),
    (["tiny", "data.batch_size=abc"], "expects type int"),
])
def test_cli_errors_are_one_message(args, needle):
    r = subprocess.run([sys.executable, "-m", "recipes", "train", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
