"""Twin-Merging (Lu et al., NeurIPS 2024): a shared expert (task arithmetic over domain fine-tunes) plus
SVD-compressed exclusive experts, mixed per input by a router over the shared model's hidden states.

Recipes:
  twin_merging  the staged pipeline: base -> one fine-tune per domain -> experts -> router -> evaluation of
                base, fine-tunes, task arithmetic, TIES and Twin-Merging (stages.py)
  twin_lora_ft  one peft LoRA fine-tune: the fine-tune stage under twin.finetune=lora (lora_ft.py)

Modules: config.py (twin.* options and their checks), experts.py, router.py, evaluate.py, stages.py,
lora_ft.py, bench.py (`make bench ARGS="--only twin_merging"`).
"""
from __future__ import annotations

from pathlib import Path

from recipes.engine.recipe import Recipe, register

from . import lora_ft
from .config import TwinConfig
from .stages import check_config, stages

HERE = Path(__file__).resolve().parent

register(Recipe(
    name="twin_merging", yaml=HERE / "twin_merging.yaml", method="twin_merging",
    description="base, per-domain fine-tunes, shared + SVD exclusive experts, router, evaluation table",
    sections={"twin": TwinConfig}, validate=check_config, stages=stages, metric_prefixes=("twin/",)))

register(Recipe(
    name="twin_lora_ft", yaml=HERE / "twin_lora_ft.yaml", method="twin_merging",
    description="one peft LoRA fine-tune (the fine-tune stage of twin_merging twin.finetune=lora)",
    sections={"twin_lora_ft": lora_ft.TwinLoraFTConfig}, validate=lora_ft.check_config,
    prepare_model=lora_ft.prepare_model, fixed_on_resume=lora_ft.FIXED_ON_RESUME))
