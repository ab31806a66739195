"""Panels as data: what a researcher looks at for each recipe, described once and rendered twice.

A `Panel` names metric keys and how to show them. `python -m recipes dashboard <recipe>` turns a recipe's
panels into a W&B workspace (recipes/engine/dashboard.py); `python -m recipes report <run_dir>` renders the
same panels from the run's metrics.csv and summary.json into PNGs and one HTML page (recipes/engine/report.py).

Every recipe gets `common_panels()` (losses against tokens, throughput, MFU and GPU memory); a recipe adds its
own through `Recipe.panels`: a sequence of Panels, or a callable `(cfg) -> panels` for panels whose keys follow
from the config (e.g. one bar per FuseChat model, the 0..k true-expert shares of AdaMoE).

Where the keys are read from, by kind:

  line     history (metrics.csv rows / W&B history): the keys against `x` (train/tokens_seen by default)
  heatmap  history, the last row holding the key: a key with two `*` (e.g. moe/load/l*_e*) -> rows x columns
  bar      summary (summary.json / W&B run summary): one bar per key
  scalar   summary: one number
  table    summary.json entry `table` ({row: {column: value}}, dotted path); in W&B the wandb.Tables `keys`
  image    files under the run directory (`files`, globs); in W&B the logged images `keys`

A key may hold `*` wildcards (val/loss_*: one series per domain). Keys of bar and scalar panels are concrete
(W&B bar charts take metric names, not patterns). A run's data is its own directory plus its sub-runs (the
direct subdirectories that hold a metrics.csv or summary.json: the stages of staged recipes), which are W&B
runs of their own tagged with the recipe.

`optional` marks keys that exist only in some runs: MFU and GPU memory on GPUs, the routing probe when it is
enabled, `make analyze` output. `local_only` marks panels whose data no W&B run carries (left out of the
workspace, rendered by the report).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Tuple

TOKENS = "train/tokens_seen"
KINDS = ("line", "heatmap", "bar", "scalar", "table", "image")
HISTORY_KINDS = ("line", "heatmap")
SUMMARY_KINDS = ("bar", "scalar")


@dataclass(frozen=True)
class Panel:
    """One panel: a title, a kind (KINDS), the metric keys it shows and where they come from."""

    title: str
    kind: str
    keys: Tuple[str, ...] = ()
    section: str = "losses"
    x: str = TOKENS  # line: the x-axis (a history key)
    optional: bool = False  # the keys exist only in some runs (GPU, routing probe on, after `make analyze`)
    local_only: bool = False  # no W&B run carries the data: report only
    note: str = ""  # one line shown under the panel (report) and in docs/dashboards.md
    x_offset: Optional[str] = None  # line: a summary key added to x (tokens of the run a grown run started from)
    related_run: Optional[str] = None  # line: a config key naming another run directory drawn alongside (report)
    table: Optional[str] = None  # table: dotted path of a {row: {column: value}} entry of summary.json
    files: Tuple[str, ...] = ()  # image: globs under the run directory (report)
    log_y: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "files", tuple(self.files))
        if self.kind not in KINDS:
            raise ValueError(f"panel '{self.title}': kind must be one of {', '.join(KINDS)}, got '{self.kind}'")
        if self.kind in HISTORY_KINDS + SUMMARY_KINDS and not self.keys:
            raise ValueError(f"panel '{self.title}': a {self.kind} panel needs at least one key")
        if self.kind in SUMMARY_KINDS and any("*" in k for k in self.keys):
            raise ValueError(f"panel '{self.title}': {self.kind} keys must be concrete (no '*'): {self.keys}")
        if self.kind == "scalar" and len(self.keys) != 1:
            raise ValueError(f"panel '{self.title}': a scalar panel shows exactly one key")
        if self.kind == "heatmap" and any(k.count("*") != 2 for k in self.keys):
            raise ValueError(f"panel '{self.title}': a heatmap key has two '*' (rows, columns): {self.keys}")
        if self.kind == "table" and not (self.table or self.keys):
            raise ValueError(f"panel '{self.title}': a table panel needs a summary path `table` or W&B keys")
        if self.kind == "image" and not (self.files or self.keys):
            raise ValueError(f"panel '{self.title}': an image panel needs `files` or W&B keys")

    @property
    def source(self) -> str:
        """Where the report reads the panel's data: history, summary, table or files."""
        if self.kind in HISTORY_KINDS:
            return "history"
        if self.kind in SUMMARY_KINDS:
            return "summary"
        return "table" if self.kind == "table" else "files"

    @property
    def in_wandb(self) -> bool:
        """Whether the W&B workspace shows the panel (tables and images need logged W&B keys)."""
        return not self.local_only and bool(self.keys)

    def to_dict(self) -> dict:
        out = {"title": self.title, "kind": self.kind, "keys": list(self.keys), "section": self.section}
        if self.kind == "line":
            out["x"] = self.x
        for name in ("optional", "local_only", "log_y"):
            if getattr(self, name):
                out[name] = True
        for name in ("note", "x_offset", "related_run", "table"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.files:
            out["files"] = list(self.files)
        return out


# ------------------------------------------------------------------------------------------ key patterns


def matches(pattern: str, keys: Iterable[str]) -> List[str]:
    """The keys a pattern names, in sorted order ('*' matches any text, other characters themselves)."""
    if "*" not in pattern:
        return [pattern] if pattern in set(keys) else []
    rx = pattern_regex(pattern)
    return sorted(k for k in set(keys) if rx.fullmatch(k))


def pattern_regex(pattern: str) -> "re.Pattern[str]":
    """A compiled regular expression for a key pattern; each '*' is a capturing group."""
    return re.compile("".join("(.*?)" if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern)))


