"""Writing a model as an export folder that transformers loads as it is: `save_export(model, out_dir, tokenizer)`.

What is written depends on the model (`export_kind`, first match in this order):

    kind          model                                           config.json model_type   code in the folder
    tokenformer   models.tokenformer.TokenFormerForCausalLM       tokenformer_causal_lm    the wrapper + TokenFormer
    openmoe       models.openmoe.OpenMoEForCausalLM               openmoe_llama            the wrapper + OpenMoE, moe
    adamoe        transformers Mixtral / Qwen2-MoE / OLMoE        adamoe_<base type>       the wrapper + models.moe
                  retrofitted by models.moe.retrofit
    transformers  any other transformers PreTrainedModel          its own                  none (save_pretrained)

The first three carry `auto_map` (AutoConfig, AutoModelForCausalLM) and their code (models/hub_export/bundle.py),
so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` builds them anywhere, while without
trust_remote_code transformers refuses the unknown model_type instead of building another model. A peft model
(LoRA) is written as its adapter in `adapter/` (peft's own format) and then merged into the model written at the
top. Weights are safetensors (`weights.save_weights`).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from models.hub_export.bundle import write_bundle
from models.hub_export.export_names import ADAMOE_MODEL_TYPES, ADAPTER_DIR, WRAPPED_PREFIX
from models.hub_export.weights import save_weights

# config fields of a model's config that an export sets itself
_REPLACED_FIELDS = ("model_type", "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype")


@dataclass(frozen=True)
class ExportKind:
    """How one kind of model is written: `matches(model)` picks it, `write(model, out_dir)` writes config.json,
    the weights and any code into out_dir; `remote_code` says whether the folder needs trust_remote_code."""

    name: str
    matches: Callable[[nn.Module], bool]
    write: Callable[[nn.Module, Path], None]
    remote_code: bool


EXPORT_KINDS: List[ExportKind] = []


def register_export_kind(kind: ExportKind) -> ExportKind:
    """Add a kind, tried before the ones registered earlier (so a specific kind can precede a general one)."""
    EXPORT_KINDS.insert(0, kind)
    return kind


def export_kind(model: nn.Module) -> ExportKind:
    for kind in EXPORT_KINDS:
        if kind.matches(model):
            return kind
    raise ValueError(f"no export kind writes a {type(model).__name__}: known kinds are "
                     f"{', '.join(k.name for k in EXPORT_KINDS)} (models/hub_export/writer.py)")


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def weights_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def replace_directory(out_dir: Path, write: Callable[[Path], Any]) -> Any:
    """`write(tmp)` into a fresh sibling directory, then swap it in for out_dir: out_dir is always either the
    previous export or the whole new one. A non-empty out_dir that holds no export is refused, not replaced."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"{out_dir} exists and is not a directory")
        holds_export = (out_dir / "config.json").exists() or (out_dir / "adapter_config.json").exists()
        if any(out_dir.iterdir()) and not holds_export:
            raise ValueError(f"{out_dir} is not empty and holds no export (no config.json): not replacing it")
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    old = out_dir.with_name(f".{out_dir.name}.old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    try:
        result = write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)
    return result


