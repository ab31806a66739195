"""Loggers: a CSV log that always works, and W&B that never blocks or crashes a run."""
from __future__ import annotations

import csv
import netrc
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

# W&B sorts metrics into dashboard sections by prefix; these are plotted against tokens seen.
STEP_METRIC = "train/tokens_seen"
SECTIONS = ("train", "val", "perf", "moe", "analysis", "tokenformer", "fusion", "twin")


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


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc()
        return any(host in rc.hosts for host in ("api.wandb.ai",)) or bool(
            [h for h in rc.hosts if "wandb" in h])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(setting: str) -> Optional[str]:
    """Resolve the W&B mode: None (no W&B), 'online' or 'offline'. WANDB_MODE wins over auto."""
    if setting == "disabled":
        return None
    env = os.environ.get("WANDB_MODE")
    if env:
        return None if env in ("disabled", "dryrun_disabled") else ("offline" if env in ("offline", "dryrun") else env)
    if setting in ("online", "offline"):
        return setting
    return "online" if wandb_logged_in() else "offline"


def make_wandb_logger(run_dir: Path, wandb_id: str, run_name: str, setting: str, project: str,
                      entity: Optional[str], tags: List[str], config: Dict[str, Any], group: Optional[str] = None,
                      job_type: Optional[str] = None) -> Optional[Logger]:
    mode = wandb_mode(setting)
    if mode is None:
        return None
    try:
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project=project, entity=entity, name=run_name, id=wandb_id, save_dir=str(run_dir),
                             resume="allow", mode=mode, tags=list(tags), config=config, group=group,
                             job_type=job_type,
                             settings=wandb.Settings(init_timeout=60, silent=True, console="off"))
        if rank_zero_only.rank == 0:
            exp = logger.experiment  # start it now, inside the try, rather than mid-training
            exp.define_metric(STEP_METRIC)
            for sec in SECTIONS:
                exp.define_metric(f"{sec}/*", step_metric=STEP_METRIC)
        return logger
    except Exception as e:  # W&B must never stop a run: fall back to the CSV log
        warnings.warn(f"W&B logging disabled for this run ({type(e).__name__}: {e}); metrics.csv still written.")
        return None


def log_images(loggers: List[Logger], images: Dict[str, Path], step: Optional[int] = None) -> None:
    """Send PNGs to W&B if it is there; the files stay in the run directory either way."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            try:
                import wandb

                lg.experiment.log({k: wandb.Image(str(v)) for k, v in images.items()})
            except Exception as e:
                warnings.warn(f"Could not log images to W&B: {e}")
