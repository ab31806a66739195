"""Model construction: named sizes of each architecture, one registry, and `pretrained` loading.

Every builder returns a causal LM with the Hugging Face interface (`model(input_ids=..., labels=...)`
returning `.loss` and `.logits`, `save_pretrained`, `.config`). Architectures from `transformers` are
built from small configs; other architectures (TokenFormer) register themselves with `register_arch`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

# name -> size -> config fields. Tiny sizes are the CPU/test sizes ("debug models"); larger ones are
# documented overrides for clusters.
HF_SIZES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "llama": {
        "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4),
        "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=8),
        "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                     num_key_value_heads=12),
    },
    "mixtral": {
        "tiny": dict(hidden_size=128, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                     router_aux_loss_coef=0.01),
        "small": dict(hidden_size=256, intermediate_size=344, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                      router_aux_loss_coef=0.01),
    },
    "qwen2_moe": {
        "tiny": dict(hidden_size=128, intermediate_size=344, moe_intermediate_size=172,
                     shared_expert_intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1),
    },
    "olmoe": {
        "tiny": dict(hidden_size=128, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, num_experts=8, num_experts_per_tok=2),
    },
}

_HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
}


@dataclass
class ModelSpec:
    arch: str
    size: str
    vocab_size: int
    max_seq_len: int
    overrides: Dict[str, Any]
    pretrained: Optional[str] = None
    trust_remote_code: bool = False
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    dtype: Optional[torch.dtype] = None  # of a `pretrained` model's weights; None: float32


# Extra architectures: name -> (build(spec) -> model, load(path, spec) -> model, sizes)
_EXTRA: Dict[str, Dict[str, Any]] = {}


def register_arch(name: str, build: Callable[[ModelSpec], torch.nn.Module],
                  load: Callable[[str], torch.nn.Module], sizes: Dict[str, Any]) -> None:
    _EXTRA[name] = {"build": build, "load": load, "sizes": sizes}


def available_archs() -> Dict[str, list]:
    _import_extras()
    out = {k: sorted(v) for k, v in HF_SIZES.items()}
    out.update({k: sorted(v["sizes"]) for k, v in _EXTRA.items()})
    return out


def _import_extras() -> None:
    # Architectures outside transformers register on import; a missing one is simply not offered.
    for mod in ("models.tokenformer", "models.openmoe"):
        try:
            __import__(mod)
        except ImportError:
            pass


def _hf_config(spec: ModelSpec):
    import transformers

    cfg_cls = getattr(transformers, _HF_CLASSES[spec.arch][0])
    sizes = HF_SIZES[spec.arch]
    if spec.size not in sizes:
        raise ValueError(f"Unknown size '{spec.size}' for model.arch={spec.arch}; known: {', '.join(sorted(sizes))}.")
    fields = dict(sizes[spec.size])
    fields.update(vocab_size=spec.vocab_size, max_position_embeddings=max(spec.max_seq_len, 64),
                  tie_word_embeddings=True)
    if spec.eos_token_id is not None:
        fields.update(eos_token_id=spec.eos_token_id, bos_token_id=spec.eos_token_id)
    if spec.pad_token_id is not None:
        fields.update(pad_token_id=spec.pad_token_id)
    fields.update(spec.overrides)
    return cfg_cls(**fields)


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """A freshly initialised model, or the weights at `spec.pretrained`."""
    if spec.pretrained:
        return load_pretrained(spec.pretrained, spec)
    _import_extras()
    if spec.arch in HF_SIZES:
        import transformers

        model_cls = getattr(transformers, _HF_CLASSES[spec.arch][1])
        return model_cls(_hf_config(spec))
    if spec.arch in _EXTRA:
        return _EXTRA[spec.arch]["build"](spec)
    known = sorted(set(HF_SIZES) | set(_EXTRA))
    raise ValueError(f"Unknown model.arch '{spec.arch}'; known: {', '.join(known)}.")


def load_pretrained(path_or_name: str, spec: Optional[ModelSpec] = None) -> torch.nn.Module:
    """Load a `save_pretrained` directory (safetensors only) or a hub name; the architecture comes from
    the saved config, so a TokenFormer directory loads as TokenFormer."""
    import json

    _import_extras()
    p = Path(path_or_name).expanduser()
    trust = bool(spec and spec.trust_remote_code)
    if p.exists():
        cfg_file = p / "config.json"
        if not cfg_file.exists():
            raise ValueError(f"model.pretrained={p} has no config.json: is it a save_pretrained directory?")
        model_type = json.loads(cfg_file.read_text()).get("model_type")
        if model_type in _EXTRA:
            model = _EXTRA[model_type]["load"](str(p))
            if spec is not None and spec.dtype is not None:
                model = model.to(spec.dtype)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(p), use_safetensors=True, trust_remote_code=trust,
                                                         dtype=spec.dtype if spec and spec.dtype else torch.float32)
    else:
        from transformers import AutoModelForCausalLM

        extra = {"dtype": spec.dtype} if spec is not None and spec.dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(path_or_name, use_safetensors=True, trust_remote_code=trust,
                                                     **extra)
    if spec is not None:
        emb = full_shape(model.get_input_embeddings().weight)[0] if hasattr(model, "get_input_embeddings") else None
        if emb is not None and emb < spec.vocab_size:
            raise ValueError(
                f"model.pretrained={path_or_name} has {emb} embedding rows but the tokenizer has "
                f"{spec.vocab_size} tokens: use the tokenizer the model was trained with (data.tokenizer)."
            )
    return model


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's whole shape, also when DeepSpeed ZeRO-3 has partitioned it (its data is then empty)."""
    return getattr(p, "ds_shape", None) or p.shape


def full_numel(p: torch.Tensor) -> int:
    """A parameter's whole number of elements, also when ZeRO-3 has partitioned it (`ds_numel`)."""
    return int(getattr(p, "ds_numel", p.numel()))


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += full_numel(p)
    return total


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12 L d s (attention), with N the non-embedding parameters that a
    token actually uses (for MoEs: only k of E experts). Used for MFU on GPUs."""
    cfg = getattr(model, "config", None)
    n = count_parameters(model)
    emb = full_numel(model.get_input_embeddings().weight) if hasattr(model, "get_input_embeddings") else 0
    n -= emb
    layers = getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "num_layers", 0) or 0
    d = getattr(cfg, "hidden_size", 0) or 0
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    k = getattr(cfg, "num_experts_per_tok", None)
    if experts and k:
        expert_params = sum(full_numel(p) for name, p in model.named_parameters() if ".experts." in name)
        n -= expert_params * (1 - k / experts)
    return 6.0 * n + 12.0 * layers * d * seq_len
