"""A new method needs no engine edit: a toy recipe defined entirely in this file (its YAML, typed config section,
validation, LightningModule and callback) registers itself and trains 2 steps through the standard engine.
docs/adding_a_method.md walks through the same toy."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Any, Dict

import lightning as L
import pytest

from recipes.engine.config import ConfigError, load_config
from recipes.engine.loop import train
from recipes.engine.module import CausalLMModule
from recipes.engine.recipe import REGISTRY, Recipe, register


@dataclass
class ToyConfig:
    logit_penalty: float = 0.01  # weight of a penalty on the squared logits (the toy's "method")


def check(cfg) -> None:
    if cfg.toy.logit_penalty < 0:
        raise ConfigError(f"toy.logit_penalty must be >= 0, got {cfg.toy.logit_penalty}.")


class ToyModule(CausalLMModule):
    def __init__(self, *args, logit_penalty: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.logit_penalty = logit_penalty

    @classmethod
    def config_options(cls, cfg) -> Dict[str, Any]:
        return {"logit_penalty": cfg.toy.logit_penalty}

    def extra_losses(self, batch, outputs):
        return {"logit_penalty": self.logit_penalty * outputs.logits.float().pow(2).mean()}


class CountSteps(L.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1


@pytest.fixture
def toy_recipe(tmp_path):
    yaml = tmp_path / "toy.yaml"
    yaml.write_text("model:\n  arch: llama\n  size: tiny\ntoy:\n  logit_penalty: 0.05\n")
    counter = CountSteps()
    recipe = register(Recipe(name="toy", yaml=yaml, method="toy", description="a test recipe",
                             sections={"toy": ToyConfig}, validate=check, module_cls=ToyModule,
                             callbacks=lambda cfg, run_dir: [counter]))
    yield recipe, counter
    REGISTRY.pop("toy", None)


def test_a_recipe_defined_outside_the_engine_trains(toy_recipe, tiny_overrides):
    _, counter = toy_recipe
    cfg = load_config("toy", tiny_overrides + ["trainer.max_steps=2", "trainer.log_every_n_steps=1",
                                               "data.batch_size=2", "data.block_size=32"])
    assert cfg.toy.logit_penalty == 0.05  # from its own YAML
    run_dir = train(cfg)
    assert counter.steps == 2  # its callback ran
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    penalties = [float(r["train/logit_penalty"]) for r in rows if r.get("train/logit_penalty")]
    assert len(penalties) == 2 and all(p > 0 for p in penalties)  # its loss term was added and logged
    assert (run_dir / "summary.json").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()


def test_its_config_is_typed_and_validated(toy_recipe):
    with pytest.raises(ConfigError, match="toy.logit_penalty must be >= 0"):
        load_config("toy", ["toy.logit_penalty=-1"])
    with pytest.raises(ConfigError, match="Did you mean: toy.logit_penalty"):
        load_config("toy", ["toy.logit_penalt=1"])
    with pytest.raises(ConfigError, match="expects type float"):
        load_config("toy", ["toy.logit_penalty=abc"])
