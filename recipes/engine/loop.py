"""train() and resume_run(): one run of a recipe, from its config to its run directory.

    cfg (recipes.engine.config.load_config) -> DataModule, LightningModule (recipes.engine.build),
    Trainer with strategy, loggers and callbacks -> fit -> run directory (config.yaml, checkpoints/,
    metrics.csv, summary.json) and W&B.

A staged recipe (Recipe.stages) runs its stages instead (recipes.engine.pipeline). A stage that trains a
sub-run calls train() again, with its own module class and training set where it needs them.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig

from .build import Zero3ModelFactory, build_datamodule, build_module
from .checkpointing import (
    AtomicCheckpointIO,
    list_checkpoints,
    newest_checkpoint,
    remove_stale_temporaries,
    verify_checkpoint_safe,
)
from .config import load_config, to_dict
from .errors import ConfigError
from .recipe import get_recipe
from .runs import (
    clear_segment_times,
    is_launching_process,
    load_run_config,
    make_run_dir,
    record_segment,
    record_segment_time,
    save_run_config,
    segment_times,
    wandb_id_for,
    write_json_atomic,
    write_status,
)
from .strategies import build_strategy, resolve_precision

# Keys that define what a checkpoint holds (its tensors, its data order, its kind): a resume may not change them.
FIXED_ON_RESUME = ("run.name", "run.root", "run.run_id", "run.seed", "model", "data.source", "data.domains",
                   "data.files", "data.hub_name", "data.hub_config", "data.hub_split", "data.text_field",
                   "data.text_template", "data.val_fraction", "data.tokenizer", "data.vocab_size", "data.block_size",
                   "trainer.strategy")


class RunInterrupted(Exception):
    """A segment ended by a signal, after its checkpoint: `message` says how to continue; `exit_code` is the
    conventional 128 + signal number (0 when SLURM requeued the job, which then resumes by itself)."""

    def __init__(self, message: str, exit_code: int, record: Dict[str, Any]):
        super().__init__(message)
        self.exit_code = exit_code
        self.record = record


def train(cfg: DictConfig, run_dir: Optional[Path] = None, resume: bool = False, *, module_cls=None,
          module_kwargs: Optional[Dict[str, Any]] = None, train_set=None) -> Path:
    """Train (or resume) one run; returns its run directory. Raises RunInterrupted when a signal ended the
    segment (after its checkpoint).

    `module_cls` / `module_kwargs`: the LightningModule class to build (with `from_config`) instead of the
    recipe's, and extra keyword arguments for it; `train_set`: a Dataset that replaces the DataModule's
    training blocks (items with input_ids, labels, domain). Both are for stages of staged recipes."""
    recipe = get_recipe(cfg.run.name)
    if run_dir is None:
        run_dir = make_run_dir(cfg, overwrite=bool(cfg.run.overwrite))
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if is_launching_process():
        save_run_config(cfg, run_dir / "config.yaml")

    if recipe.staged:
        from .pipeline import run_stages

        summary = run_stages(recipe.stages(cfg), cfg, run_dir)
        if summary is not None:  # None: this rank has no summary to write (another rank writes it)
            write_json_atomic(run_dir / "summary.json", summary)
            print(format_stages_summary(cfg.run.name, summary, run_dir), flush=True)
        return run_dir
    return _fit(cfg, run_dir, resume, recipe, module_cls, module_kwargs, train_set)


def _fit(cfg, run_dir: Path, resume: bool, recipe, module_cls, module_kwargs, train_set) -> Path:
    from .callbacks import SignalCheckpoint

    # A signal may come while data and model are still being set up: record it from the start (the default
    # action would kill the process); the checkpoint (+ requeue) then happens at the first step boundary.
    signals = SignalCheckpoint(run_dir)
    signals.install()
    try:
        return _fit_with_signals(cfg, run_dir, resume, recipe, module_cls, module_kwargs, train_set, signals)
    finally:
        signals.uninstall()


def _fit_with_signals(cfg, run_dir: Path, resume: bool, recipe, module_cls, module_kwargs, train_set, signals) -> Path:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from models.factory import count_parameters

    from .callbacks import NonFiniteGuard, StopAtStep, ThroughputMonitor
    from .logs import RunCSVLogger, make_wandb_logger, osh_callbacks
    from .routing_callback import routing_callbacks

    segment_start = time.time()  # this segment's wall time counts from here (data and model set-up included)
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    dm = build_datamodule(cfg)
    if train_set is not None:
        dm.train_set = train_set
    module = build_module(cfg, dm, recipe, training=True, module_cls=module_cls, module_kwargs=module_kwargs)

    ckpt = resume_checkpoint(run_dir) if resume else None
    resume_step = ckpt[1] if ckpt else None
    if is_launching_process():
        remove_stale_temporaries(run_dir)
        write_status(run_dir, "running", step=resume_step or 0)

    loggers: List[Any] = [RunCSVLogger(run_dir / "metrics.csv", resume_step=resume_step if resume else None)]
    if not resume and (run_dir / "metrics.csv").exists():
        (run_dir / "metrics.csv").unlink()
    if not resume and is_launching_process():
        clear_segment_times(run_dir)  # a run started over from step 0 in this directory
    check_logging_config(cfg)
    wb = make_wandb_logger(run_dir, wandb_id_for(run_dir), f"{cfg.run.name}/{run_dir.name}", cfg.logging.wandb,
                           cfg.logging.project, cfg.logging.entity, run_tags(cfg), to_dict(cfg),
                           group=cfg.logging.group, job_type=cfg.logging.job_type or "train",
                           families=recipe.metric_prefixes)
    if wb is not None:
        loggers.append(wb)
    osh = osh_callbacks(cfg.logging.wandb_osh, wb, cfg.logging.wandb_osh_dir)

    throughput = ThroughputMonitor(block_size=cfg.data.block_size, peak_flops_per_device=cfg.logging.peak_flops)
    callbacks: List[Any] = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg.checkpoint.every_n_steps, save_last=True,
                        save_top_k=cfg.checkpoint.keep, monitor=None, save_on_train_epoch_end=False),
        throughput,
        NonFiniteGuard(cfg.checkpoint.every_n_steps,
                       [cfg.trainer.stop_at_step] if cfg.trainer.stop_at_step is not None else []),
        signals,
    ]
    if cfg.trainer.stop_at_step is not None:
        callbacks.append(StopAtStep(cfg.trainer.stop_at_step, run_dir / "checkpoints" / "last.ckpt"))
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.trainer.log_every_n_steps)))
    if recipe.callbacks is not None:
        callbacks += list(recipe.callbacks(cfg, run_dir))
    callbacks += routing_callbacks(cfg, run_dir)  # routing_probe.enabled (any MoE recipe)
    callbacks += osh  # logging.wandb_osh: live sync of the offline W&B run through wandb-osh

    plugins: List[Any] = [AtomicCheckpointIO()]
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():  # SignalCheckpoint handles SIGUSR1 / SIGTERM at a step boundary instead
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = L.Trainer(
        default_root_dir=str(run_dir), max_steps=cfg.trainer.max_steps, max_epochs=-1,
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
        strategy=build_strategy(cfg), precision=resolve_precision(cfg.trainer.precision),
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches, gradient_clip_val=cfg.optim.grad_clip,
        val_check_interval=cfg.trainer.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=cfg.trainer.limit_val_batches, num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps, logger=loggers, callbacks=callbacks,
        enable_progress_bar=cfg.trainer.progress_bar, enable_model_summary=False,
        use_distributed_sampler=False, deterministic=cfg.trainer.deterministic,
        plugins=plugins,
    )
    t0 = time.time()
    timing = _SegmentTiming(run_dir, trainer, throughput, segment_start, t0, resume_step or 0)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            # validation sums are reduced by hand in on_validation_epoch_end
            warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")
            trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt[0]) if ckpt else None)
            finished = trainer.global_step >= cfg.trainer.max_steps
            if finished and module.last_val.get("_step") != trainer.global_step:
                trainer.validate(module, datamodule=dm, verbose=False)
    except BaseException:
        timing.record("failed")
        raise
    if signals.interrupted is not None:
        timing.record("interrupted")
        if wb is not None:
            finish_wandb(wb)
        _trigger_osh(osh)
        raise _interrupted(run_dir, signals.interrupted, trainer.is_global_zero)
    timing.record("finished" if finished else "stopped")
    if trainer.is_global_zero:
        times = segment_times(run_dir)
        summary = {
            "recipe": cfg.run.name, "run_dir": str(run_dir), "step": trainer.global_step,
            "tokens_seen": module.tokens_seen, "train/loss": module.last_train_loss,
            "wall_time_s": sum(float(t.get("wall_time_s", 0.0)) for t in times),
            "fit_time_s": sum(float(t.get("fit_time_s", 0.0)) for t in times),
            "segments": len(times),
            "num_parameters": count_parameters(module.model),
        }
        if throughput.flops_per_token:
            summary["flops_per_token"] = throughput.flops_per_token
        if isinstance(module.model_factory, Zero3ModelFactory):
            summary.update({f"zero3_load/{k}": v for k, v in module.model_factory.stats.items() if k != "rank"})
        summary.update({k: v for k, v in module.last_val.items() if not k.startswith("_")})
        summary.update(throughput.summary([t["throughput"] for t in times if isinstance(t.get("throughput"), dict)]))
        summary.update(module.summary_metrics())
        write_json_atomic(run_dir / "summary.json", summary)
        write_status(run_dir, "finished", step=trainer.global_step)
        for lg in loggers:
            lg.save()
        if wb is not None:
            try:
                wb.experiment.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            except Exception:
                pass
            if cfg.logging.log_checkpoints and finished:
                from .logs import log_checkpoint_artifact

                log_checkpoint_artifact(wb, run_dir / "checkpoints" / "last.ckpt", trainer.global_step,
                                        module.tokens_seen)
        try:
            print(format_run_summary(summary, run_dir, wandb_where(wb), finished=finished), flush=True)
        except Exception as e:  # the block is a courtesy: summary.json is written
            warnings.warn(f"could not print the run summary ({type(e).__name__}: {e})")
    if wb is not None:
        finish_wandb(wb)
    _trigger_osh(osh)
    return run_dir


class _SegmentTiming:
    """Records this segment's times once, on rank 0, in <run_dir>/segment_times.jsonl (runs.record_segment_time):
    wall time from the start of set-up, time in fit (+ final validation), steps, and the throughput totals."""

    def __init__(self, run_dir: Path, trainer, throughput, start: float, fit_start: float, start_step: int):
        self.run_dir, self.trainer, self.throughput = run_dir, trainer, throughput
        self.start, self.fit_start, self.start_step = start, fit_start, start_step
        self.done = False

    def record(self, state: str) -> None:
        if self.done or not self.trainer.is_global_zero:
            return
        self.done = True
        now = time.time()
        try:
            record_segment_time(self.run_dir, {
                "state": state, "start_step": self.start_step, "end_step": int(self.trainer.global_step),
                "wall_time_s": now - self.start, "fit_time_s": now - self.fit_start,
                "throughput": self.throughput.totals()})
        except OSError as e:  # timing is bookkeeping: it never ends a run
            warnings.warn(f"could not record the segment's time in {self.run_dir}: {e}")


def _trigger_osh(osh) -> None:
    """A last wandb-osh sync request once the W&B run is finished (its final data is on disk)."""
    for cb in osh:
        cb.trigger()


def check_logging_config(cfg) -> None:
    """The logging.* values loading does not check yet (one-line ConfigError)."""
    peak = cfg.logging.peak_flops
    if peak is not None and not float(peak) > 0:
        raise ConfigError(f"logging.peak_flops must be > 0 (FLOP/s of one device, e.g. 989e12), got {peak}.")


def wandb_where(wb) -> Optional[str]:
    from .logs import wandb_location

    return wandb_location(wb)


def format_run_summary(summary: Dict[str, Any], run_dir: Path, wandb_at: Optional[str] = None,
                       finished: bool = True) -> str:
    """The end-of-run block printed on rank 0 (before `run_dir:`): losses, tokens, wall time over all segments,
    throughput, and where the checkpoints, the export and the W&B run are."""
    run_dir = Path(run_dir)

    def num(key: str, fmt: str = "{:.4f}") -> Optional[str]:
        v = summary.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) else None

    state = "finished" if finished else "stopped (trainer.stop_at_step)"
    lines = [f"== {summary.get('recipe', run_dir.parent.name)} {run_dir.name}: {state} at step "
             f"{summary.get('step', '?')} =="]
    losses = [f"{k} {v}" for k, v in (("train/loss", num("train/loss")), ("val/loss", num("val/loss"))) if v]
    domains = sorted(k for k in summary if k.startswith("val/loss_"))
    if domains:
        losses.append("(" + ", ".join(f"{k[len('val/loss_'):]} {summary[k]:.4f}" for k in domains) + ")")
    if losses:
        lines.append("  loss        " + "  ".join(losses))
    segments = int(summary.get("segments") or 1)
    wall = summary.get("wall_time_s")
    timing = [f"tokens {int(summary['tokens_seen']):,}" if isinstance(summary.get("tokens_seen"), (int, float))
              else None,
              f"wall time {_duration(wall)}" + (f" over {segments} segments" if segments > 1 else "")
              if isinstance(wall, (int, float)) else None]
    lines.append("  run         " + "  ".join(t for t in timing if t))
    perf = [f"{summary['perf/tokens_per_sec_mean']:,.0f} tokens/s" if "perf/tokens_per_sec_mean" in summary else None,
            f"{summary['perf/tflops_mean']:.3g} TFLOP/s per device" if "perf/tflops_mean" in summary else None,
            f"MFU {100 * summary['perf/mfu_mean']:.1f}%" if "perf/mfu_mean" in summary else None,
            f"peak GPU memory {summary['perf/gpu_mem_alloc_gb_peak']:.2f} GiB allocated, "
            f"{summary['perf/gpu_mem_reserved_gb_peak']:.2f} GiB reserved"
            if "perf/gpu_mem_alloc_gb_peak" in summary else None]
    if any(perf):
        lines.append("  throughput  " + "  ".join(p for p in perf if p))
    ckpts = run_dir / "checkpoints"
    files = sorted(p.name for p in ckpts.glob("*.ckpt")) if ckpts.is_dir() else []
    if files:
        lines.append(f"  checkpoints {ckpts}/ ({', '.join(files[-3:])}{', ...' if len(files) > 3 else ''})")
    export = run_dir / "export"
    lines.append(f"  export      {export}" if export.is_dir() else f"  export      make export RUN={run_dir}")
    if wandb_at:
        offline = not wandb_at.startswith("http")
        lines.append(f"  W&B         {wandb_at}" + (f" (offline: make sync RUN={run_dir})" if offline else ""))
    lines.append(f"  summary     {run_dir / 'summary.json'}")
    return "\n".join(lines)


def format_stages_summary(recipe: str, summary: Dict[str, Any], run_dir: Path, limit: int = 12) -> str:
    """The end-of-run block of a staged recipe: its headline numbers (the first `limit` numeric entries of the
    merged stage results) and where the summary and the sub-runs are."""
    run_dir = Path(run_dir)
    numbers = [(k, v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    lines = [f"== {recipe} {run_dir.name}: stages finished =="]
    for k, v in numbers[:limit]:
        lines.append(f"  {k:<32} {v:.4g}" if isinstance(v, float) else f"  {k:<32} {v}")
    if len(numbers) > limit:
        lines.append(f"  ... {len(numbers) - limit} more in summary.json")
    subs = sorted(p.parent.name for p in run_dir.glob("*/summary.json"))
    if subs:
        lines.append(f"  sub-runs    {run_dir}/{{{','.join(subs)}}}")
    lines.append(f"  summary     {run_dir / 'summary.json'}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}h{rem // 60:02d}m{rem % 60:02d}s" if h else f"{rem // 60}m{rem % 60:02d}s"


def run_tags(cfg) -> List[str]:
    """W&B tags of a run: the user's, then recipe, method, strategy and precision."""
    recipe = get_recipe(cfg.run.name)
    tags = list(cfg.logging.tags)
    for tag in (cfg.run.name, recipe.method, cfg.trainer.strategy, resolve_precision(cfg.trainer.precision)):
        if tag not in tags:
            tags.append(str(tag))
    return tags


