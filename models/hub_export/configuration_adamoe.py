"""Configurations of AdaMoE exports (copied into every AdaMoE export folder by models/hub_export).

An AdaMoE model is a Hugging Face Mixtral / Qwen2-MoE / OLMoE whose sparse blocks `models.moe.retrofit`
replaced by blocks with null experts. Its export keeps the base model's configuration (every field, plus the
`adamoe` entry in which `retrofit` recorded its settings) under a model_type of its own, so that transformers
never builds the base architecture from it by mistake: `AutoConfig` / `AutoModelForCausalLM` refuse the folder
without `trust_remote_code=True` and with it use these classes and modeling_adamoe.py.
"""
from __future__ import annotations

from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig

from models.hub_export.export_names import ADAMOE_MODEL_TYPES

# The settings `models.moe.retrofit` records in the config (and restores the model from).
ADAMOE_KEY = "adamoe"


class AdaMoEMixtralConfig(MixtralConfig):
    """A Mixtral configuration with an `adamoe` entry: the model is retrofitted with null experts."""

    model_type = ADAMOE_MODEL_TYPES["mixtral"]
    base_model_type = "mixtral"


class AdaMoEQwen2MoeConfig(Qwen2MoeConfig):
    """A Qwen2-MoE configuration with an `adamoe` entry: the model is retrofitted with null experts."""

    model_type = ADAMOE_MODEL_TYPES["qwen2_moe"]
    base_model_type = "qwen2_moe"


class AdaMoEOlmoeConfig(OlmoeConfig):
    """An OLMoE configuration with an `adamoe` entry: the model is retrofitted with null experts."""

    model_type = ADAMOE_MODEL_TYPES["olmoe"]
    base_model_type = "olmoe"


ADAMOE_CONFIGS = (AdaMoEMixtralConfig, AdaMoEQwen2MoeConfig, AdaMoEOlmoeConfig)
