"""TokenFormer: every linear projection is attention over learnable parameter tokens; a trained model grows
by appending parameter tokens. Recipes `tokenformer` (from scratch) and `tokenformer_grow`. See README.md."""
from __future__ import annotations

from pathlib import Path

from recipes.engine.recipe import Recipe, register

from .grow import GrownTokenFormerModule, TokenFormerGrowConfig, check_config

HERE = Path(__file__).resolve().parent

register(Recipe(
    name="tokenformer", yaml=HERE / "tokenformer.yaml", method="tokenformer",
    description="a TokenFormer (Pattention layers) trained from scratch"))

register(Recipe(
    name="tokenformer_grow", yaml=HERE / "tokenformer_grow.yaml", method="tokenformer",
    description="grow a finished tokenformer run by parameter tokens and train on",
    sections={"tokenformer_grow": TokenFormerGrowConfig}, validate=check_config,
    module_cls=GrownTokenFormerModule, zero3_deferred=False, metric_prefixes=("grow/",),
    fixed_on_resume=("tokenformer_grow.from_run", "tokenformer_grow.qkv_tokens", "tokenformer_grow.ffn_tokens",
                     "tokenformer_grow.init", "tokenformer_grow.tau")))
