"""OpenMoE analysis: a tiny OpenMoE-style MoE and routing probes that measure token-id specialisation,
early routing learning and drop-towards-the-end on any MoE run (`make analyze RUN=...`). See README.md."""
from __future__ import annotations

from pathlib import Path

from recipes.engine.recipe import Recipe, register

from .analyze import main as analyze_main
from .module import OpenMoEModule, OpenMoERecipeConfig, check_config, prepare_model

HERE = Path(__file__).resolve().parent

register(Recipe(
    name="openmoe", yaml=HERE / "openmoe.yaml", method="openmoe",
    description="tiny OpenMoE-style MoE (top-2, capacity 1.25/2.0), every checkpoint kept for `analyze`",
    sections={"openmoe": OpenMoERecipeConfig}, validate=check_config, prepare_model=prepare_model,
    module_cls=OpenMoEModule, zero3_deferred=False, metric_prefixes=("moe/", "analysis/"),
    commands={"analyze": analyze_main}))
