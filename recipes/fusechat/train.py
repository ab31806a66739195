"""The train stage: fuse {pivot, source} per block, then train one target per source from the pivot.

fused/<source>/shard-NNNNN: per block the fused target, MinCE (the candidate with the lower cross-entropy)
or weighted by exp(-CE) (fusechat.fusion). target_<source>/: a `tiny` sub-run initialised from the pivot,
trained on the represented blocks with loss lam * CLM + (1 - lam) * sparse CE(student, fused target), and
its export hf/. clm_only/: the same blocks and steps with lam = 1, the baseline the targets are judged by.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from models.fusion import fuse_min_ce, fuse_weighted, fusion_loss
from recipes.engine.errors import ConfigError
from recipes.engine.module import CausalLMModule, lm_loss
from recipes.engine.pipeline import fingerprint
from recipes.engine.runs import load_safetensors, save_safetensors_atomic

from .common import (
    RepresentLayout,
    check_signals,
    discard_stale,
    fusion_datamodule,
    model_dir,
    my_shards,
    read_layout,
    represent_shards,
    shard_name,
    target_config,
    train_and_export,
    wait_for_files,
)
from .config import TRAIN_KEYS


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def fuse_shards(cfg, run_dir: Path, layout: RepresentLayout, source: str) -> Dict[str, Any]:
    """fused/<source>/shard-N: per block the fused target over {pivot, source} (MinCE or weighted). Returns
    the source's share per domain: MinCE = the fraction of sequences where it was chosen, weighted = its mean
    weight."""
    fc = cfg.fusechat
    pivot_paths = represent_shards(run_dir, fc.pivot.name, layout)
    src_paths = represent_shards(run_dir, source, layout)
    out_dir = Path(run_dir) / "fused" / source
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_sum = np.zeros(len(layout.domain_names))
    count = np.zeros(len(layout.domain_names))
    paths = [out_dir / shard_name("shard", s) for s in range(layout.num_shards)]
    for s in my_shards(layout.num_shards):  # this task's share; the others' are waited for below
        path = paths[s]
        if not path.exists():
            check_signals(f"the train stage (fusing {source}, shard {s})")
            dist = Path(run_dir) / "align" / source / shard_name("dist", s)
            if not dist.exists():
                raise ConfigError(f"{dist} is missing: run the align stage first.")
            piv, src, aligned = load_safetensors(pivot_paths[s]), load_safetensors(src_paths[s]), load_safetensors(dist)
            ces = torch.stack([piv["mean_ce"].float(), src["mean_ce"].float()])
            if fc.ce_unit == "sequence":  # total nats of the text: independent of how finely it is tokenised
                ces = ces * torch.stack([piv["num_predicted"].float(), src["num_predicted"].float()])
            candidates = [(piv["topk_ids"].long(), piv["topk_logits"].float()),
                          (aligned["topk_ids"].long(), aligned["topk_logits"].float())]
            if fc.fusion == "min_ce":
                ids, logits, choice = fuse_min_ce(candidates, ces)
            else:
                ids, logits = fuse_weighted(candidates, ces, k=fc.topk)
                choice = torch.softmax(-ces, dim=0)[1]  # the source's weight per sequence
            save_safetensors_atomic(path, {"topk_ids": ids.int(), "topk_logits": logits.float(),
                                           "choice": choice.float()})
    wait_for_files(paths, f"the fused shards of {source}")
    for s, path in enumerate(paths):
        choice, domains = _read_tensor(path, "choice"), _read_tensor(pivot_paths[s], "domain").numpy()
        np.add.at(weight_sum, domains, choice.double().numpy())
        np.add.at(count, domains, 1)
    share = {name: float(weight_sum[i] / count[i]) for i, name in enumerate(layout.domain_names) if count[i]}
    return {"source_share": float(weight_sum.sum() / max(count.sum(), 1)), "source_share_by_domain": share}


class FusedBlocks(torch.utils.data.Dataset):
    """The represented pivot blocks with their fused targets, read shard by shard from disk (a handle per
    shard, opened lazily in the reading process) in the block order of the shards. Pivot shards with a
    `loss_mask` (chat data, data.loss_on=assistant) give labels -100 where it is 0: the CLM and the fusion
    terms then both count the assistant tokens only."""

    def __init__(self, pivot_shards: Sequence[Path], fused_shards: Sequence[Path], shard_blocks: int):
        if len(pivot_shards) != len(fused_shards):
            raise ValueError(f"{len(pivot_shards)} pivot shards but {len(fused_shards)} fused shards.")
        self.pivot_shards = [str(p) for p in pivot_shards]
        self.fused_shards = [str(p) for p in fused_shards]
        self.shard_blocks = shard_blocks
        from safetensors import safe_open

        with safe_open(self.pivot_shards[-1], framework="pt") as f:
            last = f.get_slice("block_index").get_shape()[0]
            self.masked = "loss_mask" in f.keys()
        self._length = (len(pivot_shards) - 1) * shard_blocks + last
        self._handles: Dict[str, Any] = {}

    @property
    def domain_names(self) -> List[str]:
        """The domains the blocks' `domain` indices refer to (represent/layout.json)."""
        layout = Path(self.pivot_shards[0]).parent.parent / "layout.json"
        return list(json.loads(layout.read_text())["domain_names"])

    def __len__(self) -> int:
        return self._length

    def __getstate__(self):  # handles stay in the process that opened them (DataLoader workers)
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _row(self, path: str, key: str, row: int) -> torch.Tensor:
        from safetensors import safe_open

        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path].get_slice(key)[row: row + 1][0]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        if not 0 <= i < self._length:
            raise IndexError(i)
        shard, row = divmod(i, self.shard_blocks)
        ids = self._row(self.pivot_shards[shard], "input_ids", row).long()
        length = int(self._row(self.pivot_shards[shard], "length", row))
        if length != ids.shape[0]:
            raise ValueError(f"Block {i} of {self.pivot_shards[shard]} is not full length ({length}/{ids.shape[0]}).")
        labels = ids.clone()
        if self.masked:
            labels[self._row(self.pivot_shards[shard], "loss_mask", row) == 0] = -100
        return {"input_ids": ids, "labels": labels, "domain": self._row(self.pivot_shards[shard], "domain", row),
                "fused_ids": self._row(self.fused_shards[shard], "topk_ids", row).long(),
                "fused_logits": self._row(self.fused_shards[shard], "topk_logits", row).float()}


