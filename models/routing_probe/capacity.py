"""Capacity drops computed for dropless MoE layers (the routing probe's `capacity_factor`), and the drops each
drop order of an OpenMoE-style block would make on a recorded routing (`analyze`).

Per layer, forward and routing group, each expert keeps the first C assignments of its queue; the queue order
and C depend on the priority (n = real tokens of the group, k = top_k slots, E = true experts):

- "position" (group: the batch): earlier position first, ties by batch row, then slot; C = ceil(cf * n * k / E).
- "slot" (group: the batch): every slot-0 assignment before any slot-1 assignment, then by position, then batch
  row; C = ceil(cf * n * k / E).
- "colossalai" (group: the batch): ColossalAI's `Top2Router` (OpenMoE's released PyTorch code): every top-1
  choice of the group in token order (batch row, then position) before any top-2 choice;
  C = floor(k * cf * n / E), rounded up to even, at least 4.
- "slot_major" (group: each sequence): every top-1 choice before any top-2, in token order (T5X / flaxformer's
  order); C = ceil(cf * n * k / E).
- "token_major" (group: each sequence): token by token, slot 0 before slot 1; C = ceil(cf * n * k / E).

The last three are the `drop_order`s of `models.openmoe` with the same names (whose `capacity_group` option
sets the group): on the same routing the probe and the model drop the same assignments. A group can be given
explicitly (`group="batch"` or `"sequence"`, the latter needs each token's batch row).

Plain PyTorch: no Lightning, no imports from `recipes/`.
"""
from __future__ import annotations

from typing import Optional

import torch

from models.moe import colossalai_capacity, expert_capacity

PRIORITIES = ("position", "slot", "colossalai", "slot_major", "token_major")
DROP_ORDERS = ("colossalai", "slot_major", "token_major")
GROUPS = ("batch", "sequence")
# The routing group of each priority when none is given.
DEFAULT_GROUP = {"position": "batch", "slot": "batch", "colossalai": "batch", "slot_major": "sequence",
                 "token_major": "sequence"}


def _check(experts: torch.Tensor, positions: torch.Tensor, num_experts: int, capacity_factor: float,
           priority: str, group: str) -> None:
    if experts.dim() != 2:
        raise ValueError(f"capacity_drops: experts must be [T, k], got shape {tuple(experts.shape)}")
    if positions.shape != (experts.shape[0],):
        raise ValueError(f"capacity_drops: positions must be [T]={experts.shape[0]}, got {tuple(positions.shape)}")
    if priority not in PRIORITIES:
        raise ValueError(f"capacity_drops: priority must be one of {list(PRIORITIES)}, got {priority!r}")
    if group not in GROUPS:
        raise ValueError(f"capacity_drops: group must be one of {list(GROUPS)}, got {group!r}")
    if priority in ("position", "slot") and group != "batch":
        raise ValueError(f"capacity_drops: priority {priority!r} ranks by position over the whole batch; "
                         "group='sequence' needs a drop order (colossalai, slot_major, token_major)")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_drops: capacity_factor must be > 0, got {capacity_factor}")
    if num_experts < 1:
        raise ValueError(f"capacity_drops: num_experts must be >= 1, got {num_experts}")


def capacity_drops(experts: torch.Tensor, positions: torch.Tensor, num_experts: int, capacity_factor: float,
                   priority: str = "position", *, rows: Optional[torch.Tensor] = None,
                   group: Optional[str] = None) -> torch.Tensor:
    """Assignments that overflow a per-expert capacity: dropped [T, k] bool (see the module docstring).

    experts [T, k]: the real tokens of one forward, batch-major (row by row, position order within a row),
    slot 0 = the top-1 choice; positions [T]; rows [T] (each token's batch row; needed for group="sequence");
    group: "batch" | "sequence" | None (the priority's own, DEFAULT_GROUP). Assignments to index >= num_experts
    (null experts) are never counted nor dropped."""
    group = group or DEFAULT_GROUP.get(priority, "batch")
    _check(experts, positions, num_experts, capacity_factor, priority, group)
    num_tokens, k = experts.shape
    if num_tokens == 0:
        return torch.zeros_like(experts, dtype=torch.bool)
    device = experts.device
    flat = experts.reshape(-1).long()  # token-major, then slot: flat index = t * k + slot
    token = torch.arange(num_tokens, device=device).repeat_interleave(k)
    slot = torch.arange(k, device=device).repeat(num_tokens)
    if group == "sequence":
        if rows is None or rows.shape != (num_tokens,):
            raise ValueError("capacity_drops: group='sequence' needs rows [T], the batch row of every token")
        group_of_token = torch.unique(rows.long().to(device), return_inverse=True)[1]
    else:
        group_of_token = torch.zeros(num_tokens, dtype=torch.long, device=device)
    num_groups = int(group_of_token.max()) + 1
    group_size = torch.bincount(group_of_token, minlength=num_groups)  # n per group

    # Queue position inside a group (smaller = served first).
    pos = positions.long().to(device)[token]
    if priority == "position":
        order = (pos * num_tokens + token) * k + slot  # position, then batch row (token order), then slot
    elif priority == "token_major":
        order = token * k + slot
    elif priority == "slot":  # slot, then position, then batch row
        inner = pos * num_tokens + token
        order = slot * (int(inner.max()) + 1) + inner
    else:  # colossalai, slot_major: all top-1 before any top-2, then token order
        order = slot * num_tokens + token

    is_true = flat < num_experts
    bucket = torch.where(is_true, flat, torch.full_like(flat, num_experts))
    segment = bucket * num_groups + group_of_token[token]  # one queue per (expert, group)
    span = int(order.max()) + 1
    sorted_at = torch.argsort(segment * span + order)
    counts = torch.bincount(segment, minlength=(num_experts + 1) * num_groups)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat)
    rank[sorted_at] = torch.arange(flat.numel(), device=device) - start[segment[sorted_at]]

    if priority == "colossalai":
        capacity = torch.tensor([colossalai_capacity(capacity_factor, int(n), k, num_experts) for n in group_size],
                                device=device)
    else:
        capacity = torch.tensor([expert_capacity(capacity_factor, int(n), k, num_experts) for n in group_size],
                                device=device)
    return (is_true & (rank >= capacity[group_of_token[token]])).reshape(num_tokens, k)
