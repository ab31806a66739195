"""The stages of the twin_merging recipe, run in order under one run directory (recipes.engine.pipeline).

  base              <run>/base: recipe `tiny` trained twin.base_steps on all domains, exported to base/hf
  finetune_<domain> <run>/ft_<domain>: a fine-tune of base/hf on that domain alone, twin.finetune_steps at
                    twin.finetune_lr; twin.finetune=full (recipe `tiny`, all weights, exported as a model) or
                    lora (recipe `twin_lora_ft`, peft LoRA rank twin.lora_rank on twin.lora_targets; the
                    adapter is exported), to ft_<domain>/hf
  experts           <run>/experts: the shared expert and the SVD exclusive experts (experts.py)
  router            <run>/router.safetensors + router.json (router.py)
  evaluate          test losses of base, fine-tunes, task arithmetic, TIES and Twin-Merging, normalised
                    scores, <run>/table.json, <run>/scores.png, W&B (evaluate.py); summary.json is the union
                    of what the stages return

Which stage re-runs when a setting changes: each stage lists the config keys its output depends on (`keys`);
the engine re-runs a stage whose keys changed and every stage after it. A stage that runs also checks its
own output: each output records a stamp (the fingerprint of its keys and of the keys of all stages before
it) and is reused only when the stamp is the current one, so a re-run stage really redoes its work, while an
interrupted one resumes (a training sub-run from its checkpoint). Outputs without a stamp (run directories
from before the stamps) are reused as they are, and stamped. Changing twin.router_prefix_len retrains the
router only (and re-evaluates).

The training sub-runs take their config from recipes.engine.pipeline.sub_run_config (the parent's trainer,
logging, seed, model arch / size and all data.* keys) plus the parent's optim.* and the stage's own
schedule; they are standard run directories (config.yaml, checkpoints/, metrics.csv, summary.json).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from data.config import DataConfig
from recipes.engine.config import to_dict
from recipes.engine.errors import ConfigError
from recipes.engine.pipeline import Stage, fingerprint, sub_run_config
from recipes.engine.runs import write_json_atomic

from .config import check_twin, resolved, svd_rank

STAMP_FILE = "twin_stamp.json"  # in a training stage's directory: the stamp of the settings it trains with
ALL_DATA_KEYS = tuple(f.name for f in fields(DataConfig))
# data.* keys that change the blocks a model sees (not where they are cached or how fast they load)
CONTENT_DATA_KEYS = tuple(k for k in ALL_DATA_KEYS if k not in ("cache_dir", "num_workers", "val_batch_size"))
BASE_KEYS = ("model.arch", "model.size", "model.overrides", "run.seed", "optim", "trainer.precision",
             "trainer.accumulate_grad_batches", *(f"data.{k}" for k in CONTENT_DATA_KEYS), "twin.base_steps")
EXPERTS_KEYS = ("twin.protocol", "twin.lam", "twin.rank", "twin.rank_rounding", "twin.shared_exclude",
                "twin.lora_merge")
ROUTER_KEYS = ("twin.protocol", "twin.router", "twin.router_width", "twin.router_epochs", "twin.router_lr",
               "twin.router_train_blocks", "twin.router_prefix_len")
EVALUATE_KEYS = ("twin.eval_batches", "twin.ties_density")
FINETUNE_WARMUP_STEPS = 5


def finetune_keys(cfg) -> Tuple[str, ...]:
    keys = ("twin.finetune", "twin.finetune_steps", "twin.finetune_lr")
    if cfg.twin.finetune == "lora":
        keys += ("twin.lora_rank", "twin.lora_alpha", "twin.lora_targets")
    return keys


def stage_keys(cfg) -> List[Tuple[str, Sequence[str]]]:
    """(stage name, its config keys) in the order the stages run."""
    return ([("base", BASE_KEYS)] + [(f"finetune_{d}", finetune_keys(cfg)) for d in cfg.data.domains]
            + [("experts", EXPERTS_KEYS), ("router", ROUTER_KEYS), ("evaluate", EVALUATE_KEYS)])


def stamp(cfg, stage: str) -> str:
    """Fingerprint of the keys of `stage` and of every stage before it: what the stage's output depends on."""
    keys: List[str] = []
    for name, ks in stage_keys(cfg):
        keys += [k for k in ks if k not in keys]
        if name == stage:
            return fingerprint(cfg, keys)
    raise KeyError(stage)


