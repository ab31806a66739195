"""Evaluation of Twin-Merging against its baselines, and the report: table, chart, W&B.

Score per domain: mean token loss on the test half (the SECOND half of the domain's validation blocks; the
router selected its epoch on the first half). Lower is better. Normalised score =
(loss_base - loss_method) / (loss_base - loss_finetuned_on_that_domain): the share of the fine-tuned
model's improvement over the base that a method keeps (1.0 = as good as the specialist, 0 = the base).
Methods: the base, each fine-tuned model, task arithmetic (twin.lam), TIES (twin.ties_density) and
Twin-Merging (shared expert + exclusive experts, mixed per sample by the router).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

EVAL_BATCH = 8  # blocks per evaluation batch


@torch.no_grad()
def eval_losses(model, dm, half: str, max_batches: int, routing_fn: Optional[Callable] = None,
                progress: bool = False, desc: str = "evaluate") -> Dict[str, float]:
    """Mean token loss per domain on one half ("select" or "test") of the validation blocks, over at most
    `max_batches` batches of EVAL_BATCH blocks per domain. `routing_fn(ids, domain)` runs before each batch
    (Twin-Merging sets the routing weights there). `progress`: a tqdm bar over the batches."""
    from tqdm import tqdm

    from .router import domain_halves

    select, test = domain_halves(dm.val_set, len(dm.domain_names))
    halves = select if half == "select" else test
    batches = []
    for dom_idx, name in enumerate(dm.domain_names):
        idx = halves[dom_idx][: max_batches * EVAL_BATCH]
        batches += [(name, idx[s:s + EVAL_BATCH]) for s in range(0, len(idx), EVAL_BATCH)]
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for name, idx in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        items = [dm.val_set[i] for i in idx]
        ids = torch.stack([b["input_ids"] for b in items])
        labels = torch.stack([b["labels"] for b in items])
        if routing_fn is not None:
            routing_fn(ids, name)
        out = model(input_ids=ids, labels=labels)
        sums[name] = sums.get(name, 0.0) + float(out.loss) * len(items)
        counts[name] = counts.get(name, 0) + len(items)
    return {k: sums[k] / counts[k] for k in sums}


def normalised_scores(table: Dict[str, Dict[str, float]], domains: List[str]) -> Dict[str, Dict[str, float]]:
    """Per method and domain (plus "mean"): (loss_base - loss) / (loss_base - loss_finetuned_<domain>); NaN
    where the fine-tune did not change the loss. `table` needs "base" and "finetuned_<domain>" rows."""
    out: Dict[str, Dict[str, float]] = {}
    for method, losses in table.items():
        out[method] = {}
        for d in domains:
            gain_ft = table["base"][d] - table[f"finetuned_{d}"][d]
            out[method][d] = (table["base"][d] - losses[d]) / gain_ft if abs(gain_ft) > 1e-9 else float("nan")
        out[method]["mean"] = sum(out[method][d] for d in domains) / len(domains)
    return out


def plot_scores(normalised: Dict[str, Dict[str, float]], domains: List[str], path: Path, title: str = "") -> Path:
    """Grouped bar chart: normalised score per domain (and mean) for every method; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    methods = list(normalised)
    cols = domains + ["mean"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cols) + 2), 3.6), dpi=100)
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(cols))]
        ax.bar(xs, [normalised[m][c] for c in cols], width, label=m)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.axhline(1.0, color="grey", linewidth=0.6, linestyle="--")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel("normalised score")
    ax.set_title(title or "Twin-Merging: (loss_base - loss) / (loss_base - loss_finetuned)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def log_to_wandb(cfg, run_dir: Path, summary: Dict[str, Any], figure: Optional[Path]) -> bool:
    """wandb.Table of the losses and of the normalised scores, the chart, and the headline numbers (keys
    `twin/*`) in the run summary, as the W&B run of `run_dir`. Never raises: returns whether it logged."""
    from recipes.engine.logs import wandb_mode
    from recipes.engine.runs import wandb_id_for

    mode = wandb_mode(cfg.logging.wandb)
    if mode is None:
        return False
    run_dir = Path(run_dir)
    try:
        import wandb

        from recipes.engine.config import to_dict

        domains = summary["domains"]
        tags = list(cfg.logging.tags)
        if cfg.run.name not in tags:
            tags.append(cfg.run.name)
        run = wandb.init(project=cfg.logging.project, entity=cfg.logging.entity, id=wandb_id_for(run_dir),
                         name=f"{cfg.run.name}/{run_dir.name}", dir=str(run_dir), mode=mode, resume="allow",
                         tags=tags, config=to_dict(cfg), job_type="evaluate",
                         settings=wandb.Settings(init_timeout=60, silent=True, console="off"))
        cols = ["method"] + domains + ["mean"]
        loss_rows = [[m] + [summary["test_loss"][m][d] for d in domains]
                     + [sum(summary["test_loss"][m][d] for d in domains) / len(domains)]
                     for m in summary["test_loss"]]
        norm_rows = [[m] + [v[c] for c in domains + ["mean"]] for m, v in summary["normalised_score"].items()]
        payload = {"twin/test_loss": wandb.Table(columns=cols, data=loss_rows),
                   "twin/normalised_score": wandb.Table(columns=cols, data=norm_rows)}
        if figure is not None and Path(figure).exists():
            payload["twin/scores_chart"] = wandb.Image(str(figure))
        run.log(payload)
        run.summary.update({k: v for k, v in summary.items() if k.startswith("twin/")})
        run.finish()
        return True
    except Exception as e:  # W&B must never stop the recipe: summary.json and table.json stay
        warnings.warn(f"W&B logging of the Twin-Merging table failed ({type(e).__name__}: {e}).")
        return False


def evaluate_methods(cfg, run_dir: Path, progress: bool = False,
                     log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Test losses of every method, from the stages' outputs in `run_dir` (base/hf, ft_<domain>/hf, experts/,
    router): {"test_loss": {method: {domain: loss}}, "router_test_acc": ...}."""
    from models.factory import load_pretrained
    from models.twin import set_routing_weights
    from recipes.engine.build import build_datamodule

    from .router import features, load_router

    tc = cfg.twin
    run_dir = Path(run_dir)
    domains = list(cfg.data.domains)
    base_hf = run_dir / "base" / "hf"
    nb = int(tc.eval_batches)
    dm = build_datamodule(cfg)
    dm.setup("fit")

    def run(name: str, model, routing_fn=None) -> None:
        table[name] = eval_losses(model, dm, "test", nb, routing_fn, progress, desc=f"evaluate {name}")
        mean = sum(table[name].values()) / len(table[name])
        log(f"evaluate: {name:<22} " + "  ".join(f"{d} {v:.4f}" for d, v in table[name].items())
            + f"  (mean {mean:.4f})")

    log(f"evaluate: {len(domains)} domains, at most {nb} batches of {EVAL_BATCH} test blocks each")
    table: Dict[str, Dict[str, float]] = {}
    base_model = load_pretrained(str(base_hf)).eval()
    run("base", base_model)
    models = merged_models(cfg, run_dir, lambda: load_pretrained(str(base_hf)).eval())
    for d, m in zip(domains, models.pop("finetuned")):
        run(f"finetuned_{d}", m)
    for name in ("task_arithmetic", "ties"):
        run(name, models.pop(name))
    twin, shared_model = models["twin_merging"], models["shared"]
    router, router_meta = load_router(run_dir)
    prefix = int(router_meta.get("prefix_len", 0))
    hits = {"correct": 0, "total": 0}

    def route(ids, domain):
        with torch.no_grad():
            w = torch.softmax(router(features(shared_model, ids, prefix)), dim=-1)
        set_routing_weights(twin, w)
        hits["correct"] += int((w.argmax(-1) == domains.index(domain)).sum())
        hits["total"] += len(ids)

    run("twin_merging", twin, route)
    acc = hits["correct"] / max(1, hits["total"])
    log(f"evaluate: router accuracy on the test blocks {acc:.3f}")
    return {"test_loss": table, "router_test_acc": acc}


def merged_models(cfg, run_dir: Path, fresh: Callable[[], torch.nn.Module]) -> Dict[str, Any]:
    """The models the evaluation compares, from the stages' outputs in `run_dir`: "finetuned" (one per domain),
    "task_arithmetic" (twin.lam) and "ties" (twin.ties_density) with the tensors of twin.shared_exclude at the
    base, "shared" (the shared expert) and "twin_merging" (shared + experts attached, routed per sample).
    Under twin.finetune=lora with twin.lora_merge=factorwise, TA and TIES merge the adapters' A and B
    separately, as the official code does, and the experts are factor-wise. `fresh()` builds a base model."""
    from models.merging import merge_state_dicts
    from models.twin import (
        attach_lora_factor_experts,
        attach_lowrank_experts,
        load_experts,
        lora_dense_state,
        merge_lora_factors,
    )
    from recipes.engine.runs import load_safetensors

    from .config import resolved
    from .experts import (
        classifier_keys,
        excluded_keys,
        finetuned_lora_factors,
        finetuned_state,
        load_shared_lora,
        shared_lora_factors,
    )

    tc = cfg.twin
    eff = resolved(tc)
    run_dir = Path(run_dir)
    domains = list(cfg.data.domains)
    base_hf = run_dir / "base" / "hf"
    base_model = fresh()
    base_sd = {k: v.clone() for k, v in base_model.state_dict().items()}
    exclude = excluded_keys(list(base_sd), eff["shared_exclude"], classifier_keys(base_model))
    factorwise = tc.finetune == "lora" and eff["lora_merge"] == "factorwise"

    def load(sd):
        m = fresh()
        m.load_state_dict(sd)
        return m

    out: Dict[str, Any] = {}
    if factorwise:
        loaded = [finetuned_lora_factors(base_hf, run_dir / f"ft_{d}" / "hf") for d in domains]
        factors, scaling = [f for f, _ in loaded], loaded[0][1]
        out["finetuned"] = [load(lora_dense_state(base_sd, f, scaling)) for f in factors]
        out["task_arithmetic"] = load(lora_dense_state(base_sd, shared_lora_factors(factors, eff["lam"], exclude),
                                                       scaling))
        ties = merge_lora_factors("ties", factors, density=tc.ties_density)
        for key in set(exclude) & set(ties):
            ties[key] = tuple(torch.zeros_like(x) for x in ties[key])
        out["ties"] = load(lora_dense_state(base_sd, ties, scaling))
    else:
        tuned = [finetuned_state(tc.finetune, base_hf, run_dir / f"ft_{d}" / "hf")[0] for d in domains]
        out["finetuned"] = [load(sd) for sd in tuned]
        out["task_arithmetic"] = load(merge_state_dicts("task_arithmetic", base_sd, tuned, lam=eff["lam"],
                                                        exclude=exclude))
        out["ties"] = load(merge_state_dicts("ties", base_sd, tuned, density=tc.ties_density, exclude=exclude))
        del tuned
    shared = load_safetensors(run_dir / "experts" / "shared.safetensors")
    experts = load_experts(str(run_dir / "experts" / "experts.safetensors"))
    out["shared"] = load(shared)
    if factorwise:
        info = json.loads((run_dir / "experts" / "experts.json").read_text())
        out["twin_merging"] = attach_lora_factor_experts(fresh(), base_sd, load_shared_lora(run_dir / "experts"),
                                                         experts, info["scaling"])
    else:
        out["twin_merging"] = attach_lowrank_experts(fresh(), shared, experts)
    return out
