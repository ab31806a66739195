"""OpenMoE: train a tiny OpenMoE-style decoder and analyse its routing.

    make train RECIPE=openmoe                      # ~200 steps on CPU, a step checkpoint every 20 steps
    make analyze RUN=runs/openmoe/<run_id>         # routing analysis of every checkpoint (recipes/openmoe/analyze.py)

The model is `models.openmoe.OpenMoEForCausalLM` (`model.arch=openmoe`): Llama decoder layers whose every
`moe_every`-th MLP is a top-2 `OpenMoEBlock` (capacity factor 1.25 under train(), 2.0 under eval(), capacity
per sequence in position order). Training adds `openmoe.lb_coef * load-balancing loss` and
`openmoe.z_coef * router z-loss` (models.moe.collect_moe_aux_losses). Logged each step: moe/aux_loss,
moe/z_loss, moe/drop_fraction (training capacity), moe/router_entropy, moe/load/l{layer}_e{expert}; every
`routing_probe.every_n_steps` the routing-probe callback (recipes/engine/routing_callback.py) adds
moe/specialisation_token_id, moe/drop_rate, moe/load_max_over_ideal, ... and W&B figures.
summary.json gets the last validation's moe/val_drop_fraction (evaluation capacity 2.0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from models.moe import moe_blocks, moe_routing_metrics
from recipes.engine.errors import ConfigError
from recipes.engine.logs import add_expert_load
from recipes.engine.module import CausalLMModule, weighted_moe_losses


@dataclass
class OpenMoERecipeConfig:
    lb_coef: float = 1e-2  # OpenMoE / ST-MoE load-balance weight
    z_coef: float = 1e-3  # router z-loss weight (OpenMoE: 1e-3, later 1e-4)
    log_expert_load: bool = True  # per-layer per-expert load columns moe/load/l{i}_e{j}


def check_config(cfg) -> None:
    c = cfg.openmoe
    if c.lb_coef < 0 or c.z_coef < 0:
        raise ConfigError(f"openmoe.lb_coef and openmoe.z_coef must be >= 0, got {c.lb_coef}, {c.z_coef}.")
    if cfg.model.arch == "openmoe" and not cfg.model.pretrained:
        # model.overrides.* (drop_order, capacity_group, capacity factors, ...) checked now, not at model build
        from omegaconf import OmegaConf

        from models.openmoe import OPENMOE_SIZES, OpenMoEConfig

        if cfg.model.size in OPENMOE_SIZES:
            overrides = OmegaConf.to_container(cfg.model.overrides) if cfg.model.overrides else {}
            try:
                OpenMoEConfig.from_dict({**OPENMOE_SIZES[cfg.model.size], **overrides})
            except (TypeError, ValueError) as e:
                raise ConfigError(f"model.overrides: {e}.") from None


def prepare_model(cfg, model: torch.nn.Module, datamodule=None) -> torch.nn.Module:
    if not moe_blocks(model):
        raise ConfigError(f"recipe openmoe needs an MoE model (model.arch=openmoe); model.arch={cfg.model.arch} "
                          "has no SparseMoEBlock.")
    return model


class OpenMoEModule(CausalLMModule):
    """CausalLMModule + load-balance and z losses + routing metrics of the MoE layers."""

    def __init__(self, *args, lb_coef: float = 1e-2, z_coef: float = 1e-3, log_expert_load: bool = True,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.model is None or not moe_blocks(self.model):
            raise ValueError("OpenMoEModule needs a model with SparseMoEBlocks")
        self.lb_coef, self.z_coef = lb_coef, z_coef
        self.log_expert_load = log_expert_load
        self._raw_aux: Dict[str, torch.Tensor] = {}
        self._val_drop: Optional[torch.Tensor] = None
        self.last_val_drop: Optional[float] = None

    @classmethod
    def config_options(cls, cfg) -> Dict[str, Any]:
        c = cfg.openmoe
        return {"lb_coef": c.lb_coef, "z_coef": c.z_coef, "log_expert_load": c.log_expert_load}

    @staticmethod
    def _mask(batch):
        return batch.get("attention_mask")

    def extra_losses(self, batch, outputs) -> Dict[str, torch.Tensor]:
        return weighted_moe_losses(self, self._mask(batch))

    def extra_metrics(self, batch, outputs) -> Dict[str, float]:
        metrics = moe_routing_metrics(self.model, self._mask(batch))
        load = metrics.pop("expert_load")
        for key in [k for k in metrics if k.startswith(("moe/share_true_experts", "moe/null_slot"))]:
            metrics.pop(key)  # no null experts here: always 1.0 / 0.0
        if "lb" in self._raw_aux:
            metrics["moe/aux_loss"] = float(self._raw_aux["lb"])
            metrics["moe/z_loss"] = float(self._raw_aux["z"])
        if self.log_expert_load:
            add_expert_load(metrics, self.loggers, load, self.global_step)
        return metrics

    # Validation (evaluation capacity): share of assignments dropped over the validation tokens.
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_drop = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        for block in moe_blocks(self.model):
            r = block.last_routing
            if r["dropped"] is not None:
                self._val_drop[0] += r["dropped"].sum().double()
            self._val_drop[1] += r["topk_indices"].numel()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        sums = self.trainer.strategy.reduce(self._val_drop, reduce_op="sum")
        value = float(sums[0] / sums[1].clamp_min(1))
        self.log("val/moe_drop_fraction", value, sync_dist=False)
        if not self.trainer.sanity_checking:
            self.last_val_drop = value

    def summary_metrics(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"moe/num_moe_layers": len(moe_blocks(self.model))}
        if self.last_val_drop is not None:
            out["moe/val_drop_fraction"] = self.last_val_drop
        return out
