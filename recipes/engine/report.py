"""`make report RUN=<run_dir>`: a run's panels as PNGs and one HTML page, from its files alone (no W&B).

    python -m recipes report <run_dir> [--out DIR] [--compare RUN_DIR ...]

The panels are the recipe's (recipes/engine/panels.py), as in `make dashboard`. The data: the run's
metrics.csv (recipes.engine.logs.read_metrics) and summary.json, and those of its sub-runs (the direct
subdirectories holding either: the stages of staged recipes), each drawn as a series of its own. Runs given
with --compare are drawn alongside (e.g. a from-scratch run next to a grown TokenFormer). Writes
<run_dir>/report/ (or --out): one PNG per panel with data (matplotlib, Agg), images the run produced
(copied), and report.html with the panels, their notes, the tables and the summary numbers. A panel whose
keys the run lacks is skipped with a note (optional panels say why they may be absent).
"""
from __future__ import annotations

import argparse
import html
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import ConfigError
from .panels import TOKENS, Panel, matches, panels_for, pattern_regex

MAX_SUMMARY_ROWS = 400


@dataclass
class RunData:
    """One series: a run directory's metrics rows and summary."""

    label: str
    path: Path
    rows: List[Dict[str, Any]] = field(default_factory=list)
    summary: Dict[str, Any] = field(default_factory=dict)
    dashed: bool = False  # a related or compared run

    @property
    def history_keys(self) -> List[str]:
        return sorted({k for row in self.rows for k, v in row.items() if v is not None and k != "step"})


@dataclass
class Rendered:
    """What became of one panel: a PNG, an HTML fragment, or a skip note."""

    panel: Panel
    png: Optional[Path] = None
    html: str = ""
    images: List[Path] = field(default_factory=list)
    skipped: str = ""  # why nothing was drawn
    missing: List[str] = field(default_factory=list)  # keys absent although the panel was drawn


# ------------------------------------------------------------------------------------------ reading a run


def read_run(path: Path, label: Optional[str] = None, dashed: bool = False) -> RunData:
    from .logs import read_metrics

    path = Path(path)
    data = RunData(label or path.name, path, dashed=dashed)
    if (path / "metrics.csv").is_file():
        data.rows = read_metrics(path / "metrics.csv")
    if (path / "summary.json").is_file():
        try:
            data.summary = json.loads((path / "summary.json").read_text())
        except ValueError:
            data.summary = {}
    return data


def sub_run_dirs(run_dir: Path) -> List[Path]:
    """The direct subdirectories of a run that are runs themselves (a metrics.csv or summary.json)."""
    return sorted(p for p in Path(run_dir).iterdir()
                  if p.is_dir() and ((p / "metrics.csv").is_file() or (p / "summary.json").is_file()))


