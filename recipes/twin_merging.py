"""Twin-Merging recipe (SPEC.md section 5): resumable stages under run_dir.

base/        Lightning run on all domains (recipe `tiny` settings), exported to base/hf (save_pretrained)
ft_<domain>/ fine-tune of the base on one domain: twin.finetune=full (recipe `tiny`, all weights; exported
             to ft_<domain>/hf) or twin.finetune=lora (recipe `twin_lora_ft`: peft LoRA adapters, rank
             twin.lora_rank on twin.lora_targets; the adapter is exported to ft_<domain>/hf)
experts/     shared.safetensors (task arithmetic over the fine-tuned weights; for LoRA the weights are
             base + scaling * B @ A, models.twin.lora_delta_state_dict), experts.safetensors (exclusive
             experts theta_t - theta_shared as truncated-SVD FACTORS), experts.json (metadata, written last)
router.safetensors + router.json: router on mean-pooled shared hidden states; model selection on the FIRST
             half of each domain's validation blocks, evaluation on the SECOND half (disjoint).
summary.json (written by recipes/train.py from run()'s return), table.json (the same), scores.png (bar
chart of the normalised scores); W&B (when logging.wandb is not disabled): wandb.Table of the per-domain
losses and normalised scores, the chart, and the headline numbers in the run summary.

Every stage is skipped when its outputs are complete; every file is written to a temporary name and renamed,
so a stage killed half-way is redone rather than read half-written. Weights are safetensors, metadata JSON;
nothing is unpickled except the stages' own Lightning checkpoints.

Score per domain: loss on the test half (lower is better). Normalised score =
(loss_base - loss_method) / (loss_base - loss_finetuned_on_that_domain), i.e. the share of the fine-tuned
model's loss improvement over the base that the merged model keeps (1.0 = as good as the specialist).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import torch

from recipes.config import ConfigError, load_config, register_section


@register_section("twin")
@dataclass
class TwinConfig:
    base_steps: int = 120
    finetune: str = "full"  # full | lora
    finetune_steps: int = 60
    finetune_lr: float = 1e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    lam: float = 0.3
    ties_density: float = 0.5
    rank: float = 0.1  # < 1: fraction of min(dims) per matrix; >= 1: absolute rank
    router_epochs: int = 300
    router_prefix_len: int = 0  # 0: router reads the mean-pooled last hidden state; n > 0: the state after
    #                             the first n tokens (what a generation-time router can see)
    eval_batches: int = 8


def _check(tc) -> None:
    if tc.finetune not in ("full", "lora"):
        raise ConfigError(f"twin.finetune must be 'full' or 'lora', got {tc.finetune!r}.")
    if tc.rank <= 0:
        raise ConfigError(f"twin.rank must be > 0 (a fraction < 1 or an absolute rank >= 1), got {tc.rank}.")
    if tc.finetune == "lora" and tc.lora_rank <= 0:
        raise ConfigError(f"twin.lora_rank must be > 0, got {tc.lora_rank}.")


def _svd_rank(tc) -> float | int:
    return int(tc.rank) if tc.rank >= 1 else float(tc.rank)


# ------------------------------------------------------------------------------------ atomic file output
def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def _save_safetensors(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


# ------------------------------------------------------------------------------------------ train stages
def _sub_overrides(cfg, root: Path) -> list[str]:
    d = cfg.data
    return [f"run.root={root}", f"data.max_chars_per_domain={d.max_chars_per_domain}",
            f"data.cache_dir={d.cache_dir}", f"data.block_size={d.block_size}", f"data.batch_size={d.batch_size}",
            f"model.arch={cfg.model.arch}", f"model.size={cfg.model.size}", f"logging.wandb={cfg.logging.wandb}",
            f"trainer.progress_bar={str(cfg.trainer.progress_bar).lower()}", f"run.seed={cfg.run.seed}",
            "trainer.val_check_interval=100000", "checkpoint.every_n_steps=100000"]


def _export(stage_dir: Path, sub, hf_dir: Path) -> None:
    """The stage's last Lightning checkpoint -> save_pretrained dir (the full model, or the peft adapter),
    written under a temporary name and renamed."""
    from recipes.config import import_recipe_module
    from recipes.train import build_datamodule, build_module
    dm = build_datamodule(sub)
    module = build_module(sub, dm, import_recipe_module(sub.run.name))
    # Lightning checkpoint of this run's own stage (not weights-only: it carries optimizer/loop state)
    ckpt = torch.load(stage_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    module.load_state_dict(ckpt["state_dict"])
    tmp = hf_dir.with_name(hf_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module.model.save_pretrained(str(tmp))
    os.replace(tmp, hf_dir)


def _train_stage(cfg, stage_dir: Path, extra: list[str], recipe: str = "tiny") -> Path:
    from recipes.checkpointing import newest_checkpoint
    from recipes.train import train
    hf = stage_dir / "hf"
    if hf.is_dir():
        return hf  # stage complete (the export is renamed into place only when whole)
    sub = load_config(recipe, _sub_overrides(cfg, stage_dir.parent) + extra + [f"run.run_id={stage_dir.name}"])
    resume = stage_dir.is_dir() and newest_checkpoint(stage_dir) is not None
    train(sub, run_dir=stage_dir, resume=resume)
    _export(stage_dir, sub, hf)
    return hf


def _finetune_stage(cfg, run_dir: Path, domain: str, base_hf: Path) -> Path:
    tc = cfg.twin
    extra = [f"trainer.max_steps={tc.finetune_steps}", f"model.pretrained={base_hf.resolve()}",
             f"data.domains=[{domain}]", f"optim.lr={tc.finetune_lr}", "optim.warmup_steps=5"]
    if tc.finetune == "full":
        return _train_stage(cfg, run_dir / f"ft_{domain}", extra)
    extra += [f"twin_lora_ft.rank={tc.lora_rank}", f"twin_lora_ft.alpha={tc.lora_alpha}",
              f"twin_lora_ft.targets=[{','.join(tc.lora_targets)}]", "optim.weight_decay=0.0"]
    return _train_stage(cfg, run_dir / f"ft_{domain}", extra, recipe="twin_lora_ft")


def finetuned_state(finetune: str, base_hf: Path, ft_hf: Path) -> tuple[dict, list[str] | None]:
    """(full state dict of the fine-tuned model, the keys it changed or None = all). For LoRA: the base
    weights plus each adapted layer's scaling * B @ A (models.twin.lora_delta_state_dict)."""
    from models.factory import load_pretrained
    if finetune == "full":
        return load_pretrained(str(ft_hf)).eval().state_dict(), None
    from peft import PeftModel

    from models.twin import lora_delta_state_dict
    base = load_pretrained(str(base_hf)).eval()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    deltas = lora_delta_state_dict(PeftModel.from_pretrained(base, str(ft_hf)))
    for k, d in deltas.items():
        sd[k] = sd[k] + d.to(sd[k].dtype)
    return sd, sorted(deltas)


