"""The contract between the engine and a method: a `Recipe`, registered by name.

A method folder (`recipes/<method>/__init__.py`) builds one `Recipe` per runnable recipe and calls
`register(...)`. The engine reads only the fields below; it never imports a method folder by name. The
method folders are listed once, in `recipes/__init__.py` (`METHODS`): that list is the one line a new
method adds.

Which hook does what, in the order train() uses them:

  sections       typed config sections the recipe adds (key -> dataclass), checked like the shared keys
  validate       every check of those options, run when the config is loaded (before any training)
  prepare_model  (cfg, model, datamodule) -> model: e.g. AdaMoE's retrofit, LoRA
  module_cls     the LightningModule (a CausalLMModule subclass), built with `module_cls.from_config`
  callbacks      (cfg, run_dir) -> extra Lightning callbacks
  stages         (cfg) -> list of pipeline Stages: a staged recipe (fusechat, twin_merging) replaces the
                 single training run by these (recipes/engine/pipeline.py)
  commands       extra CLI subcommands: name -> main(argv) -> exit code (e.g. `analyze`, `fuse`)
  panels         the recipe's own dashboard / report panels (recipes/engine/panels.py): Panels, or
                 (cfg) -> Panels; every recipe also gets the common ones (losses, throughput)
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from .errors import ConfigError

ENGINE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Recipe:
    name: str
    yaml: Path  # the recipe's YAML (layered over recipes/engine/base.yaml)
    method: str  # the folder it belongs to ("engine" for the shared tiny recipes); a W&B tag
    description: str = ""
    sections: Mapping[str, type] = field(default_factory=dict)
    validate: Optional[Callable[[Any], None]] = None
    prepare_model: Optional[Callable[[Any, Any, Any], Any]] = None
    module_cls: Optional[type] = None  # None: recipes.engine.module.CausalLMModule
    callbacks: Optional[Callable[[Any, Path], List[Any]]] = None
    stages: Optional[Callable[[Any], Sequence[Any]]] = None
    # Under deepspeed_stage_3 + model.pretrained, build the model inside each process, partitioned
    # (recipes/engine/build.py). False for modules that need the whole model when they are constructed.
    zero3_deferred: bool = True
    # Config keys of the recipe's own sections that define its checkpoints (e.g. the number of null experts):
    # `make resume` refuses overrides of them (the engine's own such keys: loop.FIXED_ON_RESUME).
    fixed_on_resume: Sequence[str] = ()
    metric_prefixes: Sequence[str] = ()  # the metric families the recipe logs (e.g. "moe/"), for docs/dashboards
    commands: Mapping[str, Callable[[List[str]], int]] = field(default_factory=dict)
    # Dashboard / report panels beyond the common ones: a sequence of recipes.engine.panels.Panel, or a callable
    # (cfg) -> panels when the keys follow from the config (`make dashboard`, `make report`).
    panels: Union[Sequence[Any], Callable[[Any], Sequence[Any]]] = ()

    @property
    def staged(self) -> bool:
        return self.stages is not None


REGISTRY: Dict[str, Recipe] = {}
# Sections every recipe has besides its own (e.g. `routing_probe`, the opt-in routing callback of any MoE).
ENGINE_SECTIONS: Dict[str, type] = {}
ENGINE_VALIDATORS: List[Callable[[Any], None]] = []
_loaded = False


def register(recipe: Recipe) -> Recipe:
    """Add a recipe to the registry (a method folder's __init__ calls this once per recipe)."""
    if recipe.name in REGISTRY and REGISTRY[recipe.name] != recipe:
        raise ValueError(f"recipe '{recipe.name}' is registered twice")
    if not Path(recipe.yaml).is_file():
        raise ValueError(f"recipe '{recipe.name}': {recipe.yaml} does not exist")
    REGISTRY[recipe.name] = recipe
    return recipe


def register_engine_section(name: str, cls: type, validate: Optional[Callable[[Any], None]] = None) -> None:
    ENGINE_SECTIONS[name] = cls
    if validate is not None and validate not in ENGINE_VALIDATORS:
        ENGINE_VALIDATORS.append(validate)


def load_all() -> None:
    """Import the engine's own recipes and every method folder named in recipes.METHODS (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("recipes.engine.builtin")
    for method in importlib.import_module("recipes").METHODS:
        importlib.import_module(f"recipes.{method}")


def recipe_names() -> List[str]:
    load_all()
    return sorted(REGISTRY)


def get_recipe(name: str) -> Recipe:
    load_all()
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown recipe '{name}'.{hint} Available recipes: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[name]


def all_commands() -> Dict[str, Callable[[List[str]], int]]:
    """Extra CLI subcommands contributed by the recipes (name -> main(argv))."""
    load_all()
    out: Dict[str, Callable[[List[str]], int]] = {}
    for r in REGISTRY.values():
        out.update(r.commands)
    return out
