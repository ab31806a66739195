"""Builders of a run's parts from its config: the DataModule, the model, the LightningModule.

Under DeepSpeed ZeRO-3 with `model.pretrained`, the model is not built here but in every process once the
process group exists (`Zero3ModelFactory`), so that no rank ever holds the whole model.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf

from .config import to_dict
from .errors import ConfigError
from .recipe import Recipe
from .strategies import resolve_precision


def build_datamodule(cfg: DictConfig):
    from data.config import DataConfig
    from data.datamodule import LMDataModule

    dm = LMDataModule(DataConfig.from_mapping(to_dict(cfg.data)), seed=cfg.run.seed,
                      trust_remote_code=cfg.model.trust_remote_code)
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


def pretrained_dtype(cfg: DictConfig):
    """The dtype to load model.pretrained in for training: the parameters' dtype of a `*-true` precision
    (bf16-true, 16-true), else float32 (mixed precision keeps float32 weights)."""
    import torch

    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(resolve_precision(cfg.trainer.precision))


def zero3_deferred_load(cfg: DictConfig, recipe: Optional[Recipe] = None) -> bool:
    """Whether the model is built inside each process under DeepSpeed ZeRO-3 partitioning (Zero3ModelFactory)
    instead of whole in the launching process: trainer.strategy=deepspeed_stage_3 with model.pretrained and
    trainer.deepspeed.zero3_init, unless the recipe's module needs the whole model up front
    (Recipe.zero3_deferred=False) or routing_probe.enabled (its callback reads the whole model at set-up)."""
    if cfg.trainer.strategy != "deepspeed_stage_3" or not cfg.model.pretrained or not cfg.trainer.deepspeed.zero3_init:
        return False
    if recipe is not None and not recipe.zero3_deferred:
        return False
    return not OmegaConf.select(cfg, "routing_probe.enabled", default=False)


def prepared_model(cfg: DictConfig, dm, recipe: Optional[Recipe] = None, dtype=None):
    """The model of `model.*` after the recipe's prepare_model (retrofit, LoRA, ...)."""
    model = build_base_model(cfg, dm, dtype=dtype)
    if recipe is not None and recipe.prepare_model is not None:
        model = recipe.prepare_model(cfg, model, dm)
    return model


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class Zero3ModelFactory:
    """`factory(trainer) -> model` for CausalLMModule(model_factory=...): run in every process from the
    module's `setup`, once DeepSpeed has set up the process group. With an HfDeepSpeedConfig of the strategy's
    DeepSpeed config alive, transformers' from_pretrained creates the model under `deepspeed.zero.Init` (each
    rank allocates only its partition of every parameter) and loads the checkpoint into the partitions (rank 0
    reads it, tensor by tensor, broadcast within GatheredParameters). Then the recipe's prepare_model runs on the
    partitioned model (outside zero.Init, so the parameters it adds are whole and initialised as usual;
    deepspeed.initialize partitions them, broadcast from rank 0).

    Not Lightning's `configure_model`: Lightning calls it inside its own zero.Init, which would also partition the
    recipe's new modules (null gates, LoRA adapters) the moment they are constructed, before their own
    initialisation (copy of the router rows, lora_B = 0) runs on the then empty tensors.

    `stats` (after the call): parameter counts of the partitioned model and the process's peak RSS."""

    def __init__(self, cfg: DictConfig, dm, recipe: Optional[Recipe] = None, dtype=None):
        self.cfg, self.dm, self.recipe, self.dtype = cfg, dm, recipe, dtype
        self.stats: Dict[str, Any] = {}

    def __call__(self, trainer):
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        from models.factory import count_parameters

        strategy = trainer.strategy
        if not getattr(strategy, "zero_stage_3", False):
            raise RuntimeError(f"the ZeRO-3 model factory needs DeepSpeed ZeRO stage 3, got {type(strategy).__name__}")
        strategy._init_config_if_needed()  # what its model_sharded_context does first: batch size, precision
        hf_ds_config = HfDeepSpeedConfig(strategy.config)  # transformers sees ZeRO-3 while this object lives
        try:
            model = build_base_model(self.cfg, self.dm, dtype=self.dtype)
        finally:
            unset_hf_deepspeed_config()
            del hf_ds_config
        if self.recipe is not None and self.recipe.prepare_model is not None:
            model = self.recipe.prepare_model(self.cfg, model, self.dm)
        params = {id(p): p for p in model.parameters()}.values()
        self.stats = {
            "rank": trainer.global_rank, "parameters": count_parameters(model),
            "partitioned_parameters": sum(int(p.ds_numel) for p in params if hasattr(p, "ds_id")),
            "local_partition": sum(int(p.ds_tensor.numel()) for p in params if hasattr(p, "ds_id")),
            "whole_parameters_in_process": sum(p.numel() for p in params if not hasattr(p, "ds_id")),
            "peak_rss_mb": peak_rss_mb()}
        # One write of the whole line: ranks share stderr, and print() writes the text and its newline
        # separately, so two ranks' lines could run together (a pipe keeps writes under 4 KiB whole).
        line = "zero3_load: " + json.dumps(self.stats, sort_keys=True) + "\n"
        sys.stderr.flush()
        try:
            os.write(sys.stderr.fileno(), line.encode())
        except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
            sys.stderr.write(line)
            sys.stderr.flush()
        return model


def module_class(recipe: Optional[Recipe]):
    from .module import CausalLMModule

    return recipe.module_cls if recipe is not None and recipe.module_cls is not None else CausalLMModule


def build_module(cfg: DictConfig, dm, recipe: Optional[Recipe] = None, training: bool = False,
                 module_cls=None, module_kwargs: Optional[Dict[str, Any]] = None):
    """The LightningModule of a run: `module_cls` (default: the recipe's) built with `from_config`.

    For training: model.pretrained is loaded in the training precision's dtype, and under DeepSpeed ZeRO-3 the
    model is built later, in each process (zero3_deferred_load). Otherwise (export, evaluation) the whole model
    is built here in float32."""
    cls = module_cls or module_class(recipe)
    dtype = pretrained_dtype(cfg) if training and cfg.model.pretrained else None
    if training and zero3_deferred_load(cfg, recipe):
        return cls.from_config(cfg, None, dm, model_factory=Zero3ModelFactory(cfg, dm, recipe, dtype),
                               **(module_kwargs or {}))
    model = prepared_model(cfg, dm, recipe, dtype)
    if training:
        model.train()  # from_pretrained returns eval mode, and Lightning keeps each submodule's mode
    return cls.from_config(cfg, model, dm, **(module_kwargs or {}))
