"""Loggers: a CSV log that always works, and W&B that never blocks or crashes a run.

W&B here: the mode (`logging.wandb`, offline-first: `auto` probes the server for ~2.5 s at most), the run's
settings (console captured, small init timeout), one x-axis per metric family so that resumed segments continue
it, checkpoints as artifacts, live sync through wandb-osh, and compact per-expert loads. docs/logging.md.
"""
from __future__ import annotations

import csv
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning as L
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

# The server, the key and the probe live in sync.py (no Lightning there: `make sync` stays light); used here too.
from .sync import (  # noqa: F401  (re-exported: recipes.engine.logs.wandb_reachable etc.)
    PROBE_TIMEOUT_S,
    forget_probes,
    probe_address,
    wandb_api_key_source,
    wandb_base_url,
    wandb_logged_in,
    wandb_reachable,
)

# W&B sorts metrics into dashboard sections by prefix. Every family is plotted against tokens seen (logged with
# every training step and every validation); anything else against Lightning's trainer/global_step. Both are
# restored from the checkpoint on resume, so a resumed segment continues the same axis.
STEP_METRIC = "train/tokens_seen"
GLOBAL_STEP = "trainer/global_step"
SECTIONS = ("train", "val", "perf", "moe", "moe_probe", "analysis", "tokenformer", "fusion", "twin", "grow")

INIT_TIMEOUT_S = 20.0  # wandb.init; W&B's default is 90 s
FINISH_TIMEOUT_S = 120.0  # online runs: stop waiting for uploads at the end (the data stays on disk for sync)
OSH_COMMAND_DIR = "~/.wandb_osh_command_dir"  # wandb-osh's default communication directory


