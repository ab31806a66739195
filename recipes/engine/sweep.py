"""Sweeps: one recipe over a grid or a list of override sets, each point its own run directory and W&B run.

    python -m recipes sweep <recipe> <sweep.yaml> [key=value ...]       every point, one after another
    python -m recipes sweep <recipe> <sweep.yaml> --index I [...]       point I only (a SLURM array task)
    python -m recipes sweep <recipe> <sweep.yaml> --count               how many points (for sbatch --array)

The sweep file:

    name: lr_nulls                  # default: the file's name
    fixed: {trainer.max_steps: 100} # overrides of every point (the command line's come after these)
    grid:                           # the cross product of these values ...
      optim.lr: [1.0e-3, 3.0e-3]
    points:                         # ... with each of these override sets (either key may be left out)
      - {adamoe.num_null_experts: 0, adamoe.top_k: 2}
      - {adamoe.num_null_experts: 8}

Point i runs as `run.run_id=<sweep id>-<i>` (under a SLURM array: slurm-<array job>-<i>, the id launch.sh
gives the task), with `logging.group=<sweep id>`, so its W&B runs are grouped. Every point's config is
resolved and validated before the first one trains. Running the sweep again skips finished points and
resumes cut ones; a SLURM array task that is requeued resumes its own point."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import yaml

from .errors import ConfigError


def read_sweep(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist.")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file {path} is not valid YAML: {e}") from None
    unknown = set(spec) - {"name", "fixed", "grid", "points"}
    if not isinstance(spec, dict) or unknown:
        raise ConfigError(f"sweep file {path}: expected the keys name, fixed, grid, points; got {sorted(unknown)}.")
    grid, points = spec.get("grid") or {}, spec.get("points") or [{}]
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"sweep file {path}: `grid` maps keys to non-empty lists of values.")
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError(f"sweep file {path}: `points` is a list of mappings key -> value.")
    if not spec.get("grid") and not spec.get("points"):
        raise ConfigError(f"sweep file {path} has neither `grid` nor `points`: nothing to sweep.")
    name = str(spec.get("name") or path.stem)
    from .config import check_run_id

    check_run_id(name)
    return {"name": name, "fixed": dict(spec.get("fixed") or {}), "grid": grid, "points": points}


def expand(spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The sweep's points: each `points` entry crossed with the grid, as flat key -> value mappings."""
    keys = list(spec["grid"])
    combos = list(itertools.product(*[spec["grid"][k] for k in keys])) or [()]
    return [{**point, **dict(zip(keys, combo))} for point in spec["points"] for combo in combos]


def _as_args(overrides: Dict[str, Any]) -> List[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]


def sweep_id(spec: Dict[str, Any]) -> str:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"slurm-{array}" if array else spec["name"]


def point_args(spec: Dict[str, Any], index: int, extra: Sequence[str]) -> List[str]:
    points = expand(spec)
    if not 0 <= index < len(points):
        raise ConfigError(f"sweep {spec['name']} has {len(points)} points; index {index} is out of range.")
    group = sweep_id(spec)
    return (_as_args(spec["fixed"]) + _as_args(points[index]) + list(extra)
            + [f"run.run_id={group}-{index}", f"logging.group={group}"])


def run_point(recipe: str, spec: Dict[str, Any], index: int, extra: Sequence[str]) -> int:
    """Train point `index` (or resume it when its run directory already holds a run)."""
    from .config import load_config
    from .loop import RunInterrupted, check_resume, resume_run, train
    from .runs import lock_run_dir, make_run_dir, record_segment

    args = point_args(spec, index, extra)
    cfg = load_config(recipe, args)
    run_dir = Path(cfg.run.root) / cfg.run.name / cfg.run.run_id
    lock = None
    try:
        if (run_dir / "config.yaml").exists():
            if (run_dir / "summary.json").exists() and json.loads((run_dir / "status.json").read_text()
                                                                  if (run_dir / "status.json").exists()
                                                                  else "{}").get("state") == "finished":
                print(f"[sweep] point {index}: finished earlier ({run_dir})")
                return 0
            check_resume(run_dir)
            lock = lock_run_dir(run_dir)
            print(f"[sweep] point {index}: resuming {run_dir}", flush=True)
            resume_run(run_dir)
        else:
            run_dir = make_run_dir(cfg)
            lock = lock_run_dir(run_dir)
            record_segment(run_dir, args, None, 0)
            print(f"[sweep] point {index}: {' '.join(_as_args(expand(spec)[index]))} -> {run_dir}", flush=True)
            train(cfg, run_dir=run_dir)
    except RunInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if lock is not None:
            lock.release()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes sweep", description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("sweep", type=Path)
    p.add_argument("overrides", nargs="*", help="key=value for every point (after the file's)")
    p.add_argument("--index", type=int, default=None, help="run this point only (SLURM array task id)")
    p.add_argument("--count", action="store_true", help="print the number of points and exit")
    a = p.parse_intermixed_args(argv)  # launch.sh puts --index between the file and the overrides
    from .config import load_config

    spec = read_sweep(a.sweep)
    points = expand(spec)
    if a.count:
        print(len(points))
        return 0
    for i in range(len(points)):  # every point must resolve before anything trains
        load_config(a.recipe, point_args(spec, i, a.overrides))
    if a.index is not None:
        return run_point(a.recipe, spec, a.index, a.overrides)
    t0, failed = time.time(), []
    for i in range(len(points)):
        code = run_point(a.recipe, spec, i, a.overrides)
        if code:
            failed.append(i)
            if code >= 128:  # interrupted by a signal: stop the sweep here, the next run continues it
                break
    print(f"[sweep] {spec['name']}: {len(points) - len(failed)}/{len(points)} points done in {time.time() - t0:.0f} s"
          + (f"; not done: {failed}" if failed else ""))
    return 1 if failed else 0
