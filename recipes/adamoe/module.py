"""AdaMoE: train a Mixtral-style MoE whose router can pick parameter-free null experts.

    make train RECIPE=adamoe                                        # 8 true + 8 null experts, top-3
    make train RECIPE=adamoe ARGS="adamoe.num_null_experts=0 adamoe.top_k=2"   # the top-2 baseline

The model is the factory's Mixtral (`model.arch`/`model.size`, or `model.pretrained=<dir>`), retrofitted by
`models.moe.retrofit`: each sparse block becomes a `SparseMoEBlock` with `num_null_experts` null experts
and `top_k` slots. A from-scratch model uses `null_gate_init: random` (a separate randomly initialised null
gate; the logits [true gate | null gate] are the same function as one randomly initialised router over
E_true + N_null experts, so this is the "one router" variant too); `copy` repeats the true gate's rows
(AdaMoE's Mixtral fine-tuning). A `model.pretrained` checkpoint that was itself saved retrofitted (its
config.json has an `adamoe` entry) is restored with its saved null gates instead.

Training adds `adamoe.lb_coef * load-balancing loss` (null-aware: `lb_null_mode`, `lb_reduce`, `lb_fraction`)
and `adamoe.z_coef * router z-loss`, both over real tokens only. `adamoe.lb_preset` sets these five keys to
the values of one of AdaMoE's released runs (`released_mixtral`, `released_llama_lora`; models.moe.LB_PRESETS)
or leaves them to the config (`custom`, defaults in CUSTOM_LB_DEFAULTS); a key given explicitly that conflicts
with the preset is a ConfigError. Optional LoRA (`adamoe.lora_r > 0`, via
peft) trains the adapters and the null gates only. Logged each step (metrics.csv, W&B): moe/true_experts_
per_token, moe/share_true_experts_{0..k}, moe/null_slot_fraction, moe/drop_fraction, moe/router_entropy,
moe/aux_loss, moe/z_loss and moe/load/l{layer}_e{expert} (share of a layer's slots per expert). At each
validation the routing is measured over the validation tokens (val/moe_true_experts_per_token);
summary.json gets moe/true_experts_per_token (last validation) and moe/flops_vs_topk = that / the
reference k (the base model's num_experts_per_tok, i.e. the top-k model AdaMoE is compared with).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from models.moe import (
    CONFIG_KEY,
    EXPERT_IMPLS,
    LB_FRACTIONS,
    LB_NULL_MODES,
    LB_PRESETS,
    LB_REDUCES,
    NULL_GATE_INITS,
    RENORMALIZE_TRUE,
    collect_moe_aux_losses,
    moe_blocks,
    moe_routing_metrics,
    resolve_renormalize_true,
    restore_retrofit,
    retrofit,
    saved_retrofit_settings,
    trainable_module_names,
)
from recipes.engine.errors import ConfigError
from recipes.engine.logs import add_expert_load
from recipes.engine.module import CausalLMModule

# lb_preset=custom: the values of the keys left unset (the from-scratch `adamoe` recipe's setting).
CUSTOM_LB_DEFAULTS: Dict[str, Any] = {"lb_coef": 1e-2, "z_coef": 1e-3, "lb_null_mode": "average",
                                      "lb_reduce": "per_layer_sum", "lb_fraction": "slots"}
LB_KEYS = tuple(CUSTOM_LB_DEFAULTS)


@dataclass
class AdaMoEConfig:
    num_null_experts: int = 8
    top_k: Optional[int] = 4  # None: the model's num_experts_per_tok
    null_gate_init: str = "random"  # random (from scratch) | copy (repeat the true gate's rows)
    capacity_factor: Optional[float] = None  # None: no capacity limit; else C = ceil(cf * T * k / E_true)
    # released_mixtral | released_llama_lora (AdaMoE's released runs) | custom (the five keys below as given)
    lb_preset: str = "custom"
    # The five loss keys: None = the preset's value (custom: CUSTOM_LB_DEFAULTS); filled in at config load.
    lb_coef: Optional[float] = None  # weight of the load-balancing loss
    z_coef: Optional[float] = None  # weight of the router z-loss (0 disables it)
    lb_null_mode: Optional[str] = None  # average (null counts averaged) | none (every expert balanced)
    lb_reduce: Optional[str] = None  # per_layer_sum | concat (HF Mixtral: pool all layers' tokens)
    lb_fraction: Optional[str] = None  # slots (count / (T*k)) | tokens (count / T, HF Mixtral)
    # auto | true | false: renormalise the selected true experts' weights (models.moe.resolve_renormalize_true)
    renormalize_true: str = "auto"
    reference_top_k: Optional[int] = None  # k of the compared top-k model; None: base num_experts_per_tok
    log_expert_load: bool = True  # per-layer per-expert load columns moe/load/l{i}_e{j}
    expert_impl: str = "auto"  # auto | loop | grouped_mm: how the experts are computed (models.moe.resolve_expert_impl)
    seed: Optional[int] = None  # seed of the null gates' random init (None: run.seed)
    lora_r: int = 0  # > 0: LoRA adapters (peft) on lora_target_modules, base weights frozen
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def resolve_lb_preset(c) -> None:
    """Fill the five loss keys of section `c` (adamoe) from `c.lb_preset`, in place. Under a released preset a
    key given with another value than the preset's is a ConfigError; under `custom` unset keys get
    CUSTOM_LB_DEFAULTS."""
    if c.lb_preset not in LB_PRESETS:
        raise ConfigError(f"adamoe.lb_preset must be one of {', '.join(LB_PRESETS)}; got '{c.lb_preset}'.")
    preset = LB_PRESETS[c.lb_preset]
    for key in LB_KEYS:
        given = c[key]
        if preset is None:
            if given is None:
                c[key] = CUSTOM_LB_DEFAULTS[key]
            continue
        wanted = preset[key]
        same = (given == wanted) if isinstance(wanted, str) else (
            given is not None and math.isclose(float(given), float(wanted), rel_tol=1e-9, abs_tol=0.0))
        if given is not None and not same:
            raise ConfigError(f"adamoe.{key}={given} conflicts with adamoe.lb_preset={c.lb_preset}, which sets "
                              f"{key}={wanted}: drop the key or set adamoe.lb_preset=custom.")
        c[key] = wanted


def check_config(c) -> None:
    resolve_lb_preset(c)
    # `adamoe.renormalize_true=true` reaches a str field as "True" (YAML / OmegaConf booleans)
    c.renormalize_true = str(c.renormalize_true).lower()
    if c.num_null_experts < 0:
        raise ConfigError(f"adamoe.num_null_experts must be >= 0, got {c.num_null_experts}.")
    if c.top_k is not None and c.top_k < 1:
        raise ConfigError(f"adamoe.top_k must be >= 1 or null, got {c.top_k}.")
    for key, value, choices in (("null_gate_init", c.null_gate_init, NULL_GATE_INITS),
                                ("lb_null_mode", c.lb_null_mode, LB_NULL_MODES),
                                ("lb_reduce", c.lb_reduce, LB_REDUCES),
                                ("lb_fraction", c.lb_fraction, LB_FRACTIONS),
                                ("renormalize_true", c.renormalize_true, RENORMALIZE_TRUE),
                                ("expert_impl", c.expert_impl, EXPERT_IMPLS)):
        if value not in choices:
            raise ConfigError(f"adamoe.{key} must be one of {', '.join(choices)}; got '{value}'.")
    if c.capacity_factor is not None and c.capacity_factor <= 0:
        raise ConfigError(f"adamoe.capacity_factor must be > 0 or null, got {c.capacity_factor}.")
    if c.lb_coef < 0 or c.z_coef < 0:
        raise ConfigError(f"adamoe.lb_coef and adamoe.z_coef must be >= 0, got {c.lb_coef}, {c.z_coef}.")
    if c.lora_r < 0:
        raise ConfigError(f"adamoe.lora_r must be >= 0, got {c.lora_r}.")


def _zero3_partitioned(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


class _OneBlock(torch.nn.Module):
    """A stand-in model holding one sparse block and the model's config, for `retrofit` of that block alone."""

    def __init__(self, config, block: torch.nn.Module) -> None:
        super().__init__()
        self.config = config
        self.block = block


