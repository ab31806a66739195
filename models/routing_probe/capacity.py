"""Capacity drops computed for dropless MoE layers (the routing probe's `capacity_factor`).

Per layer and forward, each expert takes at most C = ceil(capacity_factor * T * k / E) assignments (T = real
tokens of the batch, k = top_k slots, E = true experts); assignments beyond C in priority order are dropped.
Priority "position": earlier position first, ties by batch row, then slot (slot 0 before slot 1); "slot": every
slot-0 assignment before any slot-1 assignment, then by position, then batch row.

Plain PyTorch: no Lightning, no imports from `recipes/`.
"""
from __future__ import annotations

import math

import torch

PRIORITIES = ("position", "slot")


def capacity_drops(experts: torch.Tensor, positions: torch.Tensor, num_experts: int, capacity_factor: float,
                   priority: str = "position") -> torch.Tensor:
    """Assignments that overflow a per-expert capacity: dropped [T, k] bool.

    C = ceil(capacity_factor * T * k / num_experts) with T = experts.shape[0] (the real tokens of the batch).
    Assignments to index >= num_experts (null experts) are never counted nor dropped. Within each expert the
    first C assignments in priority order are kept:
    - "position": by position, ties by token order in `experts` (batch row), then slot;
    - "slot": by slot (all top-1 before any top-2), then position, then batch row.
    """
    if experts.dim() != 2:
        raise ValueError(f"capacity_drops: experts must be [T, k], got shape {tuple(experts.shape)}")
    if positions.shape != (experts.shape[0],):
        raise ValueError(f"capacity_drops: positions must be [T]={experts.shape[0]}, got {tuple(positions.shape)}")
    if priority not in PRIORITIES:
        raise ValueError(f"capacity_drops: priority must be one of {list(PRIORITIES)}, got {priority!r}")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_drops: capacity_factor must be > 0, got {capacity_factor}")
    if num_experts < 1:
        raise ValueError(f"capacity_drops: num_experts must be >= 1, got {num_experts}")
    num_tokens, k = experts.shape
    if num_tokens == 0:
        return torch.zeros_like(experts, dtype=torch.bool)
    capacity = int(math.ceil(capacity_factor * num_tokens * k / num_experts))
    flat = experts.reshape(-1).long()  # token-major, then slot: flat index = t * k + slot
    pos = positions.long().to(flat.device)[:, None].expand(num_tokens, k).reshape(-1)
    slot = torch.arange(k, device=flat.device).repeat(num_tokens)
    if priority == "position":
        key = pos
    else:
        key = slot * (int(pos.max()) + 1) + pos
    # Stable sorts: ties keep flat order (batch row, then slot).
    order = torch.argsort(key, stable=True)
    is_true = flat < num_experts
    bucket = torch.where(is_true, flat, torch.full_like(flat, num_experts))
    by_expert = order[torch.argsort(bucket[order], stable=True)]
    counts = torch.bincount(bucket, minlength=num_experts + 1)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat)
    rank[by_expert] = torch.arange(flat.numel(), device=flat.device) - start[bucket[by_expert]]
    return (is_true & (rank >= capacity)).reshape(num_tokens, k)
