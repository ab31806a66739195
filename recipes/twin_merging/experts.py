"""The shared expert and the exclusive experts of Twin-Merging, from the base and the fine-tuned models.

shared    = task arithmetic over the fine-tuned weights: base + lam * sum_t (theta_t - base), except the tensors
            of twin.shared_exclude (the classifier, biases: `excluded_keys`), which keep the base value
expert_t  = theta_t - shared, each 2-D tensor as truncated-SVD factors (models.twin.compress_exclusive, rank
            twin.rank rounded by twin.rank_rounding), 1-D tensors dense; on the excluded tensors this is
            theta_t - base, so the router (not the task's identity) chooses them
LoRA fine-tunes under twin.lora_merge=factorwise (the official code): the adapters' A and B are merged
separately (A_sh = lam sum_t A_t, B_sh = lam sum_t B_t) and the experts are the SVD-truncated factor
differences (models.twin.lora_factor_expert); shared.safetensors then holds base + s B_sh A_sh, and
shared_lora.safetensors the shared factors.
Files (each written under a temporary name and renamed): shared.safetensors, [shared_lora.safetensors],
experts.safetensors and, last, experts.json (metadata: storage, build time, the settings they were built
with); experts.json marks the set as complete.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from recipes.engine.runs import load_safetensors, save_safetensors_atomic, write_json_atomic

StateDict = Dict[str, torch.Tensor]
LoraFactors = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


def adapter_dir(ft_hf: Path) -> Path:
    """The peft adapter folder of a LoRA fine-tune's export: `ft_hf` itself, or its `adapter/` subfolder when the
    export also holds the merged model at the top."""
    sub = Path(ft_hf) / "adapter"
    return sub if (sub / "adapter_config.json").exists() else Path(ft_hf)


def finetuned_state(finetune: str, base_hf: Path, ft_hf: Path) -> Tuple[StateDict, Optional[List[str]]]:
    """(full state dict of the fine-tuned model, the keys it changed or None = all).

    finetune="full": `ft_hf` is a save_pretrained model. "lora": `ft_hf` holds a peft adapter of the model in
    `base_hf` (adapter_dir); the state is the base weights plus each adapted layer's scaling * B @ A
    (models.twin.lora_delta_state_dict)."""
    from models.factory import load_pretrained

    if finetune == "full":
        return load_pretrained(str(ft_hf)).eval().state_dict(), None
    from peft import PeftModel

    from models.twin import lora_delta_state_dict

    base = load_pretrained(str(base_hf)).eval()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    deltas = lora_delta_state_dict(PeftModel.from_pretrained(base, str(adapter_dir(ft_hf))))
    for k, d in deltas.items():
        sd[k] = sd[k] + d.to(sd[k].dtype)
    return sd, sorted(deltas)


def finetuned_lora_factors(base_hf: Path, ft_hf: Path) -> Tuple[LoraFactors, Dict[str, float]]:
    """The (A, B) factors of the peft adapter in `ft_hf` and each layer's scaling (models.twin.lora_factors)."""
    from peft import PeftModel

    from models.factory import load_pretrained
    from models.twin import lora_factors

    return lora_factors(PeftModel.from_pretrained(load_pretrained(str(base_hf)).eval(), str(adapter_dir(ft_hf))))


