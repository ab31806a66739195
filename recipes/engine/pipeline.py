"""Staged recipes: a list of `Stage`s run in order under one run directory, and the configs of their sub-runs.

One rule says whether a stage is done: its marker `<run_dir>/stages/<name>.json` exists and records the same
fingerprint of the stage's config keys as now. The marker is written (atomically) only after the stage's
function returned, and holds what it returned, so a finished stage is skipped on the next run of the same
directory and an interrupted one runs again (stages resume their own partial work: a training sub-run from
its checkpoint, sharded outputs from the shards already written). Changing a key a stage lists re-runs that
stage and every stage after it.

A stage that trains calls `recipes.engine.loop.train` on a sub-run config from `sub_run_config`, which
inherits the parent's trainer (strategy, devices, precision, ...), logging (project, entity, tags, mode) and
seed, and puts the sub-run under the parent's run directory.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from .config import load_config, to_dict
from .runs import write_json_atomic

# trainer.* keys that belong to one run's schedule, not to the hardware / strategy a sub-run inherits.
RUN_SCHEDULE_KEYS = ("max_steps", "stop_at_step", "val_check_interval", "limit_val_batches")


@dataclass(frozen=True)
class Stage:
    """`run(cfg, run_dir, results) -> dict` does the stage's work; `results` maps earlier stages' names to
    what they returned. `keys`: the config keys (dotted) whose values the stage's output depends on."""
    name: str
    run: Callable[[DictConfig, Path, Dict[str, Any]], Optional[Dict[str, Any]]]
    keys: Sequence[str] = ()
    job_type: Optional[str] = None  # W&B job_type of the stage's sub-runs (default: the name)


def fingerprint(cfg: DictConfig, keys: Sequence[str]) -> str:
    values = {k: OmegaConf.select(cfg, k, default=None) for k in keys}
    values = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) or OmegaConf.is_list(v) else v
              for k, v in values.items()}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def marker_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "stages" / f"{stage}.json"


def stage_done(cfg: DictConfig, run_dir: Path, stage: Stage) -> Optional[Dict[str, Any]]:
    """What the stage returned when it finished, if it finished with the current values of its keys."""
    path = marker_path(run_dir, stage.name)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("fingerprint") != fingerprint(cfg, stage.keys):
        return None
    return record.get("result") or {}


def run_stages(stages: Sequence[Stage], cfg: DictConfig, run_dir: Path,
               only: Optional[Sequence[str]] = None) -> Optional[Dict[str, Any]]:
    """Run the stages in order (all, or `only` the named ones, whose predecessors must have finished), skipping
    finished ones. Returns the run's summary: the union of the stages' results in order (a later stage's keys
    win), or None on ranks that have none (multi-process training: rank 0 alone goes on)."""
    run_dir = Path(run_dir)
    results: Dict[str, Any] = {}
    summary: Dict[str, Any] = {}
    rerun = False
    last_wanted = max((i for i, st in enumerate(stages) if only is None or st.name in only), default=-1)
    for index, stage in enumerate(stages):
        if index > last_wanted:
            break
        done = None if rerun else stage_done(cfg, run_dir, stage)
        if done is not None and (only is None or stage.name not in only):
            results[stage.name] = done
            summary.update(done)
            continue
        if only is not None and stage.name not in only:
            from .errors import ConfigError

            raise ConfigError(f"stage '{stage.name}' has not finished in {run_dir}: run it first "
                              f"(stages in order: {', '.join(s.name for s in stages)}).")
        print(f"[{cfg.run.name}] stage {stage.name} ...", flush=True)
        result = stage.run(cfg, run_dir, results)
        if result is None:  # a rank without results (multi-process training): nothing more to do here
            return None
        results[stage.name] = result
        summary.update(result)
        marker = marker_path(run_dir, stage.name)
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, {"stage": stage.name, "fingerprint": fingerprint(cfg, stage.keys), "result": result})
        rerun = True  # later stages consume this one's fresh output
    return summary


def sub_run_config(parent: DictConfig, recipe: str, root: Path, run_id: str, *,
                   data_keys: Sequence[str] = ("source", "files", "text_field", "text_template", "hub_name",
                                               "hub_config", "hub_split", "streaming", "num_proc",
                                               "max_chars_per_domain", "cache_dir", "block_size", "batch_size",
                                               "val_fraction", "num_workers"),
                   overrides: Sequence[str] = (), job_type: Optional[str] = None) -> DictConfig:
    """The config of a sub-run of `parent` (recipe `recipe`, directory `<root>/<run_id>`): the sub-recipe's own
    YAML, then the parent's trainer.* (minus its schedule: RUN_SCHEDULE_KEYS), logging.*, run.seed, model.arch /
    size and the listed data.* keys, then `overrides` (key=value strings). The sub-run is tagged with the parent
    recipe and grouped under the parent's run id on W&B."""
    inherited: Dict[str, Any] = {
        "run": {"seed": parent.run.seed, "root": str(root), "run_id": run_id},
        "trainer": {k: v for k, v in to_dict(parent.trainer).items() if k not in RUN_SCHEDULE_KEYS},
        "logging": to_dict(parent.logging),
        "data": {k: v for k, v in to_dict(parent.data).items() if k in data_keys},
        "model": {"arch": parent.model.arch, "size": parent.model.size},
    }
    inherited["logging"]["group"] = parent.logging.group or parent.run.run_id
    inherited["logging"]["job_type"] = job_type or "train"
    tags = list(inherited["logging"].get("tags") or [])
    for tag in (parent.run.name,):
        if tag not in tags:
            tags.append(tag)
    inherited["logging"]["tags"] = tags
    return load_config(recipe, list(overrides), inherit=(inherited, f"the parent run {parent.run.name}"))