def load_runs(run_dir: Path, compare: Sequence[Path] = ()) -> Tuple[RunData, List[RunData]]:
    """(the run itself, every series to draw: the run if it has metrics, its sub-runs, the compared runs)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"Run directory {run_dir} does not exist.")
    own = read_run(run_dir)
    subs = [read_run(p) for p in sub_run_dirs(run_dir)]
    if not own.rows and not own.summary and not subs:
        raise ConfigError(f"{run_dir} holds no metrics.csv or summary.json (nor do its subdirectories): is it a run "
                          "directory?")
    series = ([own] if own.rows else []) + subs
    for other in compare:
        if not Path(other).is_dir():
            raise ConfigError(f"--compare {other}: no such run directory.")
        series.append(read_run(Path(other), label=f"compare: {Path(other).name}", dashed=True))
    return own, series


def run_recipe(run_dir: Path, own: RunData):
    """(recipe name, the run's saved config or None) of a run directory."""
    from .runs import load_run_config

    cfg = None
    if (Path(run_dir) / "config.yaml").is_file():
        cfg = load_run_config(run_dir)
    name = (cfg.run.name if cfg is not None else None) or own.summary.get("recipe")
    if not name:
        raise ConfigError(f"{run_dir}: cannot tell the recipe (no config.yaml, no 'recipe' in summary.json).")
    return str(name), cfg


def config_value(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return None
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
    return node


def summary_path(summary: Dict[str, Any], dotted: str) -> Any:
    """An entry of summary.json by dotted path ("merge.evaluation.val_loss"); None when absent."""
    node: Any = summary
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# ------------------------------------------------------------------------------------------ panel data


Curve = Tuple[str, RunData, List[float], List[float]]


def line_series(panel: Panel, runs: Sequence[RunData]) -> Tuple[List[Curve], List[str]]:
    """The curves of a line panel: (key, run, xs, ys) for every key matched in every run with data, and the
    patterns no run has. x is the panel's x key plus, per run, its `x_offset` summary value (0 if absent)."""
    curves = []
    found = set()
    for run in runs:
        available = run.history_keys
        offset = _x_offset(panel, run)
        for pattern in panel.keys:
            for key in matches(pattern, available):
                xs, ys = [], []
                for row in run.rows:
                    x, y = row.get(panel.x), row.get(key)
                    if x is not None and y is not None and math.isfinite(y):
                        xs.append(x + offset)
                        ys.append(y)
                if xs:
                    curves.append((key, run, xs, ys))
                    found.add(pattern)
    return curves, [p for p in panel.keys if p not in found]


def _x_offset(panel: Panel, run: RunData) -> float:
    if not panel.x_offset:
        return 0.0
    value = run.summary.get(panel.x_offset)
    if value is None:  # a run cut short: the first logged value
        value = next((r[panel.x_offset] for r in run.rows if r.get(panel.x_offset) is not None), None)
    return float(value or 0.0)


Heatmap = Tuple[int, List[int], List[int], List[List[float]]]


def heatmap_matrix(pattern: str, run: RunData) -> Optional[Heatmap]:
    """(step, row ids, column ids, matrix) of a two-wildcard key pattern from the last row of `run` that holds
    it: rows and columns are the integers the wildcards match (moe/load/l{layer}_e{expert}), in numeric order."""
    rx = pattern_regex(pattern)
    for row in reversed(run.rows):
        cells = {}
        for key, value in row.items():
            m = rx.fullmatch(key) if value is not None else None
            if m and all(g.isdigit() for g in m.groups()):
                cells[(int(m.group(1)), int(m.group(2)))] = value
        if cells:
            rows = sorted({r for r, _ in cells})
            cols = sorted({c for _, c in cells})
            return int(row["step"]), rows, cols, [[cells.get((r, c), math.nan) for c in cols] for r in rows]
    return None


def summary_values(panel: Panel, runs: Sequence[RunData]) -> Tuple[List[Tuple[RunData, Dict[str, float]]],
                                                                    List[str]]:
    """The numbers of a bar / scalar panel: per run (in order) the panel's keys it has, and the keys no run has."""
    out = []
    found = set()
    for run in runs:
        values = {k: run.summary[k] for k in panel.keys
                  if isinstance(run.summary.get(k), (int, float)) and not isinstance(run.summary.get(k), bool)}
        if values:
            out.append((run, values))
            found |= set(values)
    return out, [k for k in panel.keys if k not in found]


# ------------------------------------------------------------------------------------------ rendering


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "panel"


def _figure(width: float = 6.4, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height), dpi=110)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _short_labels(keys: Sequence[str]) -> List[str]:
    """Keys without their common prefix (fusechat/val_loss/pivot/all -> pivot/all)."""
    if len(keys) < 2:
        return list(keys)
    prefix = keys[0]
    for k in keys[1:]:
        while not k.startswith(prefix):
            prefix = prefix[:-1]
    cut = prefix.rfind("/") + 1 if "/" in prefix else len(prefix)
    return [k[cut:] or k for k in keys]


def render_line(panel: Panel, runs: Sequence[RunData], path: Path) -> Rendered:
    curves, missing = line_series(panel, runs)
    if not curves:
        return Rendered(panel, skipped=_absent(panel, missing, "metrics.csv"))
    plt, fig, ax = _figure()
    several_runs = len({id(run) for _, run, _, _ in curves}) > 1
    for key, run, xs, ys in curves:
        label = f"{key} [{run.label}]" if several_runs else key
        ax.plot(xs, ys, label=label, linestyle="--" if run.dashed else "-", marker="o" if len(xs) <= 12 else None,
                markersize=3)
    ax.set_xlabel("tokens seen" + (" (with the source run's)" if panel.x_offset else "") if panel.x == TOKENS
                  else panel.x)
    if panel.log_y:
        ax.set_yscale("log")
    ax.set_title(panel.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(curves) > 8 else 1)
    return Rendered(panel, png=_save(plt, fig, path), missing=missing)


def render_heatmap(panel: Panel, runs: Sequence[RunData], path: Path) -> Rendered:
    for run in runs:
        found = heatmap_matrix(panel.keys[0], run)
        if found is None:
            continue
        step, row_ids, col_ids, matrix = found
        plt, fig, ax = _figure(max(4.0, 0.35 * len(col_ids) + 2.0), max(2.4, 0.45 * len(row_ids) + 1.4))
        im = ax.imshow(matrix, aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax, fraction=0.04)
        ax.set_xticks(range(len(col_ids)), [str(c) for c in col_ids], fontsize=7)
        ax.set_yticks(range(len(row_ids)), [str(r) for r in row_ids], fontsize=7)
        ax.set_xlabel("expert" if "_e*" in panel.keys[0] else "column")
        ax.set_ylabel("layer" if "/l*" in panel.keys[0] else "row")
        ax.set_title(f"{panel.title}: {run.label}, step {step}", fontsize=9)
        return Rendered(panel, png=_save(plt, fig, path))
    return Rendered(panel, skipped=_absent(panel, list(panel.keys), "metrics.csv"))


def render_bar(panel: Panel, runs: Sequence[RunData], path: Path) -> Rendered:
    values, missing = summary_values(panel, runs)
    if not values:
        return Rendered(panel, skipped=_absent(panel, missing, "summary.json"))
    keys = [k for k in panel.keys if k not in missing]
    labels = _short_labels(keys)
    plt, fig, ax = _figure(max(5.0, 0.7 * len(keys) * len(values) + 2.0), 3.6)
    width = 0.8 / len(values)
    for i, (run, vals) in enumerate(values):
        xs = [j + (i - (len(values) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, [vals.get(k, math.nan) for k in keys], width, label=run.label,
                      hatch="//" if run.dashed else None)
        ax.bar_label(bars, fmt="%.4g", fontsize=6)
    long = max(len(s) for s in labels) > 12
    ax.set_xticks(range(len(keys)), labels, rotation=30 if long else 0, ha="right" if long else "center", fontsize=7)
    numbers = [v for _, vals in values for v in vals.values() if math.isfinite(v)]
    low, high = (min(numbers), max(numbers)) if numbers else (0.0, 0.0)
    if low > 0 and low / high > 0.8:  # close positive values (losses): zoom in so that differences show
        ax.set_ylim(max(0.0, low - (high - low) - 0.01 * high), high + 0.5 * (high - low) + 0.01 * high)
    ax.set_title(panel.title, fontsize=10)
    if len(values) > 1:
        ax.legend(fontsize=6)
    return Rendered(panel, png=_save(plt, fig, path), missing=missing)


def render_scalar(panel: Panel, runs: Sequence[RunData]) -> Rendered:
    values, missing = summary_values(panel, runs)
    if not values:
        return Rendered(panel, skipped=_absent(panel, missing, "summary.json"))
    cells = "".join(f"<tr><td>{html.escape(run.label)}</td><td>{_fmt(v[panel.keys[0]])}</td></tr>"
                    for run, v in values)
    return Rendered(panel, html=f"<table class='num'><tr><th>run</th><th>{html.escape(panel.keys[0])}</th></tr>"
                                f"{cells}</table>")


def render_table(panel: Panel, own: RunData) -> Rendered:
    table = summary_path(own.summary, panel.table) if panel.table else None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()) or not table:
        what = f"no summary.json entry `{panel.table}`" if panel.table else "a W&B table only"
        return Rendered(panel, skipped=_note(panel, what))
    columns = list(dict.fromkeys(c for row in table.values() for c in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(f"<tr><td>{html.escape(str(r))}</td>"
                   + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in columns) + "</tr>" for r, row in table.items())
    return Rendered(panel, html=f"<table class='num'><tr><th></th>{head}</tr>{body}</table>")


def render_images(panel: Panel, own: RunData, out_dir: Path) -> Rendered:
    found = sorted({p for pattern in panel.files for p in own.path.glob(pattern) if p.is_file()})
    if not found:
        what = f"no {', '.join(panel.files)} in the run directory" if panel.files else "W&B images only"
        return Rendered(panel, skipped=_note(panel, what))
    copies = []
    for src in found:
        dst = out_dir / f"{slug(panel.title)}__{slug(str(src.relative_to(own.path)))}.png"
        shutil.copyfile(src, dst)
        copies.append(dst)
    return Rendered(panel, images=copies)


def _absent(panel: Panel, missing: Sequence[str], where: str) -> str:
    return _note(panel, f"no {', '.join(missing)} in {where}")


def _note(panel: Panel, what: str) -> str:
    return what + (" (optional: " + (panel.note or "present only in some runs") + ")" if panel.optional else "")


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return html.escape(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return html.escape(str(value))


def summary_runs(panel: Panel, own: RunData, series: Sequence[RunData]) -> List[RunData]:
    """The runs whose summaries a bar / scalar panel reads: the run itself when it has any of the keys (a staged
    run copies its stages' headline numbers), else its sub-runs; then the compared runs."""
    compared = [s for s in series if s.dashed]
    if any(k in own.summary for k in panel.keys):
        return [own] + compared
    return [s for s in series if s is not own and not s.dashed] + compared


def render_panels(panels: Sequence[Panel], own: RunData, series: Sequence[RunData], out_dir: Path,
                  related: Optional[Dict[str, RunData]] = None) -> List[Rendered]:
    """Render every panel into out_dir; a panel without data becomes a skip note, never an error. `related`:
    runs named by a panel's `related_run` config key, drawn with that panel only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    related = related or {}
    done = []
    for i, panel in enumerate(panels, 1):
        png = out_dir / f"{i:02d}_{slug(panel.title)}.png"
        extra = [related[panel.related_run]] if panel.related_run in related else []
        if panel.kind == "line":
            done.append(render_line(panel, list(series) + extra, png))
        elif panel.kind == "heatmap":
            done.append(render_heatmap(panel, series, png))
        elif panel.kind == "bar":
            done.append(render_bar(panel, summary_runs(panel, own, series), png))
        elif panel.kind == "scalar":
            done.append(render_scalar(panel, summary_runs(panel, own, series)))
        elif panel.kind == "table":
            done.append(render_table(panel, own))
        else:
            done.append(render_images(panel, own, out_dir))
    return done


def flat_summary(summary: Dict[str, Any], prefix: str = "") -> List[Tuple[str, Any]]:
    """Numbers, booleans and short strings of summary.json, nested entries as dotted keys (lists left out)."""
    out: List[Tuple[str, Any]] = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += flat_summary(value, name + ".")
        elif isinstance(value, (int, float, bool)) or value is None:
            out.append((name, value))
        elif isinstance(value, str):
            out.append((name, value if len(value) <= 120 else value[:117] + "..."))
    return out


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 1100px; }}
h2 {{ border-bottom: 1px solid #ccc; margin-top: 1.6em; }}
.panel {{ margin: 1em 0; }} .note {{ color: #555; font-size: 0.9em; }} .skipped {{ color: #a40; }}
table.num td, table.num th {{ border: 1px solid #ddd; padding: 2px 8px; text-align: right; font-size: 0.85em; }}
table.num {{ border-collapse: collapse; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<p>{meta}</p>
{body}
</body></html>
"""


def write_html(path: Path, recipe: str, run_dir: Path, own: RunData, series: Sequence[RunData],
               rendered: Sequence[Rendered]) -> Path:
    parts: List[str] = []
    section = None
    for r in rendered:
        if r.panel.section != section:
            section = r.panel.section
            parts.append(f"<h2>{html.escape(section)}</h2>")
        parts.append(f"<div class='panel'><h3>{html.escape(r.panel.title)}</h3>")
        if r.png is not None:
            parts.append(f"<img src='{r.png.name}' alt='{html.escape(r.panel.title)}'>")
        parts += [f"<img src='{p.name}' alt='{html.escape(p.stem)}'>" for p in r.images]
        parts.append(r.html)
        if r.skipped:
            parts.append(f"<p class='skipped'>skipped: {html.escape(r.skipped)}</p>")
        if r.missing:
            parts.append(f"<p class='skipped'>not in this run: {html.escape(', '.join(r.missing))}</p>")
        if r.panel.note and not r.skipped:
            parts.append(f"<p class='note'>{html.escape(r.panel.note)}</p>")
        parts.append("</div>")
    rows = flat_summary(own.summary)
    parts.append("<h2>summary.json</h2>")
    if not rows:
        parts.append("<p class='skipped'>no summary.json: the run has not finished (the panels use metrics.csv)</p>")
    else:
        shown = rows[:MAX_SUMMARY_ROWS]
        parts.append("<table class='num'>" + "".join(
            f"<tr><td style='text-align:left'>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in shown)
            + "</table>")
        if len(rows) > len(shown):
            parts.append(f"<p class='note'>{len(rows) - len(shown)} more entries in summary.json</p>")
    labels = ", ".join(html.escape(s.label) for s in series) or "none"
    meta = (f"recipe <b>{html.escape(recipe)}</b>, run directory <code>{html.escape(str(run_dir))}</code>; "
            f"series: {labels}")
    path.write_text(PAGE.format(title=html.escape(f"{recipe}: {Path(run_dir).name}"), meta=meta, body="\n".join(parts)))
    return path


def report(run_dir: Path, out_dir: Optional[Path] = None, compare: Sequence[Path] = (),
           panels: Optional[Sequence[Panel]] = None) -> Tuple[Path, List[Rendered]]:
    """Render a run's panels (the recipe's, or `panels`) into out_dir (default <run_dir>/report); returns the
    report.html path and what became of each panel."""
    run_dir = Path(run_dir)
    own, series = load_runs(run_dir, compare)
    recipe, cfg = run_recipe(run_dir, own)
    if panels is None:
        panels = panels_for(recipe, cfg)
    related: Dict[str, RunData] = {}
    for panel in panels:  # e.g. the source run of a grown TokenFormer, named by tokenformer_grow.from_run
        other = config_value(cfg, panel.related_run) if panel.related_run and cfg is not None else None
        if other and Path(str(other)).is_dir():
            related[panel.related_run] = read_run(Path(str(other)), dashed=True,
                                                  label=f"{panel.related_run.split('.')[-1]}: {Path(str(other)).name}")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    if out_dir.exists():  # what an earlier report wrote there (panel numbers and titles may have changed)
        for stale in out_dir.iterdir():
            if stale.is_file() and (re.fullmatch(r"\d{2}_[a-z0-9_]+\.png|[a-z0-9_]+__[a-z0-9_]+\.png", stale.name)
                                    or stale.name == "report.html"):
                stale.unlink()
    rendered = render_panels(panels, own, series, out_dir, related)
    return write_html(out_dir / "report.html", recipe, run_dir, own, series, rendered), rendered


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes report",
                                     description="Render a run's dashboard panels into PNGs and report.html.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run_dir>/report)")
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="another run directory drawn alongside (repeatable), e.g. a from-scratch baseline")
    args = parser.parse_args(argv)
    try:
        page, rendered = report(args.run_dir, args.out, args.compare)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    drawn = sum(1 for r in rendered if not r.skipped)
    for r in rendered:
        if r.skipped:
            print(f"skipped: {r.panel.title}: {r.skipped}")
    print(f"{drawn} of {len(rendered)} panels rendered: {page}")
    return 0
