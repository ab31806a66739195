"""OpenMoE analysis: a tiny OpenMoE-style MoE and routing probes that measure token-id specialisation,
early routing learning and drop-towards-the-end on any MoE run (`make analyze RUN=...`). See README.md."""
from __future__ import annotations

from pathlib import Path

from recipes.engine.panels import Panel, moe_panels, routing_probe_panels
from recipes.engine.recipe import Recipe, register

from .analyze import main as analyze_main
from .module import OpenMoEModule, OpenMoERecipeConfig, check_config, prepare_model

HERE = Path(__file__).resolve().parent

# The figures `make analyze` writes (analyze.write_figures) and logs as W&B images analysis/<name>.
ANALYSIS_FIGURES = ("load_heatmap", "drop_rate", "drop_rate_by_order", "specialisation", "paper_specialisation",
                    "specialisation_over_steps", "early_routing", "saturation", "std_vs_uniform", "coactivation")
AFTER_ANALYZE = "after `make analyze RUN=<run_dir>`"
PANELS = (
    *moe_panels(),
    Panel("dropped assignments (evaluation capacity)", "line", ("val/moe_drop_fraction",), section="routing",
          note="validation, capacity factor 2.0"),
    Panel("dropped assignments at the last validation", "scalar", ("moe/val_drop_fraction",), section="routing"),
    *routing_probe_panels(optional=False),
    Panel("routing analysis of every checkpoint", "image", tuple(f"analysis/{f}" for f in ANALYSIS_FIGURES),
          files=("analysis/*.png",), section="analysis", optional=True,
          note=f"load heatmap, drop rate by position, specialisation, early routing, saturation ({AFTER_ANALYZE})"),
    Panel("specialisation after training (analysis)", "bar",
          ("analysis/specialisation_token_id", "analysis/specialisation_position", "analysis/specialisation_domain"),
          section="analysis", optional=True, note=f"W&B summary {AFTER_ANALYZE}; locally: the figures above"),
    Panel("drop rate, first vs last position bucket (analysis)", "bar",
          ("analysis/drop_rate_first_bucket", "analysis/drop_rate_last_bucket"), section="analysis", optional=True,
          note=f"W&B summary {AFTER_ANALYZE}"),
    Panel("saturation: agreement with the final routing (analysis)", "table", ("analysis/saturation_table",),
          section="analysis", optional=True, note=f"W&B table {AFTER_ANALYZE}"),
)

register(Recipe(
    name="openmoe", yaml=HERE / "openmoe.yaml", method="openmoe",
    description="tiny OpenMoE-style MoE (top-2, capacity 1.25/2.0, ColossalAI drop order), every checkpoint kept",
    sections={"openmoe": OpenMoERecipeConfig}, validate=check_config, prepare_model=prepare_model,
    module_cls=OpenMoEModule, zero3_deferred=False, metric_prefixes=("moe/", "analysis/"),
    commands={"analyze": analyze_main}, panels=PANELS))