class FusionModule(CausalLMModule):
    """CausalLMModule whose training loss is lam * CLM + (1 - lam) * sparse CE(student, fused target) on
    batches that carry a fused target (FusedBlocks); plain CLM otherwise (validation)."""

    def __init__(self, *args, lam: float = 0.9, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.lam, self.temperature = float(lam), float(temperature)
        self._parts: Dict[str, float] = {}
        if self.model is not None:
            self.model.train()  # a from_pretrained model comes in eval mode, and Lightning keeps modules' modes

    def on_model_ready(self, model: torch.nn.Module) -> None:
        model.train()

    def _step(self, batch):
        outputs = self(batch["input_ids"], attention_mask=batch.get("attention_mask"), **self.model_kwargs())
        if "fused_ids" not in batch:
            return lm_loss(outputs.logits, batch["labels"]), outputs
        out = fusion_loss(outputs.logits.float(), batch["labels"], batch["fused_ids"], batch["fused_logits"],
                          lam=self.lam, temperature=self.temperature)
        self._parts = {"fusion/clm": float(out.clm.detach()), "fusion/fused_ce": float(out.fusion.detach())}
        return out.loss, outputs

    def extra_metrics(self, batch, outputs) -> Dict[str, float]:
        return dict(self._parts)

    def summary_metrics(self) -> Dict[str, Any]:
        return {"fusion/lam": self.lam, **self._parts}


def train_target(cfg, run_dir: Path, run_id: str, dataset: FusedBlocks, lam: float) -> Optional[Path]:
    """Train (or resume, or skip) the sub-run <run_dir>/<run_id> on `dataset` with the fusion loss and export
    it; its data must have the represented blocks' domains (the per-domain validation indexes them)."""
    fc = cfg.fusechat
    pivot_path = model_dir(cfg, run_dir, fc.pivot)
    sub_cfg = target_config(cfg, run_dir, pivot_path, run_id)
    stage_dir = Path(run_dir) / run_id
    if not (stage_dir / "hf" / "config.json").exists():
        names = list(fusion_datamodule(cfg, run_dir, pivot_path).domain_names)
        if names != dataset.domain_names:
            raise ConfigError(f"Fusion data domains {dataset.domain_names} differ from the run's {names}: the "
                              "represent stage ran with other data settings.")
    return train_and_export(sub_cfg, stage_dir, module_cls=FusionModule, train_set=dataset,
                            module_kwargs={"lam": lam, "temperature": fc.temperature})


def train_stage(cfg, run_dir: Path, results: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """Fuse the candidates per source, then train one target per source (and the CLM-only baseline)."""
    fc = cfg.fusechat
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    layout = read_layout(run_dir)
    runs = [(s.name, f"target_{s.name}", fc.lam) for s in fc.sources]
    if fc.clm_baseline:  # the same blocks (and fused file, unused at lam = 1) and steps, CLM only
        runs.append((fc.sources[0].name, "clm_only", 1.0))
    discard_stale(run_dir, "train", fingerprint(cfg, TRAIN_KEYS),
                  [run_dir / "fused"] + [run_dir / run_id for _, run_id, _ in runs])
    pivot_shards = represent_shards(run_dir, fc.pivot.name, layout)
    stats: Dict[str, Any] = {s.name: fuse_shards(cfg, run_dir, layout, s.name) for s in fc.sources}
    for fused_source, run_id, lam in runs:
        fused = [run_dir / "fused" / fused_source / shard_name("shard", s) for s in range(layout.num_shards)]
        hf = train_target(cfg, run_dir, run_id, FusedBlocks(pivot_shards, fused, layout.shard_blocks), lam)
        if hf is None:  # a process Lightning started for this training: the launching process goes on
            return None
        stats.setdefault(run_id if run_id == "clm_only" else fused_source, {})["model"] = str(hf)
    stats["seconds"] = time.perf_counter() - t0
    return {"train": stats}
