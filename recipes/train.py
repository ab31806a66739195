"""The training path every recipe shares: config -> (DataModule, LightningModule, Trainer) -> run dir.

A recipe is `recipes/<name>.yaml`, optionally with `recipes/<name>.py` that may define
  - `prepare_model(cfg, model, datamodule) -> model`   (e.g. AdaMoE's retrofit)
  - `build_module(cfg, model, datamodule) -> CausalLMModule`   (its own losses and metrics)
  - `callbacks(cfg, run_dir) -> list[Callback]`
  - `run(cfg, run_dir) -> dict`   (a staged pipeline that replaces the standard training; returns its summary)
"""
from __future__ import annotations

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


def build_base_model(cfg: DictConfig, dm):
    from models.factory import ModelSpec, build_model

    spec = ModelSpec(arch=cfg.model.arch, size=cfg.model.size, vocab_size=dm.vocab_size,
                     max_seq_len=cfg.data.block_size, overrides=to_dict(cfg.model.overrides),
                     pretrained=cfg.model.pretrained, trust_remote_code=cfg.model.trust_remote_code,
                     eos_token_id=dm.tokenizer.eos_token_id, pad_token_id=dm.tokenizer.pad_token_id)
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


def build_module(cfg: DictConfig, dm, recipe_mod=None):
    from .lm_module import CausalLMModule

    model = build_base_model(cfg, dm)
    if recipe_mod is not None and hasattr(recipe_mod, "prepare_model"):
        model = recipe_mod.prepare_model(cfg, model, dm)
    if recipe_mod is not None and hasattr(recipe_mod, "build_module"):
        return recipe_mod.build_module(cfg, model, dm)
    return CausalLMModule(model, to_dict(cfg.optim), cfg.trainer.max_steps, dm.domain_names,
                          compile_model=cfg.model.compile)


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
    module = build_module(cfg, dm, recipe_mod)

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

    from models.factory import flops_per_token

    throughput = ThroughputMonitor(flops_per_token(module.model, cfg.data.block_size))
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
            "num_parameters": sum(p.numel() for p in module.model.parameters()),
        }
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
