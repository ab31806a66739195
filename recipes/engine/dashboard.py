"""`make dashboard RECIPE=<name> [PROJECT=<project>]`: a recipe's panels as a W&B workspace.

    python -m recipes dashboard <recipe> [--project P] [--entity E] [--out FILE] [--offline] [key=value ...]
    python -m recipes dashboard <spec.json> [--project P] [--entity E]      (push a spec written offline)

The spec is built without any network access: a plain dict (`build_spec`) of sections and panels, each panel
a wandb_workspaces panel class name and its arguments, from the recipe's panels (recipes/engine/panels.py).
The runs shown are those tagged with the recipe's method (its sub-runs and sibling recipes included, e.g. the
from-scratch `tokenformer` runs next to `tokenformer_grow`; plus the `analyze` runs of a recipe with that command);
the engine's own recipes filter on their name.

Online (logged in to W&B, its server reachable within a couple of seconds) the spec becomes a
wandb_workspaces Workspace and is saved; its URL is printed. Otherwise the spec is written to
dashboards/<recipe>.json (or --out) with the command that pushes it from a machine with network. Overrides
(`key=value`) change the config the panels follow from (e.g. data.domains, fusechat.sources).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

from .errors import ConfigError
from .panels import TOKENS, Panel, panels_for, wandb_regex

SPEC_FORMAT = "lm-recipes-dashboard/1"
DEFAULT_DIR = Path("dashboards")
CONNECT_TIMEOUT_S = 2.0


# ------------------------------------------------------------------------------------------ the spec


def wandb_panel(panel: Panel) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(wandb_workspaces.reports.v2 class name, its keyword arguments) of a panel; None when W&B has no data
    for it (report-only panels, tables and images without logged W&B keys)."""
    if not panel.in_wandb:
        return None
    keys = list(panel.keys)
    if panel.kind in ("line", "heatmap"):
        args: Dict[str, Any] = {"title": panel.title, "x": panel.x, "title_x": _axis_title(panel.x)}
        if any("*" in k for k in keys):
            args.update(y=[], metric_regex=wandb_regex(keys))
        else:
            args["y"] = keys
        if panel.log_y:
            args["log_y"] = True
        return "LinePlot", args
    if panel.kind == "bar":
        return "BarPlot", {"title": panel.title, "metrics": keys, "orientation": "v"}
    if panel.kind == "scalar":
        return "ScalarChart", {"title": panel.title, "metric": keys[0]}
    if panel.kind == "image":
        return "MediaBrowser", {"title": panel.title, "media_keys": keys, "num_columns": min(len(keys), 3)}
    return "WeavePanelSummaryTable", {"table_name": keys[0]}  # table


def _axis_title(x: str) -> str:
    return "tokens seen" if x == TOKENS else x


def _wandb_entries(panel: Panel) -> List[Tuple[str, Dict[str, Any]]]:
    """A table panel with several W&B tables becomes one W&B panel per table."""
    if panel.kind == "table" and panel.in_wandb and len(panel.keys) > 1:
        return [("WeavePanelSummaryTable", {"table_name": k}) for k in panel.keys]
    entry = wandb_panel(panel)
    return [entry] if entry else []


def run_filter_tags(recipe_name: str) -> List[str]:
    """The W&B tags whose runs the workspace shows: the recipe's method (all its recipes and their sub-runs);
    the engine's own recipes (whose method tag every sub-run of `tiny` carries) their own name."""
    from .recipe import get_recipe

    recipe = get_recipe(recipe_name)
    tags = [recipe.name] if recipe.method == "engine" else [recipe.method]
    if "analyze" in recipe.commands:  # `make analyze` logs to a W&B run of its own, tagged "analyze"
        tags.append("analyze")
    return tags


