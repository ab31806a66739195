"""Routing-probe training callback for any MoE recipe (the OpenMoE analysis).

Enabled by `routing_probe.enabled=true` (on in the `openmoe` recipe; opt-in for any other recipe whose
model has MoE blocks, e.g. `make train RECIPE=adamoe ARGS="routing_probe.enabled=true"`).

Every `routing_probe.every_n_steps` optimizer steps a `models.routing_probe.RoutingProbe` is attached for
the forward of ONE training batch (the step's own forward, so no extra compute besides the hooks) and
detached right after it. The routing is the training routing: the capacity the block really applies in
training (OpenMoE: factor 1.25); for dropless models `routing_probe.capacity_factor` (if set) gives the
drops that factor would cause. Logged at that step:
  metrics.csv / W&B scalars: moe/specialisation_token_id, moe/specialisation_position, moe/drop_rate
    (per assignment), moe/drop_rate_token (tokens with all assignments dropped), moe/drop_rate_last_bucket,
    moe/load_max_over_ideal (worst layer), moe/load_std (mean over layers of the std of expert shares)
  W&B only (when a W&B logger is attached): images moe_probe/load_heatmap and moe_probe/drop_rate
    (via recipes.engine.logs.log_images) and tables moe_probe/load_table, moe_probe/drop_table.
`routing_probe.save_pngs=true` also writes the two figures to <run_dir>/analysis/steps/.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from lightning.pytorch.callbacks import Callback

from .errors import ConfigError


@dataclass
class RoutingProbeConfig:
    enabled: bool = False
    every_n_steps: int = 50  # the default interval: overhead measured by `python -m bench --only openmoe`
    position_buckets: int = 8
    min_token_count: int = 5  # token ids seen fewer times in the probed batch are left out of specialisation
    capacity_factor: Optional[float] = None  # dropless models only: drops this factor would cause
    priority: str = "position"  # models.routing_probe.PRIORITIES (the computed drops of dropless models)
    images: bool = True  # render figures for W&B (only when a W&B logger is attached)
    save_pngs: bool = False  # also write the figures to <run_dir>/analysis/steps/


def check_config(c) -> None:
    if c.every_n_steps < 1:
        raise ConfigError(f"routing_probe.every_n_steps must be >= 1, got {c.every_n_steps}.")
    if c.position_buckets < 1:
        raise ConfigError(f"routing_probe.position_buckets must be >= 1, got {c.position_buckets}.")
    if c.capacity_factor is not None and c.capacity_factor <= 0:
        raise ConfigError(f"routing_probe.capacity_factor must be > 0 or null, got {c.capacity_factor}.")
    from models.routing_probe.capacity import PRIORITIES

    if c.priority not in PRIORITIES:
        raise ConfigError(f"routing_probe.priority must be one of {', '.join(PRIORITIES)}, got '{c.priority}'.")


def _wandb_loggers(trainer) -> List[Any]:
    return [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]


def probe_metrics(stats, layers: List[str], min_token_count: int) -> Dict[str, Any]:
    """Scalars (and per-layer curves) of one probed forward from a RoutingStats."""
    from models import routing_probe as rp

    spec_tok, spec_pos, load_ratio, load_std, curves = [], [], [], [], {}
    dropped_a = total_a = dropped_t = total_t = 0.0
    last_a, last_total = 0.0, 0.0
    for i, name in enumerate(layers):
        layer = stats.layers[i]
        spec_tok.append(layer.specialisation("token", min_token_count))
        spec_pos.append(layer.specialisation("position", 1))
        load = rp.load_statistics(layer.load)
        load_ratio.append(load["max_over_ideal"])
        load_std.append(load["std"])
        curves[name] = rp.drop_rate_by_position(stats, i)
        d = layer.drops_by_bucket
        dropped_a += float(d["assignments_dropped"].sum())
        total_a += float(d["assignments_total"].sum())
        dropped_t += float(d["tokens_dropped"].sum())
        total_t += float(d["tokens_total"].sum())
        last_a += float(d["assignments_dropped"][-1])
        last_total += float(d["assignments_total"][-1])
    nan = float("nan")
    finite = [v for v in spec_tok if v == v]
    return {
        "scalars": {
            "moe/specialisation_token_id": sum(finite) / len(finite) if finite else nan,
            "moe/specialisation_position": sum(spec_pos) / len(spec_pos),
            "moe/drop_rate": dropped_a / total_a if total_a else 0.0,
            "moe/drop_rate_token": dropped_t / total_t if total_t else 0.0,
            "moe/drop_rate_last_bucket": last_a / last_total if last_total else 0.0,
            "moe/load_max_over_ideal": max(load_ratio),
            "moe/load_std": sum(load_std) / len(load_std),
        },
        "curves": curves,
        "load": torch.stack([torch.as_tensor(stats.layers[i].load, dtype=torch.float64)
                             for i in range(len(layers))]),
    }


class RoutingProbeCallback(Callback):
    """Attach a RoutingProbe for one training batch every `every_n_steps` steps; log what it saw."""

    def __init__(self, every_n_steps: int = 50, position_buckets: int = 8, min_token_count: int = 5,
                 capacity_factor: Optional[float] = None, priority: str = "position", images: bool = True,
                 save_pngs: bool = False, run_dir: Optional[Path] = None, max_positions: int = 4096) -> None:
        super().__init__()
        self.every_n_steps = int(every_n_steps)
        self.position_buckets = position_buckets
        self.min_token_count = min_token_count
        self.capacity_factor = capacity_factor
        self.priority = priority
        self.images = images
        self.save_pngs = save_pngs
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.max_positions = max_positions
        self._probe = None
        self._vocab_size: Optional[int] = None
        self.history: List[Dict[str, float]] = []  # what was logged (step included), for tests / benches

    def _make_probe(self, model: torch.nn.Module):
        from models.routing_probe import RoutingProbe

        return RoutingProbe(model, capacity_factor=self.capacity_factor, priority=self.priority,
                            position_buckets=self.position_buckets, max_positions=self.max_positions,
                            min_token_count=self.min_token_count, vocab_size=self._vocab_size)

    def setup(self, trainer, pl_module, stage: str) -> None:
        emb = pl_module.model.get_input_embeddings() if hasattr(pl_module.model, "get_input_embeddings") else None
        self._vocab_size = int(emb.weight.shape[0]) if emb is not None else None
        try:  # fail at the start, not at step N, when the model has no MoE block
            probe = self._make_probe(pl_module.model).attach()
            probe.detach()
        except ValueError as e:
            raise ConfigError(f"routing_probe.enabled=true needs a model with MoE blocks: {e}") from None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._probe is not None or (trainer.global_step + 1) % self.every_n_steps != 0:
            return
        self._probe = self._make_probe(pl_module.model).attach()
        if isinstance(batch, dict) and "domain" in batch:
            self._probe.set_domains(batch["domain"], list(getattr(pl_module, "domain_names", []) or []) or None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        probe, self._probe = self._probe, None
        if probe is None:
            return
        probe.detach()
        if not trainer.is_global_zero:
            return
        # The row of this batch's own training metrics in metrics.csv: Lightning logs a step's metrics under
        # the number of optimizer steps done BEFORE it (global_step has already been incremented here).
        step = int(trainer.global_step) - 1
        result = probe_metrics(probe.stats, probe.layers, self.min_token_count)
        scalars = dict(result["scalars"])
        for lg in trainer.loggers:
            extra = {"train/tokens_seen": float(getattr(pl_module, "tokens_seen", 0))} \
                if type(lg).__name__ == "WandbLogger" else {}
            lg.log_metrics({**scalars, **extra}, step=step)
        self.history.append(dict(scalars, step=step))
        wandb_loggers = _wandb_loggers(trainer)
        if self.images and (wandb_loggers or self.save_pngs):
            self._figures(trainer, wandb_loggers, step, probe.layers, result)

    def _figures(self, trainer, wandb_loggers, step: int, layers: List[str], result: Dict[str, Any]) -> None:
        import tempfile

        from models.routing_probe import plots
        from recipes.engine.logs import log_images


        names = [plots.short_layer_name(n) for n in layers]
        target = (self.run_dir / "analysis" / "steps") if (self.save_pngs and self.run_dir) else \
            Path(tempfile.mkdtemp(prefix="routing_probe_"))
        paths = {
            "moe_probe/load_heatmap": plots.save_png(
                plots.load_heatmap(result["load"], names, title=f"Expert load, step {step}"),
                target / f"step{step:07d}_load_heatmap.png"),
            "moe_probe/drop_rate": plots.save_png(
                plots.drop_rate_plot(dict(zip(names, result["curves"].values())),
                                     title=f"Drop rate by position (training capacity), step {step}"),
                target / f"step{step:07d}_drop_rate.png"),
        }
        log_images(wandb_loggers, paths, step=step)
        for lg in wandb_loggers:
            try:
                import wandb

                load_rows = [[name, e, float(v)] for name, row in zip(names, result["load"] / result["load"].sum(
                    dim=1, keepdim=True).clamp_min(1e-12)) for e, v in enumerate(row.tolist())]
                drop_rows = []
                for name, curve in zip(names, result["curves"].values()):
                    edges = list(curve["bucket_edges"])
                    for b, (pa, pt) in enumerate(zip(curve["per_assignment"], curve["per_token"])):
                        drop_rows.append([name, int(edges[b]), int(edges[b + 1]), float(pa), float(pt)])
                lg.experiment.log({
                    "moe_probe/load_table": wandb.Table(columns=["layer", "expert", "share"], data=load_rows),
                    "moe_probe/drop_table": wandb.Table(
                        columns=["layer", "pos_start", "pos_end", "drop_per_assignment", "drop_per_token"],
                        data=drop_rows),
                })
            except Exception as e:  # W&B never stops a run
                warnings.warn(f"routing probe: could not log W&B tables: {e}")
        if not (self.save_pngs and self.run_dir):
            import shutil

            shutil.rmtree(target, ignore_errors=True)


def routing_callbacks(cfg, run_dir: Path) -> List[Callback]:
    """[RoutingProbeCallback] when routing_probe.enabled, else []. Called by the engine's train loop."""
    c = cfg.get("routing_probe") if hasattr(cfg, "get") else None
    if c is None or not c.enabled:
        return []
    check_config(c)
    return [RoutingProbeCallback(every_n_steps=c.every_n_steps, position_buckets=c.position_buckets,
                                 min_token_count=c.min_token_count, capacity_factor=c.capacity_factor,
                                 priority=c.priority, images=c.images, save_pngs=c.save_pngs, run_dir=run_dir,
                                 max_positions=max(int(cfg.data.block_size), 1))]
