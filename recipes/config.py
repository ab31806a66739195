"""Typed configuration: dataclass schema, YAML layering and dotted command-line overrides.

Layering: schema defaults <- recipes/base.yaml <- recipes/<name>.yaml <- `key=value` overrides.
Every error a user can make here is reported as a `ConfigError` with a one-paragraph message (the key,
what was expected, what was given, the closest valid keys); `python -m recipes` prints it without a
traceback and exits non-zero.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

RECIPES_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is the whole story."""


# ----------------------------------------------------------------------------------------------- schema


@dataclass
class RunConfig:
    name: str = MISSING  # the recipe name, filled in by the loader
    seed: int = 1234
    root: str = "runs"  # run directories are <root>/<recipe>/<run_id>
    run_id: Optional[str] = None  # default: timestamp, or slurm-<job id> under SLURM


@dataclass
class DataConfig:
    # "embedded" = the local corpora shipped with every machine (Python docs, stdlib source, licences)
    source: str = "embedded"  # embedded | files | hub
    domains: List[str] = field(default_factory=lambda: ["pydoc", "stdlib", "licenses"])
    files: List[str] = field(default_factory=list)  # for source=files: .txt / .jsonl / .json / .parquet
    text_field: str = "text"
    hub_name: Optional[str] = None  # for source=hub (needs network and the user's own consent)
    hub_split: str = "train"
    max_chars_per_domain: int = 1_000_000
    tokenizer: str = "bpe"  # bpe | unigram (embedded, trained at first use) or a path / hub name
    vocab_size: int = 4096
    block_size: int = 128
    val_fraction: float = 0.05
    batch_size: int = 16
    val_batch_size: int = 32
    num_workers: int = 0
    cache_dir: str = ".cache"


@dataclass
class ModelConfig:
    arch: str = "llama"  # llama | mixtral | qwen2_moe | olmoe | tokenformer (see models/factory.py)
    size: str = "tiny"  # a named size of that architecture
    pretrained: Optional[str] = None  # a save_pretrained directory (or a hub name, with network)
    trust_remote_code: bool = False
    overrides: Dict[str, Any] = field(default_factory=dict)  # extra architecture config fields
    compile: bool = False


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 20
    grad_clip: float = 1.0


@dataclass
class DDPOptions:
    find_unused_parameters: bool = False
    bucket_cap_mb: float = 25.0  # gradients are all-reduced in buckets of this size
    gradient_as_bucket_view: bool = True  # grads alias the buckets: saves one copy of the gradients


@dataclass
class DeepSpeedOptions:
    # The ZeRO stage comes from the strategy name (deepspeed_stage_2 / deepspeed_stage_3). Bucket sizes
    # are counts of elements, typed float so that `5e8` is accepted; they are rounded to integers.
    offload_optimizer: bool = False  # optimizer states (and the step) on the CPU
    offload_parameters: bool = False  # stage 3 only: parameters live on the CPU between uses
    allgather_bucket_size: float = 2e8  # elements per all-gather of updated parameters (stage 2)
    reduce_bucket_size: float = 2e8  # elements per gradient reduce-scatter
    overlap_comm: bool = True  # overlap gradient reduction with the backward pass
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are produced
    stage3_prefetch_bucket_size: float = 5e7  # elements of parameters fetched ahead (stage 3)
    stage3_param_persistence_threshold: float = 1e5  # smaller parameters stay unpartitioned (stage 3)
    process_group_backend: Optional[str] = None  # None: nccl on GPUs, gloo on CPUs
    # stage 3 + model.pretrained: build the model (load + the recipe's prepare_model) once the processes
    # exist, under ZeRO-3 partitioning, so no rank ever holds the whole model (recipes/train.py). False: load
    # it whole in every process first, as for the other strategies.
    zero3_init: bool = True


@dataclass
class FSDP2Options:
    reshard_after_forward: bool = True  # free gathered layer weights after forward (ZeRO-3-like)
    # A directory with one shard file per rank (fast, no gather); False gathers one file on rank 0.
    save_distributed_checkpoint: bool = True
    process_group_backend: Optional[str] = None


