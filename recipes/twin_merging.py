"""Twin-Merging recipe (SPEC.md section 5): resumable stages under run_dir.

base/        Lightning run on all domains (recipe `tiny` settings), exported to base/hf
ft_<domain>/ full fine-tune of the base on one domain, exported to ft_<domain>/hf
experts/     shared expert (task arithmetic), exclusive experts as SVD factors (experts.safetensors)
router.pt    router on mean-pooled shared hidden states; model selection on the FIRST half of each
             domain's validation blocks, evaluation on the SECOND half (disjoint).
Score per domain: loss on the test half (lower is better). Normalised score =
(loss_base - loss_method) / (loss_base - loss_finetuned_on_that_domain), i.e. the share of the fine-tuned
model's loss improvement over the base that the merged model keeps (1.0 = as good as the specialist).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from recipes.config import load_config, register_section


@register_section("twin")
@dataclass
class TwinConfig:
    base_steps: int = 120
    finetune_steps: int = 60
    finetune_lr: float = 1e-3
    lam: float = 0.3
    ties_density: float = 0.5
    rank: float = 0.1
    router_epochs: int = 300
    eval_batches: int = 8


def _sub_overrides(cfg, root: Path) -> list[str]:
    d = cfg.data
    return [f"run.root={root}", f"data.max_chars_per_domain={d.max_chars_per_domain}",
            f"data.cache_dir={d.cache_dir}", f"data.block_size={d.block_size}", f"data.batch_size={d.batch_size}",
            f"model.arch={cfg.model.arch}", f"model.size={cfg.model.size}", f"logging.wandb={cfg.logging.wandb}",
            f"trainer.progress_bar={str(cfg.trainer.progress_bar).lower()}", f"run.seed={cfg.run.seed}",
            "trainer.val_check_interval=100000", "checkpoint.every_n_steps=100000"]


def _export(run_dir: Path, cfg_sub, hf_dir: Path) -> None:
    from recipes.train import build_base_model, build_datamodule
    dm = build_datamodule(cfg_sub)
    model = build_base_model(cfg_sub, dm)
    sd = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")})
    model.save_pretrained(str(hf_dir))


def _train_stage(cfg, stage_dir: Path, extra: list[str]) -> Path:
    from recipes.train import train
    hf = stage_dir / "hf"
    if (hf / "config.json").exists():
        return hf  # stage complete
    sub = load_config("tiny", _sub_overrides(cfg, stage_dir.parent) + extra + [f"run.run_id={stage_dir.name}"])
    train(sub, run_dir=stage_dir)
    _export(stage_dir, sub, hf)
    return hf


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
                routing_fn(ids)
            out = model(input_ids=ids, labels=labels)
            sums[name] = sums.get(name, 0.0) + float(out.loss) * len(batch)
            counts[name] = counts.get(name, 0) + len(batch)
    return {k: sums[k] / counts[k] for k in sums}


def _pooled(model, dm, dataset, idx) -> torch.Tensor:
    from models.twin import mean_pool
    feats = []
    for s in range(0, len(idx), 16):
        ids = torch.stack([dataset[i]["input_ids"] for i in idx[s:s + 16]])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        feats.append(mean_pool(out.hidden_states[-1], None))
    return torch.cat(feats)


def run(cfg, run_dir: Path) -> dict:
    from models.factory import load_pretrained
    from models.merging import merge_state_dicts
    from models.twin import (TaskRouter, attach_lowrank_experts, compress_exclusive, exclusive_task_vectors,
                             load_experts, save_experts, set_routing_weights, storage_bytes)
    from recipes.train import build_datamodule

    tc = cfg.twin
    run_dir = Path(run_dir)
    domains = list(cfg.data.domains)
    if len(domains) < 2:
        raise ValueError("twin_merging needs at least two domains (tasks)")
    torch.manual_seed(cfg.run.seed)
    base_hf = _train_stage(cfg, run_dir / "base", [f"trainer.max_steps={tc.base_steps}"])
    ft_hf = {d: _train_stage(cfg, run_dir / f"ft_{d}",
                             [f"trainer.max_steps={tc.finetune_steps}", f"model.pretrained={base_hf.resolve()}",
                              f"data.domains=[{d}]", f"optim.lr={tc.finetune_lr}", "optim.warmup_steps=5"])
             for d in domains}

    base_model = load_pretrained(str(base_hf)).eval()
    base_sd = {k: v.clone() for k, v in base_model.state_dict().items()}
    tuned = [load_pretrained(str(ft_hf[d])).eval().state_dict() for d in domains]

    exp_dir = run_dir / "experts"
    exp_dir.mkdir(exist_ok=True)
    shared_path, experts_path = exp_dir / "shared.pt", exp_dir / "experts.safetensors"
    if not experts_path.exists():
        shared = merge_state_dicts("task_arithmetic", base_sd, tuned, lam=tc.lam)
        experts = [compress_exclusive(exclusive_task_vectors(shared, t), rank=tc.rank) for t in tuned]
        torch.save(shared, shared_path)
        save_experts(str(experts_path), experts)
    shared = torch.load(shared_path)
    experts = load_experts(str(experts_path))

    dm = build_datamodule(cfg)
    dm.setup("fit")
    # Dataset domain indices follow dm.domain_names; experts and router outputs follow `domains`.
    to_task = [domains.index(name) for name in dm.domain_names]
    shared_model = load_pretrained(str(base_hf)).eval()
    shared_model.load_state_dict(shared)

    # Router: train on pooled train blocks, select the best epoch on the "select" half of validation.
    router_path = run_dir / "router.pt"
    router = TaskRouter(shared_model.config.hidden_size, len(domains))
    if not router_path.exists():
        g = torch.Generator().manual_seed(cfg.run.seed)
        train_idx = torch.randperm(len(dm.train_set), generator=g)[:384].tolist()
        x_tr = _pooled(shared_model, dm, dm.train_set, train_idx)
        y_tr = torch.tensor([to_task[int(dm.train_set[i]["domain"])] for i in train_idx])
        sel_idx = []
        for k in range(len(domains)):
            di = [i for i in range(len(dm.val_set)) if int(dm.val_set[i]["domain"]) == k]
            sel_idx += di[: len(di) // 2]
        x_sel = _pooled(shared_model, dm, dm.val_set, sel_idx)
        y_sel = torch.tensor([to_task[int(dm.val_set[i]["domain"])] for i in sel_idx])
        opt = torch.optim.Adam(router.parameters(), lr=1e-2)
        best = (-1.0, None)
        for _ in range(tc.router_epochs):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(router(x_tr), y_tr).backward()
            opt.step()
            with torch.no_grad():
                acc = float((router(x_sel).argmax(-1) == y_sel).float().mean())
            if acc > best[0]:
                best = (acc, {k: v.clone() for k, v in router.state_dict().items()})
        torch.save({"state": best[1], "select_acc": best[0]}, router_path)
    saved = torch.load(router_path)
    router.load_state_dict(saved["state"])
    router.eval()

    nb = tc.eval_batches
    table: dict[str, dict[str, float]] = {"base": _eval_losses(base_model, dm, "test", nb)}
    for d, sd in zip(domains, tuned):
        m = load_pretrained(str(ft_hf[d])).eval()
        table[f"finetuned_{d}"] = _eval_losses(m, dm, "test", nb)
    for name, kw in [("task_arithmetic", {"lam": tc.lam}), ("ties", {"density": tc.ties_density})]:
        m = load_pretrained(str(base_hf)).eval()
        m.load_state_dict(merge_state_dicts(name, base_sd, tuned, **kw))
        table[name] = _eval_losses(m, dm, "test", nb)

    from models.twin import mean_pool
    twin = attach_lowrank_experts(load_pretrained(str(base_hf)).eval(), shared, experts)

    def route(ids):
        with torch.no_grad():
            w = torch.softmax(router(mean_pool(shared_model(input_ids=ids, output_hidden_states=True)
                                                .hidden_states[-1], None)), dim=-1)
        set_routing_weights(twin, w)

    table["twin_merging"] = _eval_losses(twin, dm, "test", nb, routing_fn=route)

    normalised: dict[str, dict[str, float]] = {}
    for method, losses in table.items():
        normalised[method] = {}
        for d in domains:
            gain_ft = table["base"][d] - table[f"finetuned_{d}"][d]
            normalised[method][d] = (table["base"][d] - losses[d]) / gain_ft if abs(gain_ft) > 1e-9 else float("nan")
        normalised[method]["mean"] = sum(normalised[method][d] for d in domains) / len(domains)
    st = storage_bytes(experts)
    summary = {"recipe": "twin_merging", "run_dir": str(run_dir), "domains": domains,
               "test_loss": table, "normalised_score": normalised, "router_select_acc": saved["select_acc"],
               "expert_storage_bytes": st["factored_bytes"], "dense_task_vector_bytes": st["dense_bytes"]}
    (run_dir / "table.json").write_text(json.dumps(summary, indent=2))
    return summary
