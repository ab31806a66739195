"""Typed configuration: dataclass schema, YAML layering and dotted command-line overrides.

Layering: schema defaults <- recipes/engine/base.yaml <- the recipe's YAML <- `key=value` overrides.
The schema is the shared sections below plus the typed sections of the recipe (its `Recipe.sections`)
and of the engine (`routing_probe`).
Every error a user can make here is reported as a `ConfigError` with a one-paragraph message (the key,
what was expected, what was given, the closest valid keys); `python -m recipes` prints it without a
traceback and exits non-zero.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from data.config import DataConfig

from .errors import ConfigError

ENGINE_DIR = Path(__file__).resolve().parent
REPO_ROOT = ENGINE_DIR.parent.parent


# ----------------------------------------------------------------------------------------------- schema


@dataclass
class RunConfig:
    name: str = MISSING  # the recipe name, filled in by the loader
    seed: int = 1234
    root: str = "runs"  # run directories are <root>/<recipe>/<run_id>
    run_id: Optional[str] = None  # default: timestamp, or slurm-<job id>[-<array task>] under SLURM
    overwrite: bool = False  # true: start over in an existing run directory (deletes its checkpoints, metrics)


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
    # exist, under ZeRO-3 partitioning, so no rank ever holds the whole model (recipes/engine/build.py). False: load
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
    strategy: str = "auto"  # auto | ddp | deepspeed_stage_2 | deepspeed_stage_3 | fsdp2 (recipes/engine/strategies.py)
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
    # auto: offline under SLURM, when not logged in or when the server does not answer within ~2.5 s; online
    # when logged in and reachable. WANDB_MODE wins. | online | offline | disabled
    wandb: str = "auto"
    project: str = "lm-recipes"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    group: Optional[str] = None  # W&B group (sweeps and staged recipes set it to the parent's id)
    job_type: Optional[str] = None  # W&B job_type (default: train; stages set their own)
    wandb_osh: bool = False  # live sync of offline runs: request a sync after each validation (wandb-osh)
    wandb_osh_dir: Optional[str] = None  # wandb-osh's command directory (None: ~/.wandb_osh_command_dir)
    log_checkpoints: bool = False  # the final checkpoint as a W&B artifact (type model) at the end of fit
    peak_flops: Optional[float] = None  # peak FLOP/s of one device for perf/mfu (None: Lightning's table)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------- loading


def available_recipes() -> List[str]:
    from .recipe import recipe_names

    return recipe_names()


def _schema(sections: Dict[str, type]) -> DictConfig:
    cfg = OmegaConf.structured(Config)
    for name, cls in sections.items():
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


def _where(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def load_config(recipe: str, overrides: Optional[List[str]] = None, base: Optional[DictConfig] = None,
                inherit: Optional[Tuple[Dict[str, Any], str]] = None) -> DictConfig:
    """Resolve a recipe's config. `base` (a saved run config) replaces the YAML layers on resume; `inherit`
    (values, where they come from) is merged after the YAML layers and before `overrides` (sub-runs)."""
    from .recipe import ENGINE_SECTIONS, ENGINE_VALIDATORS, get_recipe

    r = get_recipe(recipe)
    cfg = _schema({**ENGINE_SECTIONS, **dict(r.sections)})
    if base is not None:
        cfg = _merge(cfg, OmegaConf.to_container(base, resolve=True), "the saved run config")
    else:
        cfg = _merge(cfg, _read_yaml(ENGINE_DIR / "base.yaml"), _where(ENGINE_DIR / "base.yaml"))
        cfg = _merge(cfg, _read_yaml(Path(r.yaml)), _where(Path(r.yaml)))
    if inherit is not None:
        cfg = _merge(cfg, inherit[0], inherit[1])
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), "the command line")
    cfg.run.name = recipe
    _validate(cfg)
    for check in ENGINE_VALIDATORS:
        check(cfg)
    if r.validate is not None:
        r.validate(cfg)
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
    _validate_run_and_trainer(cfg, need)


RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_id(run_id: str) -> str:
    """A run id is one path component: letters, digits, '.', '_', '-' (no separators, no '..')."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id) or ".." in run_id:
        raise ConfigError(f"run.run_id={run_id!r} is not a valid run id: use letters, digits, '.', '_' and '-' "
                          "(at most 128 characters, no '/' and no '..'); "
                          "the run directory is <run.root>/<recipe>/<id>.")
    return run_id


