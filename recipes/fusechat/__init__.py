"""FuseChat: fuse source models with DIFFERENT tokenizers into a pivot model (Wan et al., 2024), then merge.

    python -m recipes fuse --stage represent|align|train|merge|all [--run-dir DIR] [key=value ...]
    python -m recipes train fusechat [key=value ...]                       (all stages)

Four stages under one run directory (its layout: recipes/fusechat/common.py). Each is skipped when it finished
with the current values of the config keys it depends on (a marker under stages/, recipes.engine.pipeline);
a cut stage resumes its unfinished shards and sub-runs, and outputs made with other settings are discarded.

  represent  (represent.py) train or take the pivot and every source; run each over the same texts (the
             pivot's training blocks, re-tokenised by each source): top-k logits + ids per position, mean CE
             per sequence.
  align      (align.py) DTW alignment of the two tokenisations, vocabulary map (exact, minimum edit distance
             or statistics), the source's top-k re-expressed in the pivot vocabulary.
  train      (train.py) fused target per block (MinCE or exp(-CE) weighted); one target per source initialised
             from the pivot, loss lam * CLM + (1 - lam) * sparse CE(student, fused); a CLM-only baseline.
  merge      (merge.py) the targets merged into the pivot (models.merging, default SCE) and the compared
             methods; validation loss per domain of every model, a plot and a greedy sample.

The options and their checks (run when the config is loaded, before any training): config.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from recipes.engine.panels import Panel
from recipes.engine.recipe import Recipe, register

from .config import STAGE_KEYS, STAGES, FuseChatConfig, FuseModelConfig, check

HERE = Path(__file__).resolve().parent


def stages(cfg) -> List[Any]:
    """The pipeline's stages, each with the config keys its output depends on (cumulative)."""
    from recipes.engine.pipeline import Stage

    from .align import align_stage
    from .merge import merge_stage
    from .represent import represent_stage
    from .train import train_stage

    functions = {"represent": represent_stage, "align": align_stage, "train": train_stage, "merge": merge_stage}
    return [Stage(name, functions[name], keys=STAGE_KEYS[name]) for name in STAGES]


def _check_stage_names(names: Sequence[str]) -> None:
    from recipes.engine.errors import ConfigError

    for name in names:
        if name not in STAGES:
            raise ConfigError(f"Unknown stage '{name}'; stages: {', '.join(STAGES)} or all.")


def run_stages(cfg, run_dir: Path, names: Sequence[str]) -> Optional[Dict[str, Any]]:
    """Run the named stages (again, if they finished: each skips its own complete work) after any earlier
    stage that has not finished with the current settings. Returns the summary of the stages up to the last
    named one (None on a process that has none: see recipes.engine.pipeline.run_stages)."""
    from recipes.engine.pipeline import run_stages as run_pipeline

    _check_stage_names(names)
    check(cfg)
    run_dir = Path(run_dir).resolve()  # sub-run configs record absolute paths
    run_dir.mkdir(parents=True, exist_ok=True)
    last = max(STAGES.index(n) for n in names)
    return run_pipeline(stages(cfg)[: last + 1], cfg, run_dir, only=list(names))


def run(cfg, run_dir: Path) -> Optional[Dict[str, Any]]:
    """Every stage in order, as `python -m recipes train fusechat` runs them (each skipped when finished);
    returns the run's summary (summary.json), or None on a process that wrote none."""
    from recipes.engine.loop import train

    run_dir = Path(run_dir).resolve()
    summary = run_dir / "summary.json"
    if summary.exists():
        summary.unlink()  # rewritten from the stages' results
    train(cfg, run_dir=run_dir)
    return json.loads(summary.read_text()) if summary.exists() else None


def _resolve_run_dir(cfg, stage: str, run_dir: Optional[Path]) -> Path:
    """--run-dir; else <run.root>/fusechat/<run.run_id> (a new run or the one to continue); else a new run
    directory (represent or all only: a later stage continues a run)."""
    from recipes.engine.errors import ConfigError
    from recipes.engine.runs import check_run_id, make_run_dir

    if run_dir is not None:
        return run_dir.expanduser().resolve()
    if cfg.run.run_id:
        return (Path(cfg.run.root) / cfg.run.name / check_run_id(cfg.run.run_id)).resolve()
    if stage in ("all", STAGES[0]):
        return make_run_dir(cfg).resolve()
    raise ConfigError(f"--stage {stage} continues a run: give its directory (--run-dir DIR, printed by the first "
                      "stage) or run.run_id=<its id>.")


