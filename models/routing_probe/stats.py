"""Streaming aggregates of the routing probe: `LayerStats` per MoE layer and `RoutingStats` over all probed
layers. Their size does not depend on the number of forwards (count matrices by token id, position and domain;
load; co-activation; drops by position bucket); they merge across processes and round-trip through
`state_dict`.

Plain PyTorch: no Lightning, no imports from `recipes/`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import torch

from models.routing_probe.analyses import group_std_vs_uniform, token_id_specialisation


def position_bucket_edges(position_buckets: int, max_positions: int) -> List[int]:
    """Edges of the equal-width position buckets over [0, max_positions): bucket b = [edges[b], edges[b+1])."""
    return [int(round(b * max_positions / position_buckets)) for b in range(position_buckets + 1)]


def _bucket_of(positions: torch.Tensor, position_buckets: int, max_positions: int) -> torch.Tensor:
    p = positions.clamp(0, max_positions - 1)
    return torch.div(p * position_buckets, max_positions, rounding_mode="floor").clamp_max(position_buckets - 1)


# ---------------------------------------------------------------------------------------------------
# Streaming aggregates


def _zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.float64)


def _grow_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))], dim=0)


_DROP_KEYS = ("assignments_dropped", "assignments_total", "tokens_dropped", "tokens_total")


@dataclass
class LayerStats:
    """Aggregates of one MoE layer (float64 counts; E = true experts).

    counts_by_X [G, E]: assignments of group g to expert e (null assignments excluded, dropped included:
    they are the router's choice). tokens_by_X [G]: real tokens of group g (its occurrences).
    load [E]: assignments per expert. coactivation [E, E]: tokens that chose both a and b (diagonal: tokens
    that chose a). drops_by_bucket: per position bucket, dropped and total assignments (true experts only),
    and dropped and total tokens (tokens with >= 1 true assignment; dropped = all of them overflowed).
    counts_by_domain / tokens_by_domain are None until a forward with domain labels was seen."""

    name: str
    num_experts: int
    top_k: int
    counts_by_token: torch.Tensor
    tokens_by_token: torch.Tensor
    counts_by_position: torch.Tensor
    tokens_by_position: torch.Tensor
    load: torch.Tensor
    coactivation: torch.Tensor
    drops_by_bucket: Dict[str, torch.Tensor]
    counts_by_domain: Optional[torch.Tensor] = None
    tokens_by_domain: Optional[torch.Tensor] = None
    n_tokens: int = 0

    @classmethod
    def empty(cls, name: str, num_experts: int, top_k: int, vocab_size: int, max_positions: int,
              position_buckets: int) -> "LayerStats":
        return cls(name=name, num_experts=num_experts, top_k=top_k,
                   counts_by_token=_zeros(vocab_size, num_experts), tokens_by_token=_zeros(vocab_size),
                   counts_by_position=_zeros(max_positions, num_experts), tokens_by_position=_zeros(max_positions),
                   load=_zeros(num_experts), coactivation=_zeros(num_experts, num_experts),
                   drops_by_bucket={key: _zeros(position_buckets) for key in _DROP_KEYS})

    # -- analyses with the right occurrence counts --------------------------------------------------
    def _group(self, by: str):
        table = {"token": (self.counts_by_token, self.tokens_by_token),
                 "token_id": (self.counts_by_token, self.tokens_by_token),
                 "position": (self.counts_by_position, self.tokens_by_position),
                 "domain": (self.counts_by_domain, self.tokens_by_domain)}
        if by not in table:
            raise ValueError(f"group by one of {sorted(table)}, got {by!r}")
        return table[by]

    def specialisation(self, by: str = "token", min_count: int = 5) -> float:
        """Mean share of a group's occurrences sent to its modal expert (NaN if no group qualifies)."""
        counts, occurrences = self._group(by)
        if counts is None:
            return float("nan")
        return token_id_specialisation(counts, min_count, occurrences=occurrences)

    def std_vs_uniform(self, by: str = "token", min_count: int = 5) -> Dict[str, float]:
        counts, occurrences = self._group(by)
        if counts is None:
            return {"mean_std": float("nan"), "uniform_std": float("nan"), "n_groups": 0}
        return group_std_vs_uniform(counts, min_count, occurrences=occurrences)

    # -- update / merge / serialisation -----------------------------------------------------------------
    def update(self, token_ids: torch.Tensor, positions: torch.Tensor, domains: Optional[torch.Tensor],
               experts: torch.Tensor, dropped: torch.Tensor, max_positions: int, position_buckets: int) -> None:
        num_tokens, k = experts.shape
        E = self.num_experts
        if num_tokens == 0:
            return
        is_true = experts < E
        safe = torch.where(is_true, experts, torch.zeros_like(experts))
        onehot = torch.zeros(num_tokens, E, dtype=torch.float64)
        onehot.scatter_add_(1, safe, is_true.to(torch.float64))  # [T, E]: 1 where the token chose e
        ones = torch.ones(num_tokens, dtype=torch.float64)

        vmax = int(token_ids.max()) + 1
        if vmax > self.counts_by_token.shape[0]:  # vocabulary unknown at construction: grow to the ids seen
            self.counts_by_token = _grow_rows(self.counts_by_token, vmax)
            self.tokens_by_token = _grow_rows(self.tokens_by_token, vmax)
        self.counts_by_token.index_add_(0, token_ids, onehot)
        self.tokens_by_token.index_add_(0, token_ids, ones)
        pos_row = positions.clamp(0, max_positions - 1)
        self.counts_by_position.index_add_(0, pos_row, onehot)
        self.tokens_by_position.index_add_(0, pos_row, ones)
        if domains is not None:
            labelled = domains >= 0
            if bool(labelled.any()):
                dmax = int(domains.max()) + 1
                if self.counts_by_domain is None:
                    self.counts_by_domain, self.tokens_by_domain = _zeros(dmax, E), _zeros(dmax)
                self.counts_by_domain = _grow_rows(self.counts_by_domain, dmax)
                self.tokens_by_domain = _grow_rows(self.tokens_by_domain, dmax)
                self.counts_by_domain.index_add_(0, domains[labelled], onehot[labelled])
                self.tokens_by_domain.index_add_(0, domains[labelled], ones[labelled])
        self.load += onehot.sum(0)
        self.coactivation += onehot.T @ onehot

        bucket = _bucket_of(positions, position_buckets, max_positions)
        true_dropped = dropped & is_true
        n_true = is_true.sum(1)
        has_true = n_true > 0
        token_dropped = has_true & (true_dropped.sum(1) == n_true)
        d = self.drops_by_bucket
        d["assignments_total"].index_add_(0, bucket, n_true.to(torch.float64))
        d["assignments_dropped"].index_add_(0, bucket, true_dropped.sum(1).to(torch.float64))
        d["tokens_total"].index_add_(0, bucket, has_true.to(torch.float64))
        d["tokens_dropped"].index_add_(0, bucket, token_dropped.to(torch.float64))
        self.n_tokens += int(num_tokens)

    def merge(self, other: "LayerStats") -> None:
        if (other.num_experts, other.top_k) != (self.num_experts, self.top_k):
            raise ValueError(f"cannot merge layer stats {other.name!r} (E={other.num_experts}, k={other.top_k}) "
                             f"into {self.name!r} (E={self.num_experts}, k={self.top_k})")
        if other.counts_by_position.shape != self.counts_by_position.shape or \
                other.drops_by_bucket["tokens_total"].shape != self.drops_by_bucket["tokens_total"].shape:
            raise ValueError("cannot merge stats recorded with different max_positions / position_buckets")
        rows = max(self.counts_by_token.shape[0], other.counts_by_token.shape[0])
        self.counts_by_token = _grow_rows(self.counts_by_token, rows) + _grow_rows(other.counts_by_token, rows)
        self.tokens_by_token = _grow_rows(self.tokens_by_token, rows) + _grow_rows(other.tokens_by_token, rows)
        self.counts_by_position = self.counts_by_position + other.counts_by_position
        self.tokens_by_position = self.tokens_by_position + other.tokens_by_position
        if other.counts_by_domain is not None:
            if self.counts_by_domain is None:
                self.counts_by_domain = other.counts_by_domain.clone()
                self.tokens_by_domain = other.tokens_by_domain.clone()
            else:
                n = max(self.counts_by_domain.shape[0], other.counts_by_domain.shape[0])
                self.counts_by_domain = _grow_rows(self.counts_by_domain, n) + _grow_rows(other.counts_by_domain, n)
                self.tokens_by_domain = _grow_rows(self.tokens_by_domain, n) + _grow_rows(other.tokens_by_domain, n)
        self.load = self.load + other.load
        self.coactivation = self.coactivation + other.coactivation
        self.drops_by_bucket = {key: self.drops_by_bucket[key] + other.drops_by_bucket[key] for key in _DROP_KEYS}
        self.n_tokens += other.n_tokens

    def state_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"name": self.name, "num_experts": self.num_experts, "top_k": self.top_k,
                               "n_tokens": self.n_tokens}
        for key in ("counts_by_token", "tokens_by_token", "counts_by_position", "tokens_by_position", "load",
                    "coactivation", "counts_by_domain", "tokens_by_domain"):
            value = getattr(self, key)
            out[key] = None if value is None else value.clone()
        out["drops_by_bucket"] = {key: value.clone() for key, value in self.drops_by_bucket.items()}
        return out

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "LayerStats":
        fields = dict(state)
        fields["drops_by_bucket"] = {key: torch.as_tensor(v, dtype=torch.float64).clone()
                                     for key, v in state["drops_by_bucket"].items()}
        for key in ("counts_by_token", "tokens_by_token", "counts_by_position", "tokens_by_position", "load",
                    "coactivation", "counts_by_domain", "tokens_by_domain"):
            if fields.get(key) is not None:
                fields[key] = torch.as_tensor(fields[key], dtype=torch.float64).clone()
        return cls(**fields)


