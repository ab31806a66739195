"""Run directories and the files in them: run ids, atomic JSON / safetensors writes, the saved run config.

A run directory is `<run.root>/<recipe>/<run_id>/`. Everything written here goes to a temporary name in
the same folder first and is renamed into place, so a file under its final name is always whole.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from .config import check_run_id
from .errors import ConfigError

# The environment variable through which Lightning's DDP launcher hands the run id to its child processes.
RUN_ID_ENV = "LM_RECIPES_RUN_ID"


def new_run_id() -> str:
    """slurm-<job>[-<array task>] under SLURM (every requeued segment continues the same run), else a
    timestamp plus four random hex digits."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"-{task}" if task else "")
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def wandb_id_for(run_dir: Path) -> str:
    """The W&B run id of a run directory: <recipe>-<run_id>, stable across resumed segments."""
    run_dir = Path(run_dir)
    return f"{run_dir.parent.name}-{run_dir.name}".replace("/", "-")[:64]


def is_launching_process() -> bool:
    """True in the process that owns the run directory: not a DDP child (LOCAL_RANK > 0) and not another
    SLURM task of the same step (SLURM_PROCID > 0) or torchrun rank (RANK > 0)."""
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))


def make_run_dir(cfg: DictConfig, overwrite: bool = False) -> Path:
    """Create the run directory of a NEW run and fill in cfg.run.run_id.

    An existing run directory (it has a config.yaml) is refused with a pointer to `make resume`, unless
    `overwrite` (run.overwrite=true), which empties it first. Lightning's DDP launcher re-runs this command
    for local ranks > 0 (LOCAL_RANK set in their environment): they find the same run id and directory. The
    launching process never reads the id back, so a second train() in the same process (a pipeline recipe, a
    notebook, a test) gets a run of its own."""
    inherited = os.environ.get(RUN_ID_ENV) if not is_launching_process() else None
    run_id = check_run_id(cfg.run.run_id or inherited or new_run_id())
    os.environ[RUN_ID_ENV] = run_id
    cfg.run.run_id = run_id
    run_dir = Path(cfg.run.root) / cfg.run.name / run_id
    if is_launching_process() and (run_dir / "config.yaml").exists():
        if not overwrite:
            raise ConfigError(
                f"{run_dir} already holds a run. Continue it with `make resume RUN={run_dir}`, pick another "
                f"run.run_id, or start it over with run.overwrite=true (deletes its checkpoints and metrics).")
        _empty_run_dir(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def _empty_run_dir(run_dir: Path) -> None:
    import shutil

    for child in run_dir.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ------------------------------------------------------------------------------------------- the run lock
LOCK_NAME = ".lock"


class RunDirBusy(ConfigError):
    """Another live process holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory for the life of the process that holds it (`flock` on
    <run_dir>/.lock): a second process on the same directory is refused with a message naming the holder. The
    kernel drops the lock when its holder dies, however it dies (kill -9, node reboot of a local disk, a
    requeued SLURM job's previous segment), so a stale lock is taken over without any cleanup."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise RunDirBusy(f"{self.path.parent} is in use by another process ({holder}). Wait for it to end, "
                             "or use another run.run_id.") from None
        os.ftruncate(fd, 0)
        job = os.environ.get("SLURM_JOB_ID")
        os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()}" + (f", SLURM job {job}" if job else "")
                      + f", since {time.strftime('%Y-%m-%d %H:%M:%S')}").encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: Path) -> Optional[RunLock]:
    """The run's lock in the launching process (None in DDP children and other ranks, which run under it)."""
    return RunLock(run_dir).acquire() if is_launching_process() else None


# ------------------------------------------------------------------------------------- status and segments
def write_status(run_dir: Path, state: str, **fields: Any) -> None:
    """<run_dir>/status.json: running | interrupted (resumable) | finished | failed, with details."""
    data = {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
            "pid": os.getpid(), **fields}
    if os.environ.get("SLURM_JOB_ID"):
        data["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    write_json_atomic(Path(run_dir) / "status.json", data)


def read_status(run_dir: Path) -> Dict[str, Any]:
    path = Path(run_dir) / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def record_segment(run_dir: Path, overrides, resumed_from: Optional[str], step: Optional[int]) -> None:
    """Append this segment's start to <run_dir>/segments.jsonl: time, host, SLURM job, overrides, checkpoint."""
    entry = {"start": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
             "overrides": list(overrides or []), "resumed_from": resumed_from, "step": step,
             "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
             "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT")}
    with open(Path(run_dir) / "segments.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def segments(run_dir: Path) -> list:
    path = Path(run_dir) / "segments.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


SEGMENT_TIMES = "segment_times.jsonl"


def record_segment_time(run_dir: Path, record: Dict[str, Any]) -> None:
    """Append the timing of one training segment (it ended: finished, interrupted or failed) to
    <run_dir>/segment_times.jsonl; `summary.json`'s wall time is the sum over these lines."""
    entry = {"end": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(), **record}
    with open(Path(run_dir) / SEGMENT_TIMES, "a") as f:
        f.write(json.dumps(entry, default=float) + "\n")


def segment_times(run_dir: Path) -> list:
    """The records of record_segment_time, oldest first (a torn last line, from a killed writer, is skipped)."""
    path = Path(run_dir) / SEGMENT_TIMES
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def clear_segment_times(run_dir: Path) -> None:
    """Forget the segment timings (a run that starts from step 0 again in the same directory)."""
    (Path(run_dir) / SEGMENT_TIMES).unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as indented JSON under `path`, atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


def save_safetensors_atomic(path: Path, tensors: Dict[str, Any], metadata: Optional[Dict[str, str]] = None) -> None:
    """Save a dict of tensors as safetensors under `path`, atomically (contiguous copies where needed)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_safetensors(path: Path) -> Dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_run_config(cfg: DictConfig, path: Path) -> None:
    """The fully resolved config as YAML, atomically."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)


def load_run_config(run_dir: Path) -> DictConfig:
    """The saved `config.yaml` of a run directory, as written at its start (no schema applied)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ConfigError(f"Run directory {run_dir} does not exist.")
    if not path.exists():
        raise ConfigError(f"No config.yaml in {run_dir}: is it a run directory?")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a run config.")
    return OmegaConf.create(data)


def run_recipe_name(run_dir: Path) -> str:
    """The recipe a run directory was trained with (run.name of its config.yaml)."""
    saved = load_run_config(run_dir)
    name = saved.get("run", {}).get("name")
    if not name:
        raise ConfigError(f"{Path(run_dir) / 'config.yaml'} names no recipe (run.name).")
    return str(name)


def load_run(run_dir: Path, overrides=None) -> DictConfig:
    """A run directory's saved config, resolved and validated against its recipe's current schema (plus
    `overrides`): what resume, export and post-hoc analyses start from."""
    from .config import load_config

    saved = load_run_config(run_dir)
    return load_config(run_recipe_name(run_dir), overrides, base=saved)