def wandb_regex(patterns: Sequence[str]) -> str:
    """One regular expression (W&B `metric_regex`) that matches every key of the patterns."""
    alternatives = ["".join(".*" if p == "*" else re.escape(p) for p in re.split(r"(\*)", pat)) for pat in patterns]
    return "^(" + "|".join(alternatives) + ")$"


def has_match(pattern: str, keys: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(k, pattern) for k in keys) if "*" in pattern else pattern in set(keys)


# ------------------------------------------------------------------------------------------ shared panels


def common_panels() -> List[Panel]:
    """Every recipe's panels: losses per domain against tokens, throughput, MFU, GPU memory."""
    return [
        Panel("training loss", "line", ("train/loss",), section="losses"),
        Panel("validation loss", "line", ("val/loss",), section="losses"),
        Panel("validation loss per domain", "line", ("val/loss_*",), section="losses",
              note="one line per domain of data.domains"),
        Panel("learning rate", "line", ("train/lr",), section="losses"),
        Panel("tokens per second", "line", ("perf/tokens_per_sec",), section="throughput"),
        Panel("share of wall time outside the training step", "line", ("perf/overhead_frac",),
              section="throughput", note="data loading, logging, checkpointing"),
        Panel("model TFLOP/s per device", "line", ("perf/tflops",), section="throughput", optional=True,
              note="when the model's FLOPs per token are known (models.factory.flops_per_token)"),
        Panel("model FLOPs utilisation", "line", ("perf/mfu",), section="throughput", optional=True,
              note="GPU runs only: needs the device's peak FLOP/s (else set logging.peak_flops)"),
        Panel("GPU memory", "line", ("perf/gpu_mem_*",), section="throughput", optional=True,
              note="GPU runs only: peak allocated / reserved GiB so far"),
        Panel("mean tokens per second", "scalar", ("perf/tokens_per_sec_mean",), section="throughput"),
        Panel("parameters", "scalar", ("num_parameters",), section="throughput"),
    ]


