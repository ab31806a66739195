"""The training path every recipe shares: config -> (DataModule, LightningModule, Trainer) -> run dir.

A recipe is `recipes/<name>.yaml`, optionally with `recipes/<name>.py` that may define
  - `prepare_model(cfg, model, datamodule) -> model`   (e.g. AdaMoE's retrofit)
  - `build_module(cfg, model, datamodule) -> CausalLMModule`   (its own losses and metrics; with
    `DEFERRED_MODEL = True` it also takes `model=None, model_factory=f` for DeepSpeed ZeRO-3 loading, see
    `zero3_deferred_load`)
  - `callbacks(cfg, run_dir) -> list[Callback]`
  - `run(cfg, run_dir) -> dict`   (a staged pipeline that replaces the standard training; returns its summary)
"""
from __future__ import annotations

import contextvars
import json
import os
import secrets
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from omegaconf import DictConfig

from .config import ConfigError, import_recipe_module, load_saved_config, save_config, to_dict
from .checkpointing import AtomicCheckpointIO, atomic_directory_saves, newest_checkpoint


def new_run_id() -> str:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:  # every requeued segment of a SLURM job continues the same run
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"-{task}" if task else "")
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def wandb_id_for(run_dir: Path) -> str:
    return f"{run_dir.parent.name}-{run_dir.name}".replace("/", "-")[:64]