def finish_wandb(wb) -> None:
    """End this run's W&B run (a later sub-run in the same process must get its own, not join this one)."""
    try:
        import wandb

        if wandb.run is not None and wb._experiment is not None and wandb.run.id == wb._experiment.id:
            wandb.finish()
    except Exception:  # W&B never stops a run
        pass


def _interrupted(run_dir: Path, record: Dict[str, Any], is_zero: bool) -> RunInterrupted:
    import signal as signal_module

    name = record["signal"]
    if is_zero:
        write_status(run_dir, "interrupted", resumable=True, **record)
    code = 0 if record.get("requeued") else 128 + int(getattr(signal_module, name))
    how = ("SLURM requeued the job: it resumes by itself (or `make resume RUN={d}`)" if record.get("requeued")
           else "resume with: make resume RUN={d}").format(d=run_dir)
    msg = (f"{name} at step {record['step']}: checkpoint {record['checkpoint']} written "
           f"{record['seconds_to_checkpoint']:.1f} s after the signal; {how}")
    if name == "SIGTERM" and record["seconds_to_checkpoint"] > 25:
        msg += (" -- WARNING: SLURM kills a job KillWait (default 30 s) after SIGTERM; this checkpoint took "
                f"{record['seconds_to_checkpoint']:.0f} s. "
                "Ask for an earlier warning: sbatch --signal=SIGUSR1@<seconds>.")
    return RunInterrupted(msg, code, record)