@dataclass
class TrainerConfig:
    max_steps: int = 200
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | deepspeed_stage_2 | deepspeed_stage_3 | fsdp2 (recipes/train.py)
    ddp: DDPOptions = field(default_factory=DDPOptions)
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    fsdp2: FSDP2Options = field(default_factory=FSDP2Options)
    precision: str = "auto"  # auto = bf16-mixed where the hardware supports it, else 32-true
    accumulate_grad_batches: int = 1
    val_check_interval: int = 50  # in optimizer steps
    limit_val_batches: Any = 20
    log_every_n_steps: int = 5
    progress_bar: bool = True
    deterministic: bool = False
    # End this segment after this global step with a checkpoint (e.g. to fit a scheduler's time slot);
    # `make resume` continues. None = run to max_steps.
    stop_at_step: Optional[int] = None


@dataclass
class CheckpointConfig:
    every_n_steps: int = 50
    keep: int = 0  # step checkpoints kept besides last.ckpt: 0 none, -1 all


@dataclass
class LoggingConfig:
    wandb: str = "auto"  # auto (offline unless logged in; WANDB_MODE wins) | online | offline | disabled
    project: str = "lm-recipes"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Method-specific sections register here (name -> dataclass), so that each recipe's keys are typed and
# checked like the shared ones. They are added to the schema before any YAML is merged.
SECTIONS: Dict[str, type] = {}


def register_section(name: str):
    def deco(cls):
        SECTIONS[name] = cls
        return cls

    return deco


# ---------------------------------------------------------------------------------------------- loading


def available_recipes() -> List[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem != "base")


def _schema() -> DictConfig:
    cfg = OmegaConf.structured(Config)
    for name, cls in SECTIONS.items():
        OmegaConf.set_struct(cfg, False)
        cfg[name] = OmegaConf.structured(cls)
        OmegaConf.set_struct(cfg, True)
    _unlock_free_dicts(cfg)
    return cfg


def _unlock_free_dicts(node: DictConfig) -> None:
    """Dict[str, Any] fields (e.g. model.overrides) take the user's own keys: lift struct mode there."""
    for k in list(node.keys()):
        child = node._get_node(k)
        if isinstance(child, DictConfig):
            if _is_free_dict(node, k):
                OmegaConf.set_struct(child, False)
            else:
                _unlock_free_dicts(child)


def _flat_keys(node: Any, prefix: str = "") -> List[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            child = node._get_node(k)
            if isinstance(child, DictConfig) and not _is_free_dict(node, k):
                keys.extend(_flat_keys(child, full + "."))
    return keys


def _is_free_dict(parent: DictConfig, key: str) -> bool:
    """True for Dict[str, Any] fields (e.g. model.overrides) whose inner keys are the user's own."""
    try:
        child = parent._get_node(key)
        return isinstance(child, DictConfig) and child._metadata.object_type in (None, dict)
    except Exception:
        return False


def _check_keys(schema: DictConfig, data: Dict[str, Any], where: str, prefix: str = "") -> None:
    for k, v in data.items():
        full = f"{prefix}{k}"
        if not isinstance(schema, DictConfig) or k not in schema.keys():
            valid = _flat_keys(schema) if isinstance(schema, DictConfig) else []
            all_valid = [prefix + x for x in valid]
            close = difflib.get_close_matches(full, all_valid, n=3, cutoff=0.5)
            if not close:
                close = difflib.get_close_matches(str(k), valid, n=3, cutoff=0.5)
                close = [prefix + c for c in close]
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            section = prefix.rstrip(".") or "the top level"
            raise ConfigError(
                f"Unknown config key '{full}' (in {where}).{hint} Valid keys in {section}: "
                f"{', '.join(sorted(str(x) for x in (schema.keys() if isinstance(schema, DictConfig) else [])))}."
            )
        if isinstance(v, dict) and not _is_free_dict(schema, k):
            _check_keys(schema._get_node(k), v, where, full + ".")


def _type_name(schema: DictConfig, dotted: str) -> str:
    parent_key, _, leaf = dotted.rpartition(".")
    parent = OmegaConf.select(schema, parent_key) if parent_key else schema
    try:
        node = parent._get_node(leaf)
        t = node._metadata.ref_type
        return getattr(t, "__name__", None) or str(t).replace("typing.", "")
    except Exception:
        return "?"


def _merge(schema: DictConfig, data: Dict[str, Any], where: str) -> DictConfig:
    _check_keys(schema, data, where)
    try:
        return OmegaConf.merge(schema, OmegaConf.create(data))
    except ValidationError as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(
            f"Config key '{key}' (in {where}) expects type {_type_name(schema, key)}, "
            f"got {getattr(e, 'value', '?')!r}."
        ) from None
    except ConfigKeyError as e:  # pragma: no cover - _check_keys catches these first
        raise ConfigError(f"Config error in {where}: {e}") from None


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(data).__name__}.")
    return data


