"""Retrofitting Hugging Face MoE causal LMs (Mixtral / Qwen2-MoE / OLMoE) with null experts, saving and
restoring retrofitted checkpoints, and the names of their new (trainable) modules.

Plain PyTorch: no Lightning, no imports from `recipes/`. `transformers` (and `safetensors`) are imported
lazily, inside the functions that need them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from models.moe.block import SparseMoEBlock, moe_blocks
from models.moe.config import EXPERT_IMPLS, NULL_GATE_INITS, RENORMALIZE_TRUE

# Hugging Face model types `retrofit` knows, with the config field holding the number of routed experts.
_SUPPORTED_HF_MOE = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "olmoe": "num_experts",
}
# Key under which a retrofitted model's config records its AdaMoE settings (saved in config.json).
CONFIG_KEY = "adamoe"


def hf_sparse_block_classes() -> tuple:
    """The transformers sparse MoE block classes that `retrofit` replaces (imported on call)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    return (MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, OlmoeSparseMoeBlock)


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _SUPPORTED_HF_MOE:
        raise ValueError(f"retrofit supports Hugging Face model types {sorted(_SUPPORTED_HF_MOE)}; "
                         f"got {model_type!r} ({type(model).__name__})")
    return model_type


def model_norm_topk_prob(model: nn.Module) -> bool:
    """The base model's own weighting of its top-k experts: Mixtral renormalises them to sum 1; Qwen2-MoE and
    OLMoE do so only when `config.norm_topk_prob` (both default to False: raw softmax probabilities)."""
    if _model_type(model) == "mixtral":
        return True
    return bool(getattr(model.config, "norm_topk_prob", False))


def resolve_renormalize_true(model: nn.Module, renormalize_true: str, num_null_experts: int) -> bool:
    """Whether a retrofitted block renormalises the selected true experts' weights (`RENORMALIZE_TRUE`):
    "true" yes (AdaMoE's formula), "false" no (raw softmax over E_true + N_null), "auto" yes when there are
    null experts and the model's own rule (`model_norm_topk_prob`) without them, so that num_null_experts=0
    leaves the model unchanged."""
    if renormalize_true not in RENORMALIZE_TRUE:
        raise ValueError(f"renormalize_true must be one of {list(RENORMALIZE_TRUE)}, got {renormalize_true!r}")
    if renormalize_true == "auto":
        return True if num_null_experts > 0 else model_norm_topk_prob(model)
    return renormalize_true == "true"


def retrofit(model: nn.Module, num_null_experts: int, top_k: Optional[int] = None,
             null_gate_init: str = "copy", capacity_factor: Optional[float] = None,
             lb_null_mode: str = "average", lb_reduce: str = "per_layer_sum", lb_coef: float = 1e-3,
             z_coef: float = 0.0, seed: Optional[int] = None, expert_impl: str = "auto",
             lb_fraction: str = "slots", renormalize_true: str = "auto") -> nn.Module:
    """Add `num_null_experts` null experts to every sparse block of a HF Mixtral / Qwen2-MoE / OLMoE
    causal LM, in place; returns the model.

    Each HF sparse block is replaced by a `SparseMoEBlock` that shares the block's router weight, its
    expert module (3-D weights) and Qwen2-MoE's shared expert + shared-expert gate: the original
    Parameters are untouched, only `gate.null_gate` is new. `top_k` defaults to the model's
    num_experts_per_tok (AdaMoE's Mixtral run raised it from 2 to 4). Weights (`renormalize_true`, see
    `resolve_renormalize_true`): by default ("auto") the selected true experts' probabilities are
    renormalised to sum 1, AdaMoE's formula, whenever there are null experts, also for Qwen2-MoE / OLMoE
    whose own rule (norm_topk_prob=False) keeps raw probabilities; "false" keeps the raw softmax over
    E_true + N_null. With num_null_experts=0, the original top_k and "auto" the logits equal the original
    model's.

    The settings are recorded in `model.config.adamoe`, so `save_pretrained` + `load_retrofitted(path)`
    restores the model. HF's own `output_router_logits` aux loss is not null-aware and is switched off
    (`config.output_router_logits = False`): use `collect_moe_aux_losses` instead.

    `expert_impl` ("auto" | "loop" | "grouped_mm") is how the new blocks compute the (shared) experts; it
    changes speed only, not outputs, and is not recorded in `config.adamoe` (a restored model uses "auto").
    """
    _model_type(model)
    if moe_blocks(model):
        raise ValueError("model is already retrofitted (it contains SparseMoEBlocks)")
    if num_null_experts < 0:
        raise ValueError(f"num_null_experts must be >= 0, got {num_null_experts}")
    config = model.config
    top_k = int(top_k if top_k is not None else config.num_experts_per_tok)
    norm_topk_prob = resolve_renormalize_true(model, renormalize_true, num_null_experts)
    if null_gate_init not in NULL_GATE_INITS:
        raise ValueError(f"null_gate_init must be one of {list(NULL_GATE_INITS)}, got {null_gate_init!r}")
    if expert_impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl must be one of {list(EXPERT_IMPLS)}, got {expert_impl!r}")

    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    hf_classes = hf_sparse_block_classes()
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, hf_classes)]
    if not targets:
        raise ValueError(f"no sparse MoE block found in {type(model).__name__}")
    try:
        for name, block in targets:
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            new_block = SparseMoEBlock.from_hf_block(
                block, num_null_experts=num_null_experts, top_k=top_k, norm_topk_prob=norm_topk_prob,
                null_gate_init=null_gate_init, capacity_factor=capacity_factor, lb_null_mode=lb_null_mode,
                lb_reduce=lb_reduce, lb_coef=lb_coef, z_coef=z_coef, expert_impl=expert_impl,
                lb_fraction=lb_fraction,
            )
            setattr(parent, child_name, new_block)
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)

    setattr(config, CONFIG_KEY, {
        "num_null_experts": int(num_null_experts), "top_k": top_k, "null_gate_init": null_gate_init,
        "capacity_factor": capacity_factor, "lb_null_mode": lb_null_mode, "lb_reduce": lb_reduce,
        "lb_coef": lb_coef, "z_coef": z_coef, "lb_fraction": lb_fraction, "renormalize_true": renormalize_true,
    })
    config.output_router_logits = False
    return model


