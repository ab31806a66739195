"""Auxiliary losses of MoE layers over their recorded routing: the AdaMoE load-balancing loss, the ST-MoE
router z-loss, and `collect_moe_aux_losses` over every block of a model.

Plain PyTorch: no Lightning, no imports from `recipes/`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from models.moe.block import moe_blocks, recorded_routings
from models.moe.config import LB_FRACTIONS, LB_NULL_MODES, LB_REDUCES
from models.moe.router import softmax_dtype


def flat_mask(token_mask: Optional[torch.Tensor], num_tokens: int, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    """Token weights [T] (1 = real token, 0 = padding); accepts [T] or [B, S] masks."""
    if token_mask is None:
        return torch.ones(num_tokens, device=device, dtype=dtype)
    if token_mask.numel() != num_tokens:
        raise ValueError(f"token mask has {token_mask.numel()} entries (shape {tuple(token_mask.shape)}) "
                         f"but the routing record has {num_tokens} tokens")
    return token_mask.reshape(-1).to(device=device, dtype=dtype)


def _as_routing_list(routings: Union[Dict[str, Any], Sequence[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    routing_list = [routings] if isinstance(routings, dict) else list(routings)
    if not routing_list:
        raise ValueError("no routing records: run a forward pass through the MoE blocks first")
    return routing_list


def _layer_counts_and_probs(routing: Dict[str, Any], token_mask: Optional[torch.Tensor]):
    """(slot counts per expert [E_total], summed probabilities [E_total], number of real tokens)."""
    logits = routing["router_logits"]
    num_tokens, num_total = logits.shape
    probs = torch.softmax(logits, dim=-1, dtype=softmax_dtype(logits.dtype))
    mask = flat_mask(token_mask, num_tokens, logits.device, probs.dtype)
    indices = routing["topk_indices"]
    slot_weight = mask[:, None].expand_as(indices).reshape(-1)
    counts = torch.zeros(num_total, device=logits.device, dtype=probs.dtype)
    counts = counts.scatter_add(0, indices.reshape(-1), slot_weight)
    prob_sum = (probs * mask[:, None]).sum(dim=0)
    return counts, prob_sum, mask.sum()


def _balance_value(counts: torch.Tensor, prob_sum: torch.Tensor, num_real_tokens: torch.Tensor,
                   top_k: int, num_true: int, lb_null_mode: str, lb_fraction: str) -> torch.Tensor:
    denom = torch.clamp(num_real_tokens, min=1.0)
    # f_e: share of the T*k slots ("slots"), or assignments per token ("tokens", k times that: HF Mixtral)
    fraction = counts / (denom * top_k) if lb_fraction == "slots" else counts / denom
    mean_prob = prob_sum / denom  # P_e
    if lb_null_mode == "average" and fraction.shape[0] > num_true:
        # Balance the null group as a whole: every null expert gets the mean null count.
        null_mean = fraction[num_true:].mean()
        fraction = torch.cat([fraction[:num_true], null_mean.expand(fraction.shape[0] - num_true)])
    return fraction.shape[0] * torch.sum(fraction * mean_prob)


def load_balancing_loss(routings: Union[Dict[str, Any], Sequence[Dict[str, Any]]],
                        token_mask: Optional[torch.Tensor] = None, lb_null_mode: str = "average",
                        lb_reduce: str = "per_layer_sum", lb_fraction: str = "slots") -> torch.Tensor:
    """AdaMoE load-balancing loss over the routing records of all MoE layers.

    Per layer: f_e = (slots assigned to expert e) / (T*k) (lb_fraction="slots"; "tokens": / T, k times
    larger), P_e = mean router probability of e over the tokens, loss = E_total * sum_e f_e * P_e (1.0 at
    perfect balance with "slots", k with "tokens"). With lb_null_mode="average" each null expert's f_e is
    replaced by the mean f over the null experts. `token_mask` ([T] or [B, S], 1 = real token) removes
    padding from both f and P. Counts are of the router's selections (a capacity drop still counts: the
    router chose it).

    lb_reduce="per_layer_sum": the per-layer losses are summed (AdaMoE's LLaMA + LoRA code). "concat": all
    layers' tokens are pooled first, then one loss is taken, as Hugging Face Mixtral does; with
    lb_fraction="tokens" and lb_null_mode="none" the value is exactly HF's `load_balancing_loss_func`
    (AdaMoE's released Mixtral code). The presets of both releases: `models.moe.LB_PRESETS`.
    """
    if lb_null_mode not in LB_NULL_MODES:
        raise ValueError(f"lb_null_mode must be one of {list(LB_NULL_MODES)}, got {lb_null_mode!r}")
    if lb_reduce not in LB_REDUCES:
        raise ValueError(f"lb_reduce must be one of {list(LB_REDUCES)}, got {lb_reduce!r}")
    if lb_fraction not in LB_FRACTIONS:
        raise ValueError(f"lb_fraction must be one of {list(LB_FRACTIONS)}, got {lb_fraction!r}")
    routing_list = _as_routing_list(routings)
    layers = []
    for routing in routing_list:
        counts, prob_sum, real = _layer_counts_and_probs(routing, token_mask)
        layers.append((counts, prob_sum, real, int(routing["top_k"]), int(routing["num_true_experts"])))

    if lb_reduce == "per_layer_sum":
        return torch.stack([_balance_value(c, p, n, k, e, lb_null_mode, lb_fraction)
                            for c, p, n, k, e in layers]).sum()

    shapes = {(c.shape[0], k, e) for c, _, _, k, e in layers}
    if len(shapes) != 1:
        raise ValueError(f"lb_reduce='concat' needs the same (E_total, top_k, E_true) in every layer, got {shapes}")
    _, top_k, num_true = shapes.pop()
    device = layers[0][0].device
    counts = torch.stack([c.to(device) for c, _, _, _, _ in layers]).sum(dim=0)
    prob_sum = torch.stack([p.to(device) for _, p, _, _, _ in layers]).sum(dim=0)
    real = torch.stack([n.to(device) for _, _, n, _, _ in layers]).sum()
    return _balance_value(counts, prob_sum, real, top_k, num_true, lb_null_mode, lb_fraction)


def router_z_loss(routings: Union[Dict[str, Any], Sequence[Dict[str, Any]]],
                  token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2, summed over layers."""
    total = []
    for routing in _as_routing_list(routings):
        logits = routing["router_logits"]
        lse = torch.logsumexp(logits.to(softmax_dtype(logits.dtype)), dim=-1)
        mask = flat_mask(token_mask, logits.shape[0], logits.device, lse.dtype)
        total.append((lse.square() * mask).sum() / torch.clamp(mask.sum(), min=1.0))
    return torch.stack(total).sum()


def collect_moe_aux_losses(model: nn.Module, token_mask: Optional[torch.Tensor] = None,
                           lb_null_mode: Optional[str] = None, lb_reduce: Optional[str] = None,
                           lb_fraction: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """{"lb": load-balancing loss, "z": router z-loss} over every SparseMoEBlock's last forward.
    Modes default to the first block's MoEConfig. The caller weights them (config.lb_coef / z_coef)."""
    routings = recorded_routings(model)
    first_config = moe_blocks(model)[0].config
    return {
        "lb": load_balancing_loss(routings, token_mask, lb_null_mode or first_config.lb_null_mode,
                                  lb_reduce or first_config.lb_reduce, lb_fraction or first_config.lb_fraction),
        "z": router_z_loss(routings, token_mask),
    }