def save_export(model: nn.Module, out_dir: Path, tokenizer: Optional[Any] = None) -> Dict[str, Any]:
    """Write `model` (and `tokenizer`, when given) as the export folder out_dir, replacing an earlier export
    there. A peft model is saved as its adapter in out_dir/adapter, then merged (in place: the peft model is
    consumed) and the merged model is written. Returns what was written: kind, model_type, remote_code,
    adapter (the adapter folder or None)."""

    def write(tmp: Path) -> Dict[str, Any]:
        target = model
        adapter = None
        if is_peft_model(target):
            target.save_pretrained(str(tmp / ADAPTER_DIR))
            adapter = ADAPTER_DIR
            target = target.merge_and_unload()
        kind = export_kind(target)
        kind.write(target, tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
        model_type = json.loads((tmp / "config.json").read_text()).get("model_type")
        return {"kind": kind.name, "model_type": model_type, "remote_code": kind.remote_code, "adapter": adapter}

    info = replace_directory(Path(out_dir), write)
    if info["adapter"] is not None:
        info["adapter"] = str(Path(out_dir) / info["adapter"])
    return info


# ---------------------------------------------------------------------------------------------------------------
# The kinds


def config_fields(config: Any) -> Dict[str, Any]:
    """A transformers config's fields without the ones an export sets itself."""
    return {k: v for k, v in config.to_dict().items() if k not in _REPLACED_FIELDS}


def finish_config(config: Any, model_class: type, config_module: str, model_module: str,
                  dtype: torch.dtype) -> Any:
    """Set what makes the folder load through the Auto classes with its own code."""
    config.architectures = [model_class.__name__]
    config.auto_map = {"AutoConfig": f"{config_module}.{type(config).__name__}",
                       "AutoModelForCausalLM": f"{model_module}.{model_class.__name__}"}
    config.dtype = dtype
    return config


def write_code(out_dir: Path, *wrapper_modules: str) -> List[str]:
    return write_bundle([f"models.hub_export.{name}" for name in wrapper_modules], out_dir)


def _is_tokenformer(model: nn.Module) -> bool:
    from models.tokenformer import TokenFormerForCausalLM

    return isinstance(model, TokenFormerForCausalLM)


def _write_tokenformer(model: nn.Module, out_dir: Path) -> None:
    from models.hub_export.configuration_tokenformer import TokenFormerHFConfig
    from models.hub_export.modeling_tokenformer import TokenFormerHFForCausalLM

    config = TokenFormerHFConfig(tokenformer=model.config.to_dict())
    finish_config(config, TokenFormerHFForCausalLM, "configuration_tokenformer", "modeling_tokenformer",
                  weights_dtype(model))
    config.save_pretrained(str(out_dir))
    save_weights({WRAPPED_PREFIX + k: v for k, v in model.state_dict().items()}, out_dir)
    write_code(out_dir, "configuration_tokenformer", "modeling_tokenformer")


def _is_openmoe(model: nn.Module) -> bool:
    from models.openmoe import OpenMoEForCausalLM

    return isinstance(model, OpenMoEForCausalLM)


def _write_openmoe(model: nn.Module, out_dir: Path) -> None:
    from models.hub_export.configuration_openmoe import OpenMoEHFConfig
    from models.hub_export.modeling_openmoe import OpenMoEHFForCausalLM

    config = OpenMoEHFConfig(openmoe=model.openmoe_config.to_dict())
    finish_config(config, OpenMoEHFForCausalLM, "configuration_openmoe", "modeling_openmoe", weights_dtype(model))
    config.save_pretrained(str(out_dir))
    save_weights({WRAPPED_PREFIX + k: v for k, v in model.state_dict().items()}, out_dir)
    write_code(out_dir, "configuration_openmoe", "modeling_openmoe")


def _is_transformers(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _has_moe_blocks(model: nn.Module) -> bool:
    from models.moe import moe_blocks

    return bool(moe_blocks(model))


def _is_adamoe(model: nn.Module) -> bool:
    from models.moe import CONFIG_KEY

    config = getattr(model, "config", None)
    return (_is_transformers(model) and _has_moe_blocks(model) and bool(getattr(config, CONFIG_KEY, None))
            and getattr(config, "model_type", None) in ADAMOE_MODEL_TYPES)


def _write_adamoe(model: nn.Module, out_dir: Path) -> None:
    from models.hub_export.configuration_adamoe import ADAMOE_CONFIGS
    from models.hub_export.modeling_adamoe import ADAMOE_MODELS

    base_type = model.config.model_type
    config_class = next(c for c in ADAMOE_CONFIGS if c.base_model_type == base_type)
    model_class = next(m for m in ADAMOE_MODELS if m.config_class is config_class)
    config = config_class(**config_fields(model.config))
    finish_config(config, model_class, "configuration_adamoe", "modeling_adamoe", weights_dtype(model))
    config.save_pretrained(str(out_dir))
    save_weights(model.state_dict(), out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out_dir))
    write_code(out_dir, "configuration_adamoe", "modeling_adamoe")


def _is_plain_transformers(model: nn.Module) -> bool:
    return _is_transformers(model) and not _has_moe_blocks(model)


def _write_transformers(model: nn.Module, out_dir: Path) -> None:
    model.save_pretrained(str(out_dir))


register_export_kind(ExportKind("transformers", _is_plain_transformers, _write_transformers, remote_code=False))
register_export_kind(ExportKind("adamoe", _is_adamoe, _write_adamoe, remote_code=True))
register_export_kind(ExportKind("openmoe", _is_openmoe, _write_openmoe, remote_code=True))
register_export_kind(ExportKind("tokenformer", _is_tokenformer, _write_tokenformer, remote_code=True))