def moe_panels(optional: bool = False) -> List[Panel]:
    """Routing metrics that an MoE module logs every step (models.moe.metrics via its extra_metrics)."""
    return [
        Panel("router entropy", "line", ("moe/router_entropy",), section="routing", optional=optional,
              note="nats, softmax over all experts"),
        Panel("load-balancing and router z-loss (unweighted)", "line", ("moe/aux_loss", "moe/z_loss"),
              section="routing", optional=optional),
        Panel("expert load per layer (last logged step)", "heatmap", ("moe/load/l*_e*",), section="routing",
              optional=optional, note="share of the layer's selections per expert; W&B: one line per expert"),
        Panel("dropped assignments (training capacity)", "line", ("moe/drop_fraction",), section="routing",
              optional=optional),
    ]


def routing_probe_panels(optional: bool = True) -> List[Panel]:
    """The routing probe's scalars (recipes/engine/routing_callback.py; on with routing_probe.enabled=true)."""
    when = "; with routing_probe.enabled=true" if optional else ""
    section = "routing probe"
    return [
        Panel("specialisation: share routed to the modal expert", "line",
              ("moe/specialisation_token_id", "moe/specialisation_position"), section=section, optional=optional,
              note="by token id and by position" + when),
        Panel("drop rate by the probe", "line", ("moe/drop_rate", "moe/drop_rate_token", "moe/drop_rate_last_bucket"),
              section=section, optional=optional, note="per assignment, per token, last position bucket" + when),
        Panel("load saturation: max load over ideal", "line", ("moe/load_max_over_ideal", "moe/load_std"),
              section=section, optional=optional, note="worst layer; mean std of expert shares" + when),
        Panel("probe figures: load heatmap, drop rate by position", "image",
              ("moe_probe/load_heatmap", "moe_probe/drop_rate"), files=("analysis/steps/*.png",), section=section,
              optional=True, note="W&B images when a W&B logger is attached; files with routing_probe.save_pngs=true"),
    ]


# ------------------------------------------------------------------------------------------ per recipe


def recipe_panels(recipe: Any, cfg: Any = None) -> List[Panel]:
    """A recipe's own panels (Recipe.panels: a sequence, or a callable of the config). `cfg`: the config the
    panels are for (a run's saved config.yaml, or a resolved config); the recipe's defaults when None."""
    if not callable(recipe.panels):
        return list(recipe.panels or ())
    if cfg is None:
        from .config import load_config

        cfg = load_config(recipe.name, [])
    return list(recipe.panels(cfg) or ())


def panels_for(recipe_name: str, cfg: Any = None) -> List[Panel]:
    """All panels of a recipe: the common ones, then its own (for `cfg`, see recipe_panels)."""
    from .recipe import get_recipe

    panels = common_panels() + recipe_panels(get_recipe(recipe_name), cfg)
    titles = [p.title for p in panels]
    dup = sorted({t for t in titles if titles.count(t) > 1})
    if dup:
        raise ValueError(f"recipe '{recipe_name}': panel titles must be unique, repeated: {', '.join(dup)}")
    return panels


def markdown_table(recipe_name: str, cfg: Any = None, own_only: bool = True) -> str:
    """The panels of a recipe as a Markdown table (docs/dashboards.md)."""
    from .recipe import get_recipe

    panels = recipe_panels(get_recipe(recipe_name), cfg) if own_only else panels_for(recipe_name, cfg)
    lines = ["| panel | kind | keys | notes |", "|---|---|---|---|"]
    for p in panels:
        keys = ", ".join(f"`{k}`" for k in p.keys) or "-"
        if p.table:
            keys += f" (summary.json `{p.table}`)"
        if p.files:
            keys += " (files " + ", ".join(f"`{f}`" for f in p.files) + ")"
        flags = [f for f, on in (("optional", p.optional), ("report only", p.local_only)) if on]
        notes = "; ".join(flags + ([p.note] if p.note else []))
        lines.append(f"| {p.title} | {p.kind} | {keys} | {notes} |")
    return "\n".join(lines)