def _config_and_run_dir(stage: str, run_dir: Optional[Path], overrides: List[str]):
    """The config and run directory of a `fuse` command. Continuing a run (its directory holds a config.yaml):
    the run's saved settings, then the overrides; else the recipe's settings and the overrides."""
    from recipes.engine.config import load_config
    from recipes.engine.runs import load_run_config

    if run_dir is not None and (run_dir / "config.yaml").exists():
        run_dir = run_dir.expanduser().resolve()
        cfg = load_config("fusechat", overrides, base=load_run_config(run_dir))
    else:
        cfg = load_config("fusechat", overrides)
        run_dir = _resolve_run_dir(cfg, stage, run_dir)
        if (run_dir / "config.yaml").exists():  # run.run_id of an existing run
            cfg = load_config("fusechat", overrides, base=load_run_config(run_dir))
    cfg.run.run_id = run_dir.name
    return cfg, run_dir


def main(argv: Optional[List[str]] = None) -> int:
    """python -m recipes fuse: run one stage of the FuseChat pipeline, or all of them."""
    from recipes.engine.errors import ConfigError
    from recipes.engine.loop import RunInterrupted
    from recipes.engine.runs import save_run_config, write_json_atomic

    from .common import ranks

    parser = argparse.ArgumentParser(
        prog="python -m recipes fuse",
        description="FuseChat: represent -> align -> train -> merge; each stage skips what is already complete.")
    parser.add_argument("--stage", default="all", help=f"one of {', '.join(STAGES)}, or all (default)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="the run directory; default: <run.root>/fusechat/<run.run_id or a new id> (a stage "
                             "after represent needs --run-dir or run.run_id)")
    parser.add_argument("overrides", nargs="*",
                        help="config overrides key=value (all keys: python -m recipes show fusechat); an existing "
                             "run directory's saved config.yaml is the base they apply to")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.stage != "all":
            _check_stage_names([args.stage])
        cfg, run_dir = _config_and_run_dir(args.stage, args.run_dir, args.overrides)
        if args.stage == "all":
            summary = run(cfg, run_dir)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            first = ranks().rank == 0  # the other tasks of a multi-task run (srun, torchrun) share its files
            if first:
                save_run_config(cfg, run_dir / "config.yaml")
            summary = run_stages(cfg, run_dir, [args.stage])
            if summary is not None and first:
                write_json_atomic(run_dir / "summary.json", summary)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:  # SIGUSR1 / SIGTERM outside a training (common.check_signals)
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    if summary is not None and "merge" in summary:
        from .merge import evaluation_table

        print(evaluation_table(summary["merge"]["evaluation"]))
    print(f"run_dir: {run_dir}")
    return 0


def panels(cfg) -> List[Panel]:
    """Dashboard / report panels: the fusion loss terms of the target sub-runs, and the merge stage's evaluation
    (validation loss per model and domain; the models and domains follow from the config)."""
    fc = cfg.fusechat
    methods = list(dict.fromkeys([fc.merge_method] + list(fc.compare_merge_methods)))
    models = (["pivot"] + (["clm_only"] if fc.clm_baseline else []) + [f"target_{s.name}" for s in fc.sources]
              + [f"merged_{m}" for m in methods])
    note = "merge stage, summary.json only (the staged parent run has no W&B run)"
    out = [
        Panel("fusion loss terms of the targets", "line", ("fusion/clm", "fusion/fused_ce"), section="fusion",
              note="the target sub-runs: loss = lam * CLM + (1 - lam) * fused CE"),
        Panel("validation loss per model, all domains", "bar", tuple(f"fusechat/val_loss/{m}/all" for m in models),
              section="fusechat results", local_only=True, note=note),
    ]
    for domain in cfg.data.domains:
        out.append(Panel(f"validation loss per model, {domain}", "bar",
                         tuple(f"fusechat/val_loss/{m}/{domain}" for m in models), section="fusechat results",
                         local_only=True, note=note))
    out += [
        Panel("validation loss table (model x domain)", "table", table="merge.evaluation.val_loss",
              section="fusechat results", local_only=True, note="pivot tokens; lower is better"),
        Panel("evaluation chart", "image", files=("evaluation.png",), section="fusechat results", local_only=True),
    ]
    return out


register(Recipe(
    name="fusechat", yaml=HERE / "fusechat.yaml", method="fusechat",
    description="fuse sources with different tokenizers into a pivot (represent, align, train, merge)",
    sections={"fusechat": FuseChatConfig}, validate=check, stages=stages, commands={"fuse": main},
    metric_prefixes=("fusion/", "fusechat/"), panels=panels))

# FuseChat-7B-VaRM's setting: OpenChat-3.5 pivot, NH2-Mixtral-8x7B and NH2-SOLAR-10.7B sources (docs/paper_scale.md).
register(Recipe(
    name="fusechat_paper", yaml=HERE / "fusechat_paper.yaml", method="fusechat",
    description="FuseChat-7B-VaRM setting: OpenChat-3.5 pivot, NH2-Mixtral-8x7B + NH2-SOLAR-10.7B sources, VaRM",
    sections={"fusechat": FuseChatConfig}, validate=check, stages=stages,
    metric_prefixes=("fusion/", "fusechat/"), panels=panels))

__all__ = ["FuseChatConfig", "FuseModelConfig", "STAGES", "check", "main", "panels", "run", "run_stages", "stages"]
