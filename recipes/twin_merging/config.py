"""The `twin.*` options of the twin_merging recipe and their checks.

Every option is checked when the config is loaded (Recipe.validate), before any stage runs, so a bad value
fails in a second with a one-line ConfigError instead of after the base run. The configs of the training
sub-runs (base, one fine-tune per domain) are built there too, so an option they reject fails as early.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from omegaconf import ListConfig

from recipes.engine.errors import ConfigError

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# twin.protocol: named settings of the points where the official Twin-Merging code and this repository's
# earlier choices differ (recipes/twin_merging/README.md, "Fidelity to the paper"). A key of PROTOCOLS left
# unset (null) takes the protocol's value; a key set to another value than the protocol's is a ConfigError
# (use twin.protocol=custom to change them: unset keys then take the `paper` values).
PROTOCOLS = {
    "paper": {"lam": 0.29, "rank_rounding": "floor", "shared_exclude": ["classifier", "bias"], "router": "paper",
              "router_width": 1024, "router_epochs": 50, "router_lr": 5e-4, "router_train_blocks": 5500,
              "lora_merge": "factorwise"},
    "ours": {"lam": 0.3, "rank_rounding": "round", "shared_exclude": [], "router": "ours", "router_width": 64,
             "router_epochs": 300, "router_lr": 1e-2, "router_train_blocks": 128, "lora_merge": "dense"},
}
PROTOCOL_NAMES = ("paper", "ours", "custom")
PRESET_KEYS = tuple(PROTOCOLS["paper"])
EXCLUDABLE = ("classifier", "bias")


@dataclass
class TwinConfig:
    protocol: str = "paper"  # paper | ours | custom: the values of the keys below that are left null
    base_steps: int = 120  # training steps of the base model on all domains
    finetune: str = "full"  # full | lora: how each domain's fine-tune changes the base
    finetune_steps: int = 60  # training steps of each domain's fine-tune
    finetune_lr: float = 1e-3
    lora_rank: int = 8  # twin.finetune=lora: peft LoRA rank, alpha and target modules
    lora_alpha: float = 16.0
    lora_targets: List[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    ties_density: float = 0.5  # the TIES baseline: fraction of each task vector kept, in [0, 1]
    rank: float = 0.1  # SVD rank of the exclusive experts: < 1 a fraction of min(dims), >= 1 an absolute rank
    router_prefix_len: int = 0  # 0: the router reads the mean-pooled last hidden state; n > 0: the state after
    #                             the first n tokens (what a generation-time router can see)
    eval_batches: int = 8  # batches of 8 blocks per domain on the test half
    # --- set by twin.protocol when null (PROTOCOLS) ---
    lam: Optional[float] = None  # task-arithmetic weight of the shared expert: base + lam * sum of task vectors
    rank_rounding: Optional[str] = None  # floor | round: a fractional twin.rank times min(dims), rounded so
    shared_exclude: Optional[List[str]] = None  # of [classifier, bias]: tensors kept at the base value in the
    #                                             shared expert (and in the TA / TIES baselines); routed experts
    #                                             theta_t - theta_base carry them
    router: Optional[str] = None  # paper (3-layer BatchNorm/LeakyReLU MLP, AdamW, batch 1024) | ours (2-layer)
    router_width: Optional[int] = None
    router_epochs: Optional[int] = None
    router_lr: Optional[float] = None
    router_train_blocks: Optional[int] = None  # at most this many training blocks per task for the router
    lora_merge: Optional[str] = None  # factorwise (A and B merged separately) | dense (the deltas s * B @ A)


def resolved(tc) -> Dict[str, Any]:
    """The effective value of every key of PROTOCOLS under twin.protocol (checked by check_protocol)."""
    preset = PROTOCOLS["paper" if tc.protocol == "custom" else tc.protocol]
    out = {}
    for key in PRESET_KEYS:
        value = tc[key]
        if value is None:
            value = preset[key]
        elif key == "shared_exclude":
            value = list(value)
        out[key] = value
    return out


def check_protocol(tc) -> Dict[str, Any]:
    """twin.protocol and the keys it sets: a key set explicitly to another value than the protocol's is an
    error (twin.protocol=custom allows it). Returns resolved(tc)."""
    _need(tc.protocol in PROTOCOL_NAMES,
          f"twin.protocol must be one of {', '.join(PROTOCOL_NAMES)}, got {tc.protocol!r}.")
    if tc.protocol != "custom":
        preset = PROTOCOLS[tc.protocol]
        for key in PRESET_KEYS:
            value = tc[key]
            if value is None:
                continue
            mine = sorted(value) if key == "shared_exclude" else value
            theirs = sorted(preset[key]) if key == "shared_exclude" else preset[key]
            _need(mine == theirs,
                  f"twin.{key}={_show(value)} conflicts with twin.protocol={tc.protocol}, which sets "
                  f"twin.{key}={_show(preset[key])}: drop the key, or use twin.protocol=custom to change it.")
    r = resolved(tc)
    _need(_finite(r["lam"]) and r["lam"] > 0, f"twin.lam (the task-arithmetic weight) must be > 0, got {r['lam']}.")
    _need(r["rank_rounding"] in ("floor", "round"),
          f"twin.rank_rounding must be 'floor' or 'round', got {r['rank_rounding']!r}.")
    bad = [x for x in r["shared_exclude"] if x not in EXCLUDABLE]
    _need(not bad, f"twin.shared_exclude takes entries of {list(EXCLUDABLE)}, got {r['shared_exclude']}.")
    _need(r["router"] in ("paper", "ours"), f"twin.router must be 'paper' or 'ours', got {r['router']!r}.")
    for key in ("router_width", "router_epochs", "router_train_blocks"):
        _need(isinstance(r[key], int) and r[key] >= 1, f"twin.{key} must be >= 1, got {r[key]}.")
    _need(_finite(r["router_lr"]) and r["router_lr"] > 0, f"twin.router_lr must be > 0, got {r['router_lr']}.")
    _need(r["lora_merge"] in ("factorwise", "dense"),
          f"twin.lora_merge must be 'factorwise' or 'dense', got {r['lora_merge']!r}.")
    return r


def _show(value) -> str:
    return "[" + ",".join(str(x) for x in value) + "]" if isinstance(value, (list, tuple, ListConfig)) else str(value)


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
    check_protocol(tc)
    for key in ("base_steps", "finetune_steps", "eval_batches"):
        _need(tc[key] >= 1, f"twin.{key} must be >= 1, got {tc[key]}.")
    _need(_finite(tc.finetune_lr) and tc.finetune_lr > 0, f"twin.finetune_lr must be > 0, got {tc.finetune_lr}.")
    _need(tc.lora_rank >= 1, f"twin.lora_rank must be >= 1, got {tc.lora_rank}.")
    _need(_finite(tc.lora_alpha) and tc.lora_alpha > 0, f"twin.lora_alpha must be > 0, got {tc.lora_alpha}.")
    targets = list(tc.lora_targets)
    _need(len(targets) > 0 and all(isinstance(t, str) and t for t in targets),
          f"twin.lora_targets must name at least one linear module (e.g. [q_proj, v_proj]), got {targets}.")
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
