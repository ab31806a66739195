"""The shared causal-LM LightningModule: AdamW, warmup + cosine, clipping, per-domain validation.

Recipes subclass it and override `extra_losses` (auxiliary terms added to the LM loss, e.g. MoE load
balancing), `extra_metrics` (logged each step) and `summary_metrics` (their headline numbers for
summary.json).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import lightning as L
import torch
import torch.nn.functional as F

from models.factory import count_parameters

from .config import to_dict


class NonFiniteLossError(RuntimeError):
    pass


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: logits at position i predict labels at i+1 (-100 ignored)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=-100, reduction="none").view(shift_labels.shape)
    if reduction == "none":
        return loss
    mask = (shift_labels != -100).float()
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 1/warmup to 1, then cosine from 1 down to min_ratio at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLMModule(L.LightningModule):
    """`model` is the causal LM; or None with a `model_factory(trainer) -> model`, called once in `setup`, i.e.
    in every process after the process group exists (train.py: DeepSpeed ZeRO-3 loading of model.pretrained)."""

    def __init__(self, model: Optional[torch.nn.Module], optim: Dict[str, Any], max_steps: int,
                 domain_names: Optional[List[str]] = None, compile_model: bool = False,
                 model_factory: Optional[Callable[[Any], torch.nn.Module]] = None,
                 fsdp2_reshard_after_forward: bool = True):
        super().__init__()
        self.fsdp2_reshard_after_forward = fsdp2_reshard_after_forward
        if (model is None) == (model_factory is None):
            raise ValueError("CausalLMModule needs exactly one of model and model_factory")
        self.model_factory = model_factory
        self.compile_model = compile_model
        self.optim_cfg = dict(optim)
        self.max_steps = max_steps
        self.domain_names = list(domain_names or [])
        self.tokens_seen = 0
        self._val_sums: Optional[torch.Tensor] = None
        self.last_val: Dict[str, float] = {}
        self.last_train_loss: Optional[float] = None
        self.model: Optional[torch.nn.Module] = None
        if model is not None:
            self._set_model(model)

    @classmethod
    def from_config(cls, cfg, model: Optional[torch.nn.Module], datamodule, model_factory=None, **kwargs):
        """How the engine builds every module: the shared arguments from the run config, plus the subclass's
        own (`config_options(cfg)`) and any `kwargs` a stage passes."""
        return cls(model, to_dict(cfg.optim), cfg.trainer.max_steps, list(datamodule.domain_names),
                   compile_model=cfg.model.compile, model_factory=model_factory,
                   fsdp2_reshard_after_forward=cfg.trainer.fsdp2.reshard_after_forward,
                   **{**cls.config_options(cfg), **kwargs})

    @classmethod
    def config_options(cls, cfg) -> Dict[str, Any]:
        """A subclass's own constructor arguments, read from its recipe's config section."""
        return {}

    def _set_model(self, model: torch.nn.Module) -> None:
        self.model = model
        self._forward = torch.compile(model) if self.compile_model else model

    def on_model_ready(self, model: torch.nn.Module) -> None:
        """Hook for subclasses' set-up that needs the model: called by `setup` after a model_factory built it
        (a subclass given the model itself runs its own set-up in __init__)."""

    def setup(self, stage: str) -> None:
        if self.model is None:
            self._set_model(self.model_factory(self.trainer))
            self.on_model_ready(self.model)

    # ---------------------------------------------------------------- hooks for recipes
    def model_kwargs(self) -> Dict[str, Any]:
        return {}

    def extra_losses(self, batch: Dict[str, torch.Tensor], outputs: Any) -> Dict[str, torch.Tensor]:
        """Name -> already-weighted auxiliary loss added to the LM loss (logged as train/<name>)."""
        aux = getattr(outputs, "aux_loss", None)
        coef = getattr(getattr(self.model, "config", None), "router_aux_loss_coef", 0.0)
        if aux is not None and coef:
            return {"aux_loss": coef * aux}
        return {}

    def extra_metrics(self, batch: Dict[str, torch.Tensor], outputs: Any) -> Dict[str, float]:
        return {}

    def summary_metrics(self) -> Dict[str, Any]:
        return {}

    # ---------------------------------------------------------------- sharding
    def configure_model(self) -> None:
        """FSDP2 (trainer.strategy=fsdp2, Lightning's ModelParallelStrategy, which sets a device mesh):
        `fully_shard` each decoder layer over the data-parallel mesh, then the root (embeddings, final norm,
        head). Each layer's weights are gathered just for its own forward/backward. Other strategies: no-op."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or getattr(self, "_fully_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh["data_parallel"]
        reshard = self.fsdp2_reshard_after_forward
        layers = [m for name, m in self.model.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")]
        if not layers:
            raise ValueError("fsdp2: found no decoder layer list (layers / h / blocks) in "
                             f"{type(self.model).__name__}.")
        for layer_list in layers:
            for layer in layer_list:
                fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard)
        fully_shard(self.model, mesh=dp_mesh, reshard_after_forward=reshard)
        self._fully_sharded = True

    # ---------------------------------------------------------------- training
    def forward(self, input_ids: torch.Tensor, **kw):
        return self._forward(input_ids=input_ids, **kw)

    def _step(self, batch: Dict[str, torch.Tensor]):
        outputs = self(batch["input_ids"], attention_mask=batch.get("attention_mask"), **self.model_kwargs())
        loss = lm_loss(outputs.logits, batch["labels"])
        return loss, outputs

    def training_step(self, batch: Dict[str, torch.Tensor], batch_idx: int):
        loss, outputs = self._step(batch)
        extras = self.extra_losses(batch, outputs)
        total = loss + sum(extras.values()) if extras else loss
        if not torch.isfinite(total):
            raise NonFiniteLossError(
                f"Non-finite loss ({total.item()}) at step {self.global_step}: stopping; the last good "
                "checkpoint is kept. Lower optim.lr, raise optim.warmup_steps or check the data."
            )
        n_tokens = int(batch["input_ids"].numel()) * self.trainer.world_size
        self.tokens_seen += n_tokens
        self.last_train_loss = float(loss.detach())
        log = {"train/loss": loss.detach(), "train/ppl": torch.exp(loss.detach().clamp(max=20)),
               "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
               "train/tokens_seen": float(self.tokens_seen)}
        for k, v in extras.items():
            log[f"train/{k}"] = v.detach()
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=batch["input_ids"].size(0))
        self.log("loss", loss.detach(), prog_bar=True, logger=False, on_step=True)
        metrics = self.extra_metrics(batch, outputs)
        if metrics:
            self.log_dict(metrics, on_step=True, on_epoch=False)
        return total

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        n = max(1, len(self.domain_names))
        self._val_sums = torch.zeros(2, n + 1, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Dict[str, torch.Tensor], batch_idx: int) -> None:
        outputs = self(batch["input_ids"], attention_mask=batch.get("attention_mask"), **self.model_kwargs())
        per_tok = lm_loss(outputs.logits, batch["labels"], reduction="none")
        mask = (batch["labels"][:, 1:] != -100)
        per_seq = (per_tok * mask).sum(1).double()
        counts = mask.sum(1).double()
        self._val_sums[0, -1] += per_seq.sum()
        self._val_sums[1, -1] += counts.sum()
        if "domain" in batch and self.domain_names:
            dom = batch["domain"].long()
            self._val_sums[0, :-1].index_add_(0, dom, per_seq)
            self._val_sums[1, :-1].index_add_(0, dom, counts)

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        loss = (sums[0] / sums[1].clamp_min(1)).tolist()
        out = {"val/loss": loss[-1], "val/ppl": math.exp(min(loss[-1], 20)),
               "train/tokens_seen": float(self.tokens_seen)}
        for i, name in enumerate(self.domain_names):
            if sums[1, i] > 0:
                out[f"val/loss_{name}"] = loss[i]
        self.log_dict(out, sync_dist=False)
        if not self.trainer.sanity_checking:
            self.last_val = dict(out, _step=self.global_step)
        self.log("val_loss", loss[-1], prog_bar=True, logger=False)

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        c = self.optim_cfg
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": c["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]  # DeepSpeed drops empty groups (e.g. LoRA: all 2-D)
        opt = torch.optim.AdamW(groups, lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"])
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, c["warmup_steps"], self.max_steps, c["min_lr_ratio"]))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint["recipe_meta"] = {"model_class": type(self.model).__name__,
                                     "num_parameters": count_parameters(self.model)}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))


def weighted_moe_losses(module, token_mask: Optional[torch.Tensor], lb_null_mode: Optional[str] = None,
                        lb_reduce: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The MoE terms a module of an MoE model adds to the LM loss: `moe_lb` = module.lb_coef * load balancing,
    `moe_z` = module.z_coef * router z-loss (when z_coef > 0), over the blocks' last forward; the raw values stay
    in module._raw_aux for the metrics (moe/aux_loss, moe/z_loss). Used by the AdaMoE and OpenMoE modules."""
    from models.moe import collect_moe_aux_losses

    aux = collect_moe_aux_losses(module.model, token_mask, lb_null_mode, lb_reduce)
    module._raw_aux = {k: v.detach() for k, v in aux.items()}
    losses = {"moe_lb": module.lb_coef * aux["lb"]}
    if module.z_coef > 0:
        losses["moe_z"] = module.z_coef * aux["z"]
    return losses