@dataclass
class RoutingStats:
    """Streaming aggregates of every probed layer: `layers[i]` is a `LayerStats` (index = probe.layers order).
    Memory is fixed by (vocab, max_positions, domains, E, buckets), independent of the number of forwards."""

    layers: List[LayerStats]
    max_positions: int
    position_buckets: int
    domain_names: Optional[List[str]] = None
    n_forwards: int = 0

    @property
    def layer_names(self) -> List[str]:
        return [layer.name for layer in self.layers]

    @property
    def bucket_edges(self) -> List[int]:
        return position_bucket_edges(self.position_buckets, self.max_positions)

    def __getitem__(self, i: Union[int, str]) -> LayerStats:
        return self.layers[self.index(i)]

    def __len__(self) -> int:
        return len(self.layers)

    def index(self, layer: Union[int, str]) -> int:
        if isinstance(layer, str):
            names = self.layer_names
            if layer not in names:
                raise KeyError(f"no probed layer {layer!r}; layers: {names}")
            return names.index(layer)
        if not -len(self.layers) <= int(layer) < len(self.layers):
            raise IndexError(f"layer index {layer} out of range for {len(self.layers)} probed layers")
        return int(layer) % len(self.layers)

    def merge(self, other: "RoutingStats") -> "RoutingStats":
        """Add `other`'s counts into self (same layers, max_positions, buckets); returns self."""
        if other.layer_names != self.layer_names:
            raise ValueError(f"cannot merge stats of layers {other.layer_names} into {self.layer_names}")
        if (other.max_positions, other.position_buckets) != (self.max_positions, self.position_buckets):
            raise ValueError("cannot merge stats recorded with different max_positions / position_buckets")
        for mine, theirs in zip(self.layers, other.layers):
            mine.merge(theirs)
        if other.domain_names and (not self.domain_names or len(other.domain_names) > len(self.domain_names)):
            self.domain_names = list(other.domain_names)
        self.n_forwards += other.n_forwards
        return self

    def state_dict(self) -> Dict[str, Any]:
        return {"max_positions": self.max_positions, "position_buckets": self.position_buckets,
                "domain_names": None if self.domain_names is None else list(self.domain_names),
                "n_forwards": self.n_forwards, "layers": [layer.state_dict() for layer in self.layers]}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "RoutingStats":
        return cls(layers=[LayerStats.from_state_dict(s) for s in state["layers"]],
                   max_positions=int(state["max_positions"]), position_buckets=int(state["position_buckets"]),
                   domain_names=state.get("domain_names"), n_forwards=int(state.get("n_forwards", 0)))

    def tensors_numel(self) -> int:
        """Total number of stored counts (for memory checks)."""
        total = 0
        for layer in self.layers:
            for value in layer.state_dict().values():
                if isinstance(value, torch.Tensor):
                    total += value.numel()
                elif isinstance(value, dict):
                    total += sum(v.numel() for v in value.values())
        return total
