"""Routing probe for any MoE model, and the OpenMoE routing analyses.

`RoutingProbe(model).attach()` registers forward hooks on every MoE block of `model` and records, per real
token of every forward: token id, position, domain label (when set), the selected experts and weights,
and whether each assignment was dropped by capacity. It keeps `probe.last` (one `RoutingRecord` per MoE
layer for the most recent forward) and `probe.stats` (a `RoutingStats` of streaming aggregates whose size
does not depend on the number of forwards). `detach()` removes every hook.

Modules (the public names of the first four are re-exported here)
- `hooks`     `RoutingProbe`, `RoutingRecord`, `find_moe_blocks`: which MoE blocks are supported
              (`models.moe.SparseMoEBlock`, transformers 5.x `*SparseMoeBlock`s) and how tokens, positions,
              padding and re-runs are handled.
- `capacity`  `capacity_drops`, `PRIORITIES`, `DROP_ORDERS`: drops computed for dropless models from a
              capacity factor, and the drops of each OpenMoE drop order on a recorded routing.
- `stats`     `LayerStats`, `RoutingStats`, `position_bucket_edges`: the streaming aggregates.
- `analyses`  `token_id_specialisation`, `group_std_vs_uniform`, `top_tokens_per_expert`, `router_saturation`,
              `drop_rate_by_position`, `coactivation_probability`, `load_statistics`, `analysis_report`; the
              OpenMoE paper's `expert_ratio_std`, `distribution_distance`, `drop_order_rates`.
- `plots`     matplotlib figures of the analyses; imported on its own (`from models.routing_probe import
              plots`, or `models.routing_probe.plots` on first access) so the probe does not load matplotlib.

Plain PyTorch: no Lightning, no imports from `recipes/`. Hand-written because no maintained library records
per-token routing of arbitrary MoE implementations.
"""
from __future__ import annotations

import importlib
from typing import Any

from models.routing_probe.analyses import (
    analysis_report,
    coactivation_probability,
    distribution_distance,
    drop_order_rates,
    drop_rate_by_position,
    expert_ratio_std,
    group_std_vs_uniform,
    load_statistics,
    router_saturation,
    token_id_specialisation,
    top_tokens_per_expert,
)
from models.routing_probe.capacity import DEFAULT_GROUP, DROP_ORDERS, GROUPS, PRIORITIES, capacity_drops
from models.routing_probe.hooks import RoutingProbe, RoutingRecord, find_moe_blocks
from models.routing_probe.stats import LayerStats, RoutingStats, position_bucket_edges

__all__ = [
    "PRIORITIES", "DROP_ORDERS", "GROUPS", "DEFAULT_GROUP", "expert_ratio_std", "distribution_distance",
    "drop_order_rates", "RoutingRecord", "LayerStats", "RoutingStats", "RoutingProbe", "capacity_drops",
    "find_moe_blocks", "token_id_specialisation", "group_std_vs_uniform", "top_tokens_per_expert",
    "router_saturation", "drop_rate_by_position", "coactivation_probability", "load_statistics",
    "analysis_report", "position_bucket_edges",
]


def __getattr__(name: str) -> Any:
    # `models.routing_probe.plots` without importing matplotlib for every user of the probe.
    if name == "plots":
        return importlib.import_module("models.routing_probe.plots")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
