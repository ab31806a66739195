"""The Twin-Merging router: an MLP from the shared model's hidden states to the task (domain) of the input.

Architectures (twin.router, models.twin.build_router): `paper`, the official code's 3-layer MLP (BatchNorm,
LeakyReLU, dropout 0.5, width twin.router_width), trained like the official HF Trainer run: AdamW (no weight
decay), the learning rate decaying linearly to 0, shuffled batches of 1024, twin.router_epochs epochs;
`ours`, a 2-layer MLP (LayerNorm, GELU) trained full-batch with Adam, one step per epoch.
Features: the mean-pooled last hidden state of the shared model, or with twin.router_prefix_len = n > 0 the
last hidden state after the first n tokens (what a router sees at generation time, before the rest of the
text exists). Training data: at most twin.router_train_blocks random training blocks per task; the epoch is
selected on the FIRST half of each domain's validation blocks (highest accuracy, ties broken by the lower
cross-entropy), and the evaluation uses the SECOND half, so the two never overlap. (The official code selects
the epoch on its test set.)
Files: router.safetensors (the weights) and router.json (metadata, written last: marks the router done).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from recipes.engine.runs import load_safetensors, save_safetensors_atomic, write_json_atomic

FEATURE_BATCH = 16
PAPER_BATCH = 1024  # the official router's per_device_train_batch_size


def domain_halves(dataset, num_domains: int) -> Tuple[List[List[int]], List[List[int]]]:
    """Per domain index, its blocks of `dataset` in order, split into (first half: router selection,
    second half: test)."""
    per_domain: List[List[int]] = [[] for _ in range(num_domains)]
    for i in range(len(dataset)):
        per_domain[int(dataset[i]["domain"])].append(i)
    return [ix[: len(ix) // 2] for ix in per_domain], [ix[len(ix) // 2:] for ix in per_domain]


@torch.no_grad()
def features(model, ids: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Router input of a batch of blocks: the mean-pooled last hidden state, or (prefix_len > 0) the last
    hidden state after the first prefix_len tokens."""
    from models.twin import router_features

    if prefix_len > 0:
        ids = ids[:, :prefix_len]
    out = model(input_ids=ids, output_hidden_states=True)
    return router_features(out.hidden_states[-1], None, prefix_len if prefix_len > 0 else None)


def dataset_features(model, dataset, idx: Sequence[int], prefix_len: int, progress: bool = False,
                     desc: str = "router features") -> torch.Tensor:
    """features() of the blocks `idx` of `dataset`, in batches of FEATURE_BATCH."""
    from tqdm import tqdm

    feats = []
    starts = range(0, len(idx), FEATURE_BATCH)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        ids = torch.stack([dataset[i]["input_ids"] for i in idx[s:s + FEATURE_BATCH]])
        feats.append(features(model, ids, prefix_len))
    return torch.cat(feats)


def fit_router(x_tr: torch.Tensor, y_tr: torch.Tensor, x_sel: torch.Tensor, y_sel: torch.Tensor, num_tasks: int, *,
               arch: str, width: int, epochs: int, lr: float, seed: int, progress: bool = False,
               log: Callable[[str], None] = print) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Fit a router (models.twin.build_router(arch, ...)) on features x_tr -> task y_tr; after every epoch score
    it on (x_sel, y_sel) in eval mode and keep the best epoch (accuracy, then lower cross-entropy). Returns (its
    weights, metadata). `paper`: AdamW, weight decay 0, linear decay of lr to 0, shuffled batches of PAPER_BATCH
    (a last batch of one sample is dropped: BatchNorm needs two); `ours`: Adam, full batch."""
    from tqdm import tqdm

    from models.twin import build_router

    torch.manual_seed(seed)
    router = build_router(arch, x_tr.shape[1], num_tasks, width)
    g = torch.Generator().manual_seed(seed)
    if arch == "paper":
        opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=0.0)
        per_epoch = -(-len(x_tr) // PAPER_BATCH)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / (epochs * per_epoch)))
    else:
        opt, sched = torch.optim.Adam(router.parameters(), lr=lr), None
    best_score, best_state, best_epoch = (-1.0, float("-inf")), None, -1
    bar = tqdm(range(epochs), desc="router epochs", unit="epoch", disable=not progress, leave=False)
    every = max(1, epochs // 4)
    for epoch in bar:
        router.train()
        batches = (torch.randperm(len(x_tr), generator=g).split(PAPER_BATCH) if arch == "paper"
                   else [torch.arange(len(x_tr))])
        for idx in batches:
            if len(idx) < 2 and arch == "paper":
                continue
            opt.zero_grad()
            torch.nn.functional.cross_entropy(router(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
            if sched is not None:
                sched.step()
        router.eval()
        with torch.no_grad():
            logits = router(x_sel)
            acc = float((logits.argmax(-1) == y_sel).float().mean())
            score = (acc, -float(torch.nn.functional.cross_entropy(logits, y_sel)))
        if score > best_score:
            best_score, best_state, best_epoch = score, {k: v.clone() for k, v in router.state_dict().items()}, epoch
        if progress:
            bar.set_postfix(select_acc=f"{acc:.3f}", best=f"{best_score[0]:.3f}@{best_epoch}")
        elif (epoch + 1) % every == 0 or epoch + 1 == epochs:
            log(f"router: epoch {epoch + 1}/{epochs}  select_acc {acc:.3f}  best {best_score[0]:.3f} "
                f"(epoch {best_epoch})")
    bar.close()
    meta = {"select_acc": best_score[0], "select_loss": -best_score[1], "best_epoch": best_epoch,
            "hidden_size": int(x_tr.shape[1]), "num_tasks": num_tasks, "arch": arch, "width": width,
            "epochs": epochs, "lr": lr, "train_examples": len(x_tr), "select_examples": len(x_sel)}
    return best_state, meta


def sample_per_task(tasks: Sequence[int], per_task: int, seed: int) -> List[int]:
    """Positions of `tasks` (a task index per example): at most `per_task` random ones of each task, in a
    seeded order."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(tasks), generator=g).tolist()
    taken: Dict[int, int] = {}
    out = []
    for i in order:
        t = int(tasks[i])
        if taken.get(t, 0) < per_task:
            taken[t] = taken.get(t, 0) + 1
            out.append(i)
    return out