def build_experts(exp_dir: Path, base_sd: dict, tuned: list[dict], keys: list[str] | None, lam: float,
                  rank: float | int, meta: dict) -> None:
    """shared = task arithmetic (lambda = lam); expert_t = SVD factors of tuned_t - shared on `keys`
    (None: every floating tensor). Files are written atomically; experts.json (last) marks completion."""
    from models.merging import merge_state_dicts
    from models.twin import compress_exclusive, exclusive_task_vectors, save_experts, storage_bytes
    t0 = time.perf_counter()
    shared = merge_state_dicts("task_arithmetic", base_sd, tuned, lam=lam)
    experts = [compress_exclusive(exclusive_task_vectors(shared, t, keys), rank=rank) for t in tuned]
    seconds = time.perf_counter() - t0
    exp_dir.mkdir(parents=True, exist_ok=True)
    _save_safetensors(exp_dir / "shared.safetensors", shared)
    save_experts(str(exp_dir / "experts.safetensors"), experts)
    st = storage_bytes(experts)
    _write_json(exp_dir / "experts.json", dict(meta, lam=lam, rank=rank, num_experts=len(experts),
                                               expert_keys=len(experts[0]) if experts else 0,
                                               build_seconds=seconds, **st))


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _eval_losses(model, dm, half: str, max_batches: int, routing_fn=None) -> dict[str, float]:
    """Mean token loss per domain on one half of the validation blocks."""
    sums, counts = {}, {}
    ds = dm.val_set
    n = len(ds)
    for dom_idx, name in enumerate(dm.domain_names):
        idx = [i for i in range(n) if int(ds[i]["domain"]) == dom_idx]
        idx = idx[: len(idx) // 2] if half == "select" else idx[len(idx) // 2:]
        idx = idx[: max_batches * 8]
        for s in range(0, len(idx), 8):
            batch = [ds[i] for i in idx[s:s + 8]]
            ids = torch.stack([b["input_ids"] for b in batch])
            labels = torch.stack([b["labels"] for b in batch])
            if routing_fn is not None:
                routing_fn(ids, name)
            out = model(input_ids=ids, labels=labels)
            sums[name] = sums.get(name, 0.0) + float(out.loss) * len(batch)
            counts[name] = counts.get(name, 0) + len(batch)
    return {k: sums[k] / counts[k] for k in sums}


def _features(model, ids: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Router input: mean-pooled last hidden state, or (prefix_len > 0) the state after the prefix."""
    from models.twin import router_features
    if prefix_len > 0:
        ids = ids[:, :prefix_len]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return router_features(out.hidden_states[-1], None, prefix_len if prefix_len > 0 else None)


def _pooled(model, dm, dataset, idx, prefix_len: int = 0) -> torch.Tensor:
    feats = []
    for s in range(0, len(idx), 16):
        ids = torch.stack([dataset[i]["input_ids"] for i in idx[s:s + 16]])
        feats.append(_features(model, ids, prefix_len))
    return torch.cat(feats)


def _train_router(cfg, run_dir: Path, shared_model, dm, domains: list[str], to_task: list[int]):
    from models.twin import TaskRouter
    tc = cfg.twin
    hidden = shared_model.config.hidden_size
    router = TaskRouter(hidden, len(domains))
    state_path, meta_path = run_dir / "router.safetensors", run_dir / "router.json"
    prefix = int(tc.router_prefix_len)
    if prefix < 0:
        raise ConfigError(f"twin.router_prefix_len must be >= 0, got {prefix}.")
    if not meta_path.exists() or json.loads(meta_path.read_text()).get("prefix_len", 0) != prefix:
        torch.manual_seed(cfg.run.seed)
        router = TaskRouter(hidden, len(domains))
        g = torch.Generator().manual_seed(cfg.run.seed)
        train_idx = torch.randperm(len(dm.train_set), generator=g)[:384].tolist()
        x_tr = _pooled(shared_model, dm, dm.train_set, train_idx, prefix)
        y_tr = torch.tensor([to_task[int(dm.train_set[i]["domain"])] for i in train_idx])
        sel_idx = []
        for k in range(len(dm.domain_names)):
            di = [i for i in range(len(dm.val_set)) if int(dm.val_set[i]["domain"]) == k]
            sel_idx += di[: len(di) // 2]
        x_sel = _pooled(shared_model, dm, dm.val_set, sel_idx, prefix)
        y_sel = torch.tensor([to_task[int(dm.val_set[i]["domain"])] for i in sel_idx])
        opt = torch.optim.Adam(router.parameters(), lr=1e-2)
        # model selection: highest accuracy on the selection split, ties broken by its lower cross-entropy
        # (with a small split, accuracy saturates within a few epochs)
        best = ((-1.0, float("-inf")), None, -1)
        for epoch in range(tc.router_epochs):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(router(x_tr), y_tr).backward()
            opt.step()
            with torch.no_grad():
                logits = router(x_sel)
                acc = float((logits.argmax(-1) == y_sel).float().mean())
                score = (acc, -float(torch.nn.functional.cross_entropy(logits, y_sel)))
            if score > best[0]:
                best = (score, {k: v.clone() for k, v in router.state_dict().items()}, epoch)
        best = (best[0][0], best[1], best[2], -best[0][1])
        _save_safetensors(state_path, best[1])
        _write_json(meta_path, {"select_acc": best[0], "select_loss": best[3], "best_epoch": best[2],
                                "hidden_size": hidden,
                                "num_tasks": len(domains), "domains": domains, "prefix_len": prefix,
                                "train_blocks": len(train_idx), "select_blocks": len(sel_idx)})
    meta = json.loads(meta_path.read_text())
    router.load_state_dict(_load_safetensors(state_path))
    return router.eval(), meta


def normalised_scores(table: dict, domains: list[str]) -> dict:
    out: dict[str, dict[str, float]] = {}
    for method, losses in table.items():
        out[method] = {}
        for d in domains:
            gain_ft = table["base"][d] - table[f"finetuned_{d}"][d]
            out[method][d] = (table["base"][d] - losses[d]) / gain_ft if abs(gain_ft) > 1e-9 else float("nan")
        out[method]["mean"] = sum(out[method][d] for d in domains) / len(domains)
    return out


def plot_scores(normalised: dict, domains: list[str], path: Path, title: str = "") -> Path:
    """Grouped bar chart: normalised score per domain (and mean) for every method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def log_to_wandb(cfg, run_dir: Path, summary: dict, figure: Path | None) -> bool:
    """wandb.Table of losses and normalised scores, the chart, and headline scalars. Never raises."""
    from recipes.logging_utils import wandb_mode
    from recipes.train import wandb_id_for
    mode = wandb_mode(cfg.logging.wandb)
    if mode is None:
        return False
    try:
        import wandb
        from recipes.config import to_dict
        domains = summary["domains"]
        run = wandb.init(project=cfg.logging.project, entity=cfg.logging.entity, id=wandb_id_for(run_dir),
                         name=f"{cfg.run.name}/{run_dir.name}", dir=str(run_dir), mode=mode, resume="allow",
                         tags=list(cfg.logging.tags), config=to_dict(cfg),
                         settings=wandb.Settings(init_timeout=60, silent=True, console="off"))
        cols = ["method"] + domains + ["mean"]
        loss_rows = [[m] + [summary["test_loss"][m][d] for d in domains]
                     + [sum(summary["test_loss"][m][d] for d in domains) / len(domains)]
                     for m in summary["test_loss"]]
        norm_rows = [[m] + [v[c] for c in domains + ["mean"]] for m, v in summary["normalised_score"].items()]
        payload = {"twin/test_loss": wandb.Table(columns=cols, data=loss_rows),
                   "twin/normalised_score": wandb.Table(columns=cols, data=norm_rows)}
        if figure is not None and figure.exists():
            payload["twin/scores_chart"] = wandb.Image(str(figure))
        run.log(payload)
        run.summary.update({k: v for k, v in summary.items() if k.startswith("twin/")})
        run.finish()
        return True
    except Exception as e:  # W&B must never stop the recipe: summary.json and table.json stay
        warnings.warn(f"W&B logging of the Twin-Merging table failed ({type(e).__name__}: {e}).")
        return False


# ------------------------------------------------------------------------------------------------ run
def run(cfg, run_dir: Path) -> dict:
    from models.factory import load_pretrained
    from models.merging import merge_state_dicts
    from models.twin import attach_lowrank_experts, load_experts, set_routing_weights
    from recipes.train import build_datamodule

    tc = cfg.twin
    _check(tc)
    run_dir = Path(run_dir)
    domains = list(cfg.data.domains)
    if len(domains) < 2:
        raise ConfigError("twin_merging needs at least two domains (tasks) in data.domains")
    torch.manual_seed(cfg.run.seed)
    base_hf = _train_stage(cfg, run_dir / "base", [f"trainer.max_steps={tc.base_steps}"])
    ft_hf = {d: _finetune_stage(cfg, run_dir, d, base_hf) for d in domains}

    base_model = load_pretrained(str(base_hf)).eval()
    base_sd = {k: v.clone() for k, v in base_model.state_dict().items()}
    loaded = [finetuned_state(tc.finetune, base_hf, ft_hf[d]) for d in domains]
    tuned = [sd for sd, _ in loaded]
    keys = loaded[0][1]

    exp_dir = run_dir / "experts"
    if not (exp_dir / "experts.json").exists():
        build_experts(exp_dir, base_sd, tuned, keys, tc.lam, _svd_rank(tc),
                      {"domains": domains, "finetune": tc.finetune})
    exp_meta = json.loads((exp_dir / "experts.json").read_text())
    shared = _load_safetensors(exp_dir / "shared.safetensors")
    experts = load_experts(str(exp_dir / "experts.safetensors"))

    dm = build_datamodule(cfg)
    dm.setup("fit")
    # Dataset domain indices follow dm.domain_names; experts and router outputs follow `domains`.
    to_task = [domains.index(name) for name in dm.domain_names]
    shared_model = load_pretrained(str(base_hf)).eval()
    shared_model.load_state_dict(shared)
    router, router_meta = _train_router(cfg, run_dir, shared_model, dm, domains, to_task)

    nb = tc.eval_batches
    table: dict[str, dict[str, float]] = {"base": _eval_losses(base_model, dm, "test", nb)}
    for d, sd in zip(domains, tuned):
        m = load_pretrained(str(base_hf)).eval()
        m.load_state_dict(sd)
        table[f"finetuned_{d}"] = _eval_losses(m, dm, "test", nb)
    for name, kw in [("task_arithmetic", {"lam": tc.lam}), ("ties", {"density": tc.ties_density})]:
        m = load_pretrained(str(base_hf)).eval()
        m.load_state_dict(merge_state_dicts(name, base_sd, tuned, **kw))
        table[name] = _eval_losses(m, dm, "test", nb)

    twin = attach_lowrank_experts(load_pretrained(str(base_hf)).eval(), shared, experts)
    hits = {"correct": 0, "total": 0}

    def route(ids, domain):
        with torch.no_grad():
            w = torch.softmax(router(_features(shared_model, ids, int(tc.router_prefix_len))), dim=-1)
        set_routing_weights(twin, w)
        hits["correct"] += int((w.argmax(-1) == domains.index(domain)).sum())
        hits["total"] += len(ids)

    table["twin_merging"] = _eval_losses(twin, dm, "test", nb, routing_fn=route)

    normalised = normalised_scores(table, domains)
    summary = {"recipe": "twin_merging", "run_dir": str(run_dir), "domains": domains, "finetune": tc.finetune,
               "test_loss": table, "normalised_score": normalised, "router_select_acc": router_meta["select_acc"],
               "router_test_acc": hits["correct"] / max(1, hits["total"]),
               "router_prefix_len": int(tc.router_prefix_len),
               "expert_storage_bytes": exp_meta["factored_bytes"],
               "dense_task_vector_bytes": exp_meta["dense_bytes"], "build_experts_s": exp_meta["build_seconds"]}
    summary.update({f"twin/normalised_mean/{m}": v["mean"] for m, v in normalised.items()})
    figure = plot_scores({m: normalised[m] for m in ["task_arithmetic", "ties", "twin_merging"]}, domains,
                         run_dir / "scores.png")
    summary["figure"] = str(figure)
    summary["wandb_logged"] = log_to_wandb(cfg, run_dir, summary, figure)
    _write_json(run_dir / "table.json", summary)
    return summary