def say(cfg, msg: str) -> None:
    print(f"[{cfg.run.name}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ sub-run configs
def _value(v: Any) -> str:
    """A config value as the right-hand side of a key=value override (JSON is valid YAML)."""
    return json.dumps(v)


def _schedule_overrides(cfg, steps: int) -> List[str]:
    """The parent's optim.* and checkpoint interval, and a schedule of `steps` steps validated at the end."""
    out = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
           f"checkpoint.every_n_steps={cfg.checkpoint.every_n_steps}", f"checkpoint.keep={cfg.checkpoint.keep}"]
    out += [f"optim.{k}={_value(v)}" for k, v in to_dict(cfg.optim).items()]
    if cfg.model.overrides:
        out.append(f"model.overrides={_value(to_dict(cfg.model.overrides))}")
    return out


def base_config(cfg, run_dir: Path):
    """Config of the base sub-run <run_dir>/base: recipe `tiny` on all domains for twin.base_steps."""
    return sub_run_config(cfg, "tiny", root=Path(run_dir), run_id="base", data_keys=ALL_DATA_KEYS,
                          overrides=_schedule_overrides(cfg, cfg.twin.base_steps), job_type="pretrain")


def finetune_config(cfg, run_dir: Path, domain: str):
    """Config of the fine-tune sub-run <run_dir>/ft_<domain>: from base/hf, on `domain` alone."""
    tc = cfg.twin
    base_hf = (Path(run_dir) / "base" / "hf").resolve()
    overrides = _schedule_overrides(cfg, tc.finetune_steps) + [
        f"model.pretrained={_value(str(base_hf))}", f"data.domains={_value([domain])}",
        f"optim.lr={tc.finetune_lr}", f"optim.warmup_steps={FINETUNE_WARMUP_STEPS}"]
    recipe = "tiny"
    if tc.finetune == "lora":
        recipe = "twin_lora_ft"
        overrides += [f"twin_lora_ft.rank={tc.lora_rank}", f"twin_lora_ft.alpha={tc.lora_alpha}",
                      f"twin_lora_ft.targets={_value(list(tc.lora_targets))}", "optim.weight_decay=0.0"]
    return sub_run_config(cfg, recipe, root=Path(run_dir), run_id=f"ft_{domain}", data_keys=ALL_DATA_KEYS,
                          overrides=overrides, job_type="finetune")


# ------------------------------------------------------------------------------------ training stages
def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _clear_training(stage_dir: Path) -> None:
    """Remove a training stage's outputs made with other settings (its W&B files and config.yaml stay)."""
    for name in ("hf", "hf.tmp", "checkpoints"):
        shutil.rmtree(stage_dir / name, ignore_errors=True)
    for path in [stage_dir / "summary.json", stage_dir / "metrics.csv", stage_dir / "status.json",
                 *stage_dir.glob("hpc_ckpt_*.ckpt")]:
        if path.exists():
            path.unlink()


def train_and_export(cfg, run_dir: Path, name: str, sub_cfg, current: str) -> Optional[Path]:
    """Train the sub-run `sub_cfg` in <run_dir>/<name> (resuming its checkpoint) and export it to <name>/hf.

    Returns hf, or None when the training ended before its last step without an error (no summary.json at
    max_steps; a signal raises recipes.engine.loop.RunInterrupted instead). An hf/ already there is reused
    when it was made with the current settings (`current`, the stage's stamp) or has no stamp (an older run
    directory); other settings' outputs are removed first."""
    from recipes.engine.checkpointing import newest_checkpoint
    from recipes.engine.export import export
    from recipes.engine.loop import train

    stage_dir = Path(run_dir) / name
    hf = stage_dir / "hf"
    recorded = (_read_json(stage_dir / STAMP_FILE) or {}).get("stamp")
    if recorded is not None and recorded != current:
        say(cfg, f"{name}: the settings changed since {stage_dir} was trained: training it again")
        _clear_training(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stage_dir / STAMP_FILE, {"stamp": current})
    if hf.is_dir():  # renamed into place only when whole
        say(cfg, f"{name}: reusing {hf}")
        return hf
    summary = _read_json(stage_dir / "summary.json") or {}
    if summary.get("step", -1) < sub_cfg.trainer.max_steps:
        ckpt = newest_checkpoint(stage_dir)
        say(cfg, f"{name}: training recipe {sub_cfg.run.name} for {sub_cfg.trainer.max_steps} steps in {stage_dir}"
            + (f" (resuming from {ckpt[0].name}, step {ckpt[1]})" if ckpt else ""))
        train(sub_cfg, run_dir=stage_dir, resume=ckpt is not None)
        summary = _read_json(stage_dir / "summary.json") or {}
        if summary.get("step", -1) < sub_cfg.trainer.max_steps:
            say(cfg, f"{name}: the training stopped before step {sub_cfg.trainer.max_steps}; run the same run "
                "directory again to resume it.")
            return None
    say(cfg, f"{name}: exporting the newest checkpoint to {hf}")
    tmp = stage_dir / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export(stage_dir, out_dir=tmp)
    tmp.replace(hf)
    return hf


