"""Twin-Merging (Lu et al., NeurIPS 2024): a shared expert (task arithmetic over domain fine-tunes) plus
SVD-compressed exclusive experts, mixed per input by a router over the shared model's hidden states.

Recipes:
  twin_merging  the staged pipeline: base -> one fine-tune per domain -> experts -> router -> evaluation of
                base, fine-tunes, task arithmetic, TIES and Twin-Merging (stages.py)
  twin_lora_ft  one peft LoRA fine-tune: the fine-tune stage under twin.finetune=lora (lora_ft.py)
  twin_merging_cls  classification tasks scored by accuracy / fine-tuned accuracy, as the paper (cls.py)

Modules: config.py (twin.* options and their checks), experts.py, router.py, evaluate.py, stages.py,
cls.py, lora_ft.py, bench.py (`make bench ARGS="--only twin_merging"`).
"""
from __future__ import annotations

from pathlib import Path
from typing import List

from recipes.engine.panels import Panel
from recipes.engine.recipe import Recipe, register

from . import cls, lora_ft
from .config import TwinConfig
from .stages import check_config, stages

HERE = Path(__file__).resolve().parent



def panels(cfg) -> List[Panel]:
    """Dashboard / report panels of twin_merging: the evaluation stage's table (the methods follow from
    data.domains); the training sub-runs (base, ft_<domain>) get the common panels."""
    methods = ["base", *(f"finetuned_{d}" for d in cfg.data.domains), "task_arithmetic", "ties", "twin_merging"]
    return [
        Panel("normalised score per method (mean over domains)", "bar",
              tuple(f"twin/normalised_mean/{m}" for m in methods), section="twin-merging results",
              note="(loss_base - loss) / (loss_base - loss_finetuned): 0 = base, 1 = the specialist"),
        Panel("test loss per method and domain", "table", ("twin/test_loss",), table="test_loss",
              section="twin-merging results"),
        Panel("normalised score per method and domain", "table", ("twin/normalised_score",),
              table="normalised_score", section="twin-merging results"),
        Panel("normalised scores chart", "image", ("twin/scores_chart",), files=("scores.png",),
              section="twin-merging results"),
        Panel("router accuracy on the test blocks", "scalar", ("router_test_acc",), section="twin-merging results",
              local_only=True, note="summary.json only"),
    ]


register(Recipe(
    name="twin_merging", yaml=HERE / "twin_merging.yaml", method="twin_merging",
    description="base, per-domain fine-tunes, shared + SVD exclusive experts, router, evaluation table",
    sections={"twin": TwinConfig}, validate=check_config, stages=stages, metric_prefixes=("twin/",),
    panels=panels))

register(Recipe(
    name="twin_lora_ft", yaml=HERE / "twin_lora_ft.yaml", method="twin_merging",
    description="one peft LoRA fine-tune (the fine-tune stage of twin_merging twin.finetune=lora)",
    sections={"twin_lora_ft": lora_ft.TwinLoraFTConfig}, validate=lora_ft.check_config,
    prepare_model=lora_ft.prepare_model, fixed_on_resume=lora_ft.FIXED_ON_RESUME))

def cls_panels(cfg) -> List[Panel]:
    """Panels of twin_merging_cls: the evaluate stage's accuracy table (the methods follow from twin_cls.tasks).
    That stage logs nothing to W&B: summary.json only."""
    methods = ["base", *(f"finetuned_{t}" for t in cfg.twin_cls.tasks), "task_arithmetic", "ties", "twin_merging"]
    note = "summary.json only (the staged parent run has no W&B run)"
    section = "twin-merging results"
    return [
        Panel("normalised accuracy per method (mean over tasks)", "bar",
              tuple(f"twin/normalised_mean/{m}" for m in methods), section=section, local_only=True,
              note="accuracy / the task's fine-tuned model's accuracy; " + note),
        Panel("test accuracy per method and task", "table", table="test_accuracy", section=section,
              local_only=True),
        Panel("normalised accuracy per method and task", "table", table="normalised_accuracy", section=section,
              local_only=True),
        Panel("normalised accuracy chart", "image", files=("scores.png",), section=section, local_only=True),
        Panel("router accuracy on the test examples", "scalar", ("router_test_acc",), section=section,
              local_only=True, note=note),
    ]


register(Recipe(
    name="twin_merging_cls", yaml=HERE / "twin_merging_cls.yaml", method="twin_merging",
    description="classification tasks on the tiny backbone: per-task fine-tunes, TA / TIES / Twin, accuracy "
                "normalised by the fine-tuned model's (the paper's score)",
    sections={"twin": TwinConfig, "twin_cls": cls.TwinClsConfig}, validate=cls.check_config, stages=cls.stages,
    metric_prefixes=("twin/",), panels=cls_panels))

# The papers' two settings as far as the recipe expresses them; what is missing: docs/paper_scale.md.
for _setting, _what in (("generative", "Qwen-14B architecture, LoRA r32 fine-tunes, lam 0.3 (embedded domains)"),
                        ("discriminative", "RoBERTa-base-sized decoder, full fine-tunes, lam 0.29 (embedded domains)")):
    register(Recipe(
        name=f"twin_merging_paper_{_setting}", yaml=HERE / f"twin_merging_paper_{_setting}.yaml",
        method="twin_merging", description=f"Twin-Merging {_setting} setting: {_what}",
        sections={"twin": TwinConfig}, validate=check_config, stages=stages, metric_prefixes=("twin/",),
        panels=panels))
