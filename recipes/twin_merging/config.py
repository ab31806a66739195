"""The `twin.*` options of the twin_merging recipe and their checks.

Every option is checked when the config is loaded (Recipe.validate), before any stage runs, so a bad value
fails in a second with a one-line ConfigError instead of after the base run. The configs of the training
sub-runs (base, one fine-tune per domain) are built there too, so an option they reject fails as early.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Union

from recipes.engine.errors import ConfigError

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TwinConfig:
    base_steps: int = 120  # training steps of the base model on all domains
    finetune: str = "full"  # full | lora: how each domain's fine-tune changes the base
    finetune_steps: int = 60  # training steps of each domain's fine-tune
    finetune_lr: float = 1e-3
    lora_rank: int = 8  # twin.finetune=lora: peft LoRA rank, alpha and target modules
    lora_alpha: float = 16.0
    lora_targets: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    lam: float = 0.3  # task-arithmetic weight of the shared expert: base + lam * sum of task vectors
    ties_density: float = 0.5  # the TIES baseline: fraction of each task vector kept, in [0, 1]
    rank: float = 0.1  # SVD rank of the exclusive experts: < 1 a fraction of min(dims), >= 1 an absolute rank
    router_epochs: int = 300
    router_prefix_len: int = 0  # 0: the router reads the mean-pooled last hidden state; n > 0: the state after
    #                             the first n tokens (what a generation-time router can see)
    eval_batches: int = 8  # batches of 8 blocks per domain on the test half


def svd_rank(tc) -> Union[float, int]:
    """twin.rank as models.twin.compress_exclusive takes it: a float fraction below 1, an int rank from 1."""
    return int(tc.rank) if tc.rank >= 1 else float(tc.rank)


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _processes(devices) -> int:
    """How many training processes trainer.devices asks for (-1: all devices, counted as 2; "auto" as 1)."""
    from omegaconf import ListConfig

    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            return 1
        if "," in text:
            return len([x for x in text.split(",") if x.strip()])
        try:
            devices = int(text)
        except ValueError:
            return 1  # Lightning reports what it does not understand
    return 2 if devices == -1 else int(devices)


def check_twin(cfg) -> None:
    """Checks of twin.* and of what the recipe needs from data.* and model.*."""
    from data.corpus import EMBEDDED_DOMAINS

    tc = cfg.twin
    _need(tc.finetune in ("full", "lora"), f"twin.finetune must be 'full' or 'lora', got {tc.finetune!r}.")
    for key in ("base_steps", "finetune_steps", "router_epochs", "eval_batches"):
        _need(tc[key] >= 1, f"twin.{key} must be >= 1, got {tc[key]}.")
    _need(_finite(tc.finetune_lr) and tc.finetune_lr > 0, f"twin.finetune_lr must be > 0, got {tc.finetune_lr}.")
    _need(tc.lora_rank >= 1, f"twin.lora_rank must be >= 1, got {tc.lora_rank}.")
    _need(_finite(tc.lora_alpha) and tc.lora_alpha > 0, f"twin.lora_alpha must be > 0, got {tc.lora_alpha}.")
    targets = list(tc.lora_targets)
    _need(len(targets) > 0 and all(isinstance(t, str) and t for t in targets),
          f"twin.lora_targets must name at least one linear module (e.g. [q_proj, v_proj]), got {targets}.")
    _need(_finite(tc.lam) and tc.lam > 0, f"twin.lam (the task-arithmetic weight) must be > 0, got {tc.lam}.")
    _need(_finite(tc.ties_density) and 0.0 <= tc.ties_density <= 1.0,
          f"twin.ties_density must be in [0, 1] (the fraction of each task vector TIES keeps), got {tc.ties_density}.")
    _need(_finite(tc.rank) and tc.rank > 0,
          f"twin.rank must be > 0 (a fraction < 1 or an absolute rank >= 1), got {tc.rank}.")
    _need(tc.rank < 1 or float(tc.rank).is_integer(),
          f"twin.rank >= 1 is an absolute SVD rank and must be a whole number, got {tc.rank}.")
    _need(0 <= tc.router_prefix_len <= cfg.data.block_size,
          f"twin.router_prefix_len must be in [0, data.block_size={cfg.data.block_size}] (0: the mean over the "
          f"whole block), got {tc.router_prefix_len}.")

    _need(cfg.data.source == "embedded",
          "twin_merging fine-tunes one model per entry of data.domains, and only data.source=embedded selects "
          f"its data by domain; got data.source={cfg.data.source}.")
    domains = list(cfg.data.domains)
    _need(len(domains) >= 2, f"twin_merging needs at least two domains (tasks) in data.domains, got {domains}.")
    _need(len(set(domains)) == len(domains), f"data.domains has a domain twice: {domains}.")
    unknown = [d for d in domains if d not in EMBEDDED_DOMAINS]
    _need(not unknown, f"data.domains: unknown embedded domain(s) {unknown}; available: {', '.join(EMBEDDED_DOMAINS)}.")
    _need(_processes(cfg.trainer.devices) <= 1 and cfg.trainer.num_nodes <= 1,
          "twin_merging runs its training stages one after another in one process; trainer.devices="
          f"{cfg.trainer.devices}, trainer.num_nodes={cfg.trainer.num_nodes} (several processes) is not supported: "
          "use trainer.devices=1.")
    _need(not cfg.model.pretrained,
          f"twin_merging trains its own base model (twin.base_steps); model.pretrained={cfg.model.pretrained} "
          "would not be used: remove it.")
