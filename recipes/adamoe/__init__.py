"""AdaMoE: MoE routing with null experts, so that each token uses as many real experts as it needs.

Recipes: `adamoe` (a tiny Mixtral trained from scratch with null experts) and `adamoe_finetune` (retrofit a
pretrained MoE, LoRA fine-tune, multiple-choice evaluation, export). See README.md in this folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

from recipes.engine.panels import Panel, moe_panels, routing_probe_panels
from recipes.engine.recipe import Recipe, register

from . import finetune
from .module import AdaMoEConfig, AdaMoEModule, check_config, prepare_model

HERE = Path(__file__).resolve().parent
# What the retrofitted model's tensors depend on: a resume may not change these.
FIXED = ("adamoe.num_null_experts", "adamoe.top_k", "adamoe.lora_r", "adamoe.lora_target_modules")


def panels(cfg) -> List[Panel]:
    """Dashboard / report panels of `adamoe` (AdaMoEModule's keys; the 0..top_k shares follow adamoe.top_k)."""
    k = int(cfg.adamoe.top_k)
    return [
        Panel("true experts per token", "line", ("moe/true_experts_per_token", "val/moe_true_experts_per_token"),
              section="adamoe", note="training batches and validation; null and dropped slots excluded (the FLOPs "
                                     "proxy)"),
        Panel("share of tokens using i true experts (training)", "line", ("moe/share_true_experts_*",),
              section="adamoe", note=f"i = 0..top_k ({k}); per (token, layer) pair"),
        Panel("share of tokens using i true experts (validation)", "line", ("val/moe_share_true_experts_*",),
              section="adamoe"),
        Panel("share of tokens using 0..k true experts (last validation)", "bar",
              tuple(f"moe/share_true_experts_{i}" for i in range(k + 1)), section="adamoe"),
        Panel("null slots per real slot", "line", ("moe/null_slot_fraction",), section="adamoe"),
        Panel("true experts per token (final)", "scalar", ("moe/true_experts_per_token",), section="adamoe"),
        Panel("FLOPs vs the top-k baseline", "scalar", ("moe/flops_vs_topk",), section="adamoe",
              note="true experts per token / reference_top_k"),
        *moe_panels(), *routing_probe_panels(optional=True)]


def finetune_panels(cfg) -> List[Panel]:
    """`adamoe`'s panels (the train stage's sub-run) and the multiple-choice scores of the eval stage."""
    c = cfg.adamoe_finetune
    which = ("finetuned", "base") if c.eval_base else ("finetuned",)
    unscored = not (c.eval_file or c.eval_hub_name)  # no questions: no eval/* keys
    note = "the staged parent run has no W&B run: summary.json only"
    accuracy = tuple(f"eval/{w}_{m}" for w in which for m in ("accuracy", "accuracy_norm"))
    return panels(cfg) + [
        Panel("multiple-choice accuracy", "bar", accuracy, section="evaluation", local_only=True,
              optional=unscored, note=note),
        Panel("true experts per token on the questions", "bar",
              tuple(f"eval/{w}_true_experts_per_token" for w in which), section="evaluation", local_only=True,
              optional=unscored, note=note)]


register(Recipe(
    name="adamoe", yaml=HERE / "adamoe.yaml", method="adamoe",
    description="tiny Mixtral with 8 true + 8 null experts, top-3, from scratch",
    sections={"adamoe": AdaMoEConfig}, validate=lambda cfg: check_config(cfg.adamoe),
    prepare_model=prepare_model, module_cls=AdaMoEModule, metric_prefixes=("moe/",),
    fixed_on_resume=FIXED, panels=panels))

register(Recipe(
    name="adamoe_finetune", yaml=HERE / "adamoe_finetune.yaml", method="adamoe",
    description="retrofit a pretrained MoE with null experts, LoRA fine-tune, ARC-style eval, export",
    sections={"adamoe": AdaMoEConfig, "adamoe_finetune": finetune.AdaMoEFinetuneConfig},
    validate=finetune.check_config, stages=finetune.stages, metric_prefixes=("moe/", "eval/"), fixed_on_resume=FIXED,
    commands={"score_arc": finetune.score_main}, panels=finetune_panels))

# The paper's setting: Mixtral-8x7B, 8 true + 16 null experts, top-4, LoRA, ZeRO-3, ARC-Challenge (docs/paper_scale.md).
register(Recipe(
    name="adamoe_finetune_paper", yaml=HERE / "adamoe_finetune_paper.yaml", method="adamoe",
    description="AdaMoE paper setting: Mixtral-8x7B + 16 null experts, top-4, LoRA, ZeRO-3, ARC-Challenge",
    sections={"adamoe": AdaMoEConfig, "adamoe_finetune": finetune.AdaMoEFinetuneConfig},
    validate=finetune.check_config, stages=finetune.stages, metric_prefixes=("moe/", "eval/"), fixed_on_resume=FIXED,
    panels=finetune_panels))