def classifier_keys(model: torch.nn.Module) -> List[str]:
    """What counts as the classifier of a causal LM for twin.shared_exclude: its output head `lm_head.weight`,
    when it is a tensor of its own. Tied to the input embedding (model.tie_word_embeddings, the default of
    every model here) it is the embedding, part of the body, and nothing is excluded as classifier."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if weight is None:
        return []
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is not None and getattr(embed, "weight", None) is weight:
        return []
    return ["lm_head.weight"]


def excluded_keys(names: Sequence[str], exclude: Sequence[str], classifier: Sequence[str]) -> List[str]:
    """The tensors of `names` that twin.shared_exclude (entries `classifier`, `bias`) keeps at the base."""
    from models.twin import shared_exclusions

    return shared_exclusions(names, classifier=classifier if "classifier" in exclude else (),
                             biases="bias" in exclude)


def build_experts(exp_dir: Path, base_sd: StateDict, tuned: List[StateDict], keys: Optional[List[str]],
                  lam: float, rank: Union[float, int], meta: Dict[str, Any], rounding: str = "round",
                  exclude: Sequence[str] = ()) -> Dict[str, Any]:
    """shared = task arithmetic (lambda = lam) with the tensors `exclude` kept at the base; expert_t = SVD
    factors of tuned_t - shared on `keys` (None: every floating tensor). Writes the three files into `exp_dir`
    (experts.json last, with `meta` merged in) and returns what experts.json holds."""
    from models.merging import merge_state_dicts
    from models.twin import compress_exclusive, each_exclusive_task_vector, save_experts, storage_bytes

    exp_dir = Path(exp_dir)
    t0 = time.perf_counter()
    shared = merge_state_dicts("task_arithmetic", base_sd, tuned, lam=lam, exclude=exclude)
    # each task vector tensor by tensor, compressed as it is made (never the whole task vector in memory)
    experts = [compress_exclusive(each_exclusive_task_vector(shared, t, keys), rank=rank, rounding=rounding)
               for t in tuned]
    seconds = time.perf_counter() - t0
    exp_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(exp_dir / "shared.safetensors", shared)
    save_experts(str(exp_dir / "experts.safetensors"), experts)  # the factors; atomic (tmp + rename)
    info = dict(meta, lam=lam, rank=rank, rank_rounding=rounding, excluded=list(exclude), lora_merge="dense",
                num_experts=len(experts), expert_keys=len(experts[0]) if experts else 0, build_seconds=seconds,
                **storage_bytes(experts))
    write_json_atomic(exp_dir / "experts.json", info)
    return info


def shared_lora_factors(factors: List[LoraFactors], lam: float, exclude: Sequence[str] = ()) -> LoraFactors:
    """A_sh = lam sum_t A_t, B_sh = lam sum_t B_t (models.twin.merge_lora_factors); the factors of an excluded
    weight are zero in the shared expert (its adapters then live in the experts alone)."""
    from models.twin import merge_lora_factors

    shared = merge_lora_factors("task_arithmetic", factors, lam=lam)
    for key in set(exclude) & set(shared):
        a, b = shared[key]
        shared[key] = (torch.zeros_like(a), torch.zeros_like(b))
    return shared


def build_lora_factor_experts(exp_dir: Path, base_sd: StateDict, factors: List[LoraFactors],
                              scaling: Dict[str, float], lam: float, rank: Union[float, int],
                              meta: Dict[str, Any], rounding: str = "round",
                              exclude: Sequence[str] = ()) -> Dict[str, Any]:
    """The factor-wise experts of LoRA fine-tunes (twin.lora_merge=factorwise): shared factors, shared model
    base + s B_sh A_sh, experts = SVD of A_t - A_sh and B_t - B_sh. Files as build_experts, plus
    shared_lora.safetensors (`<key>.lora_A`, `<key>.lora_B`); experts.json records the scalings."""
    from models.twin import lora_dense_state, lora_factor_expert, save_experts, storage_bytes

    exp_dir = Path(exp_dir)
    t0 = time.perf_counter()
    shared_f = shared_lora_factors(factors, lam, exclude)
    shared = lora_dense_state(base_sd, shared_f, scaling)
    experts = [lora_factor_expert(shared_f, f, rank=rank, rounding=rounding) for f in factors]
    seconds = time.perf_counter() - t0
    exp_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(exp_dir / "shared.safetensors", shared)
    flat = {f"{k}.lora_A": a for k, (a, _) in shared_f.items()}
    flat.update({f"{k}.lora_B": b for k, (_, b) in shared_f.items()})
    save_safetensors_atomic(exp_dir / "shared_lora.safetensors", flat)
    save_experts(str(exp_dir / "experts.safetensors"), experts)
    info = dict(meta, lam=lam, rank=rank, rank_rounding=rounding, excluded=list(exclude), lora_merge="factorwise",
                scaling=dict(scaling), num_experts=len(experts), expert_keys=len(experts[0]) if experts else 0,
                build_seconds=seconds, **storage_bytes(experts))
    write_json_atomic(exp_dir / "experts.json", info)
    return info


def load_shared_lora(exp_dir: Path) -> LoraFactors:
    """shared_lora.safetensors -> {weight key: (A_sh, B_sh)}."""
    flat = load_safetensors(Path(exp_dir) / "shared_lora.safetensors")
    keys = [k[: -len(".lora_A")] for k in flat if k.endswith(".lora_A")]
    return {k: (flat[f"{k}.lora_A"], flat[f"{k}.lora_B"]) for k in keys}
