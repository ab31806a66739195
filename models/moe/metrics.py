"""Routing statistics of the last forward of every MoE block of a model (for logging; no gradients).

Plain PyTorch: no Lightning, no imports from `recipes/`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from models.moe.block import recorded_routings
from models.moe.losses import flat_mask
from models.moe.router import softmax_dtype


@torch.no_grad()
def moe_routing_metrics(model: nn.Module, token_mask: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """Routing statistics of the last forward, over real tokens and all MoE layers.

    Floats: "moe/true_experts_per_token" (true experts actually computed per token per layer: null and
    dropped slots excluded; the FLOPs proxy), "moe/share_true_experts_{i}" for i = 0..k (share of
    (token, layer) pairs using i true experts), "moe/null_slot_fraction", "moe/drop_fraction",
    "moe/router_entropy" (nats, softmax over all E_total experts).
    Tensor: "expert_load" [layers, E_total], the share of each layer's real slots sent to each expert
    (selections, so each row sums to 1); not a scalar, hence no "moe/" prefix.
    """
    routings = recorded_routings(model)
    top_k = int(routings[0]["top_k"])
    num_true_per_token, null_slots, dropped_slots, entropy, real_slots, real_tokens = [], 0.0, 0.0, 0.0, 0.0, 0.0
    loads = []
    for routing in routings:
        indices = routing["topk_indices"]
        k = int(routing["top_k"])
        if k != top_k:
            raise ValueError("moe_routing_metrics needs the same top_k in every MoE layer")
        logits = routing["router_logits"]
        probs = torch.softmax(logits, dim=-1, dtype=softmax_dtype(logits.dtype))
        mask = flat_mask(token_mask, indices.shape[0], indices.device, probs.dtype) > 0
        is_true = indices < int(routing["num_true_experts"])
        computed = is_true if routing["dropped"] is None else is_true & ~routing["dropped"]
        num_true_per_token.append(computed.sum(dim=-1)[mask])
        null_slots += float((~is_true)[mask].sum())
        if routing["dropped"] is not None:
            dropped_slots += float(routing["dropped"][mask].sum())
        entropy += float(-(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)[mask].sum())
        n_real = float(mask.sum())
        real_tokens += n_real
        real_slots += n_real * k
        counts = torch.bincount(indices[mask].reshape(-1), minlength=logits.shape[1]).to(probs.dtype)
        loads.append(counts / max(n_real * k, 1.0))
    used = torch.cat(num_true_per_token)
    denom_tokens = max(used.numel(), 1)
    metrics: Dict[str, Any] = {
        "moe/true_experts_per_token": float(used.to(torch.float64).mean()) if used.numel() else 0.0
    }
    for i in range(top_k + 1):
        metrics[f"moe/share_true_experts_{i}"] = float((used == i).sum()) / denom_tokens
    metrics["moe/null_slot_fraction"] = null_slots / max(real_slots, 1.0)
    metrics["moe/drop_fraction"] = dropped_slots / max(real_slots, 1.0)
    metrics["moe/router_entropy"] = entropy / max(real_tokens, 1.0)
    widths = {load.shape[0] for load in loads}
    metrics["expert_load"] = torch.stack(loads).cpu() if len(widths) == 1 else [load.cpu() for load in loads]
    return metrics