def build_spec(recipe_name: str, project: Optional[str] = None, entity: Optional[str] = None,
               overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The workspace of a recipe as a JSON-ready dict (no network): sections in the order of their first panel,
    then a section comparing the runs' configs and summaries."""
    from .config import load_config

    cfg = load_config(recipe_name, list(overrides))
    panels = panels_for(recipe_name, cfg)
    sections: Dict[str, List[Dict[str, Any]]] = {}
    left_out: List[str] = []
    for panel in panels:
        entries = _wandb_entries(panel)
        if not entries:
            left_out.append(panel.title)
        for cls, args in entries:
            sections.setdefault(panel.section, []).append({"type": cls, "args": args, "panel": panel.to_dict()})
    sections["runs"] = [{"type": "RunComparer", "args": {"diff_only": "split"}, "panel": None}]
    return {
        "format": SPEC_FORMAT, "recipe": recipe_name, "name": f"lm-recipes: {recipe_name}",
        "project": project or cfg.logging.project, "entity": entity or cfg.logging.entity,
        "x_axis": TOKENS, "tags": run_filter_tags(recipe_name),
        "sections": [{"name": name, "panels": entries} for name, entries in sections.items()],
        "report_only": left_out,
    }


def to_workspace(spec: Dict[str, Any], entity: str):
    """A wandb_workspaces Workspace from a spec (constructing it does not contact the server)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    sections = []
    for i, section in enumerate(spec["sections"]):
        panels = [getattr(wr, p["type"])(**p["args"]) for p in section["panels"]]
        sections.append(ws.Section(name=section["name"], panels=panels, is_open=i < 3))
    return ws.Workspace(
        entity=entity, project=spec["project"], name=spec["name"], sections=sections,
        settings=ws.WorkspaceSettings(x_axis=spec["x_axis"]),
        runset_settings=ws.RunsetSettings(filters=[ws.Tags().isin(list(spec["tags"]))]))


def read_spec(path: Path) -> Dict[str, Any]:
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"Cannot read the dashboard spec {path}: {e}") from None
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ConfigError(f"{path} is not a dashboard spec written by `make dashboard` (format {SPEC_FORMAT}).")
    return spec


def write_spec(spec: Dict[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(spec, indent=1) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ online or not


def wandb_reachable(timeout_s: float = CONNECT_TIMEOUT_S) -> Tuple[bool, str]:
    """(True, "") when this machine can save a workspace: W&B not switched off, an API key, and the server
    answering a TCP connection within `timeout_s`; else (False, why). Never waits longer than that."""
    from .logs import wandb_logged_in

    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "dryrun", "disabled"):
        return False, f"WANDB_MODE={mode}"
    if not wandb_logged_in():
        return False, "not logged in to W&B (no WANDB_API_KEY, no wandb entry in ~/.netrc: `wandb login`)"
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host = url.hostname or "api.wandb.ai"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return False, f"the W&B server {host}:{port} is not reachable ({e.strerror or type(e).__name__})"
    return True, ""


def push(spec: Dict[str, Any], entity: Optional[str] = None) -> str:
    """Save the spec as a W&B workspace; returns its URL. Needs network and a W&B login."""
    import wandb

    entity = entity or spec.get("entity") or wandb.Api().default_entity
    if not entity:
        raise ConfigError("No W&B entity: give --entity (or logging.entity=...).")
    workspace = to_workspace(spec, entity)
    workspace.save()
    return workspace.url


def _push_hint(spec: Dict[str, Any], out: Path) -> str:
    recipe = spec["recipe"]
    project = f" PROJECT={spec['project']}" if spec["project"] != "lm-recipes" else ""
    return (f"push it from a machine with network and a W&B login: `make dashboard RECIPE={recipe}{project}` "
            f"(rebuilds it), or `python -m recipes dashboard {out}` (this file)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recipes dashboard",
        description="Build a recipe's W&B workspace; saved when W&B is reachable, else written as a JSON spec.")
    parser.add_argument("target", help="a recipe name, or a spec .json written earlier (to push it)")
    parser.add_argument("--project", default=None, help="W&B project (default: the recipe's logging.project)")
    parser.add_argument("--entity", default=None, help="W&B entity (default: logging.entity, else your default)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where the spec is written when offline (default: {DEFAULT_DIR}/<recipe>.json)")
    parser.add_argument("--offline", action="store_true", help="only write the spec, do not contact W&B")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value the panels follow from")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.target.endswith(".json"):
            if args.overrides:
                raise ConfigError("Overrides apply to a recipe name, not to a saved spec.")
            spec = read_spec(Path(args.target))
            spec["project"] = args.project or spec["project"]
            spec["entity"] = args.entity or spec.get("entity")
        else:
            spec = build_spec(args.target, args.project, args.entity, args.overrides)
        out = args.out or DEFAULT_DIR / f"{spec['recipe']}.json"
        online, why = (False, "--offline") if args.offline else wandb_reachable()
        failed = False
        if online:
            try:
                url = push(spec, args.entity)
            except ConfigError:
                raise
            except Exception as e:  # the server refused, a timeout, ...: keep the spec
                failed, why = True, f"saving the workspace failed ({type(e).__name__}: {e})"
            else:
                print(f"workspace saved: {url}")
                return 0
        path = write_spec(spec, out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    panels = sum(len(s["panels"]) for s in spec["sections"])
    print(f"W&B not used: {why}.")
    print(f"workspace spec ({panels} panels, project {spec['project']}) written to {path}")
    print(_push_hint(spec, path))
    return 1 if failed else 0
