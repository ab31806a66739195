"""The `twin_merging_cls` recipe: Twin-Merging scored as the paper scores it, on classification tasks.

Tasks (TASKS; twin_cls.tasks picks them): each reads 128-token blocks of ONE embedded domain (as each GLUE task
is its own data set, so a router can tell the tasks apart from the input) and asks a binary question about the
block's text (the block decoded by the tokenizer, i.e. exactly what the model reads):
  stdlib_def        stdlib source: does the block define a function (a line `def <name>`)?
  pydoc_digit       Python documentation: does the block contain a digit?
  licenses_licence  licence texts: does the block contain the word licence / license?
The examples of a task are all blocks of its domain (training and validation blocks of the LM data), split
by a seeded permutation per task into 50 % train, 15 % select (the router's epoch) and 35 % test. (By block,
not by document: neighbouring blocks of one document can fall into different splits. The base LM was
pretrained on the text of the training documents, without labels.)

Model: the base LM's body (the `tiny` llama) with a classification head Linear(hidden, 2) on the mean-pooled
last hidden state. Stages:
  base              <run>/base: the `tiny` LM on all domains (the twin_merging base stage, the same sub-run)
  finetune_<task>   <run>/ft_<task>: body + a fresh head fine-tuned on the task (twin.finetune_steps steps at
                    twin.finetune_lr, batches of data.batch_size, AdamW with optim.*); body.safetensors,
                    head.safetensors, finetune.json
  experts           the shared expert and the exclusive experts of the fine-tuned BODIES (experts.py; the heads
                    are task-specific and never merged)
  router            <run>/router.*: the router (router.py, twin.router) on the shared body's mean-pooled states
  evaluate          test accuracy per task (at most twin.eval_batches batches of 32 test examples) of base,
                    each fine-tuned body, task arithmetic, TIES and Twin-Merging (each with the task's own
                    fine-tuned head), normalised by the accuracy of the task's fine-tuned model (the paper's
                    score); table.json, scores.png, summary.json
A task's head is chosen by the question asked (its label space), as in the paper's GLUE evaluation; the body
weights never are: Twin-Merging's body is routed by the router alone (the official code also took the
biases from the true task's fine-tuned model; not here).
"""
from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from recipes.engine.errors import ConfigError
from recipes.engine.pipeline import Stage
from recipes.engine.runs import load_safetensors, save_safetensors_atomic, write_json_atomic

from .config import check_twin, resolved, svd_rank
from .stages import EVALUATE_KEYS, EXPERTS_KEYS, ROUTER_KEYS, base_config, base_stage, say

SPLITS = (0.5, 0.15, 0.35)  # train, select, test
EVAL_BATCH = 32
WARMUP_STEPS = 5


@dataclass(frozen=True)
class ClsTask:
    domain: str
    question: str
    pattern: str  # a block is positive when re.search(pattern, its text, re.MULTILINE) matches

    def label(self, text: str) -> int:
        return int(re.search(self.pattern, text, re.MULTILINE) is not None)


TASKS: Dict[str, ClsTask] = {
    "stdlib_def": ClsTask("stdlib", "does the block define a function?", r"^[ \t]*def \w"),
    "pydoc_digit": ClsTask("pydoc", "does the block contain a digit?", r"\d"),
    "licenses_licence": ClsTask("licenses", "does the block contain the word licence / license?", r"(?i)licen[cs]e"),
}


@dataclass
class TwinClsConfig:
    tasks: List[str] = field(default_factory=lambda: list(TASKS))  # names of TASKS, at least two


# ------------------------------------------------------------------------------------ data
@dataclass
class TaskData:
    ids: torch.Tensor  # [N, block] token ids
    labels: torch.Tensor  # [N]
    split: Dict[str, torch.Tensor]  # "train" | "select" | "test" -> positions


