"""The merge stage: merge the targets into the pivot, evaluate every model, plot and sample.

merged/ is the targets merged into the pivot with fusechat.merge_method (models.merging, default SCE), a
save_pretrained directory that `model.pretrained=` loads; merged_<method>/ for each compared method;
evaluation.json the validation loss per domain (pivot tokens) of the pivot, the CLM-only baseline, the
targets and the merges; evaluation.png the same as grouped bars.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from recipes.engine.errors import ConfigError
from recipes.engine.pipeline import fingerprint
from recipes.engine.runs import write_json_atomic

from .common import (
    check_signals,
    discard_stale,
    fusion_datamodule,
    input_device,
    load_fusion_model,
    load_tokenizer,
    ranks,
)
from .common import model_dir as entry_model_dir
from .config import MERGE_KEYS


def merge_kwargs(cfg, method: str) -> Dict[str, Any]:
    fc = cfg.fusechat
    return {"sce": {"select_topk": fc.sce_select_topk, "masked_final_sum": fc.sce_masked_final_sum},
            "ties": {"density": fc.ties_density}, "task_arithmetic": {"lam": fc.task_arithmetic_lam}}.get(method, {})


def merge_models(method: str, pivot_dir: Path, target_dirs: Sequence[Path], out_dir: Path, tokenizer=None,
                 **kw) -> Path:
    """Stream-merge the targets' model.safetensors into the pivot's with `method`; out_dir gets the merged
    weights plus the pivot's config and tokenizer files (a save_pretrained directory)."""
    from models.merging import merge_safetensors

    if (out_dir / "model.safetensors").exists() and (out_dir / "config.json").exists():
        return out_dir
    for d in [pivot_dir, *target_dirs]:
        if not (Path(d) / "model.safetensors").exists():
            raise ConfigError(f"{d}/model.safetensors is missing (a single-file safetensors model is needed to merge).")
    # a merge killed before (SIGKILL after SLURM's KillWait) left its temporary folder, as big as the model:
    # the run directory belongs to this process, so every such folder is stale
    for stale in out_dir.parent.glob(out_dir.name + ".tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        for f in Path(pivot_dir).iterdir():  # config, generation config, tokenizer
            if f.is_file() and f.name != "model.safetensors" and not f.name.endswith(".safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
        # SIGUSR1 / SIGTERM end the merge at the next tensor (RunInterrupted), well within SLURM's KillWait
        merge_safetensors(method, str(Path(pivot_dir) / "model.safetensors"),
                          [str(Path(d) / "model.safetensors") for d in target_dirs], str(tmp / "model.safetensors"),
                          on_tensor=lambda name: check_signals(f"the merge stage ({method}, tensor {name})"), **kw)
        if tokenizer is not None:  # the pivot's tokenizer may live outside its model directory
            tokenizer.save_pretrained(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


@torch.no_grad()
def validation_loss_per_domain(model, dataset, domain_names: Sequence[str], batch_size: int = 32,
                               max_blocks: int = 0) -> Dict[str, float]:
    """Mean next-token loss per domain (and 'all') over the validation blocks (token-weighted, over the tokens
    whose label is not -100: the assistant tokens of masked chat data); at most `max_blocks` of them (0: all),
    spread evenly over the set."""
    from recipes.engine.module import lm_loss

    if max_blocks and max_blocks < len(dataset):
        # evenly spaced over the whole set: validation blocks are stored domain after domain, so the
        # first max_blocks would see only the first domain
        indices = np.unique(np.linspace(0, len(dataset) - 1, max_blocks).round().astype(np.int64)).tolist()
    else:
        indices = list(range(len(dataset)))
    sums = np.zeros(len(domain_names) + 1)
    counts = np.zeros(len(domain_names) + 1)
    dev = input_device(model)
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start: start + batch_size]]
        ids = torch.stack([x["input_ids"] for x in items]).to(dev)
        logits = model(input_ids=ids).logits
        labels = torch.stack([x["labels"] for x in items]).to(logits.device)
        per_tok = lm_loss(logits, labels, reduction="none")  # 0 where the label is -100
        counted = (labels[:, 1:] != -100).sum(1)
        for x, row, n in zip(items, per_tok, counted.tolist()):
            d = int(x["domain"])
            sums[d] += float(row.sum())
            counts[d] += n
            sums[-1] += float(row.sum())
            counts[-1] += n
    out = {name: float(sums[i] / counts[i]) for i, name in enumerate(domain_names) if counts[i]}
    out["all"] = float(sums[-1] / max(counts[-1], 1))
    return out


@torch.no_grad()
def generate_text(model_dir: Path, prompt: str = "def ", max_new_tokens: int = 16) -> str:
    """Load a save_pretrained directory the way `model.pretrained=` does and greedily continue `prompt`."""
    from transformers import AutoTokenizer

    from models.factory import load_pretrained

    model = load_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)


def model_order(names) -> List[str]:
    """pivot, clm_only, the targets, the merges (evaluation.json stores its keys sorted)."""
    order = {"pivot": 0, "clm_only": 1}
    return sorted(names, key=lambda m: (order.get(m, 2 if m.startswith("target_") else 3), m))


