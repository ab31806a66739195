"""The engine's own recipes: the plain backbone (`tiny`) and a plain MoE (`tiny_moe`), and the engine's
config sections that every recipe has (`routing_probe`)."""
from __future__ import annotations

from .panels import Panel, routing_probe_panels
from .recipe import ENGINE_DIR, Recipe, register, register_engine_section
from .routing_callback import RoutingProbeConfig, check_config

register_engine_section("routing_probe", RoutingProbeConfig, lambda cfg: check_config(cfg.routing_probe))

register(Recipe(name="tiny", yaml=ENGINE_DIR / "tiny.yaml", method="engine",
                description="the Llama-style backbone, trained from scratch on the embedded corpus"))
register(Recipe(name="tiny_moe", yaml=ENGINE_DIR / "tiny_moe.yaml", method="engine",
                description="a plain Mixtral-style MoE (top-2), the baseline of the MoE methods",
                metric_prefixes=("moe/",),
                panels=(Panel("load-balancing loss (weighted)", "line", ("train/aux_loss",), section="routing",
                              note="router_aux_loss_coef x the model's auxiliary loss"),
                        *routing_probe_panels(optional=True))))