def task_data(dm, name: str, seed: int) -> TaskData:
    """The examples of task `name`: every block (train and validation) of its domain in the LM data, labelled
    from its decoded text, split by a seeded permutation (SPLITS)."""
    import numpy as np

    task = TASKS[name]
    dom = dm.domain_names.index(task.domain)
    blocks = [ds.blocks[i] for ds in (dm.train_set, dm.val_set) for i in range(len(ds)) if int(ds.domains[i]) == dom]
    ids = torch.from_numpy(np.stack(blocks).astype(np.int64))
    labels = torch.tensor([task.label(dm.tokenizer.decode(b.tolist())) for b in ids])
    g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    order = torch.randperm(len(ids), generator=g)
    n_train, n_select = int(SPLITS[0] * len(ids)), int(SPLITS[1] * len(ids))
    split = {"train": order[:n_train], "select": order[n_train:n_train + n_select],
             "test": order[n_train + n_select:]}
    return TaskData(ids, labels, split)


def load_data(cfg) -> Tuple[Any, Dict[str, TaskData]]:
    from recipes.engine.build import build_datamodule

    dm = build_datamodule(cfg)
    dm.setup("fit")
    return dm, {t: task_data(dm, t, int(cfg.run.seed)) for t in cfg.twin_cls.tasks}


# ------------------------------------------------------------------------------------ model
def pooled(lm: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The mean-pooled last hidden state of the causal LM's body (its final norm applied; no LM head)."""
    return lm.model(input_ids=ids).last_hidden_state.mean(dim=1)


@torch.no_grad()
def pooled_all(lm: nn.Module, ids: torch.Tensor, before: Optional[Callable] = None) -> torch.Tensor:
    """pooled() of many examples in batches of EVAL_BATCH; `before(batch_ids)` runs before each batch."""
    out = []
    for s in range(0, len(ids), EVAL_BATCH):
        if before is not None:
            before(ids[s:s + EVAL_BATCH])
        out.append(pooled(lm, ids[s:s + EVAL_BATCH]))
    return torch.cat(out) if out else torch.zeros(0)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over WARMUP_STEPS, then cosine decay to 10 %."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def finetune_classifier(lm: nn.Module, data: TaskData, *, steps: int, lr: float, batch: int, betas, weight_decay: float,
                        grad_clip: float, seed: int, log: Callable[[str], None] = print) -> Tuple[nn.Linear, Dict]:
    """Fine-tune every weight of the body `lm` and a fresh head Linear(hidden, 2) on the task's training split
    (cross-entropy, AdamW, warm-up + cosine); returns (head, stats)."""
    torch.manual_seed(seed)
    head = nn.Linear(lm.config.hidden_size, 2)
    params = list(lm.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    g = torch.Generator().manual_seed(seed)
    train = data.split["train"]
    lm.train()
    losses = []
    for step in range(steps):
        idx = train[torch.randint(len(train), (batch,), generator=g)]
        loss = nn.functional.cross_entropy(head(pooled(lm, data.ids[idx])), data.labels[idx])
        opt.zero_grad()
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 4) == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}  loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    lm.eval()
    return head.eval(), {"final_train_loss": sum(losses[-10:]) / len(losses[-10:])}


