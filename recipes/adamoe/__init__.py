"""AdaMoE: MoE routing with null experts, so that each token uses as many real experts as it needs.

Recipes: `adamoe` (a tiny Mixtral trained from scratch with null experts) and `adamoe_finetune` (retrofit a
pretrained MoE, LoRA fine-tune, multiple-choice evaluation, export). See README.md in this folder.
"""
from __future__ import annotations

from pathlib import Path

from recipes.engine.recipe import Recipe, register

from . import finetune
from .module import AdaMoEConfig, AdaMoEModule, check_config, prepare_model

HERE = Path(__file__).resolve().parent
# What the retrofitted model's tensors depend on: a resume may not change these.
FIXED = ("adamoe.num_null_experts", "adamoe.top_k", "adamoe.lora_r", "adamoe.lora_target_modules")

register(Recipe(
    name="adamoe", yaml=HERE / "adamoe.yaml", method="adamoe",
    description="tiny Mixtral with 8 true + 8 null experts, top-4, from scratch",
    sections={"adamoe": AdaMoEConfig}, validate=lambda cfg: check_config(cfg.adamoe),
    prepare_model=prepare_model, module_cls=AdaMoEModule, metric_prefixes=("moe/",),
    fixed_on_resume=FIXED))

register(Recipe(
    name="adamoe_finetune", yaml=HERE / "adamoe_finetune.yaml", method="adamoe",
    description="retrofit a pretrained MoE with null experts, LoRA fine-tune, ARC-style eval, export",
    sections={"adamoe": AdaMoEConfig, "adamoe_finetune": finetune.AdaMoEFinetuneConfig},
    validate=finetune.check_config, stages=finetune.stages, metric_prefixes=("moe/", "eval/"), fixed_on_resume=FIXED,
    commands={"score_arc": finetune.score_main}))
