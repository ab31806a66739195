"""TokenFormer: every linear projection is attention over learnable parameter tokens; a trained model grows
by appending parameter tokens. Recipes `tokenformer` (from scratch) and `tokenformer_grow`. See README.md."""
from __future__ import annotations

from pathlib import Path

from recipes.engine.panels import Panel
from recipes.engine.recipe import Recipe, register

from .grow import GrownTokenFormerModule, TokenFormerGrowConfig, check_config

HERE = Path(__file__).resolve().parent

GROW_PANELS = (
    Panel("validation loss vs total tokens (source run, then grown)", "line", ("val/loss",), section="growth",
          x_offset="grow/source_tokens_seen", related_run="tokenformer_grow.from_run",
          note="report: the grown run shifted by the source run's tokens, the source run alongside, a from-scratch "
               "run with --compare; W&B: every tokenformer run, grown runs counted from the growth"),
    Panel("validation loss just before and after growth", "bar", ("grow/val_loss_before", "grow/val_loss_after"),
          section="growth", note="equal for init=zero_key, tau=frozen (function-preserving)"),
    Panel("parameters before and after growth", "bar", ("grow/params_before", "grow/params_after"),
          section="growth"),
    Panel("parameter tokens before and after growth", "bar",
          ("grow/from_qkv_tokens", "grow/to_qkv_tokens", "grow/from_ffn_tokens", "grow/to_ffn_tokens"),
          section="growth"),
    Panel("total tokens (source run + grown run)", "scalar", ("grow/total_tokens_seen",), section="growth"),
)

register(Recipe(
    name="tokenformer", yaml=HERE / "tokenformer.yaml", method="tokenformer",
    description="a TokenFormer (Pattention layers) trained from scratch"))

register(Recipe(
    name="tokenformer_grow", yaml=HERE / "tokenformer_grow.yaml", method="tokenformer",
    description="grow a finished tokenformer run by parameter tokens and train on",
    sections={"tokenformer_grow": TokenFormerGrowConfig}, validate=check_config,
    module_cls=GrownTokenFormerModule, zero3_deferred=False, metric_prefixes=("grow/",), panels=GROW_PANELS,
    fixed_on_resume=("tokenformer_grow.from_run", "tokenformer_grow.qkv_tokens", "tokenformer_grow.ffn_tokens",
                     "tokenformer_grow.grow_factor", "tokenformer_grow.init", "tokenformer_grow.tau")))

# The paper's progressive scaling 124M -> 354M -> 757M -> 1.4B on OpenWebText: the from-scratch start and one
# growth step per size, each grown from the previous step's run (docs/paper_scale.md).
register(Recipe(
    name="tokenformer_paper_124m", yaml=HERE / "tokenformer_paper_124m.yaml", method="tokenformer",
    description="TokenFormer paper scaling, step 0: the 124M model from scratch on OpenWebText"))
for _size, _label in (("354m", "354M"), ("757m", "757M"), ("1_4b", "1.4B")):
    register(Recipe(
        name=f"tokenformer_paper_grow_{_size}", yaml=HERE / f"tokenformer_paper_grow_{_size}.yaml",
        method="tokenformer", description=f"TokenFormer paper scaling: grow the previous step to {_label}",
        sections={"tokenformer_grow": TokenFormerGrowConfig}, validate=check_config,
        module_cls=GrownTokenFormerModule, zero3_deferred=False, metric_prefixes=("grow/",), panels=GROW_PANELS,
        fixed_on_resume=("tokenformer_grow.from_run", "tokenformer_grow.qkv_tokens", "tokenformer_grow.ffn_tokens",
                         "tokenformer_grow.grow_factor", "tokenformer_grow.init", "tokenformer_grow.tau")))