PRECISIONS = ("auto", "32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true",
              "transformer-engine")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def _validate_run_and_trainer(cfg: DictConfig, need) -> None:
    """Everything that would otherwise fail minutes later, inside Lightning, with a traceback."""
    from .strategies import STRATEGIES

    if cfg.run.run_id is not None:
        check_run_id(cfg.run.run_id)
    t, o, c, d = cfg.trainer, cfg.optim, cfg.checkpoint, cfg.data
    need(t.precision in PRECISIONS, f"trainer.precision must be one of {', '.join(PRECISIONS)}; got '{t.precision}'.")
    need(t.accelerator in ACCELERATORS,
         f"trainer.accelerator must be one of {', '.join(ACCELERATORS)}; got '{t.accelerator}'.")
    need(t.strategy in STRATEGIES, f"trainer.strategy must be one of {', '.join(sorted(STRATEGIES))}; "
                                   f"got '{t.strategy}'.")
    dev = t.devices
    ok = (isinstance(dev, int) and (dev >= 1 or dev == -1)) or dev == "auto" or \
        (isinstance(dev, str) and (dev.isdigit() and int(dev) >= 1 or dev == "-1")) or \
        (OmegaConf.is_list(dev) and len(dev) >= 1 and all(isinstance(i, int) and i >= 0 for i in dev))
    need(ok, f"trainer.devices must be a count >= 1, -1 (all), 'auto' or a list of device indices; got {dev!r}.")
    need(t.num_nodes >= 1, f"trainer.num_nodes must be >= 1, got {t.num_nodes}.")
    need(t.accumulate_grad_batches >= 1,
         f"trainer.accumulate_grad_batches must be >= 1, got {t.accumulate_grad_batches}.")
    need(t.val_check_interval >= 1, f"trainer.val_check_interval must be >= 1 (steps), got {t.val_check_interval}.")
    need(t.log_every_n_steps >= 1, f"trainer.log_every_n_steps must be >= 1, got {t.log_every_n_steps}.")
    lvb = t.limit_val_batches
    need((isinstance(lvb, int) and not isinstance(lvb, bool) and lvb >= 0) or
         (isinstance(lvb, float) and 0.0 <= lvb <= 1.0),
         f"trainer.limit_val_batches must be a count >= 0 or a fraction in [0, 1]; got {lvb!r}.")
    need(t.stop_at_step is None or 1 <= t.stop_at_step,
         f"trainer.stop_at_step must be >= 1 or null, got {t.stop_at_step}.")
    need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}.")
    need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}.")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}.")
    need(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
         f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}.")
    need(o.eps > 0, f"optim.eps must be > 0, got {o.eps}.")
    need(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0: no clipping), got {o.grad_clip}.")
    need(c.every_n_steps >= 1, f"checkpoint.every_n_steps must be >= 1, got {c.every_n_steps}.")
    peak = cfg.logging.peak_flops
    need(peak is None or peak > 0, f"logging.peak_flops must be > 0 (FLOP/s of one device) or null, got {peak}.")
    need(c.keep >= -1, f"checkpoint.keep must be -1 (all), 0 (only last.ckpt) or a count, got {c.keep}.")
    need(d.vocab_size >= 2, f"data.vocab_size must be >= 2, got {d.vocab_size}.")
    need(d.val_batch_size >= 1, f"data.val_batch_size must be >= 1, got {d.val_batch_size}.")
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}.")
    need(d.max_chars_per_domain >= 0, f"data.max_chars_per_domain must be >= 0 (0: all), got {d.max_chars_per_domain}.")
    need(bool(list(d.domains)) or d.source != "embedded", "data.domains is empty: name at least one embedded domain.")
    need(d.source != "files" or bool(list(d.files)), "data.source=files needs data.files=[path, ...].")
    need(d.source != "hub" or bool(d.hub_name), "data.source=hub needs data.hub_name=<dataset>.")
    problems = DataConfig.from_mapping(OmegaConf.to_container(d, resolve=True)).problems()
    need(not problems, problems[0] if problems else "")


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def load_options(cls: type, args: List[str], where: str) -> DictConfig:
    """A typed options section (a dataclass) from `key=value` strings, checked like the run config: unknown
    keys name the closest valid ones, wrong types name the expected one (e.g. the options of `analyze`)."""
    cfg = OmegaConf.structured(cls)
    return _merge(cfg, parse_overrides(args), where) if args else cfg