def retrofit_partitioned(model: torch.nn.Module, seed: Optional[int] = None, **settings) -> torch.nn.Module:
    """`retrofit` of a model whose parameters DeepSpeed ZeRO-3 has partitioned (their data is empty until
    gathered): one sparse block at a time, with only that block's parameters gathered, so no rank ever holds
    more than one layer's experts whole. The blocks are done in model order under one seeded generator, so
    the new null gates get exactly the values one `retrofit(model, seed=seed)` call gives. The null gates are
    ordinary (whole) parameters here; DeepSpeed partitions them, broadcast from rank 0, at deepspeed.initialize."""
    import deepspeed

    from models.moe import hf_sparse_block_classes

    classes = hf_sparse_block_classes()
    targets = [name for name, m in model.named_modules() if isinstance(m, classes)]
    if not targets:  # let retrofit raise its own error (unsupported model, no sparse block)
        return retrofit(model, seed=seed, **settings)
    state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            block = getattr(parent, child)
            with deepspeed.zero.GatheredParameters(list(block.parameters()), modifier_rank=None):
                one = retrofit(_OneBlock(model.config, block), seed=None, **settings)
            setattr(parent, child, one.block)
    finally:
        if seed is not None:
            torch.random.set_rng_state(state)
    return model


def restore_retrofit_partitioned(model: torch.nn.Module, path) -> torch.nn.Module:
    """`restore_retrofit` for a ZeRO-3 partitioned model (see `retrofit_partitioned`)."""
    from pathlib import Path

    from models.moe import checkpoint_null_gate_tensors, null_gates_by_layer

    retrofit_partitioned(model, **saved_retrofit_settings(model))
    gates = null_gates_by_layer(model)
    if not gates:
        return model
    saved = checkpoint_null_gate_tensors(Path(path))
    if set(gates) != set(saved):
        raise ValueError(f"{path}: null gates saved for layers {sorted(saved)} but the model has them in "
                         f"layers {sorted(gates)}")
    with torch.no_grad():
        for layer, gate in gates.items():
            if tuple(saved[layer].shape) != tuple(gate.weight.shape):
                raise ValueError(f"{path}: layer {layer} null gate has shape {tuple(saved[layer].shape)}, "
                                 f"expected {tuple(gate.weight.shape)}")
            gate.weight.copy_(saved[layer].to(device=gate.weight.device, dtype=gate.weight.dtype))
    return model