def plot_evaluation(evaluation: Dict[str, Any], path: Path) -> Path:
    """Grouped bars: validation loss (pivot tokens) per domain for every evaluated model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(evaluation["domains"]) + ["all"]
    models = model_order(evaluation["val_loss"])
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(domains) + 0.25 * len(models)) + 2.0, 3.6), dpi=100)
    for k, name in enumerate(models):
        values = [evaluation["val_loss"][name].get(d, math.nan) for d in domains]
        ax.bar(np.arange(len(domains)) + (k - (len(models) - 1) / 2) * width, values, width, label=name)
    finite = [v for m in models for v in evaluation["val_loss"][m].values() if math.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        ax.set_ylim(max(0.0, low - 0.15 * (high - low + 1e-9) - 0.05), high + 0.1 * (high - low + 1e-9) + 0.05)
    ax.set_xticks(np.arange(len(domains)), domains)
    ax.set_ylabel("validation loss (nats / pivot token)")
    ax.set_title("FuseChat: pivot, CLM-only baseline, fused targets, merges")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1.0), loc="upper left", borderaxespad=0.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}" + path.suffix)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def evaluation_table(evaluation: Dict[str, Any]) -> str:
    """The validation losses as a text table, one model per line."""
    domains = list(evaluation["domains"]) + ["all"]
    lines = ["validation loss (pivot tokens)   " + "  ".join(f"{d:>9}" for d in domains)]
    for model in model_order(evaluation["val_loss"]):
        losses = evaluation["val_loss"][model]
        lines.append(f"{model:<32} " + "  ".join(f"{losses.get(d, math.nan):9.4f}" for d in domains))
    return "\n".join(lines)


def headline(evaluation: Dict[str, Any]) -> Dict[str, float]:
    """fusechat/val_loss/<model>/<domain>: the evaluation as flat summary keys."""
    return {f"fusechat/val_loss/{model}/{domain}": value
            for model, losses in evaluation.get("val_loss", {}).items() for domain, value in losses.items()}


def merge_stage(cfg, run_dir: Path, results: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """Merge the targets (fusechat.merge_method -> merged/, the compared methods -> merged_<m>/) and
    evaluate every model on the pivot's validation blocks per domain. Global rank 0 alone (with device_map
    auto each model takes all of a node's GPUs); the run's other tasks end here (None)."""
    if ranks().rank != 0:
        return None
    fc = cfg.fusechat
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    pivot_dir = entry_model_dir(cfg, run_dir, fc.pivot)
    target_dirs = [run_dir / f"target_{s.name}" / "hf" for s in fc.sources]
    for d in target_dirs:
        if not (d / "config.json").exists():
            raise ConfigError(f"{d} is missing: run the train stage first.")
    methods = list(dict.fromkeys([fc.merge_method] + list(fc.compare_merge_methods)))
    outputs = {m: run_dir / ("merged" if m == fc.merge_method else f"merged_{m}") for m in methods}
    eval_path, plot_path = run_dir / "evaluation.json", run_dir / "evaluation.png"
    discard_stale(run_dir, "merge", fingerprint(cfg, MERGE_KEYS),
                  [eval_path, plot_path, run_dir / "merged", *run_dir.glob("merged_*")])
    pivot_tok = load_tokenizer(fc.pivot, pivot_dir)
    merged: Dict[str, Path] = {}
    timings: Dict[str, float] = {}
    for method in methods:
        t = time.perf_counter()
        merged[method] = merge_models(method, pivot_dir, target_dirs, outputs[method], pivot_tok,
                                      **merge_kwargs(cfg, method))
        timings[method] = time.perf_counter() - t
    if eval_path.exists():
        evaluation = json.loads(eval_path.read_text())
    else:
        dm = fusion_datamodule(cfg, run_dir, pivot_dir)
        models: Dict[str, Path] = {"pivot": pivot_dir}
        if (run_dir / "clm_only" / "hf").exists():
            models["clm_only"] = run_dir / "clm_only" / "hf"
        models.update({f"target_{s.name}": d for s, d in zip(fc.sources, target_dirs)})
        models.update({f"merged_{m}": p for m, p in merged.items()})
        losses = {name: validation_loss_per_domain(load_fusion_model(cfg, path), dm.val_set, dm.domain_names,
                                                   fc.eval_batch_size, fc.eval_max_blocks)
                  for name, path in models.items()}
        evaluation = {"val_loss": losses, "domains": list(dm.domain_names), "val_blocks": len(dm.val_set),
                      "merge_method": fc.merge_method}
        write_json_atomic(eval_path, evaluation)
    if not plot_path.exists():
        plot_evaluation(evaluation, plot_path)
    merge = {"evaluation": evaluation, "evaluation_plot": str(plot_path), "merge_seconds": timings,
             "merged_model": str(merged[fc.merge_method]), "merged_sample": generate_text(merged[fc.merge_method]),
             "seconds": time.perf_counter() - t0}
    return {"merge": merge, **headline(evaluation)}
