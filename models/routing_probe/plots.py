"""Figures of the OpenMoE routing analysis, out of the box.

Each function takes plain numbers (lists / arrays / tensors, as `models.routing_probe` and the OpenMoE
analysis recipe produce them) and returns a matplotlib `Figure`; `save_png(fig, path)` writes it and releases
it. Figures are made with the object API on the Agg canvas (no pyplot state, no display needed). Imported on
its own (`from models.routing_probe import plots`): `import models.routing_probe` does not load matplotlib.

  load_heatmap            share of each layer's assignments per expert (layer x expert), ideal = 1/E
  drop_rate_plot          drop rate against position bucket, per assignment and per token, one line per layer
  specialisation_bars     modal-expert share grouped by token id / position / domain, per layer
  std_vs_uniform_bars     per-group std of the expert-ratio vector against the uniform reference
  saturation_plot         router saturation (top-1 agreement, top-k overlap) of each checkpoint vs the final
  coactivation_heatmap    P(b | a) of one layer
  metric_over_steps       any scalar per layer against the checkpoint step
The OpenMoE paper's quantities (`make analyze`) reuse them: paper_specialisation = std_vs_uniform_bars at one
layer, early_routing = metric_over_steps of the distribution distances, drop_rate_by_order = drop_rate_plot
with one line pair per drop order.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ArrayLike = Union[Sequence, np.ndarray, "torch.Tensor"]  # noqa: F821


def short_layer_name(name: str) -> str:
    """'lm.model.layers.3.mlp' -> 'L3' (figure labels); other names unchanged."""
    match = re.search(r"layers\.(\d+)", name)
    return f"L{match.group(1)}" if match else name


def _np(x: ArrayLike) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _figure(width: float = 6.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Union[str, Path]) -> Path:
    """Write `fig` as a PNG (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png")
    fig.clf()
    return path


def load_heatmap(load: ArrayLike, layer_names: Optional[Sequence[str]] = None, title: str = "Expert load") -> Figure:
    """`load` [L, E] counts or shares; each row is normalised to shares, colour = share / (1/E)."""
    data = np.atleast_2d(_np(load))
    shares = data / np.clip(data.sum(axis=1, keepdims=True), 1e-12, None)
    ratio = shares * data.shape[1]
    fig = _figure(max(4.0, 0.5 * data.shape[1] + 2), max(2.0, 0.45 * data.shape[0] + 1.5))
    ax = fig.add_subplot()
    im = ax.imshow(ratio, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(2.0, float(ratio.max())))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(data.shape[1]))
    ax.set_yticks(range(data.shape[0]))
    ax.set_yticklabels(list(layer_names) if layer_names else [str(i) for i in range(data.shape[0])])
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{ratio[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, label="load / ideal (1/E)")
    ax.set_title(title)
    return fig


def drop_rate_plot(curves: Mapping[str, Mapping[str, Sequence[float]]], title: str = "Drop rate by position"
                   ) -> Figure:
    """`curves`: layer name -> {"per_assignment": [...], "per_token": [...], "bucket_edges": [...]}.

    bucket_edges has one more entry than the rates (bucket b covers positions [edges[b], edges[b+1]))."""
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    for idx, (name, curve) in enumerate(curves.items()):
        edges = _np(curve["bucket_edges"])
        centres = (edges[:-1] + edges[1:]) / 2.0 if edges.size > 1 else np.arange(len(curve["per_assignment"]))
        color = f"C{idx % 10}"
        ax.plot(centres, 100 * _np(curve["per_assignment"]), "-o", color=color, label=f"{name} per assignment")
        ax.plot(centres, 100 * _np(curve["per_token"]), "--s", color=color, alpha=0.7, label=f"{name} per token")
    ax.set_xlabel("position in sequence (bucket centre)")
    ax.set_ylabel("dropped (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return fig


def specialisation_bars(values: Mapping[str, Sequence[float]], layer_names: Sequence[str],
                        uniform: Optional[Mapping[str, Sequence[float]]] = None,
                        title: str = "Share routed to the modal expert") -> Figure:
    """`values`: grouping ("token id", "position", "domain") -> one value per layer; `uniform`: the
    same grouping's value under uniform random routing (drawn as a marker), optional."""
    groups = list(values)
    n_layers = len(layer_names)
    width = 0.8 / max(1, len(groups))
    fig = _figure(max(5.0, 1.5 * n_layers + 2), 4.0)
    ax = fig.add_subplot()
    x = np.arange(n_layers)
    for g, name in enumerate(groups):
        pos = x - 0.4 + width * (g + 0.5)
        ax.bar(pos, _np(values[name]), width=width, color=f"C{g}", label=name)
        if uniform and name in uniform:
            ax.plot(pos, _np(uniform[name]), "k_", markersize=14, markeredgewidth=2,
                    label="uniform routing" if g == 0 else None)
    ax.set_xticks(x)
    ax.set_xticklabels(list(layer_names))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("mean share to the modal expert")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return fig


def std_vs_uniform_bars(values: Mapping[str, Sequence[float]], uniform: Mapping[str, Sequence[float]],
                        layer_names: Sequence[str], title: str = "Std of expert-ratio vectors") -> Figure:
    """Per grouping: mean per-group std of the expert-ratio vector (bars) and the uniform reference (marks)."""
    fig = specialisation_bars(values, layer_names, uniform, title=title)
    ax = fig.axes[0]
    ax.set_ylabel("mean std of expert ratios")
    top = max([float(np.max(_np(v))) for v in values.values()] + [float(np.max(_np(v))) for v in uniform.values()])
    ax.set_ylim(0, top * 1.15 + 1e-9)
    return fig


def saturation_plot(steps: Sequence[int], top1: Mapping[str, Sequence[float]],
                    topk: Optional[Mapping[str, Sequence[float]]] = None, chance_top1: Optional[float] = None,
                    chance_topk: Optional[float] = None, title: str = "Router saturation vs the final checkpoint"
                    ) -> Figure:
    """Per layer: top-1 agreement (solid) and top-k overlap (dashed) of each checkpoint against the final."""
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    for idx, (name, ys) in enumerate(top1.items()):
        ax.plot(steps, 100 * _np(ys), "-o", color=f"C{idx}", label=f"{name} top-1 agreement")
        if topk and name in topk:
            ax.plot(steps, 100 * _np(topk[name]), "--s", color=f"C{idx}", alpha=0.7, label=f"{name} top-k overlap")
    if chance_top1 is not None:
        ax.axhline(100 * chance_top1, color="grey", lw=1, ls=":", label="chance (top-1)")
    if chance_topk is not None:
        ax.axhline(100 * chance_topk, color="grey", lw=1, ls="-.", label="chance (top-k)")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("agreement with final (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return fig


def coactivation_heatmap(probability: ArrayLike, title: str = "Co-activation P(b | a)") -> Figure:
    """`probability` [E, E]: row a = P(expert b also chosen | expert a chosen)."""
    data = _np(probability)
    fig = _figure(max(4.0, 0.5 * data.shape[1] + 2), max(3.5, 0.5 * data.shape[0] + 1.5))
    ax = fig.add_subplot()
    im = ax.imshow(data, cmap="magma", vmin=0.0, vmax=max(1e-9, float(data.max())))
    ax.set_xlabel("expert b")
    ax.set_ylabel("expert a")
    ax.set_xticks(range(data.shape[1]))
    ax.set_yticks(range(data.shape[0]))
    fig.colorbar(im, ax=ax, label="P(b | a)")
    ax.set_title(title)
    return fig


def metric_over_steps(steps: Sequence[int], series: Mapping[str, Sequence[float]], ylabel: str,
                      title: str, reference: Optional[Dict[str, float]] = None) -> Figure:
    """Lines of one scalar per series (e.g. per layer) against the checkpoint step; `reference`: name ->
    horizontal reference line (e.g. the uniform-routing value)."""
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    for idx, (name, ys) in enumerate(series.items()):
        ax.plot(steps, _np(ys), "-o", color=f"C{idx % 10}", label=name)
    for idx, (name, value) in enumerate((reference or {}).items()):
        ax.axhline(value, color="grey", ls=[":", "-.", "--"][idx % 3], lw=1, label=name)
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return fig


def figure_names() -> List[str]:
    return ["load_heatmap", "drop_rate", "specialisation", "std_vs_uniform", "saturation", "coactivation",
            "specialisation_over_steps", "paper_specialisation", "early_routing", "drop_rate_by_order"]