def _retrofit_from_config(cfg, model: torch.nn.Module) -> torch.nn.Module:
    c = cfg.adamoe
    partitioned = _zero3_partitioned(model)
    saved = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if saved and cfg.model.pretrained:
        # A checkpoint saved after retrofitting: restore its null experts and trained null gates.
        wanted_k = c.top_k if c.top_k is not None else saved["top_k"]
        if (saved["num_null_experts"], saved["top_k"]) != (c.num_null_experts, wanted_k):
            raise ConfigError(
                f"model.pretrained={cfg.model.pretrained} is already retrofitted with num_null_experts="
                f"{saved['num_null_experts']}, top_k={saved['top_k']}, but the config asks for "
                f"num_null_experts={c.num_null_experts}, top_k={c.top_k}: set adamoe.num_null_experts="
                f"{saved['num_null_experts']} adamoe.top_k={saved['top_k']}, or start from the base checkpoint.")
        saved_rule = saved_retrofit_settings(model)["renormalize_true"]
        if c.renormalize_true != "auto" and resolve_renormalize_true(model, saved_rule, c.num_null_experts) != \
                resolve_renormalize_true(model, c.renormalize_true, c.num_null_experts):
            raise ConfigError(
                f"model.pretrained={cfg.model.pretrained} was retrofitted with renormalize_true={saved_rule}, but "
                f"the config asks for adamoe.renormalize_true={c.renormalize_true}: drop the key (auto keeps the "
                "checkpoint's rule) or start from the base checkpoint.")
        return (restore_retrofit_partitioned if partitioned else restore_retrofit)(model, cfg.model.pretrained)
    try:
        return (retrofit_partitioned if partitioned else retrofit)(
                        model, num_null_experts=c.num_null_experts, top_k=c.top_k,
                        null_gate_init=c.null_gate_init, capacity_factor=c.capacity_factor,
                        lb_null_mode=c.lb_null_mode, lb_reduce=c.lb_reduce, lb_coef=c.lb_coef, z_coef=c.z_coef,
                        seed=c.seed if c.seed is not None else cfg.run.seed, expert_impl=c.expert_impl,
                        lb_fraction=c.lb_fraction, renormalize_true=c.renormalize_true)
    except ValueError as e:  # unsupported architecture, top_k > experts, ...
        raise ConfigError(f"adamoe: cannot retrofit model.arch={cfg.model.arch}: {e}") from None