def resume_checkpoint(run_dir: Path):
    """(path, step) of the newest readable checkpoint of a run, verified to load without running code; None
    when the run has no checkpoint file at all (it was stopped before its first one: it starts from step 0).
    Checkpoint files that exist but none of which can be read are an error naming them (no silent restart)."""
    files = list_checkpoints(run_dir)
    found = newest_checkpoint(run_dir)
    if found is None:
        if files:
            raise ConfigError(f"None of the checkpoints of {run_dir} can be read: "
                              f"{', '.join(str(p) for p in files)}. Nothing was changed; restore one, or start a "
                              "new run.")
        print(f"{run_dir} has no checkpoint yet: starting from step 0.", file=sys.stderr)
        return None
    verify_checkpoint_safe(found[0])
    return found


def prepare_resume(run_dir: Path, overrides=None) -> DictConfig:
    """The config of a run's next segment: its saved config plus `overrides`, validated against the checkpoint
    BEFORE anything in the run directory changes (an override of a key in FIXED_ON_RESUME or the recipe's own
    fixed keys is an error naming the key)."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    saved = load_run_config(run_dir)
    recipe = saved.get("run", {}).get("name")
    if not recipe:
        raise ConfigError(f"{run_dir}/config.yaml names no recipe (run.name).")
    if "trainer" in saved and "stop_at_step" in saved.trainer:
        saved.trainer.stop_at_step = None  # a segment's stop point is not carried into the next segment
    before = load_config(recipe, base=saved)
    cfg = load_config(recipe, overrides, base=saved)
    for key in FIXED_ON_RESUME + tuple(get_recipe(recipe).fixed_on_resume):
        old, new = OmegaConf.select(before, key), OmegaConf.select(cfg, key)
        if old != new:
            show = (lambda v: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v)
            raise ConfigError(f"{key} cannot change when resuming {run_dir} (its checkpoints were trained with "
                              f"{show(old)!r}, the override gives {show(new)!r}); start a new run for that.")
    if cfg.run.overwrite:
        raise ConfigError("run.overwrite=true does not apply to `make resume`; use `make train` to start over.")
    return cfg


def check_resume(run_dir: Path, overrides=None) -> DictConfig:
    """Everything `resume_run` checks before it writes: the overrides against the saved config and the
    checkpoint (readable, plain data). Raises ConfigError; touches nothing."""
    cfg = prepare_resume(run_dir, overrides)
    if not get_recipe(cfg.run.name).staged:
        resume_checkpoint(run_dir)
    return cfg


def resume_run(run_dir: Path, overrides=None) -> Path:
    """Continue a run from its newest checkpoint, in the same run directory, with its saved config (plus
    `overrides`, checked first: a refused override leaves the run directory byte-for-byte unchanged)."""
    run_dir = Path(run_dir)
    cfg = prepare_resume(run_dir, overrides)
    if not get_recipe(cfg.run.name).staged:
        found = resume_checkpoint(run_dir)  # checked before anything is written
        if is_launching_process():
            record_segment(run_dir, overrides, str(found[0]) if found else None, found[1] if found else None)
    elif is_launching_process():
        record_segment(run_dir, overrides, None, None)
    return train(cfg, run_dir=run_dir, resume=True)
