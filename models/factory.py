"""Model construction: named sizes of each architecture, one registry, and `pretrained` loading.

Every builder returns a causal LM with the Hugging Face interface (`model(input_ids=..., labels=...)`
returning `.loss` and `.logits`, `save_pretrained`, `.config`). Every architecture is an entry of one
registry, added with `register_architecture(name, build, sizes, load=None)`:

- the `transformers` architectures (llama, mixtral, qwen2_moe, olmoe) are registered below with
  `register_transformers_architecture`, built from the small configs in `HF_SIZES`;
- any other architecture (TokenFormer, OpenMoE) registers itself with one `register_architecture(...)` line
  in its own module under models/. Those modules are found without a list: on the first lookup every module
  of the `models` package is imported once (`_discover_architectures`), so a new architecture needs no edit
  here. A module that fails to import for a missing optional dependency is simply not offered.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

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


# ---------------------------------------------------------------------------------------------------
# The architecture registry


@dataclass(frozen=True)
class Architecture:
    """One registered architecture: `build(spec)` makes a fresh model of a named size (`sizes`: size name ->
    config fields); `load(path)` loads a `save_pretrained` directory whose config.json has
    "model_type": name, or None when transformers' `AutoModelForCausalLM` loads it."""

    name: str
    build: Callable[[ModelSpec], torch.nn.Module]
    sizes: Mapping[str, Dict[str, Any]]
    load: Optional[Callable[[str], torch.nn.Module]] = None


_ARCHITECTURES: Dict[str, Architecture] = {}
_discovered = False


def register_architecture(name: str, build: Callable[[ModelSpec], torch.nn.Module],
                          sizes: Mapping[str, Dict[str, Any]],
                          load: Optional[Callable[[str], torch.nn.Module]] = None) -> Architecture:
    """Make `model.arch=<name> model.size=<size>` build with `build(spec)` and, when `load` is given, a saved
    directory with "model_type": name load with `load(path)`. Registering a name again replaces it."""
    entry = Architecture(name=name, build=build, sizes=sizes, load=load)
    _ARCHITECTURES[name] = entry
    return entry


def register_arch(name: str, build: Callable[[ModelSpec], torch.nn.Module],
                  load: Callable[[str], torch.nn.Module], sizes: Dict[str, Any]) -> None:
    """The earlier signature of `register_architecture` (load before sizes), kept for existing callers."""
    register_architecture(name, build, sizes, load=load)


def register_size(arch: str, name: str, fields: Mapping[str, Any]) -> None:
    """Add the named size `name` (architecture config fields) to the registered architecture `arch`, so that
    `model.arch=<arch> model.size=<name>` builds it (e.g. the papers' sizes, models/paper_sizes.py). The same
    fields again are a no-op; other fields under a name already taken are an error."""
    from collections.abc import MutableMapping

    entry = architecture(arch)
    if entry is None:
        raise ValueError(f"register_size: unknown architecture '{arch}'; known: {', '.join(sorted(_ARCHITECTURES))}.")
    if name in entry.sizes:
        if dict(entry.sizes[name]) != dict(fields):
            raise ValueError(f"register_size: {arch} size '{name}' is already registered with other fields.")
        return
    if not isinstance(entry.sizes, MutableMapping):
        raise TypeError(f"register_size: the sizes of architecture '{arch}' cannot be extended.")
    entry.sizes[name] = dict(fields)


def register_transformers_architecture(name: str, config_class: str, model_class: str,
                                       sizes: Mapping[str, Dict[str, Any]]) -> Architecture:
    """Register a `transformers` causal LM: `model_class(config_class(**sizes[size], ...))` (class names in
    the `transformers` namespace, imported when a model is built); saved ones load through
    `AutoModelForCausalLM`."""

    def build(spec: ModelSpec) -> torch.nn.Module:
        import transformers

        model_cls = getattr(transformers, model_class)
        return model_cls(_hf_config(spec, getattr(transformers, config_class), sizes))

    return register_architecture(name, build, sizes)


def _discover_architectures() -> None:
    # Architectures outside transformers register on import: import every module of this package once
    # (not this one, not private ones); a module with a missing dependency is simply not offered.
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = sys.modules[__package__]
    for module in pkgutil.iter_modules(package.__path__, prefix=__package__ + "."):
        if module.name == __name__ or module.name.rpartition(".")[2].startswith("_"):
            continue
        try:
            importlib.import_module(module.name)
        except ImportError:
            pass