def add_lora(cfg, model: torch.nn.Module) -> torch.nn.Module:
    """peft LoRA on `adamoe.lora_target_modules`; the null gates are `modules_to_save` (fully trained)."""
    from peft import LoraConfig, get_peft_model

    c = cfg.adamoe
    save = trainable_module_names(model) if c.num_null_experts > 0 else []
    lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                      target_modules=list(c.lora_target_modules), modules_to_save=save or None)
    try:
        return get_peft_model(model, lora)
    except ValueError as e:  # e.g. no module matches lora_target_modules
        raise ConfigError(f"adamoe.lora_*: peft could not wrap the model: {e}") from None


def prepare_model(cfg, model: torch.nn.Module, datamodule=None) -> torch.nn.Module:
    model = _retrofit_from_config(cfg, model)
    if cfg.adamoe.lora_r > 0:
        model = add_lora(cfg, model)
    return model


def true_experts_used(model: torch.nn.Module, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[layers * real tokens] number of true experts each (token, layer) actually computed."""
    used = []
    for block in moe_blocks(model):
        r = block.last_routing
        computed = r["topk_indices"] < r["num_true_experts"]
        if r["dropped"] is not None:
            computed = computed & ~r["dropped"]
        per_token = computed.sum(dim=-1)
        if token_mask is not None:
            per_token = per_token[token_mask.reshape(-1).to(per_token.device) > 0]
        used.append(per_token)
    return torch.cat(used)


class AdaMoEModule(CausalLMModule):
    """CausalLMModule + AdaMoE's auxiliary losses and routing metrics."""

    def __init__(self, *args, lb_coef: float = 1e-2, z_coef: float = 1e-3, lb_null_mode: str = "average",
                 lb_reduce: str = "per_layer_sum", lb_fraction: str = "slots", reference_top_k: Optional[int] = None,
                 log_expert_load: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        model = self.model
        self.lb_coef, self.z_coef = lb_coef, z_coef
        self.lb_null_mode, self.lb_reduce, self.lb_fraction = lb_null_mode, lb_reduce, lb_fraction
        self.log_expert_load = log_expert_load
        self._reference_top_k_setting = reference_top_k
        self._raw_aux: Dict[str, torch.Tensor] = {}
        self._val_used: Optional[torch.Tensor] = None
        self.last_val_routing: Dict[str, float] = {}
        self.last_train_routing: Dict[str, float] = {}
        if model is not None:
            self.on_model_ready(model)

    def on_model_ready(self, model: torch.nn.Module) -> None:
        blocks = moe_blocks(model)
        if not blocks:
            raise ValueError("AdaMoEModule needs a model with SparseMoEBlocks (retrofit it first)")
        self.top_k = blocks[0].top_k
        self.num_null_experts = blocks[0].num_null_experts
        base_k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
        self.reference_top_k = int(self._reference_top_k_setting or base_k or self.top_k)

    @classmethod
    def config_options(cls, cfg) -> Dict[str, Any]:
        c = cfg.adamoe
        return {"lb_coef": c.lb_coef, "z_coef": c.z_coef, "lb_null_mode": c.lb_null_mode, "lb_reduce": c.lb_reduce,
                "lb_fraction": c.lb_fraction, "reference_top_k": c.reference_top_k,
                "log_expert_load": c.log_expert_load}

    @staticmethod
    def _mask(batch: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        return batch.get("attention_mask")

    def extra_losses(self, batch, outputs) -> Dict[str, torch.Tensor]:
        # The engine's `weighted_moe_losses` with lb_fraction added (it takes only lb_null_mode / lb_reduce):
        # moe_lb = lb_coef * balance loss, moe_z = z_coef * z-loss; raw values kept for the metrics.
        aux = collect_moe_aux_losses(self.model, self._mask(batch), self.lb_null_mode, self.lb_reduce,
                                     self.lb_fraction)
        self._raw_aux = {k: v.detach() for k, v in aux.items()}
        losses = {"moe_lb": self.lb_coef * aux["lb"]}
        if self.z_coef > 0:
            losses["moe_z"] = self.z_coef * aux["z"]
        return losses

    def extra_metrics(self, batch, outputs) -> Dict[str, float]:
        metrics = moe_routing_metrics(self.model, self._mask(batch))
        load = metrics.pop("expert_load")
        self.last_train_routing = dict(metrics)
        if "lb" in self._raw_aux:
            metrics["moe/aux_loss"] = float(self._raw_aux["lb"])
            metrics["moe/z_loss"] = float(self._raw_aux["z"])
        if self.log_expert_load:
            add_expert_load(metrics, self.loggers, load, self.global_step)
        return metrics

    # Validation: the true-expert load over all validation tokens (the FLOPs proxy of the headline).
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        # [sum of true experts used, (token, layer) pairs, then counts of pairs using 0..k true experts]
        self._val_used = torch.zeros(self.top_k + 3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        used = true_experts_used(self.model, self._mask(batch))
        self._val_used[0] += used.sum().double()
        self._val_used[1] += used.numel()
        self._val_used[2:] += torch.bincount(used, minlength=self.top_k + 1).double()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        sums = self.trainer.strategy.reduce(self._val_used, reduce_op="sum")
        pairs = max(float(sums[1]), 1.0)
        out = {"val/moe_true_experts_per_token": float(sums[0]) / pairs}
        for i in range(self.top_k + 1):
            out[f"val/moe_share_true_experts_{i}"] = float(sums[2 + i]) / pairs
        self.log_dict(out, sync_dist=False)
        if not self.trainer.sanity_checking:
            self.last_val_routing = out

    def summary_metrics(self) -> Dict[str, Any]:
        if self.last_val_routing:
            tpt = self.last_val_routing["val/moe_true_experts_per_token"]
            shares = {f"moe/share_true_experts_{i}": self.last_val_routing[f"val/moe_share_true_experts_{i}"]
                      for i in range(self.top_k + 1)}
        elif self.last_train_routing:
            tpt = self.last_train_routing["moe/true_experts_per_token"]
            shares = {k: v for k, v in self.last_train_routing.items() if k.startswith("moe/share_true")}
        else:
            return {}
        return {"moe/true_experts_per_token": tpt, "moe/flops_vs_topk": tpt / self.reference_top_k,
                "moe/top_k": self.top_k, "moe/reference_top_k": self.reference_top_k,
                "moe/num_null_experts": self.num_null_experts, **shares}