class RunCSVLogger(Logger):
    """`metrics.csv` in the run directory: one row per logged step, a column per scalar.

    On resume from a checkpoint at step s, rows logged after s by the interrupted segment are dropped
    (they are logged again by the resumed run), so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, resume_step: Optional[int] = None, flush_every_s: float = 5.0):
        super().__init__()
        self.path = Path(path)
        self.rows: Dict[int, Dict[str, Any]] = {}
        self.keys: List[str] = []
        self._last_flush = 0.0
        self.flush_every_s = flush_every_s
        if self.path.exists() and resume_step is not None:
            with self.path.open() as f:
                for row in csv.DictReader(f):
                    step = int(row["step"])
                    kept = {k: v for k, v in row.items() if v not in ("", None) and k != "step"
                            and not (step >= resume_step and k.startswith(("train/", "perf/", "moe/")))
                            and not (step > resume_step)}
                    if kept:
                        self.rows[step] = kept
                        for k in kept:
                            if k not in self.keys:
                                self.keys.append(k)

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args, **kwargs) -> None:
        pass  # the resolved config is config.yaml in the run directory

    @rank_zero_only
    def log_metrics(self, metrics: Dict[str, float], step: Optional[int] = None) -> None:
        step = int(step if step is not None else metrics.get("step", 0))
        row = self.rows.setdefault(step, {})
        for k, v in metrics.items():
            if k in ("epoch", "step"):
                continue
            row[k] = float(v.item() if hasattr(v, "item") else v)
            if k not in self.keys:
                self.keys.append(k)
        if time.monotonic() - self._last_flush > self.flush_every_s:
            self.save()

    @rank_zero_only
    def save(self) -> None:
        self._last_flush = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step"] + self.keys)
            for step in sorted(self.rows):
                row = self.rows[step]
                w.writerow([step] + [row.get(k, "") for k in self.keys])
        os.replace(tmp, self.path)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    with Path(path).open() as f:
        return [{k: (float(v) if v not in ("", None) and k != "step" else (int(v) if k == "step" else None))
                 for k, v in row.items()} for row in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------ W&B: which mode
def resolve_wandb_mode(setting: str, probe: bool = True) -> Tuple[Optional[str], str]:
    """The W&B mode, None (no W&B), "online" or "offline", and why, in words.

    `logging.wandb=disabled` and WANDB_MODE win, then `logging.wandb=online|offline`. `auto` is offline-first:
    offline inside a SLURM job (SLURM_JOB_ID; no probe) or when not logged in; online only when logged in AND the
    server answers within PROBE_TIMEOUT_S (wandb_reachable; `probe=False`: offline without asking)."""
    if setting == "disabled":
        return None, "logging.wandb=disabled"
    env = os.environ.get("WANDB_MODE")
    if env:
        if env in ("disabled", "dryrun_disabled"):
            return None, f"WANDB_MODE={env}"
        return ("offline" if env in ("offline", "dryrun") else "online" if env == "run" else env), f"WANDB_MODE={env}"
    if setting in ("online", "offline"):
        return setting, f"logging.wandb={setting}"
    if os.environ.get("SLURM_JOB_ID"):
        return "offline", "auto: inside SLURM job " + os.environ["SLURM_JOB_ID"]
    source = wandb_api_key_source()
    if source is None:
        return "offline", "auto: not logged in (no WANDB_API_KEY, no netrc entry: `wandb login`)"
    if not probe:
        return "offline", "auto: not probed"
    ok, detail = wandb_reachable()
    if not ok:
        return "offline", f"auto: W&B server not reachable ({detail})"
    return "online", f"auto: logged in ({source}), {detail} reachable"


def wandb_mode(setting: str) -> Optional[str]:
    """Resolve the W&B mode: None (no W&B), 'online' or 'offline' (resolve_wandb_mode without the reason)."""
    return resolve_wandb_mode(setting)[0]


def wandb_settings(mode: Optional[str] = None, **overrides: Any):
    """wandb.Settings for every W&B run of this repository: console output captured (one file per segment, so a
    resumed run keeps the earlier segments' logs), a short init timeout, and online a bounded wait for uploads
    at the end (what is not uploaded stays on disk for `wandb sync`)."""
    import wandb

    kw: Dict[str, Any] = dict(init_timeout=INIT_TIMEOUT_S, silent=True, console="wrap", console_multipart=True)
    if mode == "online":
        kw["finish_timeout"] = FINISH_TIMEOUT_S
    kw.update(overrides)
    return wandb.Settings(**kw)


# ------------------------------------------------------------------------------------ W&B: the training run
def define_step_metrics(run, families: Sequence[str] = SECTIONS) -> None:
    """Plot every metric family against tokens seen (step_sync fills it in for a log call that lacks it, e.g.
    images), everything else against trainer/global_step; val/loss's summary is its minimum and last value."""
    run.define_metric(GLOBAL_STEP)
    run.define_metric(STEP_METRIC, summary="max")
    run.define_metric("*", step_metric=GLOBAL_STEP, step_sync=True)
    for family in dict.fromkeys(f.strip("/") for f in families if f.strip("/")):
        run.define_metric(f"{family}/*", step_metric=STEP_METRIC, step_sync=True)
    run.define_metric("val/loss", step_metric=STEP_METRIC, step_sync=True, summary="min,last")


def make_wandb_logger(run_dir: Path, wandb_id: str, run_name: str, setting: str, project: str,
                      entity: Optional[str], tags: List[str], config: Dict[str, Any], group: Optional[str] = None,
                      job_type: Optional[str] = None, families: Sequence[str] = ()) -> Optional[Logger]:
    """Lightning's WandbLogger for one training run, or None (W&B off, or it could not start: the run goes on
    with metrics.csv). Rank 0 resolves the mode (one line on stderr says which and why) and starts the W&B run
    now rather than mid-training; an online start that fails falls back to offline."""
    zero = rank_zero_only.rank == 0
    mode, why = resolve_wandb_mode(setting, probe=zero)  # other ranks never start a W&B run: no probe
    if mode is None:
        return None
    if zero:
        where = "; upload later with `make sync RUN={}`".format(run_dir) if mode == "offline" else ""
        print(f"W&B: {mode} ({why}){where}", file=sys.stderr, flush=True)
    from lightning.pytorch.loggers import WandbLogger

    for attempt in ([mode, "offline"] if mode == "online" else [mode]):
        try:
            logger = WandbLogger(project=project, entity=entity, name=run_name, id=wandb_id, save_dir=str(run_dir),
                                 resume="allow", mode=attempt, tags=list(tags), config=config, group=group,
                                 job_type=job_type, settings=wandb_settings(attempt))
            if zero:
                define_step_metrics(logger.experiment, tuple(SECTIONS) + tuple(families))
            return logger
        except Exception as e:  # W&B must never stop a run: offline, else the CSV log only
            _finish_current_run()
            then = "trying offline" if attempt == "online" else "metrics.csv is still written"
            warnings.warn(f"W&B {attempt} could not start ({type(e).__name__}: {e}); {then}.")
    return None


def _finish_current_run() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except Exception:
        pass


def wandb_run_of(logger) -> Any:
    """The started wandb Run behind a WandbLogger (None when it has none, e.g. on ranks > 0)."""
    return getattr(logger, "_experiment", None) if logger is not None else None


def wandb_location(logger) -> Optional[str]:
    """Where a W&B run can be read: its URL online, its local folder offline (None without a run)."""
    run = wandb_run_of(logger)
    if run is None:
        return None
    try:
        if run.settings.mode == "offline":
            return str(Path(run.dir).parent)
        return run.url
    except Exception:
        return None


def log_checkpoint_artifact(logger, path: Path, step: int, tokens_seen: int,
                            artifact_dir: Optional[Path] = None) -> bool:
    """Log a checkpoint file as the run's `model-<run id>` artifact (type model, aliases latest and step<N>).

    The file goes in as a hard link `artifact_dir`/model-step<N>.ckpt (default: <run_dir>/artifacts, next to
    <run_dir>/checkpoints; a copy where links are impossible), registered without a copy into W&B's staging area
    (policy immutable): no extra disk, and the content stays what was logged even when a resumed run later
    replaces last.ckpt. An offline run uploads it with `make sync`. Never raises."""
    run = wandb_run_of(logger)
    path = Path(path)
    if run is None or not path.exists():
        return False
    try:
        import shutil

        import wandb

        folder = Path(artifact_dir) if artifact_dir is not None else path.parent.parent / "artifacts"
        stable = folder / f"model-step{int(step):07d}{path.suffix}"
        stable.parent.mkdir(parents=True, exist_ok=True)
        if not stable.exists():  # a sharded (DeepSpeed) checkpoint is a folder: its files are linked one by one
            shutil.copytree(path, stable, copy_function=_link_or_copy) if path.is_dir() else _link_or_copy(path, stable)
        artifact = wandb.Artifact(name=f"model-{run.id}", type="model",
                                  metadata={"step": int(step), "tokens_seen": int(tokens_seen), "file": path.name})
        if stable.is_dir():
            artifact.add_dir(str(stable), name=path.name, policy="immutable")
        else:
            artifact.add_file(str(stable), name=path.name, policy="immutable")
        run.log_artifact(artifact, aliases=["latest", f"step{int(step)}"])
        return True
    except Exception as e:
        warnings.warn(f"checkpoint not logged to W&B ({type(e).__name__}: {e}); it is in {path}")
        return False


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copy2(src, dst)


class OshSync(L.Callback):
    """Live sync of an offline run through wandb-osh (`logging.wandb_osh=true`): after every validation, and
    once more when the run ends, wandb-osh's hook writes a command file into the communication directory; the
    `wandb-osh` process on the login node (docs/logging.md) then runs `wandb sync` on this run's folder.
    Only rank 0 triggers; a failure is a warning."""

    def __init__(self, logdir: Optional[Path], command_dir: Optional[str] = None):
        self.logdir = Path(logdir) if logdir is not None else None
        self.command_dir = Path(command_dir or OSH_COMMAND_DIR).expanduser()
        self._hook = None

    def trigger(self) -> bool:
        if self.logdir is None:
            return False
        try:
            if self._hook is None:
                from wandb_osh.hooks import TriggerWandbSyncHook

                self._hook = TriggerWandbSyncHook(communication_dir=self.command_dir)
            self._hook(self.logdir)
            return True
        except Exception as e:
            warnings.warn(f"wandb-osh: could not request a sync ({type(e).__name__}: {e})")
            return False

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.trigger()


def osh_callbacks(enabled: bool, logger, command_dir: Optional[str] = None) -> List[OshSync]:
    """[OshSync] when `logging.wandb_osh` is on and this rank holds an offline W&B run (a no-op on other ranks);
    online or without W&B there is nothing to sync."""
    if not enabled or logger is None:
        return []
    run = wandb_run_of(logger)
    if run is None:  # ranks > 0
        return []
    if run.settings.mode != "offline":
        print("W&B: logging.wandb_osh ignored (the run is online, nothing to sync).", file=sys.stderr)
        return []
    return [OshSync(Path(run.dir).parent, command_dir)]


def log_images(loggers: List[Logger], images: Dict[str, Path], step: Optional[int] = None) -> None:
    """Send PNGs to W&B if it is there; the files stay in the run directory either way."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            try:
                import wandb

                lg.experiment.log({k: wandb.Image(str(v)) for k, v in images.items()})
            except Exception as e:
                warnings.warn(f"Could not log images to W&B: {e}")


# ------------------------------------------------------------------------------------ per-expert loads
def expert_load_scalars_or_none(load, max_scalars: int = 64) -> Optional[Dict[str, float]]:
    """`load` [layers, experts] (a tensor, array or list of rows): the scalars moe/load/l{i}_e{j} when there are
    at most `max_scalars` of them, else None (then log_expert_load sends one table per layer instead: thousands
    of scalar columns make W&B's charts and the CSV unreadable)."""
    rows = _load_rows(load)
    if sum(len(r) for r in rows) > max_scalars:
        return None
    return {f"moe/load/l{i}_e{j}": float(v) for i, row in enumerate(rows) for j, v in enumerate(row)}


def log_expert_load(loggers: Sequence[Any], load, step: int, every_n_steps: int = 50,
                    tokens_seen: Optional[float] = None) -> bool:
    """Every `every_n_steps` steps, on the W&B run of `loggers` (if any): one wandb.Table per layer,
    moe/load_table/l{i} (expert, share), and one heatmap image of all layers, moe/load_heatmap (share / ideal
    1/E). Returns whether it logged. Never raises."""
    if step % max(1, every_n_steps) or rank_zero_only.rank != 0:
        return False
    runs = [wandb_run_of(lg) for lg in loggers if type(lg).__name__ == "WandbLogger"]
    runs = [r for r in runs if r is not None]
    if not runs:
        return False
    try:
        import wandb

        rows = _load_rows(load)
        payload: Dict[str, Any] = {
            f"moe/load_table/l{i}": wandb.Table(columns=["expert", "share"],
                                                data=[[j, float(v)] for j, v in enumerate(row)])
            for i, row in enumerate(rows)}
        payload["moe/load_heatmap"] = wandb.Image(_heatmap(rows, f"Expert load / ideal, step {step}"))
        payload[GLOBAL_STEP] = step
        if tokens_seen is not None:
            payload[STEP_METRIC] = float(tokens_seen)
        for run in runs:
            run.log(payload)
        return True
    except Exception as e:
        warnings.warn(f"expert loads not logged to W&B ({type(e).__name__}: {e})")
        return False


def add_expert_load(metrics: Dict[str, float], loggers: Sequence[Any], load, step: int,
                    max_scalars: int = 64, every_n_steps: int = 50) -> None:
    """Per-expert loads of a training step: scalar columns moe/load/l{i}_e{j} in `metrics` for small MoEs; for
    larger ones (a paper-scale Mixtral has 256, OLMoE 1,024) W&B tables and a heatmap every `every_n_steps`."""
    scalars = expert_load_scalars_or_none(load, max_scalars)
    if scalars is not None:
        metrics.update(scalars)
    else:
        log_expert_load(loggers, load, step, every_n_steps)


def _load_rows(load) -> List[List[float]]:
    if hasattr(load, "tolist"):
        load = load.tolist()
    return [[float(v) for v in (row.tolist() if hasattr(row, "tolist") else row)] for row in load]


def _heatmap(rows: List[List[float]], title: str):
    """A [layers, experts] image of share * experts (1 = the ideal uniform load), without per-cell labels."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = np.asarray(rows, dtype=float)
    ratio = data / np.clip(data.sum(axis=1, keepdims=True), 1e-12, None) * data.shape[1]
    fig = Figure(figsize=(min(16.0, 2.0 + 0.12 * data.shape[1]), min(12.0, 1.5 + 0.3 * data.shape[0])))
    ax = fig.add_subplot()
    im = ax.imshow(ratio, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(2.0, float(ratio.max())),
                   interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="load / ideal (1/E)")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # wandb.Image takes the rendered pixels
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
