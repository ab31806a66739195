"""The AdaMoE block: router + sorted token dispatch to the experts + optional capacity, and the helpers
that find the blocks of a model and read what they recorded.

Routing record contract (shared with models/routing_probe): after every forward a block sets
`self.last_routing = {"router_logits": [T, E_total], "topk_indices": [T, k], "topk_weights": [T, k],
"dropped": [T, k] bool or None, "num_true_experts": int, "num_null_experts": int, "top_k": int}`, with
T = batch*seq flattened, indices >= num_true_experts meaning null experts, and weight 0 for null and
dropped slots. `router_logits` keeps its autograd graph so the auxiliary losses can be computed from it.

Plain PyTorch: no Lightning, no imports from `recipes/`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from models.moe.config import MoEConfig, expert_capacity
from models.moe.experts import SwiGLUExperts
from models.moe.router import NullExpertRouter


class SparseMoEBlock(nn.Module):
    """Top-k MoE feed-forward block with null experts and an optional capacity limit.

    forward(hidden [B, S, d] or [T, d]) -> same shape. Dispatch: the T*k (token, slot) assignments that
    go to a true expert and were not dropped are argsorted by expert id, each expert runs once on its
    contiguous run of tokens, and results are scattered back with index_add. Null experts compute
    nothing.

    Capacity (when `capacity_factor` is set): each true expert accepts at most
    C = ceil(capacity_factor * T * k / E_true) assignments per forward, T counting every token of the
    batch (padding included, the block does not see the mask). Priority is position order: assignments
    are taken in flattened token order (batch-major, then sequence position, then slot), so later tokens
    overflow first. A dropped assignment contributes nothing and its weight is 0; the other slots'
    weights are not renormalised. Null slots are never dropped.

    Optional `shared_expert` / `shared_expert_gate` (Qwen2-MoE): output += sigmoid(gate(x)) * shared(x).
    """

    def __init__(self, config: MoEConfig, router: Optional[NullExpertRouter] = None,
                 experts: Optional[nn.Module] = None, shared_expert: Optional[nn.Module] = None,
                 shared_expert_gate: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.config = config
        self.num_true_experts = config.num_experts
        self.num_null_experts = config.num_null_experts
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.jitter_noise = config.router_jitter_noise
        # Module names `gate` and `experts` match the HF blocks so checkpoint keys stay the same.
        self.gate = router if router is not None else NullExpertRouter(config)
        self.experts = experts if experts is not None else SwiGLUExperts(
            config.num_experts, config.hidden_size, config.intermediate_size, config.hidden_act, config.init_std,
            expert_impl=config.expert_impl)
        if shared_expert_gate is not None and shared_expert is None:
            raise ValueError("shared_expert_gate given without a shared_expert")
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.last_routing: Optional[Dict[str, Any]] = None

    def capacity_drops(self, topk_indices: torch.Tensor) -> Optional[torch.Tensor]:
        """[T, k] bool, True where a true-expert assignment overflows its expert's capacity."""
        if self.capacity_factor is None:
            return None
        num_tokens, k = topk_indices.shape
        capacity = expert_capacity(self.capacity_factor, num_tokens, k, self.num_true_experts)
        flat = topk_indices.reshape(-1)
        is_true = flat < self.num_true_experts
        # Null slots go to a sentinel bucket that is never capacity-limited.
        bucket = torch.where(is_true, flat, torch.full_like(flat, self.num_true_experts))
        order = torch.argsort(bucket, stable=True)  # stable: position order inside each expert
        counts = torch.bincount(bucket, minlength=self.num_true_experts + 1)
        group_start = torch.cumsum(counts, dim=0) - counts
        rank_sorted = torch.arange(flat.numel(), device=flat.device) - group_start[bucket[order]]
        rank = torch.empty_like(rank_sorted)
        rank[order] = rank_sorted
        return (is_true & (rank >= capacity)).reshape(num_tokens, k)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        in_shape = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        tokens = hidden_states.reshape(-1, in_shape[-1])

        router_logits, topk_weights, topk_indices = self.gate(tokens)
        dropped = self.capacity_drops(topk_indices)
        if dropped is not None:
            topk_weights = topk_weights.masked_fill(dropped, 0.0)
        active = None  # None: every slot is a kept true-expert slot
        if self.num_null_experts or dropped is not None:
            active = topk_indices < self.num_true_experts
            if dropped is not None:
                active = active & ~dropped

        output = self._dispatch(tokens, topk_indices, topk_weights, active)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            output = output + shared

        self.last_routing = {
            "router_logits": router_logits,
            "topk_indices": topk_indices,
            "topk_weights": topk_weights,
            "dropped": dropped,
            "num_true_experts": self.num_true_experts,
            "num_null_experts": self.num_null_experts,
            "top_k": self.top_k,
        }
        return output.reshape(in_shape)

    def _dispatch(self, tokens: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor,
                  active: Optional[torch.Tensor]) -> torch.Tensor:
        k = topk_indices.shape[1]
        bucket = topk_indices.reshape(-1)
        if active is not None:
            # Inactive slots (null expert or dropped) sort into a last bucket that is never computed.
            bucket = torch.where(active.reshape(-1), bucket, torch.full_like(bucket, self.num_true_experts))
        order = torch.argsort(bucket, stable=True)
        counts = torch.bincount(bucket, minlength=self.num_true_experts + 1)[: self.num_true_experts].tolist()
        token_of_slot = order // k
        weight_of_slot = topk_weights.reshape(-1)[order]

        return self.experts(tokens, token_of_slot, weight_of_slot, counts)

    @classmethod
    def from_hf_block(cls, block: nn.Module, num_null_experts: int, top_k: int, norm_topk_prob: bool,
                      null_gate_init: str = "copy", **config_fields: Any) -> "SparseMoEBlock":
        """A block that SHARES `block`'s router weight, expert module (3-D weights) and, if present, its
        shared expert; only the null gate is new. The original Parameters are neither copied nor changed."""
        experts = block.experts
        if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False) \
                or not getattr(experts, "is_concatenated", True):
            raise ValueError(f"{type(experts).__name__}: only the concatenated [gate; up], untransposed, "
                             "bias-free expert layout is supported")
        gate_weight = block.gate.weight
        num_true, hidden = gate_weight.shape
        config = MoEConfig(
            hidden_size=hidden, intermediate_size=experts.down_proj.shape[-1], num_experts=num_true,
            num_null_experts=num_null_experts, top_k=top_k, null_gate_init=null_gate_init,
            split_null_gate=True, norm_topk_prob=norm_topk_prob,
            router_jitter_noise=float(getattr(block, "jitter_noise", 0.0) or 0.0), **config_fields,
        )
        router = NullExpertRouter(config, true_gate_weight=gate_weight)
        return cls(config, router=router, experts=SwiGLUExperts.sharing(experts, expert_impl=config.expert_impl),
                   shared_expert=getattr(block, "shared_expert", None),
                   shared_expert_gate=getattr(block, "shared_expert_gate", None))


def moe_blocks(model: nn.Module) -> List[SparseMoEBlock]:
    """All SparseMoEBlocks of a model in module (= layer) order."""
    return [m for m in model.modules() if isinstance(m, SparseMoEBlock)]


def recorded_routings(model: nn.Module) -> List[Dict[str, Any]]:
    """The `last_routing` record of every SparseMoEBlock of `model`, in layer order (see the contract above)."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no SparseMoEBlock (retrofit a HF MoE model first)")
    routings = [b.last_routing for b in blocks]
    if any(r is None for r in routings):
        raise ValueError("a SparseMoEBlock has no routing record yet: run a forward pass first")
    return routings
