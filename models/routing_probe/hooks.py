"""The routing probe's hooks: finding the MoE blocks of a model, attaching / detaching forward hooks on
them, and turning what they route into `RoutingRecord`s and `RoutingStats` updates.

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
  `(router_logits [T, E], top-k weights [T, k], top-k indices [T, k])`. These models are dropless; with a
  `capacity_factor` their drops are computed by `models.routing_probe.capacity.capacity_drops` (`priority`:
  position, slot or one of the drop orders colossalai / slot_major / token_major; `capacity_group`).

Token ids and positions come from a forward pre-hook on the root model (`input_ids` keyword or first
positional argument; `attention_mask` keyword). Padding (attention_mask == 0) is excluded everywhere: a
record holds only the T real tokens of the batch, batch-major. The position of a real token is the number
of real tokens before it in its row (= index within the sequence for right-padded or unpadded batches; left
padding does not shift positions); a `position_ids` keyword [B, S] or [1, S] is used instead when given
(generation with a KV cache). Positions >= `max_positions` are counted in the last position row and bucket.
If a block runs more than once per root forward, or after the root forward returned (activation-checkpoint
recomputation during backward), only its first run is recorded.

Plain PyTorch: no Lightning, no imports from `recipes/`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from models.routing_probe.capacity import GROUPS, PRIORITIES, capacity_drops
from models.routing_probe.stats import LayerStats, RoutingStats


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
    drop themselves always report their real drops. priority: one of `PRIORITIES` ("position", "slot",
    "colossalai", "slot_major", "token_major"; see `capacity_drops`); capacity_group: "batch" | "sequence" |
    None (the priority's own group).
    position_buckets / max_positions: drop-rate buckets are equal-width over [0, max_positions).
    min_token_count: default occurrence threshold of the token-id analyses (`analysis_report`).
    vocab_size: rows of counts_by_token (default: the model's input-embedding size, else grown to the ids seen).
    """

    def __init__(self, model: nn.Module, *, capacity_factor: Optional[float] = None, priority: str = "position",
                 position_buckets: int = 8, max_positions: int = 4096, min_token_count: int = 5,
                 vocab_size: Optional[int] = None, capacity_group: Optional[str] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"RoutingProbe needs a torch.nn.Module, got {type(model).__name__}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {list(PRIORITIES)}, got {priority!r}")
        if capacity_group is not None and capacity_group not in GROUPS:
            raise ValueError(f"capacity_group must be one of {list(GROUPS)} or None, got {capacity_group!r}")
        if capacity_group == "sequence" and priority in ("position", "slot"):
            raise ValueError(f"priority {priority!r} ranks over the whole batch; capacity_group='sequence' needs "
                             "a drop order (colossalai, slot_major, token_major)")
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
        self.capacity_group = capacity_group
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
        rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
        self._context = {
            "num_tokens": ids.numel(),
            "real": flat_real,
            "token_ids": ids.reshape(-1)[flat_real],
            "positions": positions.reshape(-1)[flat_real],
            "rows": rows.reshape(-1)[flat_real],
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
            dropped = capacity_drops(experts, ctx["positions"], site.num_experts, self.capacity_factor, self.priority,
                                     rows=ctx["rows"], group=self.capacity_group)
        else:
            dropped = torch.zeros_like(experts, dtype=torch.bool)
        record = RoutingRecord(layer=index, token_ids=ctx["token_ids"], positions=ctx["positions"],
                               domains=ctx["domains"], experts=experts, weights=weights, dropped=dropped,
                               num_experts=site.num_experts)
        self.last.append(record)
        self.stats.layers[index].update(record.token_ids, record.positions, record.domains, experts, dropped,
                                        self.max_positions, self.position_buckets)
