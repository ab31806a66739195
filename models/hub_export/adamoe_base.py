"""The base transformers model inside an AdaMoE export (model_type adamoe_<base>), read without remote code.

An AdaMoE export's config.json is its base model's configuration (Mixtral / Qwen2-MoE / OLMoE) under a model type
of its own, plus the `adamoe` entry with the retrofit settings. This repository restores such a model in two steps,
as it always did for retrofitted checkpoints: the base model from the folder (`load_adamoe_base`: the null-gate
tensors are skipped), then `models.moe.restore_retrofit(model, folder)`, which retrofits it with the saved
settings and copies the null gates in (block by block under ZeRO-3, see recipes/adamoe).

This module imports nothing of models.moe, so models.moe may use it (no import cycle).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from models.hub_export.export_names import ADAMOE_MODEL_TYPES

ADAMOE_BASE_TYPES = {adamoe: base for base, adamoe in ADAMOE_MODEL_TYPES.items()}
# config.json keys of an export that are not fields of the base model's configuration
EXPORT_ONLY_KEYS = ("model_type", "auto_map", "architectures", "transformers_version")


def read_config(path: Union[str, Path]) -> Dict[str, Any]:
    """config.json of a save_pretrained / export folder, as a dict."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json: it is not an export / save_pretrained directory")
    return json.loads(config_file.read_text())


def is_adamoe_export(path: Union[str, Path]) -> bool:
    """True for a folder whose config.json has an AdaMoE export's model type (adamoe_mixtral, ...)."""
    return (Path(path) / "config.json").is_file() and read_config(path).get("model_type") in ADAMOE_BASE_TYPES


def base_config_of_adamoe_export(path: Union[str, Path]) -> Any:
    """The transformers configuration of the base model of an AdaMoE export, its `adamoe` entry included."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    payload = read_config(path)
    base_type = ADAMOE_BASE_TYPES.get(payload.get("model_type"))
    if base_type is None:
        raise ValueError(f"{path}: model_type {payload.get('model_type')!r} is not that of an AdaMoE export "
                         f"({', '.join(ADAMOE_BASE_TYPES)})")
    return CONFIG_MAPPING[base_type](**{k: v for k, v in payload.items() if k not in EXPORT_ONLY_KEYS})


def load_adamoe_base(path: Union[str, Path], dtype: Optional[torch.dtype] = None,
                     **from_pretrained_kwargs: Any) -> nn.Module:
    """The base transformers model of an AdaMoE export with `config.adamoe`, WITHOUT its null gates:
    `models.moe.restore_retrofit(model, path)` adds them. dtype: float32 unless given; other keyword arguments
    (device_map, ...) go to from_pretrained."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = base_config_of_adamoe_export(path)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the null gates are "unexpected" for the base model: restore_retrofit's job
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), config=config, use_safetensors=True,
                                                    dtype=dtype or torch.float32, **from_pretrained_kwargs)
    finally:
        hf_logging.set_verbosity(previous)
