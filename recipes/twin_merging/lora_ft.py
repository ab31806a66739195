"""The `twin_lora_ft` recipe: a peft LoRA fine-tune, the fine-tune stage of twin_merging under
twin.finetune=lora. LoRA adapters on the listed linear modules, everything else frozen; a standard run
otherwise (checkpoints, metrics.csv, summary.json). The engine's export of such a run writes the peft
adapter (save_pretrained of the peft model: adapter_config.json + adapter_model.safetensors)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

import torch

from recipes.engine.errors import ConfigError

from .config import DEFAULT_LORA_TARGETS

# the options that shape the adapter tensors in the checkpoints: a resumed run may not change them
FIXED_ON_RESUME = ("twin_lora_ft.rank", "twin_lora_ft.targets")


@dataclass
class TwinLoraFTConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


def check_config(cfg) -> None:
    """Recipe.validate of twin_lora_ft: the LoRA options, before any model is built."""
    c = cfg.twin_lora_ft
    if c.rank < 1:
        raise ConfigError(f"twin_lora_ft.rank must be >= 1, got {c.rank}.")
    if not (math.isfinite(c.alpha) and c.alpha > 0):
        raise ConfigError(f"twin_lora_ft.alpha must be > 0, got {c.alpha}.")
    if not (0.0 <= c.dropout < 1.0):
        raise ConfigError(f"twin_lora_ft.dropout must be in [0, 1), got {c.dropout}.")
    targets = list(c.targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"twin_lora_ft.targets must name at least one linear module (e.g. [q_proj, v_proj]), "
                          f"got {targets}.")


def lora_config(c):
    """peft's LoraConfig of a (checked) twin_lora_ft section."""
    from peft import LoraConfig

    return LoraConfig(r=int(c.rank), lora_alpha=float(c.alpha), lora_dropout=float(c.dropout),
                      target_modules=list(c.targets))


def prepare_model(cfg, model: torch.nn.Module, dm) -> torch.nn.Module:
    """Recipe.prepare_model of twin_lora_ft: wrap the model in peft LoRA adapters (base weights frozen)."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(cfg.twin_lora_ft))
    except ValueError as e:  # e.g. no module of the model matches the targets
        raise ConfigError(f"twin_lora_ft.targets: peft could not wrap the model: {e}") from None
