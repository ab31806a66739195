"""The shared expert and the exclusive experts of Twin-Merging, from the base and the fine-tuned models.

shared    = task arithmetic over the fine-tuned weights: base + lam * sum_t (theta_t - base)
expert_t  = theta_t - shared, each 2-D tensor as truncated-SVD factors (models.twin.compress_exclusive),
            1-D tensors dense
Files (each written under a temporary name and renamed): shared.safetensors, experts.safetensors and,
last, experts.json (metadata: storage, build time, the settings they were built with); experts.json marks
the set as complete.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from recipes.engine.runs import save_safetensors_atomic, write_json_atomic

StateDict = Dict[str, torch.Tensor]


def finetuned_state(finetune: str, base_hf: Path, ft_hf: Path) -> Tuple[StateDict, Optional[List[str]]]:
    """(full state dict of the fine-tuned model, the keys it changed or None = all).

    finetune="full": `ft_hf` is a save_pretrained model. "lora": `ft_hf` is a peft adapter of the model in
    `base_hf`; the state is the base weights plus each adapted layer's scaling * B @ A
    (models.twin.lora_delta_state_dict)."""
    from models.factory import load_pretrained

    if finetune == "full":
        return load_pretrained(str(ft_hf)).eval().state_dict(), None
    from peft import PeftModel

    from models.twin import lora_delta_state_dict

    base = load_pretrained(str(base_hf)).eval()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    deltas = lora_delta_state_dict(PeftModel.from_pretrained(base, str(ft_hf)))
    for k, d in deltas.items():
        sd[k] = sd[k] + d.to(sd[k].dtype)
    return sd, sorted(deltas)


def build_experts(exp_dir: Path, base_sd: StateDict, tuned: List[StateDict], keys: Optional[List[str]],
                  lam: float, rank: Union[float, int], meta: Dict[str, Any]) -> Dict[str, Any]:
    """shared = task arithmetic (lambda = lam); expert_t = SVD factors of tuned_t - shared on `keys` (None:
    every floating tensor). Writes the three files into `exp_dir` (experts.json last, with `meta` merged
    in) and returns what experts.json holds."""
    from models.merging import merge_state_dicts
    from models.twin import compress_exclusive, exclusive_task_vectors, save_experts, storage_bytes

    exp_dir = Path(exp_dir)
    t0 = time.perf_counter()
    shared = merge_state_dicts("task_arithmetic", base_sd, tuned, lam=lam)
    experts = [compress_exclusive(exclusive_task_vectors(shared, t, keys), rank=rank) for t in tuned]
    seconds = time.perf_counter() - t0
    exp_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(exp_dir / "shared.safetensors", shared)
    save_experts(str(exp_dir / "experts.safetensors"), experts)  # the factors; atomic (tmp + rename)
    info = dict(meta, lam=lam, rank=rank, num_experts=len(experts),
                expert_keys=len(experts[0]) if experts else 0, build_seconds=seconds, **storage_bytes(experts))
    write_json_atomic(exp_dir / "experts.json", info)
    return info