def base_stage(cfg, run_dir: Path, results: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    hf = train_and_export(cfg, run_dir, "base", base_config(cfg, run_dir), stamp(cfg, "base"))
    return None if hf is None else {"base_model": str(hf)}


def finetune_stage(cfg, run_dir: Path, results: Dict[str, Any], *, domain: str) -> Optional[Dict[str, Any]]:
    name = f"finetune_{domain}"
    hf = train_and_export(cfg, run_dir, f"ft_{domain}", finetune_config(cfg, run_dir, domain), stamp(cfg, name))
    return None if hf is None else {f"finetuned_model/{domain}": str(hf)}


# ------------------------------------------------------------------------------------ experts, router
def factorwise(cfg) -> bool:
    """LoRA fine-tunes merged factor by factor (twin.finetune=lora with twin.lora_merge=factorwise)."""
    return cfg.twin.finetune == "lora" and resolved(cfg.twin)["lora_merge"] == "factorwise"


def experts_stage(cfg, run_dir: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    from models.factory import load_pretrained

    from .experts import (
        build_experts,
        build_lora_factor_experts,
        classifier_keys,
        excluded_keys,
        finetuned_lora_factors,
        finetuned_state,
    )

    tc = cfg.twin
    eff = resolved(tc)
    run_dir = Path(run_dir)
    exp_dir = run_dir / "experts"
    domains = list(cfg.data.domains)
    current = stamp(cfg, "experts")
    wanted = {"domains": domains, "finetune": tc.finetune, "lam": eff["lam"], "rank": svd_rank(tc)}
    info = _read_json(exp_dir / "experts.json")
    files = all((exp_dir / f).exists() for f in ("shared.safetensors", "experts.safetensors"))
    if info is not None and files and (info.get("stamp") == current or
                                       ("stamp" not in info and all(info.get(k) == v for k, v in wanted.items()))):
        say(cfg, f"experts: reusing {exp_dir}")
        if "stamp" not in info:
            info["stamp"] = current
            write_json_atomic(exp_dir / "experts.json", info)
    else:
        base_hf = run_dir / "base" / "hf"
        say(cfg, f"experts: shared expert (lambda {eff['lam']}, protocol {tc.protocol}) and {len(domains)} exclusive "
            f"experts at SVD rank {svd_rank(tc)} ({eff['rank_rounding']}) from the {tc.finetune} fine-tunes")
        base_model = load_pretrained(str(base_hf)).eval()
        base_sd = {k: v.clone() for k, v in base_model.state_dict().items()}
        exclude = excluded_keys(list(base_sd), eff["shared_exclude"], classifier_keys(base_model))
        if exclude:
            say(cfg, f"experts: kept at the base in the shared expert: {', '.join(exclude)}")
        common = dict(rounding=eff["rank_rounding"], exclude=exclude)
        if factorwise(cfg):
            loaded = [finetuned_lora_factors(base_hf, run_dir / f"ft_{d}" / "hf") for d in domains]
            info = build_lora_factor_experts(exp_dir, base_sd, [f for f, _ in loaded], loaded[0][1], eff["lam"],
                                             svd_rank(tc), dict(wanted, stamp=current), **common)
        else:
            loaded = [finetuned_state(tc.finetune, base_hf, run_dir / f"ft_{d}" / "hf") for d in domains]
            info = build_experts(exp_dir, base_sd, [sd for sd, _ in loaded], loaded[0][1], eff["lam"], svd_rank(tc),
                                 dict(wanted, stamp=current), **common)
        say(cfg, f"experts: {info['factored_bytes'] / 2**20:.2f} MB of factors vs {info['dense_bytes'] / 2**20:.2f} "
            f"MB dense, built in {info['build_seconds']:.1f} s")
    return {"expert_storage_bytes": info["factored_bytes"], "dense_task_vector_bytes": info["dense_bytes"],
            "build_experts_s": info["build_seconds"]}


def router_stage(cfg, run_dir: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    from models.factory import load_pretrained
    from recipes.engine.build import build_datamodule
    from recipes.engine.runs import load_safetensors

    from .router import read_router_meta, save_router, train_router

    tc = cfg.twin
    run_dir = Path(run_dir)
    domains = list(cfg.data.domains)
    prefix = int(tc.router_prefix_len)
    current = stamp(cfg, "router")
    meta = read_router_meta(run_dir)
    if meta is not None and (meta.get("stamp") == current or
                             ("stamp" not in meta and meta.get("prefix_len", 0) == prefix
                              and meta.get("domains") == domains)):
        say(cfg, f"router: reusing {run_dir / 'router.json'}")
        if "stamp" not in meta:
            meta["stamp"] = current
            write_json_atomic(run_dir / "router.json", meta)
    else:
        eff = resolved(tc)
        say(cfg, f"router: the {eff['router']} router, {eff['router_epochs']} epochs on the shared model's hidden "
            "states")
        dm = build_datamodule(cfg)
        dm.setup("fit")
        # dataset domain indices follow dm.domain_names; experts and router outputs follow `domains`
        to_task = [domains.index(name) for name in dm.domain_names]
        shared_model = load_pretrained(str(run_dir / "base" / "hf")).eval()
        shared_model.load_state_dict(load_safetensors(run_dir / "experts" / "shared.safetensors"))
        state, meta = train_router(shared_model, dm, domains, to_task, arch=eff["router"],
                                   width=int(eff["router_width"]), epochs=int(eff["router_epochs"]),
                                   lr=float(eff["router_lr"]), train_blocks=int(eff["router_train_blocks"]),
                                   prefix_len=prefix, seed=int(cfg.run.seed),
                                   progress=bool(cfg.trainer.progress_bar), log=lambda m: say(cfg, m))
        meta["stamp"] = current
        save_router(run_dir, state, meta)
        say(cfg, f"router: selection accuracy {meta['select_acc']:.3f} at epoch {meta['best_epoch']}")
    return {"router_select_acc": meta["select_acc"], "router_prefix_len": int(meta.get("prefix_len", prefix)),
            "router_best_epoch": meta.get("best_epoch")}


# ------------------------------------------------------------------------------------ evaluation
def evaluate_stage(cfg, run_dir: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    from .evaluate import evaluate_methods, log_to_wandb, normalised_scores, plot_scores

    run_dir = Path(run_dir)
    domains = list(cfg.data.domains)
    out = evaluate_methods(cfg, run_dir, progress=bool(cfg.trainer.progress_bar), log=lambda m: say(cfg, m))
    table = out["test_loss"]
    normalised = normalised_scores(table, domains)
    own: Dict[str, Any] = {"recipe": cfg.run.name, "run_dir": str(run_dir), "domains": domains,
                           "finetune": cfg.twin.finetune, "protocol": cfg.twin.protocol,
                           "test_loss": table, "normalised_score": normalised,
                           "router_test_acc": out["router_test_acc"]}
    own.update({f"twin/normalised_mean/{m}": v["mean"] for m, v in normalised.items()})
    figure = plot_scores({m: normalised[m] for m in ["task_arithmetic", "ties", "twin_merging"]}, domains,
                         run_dir / "scores.png")
    own["figure"] = str(figure)
    summary: Dict[str, Any] = {}
    for earlier in results.values():
        summary.update(earlier)
    summary.update(own)
    own["wandb_logged"] = summary["wandb_logged"] = log_to_wandb(cfg, run_dir, summary, figure)
    write_json_atomic(run_dir / "table.json", summary)
    say(cfg, "evaluate: mean normalised score " + ", ".join(
        f"{m} {normalised[m]['mean']:.3f}" for m in ("task_arithmetic", "ties", "twin_merging")))
    return own


def stages(cfg) -> List[Stage]:
    """The Stage list of twin_merging (Recipe.stages)."""
    run = {"base": base_stage, "experts": experts_stage, "router": router_stage, "evaluate": evaluate_stage}
    out = []
    for name, keys in stage_keys(cfg):
        if name.startswith("finetune_"):
            out.append(Stage(name, partial(finetune_stage, domain=name[len("finetune_"):]), keys=keys,
                             job_type="finetune"))
        else:
            out.append(Stage(name, run[name], keys=keys))
    return out


def check_config(cfg) -> None:
    """Recipe.validate of twin_merging: twin.* first, then the sub-run configs of the training stages."""
    check_twin(cfg)
    run_dir = Path(cfg.run.root) / cfg.run.name / (cfg.run.run_id or "<run_id>")
    for what, build in [("base", lambda: base_config(cfg, run_dir))] + [
            (f"fine-tune on {d}", lambda d=d: finetune_config(cfg, run_dir, d)) for d in cfg.data.domains]:
        try:
            build()
        except ConfigError as e:
            raise ConfigError(f"twin_merging: the {what} sub-run's config is invalid: {e}") from None
