"""The strategy registry: `trainer.strategy=<name>` -> what `L.Trainer(strategy=...)` takes.

Each builder reads its typed options (trainer.ddp, trainer.deepspeed, trainer.fsdp2). Tests register CPU
variants on top (tests/deepspeed_cpu.py). `resolve_precision` turns `trainer.precision=auto` into a real one.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from omegaconf import DictConfig

from .checkpointing import atomic_directory_saves
from .errors import ConfigError


def resolve_precision(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


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
    world = cfg.trainer.num_nodes * devices_per_node(cfg)
    return atomic_directory_saves(ModelParallelStrategy)(
        data_parallel_size=world, tensor_parallel_size=1,
        save_distributed_checkpoint=o.save_distributed_checkpoint,
        process_group_backend=o.process_group_backend)


def devices_per_node(cfg: DictConfig) -> int:
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
