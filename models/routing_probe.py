"""Routing probe for any MoE model, and the OpenMoE routing analyses (SPEC.md section 2).

`RoutingProbe(model).attach()` registers forward hooks on every MoE block of `model` and records, per real
token of every forward: token id, position, domain label (when set), the selected experts and weights,
and whether each assignment was dropped by capacity. It keeps

- `probe.last`: one `RoutingRecord` per MoE layer for the most recent forward only, and
- `probe.stats`: a `RoutingStats` of streaming aggregates whose size does not depend on the number of
  forwards (count matrices by token id, position and domain; load; co-activation; drops by position bucket).

`detach()` removes every hook (the model is exactly as before; nothing of the probe runs any more).

Supported blocks
- `models.moe.SparseMoEBlock` (this repository's MoE / AdaMoE / OpenMoE blocks): a forward hook on the block
  reads its `last_routing` record. Null experts (index >= num_true_experts) are not assignments: they are
  never counted in the aggregates nor dropped. Blocks with a capacity report their REAL drops.
- transformers 5.x sparse blocks (Mixtral, Qwen2-MoE, OLMoE and any `*SparseMoeBlock` whose `gate` has
  `num_experts` and `top_k`): a forward hook on the block's router (`gate`), which returns
  `(router_logits [T, E], top-k weights [T, k], top-k indices [T, k])`. These models are dropless.

Token ids and positions come from a forward pre-hook on the root model (`input_ids` keyword or first
positional argument; `attention_mask` keyword). Padding (attention_mask == 0) is excluded everywhere: a
record holds only the T real tokens of the batch, batch-major. The position of a real token is the number
of real tokens before it in its row (= index within the sequence for right-padded or unpadded batches; left
padding does not shift positions); a `position_ids` keyword [B, S] or [1, S] is used instead when given
(generation with a KV cache). Positions >= `max_positions` are counted in the last position row and bucket.
If a block runs more than once per root forward, or after the root forward returned (activation-checkpoint
recomputation during backward), only its first run is recorded.

Capacity (for dropless models, when `capacity_factor` is given): per layer and forward, each expert takes
at most C = ceil(capacity_factor * T * k / E) assignments (T = real tokens of the batch, k = top_k slots,
E = true experts); assignments beyond C in priority order are dropped. Priority "position": earlier position
first, ties by batch row, then slot (slot 0 before slot 1); "slot": every slot-0 assignment before any
slot-1 assignment, then by position, then batch row. See `capacity_drops`.

Analyses (pure functions over count tensors / RoutingStats): `token_id_specialisation`,
`group_std_vs_uniform`, `top_tokens_per_expert`, `router_saturation`, `drop_rate_by_position`,
`coactivation_probability`, `load_statistics`, `analysis_report`.

Plain PyTorch: no Lightning, no imports from `recipes/`. Hand-written because no maintained library records
per-token routing of arbitrary MoE implementations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

PRIORITIES = ("position", "slot")

__all__ = [
    "PRIORITIES", "RoutingRecord", "LayerStats", "RoutingStats", "RoutingProbe", "capacity_drops",
    "find_moe_blocks", "token_id_specialisation", "group_std_vs_uniform", "top_tokens_per_expert",
    "router_saturation", "drop_rate_by_position", "coactivation_probability", "load_statistics",
    "analysis_report", "position_bucket_edges",
]


# ---------------------------------------------------------------------------------------------------
# Records


@dataclass
class RoutingRecord:
    """Routing of the real tokens of one forward through one MoE layer (T = real tokens, batch-major).

    `experts` may contain null-expert indices (>= num_experts) for AdaMoE blocks; their weight is 0."""

    layer: int
    token_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    domains: Optional[torch.Tensor]  # [T] long (-1 = unlabelled) or None
    experts: torch.Tensor  # [T, k] long
    weights: torch.Tensor  # [T, k] float
    dropped: torch.Tensor  # [T, k] bool
    num_experts: int = 0  # true experts of the layer


# ---------------------------------------------------------------------------------------------------
# Capacity


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


# ---------------------------------------------------------------------------------------------------
# Finding MoE blocks


@dataclass
class _Site:
    name: str  # name of the MoE block in the model
    kind: str  # "sparse" (models.moe.SparseMoEBlock) or "hf_gate" (transformers router module)
    module: nn.Module  # the module whose forward is hooked
    num_experts: int
    top_k: int


def find_moe_blocks(model: nn.Module) -> List[_Site]:
    """MoE blocks of `model` in module order (outer blocks only: a block's own children are not searched)."""
    from models.moe import SparseMoEBlock

    sites: List[_Site] = []
    skip_prefixes: List[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, SparseMoEBlock):
            sites.append(_Site(name, "sparse", module, int(module.num_true_experts), int(module.top_k)))
            skip_prefixes.append(name + ".")
            continue
        gate = getattr(module, "gate", None)
        if type(module).__name__.endswith("SparseMoeBlock") and isinstance(gate, nn.Module) \
                and hasattr(gate, "num_experts") and hasattr(gate, "top_k"):
            sites.append(_Site(name, "hf_gate", gate, int(gate.num_experts), int(gate.top_k)))
            skip_prefixes.append(name + ".")
    return sites


# ---------------------------------------------------------------------------------------------------
# The probe


class RoutingProbe:
    """Forward hooks that record the routing of every MoE block of `model` (see the module docstring).

    capacity_factor: for dropless blocks, the factor whose drops are computed (None: no drops); blocks that
    drop themselves always report their real drops. priority: "position" or "slot" (see `capacity_drops`).
    position_buckets / max_positions: drop-rate buckets are equal-width over [0, max_positions).
    min_token_count: default occurrence threshold of the token-id analyses (`analysis_report`).
    vocab_size: rows of counts_by_token (default: the model's input-embedding size, else grown to the ids seen).
    """

    def __init__(self, model: nn.Module, *, capacity_factor: Optional[float] = None, priority: str = "position",
                 position_buckets: int = 8, max_positions: int = 4096, min_token_count: int = 5,
                 vocab_size: Optional[int] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"RoutingProbe needs a torch.nn.Module, got {type(model).__name__}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {list(PRIORITIES)}, got {priority!r}")
        if int(position_buckets) < 1:
            raise ValueError(f"position_buckets must be >= 1, got {position_buckets}")
        if int(max_positions) < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        if int(min_token_count) < 1:
            raise ValueError(f"min_token_count must be >= 1, got {min_token_count}")
        if vocab_size is not None and int(vocab_size) < 1:
            raise ValueError(f"vocab_size must be >= 1 or None, got {vocab_size}")
        self.model = model
        self.capacity_factor = capacity_factor
        self.priority = priority
        self.position_buckets = int(position_buckets)
        self.max_positions = int(max_positions)
        self.min_token_count = int(min_token_count)
        self.vocab_size = int(vocab_size) if vocab_size is not None else self._model_vocab(model)
        self._sites = find_moe_blocks(model)
        self.layers: List[str] = [site.name for site in self._sites]
        self._handles: List[Any] = []
        self._domains: Optional[torch.Tensor] = None
        self._domain_names: Optional[List[str]] = None
        self._context: Optional[Dict[str, Any]] = None
        self.last: List[RoutingRecord] = []
        self.stats = self._empty_stats()

    @staticmethod
    def _model_vocab(model: nn.Module) -> int:
        get = getattr(model, "get_input_embeddings", None)
        if callable(get):
            try:
                emb = get()
            except (NotImplementedError, AttributeError):
                emb = None
            weight = getattr(emb, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                return int(weight.shape[0])
        return 1  # grown to the largest id seen

    def _empty_stats(self) -> RoutingStats:
        return RoutingStats(
            layers=[LayerStats.empty(s.name, s.num_experts, s.top_k, self.vocab_size, self.max_positions,
                                     self.position_buckets) for s in self._sites],
            max_positions=self.max_positions, position_buckets=self.position_buckets,
            domain_names=list(self._domain_names) if self._domain_names else None)

    # -- lifecycle ------------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "RoutingProbe":
        if self._handles:
            raise RuntimeError("RoutingProbe is already attached")
        if not self._sites:
            raise ValueError(f"{type(self.model).__name__} has no MoE block the routing probe knows "
                             "(models.moe.SparseMoEBlock or a transformers *SparseMoeBlock with a top-k gate)")
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._root_post_hook, always_call=True))
        for index, site in enumerate(self._sites):
            self._handles.append(site.module.register_forward_hook(self._make_block_hook(index, site)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._context = None

    def __enter__(self) -> "RoutingProbe":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def set_domains(self, domain_ids: Optional[torch.Tensor], names: Optional[Sequence[str]] = None) -> None:
        """Domain labels ([B] or [B, S] integer, -1 = unlabelled) for the next forward(s), until changed."""
        if domain_ids is not None:
            domain_ids = torch.as_tensor(domain_ids)
            if domain_ids.dim() not in (1, 2) or domain_ids.is_floating_point() or domain_ids.is_complex():
                raise ValueError(f"domain_ids must be an integer tensor [B] or [B, S], got dtype {domain_ids.dtype} "
                                 f"shape {tuple(domain_ids.shape)}")
            domain_ids = domain_ids.detach().to("cpu", torch.long)
        self._domains = domain_ids
        if names is not None:
            self._domain_names = [str(n) for n in names]
            self.stats.domain_names = list(self._domain_names)

    def reset(self) -> None:
        """Forget every aggregate and the last records (hooks and domain labels stay)."""
        self.stats = self._empty_stats()
        self.last = []

    # -- hooks ----------------------------------------------------------------------------------------
    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]):
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids = args[0]
        if input_ids is None or input_ids.is_floating_point():
            raise ValueError("RoutingProbe needs the model to be called with integer input_ids (keyword or first "
                             "argument) to record token ids and positions")
        ids = input_ids.detach().to("cpu", torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"RoutingProbe: input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].shape == input_ids.shape:
            mask = args[1]
        if mask is not None:
            if mask.dim() == 1:
                mask = mask[None]
            if tuple(mask.shape) != tuple(ids.shape):  # e.g. a 4-D prepared mask: keep every token
                mask = None
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.detach().to("cpu") != 0
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 \
                and position_ids.shape[1] == ids.shape[1] and position_ids.shape[0] in (1, ids.shape[0]):
            positions = position_ids.detach().to("cpu", torch.long).expand_as(ids)  # e.g. generation with a cache
        else:
            positions = torch.cumsum(real.long(), dim=1) - 1
        domains = None
        if self._domains is not None:
            d = self._domains
            if d.dim() == 1:
                if d.shape[0] != ids.shape[0]:
                    raise ValueError(f"RoutingProbe: domain labels for {d.shape[0]} rows, batch has {ids.shape[0]}")
                d = d[:, None].expand_as(ids)
            elif tuple(d.shape) != tuple(ids.shape):
                raise ValueError(f"RoutingProbe: domain labels of shape {tuple(d.shape)}, batch is {tuple(ids.shape)}")
            domains = d.reshape(-1)
        flat_real = real.reshape(-1)
        self._context = {
            "num_tokens": ids.numel(),
            "real": flat_real,
            "token_ids": ids.reshape(-1)[flat_real],
            "positions": positions.reshape(-1)[flat_real],
            "domains": None if domains is None else domains[flat_real],
            "seen": set(),
            "finished": False,
        }
        self.last = []
        self.stats.n_forwards += 1
        return None

    def _root_post_hook(self, module: nn.Module, args: tuple, output: Any):
        if self._context is not None:
            self._context["finished"] = True
        self.last.sort(key=lambda r: r.layer)
        return None

    def _make_block_hook(self, index: int, site: _Site):
        def hook(module: nn.Module, args: tuple, output: Any):
            self._record(index, site, module, output)
            return None
        return hook

    def _record(self, index: int, site: _Site, module: nn.Module, output: Any) -> None:
        ctx = self._context
        if ctx is None:
            raise RuntimeError(f"RoutingProbe: MoE block {site.name!r} ran outside a forward of the probed "
                               f"{type(self.model).__name__}; attach the probe to the model you call")
        if ctx["finished"] or index in ctx["seen"]:
            return  # a re-run after/within the root forward (activation-checkpoint recomputation): not recorded
        ctx["seen"].add(index)
        if site.kind == "sparse":
            routing = module.last_routing
            experts, weights, dropped = routing["topk_indices"], routing["topk_weights"], routing["dropped"]
        else:
            _, weights, experts = output[0], output[1], output[2]
            dropped = None
        experts = experts.detach().to("cpu", torch.long)
        weights = weights.detach().to("cpu")
        if experts.shape[0] != ctx["num_tokens"]:
            raise RuntimeError(f"RoutingProbe: MoE block {site.name!r} routed {experts.shape[0]} tokens but the "
                               f"batch has {ctx['num_tokens']} (input_ids shape); cannot map tokens to routing")
        real = ctx["real"]
        experts, weights = experts[real], weights[real]
        if dropped is not None:
            dropped = dropped.detach().to("cpu", torch.bool)[real]
        elif self.capacity_factor is not None:
            dropped = capacity_drops(experts, ctx["positions"], site.num_experts, self.capacity_factor, self.priority)
        else:
            dropped = torch.zeros_like(experts, dtype=torch.bool)
        record = RoutingRecord(layer=index, token_ids=ctx["token_ids"], positions=ctx["positions"],
                               domains=ctx["domains"], experts=experts, weights=weights, dropped=dropped,
                               num_experts=site.num_experts)
        self.last.append(record)
        self.stats.layers[index].update(record.token_ids, record.positions, record.domains, experts, dropped,
                                        self.max_positions, self.position_buckets)


# ---------------------------------------------------------------------------------------------------
# Analyses


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
                    top_n: int = 10) -> Dict[str, Any]:
    """Every analysis of every probed layer as a JSON-serialisable dict (NaN -> None). With a tokenizer
    (anything with `decode([id])`) the top tokens per expert are also decoded."""
    layers: Dict[str, Any] = {}
    for i, layer in enumerate(stats.layers):
        top = top_tokens_per_expert(layer.counts_by_token, k=top_n)
        entry: Dict[str, Any] = {
            "num_experts": layer.num_experts, "top_k": layer.top_k, "n_tokens": layer.n_tokens,
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