def train_router(shared_model, dm, domains: List[str], to_task: List[int], *, arch: str, width: int, epochs: int,
                 lr: float, train_blocks: int, prefix_len: int, seed: int, progress: bool = False,
                 log: Callable[[str], None] = print) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Fit the router on the shared model's features of at most `train_blocks` random training blocks per
    domain; returns (the selected epoch's weights, metadata).

    `to_task[k]`: the task (index into `domains`) of the datamodule's domain k. `progress`: a tqdm bar over
    the epochs; without it, a line every quarter of the epochs."""
    block_task = [to_task[int(d)] for d in dm.train_set.domains]
    train_idx = sample_per_task(block_task, train_blocks, seed)
    select_halves, _ = domain_halves(dm.val_set, len(dm.domain_names))
    sel_idx = [i for half in select_halves for i in half]
    log(f"router ({arch}): features of {len(train_idx)} training and {len(sel_idx)} selection blocks "
        f"({'mean-pooled' if prefix_len == 0 else f'after the first {prefix_len} tokens'})")
    x_tr = dataset_features(shared_model, dm.train_set, train_idx, prefix_len, progress, "router features (train)")
    y_tr = torch.tensor([block_task[i] for i in train_idx])
    x_sel = dataset_features(shared_model, dm.val_set, sel_idx, prefix_len, progress, "router features (select)")
    y_sel = torch.tensor([to_task[int(dm.val_set[i]["domain"])] for i in sel_idx])
    state, meta = fit_router(x_tr, y_tr, x_sel, y_sel, len(domains), arch=arch, width=width, epochs=epochs,
                             lr=lr, seed=seed, progress=progress, log=log)
    meta.update({"domains": list(domains), "prefix_len": prefix_len, "train_blocks": len(train_idx),
                 "select_blocks": len(sel_idx)})
    return state, meta


def save_router(run_dir: Path, state: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    """router.safetensors, then router.json (the marker that the router is complete)."""
    save_safetensors_atomic(Path(run_dir) / "router.safetensors", state)
    write_json_atomic(Path(run_dir) / "router.json", meta)


def read_router_meta(run_dir: Path) -> Optional[Dict[str, Any]]:
    """router.json of a run directory when the router is complete, else None."""
    meta_path, state_path = Path(run_dir) / "router.json", Path(run_dir) / "router.safetensors"
    if not (meta_path.exists() and state_path.exists()):
        return None
    try:
        return json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_router(run_dir: Path):
    """(router in eval mode, its metadata) from router.safetensors + router.json (a router.json without `arch`
    is the earlier 2-layer router of width 64)."""
    from models.twin import build_router

    meta = read_router_meta(run_dir)
    if meta is None:
        raise RuntimeError(f"no complete router in {run_dir} (router.json + router.safetensors): run the router "
                           "stage first.")
    router = build_router(meta.get("arch", "ours"), int(meta["hidden_size"]), int(meta["num_tasks"]),
                          int(meta.get("width", 64)))
    router.load_state_dict(load_safetensors(Path(run_dir) / "router.safetensors"))
    return router.eval(), meta
