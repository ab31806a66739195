"""LoRA fine-tune used by the twin_merging recipe (twin.finetune=lora): peft LoRA adapters on the listed
linear modules, everything else frozen. A standard Lightning run otherwise (checkpoints, metrics.csv,
summary.json); the adapter is exported by twin_merging with peft's `save_pretrained` (safetensors)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch

from recipes.config import ConfigError, register_section


@register_section("twin_lora_ft")
@dataclass
class TwinLoraFTConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"])


def lora_config(c):
    from peft import LoraConfig
    if c.rank <= 0:
        raise ConfigError(f"twin_lora_ft.rank must be > 0, got {c.rank}.")
    if not list(c.targets):
        raise ConfigError("twin_lora_ft.targets is empty: name at least one linear module (e.g. q_proj).")
    return LoraConfig(r=int(c.rank), lora_alpha=float(c.alpha), lora_dropout=float(c.dropout),
                      target_modules=list(c.targets))


def prepare_model(cfg, model: torch.nn.Module, dm) -> torch.nn.Module:
    from peft import get_peft_model
    try:
        return get_peft_model(model, lora_config(cfg.twin_lora_ft))
    except ValueError as e:  # e.g. no module matches the targets
        raise ConfigError(f"twin_lora_ft.targets: peft could not wrap the model: {e}") from None
