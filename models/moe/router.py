"""The AdaMoE router: logits over E_true true experts and N_null null experts, top-k, and mixing weights
renormalised over the selected true experts only.

Plain PyTorch: no Lightning, no imports from `recipes/`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.moe.config import MoEConfig


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype router softmaxes run in for logits of `dtype`."""
    # Softmax in at least float32 (as the HF routers do for bf16/fp16), float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def renormalise_over_true_experts(topk_probs: torch.Tensor, topk_indices: torch.Tensor,
                                  num_true_experts: int, normalise: bool = True) -> torch.Tensor:
    """Final mixing weights from the selected probabilities: null slots get 0; with `normalise` the
    true slots are divided by their sum, and a token that selected only null experts keeps weight 0
    everywhere (its sum is replaced by 1, as in the AdaMoE code), so its MoE output is 0."""
    is_true = topk_indices < num_true_experts
    true_probs = topk_probs * is_true.to(topk_probs.dtype)
    if not normalise:
        return true_probs
    true_sum = true_probs.sum(dim=-1, keepdim=True)
    true_sum = torch.where(true_sum > 0, true_sum, torch.ones_like(true_sum))
    return true_probs / true_sum


class NullExpertRouter(nn.Module):
    """Router over E_true true experts and N_null null experts.

    forward(hidden [..., d]) -> (router_logits [T, E_total], topk_weights [T, k], topk_indices [T, k]),
    the same triple the Hugging Face `*TopKRouter` modules return. Selection is top-k of the softmax
    over ALL E_total logits; the weights are then renormalised over the selected TRUE experts only.

    Parameters: `weight` [E_true, d] (the true gate; [E_total, d] when `split_null_gate=False`) and,
    when split and N_null > 0, `null_gate` = Linear(d -> N_null, bias=False).
    """

    def __init__(self, config: MoEConfig, true_gate_weight: Optional[nn.Parameter] = None) -> None:
        super().__init__()
        self.num_true_experts = config.num_experts
        self.num_null_experts = config.num_null_experts
        self.top_k = config.top_k
        self.hidden_size = config.hidden_size
        self.norm_topk_prob = config.norm_topk_prob
        self.split_null_gate = config.split_null_gate

        if true_gate_weight is not None:
            expected = (config.num_experts, config.hidden_size)
            if not config.split_null_gate or tuple(true_gate_weight.shape) != expected:
                raise ValueError(
                    f"an existing true gate weight needs split_null_gate=True and shape {expected}, "
                    f"got split_null_gate={config.split_null_gate}, shape {tuple(true_gate_weight.shape)}"
                )
            self.weight = true_gate_weight  # shared with the original model, not copied
        else:
            rows = config.num_experts if config.split_null_gate else config.num_total_experts
            self.weight = nn.Parameter(torch.empty(rows, config.hidden_size))
            nn.init.normal_(self.weight, mean=0.0, std=config.init_std)
            if not config.split_null_gate and config.null_gate_init == "copy" and config.num_null_experts:
                with torch.no_grad():
                    self.weight[config.num_experts:] = _repeat_rows(self.weight[: config.num_experts],
                                                                    config.num_null_experts)

        self.null_gate: Optional[nn.Linear] = None
        if config.split_null_gate and config.num_null_experts > 0:
            self.null_gate = nn.Linear(config.hidden_size, config.num_null_experts, bias=False,
                                       device=self.weight.device, dtype=self.weight.dtype)
            with torch.no_grad():
                if config.null_gate_init == "copy":
                    self.null_gate.weight.copy_(_repeat_rows(self.weight.detach(), config.num_null_experts))
                else:
                    nn.init.normal_(self.null_gate.weight, mean=0.0, std=config.init_std)

    @property
    def num_total_experts(self) -> int:
        return self.num_true_experts + self.num_null_experts

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, self.hidden_size)
        logits = F.linear(flat, self.weight)
        if self.null_gate is not None:
            logits = torch.cat([logits, self.null_gate(flat)], dim=-1)
        return logits

    def forward(self, hidden_states: torch.Tensor):
        router_logits = self.logits(hidden_states)
        probs = torch.softmax(router_logits, dim=-1, dtype=softmax_dtype(router_logits.dtype))
        topk_probs, topk_indices = torch.topk(probs, self.top_k, dim=-1)
        if self.num_null_experts == 0:  # every slot is true: the same weights without the null masking
            topk_weights = topk_probs / topk_probs.sum(dim=-1, keepdim=True) if self.norm_topk_prob else topk_probs
        else:
            topk_weights = renormalise_over_true_experts(topk_probs, topk_indices, self.num_true_experts,
                                                         normalise=self.norm_topk_prob)
        return router_logits, topk_weights, topk_indices


def _repeat_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows made by tiling `rows` (AdaMoE: weight.repeat(2, 1) for 16 nulls over 8 experts)."""
    reps = -(-count // rows.shape[0])
    return rows.repeat(reps, 1)[:count].clone()
