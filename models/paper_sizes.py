"""The papers' models at their published sizes: exact architecture hyper-parameters, written here by hand.

Nothing is downloaded: every model a paper recipe names by hub id (`model.pretrained`, FuseChat's pivot and
sources, ...) has its architecture written out below, so its parameter count and its memory plan
(`python -m recipes plan`) come from a model built on the meta device, without network and without memory.

- `PAPER_SIZES`: arch -> size -> every config field of the published checkpoint (`config.json` values: widths,
  layers, heads, KV heads, experts, vocabulary, positions, rope theta, tied or not). On import each one is
  registered with `models.factory.register_size`, so `model.arch=<arch> model.size=<size>` names it in a recipe.
  The factory itself sets the vocabulary from the run's tokenizer and ties embeddings unless overridden;
  `paper_spec` restores the published values.
- `PAPER_MODELS`: hub id (or paper name) -> `PaperModel`: its (arch, size), what differs from that size (e.g.
  two added chat tokens), the published parameter figures and where they are published.
- `paper_spec`, `build_on_meta`, `parameter_counts`: the published model on the meta device and its
  total and active (per token) parameters.

Two architectures the factory does not register are added here the same way the factory registers its own
(`register_transformers_architecture`): `mistral` (OpenChat-3.5 is a Mistral-7B) and `qwen2` (Qwen-14B's
structure: Llama-style blocks with bias on Q/K/V only, untied head; the released checkpoint is the remote-code
`qwen` model type with fused c_attn / w1 / w2 names, the same tensors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

import models.tokenformer  # noqa: F401  (registers `tokenformer` before its paper sizes are added)
from models.factory import (
    ModelSpec,
    architecture,
    build_model,
    full_numel,
    register_size,
    register_transformers_architecture,
)

_MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False)

# arch -> size -> config fields, as in each checkpoint's config.json (the hub id is in PAPER_MODELS).
PAPER_SIZES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "mixtral": {
        # mistralai/Mixtral-8x7B-v0.1
        "8x7b": dict(_MISTRAL_7B, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
                     rope_theta=1e6, max_position_embeddings=32768, sliding_window=None,
                     router_aux_loss_coef=0.02),
    },
    "mistral": {
        # mistralai/Mistral-7B-v0.1; openchat/openchat_3.5 is this with 2 added tokens (PAPER_MODELS)
        "7b": dict(_MISTRAL_7B, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=32768,
                   sliding_window=4096),
    },
    "llama": {
        # upstage/SOLAR-10.7B-v1.0 (depth up-scaled Mistral-7B: 48 layers); NousResearch/Nous-Hermes-2-SOLAR-10.7B
        # adds 2 tokens
        "solar_10_7b": dict(_MISTRAL_7B, num_hidden_layers=48, vocab_size=32000, rope_theta=10000.0,
                            max_position_embeddings=4096),
    },
    "olmoe": {
        # allenai/OLMoE-1B-7B-0924
        "1b_7b": dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
                      rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5, norm_topk_prob=False,
                      tie_word_embeddings=False),
    },
    "qwen2": {
        # Qwen/Qwen-14B: d 5120, 40 layers, 40 heads, MLP width 13696 (its config's intermediate_size 27392 is
        # the two gate/up halves together), vocabulary 152064 (padded), RMSNorm eps 1e-6, untied head
        "qwen_14b": dict(hidden_size=5120, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40,
                         num_key_value_heads=40, vocab_size=152064, rope_theta=10000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=False),
    },
    # TokenFormer's progressive scaling (Wang et al. 2024, Sec. 4.1): one hidden size, parameter tokens added.
    # 354M and 757M are the released incremental-scaling configs (github.com/Haiyang-W/TokenFormer,
    # configs/incremental_scaling_openwebtext2: 24 layers, d 1024, 16 heads, Q/K/V/out tokens 768 -> 1792, FFN
    # tokens 4x that, GPT-NeoX vocabulary padded to 50304, context 1024). The 124M start and the 1.4B end of the
    # chain are given only as totals; their token counts are solved from those totals at the same layout (a
    # multiple of 8, FFN = 4x): docs/paper_scale.md.
    "tokenformer": {
        "paper_124m": dict(num_layers=24, hidden_size=1024, num_heads=16, qkv_tokens=184, ffn_tokens=736,
                           vocab_size=50304, max_seq_len=1024),
        "paper_354m": dict(num_layers=24, hidden_size=1024, num_heads=16, qkv_tokens=768, ffn_tokens=3072,
                           vocab_size=50304, max_seq_len=1024),
        "paper_757m": dict(num_layers=24, hidden_size=1024, num_heads=16, qkv_tokens=1792, ffn_tokens=7168,
                           vocab_size=50304, max_seq_len=1024),
        "paper_1_4b": dict(num_layers=24, hidden_size=1024, num_heads=16, qkv_tokens=3432, ffn_tokens=13728,
                           vocab_size=50304, max_seq_len=1024),
    },
}

# RoBERTa-base (FacebookAI/roberta-base), an encoder: not a causal LM of the factory, for Twin-Merging's
# discriminative setting; `transformers.RobertaConfig(**ROBERTA_BASE)` builds it.
ROBERTA_BASE: Dict[str, Any] = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                                    layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)


@dataclass(frozen=True)
class PaperModel:
    """A model a paper uses, by its hub id: the local architecture and the published parameter figures."""

    arch: str
    size: str
    published_total: float  # parameters, as published
    published_active: Optional[float] = None  # per token, for MoEs
    source: str = ""  # where the figures are published
    overrides: Mapping[str, Any] = field(default_factory=dict)  # what differs from the size (e.g. vocab_size)


PAPER_MODELS: Dict[str, PaperModel] = {
    "mistralai/Mixtral-8x7B-v0.1": PaperModel(
        "mixtral", "8x7b", 46.7e9, 12.9e9, "Mistral AI, Mixtral of experts (2024) / model card: 46.7B, 12.9B active"),
    "NousResearch/Nous-Hermes-2-Mixtral-8x7B-DPO": PaperModel(
        "mixtral", "8x7b", 46.7e9, 12.9e9, "Mixtral-8x7B + 2 ChatML tokens (vocabulary 32002)",
        overrides={"vocab_size": 32002}),
    "openchat/openchat_3.5": PaperModel(
        "mistral", "7b", 7.24e9, None, "Mistral-7B (model card: 7.24B) + 2 tokens (vocabulary 32002)",
        overrides={"vocab_size": 32002, "max_position_embeddings": 8192}),
    "NousResearch/Nous-Hermes-2-SOLAR-10.7B": PaperModel(
        "llama", "solar_10_7b", 10.7e9, None, "SOLAR 10.7B (Kim et al. 2023) + 2 tokens (vocabulary 32002)",
        overrides={"vocab_size": 32002}),
    "allenai/OLMoE-1B-7B-0924": PaperModel(
        "olmoe", "1b_7b", 6.9e9, 1.3e9, "OLMoE (Muennighoff et al. 2024): 6.9B total, 1.3B active"),
    "Qwen/Qwen-14B": PaperModel("qwen2", "qwen_14b", 14e9, None, "Qwen technical report (Bai et al. 2023): 14B"),
    "tokenformer-124m": PaperModel("tokenformer", "paper_124m", 124e6, None, "TokenFormer, Sec. 4.1: 124M"),
    "tokenformer-354m": PaperModel("tokenformer", "paper_354m", 354e6, None, "TokenFormer, Sec. 4.1: 354M"),
    "tokenformer-757m": PaperModel("tokenformer", "paper_757m", 757e6, None, "TokenFormer, Sec. 4.1: 757M"),
    "tokenformer-1.4b": PaperModel("tokenformer", "paper_1_4b", 1.4e9, None, "TokenFormer, Sec. 4.1: 1.4B"),
}


def _register() -> None:
    if architecture("mistral") is None:
        register_transformers_architecture("mistral", "MistralConfig", "MistralForCausalLM", {})
    if architecture("qwen2") is None:
        register_transformers_architecture("qwen2", "Qwen2Config", "Qwen2ForCausalLM", {})
    for arch, sizes in PAPER_SIZES.items():
        for name, fields in sizes.items():
            register_size(arch, name, fields)


_register()

# Fields the factory sets from the run (tokenizer, block size, tying) that a published model fixes itself.
_RUN_FIELDS = ("vocab_size", "max_position_embeddings", "tie_word_embeddings")


def paper_spec(arch: str, size: str, overrides: Optional[Mapping[str, Any]] = None,
               max_seq_len: Optional[int] = None) -> ModelSpec:
    """A ModelSpec that builds the published model: its own vocabulary, positions and tying (not the run's
    tokenizer and block size), then `overrides` on top."""
    if arch not in PAPER_SIZES or size not in PAPER_SIZES[arch]:
        known = ", ".join(f"{a}/{s}" for a, sizes in PAPER_SIZES.items() for s in sizes)
        raise ValueError(f"no paper size {arch}/{size}; known: {known}")
    fields = {**PAPER_SIZES[arch][size], **dict(overrides or {})}
    vocab = int(fields["vocab_size"])
    if arch == "tokenformer":
        seq = int(fields.get("max_seq_len", 2048))
        extra = {k: v for k, v in (overrides or {}).items() if k != "vocab_size"}
    else:
        seq = int(fields.get("max_position_embeddings", 2048))
        extra = {k: fields[k] for k in _RUN_FIELDS if k in fields and k != "vocab_size"}
        extra.update({k: v for k, v in (overrides or {}).items() if k != "vocab_size"})
    return ModelSpec(arch=arch, size=size, vocab_size=vocab, max_seq_len=max_seq_len or seq, overrides=extra)


def model_spec(name: str) -> ModelSpec:
    """The ModelSpec of a model of PAPER_MODELS (by hub id)."""
    m = PAPER_MODELS[name]
    return paper_spec(m.arch, m.size, m.overrides)


def build_on_meta(spec: ModelSpec) -> torch.nn.Module:
    """The model of `spec` with every tensor on the meta device: shapes only, no memory, no initialisation."""
    with torch.device("meta"):
        return build_model(spec)


def expert_settings(model: torch.nn.Module) -> Tuple[Optional[int], Optional[int]]:
    """(experts per MoE layer, experts per token) from the model's config; (None, None) for a dense model."""
    cfg = getattr(model, "config", None)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    return experts, getattr(cfg, "num_experts_per_tok", None)


def parameter_counts(model: torch.nn.Module) -> Dict[str, int]:
    """total: every distinct parameter (a tied head once); active: what one token uses, i.e. the total minus
    the (E - k) / E share of the expert weights (tensors under an `experts` module) of an MoE."""
    seen, total, expert = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = full_numel(p)
        total += n
        if ".experts." in f".{name}":
            expert += n
    experts, k = expert_settings(model)
    active = total - round(expert * (1 - k / experts)) if experts and k else total
    return {"total": total, "active": active, "expert": expert}
