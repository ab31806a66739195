"""Analyses of recorded routing: pure functions over count tensors / `RoutingStats`.

`token_id_specialisation`, `group_std_vs_uniform`, `top_tokens_per_expert`, `router_saturation`,
`drop_rate_by_position`, `coactivation_probability`, `load_statistics`, and `analysis_report` (all of them
for every probed layer, JSON-serialisable); the OpenMoE paper's own quantities: `expert_ratio_std` (Figures
13-14: std of each token id's / position's expert-ratio vector against uniform routing),
`distribution_distance` (Figure 11: each token id's expert distribution at one checkpoint against another),
`drop_order_rates` (drop rate by position under each drop order on one recorded routing).

Plain PyTorch: no Lightning, no imports from `recipes/`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import torch

from models.routing_probe.capacity import DROP_ORDERS, capacity_drops

if TYPE_CHECKING:  # annotations only: stats.py imports this module
    from models.routing_probe.stats import RoutingStats


def _as_counts(counts: Any, name: str = "counts") -> torch.Tensor:
    t = torch.as_tensor(counts, dtype=torch.float64)
    if t.dim() != 2:
        raise ValueError(f"{name} must be [groups, experts], got shape {tuple(t.shape)}")
    return t


def _occurrences(counts: torch.Tensor, occurrences: Any, top_k: int) -> torch.Tensor:
    if occurrences is not None:
        occ = torch.as_tensor(occurrences, dtype=torch.float64).reshape(-1)
        if occ.shape[0] != counts.shape[0]:
            raise ValueError(f"occurrences has {occ.shape[0]} entries, counts has {counts.shape[0]} groups")
        return occ
    if int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    return counts.sum(1) / int(top_k)


def token_id_specialisation(counts_by_token: Any, min_count: int = 5, *, top_k: int = 1,
                            occurrences: Any = None) -> float:
    """OLMoE's token-id specialisation: for each group (token id, position or domain) with at least
    `min_count` occurrences, the share of its occurrences routed to its modal expert,
    max_e counts[g, e] / occurrences[g]; averaged over those groups. NaN when no group qualifies.

    occurrences[g] (tokens of the group) defaults to counts[g].sum() / top_k, exact for models without null
    experts (each token makes top_k assignments); pass `LayerStats.tokens_by_*` (or use
    `LayerStats.specialisation`) for AdaMoE models. A router that always sends an id to the same experts
    gives 1.0; uniform random routing gives about k/E plus a finite-sample excess."""
    counts = _as_counts(counts_by_token)
    occ = _occurrences(counts, occurrences, top_k)
    keep = occ >= max(int(min_count), 1)
    if not bool(keep.any()):
        return float("nan")
    return float((counts[keep].max(1).values / occ[keep]).mean())


def group_std_vs_uniform(counts: Any, min_count: int = 5, *, top_k: int = 1,
                         occurrences: Any = None) -> Dict[str, float]:
    """Per group with >= min_count occurrences: the std (population, over the E experts) of its
    expert-ratio vector r_g = counts[g] / counts[g].sum(); `mean_std` is their mean.

    `uniform_std` is the mean over the same groups of the std expected under uniform random routing of the
    same number n_g of assignments: each token picks k distinct experts uniformly (k = top_k, or the group's
    assignments per occurrence when `occurrences` is given), so each count is Binomial(m_g, k/E) with m_g = n_g/k
    occurrences, Var(r_e) = (E - k) / (E^2 n_g), and E[std^2] = (1/E) sum_e Var(r_e) = (E - k) / (E^2 n_g);
    uniform_std = mean_g sqrt((E - k_g) / (E^2 n_g)). (k = 1 is the multinomial case (E-1)/(E^2 n).) This is
    the root of the expected variance, slightly above the expected std for tiny groups (Jensen).
    Specialised routing gives mean_std far above uniform_std; a perfectly uniform split gives 0."""
    c = _as_counts(counts)
    E = c.shape[1]
    occ = _occurrences(c, occurrences, top_k)
    n = c.sum(1)
    keep = (occ >= max(int(min_count), 1)) & (n > 0)
    if not bool(keep.any()):
        return {"mean_std": float("nan"), "uniform_std": float("nan"), "n_groups": 0}
    ratios = c[keep] / n[keep, None]
    std = ratios.std(dim=1, unbiased=False)
    k_g = (n[keep] / occ[keep]).clamp(max=E)
    uniform = torch.sqrt((E - k_g).clamp_min(0) / (E * E * n[keep]))
    return {"mean_std": float(std.mean()), "uniform_std": float(uniform.mean()), "n_groups": int(keep.sum())}


def expert_ratio_std(counts: Any, occurrences: Any, *, more_than: int = 128) -> Dict[str, float]:
    """The OpenMoE paper's specialisation measure (Figures 13-14) for one layer: over the groups (token ids, or
    positions) seen MORE than `more_than` times, the mean std of the expert-ratio vector r_g = counts[g] /
    counts[g].sum(), next to the same mean for uniform random routing of the same numbers of assignments
    (`group_std_vs_uniform`). Returns mean_std, uniform_std, n_groups (0 and NaNs when no group qualifies)."""
    return group_std_vs_uniform(counts, int(more_than) + 1, occurrences=occurrences)


def _distributions(counts: torch.Tensor) -> torch.Tensor:
    return counts / counts.sum(1, keepdim=True).clamp_min(1e-300)


def distribution_distance(counts_a: Any, counts_b: Any, occurrences: Any, *, min_count: int = 128
                          ) -> Dict[str, float]:
    """How far each token id's expert distribution moved between two checkpoints on the SAME tokens (the
    OpenMoE paper's early-routing comparison, Figure 11). For every id with >= `min_count` occurrences and
    assignments in both: p = counts_a[id] / sum, q = counts_b[id] / sum; total variation TV = sum|p - q| / 2
    and Jensen-Shannon distance JS = sqrt((KL(p||m) + KL(q||m)) / 2), m = (p + q) / 2, log base 2 (both in
    [0, 1]). Returns their means over the ids (mean_tv, mean_js) and n_groups (NaN / 0 when none qualifies)."""
    a, b = _as_counts(counts_a, "counts_a"), _as_counts(counts_b, "counts_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"counts over {a.shape[1]} and {b.shape[1]} experts cannot be compared")
    rows = max(a.shape[0], b.shape[0])
    a = torch.cat([a, a.new_zeros(rows - a.shape[0], a.shape[1])])
    b = torch.cat([b, b.new_zeros(rows - b.shape[0], b.shape[1])])
    occ = torch.as_tensor(occurrences, dtype=torch.float64).reshape(-1)
    occ = torch.cat([occ, occ.new_zeros(max(rows - occ.shape[0], 0))])[:rows]
    keep = (occ >= max(int(min_count), 1)) & (a.sum(1) > 0) & (b.sum(1) > 0)
    if not bool(keep.any()):
        return {"mean_tv": float("nan"), "mean_js": float("nan"), "n_groups": 0}
    p, q = _distributions(a[keep]), _distributions(b[keep])
    tv = 0.5 * (p - q).abs().sum(1)
    m = 0.5 * (p + q)

    def kl(x: torch.Tensor) -> torch.Tensor:
        ratio = torch.where(x > 0, x / m.clamp_min(1e-300), torch.ones_like(x))
        return (x * torch.log2(ratio)).sum(1)

    js = torch.sqrt((0.5 * (kl(p) + kl(q))).clamp_min(0.0))
    return {"mean_tv": float(tv.mean()), "mean_js": float(js.mean()), "n_groups": int(keep.sum())}


def drop_order_rates(experts: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, num_experts: int,
                     capacity_factor: float, *, rows_per_forward: int, position_buckets: int, max_positions: int,
                     orders: Sequence[str] = DROP_ORDERS, group: Optional[str] = None) -> Dict[str, Any]:
    """Drop rate by position bucket that each drop order would give on one recorded routing (the routing is
    held fixed: a drop does not change the later layers' routing here).

    experts [T, k] of the real tokens (batch-major), positions [T], rows [T] (the block / row index of each
    token); the tokens are cut into forwards of `rows_per_forward` consecutive rows, as they were run, and
    each forward is capacity-limited on its own by `capacity_drops(..., priority=order, group=group)` (group
    None: the order's own). Per order: per_assignment (dropped / true assignments) and per_token (tokens whose
    every true assignment dropped / tokens with one) for each of `position_buckets` equal-width buckets over
    [0, max_positions), NaN for empty buckets; plus bucket_edges and the overall rates."""
    experts, positions, rows = torch.as_tensor(experts).long(), torch.as_tensor(positions).long(), \
        torch.as_tensor(rows).long()
    bucket = torch.div(positions.clamp(0, max_positions - 1) * position_buckets, max_positions,
                       rounding_mode="floor").clamp_max(position_buckets - 1)
    forward = torch.div(rows, max(int(rows_per_forward), 1), rounding_mode="floor")
    is_true = experts < num_experts
    n_true = is_true.sum(1)
    out: Dict[str, Any] = {"bucket_edges": [int(round(b * max_positions / position_buckets))
                                            for b in range(position_buckets + 1)]}
    for order in orders:
        dropped = torch.zeros_like(experts, dtype=torch.bool)
        for f in torch.unique(forward).tolist():
            sel = forward == f
            dropped[sel] = capacity_drops(experts[sel], positions[sel], num_experts, capacity_factor, order,
                                          rows=rows[sel], group=group)
        n_dropped = (dropped & is_true).sum(1)
        token_dropped = (n_true > 0) & (n_dropped == n_true)
        sums = {name: torch.zeros(position_buckets, dtype=torch.float64).index_add_(0, bucket, v.double())
                for name, v in (("a_drop", n_dropped), ("a_all", n_true), ("t_drop", token_dropped),
                                ("t_all", n_true > 0))}

        def rate(num: torch.Tensor, den: torch.Tensor) -> List[float]:
            return [float(x) / float(y) if float(y) > 0 else float("nan") for x, y in zip(num, den)]

        out[order] = {"per_assignment": rate(sums["a_drop"], sums["a_all"]),
                      "per_token": rate(sums["t_drop"], sums["t_all"]),
                      "overall_per_assignment": float(n_dropped.sum()) / max(float(n_true.sum()), 1.0),
                      "overall_per_token": float(token_dropped.sum()) / max(float((n_true > 0).sum()), 1.0)}
    return out


def top_tokens_per_expert(counts_by_token: Any, k: int = 10) -> List[List[int]]:
    """For each expert, the (up to) k token ids it received most often (count > 0), most frequent first;
    ties by smaller token id."""
    counts = _as_counts(counts_by_token, "counts_by_token")
    out: List[List[int]] = []
    for e in range(counts.shape[1]):
        column = counts[:, e]
        # Sort by count descending, then id ascending (lexicographic through a stable sort).
        order = torch.argsort(-column, stable=True)
        order = order[column[order] > 0][: int(k)]
        out.append([int(i) for i in order])
    return out


def router_saturation(experts_a: torch.Tensor, experts_b: torch.Tensor) -> Dict[str, float]:
    """Agreement of two routings of the SAME tokens (e.g. a checkpoint's and the final one's), [T, k] each,
    slot 0 = the top-1 choice: top1_agreement = mean [a[t,0] == b[t,0]], topk_overlap = mean |S_a n S_b| / k."""
    a, b = torch.as_tensor(experts_a), torch.as_tensor(experts_b)
    if a.dim() == 1:
        a, b = a[:, None], b[:, None] if b.dim() == 1 else b
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"router_saturation needs two [T, k] routings of the same tokens, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.shape[0] == 0:
        return {"top1_agreement": float("nan"), "topk_overlap": float("nan")}
    k = a.shape[1]
    top1 = (a[:, 0] == b[:, 0]).double().mean()
    overlap = (a[:, :, None] == b[:, None, :]).any(dim=2).double().sum(1) / k  # experts in a also in b
    return {"top1_agreement": float(top1), "topk_overlap": float(overlap.mean())}


def drop_rate_by_position(stats: RoutingStats, layer: Union[int, str]) -> Dict[str, List[float]]:
    """Drop rate per position bucket of one layer: per assignment (dropped / total true assignments) and per
    token (tokens whose every true assignment overflowed / tokens with one). NaN for empty buckets."""
    d = stats[layer].drops_by_bucket

    def rate(num: torch.Tensor, den: torch.Tensor) -> List[float]:
        return [float(x) / float(y) if float(y) > 0 else float("nan") for x, y in zip(num, den)]

    return {"per_assignment": rate(d["assignments_dropped"], d["assignments_total"]),
            "per_token": rate(d["tokens_dropped"], d["tokens_total"]),
            "bucket_edges": stats.bucket_edges,
            "assignments_total": [float(x) for x in d["assignments_total"]],
            "tokens_total": [float(x) for x in d["tokens_total"]]}


def coactivation_probability(coactivation: Any) -> torch.Tensor:
    """P(b | a) = coactivation[a, b] / coactivation[a, a] (tokens choosing a and b over tokens choosing a);
    rows of experts never chosen are 0. The diagonal is 1 for chosen experts."""
    c = _as_counts(coactivation, "coactivation")
    if c.shape[0] != c.shape[1]:
        raise ValueError(f"coactivation must be square [E, E], got {tuple(c.shape)}")
    diag = torch.diagonal(c)
    return torch.where(diag[:, None] > 0, c / diag.clamp_min(1e-300)[:, None], torch.zeros_like(c))


def load_statistics(load: Any) -> Dict[str, float]:
    """Load of one layer as SHARES of its assignments (sum 1): min, max, std (population) and
    max_over_ideal = max share / (1/E) (1.0 = perfectly balanced). NaN when no assignment was seen."""
    t = torch.as_tensor(load, dtype=torch.float64).reshape(-1)
    total = float(t.sum())
    if t.numel() == 0 or total <= 0:
        nan = float("nan")
        return {"min": nan, "max": nan, "std": nan, "max_over_ideal": nan}
    share = t / total
    return {"min": float(share.min()), "max": float(share.max()), "std": float(share.std(unbiased=False)),
            "max_over_ideal": float(share.max() * t.numel())}


def _clean(x: Any) -> Any:
    """JSON-serialisable: tensors to lists, NaN/inf to None."""
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def analysis_report(stats: RoutingStats, tokenizer: Any = None, *, min_token_count: int = 5,
                    top_n: int = 10, spec_more_than: int = 128) -> Dict[str, Any]:
    """Every analysis of every probed layer as a JSON-serialisable dict (NaN -> None). With a tokenizer
    (anything with `decode([id])`) the top tokens per expert are also decoded. `paper_specialisation` is
    `expert_ratio_std` by token id (ids seen more than `spec_more_than` times) and by position (every
    position seen)."""
    layers: Dict[str, Any] = {}
    for i, layer in enumerate(stats.layers):
        top = top_tokens_per_expert(layer.counts_by_token, k=top_n)
        entry: Dict[str, Any] = {
            "num_experts": layer.num_experts, "top_k": layer.top_k, "n_tokens": layer.n_tokens,
            "paper_specialisation": {
                "token_id": expert_ratio_std(layer.counts_by_token, layer.tokens_by_token, more_than=spec_more_than),
                "position": expert_ratio_std(layer.counts_by_position, layer.tokens_by_position, more_than=0),
                "more_than": int(spec_more_than)},
            "specialisation": {"token_id": layer.specialisation("token", min_token_count),
                               "position": layer.specialisation("position", 1)},
            "std_vs_uniform": {"token_id": layer.std_vs_uniform("token", min_token_count),
                               "position": layer.std_vs_uniform("position", 1)},
            "top_tokens": {"ids": top},
            "drop_rate_by_position": drop_rate_by_position(stats, i),
            "coactivation": coactivation_probability(layer.coactivation),
            "load": load_statistics(layer.load),
        }
        if layer.counts_by_domain is not None:
            entry["specialisation"]["domain"] = layer.specialisation("domain", 1)
            entry["std_vs_uniform"]["domain"] = layer.std_vs_uniform("domain", 1)
        if tokenizer is not None:
            entry["top_tokens"]["decoded"] = [[tokenizer.decode([t]) for t in ids] for ids in top]
        layers[layer.name] = entry
    return _clean({"layers": layers, "domain_names": stats.domain_names, "bucket_edges": stats.bucket_edges,
                   "n_forwards": stats.n_forwards})