def parse_overrides(args: List[str]) -> Dict[str, Any]:
    """`a.b=1 c=[1,2]` -> nested dict; values parsed as YAML scalars/lists."""
    out: Dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"Override '{arg}' is not of the form key=value (e.g. trainer.max_steps=50).")
        key, _, raw = arg.partition("=")
        key = key.strip().lstrip("+")
        if not key:
            raise ConfigError(f"Override '{arg}' has an empty key.")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string; a number is what was meant
            try:
                value = float(value)
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override '{arg}' conflicts with another override of '{p}'.")
        node[parts[-1]] = value
    return out


def load_config(recipe: str, overrides: Optional[List[str]] = None, base: Optional[DictConfig] = None) -> DictConfig:
    """Resolve a recipe's config. `base` (a saved run config) replaces the YAML layers on resume."""
    recipes = available_recipes()
    if base is None and recipe not in recipes:
        close = difflib.get_close_matches(recipe, recipes, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown recipe '{recipe}'.{hint} Available recipes: {', '.join(recipes)}.")
    import_recipe_module(recipe)  # registers its config section, if it has one
    import_recipe_module("routing_callback")  # `routing_probe.*`: the opt-in MoE routing callback, any recipe
    cfg = _schema()
    if base is not None:
        cfg = _merge(cfg, OmegaConf.to_container(base, resolve=True), "the saved run config")
    else:
        cfg = _merge(cfg, _read_yaml(RECIPES_DIR / "base.yaml"), "recipes/base.yaml")
        cfg = _merge(cfg, _read_yaml(RECIPES_DIR / f"{recipe}.yaml"), f"recipes/{recipe}.yaml")
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), "the command line")
    cfg.run.name = recipe
    _validate(cfg)
    return cfg


def _validate(cfg: DictConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.data.block_size >= 2, f"data.block_size must be >= 2, got {cfg.data.block_size}.")
    need(cfg.data.batch_size >= 1, f"data.batch_size must be >= 1, got {cfg.data.batch_size}.")
    need(0.0 < cfg.data.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}.")
    need(cfg.data.source in ("embedded", "files", "hub"),
         f"data.source must be one of embedded, files, hub; got '{cfg.data.source}'.")
    need(cfg.trainer.max_steps >= 1, f"trainer.max_steps must be >= 1, got {cfg.trainer.max_steps}.")
    need(cfg.logging.wandb in ("auto", "online", "offline", "disabled"),
         f"logging.wandb must be one of auto, online, offline, disabled; got '{cfg.logging.wandb}'.")
    need(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}.")


def import_recipe_module(recipe: str):
    """Import recipes/<recipe>.py if it exists (it may register a config section and a LightningModule)."""
    import importlib

    if (RECIPES_DIR / f"{recipe}.py").exists():
        return importlib.import_module(f"recipes.{recipe}")
    return None


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_config(cfg: DictConfig, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp.replace(path)


def load_saved_config(path: Path) -> DictConfig:
    if not path.exists():
        raise ConfigError(f"No config.yaml in {path.parent}: is it a run directory?")
    return OmegaConf.create(yaml.safe_load(path.read_text()))


__all__ = [
    "Config", "ConfigError", "SECTIONS", "register_section", "available_recipes", "load_config",
    "parse_overrides", "to_dict", "save_config", "load_saved_config", "dataclasses",
]