_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def null_gates_by_layer(model: nn.Module) -> Dict[int, nn.Linear]:
    """The null gate of every SparseMoEBlock of `model` that has one, keyed by layer index."""
    gates: Dict[int, nn.Linear] = {}
    for name, block in model.named_modules():
        if isinstance(block, SparseMoEBlock) and block.gate.null_gate is not None:
            match = _LAYER_INDEX.search(name + ".")
            if match is None:
                raise ValueError(f"cannot find the layer index of MoE block {name!r}")
            gates[int(match.group(1))] = block.gate.null_gate
    return gates


def checkpoint_null_gate_tensors(path: Path) -> Dict[int, torch.Tensor]:
    """Null-gate weights in a safetensors checkpoint directory, keyed by layer index.

    Keyed by layer rather than by full name because transformers 5 renames some modules on save
    (e.g. Mixtral's `mlp` is written as `block_sparse_moe`); the layer index survives the renaming."""
    from safetensors import safe_open

    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"no safetensors checkpoint (model.safetensors or its index) in {path}")
    found: Dict[int, torch.Tensor] = {}
    for file_name in files:
        with safe_open(str(path / file_name), framework="pt") as handle:
            for key in handle.keys():
                if "null_gate" in key:
                    match = _LAYER_INDEX.search(key)
                    if match is None:
                        raise ValueError(f"null-gate tensor {key!r} in {file_name} has no layer index")
                    found[int(match.group(1))] = handle.get_tensor(key)
    return found


def load_retrofitted(path: Union[str, Path], **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a model saved with `save_pretrained` after `retrofit`: the base model through
    `AutoModelForCausalLM.from_pretrained` (the null gates are unknown to it and skipped), then
    `retrofit` with the settings in `config.adamoe`, then the saved null-gate weights.
    `path` must be a local directory."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"load_retrofitted needs a local checkpoint directory; {path} is not one")
    from models.hub_export.adamoe_base import is_adamoe_export, load_adamoe_base

    if is_adamoe_export(path):  # a self-contained export (own model_type + remote code): its base, then the nulls
        return restore_retrofit(load_adamoe_base(path, **from_pretrained_kwargs), path)
    settings = getattr(AutoConfig.from_pretrained(str(path)), CONFIG_KEY, None)
    if not settings:
        raise ValueError(f"{path}/config.json has no '{CONFIG_KEY}' entry: it was not saved from a retrofitted "
                         "model; load it with from_pretrained and call retrofit()")
    # The null-gate tensors are "unexpected" for the base architecture; we load them ourselves below.
    previous_verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **from_pretrained_kwargs)
    finally:
        hf_logging.set_verbosity(previous_verbosity)
    return restore_retrofit(model, path)


def saved_retrofit_settings(model: nn.Module) -> Dict[str, Any]:
    """The `retrofit` arguments recorded in `model.config.adamoe`. Checkpoints saved before `renormalize_true`
    existed used the model's own weighting rule: that is what they get back."""
    settings = dict(getattr(model.config, CONFIG_KEY))
    if "renormalize_true" not in settings:
        settings["renormalize_true"] = "true" if model_norm_topk_prob(model) else "false"
    return settings


def restore_retrofit(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Finish loading a retrofitted checkpoint whose base weights are already in `model` (loaded with
    `from_pretrained(path)`, which skips the null gates): `retrofit` with the settings saved in
    `model.config.adamoe`, then copy the null-gate weights from the safetensors files in `path`."""
    path = Path(path)
    settings = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not settings:
        raise ValueError(f"the model loaded from {path} has no config.{CONFIG_KEY}: it is not a retrofitted "
                         "checkpoint")
    retrofit(model, **saved_retrofit_settings(model))

    gates = null_gates_by_layer(model)
    if not gates:  # retrofitted with num_null_experts=0: nothing saved, nothing to load
        return model
    saved = checkpoint_null_gate_tensors(path)
    if set(gates) != set(saved):
        raise ValueError(f"{path}: null gates saved for layers {sorted(saved)} but the model has them in "
                         f"layers {sorted(gates)}")
    with torch.no_grad():
        for layer, gate in gates.items():
            tensor = saved[layer]
            if tuple(tensor.shape) != tuple(gate.weight.shape):
                raise ValueError(f"{path}: layer {layer} null gate has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(gate.weight.shape)}")
            gate.weight.copy_(tensor.to(device=gate.weight.device, dtype=gate.weight.dtype))
    return model


def trainable_module_names(model: nn.Module) -> List[str]:
    """Full names of the null-gate modules, the only new parameters of a retrofitted model: pass them
    as `LoraConfig(modules_to_save=trainable_module_names(model))` so they train under LoRA (PEFT
    matches a module whose name equals an entry or ends with "." plus an entry)."""
    names = [f"{name}.gate.null_gate" for name, block in model.named_modules()
             if isinstance(block, SparseMoEBlock) and block.gate.null_gate is not None]
    if not names:
        raise ValueError("no null gates found: retrofit the model with num_null_experts > 0 first")
    return names