def architecture(name: str) -> Optional[Architecture]:
    """The registered architecture `name` (after discovering the architectures of models/), or None."""
    _discover_architectures()
    return _ARCHITECTURES.get(name)


def available_archs() -> Dict[str, list]:
    _discover_architectures()
    return {name: sorted(arch.sizes) for name, arch in _ARCHITECTURES.items()}


def _hf_config(spec: ModelSpec, cfg_cls: type, sizes: Mapping[str, Dict[str, Any]]):
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


register_transformers_architecture("llama", "LlamaConfig", "LlamaForCausalLM", HF_SIZES["llama"])
register_transformers_architecture("mixtral", "MixtralConfig", "MixtralForCausalLM", HF_SIZES["mixtral"])
register_transformers_architecture("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", HF_SIZES["qwen2_moe"])
register_transformers_architecture("olmoe", "OlmoeConfig", "OlmoeForCausalLM", HF_SIZES["olmoe"])


# ---------------------------------------------------------------------------------------------------
# Building and loading


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """A freshly initialised model, or the weights at `spec.pretrained`."""
    if spec.pretrained:
        return load_pretrained(spec.pretrained, spec)
    arch = architecture(spec.arch)
    if arch is None:
        raise ValueError(f"Unknown model.arch '{spec.arch}'; known: {', '.join(sorted(_ARCHITECTURES))}.")
    return arch.build(spec)


def load_pretrained(path_or_name: str, spec: Optional[ModelSpec] = None) -> torch.nn.Module:
    """Load a `save_pretrained` directory (safetensors only) or a hub name; the architecture comes from
    the saved config, so a TokenFormer directory loads as TokenFormer."""
    import json

    _discover_architectures()
    p = Path(path_or_name).expanduser()
    trust = bool(spec and spec.trust_remote_code)
    if p.exists():
        cfg_file = p / "config.json"
        if not cfg_file.exists():
            raise ValueError(f"model.pretrained={p} has no config.json: is it a save_pretrained directory?")
        model_type = json.loads(cfg_file.read_text()).get("model_type")
        arch = _ARCHITECTURES.get(model_type)
        if arch is not None and arch.load is not None:
            model = arch.load(str(p))
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
    """Training FLOPs per token (forward + backward): 6 per weight of every matrix a token goes through, plus
    12 L d s for attention scores and their weighted sum (L layers, width d, sequence s; causal masking not
    subtracted, as in PaLM's MFU). The matrices include the LM head, tied to the input embedding or not (the
    embedding lookup itself is not a matmul); of an MoE's experts only the k of E a token uses count. Vectors
    (norms, biases) are left out. Used for perf/tflops and perf/mfu; equals Lightning's measure_flops
    (torch's FlopCounterMode) on a dense model with eager attention."""
    cfg = getattr(model, "config", None)
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    head = _lm_head(model)
    seen = {id(embedding)} if embedding is not None else set()
    matrices = experts = 0
    for name, p in model.named_parameters():
        if id(p) in seen or len(full_shape(p)) < 2:
            continue
        seen.add(id(p))
        matrices += full_numel(p)
        if ".experts." in name:
            experts += full_numel(p)
    if embedding is not None and (head is None or head.weight is embedding):
        matrices += full_numel(embedding)  # a tied head: the embedding matrix used once more, as the output layer
    n_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    k = getattr(cfg, "num_experts_per_tok", None)
    if n_experts and k and experts:
        matrices -= experts * (1 - k / n_experts)
    layers = getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "num_layers", 0) or 0
    d = getattr(cfg, "hidden_size", 0) or 0
    return 6.0 * matrices + 12.0 * layers * d * seq_len


def _lm_head(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The output projection of a causal LM: get_output_embeddings() where the model has it, else a submodule
    named lm_head; None when there is none (the logits come from the embedding matrix)."""
    head = None
    if hasattr(model, "get_output_embeddings"):
        try:
            head = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            head = None
    if head is None:
        head = next((m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "lm_head"), None)
    return head if head is not None and isinstance(getattr(head, "weight", None), torch.Tensor) else None