def write_json_atomic(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


def data_settings(cfg: DictConfig):
    from data.datamodule import DataSettings

    return DataSettings.from_mapping(to_dict(cfg.data), seed=cfg.run.seed)


def build_datamodule(cfg: DictConfig):
    from data.datamodule import LMDataModule

    dm = LMDataModule(data_settings(cfg), trust_remote_code=cfg.model.trust_remote_code)
    dm.prepare()
    return dm


def build_base_model(cfg: DictConfig, dm, dtype=None):
    """The model of `model.*`; `dtype` is that of a model.pretrained's weights (None: float32)."""
    from models.factory import ModelSpec, build_model

    spec = ModelSpec(arch=cfg.model.arch, size=cfg.model.size, vocab_size=dm.vocab_size,
                     max_seq_len=cfg.data.block_size, overrides=to_dict(cfg.model.overrides),
                     pretrained=cfg.model.pretrained, trust_remote_code=cfg.model.trust_remote_code,
                     eos_token_id=dm.tokenizer.eos_token_id, pad_token_id=dm.tokenizer.pad_token_id, dtype=dtype)
    try:
        return build_model(spec)
    except Exception as e:  # config validation errors of transformers / huggingface_hub come in many types
        raise ConfigError(f"Could not build the model (model.arch={cfg.model.arch}, size={cfg.model.size}): "
                          f"{type(e).__name__}: {e}") from None


def resolve_precision(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


# ------------------------------------------------------------------------------------------- strategies
# trainer.strategy names a builder here; each builder reads its typed options (trainer.ddp, trainer.deepspeed,
# trainer.fsdp2) and returns what `L.Trainer(strategy=...)` takes. Tests register CPU variants on top.
StrategyBuilder = Callable[[DictConfig], Any]
STRATEGIES: Dict[str, StrategyBuilder] = {}


def register_strategy(name: str, builder: Optional[StrategyBuilder] = None):
    """Register (or replace) the builder for `trainer.strategy=<name>`; usable as a decorator."""
    def deco(fn: StrategyBuilder) -> StrategyBuilder:
        STRATEGIES[name] = fn
        return fn

    return deco(builder) if builder is not None else deco


@register_strategy("auto")
def _auto_strategy(cfg: DictConfig) -> str:
    return "auto"


@register_strategy("ddp")
def _ddp_strategy(cfg: DictConfig):
    from lightning.pytorch.strategies import DDPStrategy

    o = cfg.trainer.ddp
    return DDPStrategy(find_unused_parameters=o.find_unused_parameters, bucket_cap_mb=o.bucket_cap_mb,
                       gradient_as_bucket_view=o.gradient_as_bucket_view)


def deepspeed_config(cfg: DictConfig, stage: int) -> Dict[str, Any]:
    """The DeepSpeed JSON config of trainer.deepspeed for ZeRO `stage`. Lightning adds batch size, gradient
    accumulation, clipping and precision to it."""
    o = cfg.trainer.deepspeed
    if o.offload_parameters and stage != 3:
        raise ConfigError("trainer.deepspeed.offload_parameters needs ZeRO stage 3 "
                          f"(trainer.strategy=deepspeed_stage_3), got trainer.strategy={cfg.trainer.strategy}.")
    for key in ("allgather_bucket_size", "reduce_bucket_size", "stage3_prefetch_bucket_size",
                "stage3_param_persistence_threshold"):
        if o[key] < 0:
            raise ConfigError(f"trainer.deepspeed.{key} must be >= 0, got {o[key]}.")
    zero: Dict[str, Any] = {"stage": stage, "overlap_comm": o.overlap_comm,
                            "contiguous_gradients": o.contiguous_gradients,
                            "reduce_bucket_size": int(o.reduce_bucket_size)}
    if stage == 2:
        zero.update(allgather_partitions=True, reduce_scatter=True,
                    allgather_bucket_size=int(o.allgather_bucket_size))
    else:
        zero.update(stage3_prefetch_bucket_size=int(o.stage3_prefetch_bucket_size),
                    stage3_param_persistence_threshold=int(o.stage3_param_persistence_threshold))
    if o.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if o.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    # The optimizer is the recipe's own torch AdamW (configure_optimizers); with offload DeepSpeed would
    # otherwise insist on its compiled CPU Adam.
    return {"zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False}


def deepspeed_strategy(cfg: DictConfig, stage: int, strategy_cls=None):
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(f"trainer.strategy={cfg.trainer.strategy} needs the deepspeed package "
                          "(pip install --no-build-isolation deepspeed==0.19.8).") from None
    if strategy_cls is None:
        from lightning.pytorch.strategies import DeepSpeedStrategy as strategy_cls
    # Its checkpoints are directories written in place: make them appear under their name only when whole.
    return atomic_directory_saves(strategy_cls)(
        config=deepspeed_config(cfg, stage), process_group_backend=cfg.trainer.deepspeed.process_group_backend)


register_strategy("deepspeed_stage_2", lambda cfg: deepspeed_strategy(cfg, 2))
register_strategy("deepspeed_stage_3", lambda cfg: deepspeed_strategy(cfg, 3))


@register_strategy("fsdp2")
def _fsdp2_strategy(cfg: DictConfig):
    """FSDP2: Lightning's ModelParallelStrategy; CausalLMModule.configure_model applies `fully_shard` per
    decoder layer over the data-parallel mesh (every device is one data-parallel rank, no tensor parallelism)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    o = cfg.trainer.fsdp2
    world = cfg.trainer.num_nodes * _devices_per_node(cfg)
    return atomic_directory_saves(ModelParallelStrategy)(
        data_parallel_size=world, tensor_parallel_size=1,
        save_distributed_checkpoint=o.save_distributed_checkpoint,
        process_group_backend=o.process_group_backend)


def _devices_per_node(cfg: DictConfig) -> int:
    d = cfg.trainer.devices
    if isinstance(d, int):
        return d
    if isinstance(d, str) and d.isdigit():
        return int(d)
    if isinstance(d, (list, tuple)) or (hasattr(d, "__len__") and not isinstance(d, str)):
        return len(d)
    raise ConfigError(f"trainer.strategy={cfg.trainer.strategy} needs trainer.devices as a count or a list "
                      f"of device indices, got {d!r}.")


def build_strategy(cfg: DictConfig):
    """The Lightning strategy (object or name) for trainer.strategy, from the STRATEGIES registry."""
    name = cfg.trainer.strategy
    if name not in STRATEGIES:
        raise ConfigError(f"Unknown trainer.strategy '{name}'. Choose one of: {', '.join(sorted(STRATEGIES))}.")
    return STRATEGIES[name](cfg)


def make_run_dir(cfg: DictConfig) -> Path:
    # Lightning's DDP launcher re-runs this command for local ranks > 0 (LOCAL_RANK set in their environment):
    # they must find the same run id. The launching process never reads it back, so a second train() in the
    # same process (a pipeline recipe, a notebook, a test) gets a run of its own.
    inherited = os.environ.get("LM_RECIPES_RUN_ID") if os.environ.get("LOCAL_RANK", "0") != "0" else None
    run_id = cfg.run.run_id or inherited or new_run_id()
    os.environ["LM_RECIPES_RUN_ID"] = run_id
    cfg.run.run_id = run_id
    run_dir = Path(cfg.run.root) / cfg.run.name / run_id
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def pretrained_dtype(cfg: DictConfig):
    """The dtype to load model.pretrained in for training: the parameters' dtype of a `*-true` precision
    (bf16-true, 16-true), else float32 (mixed precision keeps float32 weights)."""
    import torch

    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(resolve_precision(cfg.trainer.precision))


def zero3_deferred_load(cfg: DictConfig, recipe_mod=None) -> bool:
    """Whether train() builds the model inside each process under DeepSpeed ZeRO-3 partitioning (see
    `zero3_model_factory`) instead of whole in the launching process: trainer.strategy=deepspeed_stage_3 with
    model.pretrained and trainer.deepspeed.zero3_init, unless the recipe's own build_module needs the model
    up front (it declares DEFERRED_MODEL = True when it takes a model_factory) or routing_probe.enabled (its
    callback reads the whole model at set-up)."""
    from omegaconf import OmegaConf

    if cfg.trainer.strategy != "deepspeed_stage_3" or not cfg.model.pretrained or not cfg.trainer.deepspeed.zero3_init:
        return False
    if recipe_mod is not None and hasattr(recipe_mod, "build_module") and not getattr(recipe_mod, "DEFERRED_MODEL", False):
        return False
    return not OmegaConf.select(cfg, "routing_probe.enabled", default=False)


def _prepared_model(cfg: DictConfig, dm, recipe_mod=None, dtype=None):
    model = build_base_model(cfg, dm, dtype=dtype)
    if recipe_mod is not None and hasattr(recipe_mod, "prepare_model"):
        model = recipe_mod.prepare_model(cfg, model, dm)
    return model


def zero3_model_factory(cfg: DictConfig, dm, recipe_mod=None, dtype=None):
    """`factory(trainer) -> model` for CausalLMModule(model_factory=...): run in every process from the
    module's `setup`, once DeepSpeed has set up the process group. With an HfDeepSpeedConfig of the strategy's
    DeepSpeed config alive, transformers' from_pretrained creates the model under `deepspeed.zero.Init` (each
    rank allocates only its partition of every parameter) and loads the checkpoint into the partitions (rank 0
    reads it, tensor by tensor, broadcast within GatheredParameters). Then the recipe's prepare_model runs on the
    partitioned model (outside zero.Init, so the parameters it adds are whole and initialised as usual;
    deepspeed.initialize partitions them, broadcast from rank 0).

    Not Lightning's `configure_model`: Lightning calls it inside its own zero.Init, which would also partition the
    recipe's new modules (null gates, LoRA adapters) the moment they are constructed, before their own
    initialisation (copy of the router rows, lora_B = 0) runs on the then empty tensors."""
    def factory(trainer):
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        from models.factory import count_parameters

        strategy = trainer.strategy
        if not getattr(strategy, "zero_stage_3", False):
            raise RuntimeError(f"the ZeRO-3 model factory needs DeepSpeed ZeRO stage 3, got {type(strategy).__name__}")
        strategy._init_config_if_needed()  # what its model_sharded_context does first: batch size, precision
        hf_ds_config = HfDeepSpeedConfig(strategy.config)  # transformers sees ZeRO-3 while this object lives
        try:
            model = build_base_model(cfg, dm, dtype=dtype)
        finally:
            unset_hf_deepspeed_config()
            del hf_ds_config
        if recipe_mod is not None and hasattr(recipe_mod, "prepare_model"):
            model = recipe_mod.prepare_model(cfg, model, dm)
        params = {id(p): p for p in model.parameters()}.values()
        model.zero3_load_stats = stats = {  # plain attribute, for the log line and summary.json
            "rank": trainer.global_rank, "parameters": count_parameters(model),
            "partitioned_parameters": sum(int(p.ds_numel) for p in params if hasattr(p, "ds_id")),
            "local_partition": sum(int(p.ds_tensor.numel()) for p in params if hasattr(p, "ds_id")),
            "whole_parameters_in_process": sum(p.numel() for p in params if not hasattr(p, "ds_id")),
            "peak_rss_mb": _peak_rss_mb()}
        print("zero3_load: " + json.dumps(stats, sort_keys=True), file=sys.stderr, flush=True)
        return model

    return factory


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# Set by train() around its build_module call (whose 3-argument form a recipe may swap, see fusechat).
_BUILDING_FOR_TRAINING = contextvars.ContextVar("building_for_training", default=False)


def build_module(cfg: DictConfig, dm, recipe_mod=None, training: Optional[bool] = None):
    """The LightningModule of a run. For training (train(), or training=True): model.pretrained is loaded in
    the training precision's dtype, and under DeepSpeed ZeRO-3 the model is built later, in each process
    (zero3_deferred_load). Otherwise (export, evaluation) the whole model is built here in float32."""
    from .lm_module import CausalLMModule

    if training is None:
        training = _BUILDING_FOR_TRAINING.get()
    dtype = pretrained_dtype(cfg) if training and cfg.model.pretrained else None
    model, factory = None, None
    if training and zero3_deferred_load(cfg, recipe_mod):
        factory = zero3_model_factory(cfg, dm, recipe_mod, dtype)
    else:
        model = _prepared_model(cfg, dm, recipe_mod, dtype)
    if recipe_mod is not None and hasattr(recipe_mod, "build_module"):
        if factory is not None:
            return recipe_mod.build_module(cfg, None, dm, model_factory=factory)
        return recipe_mod.build_module(cfg, model, dm)
    return CausalLMModule(model, to_dict(cfg.optim), cfg.trainer.max_steps, dm.domain_names,
                          compile_model=cfg.model.compile, model_factory=factory)


def train(cfg: DictConfig, run_dir: Optional[Path] = None, resume: bool = False) -> Path:
    """Train (or resume) one run; returns its run directory. Prints `run_dir: <path>` last."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from .callbacks import NonFiniteGuard, PreemptionCheckpoint, StopAtStep, ThroughputMonitor
    from .logging_utils import RunCSVLogger, make_wandb_logger

    recipe_mod = import_recipe_module(cfg.run.name)
    if run_dir is None:
        run_dir = make_run_dir(cfg)
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    if recipe_mod is not None and hasattr(recipe_mod, "run"):
        summary = recipe_mod.run(cfg, run_dir)
        if summary is not None:  # None: this rank has no summary to write (another rank writes it)
            write_json_atomic(run_dir / "summary.json", summary)
        return run_dir

    # SLURM's SIGUSR1 may come while data and model are still being set up: record it from the start (the
    # default action would kill the process); the checkpoint + requeue then happen at the first step boundary.
    preemption = PreemptionCheckpoint(run_dir)
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, preemption._handler)
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    dm = build_datamodule(cfg)
    token = _BUILDING_FOR_TRAINING.set(True)
    try:
        module = build_module(cfg, dm, recipe_mod)
    finally:
        _BUILDING_FOR_TRAINING.reset(token)

    ckpt = newest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        print(f"No readable checkpoint in {run_dir}; starting from step 0.", file=sys.stderr)
    resume_step = ckpt[1] if ckpt else None

    loggers = [RunCSVLogger(run_dir / "metrics.csv", resume_step=resume_step if resume else None)]
    if not resume and (run_dir / "metrics.csv").exists():
        (run_dir / "metrics.csv").unlink()
    wb = make_wandb_logger(run_dir, wandb_id_for(run_dir), f"{cfg.run.name}/{run_dir.name}", cfg.logging.wandb,
                           cfg.logging.project, cfg.logging.entity, list(cfg.logging.tags), to_dict(cfg))
    if wb is not None:
        loggers.append(wb)

    from models.factory import count_parameters, flops_per_token

    if module.model is not None:
        throughput = ThroughputMonitor(flops_per_token(module.model, cfg.data.block_size))
    else:  # built in each process at set-up (ZeRO-3): count it then (full_numel sees through partitions)
        throughput = ThroughputMonitor(None)
        build = module.model_factory

        def build_and_count(trainer):
            model = build(trainer)
            throughput.flops_per_token = flops_per_token(model, cfg.data.block_size)
            return model

        module.model_factory = build_and_count
    callbacks = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg.checkpoint.every_n_steps, save_last=True,
                        save_top_k=cfg.checkpoint.keep, monitor=None, save_on_train_epoch_end=False),
        throughput,
        NonFiniteGuard(cfg.checkpoint.every_n_steps,
                       [cfg.trainer.stop_at_step] if cfg.trainer.stop_at_step is not None else []),
        preemption,
    ]
    if cfg.trainer.stop_at_step is not None:
        callbacks.append(StopAtStep(cfg.trainer.stop_at_step, run_dir / "checkpoints" / "last.ckpt"))
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.trainer.log_every_n_steps)))
    if recipe_mod is not None and hasattr(recipe_mod, "callbacks"):
        callbacks += list(recipe_mod.callbacks(cfg, run_dir))
    from .routing_callback import routing_callbacks

    callbacks += routing_callbacks(cfg, run_dir)  # routing_probe.enabled (MoE recipes)

    strategy = build_strategy(cfg)
    module.fsdp2_reshard_after_forward = cfg.trainer.fsdp2.reshard_after_forward
    plugins = [AtomicCheckpointIO()]
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():  # our PreemptionCheckpoint handles SIGUSR1 at a step boundary instead
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = L.Trainer(
        default_root_dir=str(run_dir), max_steps=cfg.trainer.max_steps, max_epochs=-1,
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
        strategy=strategy, precision=resolve_precision(cfg.trainer.precision),
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches, gradient_clip_val=cfg.optim.grad_clip,
        val_check_interval=cfg.trainer.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=cfg.trainer.limit_val_batches, num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps, logger=loggers, callbacks=callbacks,
        enable_progress_bar=cfg.trainer.progress_bar, enable_model_summary=False,
        use_distributed_sampler=False, deterministic=cfg.trainer.deterministic,
        plugins=plugins,
    )
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        # validation sums are reduced by hand in on_validation_epoch_end
        warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt[0]) if ckpt else None)
        finished = trainer.global_step >= cfg.trainer.max_steps
        if finished and module.last_val.get("_step") != trainer.global_step:
            trainer.validate(module, datamodule=dm, verbose=False)
    if preemption.preempted:
        print(f"Preempted at step {trainer.global_step}; the requeued job (or `make resume RUN={run_dir}`) "
              "continues.", file=sys.stderr)
    elif trainer.is_global_zero:
        summary = {
            "recipe": cfg.run.name, "run_dir": str(run_dir), "step": trainer.global_step,
            "tokens_seen": module.tokens_seen, "train/loss": module.last_train_loss,
            "wall_time_s": time.time() - t0 + 0.0,
            "num_parameters": count_parameters(module.model),
        }
        if hasattr(module.model, "zero3_load_stats"):
            summary.update({f"zero3_load/{k}": v for k, v in module.model.zero3_load_stats.items() if k != "rank"})
        summary.update({k: v for k, v in module.last_val.items() if not k.startswith("_")})
        summary.update(throughput.summary())
        summary.update(module.summary_metrics())
        write_json_atomic(run_dir / "summary.json", summary)
        for lg in loggers:
            lg.save()
        if wb is not None:
            try:
                wb.experiment.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            except Exception:
                pass
    return run_dir


def resume_run(run_dir: Path, overrides=None) -> Path:
    from .config import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"Run directory {run_dir} does not exist.")
    saved = load_saved_config(run_dir / "config.yaml")
    recipe = saved.get("run", {}).get("name")
    if not recipe:
        raise ConfigError(f"{run_dir}/config.yaml names no recipe (run.name).")
    if "trainer" in saved and "stop_at_step" in saved.trainer:
        saved.trainer.stop_at_step = None  # a segment's stop point is not carried into the next segment
    cfg = load_config(recipe, overrides, base=saved)
    return train(cfg, run_dir=run_dir, resume=True)