@torch.no_grad()
def accuracy(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> float:
    return float((head(feats).argmax(-1) == labels).float().mean())


def _load_head(path: Path) -> nn.Linear:
    sd = load_safetensors(path)
    head = nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
    head.load_state_dict(sd)
    return head.eval()


def body_keys(state: Dict[str, torch.Tensor], lm: nn.Module) -> List[str]:
    """The tensors the classifier uses: the body's, without the LM head (tied to the embedding or not, it is
    not part of a classifier, so it gets no expert; merges still treat it like every tensor, so a tied head
    keeps the embedding's value)."""
    return [k for k in state if state[k].is_floating_point() and not k.startswith("lm_head.")]


# ------------------------------------------------------------------------------------ stages
def _base_lm(run_dir: Path) -> nn.Module:
    from models.factory import load_pretrained

    return load_pretrained(str(Path(run_dir) / "base" / "hf")).eval()


def finetune_stage(cfg, run_dir: Path, results: Dict[str, Any], *, task: str) -> Dict[str, Any]:
    run_dir = Path(run_dir)
    _, data = load_data(cfg)
    d = data[task]
    out = run_dir / f"ft_{task}"
    out.mkdir(parents=True, exist_ok=True)
    lm = _base_lm(run_dir)
    index = list(cfg.twin_cls.tasks).index(task)
    say(cfg, f"finetune_{task}: {TASKS[task].question} {len(d.split['train'])} training blocks "
        f"({float(d.labels[d.split['train']].float().mean()):.0%} positive), {cfg.twin.finetune_steps} steps")
    head, stats = finetune_classifier(
        lm, d, steps=int(cfg.twin.finetune_steps), lr=float(cfg.twin.finetune_lr), batch=int(cfg.data.batch_size),
        betas=cfg.optim.betas, weight_decay=float(cfg.optim.weight_decay), grad_clip=float(cfg.optim.grad_clip),
        seed=int(cfg.run.seed) + index, log=lambda m: say(cfg, f"finetune_{task}: {m}"))
    select = d.split["select"]
    stats["select_acc"] = accuracy(head, pooled_all(lm, d.ids[select]), d.labels[select])
    save_safetensors_atomic(out / "body.safetensors", {k: v.detach().clone() for k, v in lm.state_dict().items()})
    save_safetensors_atomic(out / "head.safetensors", head.state_dict())
    write_json_atomic(out / "finetune.json", dict(stats, task=task))
    say(cfg, f"finetune_{task}: selection accuracy {stats['select_acc']:.3f}")
    return {f"finetune_select_acc/{task}": stats["select_acc"]}


def experts_stage(cfg, run_dir: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    from .experts import build_experts, classifier_keys, excluded_keys

    tc, eff = cfg.twin, resolved(cfg.twin)
    run_dir = Path(run_dir)
    base = _base_lm(run_dir)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = [load_safetensors(run_dir / f"ft_{t}" / "body.safetensors") for t in cfg.twin_cls.tasks]
    keys = body_keys(base_sd, base)
    exclude = excluded_keys(keys, eff["shared_exclude"], classifier_keys(base))
    info = build_experts(run_dir / "experts", base_sd, tuned, keys, eff["lam"], svd_rank(tc),
                         {"tasks": list(cfg.twin_cls.tasks), "protocol": tc.protocol},
                         rounding=eff["rank_rounding"], exclude=exclude)
    say(cfg, f"experts: {info['factored_bytes'] / 2**20:.2f} MB of factors vs {info['dense_bytes'] / 2**20:.2f} MB "
        f"dense (lambda {eff['lam']}, rank {svd_rank(tc)} {eff['rank_rounding']})")
    return {"expert_storage_bytes": info["factored_bytes"], "dense_task_vector_bytes": info["dense_bytes"]}


def _shared_lm(run_dir: Path) -> nn.Module:
    lm = _base_lm(run_dir)
    lm.load_state_dict(load_safetensors(Path(run_dir) / "experts" / "shared.safetensors"), strict=False)
    return lm


def router_stage(cfg, run_dir: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    from .router import fit_router, sample_per_task, save_router

    eff = resolved(cfg.twin)
    run_dir = Path(run_dir)
    tasks = list(cfg.twin_cls.tasks)
    _, data = load_data(cfg)
    shared = _shared_lm(run_dir)
    seed = int(cfg.run.seed)
    xs, ys = {}, {}
    for part in ("train", "select"):
        ids, task_of = [], []
        for t, name in enumerate(tasks):
            pos = data[name].split[part]
            if part == "train":
                pos = pos[sample_per_task([0] * len(pos), int(eff["router_train_blocks"]), seed + t)]
            ids.append(data[name].ids[pos])
            task_of += [t] * len(pos)
        xs[part], ys[part] = pooled_all(shared, torch.cat(ids)), torch.tensor(task_of)
    say(cfg, f"router ({eff['router']}): {len(ys['train'])} training and {len(ys['select'])} selection blocks")
    state, meta = fit_router(xs["train"], ys["train"], xs["select"], ys["select"], len(tasks), arch=eff["router"],
                             width=int(eff["router_width"]), epochs=int(eff["router_epochs"]),
                             lr=float(eff["router_lr"]), seed=seed, log=lambda m: say(cfg, m))
    meta.update({"domains": tasks, "prefix_len": 0})
    save_router(run_dir, state, meta)
    return {"router_select_acc": meta["select_acc"], "router_best_epoch": meta["best_epoch"]}


def evaluate_stage(cfg, run_dir: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    from models.merging import merge_state_dicts
    from models.twin import attach_lowrank_experts, load_experts, set_routing_weights

    from .evaluate import plot_scores
    from .experts import classifier_keys, excluded_keys
    from .router import load_router

    tc, eff = cfg.twin, resolved(cfg.twin)
    run_dir = Path(run_dir)
    tasks = list(cfg.twin_cls.tasks)
    _, data = load_data(cfg)
    limit = int(tc.eval_batches) * EVAL_BATCH
    for d in data.values():  # at most twin.eval_batches batches of EVAL_BATCH test examples per task
        d.split["test"] = d.split["test"][:limit]
    heads = {t: _load_head(run_dir / f"ft_{t}" / "head.safetensors") for t in tasks}
    base = _base_lm(run_dir)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    keys = body_keys(base_sd, base)
    tuned = [load_safetensors(run_dir / f"ft_{t}" / "body.safetensors") for t in tasks]
    exclude = excluded_keys(keys, eff["shared_exclude"], classifier_keys(base))

    def lm_with(state) -> nn.Module:
        lm = _base_lm(run_dir)
        lm.load_state_dict(state)
        return lm

    bodies: Dict[str, nn.Module] = {"base": base}
    bodies.update({f"finetuned_{t}": lm_with(sd) for t, sd in zip(tasks, tuned)})
    bodies["task_arithmetic"] = lm_with(merge_state_dicts("task_arithmetic", base_sd, tuned, lam=eff["lam"],
                                                          exclude=exclude))
    bodies["ties"] = lm_with(merge_state_dicts("ties", base_sd, tuned, density=tc.ties_density,
                                               exclude=exclude))
    table: Dict[str, Dict[str, float]] = {}
    for name, lm in bodies.items():
        table[name] = {t: accuracy(heads[t], pooled_all(lm, data[t].ids[data[t].split["test"]]),
                                   data[t].labels[data[t].split["test"]]) for t in tasks}
        say(cfg, f"evaluate: {name:<28} " + "  ".join(f"{t} {v:.3f}" for t, v in table[name].items()))
    shared_sd = load_safetensors(run_dir / "experts" / "shared.safetensors")
    twin = attach_lowrank_experts(_base_lm(run_dir), shared_sd, load_experts(str(run_dir / "experts" /
                                                                                "experts.safetensors")))
    shared = _shared_lm(run_dir)
    router, _ = load_router(run_dir)
    hits = [0, 0]
    table["twin_merging"] = {}
    for t_index, t in enumerate(tasks):
        def route(ids, t_index=t_index):
            with torch.no_grad():
                w = torch.softmax(router(pooled(shared, ids)), dim=-1)
            set_routing_weights(twin, w)
            hits[0] += int((w.argmax(-1) == t_index).sum())
            hits[1] += len(ids)

        test = data[t].split["test"]
        table["twin_merging"][t] = accuracy(heads[t], pooled_all(twin, data[t].ids[test], route), data[t].labels[test])
    say(cfg, f"evaluate: {'twin_merging':<28} " + "  ".join(f"{t} {v:.3f}" for t, v in table["twin_merging"].items()))
    router_acc = hits[0] / max(1, hits[1])
    normalised = {m: {t: row[t] / table[f"finetuned_{t}"][t] for t in tasks} for m, row in table.items()}
    for row in normalised.values():
        row["mean"] = sum(row[t] for t in tasks) / len(tasks)
    majority = {t: float(max(p, 1 - p)) for t in tasks
                for p in [float(data[t].labels[data[t].split["test"]].float().mean())]}
    figure = plot_scores({m: normalised[m] for m in ("task_arithmetic", "ties", "twin_merging")}, tasks,
                         run_dir / "scores.png", title="Twin-Merging (classification): accuracy / fine-tuned accuracy")
    own = {"recipe": cfg.run.name, "run_dir": str(run_dir), "tasks": tasks, "protocol": tc.protocol,
           "test_accuracy": table, "normalised_accuracy": normalised, "majority_accuracy": majority,
           "test_examples": {t: len(data[t].split["test"]) for t in tasks}, "router_test_acc": router_acc,
           "figure": str(figure)}
    own.update({f"twin/normalised_mean/{m}": v["mean"] for m, v in normalised.items()})
    summary: Dict[str, Any] = {}
    for earlier in results.values():
        summary.update(earlier)
    summary.update(own)
    write_json_atomic(run_dir / "table.json", summary)
    say(cfg, f"evaluate: router accuracy on the test blocks {router_acc:.3f}; mean normalised accuracy " + ", ".join(
        f"{m} {normalised[m]['mean']:.3f}" for m in ("task_arithmetic", "ties", "twin_merging")))
    return own


CLS_FINETUNE_KEYS = ("twin.finetune_steps", "twin.finetune_lr", "data.batch_size")


def stages(cfg) -> List[Stage]:
    """The Stage list of twin_merging_cls (Recipe.stages). The base stage is twin_merging's (the same sub-run
    and keys); each later stage re-runs whenever an earlier one did (recipes.engine.pipeline)."""
    from .stages import BASE_KEYS

    out = [Stage("base", base_stage, keys=BASE_KEYS)]
    out += [Stage(f"finetune_{t}", partial(finetune_stage, task=t), keys=CLS_FINETUNE_KEYS + ("twin_cls.tasks",))
            for t in cfg.twin_cls.tasks]
    out += [Stage("experts", experts_stage, keys=EXPERTS_KEYS), Stage("router", router_stage, keys=ROUTER_KEYS),
            Stage("evaluate", evaluate_stage, keys=EVALUATE_KEYS)]
    return out


def check_config(cfg) -> None:
    """Recipe.validate of twin_merging_cls: twin.*, twin_cls.tasks, and the base sub-run's config."""
    check_twin(cfg)
    tasks = list(cfg.twin_cls.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"twin_cls.tasks: unknown task(s) {unknown}; available: {', '.join(TASKS)}.")
    if len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise ConfigError(f"twin_cls.tasks needs at least two distinct tasks, got {tasks}.")
    missing = sorted({TASKS[t].domain for t in tasks} - set(cfg.data.domains))
    if missing:
        raise ConfigError(f"twin_cls.tasks read the domain(s) {missing}, which data.domains={list(cfg.data.domains)} "
                          "leaves out.")
    if cfg.twin.finetune != "full":
        raise ConfigError(f"twin_merging_cls fine-tunes whole bodies with a head; twin.finetune={cfg.twin.finetune} "
                          "is not supported (use full).")
    run_dir = Path(cfg.run.root) / cfg.run.name / (cfg.run.run_id or "<run_id>")
    try:
        base_config(cfg, run_dir)
    except ConfigError as e:
        raise ConfigError(f"twin_merging_cls: the base sub-run's config is invalid: {e}") from None


def read_table(run_dir: Path) -> Dict[str, Any]:
    return json.loads((Path(run_dir) / "table.json").read_text())
