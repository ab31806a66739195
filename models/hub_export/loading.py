"""Reading export folders in this repository, without trust_remote_code: the classes are this repository's own.

- `load_export(path)`: the model of any export as the recipes build it: a TokenFormerForCausalLM, an
  OpenMoEForCausalLM, a retrofitted transformers MoE (models.moe blocks, null gates loaded) or the plain
  transformers model; older exports (native TokenFormer / OpenMoE folders, AdaMoE saved as its base model type
  with an `adamoe` entry) too.
- `model.pretrained=<export>` (models.factory.load_pretrained) dispatches on config.json's model_type; the
  model types of the exports are registered here:
    * adamoe_<base>: the BASE transformers model with `config.adamoe` and without null gates
      (adamoe_base.load_adamoe_base), which is what an AdaMoE recipe's prepare_model expects of a retrofitted
      checkpoint (it restores the null experts from the folder, also under ZeRO-3, block by block), exactly as
      for the exports written before these types;
    * tokenformer_causal_lm / openmoe_llama: the repository's TokenFormerForCausalLM / OpenMoEForCausalLM.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from models.factory import ModelSpec, register_architecture
from models.hub_export.adamoe_base import ADAMOE_BASE_TYPES, load_adamoe_base, read_config
from models.hub_export.export_names import OPENMOE_MODEL_TYPE, TOKENFORMER_MODEL_TYPE, WRAPPED_PREFIX
from models.hub_export.weights import load_weights


def _load_wrapped(path: Path, native: nn.Module) -> nn.Module:
    """Put the `model.`-prefixed weights of a wrapper export into the repository's own model, strictly (only a
    tensor tied to a loaded one may be absent: exports store tied weights once)."""
    state = load_weights(path)
    stray = sorted(k for k in state if not k.startswith(WRAPPED_PREFIX))
    if stray:
        raise ValueError(f"{path}: weights outside '{WRAPPED_PREFIX}*' in a wrapped export: {stray[:5]}")
    result = native.load_state_dict({k[len(WRAPPED_PREFIX):]: v for k, v in state.items()}, strict=False)
    params = dict(native.named_parameters(remove_duplicate=False))
    loaded_ids = {id(p) for name, p in params.items() if name not in result.missing_keys}
    missing = [k for k in result.missing_keys if id(params.get(k)) not in loaded_ids]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: the weights do not match config.json: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return native.eval()


def load_tokenformer_export(path: str) -> nn.Module:
    """The TokenFormerForCausalLM of a tokenformer_causal_lm export (float32, eval mode)."""
    from models.tokenformer import TokenFormerConfig, TokenFormerForCausalLM

    payload = read_config(Path(path))
    model = TokenFormerForCausalLM(TokenFormerConfig.from_dict(payload["tokenformer"]))
    return _load_wrapped(Path(path), model).float()


def load_openmoe_export(path: str) -> nn.Module:
    """The OpenMoEForCausalLM of an openmoe_llama export (float32, eval mode)."""
    from models.openmoe import OpenMoEConfig, OpenMoEForCausalLM

    payload = read_config(Path(path))
    model = OpenMoEForCausalLM(OpenMoEConfig.from_dict(payload["openmoe"]))
    return _load_wrapped(Path(path), model).float()


def load_export(path: str, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The model of an export folder (any kind, old or new) as this repository builds it, weights loaded, in
    eval mode; AdaMoE exports come back retrofitted with their null gates."""
    from models.factory import load_pretrained
    from models.moe import CONFIG_KEY, restore_retrofit

    payload = read_config(Path(path))
    if payload.get("model_type") in ADAMOE_BASE_TYPES:
        return restore_retrofit(load_adamoe_base(path, dtype), path).eval()
    model = load_pretrained(str(path))
    if getattr(getattr(model, "config", None), CONFIG_KEY, None):  # an AdaMoE export of the older form
        model = restore_retrofit(model, path)
    return (model if dtype is None else model.to(dtype)).eval()


def _not_buildable(model_type: str):
    def build(spec: ModelSpec) -> nn.Module:
        raise ValueError(f"'{model_type}' is the model_type of exported checkpoints: load one with "
                         f"model.pretrained=<export dir>; model.arch names an architecture to build")

    return build


def _load_adamoe_base_float32(path: str) -> nn.Module:
    return load_adamoe_base(path)


def register_loaders() -> None:
    """Make models.factory.load_pretrained read the exports' model types (run on import of models.hub_export)."""
    for model_type in ADAMOE_BASE_TYPES:
        register_architecture(model_type, _not_buildable(model_type), {}, load=_load_adamoe_base_float32)
    register_architecture(TOKENFORMER_MODEL_TYPE, _not_buildable(TOKENFORMER_MODEL_TYPE), {},
                          load=load_tokenformer_export)
    register_architecture(OPENMOE_MODEL_TYPE, _not_buildable(OPENMOE_MODEL_TYPE), {}, load=load_openmoe_export)
