"""AdaMoE causal LMs for transformers (copied into every AdaMoE export folder by models/hub_export).

Each class is the transformers base model (Mixtral / Qwen2-MoE / OLMoE) whose sparse blocks are replaced, when
it is built, by `models.moe.retrofit` with the settings recorded in `config.adamoe`: the same function, from the
same source (bundled next to this file), that built the trained model. The module names are the retrofitted
model's, so `from_pretrained` loads the exported weights, null gates included, as they are; only `retrofit`
needs the base model_type, which it reads from a view of the config (`BaseModelView`).
"""
from __future__ import annotations

import copy

from torch import nn
from transformers import MixtralForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM

from models.hub_export.configuration_adamoe import (
    ADAMOE_KEY,
    AdaMoEMixtralConfig,
    AdaMoEOlmoeConfig,
    AdaMoEQwen2MoeConfig,
)
from models.moe import retrofit, saved_retrofit_settings


class BaseModelView(nn.Module):
    """`model` as `retrofit` expects it: a config copy whose model_type is the base one. `retrofit` replaces
    the sparse blocks inside `model` itself (they are reached through this view's submodule)."""

    def __init__(self, model: nn.Module, base_model_type: str) -> None:
        super().__init__()
        config = copy.copy(model.config)
        config.model_type = base_model_type
        self.config = config
        self.wrapped = model


def retrofit_from_config(model: nn.Module, base_model_type: str) -> nn.Module:
    """Replace the sparse blocks of a freshly built base model with AdaMoE blocks as `config.adamoe` says."""
    if not getattr(model.config, ADAMOE_KEY, None):
        raise ValueError(f"{type(model).__name__}: the config has no '{ADAMOE_KEY}' entry (the retrofit settings)")
    view = BaseModelView(model, base_model_type)
    retrofit(view, **saved_retrofit_settings(view))
    model.config.output_router_logits = False  # what retrofit sets: transformers' aux loss is not null-aware
    return model


class AdaMoEMixtralForCausalLM(MixtralForCausalLM):
    config_class = AdaMoEMixtralConfig

    def __init__(self, config: AdaMoEMixtralConfig) -> None:
        super().__init__(config)
        retrofit_from_config(self, config.base_model_type)


class AdaMoEQwen2MoeForCausalLM(Qwen2MoeForCausalLM):
    config_class = AdaMoEQwen2MoeConfig

    def __init__(self, config: AdaMoEQwen2MoeConfig) -> None:
        super().__init__(config)
        retrofit_from_config(self, config.base_model_type)


class AdaMoEOlmoeForCausalLM(OlmoeForCausalLM):
    config_class = AdaMoEOlmoeConfig

    def __init__(self, config: AdaMoEOlmoeConfig) -> None:
        super().__init__(config)
        retrofit_from_config(self, config.base_model_type)


ADAMOE_MODELS = (AdaMoEMixtralForCausalLM, AdaMoEQwen2MoeForCausalLM, AdaMoEOlmoeForCausalLM)
