"""FuseChat recipe (SPEC.md section 4): fuse source models with DIFFERENT tokenizers into the pivot.

    python -m recipes.fusechat --stage represent|align|train|merge|all [--run-dir DIR] [key=value ...]
    make fuse STAGE=<stage> ARGS="key=value ..."          make train RECIPE=fusechat (all stages)

Every stage works under one run directory (default runs/fusechat/<run.run_id or "default">), skips
outputs that are complete and resumes cut work. Shards are written to a temporary name and renamed,
so a file under its final name is always whole.

models/<name>/           pivot and sources: a Lightning run (recipe `tiny` settings, resumable) and its
                         export hf/ (model.safetensors + config + tokenizer). Embedded default: a byte-level
                         BPE pivot trained briefly on all domains, a Unigram source trained on `stdlib`, a
                         BPE source of another vocabulary size trained on `licenses`.
represent/<name>/        shard-NNNNN.safetensors: per block the model's input ids (its own tokenisation of the
                         pivot block's text), per position the top-k logits and ids (row i predicts token
                         i + 1), per sequence the mean cross-entropy over the predicted tokens.
align/<source>/          match-NNNNN (DTW one-to-one pivot->source positions), vocab_map.npy (EM, MinED or
                         MS), dist-NNNNN (source top-k re-expressed in the pivot vocabulary).
train: fused/<source>/   shard-NNNNN: the fused target per block (MinCE or exp(-CE) weighted over
                         {pivot, source}); targets/<source>/ one model per source initialised from the pivot,
                         loss lam * CLM + (1 - lam) * sparse CE(student, fused); clm_only/ the same data and
                         steps with lam = 1 (the evidence baseline).
merge: merged/           the targets merged into the pivot (models.merging, default SCE), a save_pretrained
                         directory that `model.pretrained=` loads; merged_<method>/ for the compared methods;
                         evaluation.json: validation loss per domain of every model above.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from recipes.config import ConfigError, load_config, register_section, save_config

STAGES = ("represent", "align", "train", "merge")
VOCAB_MAPS = ("min_ed", "exact", "statistics")
FUSIONS = ("min_ce", "weighted")
CE_UNITS = ("token", "sequence")
LOGIT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ----------------------------------------------------------------------------------------------- config


@dataclass
class FuseModelConfig:
    """One model of the fusion. steps > 0 trains it (from `pretrained` if given, else from scratch) with
    recipe `tiny` settings on `domains`; steps = 0 uses `pretrained` as it is."""

    name: str = "pivot"
    tokenizer: Optional[str] = "bpe"  # bpe | unigram (embedded) | a path / hub name; None: `pretrained`'s
    vocab_size: int = 4096  # for embedded tokenizers
    domains: List[str] = field(default_factory=lambda: ["pydoc", "stdlib", "licenses"])
    steps: int = 80
    lr: float = 3e-3
    pretrained: Optional[str] = None  # a save_pretrained directory (or hub name, with network)
    arch: Optional[str] = None  # None: model.arch
    size: Optional[str] = None  # None: model.size
    # None: data.block_size / data.batch_size. A source whose tokenizer cuts text finer needs a longer
    # context than the pivot's block to read a whole pivot block (longer sequences are truncated).
    block_size: Optional[int] = None
    batch_size: Optional[int] = None


@register_section("fusechat")
@dataclass
class FuseChatConfig:
    pivot: FuseModelConfig = field(default_factory=FuseModelConfig)
    sources: List[FuseModelConfig] = field(default_factory=list)
    # represent
    num_blocks: int = 800  # training blocks of the pivot's data (a seeded sample) that are represented
    topk: int = 10
    shard_blocks: int = 64  # blocks per shard file
    represent_batch_size: int = 16
    logits_dtype: str = "float16"  # stored top-k logits: float16 | bfloat16 | float32
    # align
    vocab_map: str = "min_ed"  # min_ed | exact | statistics
    ms_min_count: int = 1
    dtw_band: Optional[int] = None  # Sakoe-Chiba band (target positions); None: full DTW
    # train
    fusion: str = "min_ce"  # min_ce | weighted
    ce_unit: str = "token"  # MinCE compares mean CE per token ("token") or the sequence total ("sequence")
    lam: float = 0.9
    temperature: float = 1.0
    target_steps: int = 100
    target_lr: float = 1e-3
    clm_baseline: bool = True  # also train the pivot with CLM only on the same blocks and steps
    # merge
    merge_method: str = "sce"  # the method of merged/: sce | varm | task_arithmetic | ties
    compare_merge_methods: List[str] = field(default_factory=lambda: ["varm", "task_arithmetic", "ties"])
    sce_select_topk: float = 0.1
    sce_masked_final_sum: bool = True
    ties_density: float = 0.5
    task_arithmetic_lam: float = 1.0
    eval_batch_size: int = 32
    eval_max_blocks: int = 0  # validation blocks per evaluated model; 0 = all


def _check(cfg) -> None:
    fc = cfg.fusechat
    if not fc.sources:
        raise ConfigError("fusechat.sources is empty: fusion needs at least one source model.")
    names = [fc.pivot.name] + [s.name for s in fc.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"fusechat model names must be distinct, got {names}.")
    for m in [fc.pivot] + list(fc.sources):
        if m.steps < 0:
            raise ConfigError(f"fusechat model '{m.name}': steps must be >= 0, got {m.steps}.")
        if m.steps == 0 and not m.pretrained:
            raise ConfigError(f"fusechat model '{m.name}' has steps=0 and no pretrained path: nothing to use.")
        if not m.tokenizer and not m.pretrained:
            raise ConfigError(f"fusechat model '{m.name}' has neither a tokenizer nor a pretrained path.")
    if fc.num_blocks < cfg.data.batch_size:
        raise ConfigError(f"fusechat.num_blocks ({fc.num_blocks}) must be >= data.batch_size ({cfg.data.batch_size}).")
    if fc.num_blocks < 1 or fc.shard_blocks < 1 or fc.topk < 1 or fc.represent_batch_size < 1:
        raise ConfigError("fusechat.num_blocks, shard_blocks, topk and represent_batch_size must be >= 1.")
    for key, value, allowed in [("vocab_map", fc.vocab_map, VOCAB_MAPS), ("fusion", fc.fusion, FUSIONS),
                                ("ce_unit", fc.ce_unit, CE_UNITS), ("logits_dtype", fc.logits_dtype, tuple(LOGIT_DTYPES))]:
        if value not in allowed:
            raise ConfigError(f"fusechat.{key} must be one of {', '.join(allowed)}; got '{value}'.")
    if not 0.0 <= fc.lam <= 1.0:
        raise ConfigError(f"fusechat.lam must be in [0, 1], got {fc.lam}.")
    from models.merging import MERGE_METHODS

    for method in [fc.merge_method] + list(fc.compare_merge_methods):
        if method not in MERGE_METHODS:
            raise ConfigError(f"fusechat merge method '{method}' is unknown; choose from {', '.join(sorted(MERGE_METHODS))}.")


# ------------------------------------------------------------------------------------------ file helpers


def _save_shard_atomic(tensors: Dict[str, torch.Tensor], path: Path, metadata: Optional[Dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _load_shard(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}.safetensors"


def _rank_world() -> Tuple[int, int]:
    """Shards are split round-robin over RANK / WORLD_SIZE (torchrun's variables) when set."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="block", dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------- models


def _sub_overrides(cfg, run_root: Path, extra: Sequence[str] = ()) -> List[str]:
    """Overrides of a Lightning sub-run (recipe `tiny`) that inherit this run's data and logging settings."""
    d = cfg.data
    return [f"run.root={run_root}", f"run.seed={cfg.run.seed}", f"data.cache_dir={d.cache_dir}",
            f"data.max_chars_per_domain={d.max_chars_per_domain}", f"data.block_size={d.block_size}",
            f"data.batch_size={d.batch_size}", f"data.val_fraction={d.val_fraction}",
            f"data.source={d.source}", f"model.arch={cfg.model.arch}", f"model.size={cfg.model.size}",
            f"logging.wandb={cfg.logging.wandb}", f"logging.project={cfg.logging.project}",
            f"trainer.progress_bar={str(cfg.trainer.progress_bar).lower()}",
            f"trainer.log_every_n_steps={cfg.trainer.log_every_n_steps}",
            "trainer.val_check_interval=1000000", "trainer.limit_val_batches=2",
            "checkpoint.every_n_steps=1000000", f"optim.warmup_steps={cfg.optim.warmup_steps}", *extra]


def _list_override(key: str, values: Sequence[str]) -> str:
    return f"{key}=[{','.join(values)}]"


def _train_and_export(sub_cfg, stage_dir: Path, around_train=contextlib.nullcontext) -> Path:
    """Run (or resume, or skip) a Lightning sub-run in stage_dir and export it to stage_dir/hf.
    `around_train()` is a context manager entered around the training call only (not the export)."""
    from recipes.checkpointing import newest_checkpoint
    from recipes.export import export
    from recipes.train import train

    hf = stage_dir / "hf"
    if (hf / "config.json").exists():
        return hf
    stage_dir.mkdir(parents=True, exist_ok=True)
    with around_train():
        train(sub_cfg, run_dir=stage_dir, resume=newest_checkpoint(stage_dir) is not None)
    tmp = stage_dir / f"hf.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    export(stage_dir, out_dir=tmp)
    os.replace(tmp, hf)
    return hf


def _model_cfg(cfg, entry, run_dir: Path):
    extra = [f"trainer.max_steps={max(entry.steps, 1)}", f"optim.lr={entry.lr}",
             f"data.vocab_size={entry.vocab_size}", _list_override("data.domains", list(entry.domains)),
             f"data.tokenizer={entry.tokenizer or entry.pretrained}"]
    if entry.arch:
        extra.append(f"model.arch={entry.arch}")
    if entry.size:
        extra.append(f"model.size={entry.size}")
    if entry.pretrained:
        extra.append(f"model.pretrained={entry.pretrained}")
    if entry.block_size:
        extra.append(f"data.block_size={entry.block_size}")
    if entry.batch_size:
        extra.append(f"data.batch_size={entry.batch_size}")
    return load_config("tiny", _sub_overrides(cfg, run_dir / "models", extra))


def ensure_models(cfg, run_dir: Path) -> Dict[str, Path]:
    """name -> save_pretrained directory (with tokenizer) of the pivot and every source; trains what is missing."""
    out: Dict[str, Path] = {}
    for entry in [cfg.fusechat.pivot] + list(cfg.fusechat.sources):
        if entry.steps == 0:
            out[entry.name] = Path(entry.pretrained)
        else:
            out[entry.name] = _train_and_export(_model_cfg(cfg, entry, run_dir), run_dir / "models" / entry.name)
    return out


def _tokenizer_path(entry, model_dir: Path) -> str:
    """Where a model's tokenizer loads from: an explicit path/hub name given with a pretrained model used
    as is, else the model directory (exports carry their tokenizer)."""
    if entry.steps == 0 and entry.tokenizer and entry.tokenizer not in ("bpe", "unigram"):
        return str(entry.tokenizer)
    return str(model_dir)


def _load_tokenizer(entry, model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_tokenizer_path(entry, model_dir))


def tokenizer_kind(tokenizer) -> str:
    """normalize_token's kind for a HF fast tokenizer: byte-level BPE ('Ġ') or SentencePiece-like ('▁')."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    text = json.dumps({k: spec.get(k) for k in ("pre_tokenizer", "decoder", "normalizer")})
    if "ByteLevel" in text:
        return "byte_level"
    if "Metaspace" in text or "\u2581" in text or spec.get("model", {}).get("byte_fallback"):
        return "sentencepiece"
    return "auto"


def fusion_datamodule(cfg, pivot_dir: Path):
    """The pivot's view of the fusion data: all recipe domains, tokenised by the pivot's own tokenizer."""
    from recipes.train import build_datamodule

    sub = load_config("tiny", _sub_overrides(cfg, Path(cfg.run.root), [
        f"data.tokenizer={_tokenizer_path(cfg.fusechat.pivot, pivot_dir)}",
        _list_override("data.domains", list(cfg.data.domains))]))
    return build_datamodule(sub)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_model(path: Path):
    from models.factory import load_pretrained

    return load_pretrained(str(path)).to(_device()).eval()


# -------------------------------------------------------------------------------------------- represent


@dataclass
class RepresentLayout:
    """Which pivot training blocks are represented and how they are cut into shards."""

    block_indices: List[int]
    shard_blocks: int
    topk: int
    domain_names: List[str]

    @property
    def num_shards(self) -> int:
        return -(-len(self.block_indices) // self.shard_blocks)

    def shard_range(self, shard: int) -> Tuple[int, int]:
        start = shard * self.shard_blocks
        return start, min(start + self.shard_blocks, len(self.block_indices))


def _layout(cfg, dm, run_dir: Path) -> RepresentLayout:
    """The sample of pivot training blocks (seeded), fixed at the first call and checked afterwards."""
    meta_path = run_dir / "represent" / "layout.json"
    fc = cfg.fusechat
    n_train = len(dm.train_set)
    if meta_path.exists():
        saved = json.loads(meta_path.read_text())
        layout = RepresentLayout(saved["block_indices"], saved["shard_blocks"], saved["topk"], saved["domain_names"])
        if (layout.shard_blocks, layout.topk, layout.domain_names) != (fc.shard_blocks, fc.topk, list(dm.domain_names)) \
                or len(layout.block_indices) != min(fc.num_blocks, n_train):
            raise ConfigError(f"{run_dir} was represented with other settings ({meta_path}: shard_blocks="
                              f"{layout.shard_blocks}, topk={layout.topk}, {len(layout.block_indices)} blocks, "
                              f"domains {layout.domain_names}): use another run directory.")
        return layout
    g = torch.Generator().manual_seed(cfg.run.seed)
    chosen = torch.randperm(n_train, generator=g)[: min(fc.num_blocks, n_train)].tolist()
    layout = RepresentLayout(chosen, fc.shard_blocks, fc.topk, list(dm.domain_names))
    _write_json_atomic(meta_path, {"block_indices": chosen, "shard_blocks": fc.shard_blocks, "topk": fc.topk,
                                   "domain_names": list(dm.domain_names), "train_blocks_total": n_train})
    return layout


@torch.no_grad()
def topk_representation(model, sequences: Sequence[Sequence[int]], pad_id: int, k: int, vocab_limit: int,
                        max_len: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Run `model` over a batch of token sequences (right-padded); per position the top-k logits and ids
    over the first `vocab_limit` logits (embedding rows past the tokenizer are never a prediction), and per
    sequence the mean next-token cross-entropy (row i predicts token i + 1). Sequences longer than max_len
    are cut there (a model with learned positions cannot read further)."""
    seqs = [list(s)[:max_len] if max_len else list(s) for s in sequences]
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max())
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    positions = torch.arange(width)[None, :]
    attention = (positions < lengths[:, None]).long()
    device = _device()
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
    logits = logits[..., :vocab_limit]
    values, top_ids = logits.topk(min(k, vocab_limit), dim=-1)
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -log_probs.gather(-1, ids[:, 1:].to(device).clamp(max=vocab_limit - 1)[..., None])[..., 0]
    predicted = (positions[:, 1:] < lengths[:, None]).to(device)
    counts = predicted.sum(1)
    mean_ce = (nll * predicted).sum(1) / counts.clamp(min=1)
    pad = ~(positions < lengths[:, None]).to(device)
    top_ids = top_ids.masked_fill(pad[..., None], -1)
    values = values.masked_fill(pad[..., None], float("-inf"))
    return {"input_ids": torch.where(attention.bool(), ids, torch.full_like(ids, -1)).int(),
            "length": lengths.int(), "topk_ids": top_ids.int().cpu(), "topk_logits": values.cpu(),
            "mean_ce": mean_ce.cpu(), "num_predicted": counts.int().cpu()}


def _max_positions(model) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def represent_stage(cfg, run_dir: Path) -> Dict[str, Any]:
    """Top-k logits + ids per position and mean CE per sequence of every model over the same texts."""
    fc = cfg.fusechat
    t0 = time.perf_counter()
    models = ensure_models(cfg, run_dir)
    stats: Dict[str, Any] = {"models_seconds": time.perf_counter() - t0}
    dm = fusion_datamodule(cfg, models[fc.pivot.name])
    layout = _layout(cfg, dm, run_dir)
    pivot_tok = dm.tokenizer
    rank, world = _rank_world()
    for entry in [fc.pivot] + list(fc.sources):
        out_dir = run_dir / "represent" / entry.name
        todo = [s for s in range(layout.num_shards)
                if s % world == rank and not (out_dir / _shard_name("shard", s)).exists()]
        stats[entry.name] = {"shards_computed": len(todo), "shards_total": layout.num_shards}
        if not todo:
            continue
        model = _load_model(models[entry.name])
        tok = pivot_tok if entry is fc.pivot else _load_tokenizer(entry, models[entry.name])
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        max_len = _max_positions(model)
        vocab_limit = min(len(tok), model.get_output_embeddings().weight.shape[0])
        truncated = 0
        bar = _progress(sum(layout.shard_range(s)[1] - layout.shard_range(s)[0] for s in todo),
                        f"represent {entry.name}", cfg.trainer.progress_bar)
        for shard in todo:
            start, end = layout.shard_range(shard)
            blocks = [np.asarray(dm.train_set.blocks[i], dtype=np.int64) for i in layout.block_indices[start:end]]
            if entry is fc.pivot:
                sequences = [b.tolist() for b in blocks]
            else:  # the same text, in the source's own tokens
                texts = [pivot_tok.decode(b.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
                         for b in blocks]
                sequences = tok(texts, add_special_tokens=False)["input_ids"]
            truncated += sum(1 for s in sequences if max_len and len(s) > max_len)
            parts = []
            for b in range(0, len(sequences), fc.represent_batch_size):
                parts.append(topk_representation(model, sequences[b: b + fc.represent_batch_size], pad_id,
                                                 fc.topk, vocab_limit, max_len))
                bar.update(len(sequences[b: b + fc.represent_batch_size]))
            width = max(int(p["input_ids"].shape[1]) for p in parts)
            shard_tensors: Dict[str, torch.Tensor] = {}
            for key, pad in (("input_ids", -1), ("topk_ids", -1), ("topk_logits", float("-inf"))):
                padded = []
                for p in parts:
                    t = p[key]
                    extra = width - t.shape[1]
                    if extra:
                        shape = (t.shape[0], extra) + tuple(t.shape[2:])
                        t = torch.cat([t, torch.full(shape, pad, dtype=t.dtype)], dim=1)
                    padded.append(t)
                shard_tensors[key] = torch.cat(padded)
            shard_tensors["topk_logits"] = shard_tensors["topk_logits"].to(LOGIT_DTYPES[fc.logits_dtype])
            for key in ("length", "mean_ce", "num_predicted"):
                shard_tensors[key] = torch.cat([p[key] for p in parts])
            index = torch.tensor(layout.block_indices[start:end], dtype=torch.long)
            shard_tensors["block_index"] = index
            shard_tensors["domain"] = torch.as_tensor(np.asarray(dm.train_set.domains)[index.numpy()], dtype=torch.long)
            _save_shard_atomic(shard_tensors, out_dir / _shard_name("shard", shard),
                               {"model": str(models[entry.name]), "kind": tokenizer_kind(tok)})
        bar.close()
        stats[entry.name]["sequences_truncated"] = truncated
        del model
    return stats


# ------------------------------------------------------------------------------------------------ align


def _vocab_list(tokenizer, width: int) -> List[Optional[str]]:
    """Token strings by id, `width` long (ids past the tokenizer: None, never mapped)."""
    tokens: List[Optional[str]] = [None] * width
    for token, idx in tokenizer.get_vocab().items():
        if 0 <= idx < width:
            tokens[idx] = token
    return tokens


def _one_to_one_alignment(n_src: int, n_tgt: int, tgt_to_src: np.ndarray):
    """A TokenAlignment that carries only the one-to-one groups of a stored DTW result (all that
    `align_distributions` reads)."""
    from data.alignment import TokenAlignment

    groups = tuple(((int(i),), (j,)) for j, i in enumerate(tgt_to_src) if i >= 0)
    return TokenAlignment(n_src, n_tgt, (), groups, float("nan"))


def _represent_shards(run_dir: Path, name: str, layout: RepresentLayout) -> List[Path]:
    paths = [run_dir / "represent" / name / _shard_name("shard", s) for s in range(layout.num_shards)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise ConfigError(f"{len(missing)} representation shard(s) missing (e.g. {missing[0]}): run --stage represent.")
    return paths


def _read_layout(run_dir: Path) -> RepresentLayout:
    path = run_dir / "represent" / "layout.json"
    if not path.exists():
        raise ConfigError(f"{path} does not exist: run --stage represent first.")
    saved = json.loads(path.read_text())
    return RepresentLayout(saved["block_indices"], saved["shard_blocks"], saved["topk"], saved["domain_names"])


def align_stage(cfg, run_dir: Path) -> Dict[str, Any]:
    """DTW token alignment, vocabulary map and distribution alignment onto the pivot vocabulary."""
    from data.alignment import (align_distributions, align_token_sequences_batch, vocab_map_exact,
                                vocab_map_min_ed, vocab_map_statistics)

    fc = cfg.fusechat
    layout = _read_layout(run_dir)
    pivot_paths = _represent_shards(run_dir, fc.pivot.name, layout)
    models = {e.name: (Path(e.pretrained) if e.steps == 0 else run_dir / "models" / e.name / "hf")
              for e in [fc.pivot] + list(fc.sources)}
    pivot_tok = _load_tokenizer(fc.pivot, models[fc.pivot.name])
    pivot_kind = tokenizer_kind(pivot_tok)
    rank, world = _rank_world()
    stats: Dict[str, Any] = {}
    for entry in fc.sources:
        out_dir = run_dir / "align" / entry.name
        src_paths = _represent_shards(run_dir, entry.name, layout)
        src_tok = _load_tokenizer(entry, models[entry.name])
        src_kind = tokenizer_kind(src_tok)
        pivot_vocab_width = len(pivot_tok)
        # 1. DTW per block: pivot position -> the source position it is matched one-to-one with (-1: none).
        todo = [s for s in range(layout.num_shards) if s % world == rank and not (out_dir / _shard_name("match", s)).exists()]
        bar = _progress(sum(layout.shard_range(s)[1] - layout.shard_range(s)[0] for s in todo),
                        f"align {entry.name}", cfg.trainer.progress_bar)
        for s in todo:
            piv, src = _load_shard(pivot_paths[s]), _load_shard(src_paths[s])
            matches = torch.full(piv["input_ids"].shape, -1, dtype=torch.int32)
            pairs = []
            for b in range(piv["input_ids"].shape[0]):
                p_ids = piv["input_ids"][b][: int(piv["length"][b])].tolist()
                s_ids = src["input_ids"][b][: int(src["length"][b])].tolist()
                pairs.append((src_tok.convert_ids_to_tokens(s_ids), pivot_tok.convert_ids_to_tokens(p_ids)))
            # the whole shard in one batched DTW (same paths as one call per block, faster)
            for b, alignment in enumerate(align_token_sequences_batch(pairs, src_kind, pivot_kind, band=fc.dtw_band)):
                matches[b, : alignment.n_tgt] = torch.from_numpy(alignment.tgt_to_src_one_to_one()).int()
            bar.update(len(pairs))
            _save_shard_atomic({"tgt_to_src": matches}, out_dir / _shard_name("match", s))
        bar.close()
        match_paths = [out_dir / _shard_name("match", s) for s in range(layout.num_shards)]
        if any(not p.exists() for p in match_paths):  # another rank's share is still running
            stats[entry.name] = {"complete": False}
            continue
        # 2. Vocabulary map source id -> pivot id.
        map_path = out_dir / f"vocab_map-{fc.vocab_map}.npy"
        src_width = len(src_tok)  # represent keeps top-k ids below the tokenizer's size
        if not map_path.exists():
            t0 = time.perf_counter()
            src_vocab = _vocab_list(src_tok, len(src_tok))
            piv_vocab = _vocab_list(pivot_tok, pivot_vocab_width)
            if fc.vocab_map == "exact":
                vmap = vocab_map_exact(src_vocab, piv_vocab, src_kind, pivot_kind)
            elif fc.vocab_map == "min_ed":
                vmap = vocab_map_min_ed(src_vocab, piv_vocab, src_kind, pivot_kind)
            else:
                def corpus() -> Iterator[Tuple[List[int], List[int], Any]]:
                    for s in range(layout.num_shards):
                        piv, src, match = (_load_shard(pivot_paths[s]), _load_shard(src_paths[s]),
                                           _load_shard(match_paths[s]))
                        for b in range(piv["input_ids"].shape[0]):
                            n_p, n_s = int(piv["length"][b]), int(src["length"][b])
                            yield (src["input_ids"][b][:n_s].tolist(), piv["input_ids"][b][:n_p].tolist(),
                                   _one_to_one_alignment(n_s, n_p, match["tgt_to_src"][b][:n_p].numpy()))

                vmap = vocab_map_statistics(corpus(), src_vocab, piv_vocab, src_kind, pivot_kind,
                                            min_count=fc.ms_min_count)
            vmap = np.concatenate([vmap, np.full(max(0, src_width - len(vmap)), -1, dtype=np.int64)])
            tmp = map_path.with_name(map_path.name + f".tmp{os.getpid()}.npy")
            np.save(tmp, vmap)
            os.replace(tmp, map_path)
            stats.setdefault(entry.name, {})["vocab_map_seconds"] = time.perf_counter() - t0
        vmap = np.load(map_path)
        if len(vmap) < src_width:
            vmap = np.concatenate([vmap, np.full(src_width - len(vmap), -1, dtype=np.int64)])
        # 3. Source distributions in the pivot vocabulary, at pivot positions.
        todo = [s for s in range(layout.num_shards) if s % world == rank and not (out_dir / _shard_name("dist", s)).exists()]
        matched = total = 0
        for s in todo:
            piv, src, match = _load_shard(pivot_paths[s]), _load_shard(src_paths[s]), _load_shard(match_paths[s])
            n, width = piv["input_ids"].shape
            ids = torch.full((n, width, fc.topk), -1, dtype=torch.int32)
            logits = torch.full((n, width, fc.topk), float("-inf"), dtype=torch.float32)
            for b in range(n):
                n_p, n_s = int(piv["length"][b]), int(src["length"][b])
                tgt_to_src = match["tgt_to_src"][b][:n_p].numpy()
                matched += int((tgt_to_src >= 0).sum())
                total += n_p
                out_ids, out_logits = align_distributions(
                    src["topk_ids"][b][:n_s].numpy(), src["topk_logits"][b][:n_s].float().numpy(),
                    _one_to_one_alignment(n_s, n_p, tgt_to_src), vmap, piv["input_ids"][b][:n_p].numpy(), fc.topk)
                ids[b, :n_p] = torch.from_numpy(out_ids).int()
                logits[b, :n_p] = torch.from_numpy(out_logits)
            _save_shard_atomic({"topk_ids": ids, "topk_logits": logits.to(LOGIT_DTYPES[fc.logits_dtype])},
                               out_dir / _shard_name("dist", s))
        entry_stats = stats.setdefault(entry.name, {})
        entry_stats.update(complete=True, shards_computed=len(todo),
                           vocab_mapped_fraction=float((vmap[: len(src_tok)] >= 0).mean()))
        if total:
            entry_stats["one_to_one_fraction"] = matched / total
    return stats


# ------------------------------------------------------------------------------------------------ train


def _fuse_shards(cfg, run_dir: Path, layout: RepresentLayout, source: str) -> Dict[str, Any]:
    """fused/<source>/shard-N: per block the fused target over {pivot, source} (MinCE or weighted)."""
    from models.fusion import fuse_min_ce, fuse_weighted

    fc = cfg.fusechat
    pivot_paths = _represent_shards(run_dir, fc.pivot.name, layout)
    src_paths = _represent_shards(run_dir, source, layout)
    out_dir = run_dir / "fused" / source
    # the source's share per domain: MinCE = fraction of sequences where it was chosen, weighted = mean weight
    weight_sum = np.zeros(len(layout.domain_names))
    count = np.zeros(len(layout.domain_names))
    for s in range(layout.num_shards):
        path = out_dir / _shard_name("shard", s)
        if path.exists():
            choice = _load_shard(path)["choice"]
        else:
            dist = run_dir / "align" / source / _shard_name("dist", s)
            if not dist.exists():
                raise ConfigError(f"{dist} is missing: run --stage align first.")
            piv, src, aligned = _load_shard(pivot_paths[s]), _load_shard(src_paths[s]), _load_shard(dist)
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
            _save_shard_atomic({"topk_ids": ids.int(), "topk_logits": logits.float(), "choice": choice.float()}, path)
        domains = _load_shard(pivot_paths[s])["domain"].numpy()
        np.add.at(weight_sum, domains, choice.double().numpy())
        np.add.at(count, domains, 1)
    share = {name: float(weight_sum[i] / count[i]) for i, name in enumerate(layout.domain_names) if count[i]}
    return {"source_share": float(weight_sum.sum() / max(count.sum(), 1)), "source_share_by_domain": share}


class FusedBlocks(torch.utils.data.Dataset):
    """The represented pivot blocks with their fused targets, read shard by shard from disk (a handle per
    shard, opened lazily in the reading process) in the block order of the shards."""

    def __init__(self, pivot_shards: Sequence[Path], fused_shards: Sequence[Path], shard_blocks: int):
        if len(pivot_shards) != len(fused_shards):
            raise ValueError(f"{len(pivot_shards)} pivot shards but {len(fused_shards)} fused shards.")
        self.pivot_shards = [str(p) for p in pivot_shards]
        self.fused_shards = [str(p) for p in fused_shards]
        self.shard_blocks = shard_blocks
        from safetensors import safe_open

        with safe_open(self.pivot_shards[-1], framework="pt") as f:
            last = f.get_slice("block_index").get_shape()[0]
        self._length = (len(pivot_shards) - 1) * shard_blocks + last
        self._handles: Dict[str, Any] = {}

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
        return {"input_ids": ids, "labels": ids.clone(), "domain": self._row(self.pivot_shards[shard], "domain", row),
                "fused_ids": self._row(self.fused_shards[shard], "topk_ids", row).long(),
                "fused_logits": self._row(self.fused_shards[shard], "topk_logits", row).float()}


def _fusion_module_class():
    from models.fusion import fusion_loss
    from recipes.lm_module import CausalLMModule, lm_loss

    class FusionModule(CausalLMModule):
        """CausalLMModule whose training loss is lam * CLM + (1 - lam) * sparse CE(student, fused target)."""

        def __init__(self, *args, lam: float = 0.9, temperature: float = 1.0, **kw):
            super().__init__(*args, **kw)
            self.lam, self.temperature = lam, temperature
            self._parts: Dict[str, float] = {}

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

    return FusionModule


@contextlib.contextmanager
def _fusion_module_builder(dataset: FusedBlocks, lam: float, temperature: float):
    """recipes.train.train builds the LightningModule with recipes.train.build_module, and reaches a recipe's
    own `build_module` only for a recipe without `run`. This recipe has `run`, so for its training sub-runs
    the builder is swapped here (restored on exit): the pivot-initialised model, trained on `dataset`
    (the represented blocks + fused targets) with the fusion loss. Everything else of train() (checkpoints,
    resume, CSV/W&B, per-domain validation, summary) is unchanged."""
    import recipes.train as train_mod

    original = train_mod.build_module

    def build(cfg, dm, recipe_mod=None):
        if list(dm.domain_names) != _read_domain_names(dataset):
            raise ConfigError(f"Fusion data domains {_read_domain_names(dataset)} differ from the run's "
                              f"{list(dm.domain_names)}.")
        dm.train_set = dataset
        model = train_mod.build_base_model(cfg, dm).train()  # from_pretrained returns eval mode
        from recipes.config import to_dict

        return _fusion_module_class()(model, to_dict(cfg.optim), cfg.trainer.max_steps, dm.domain_names,
                                      compile_model=cfg.model.compile, lam=lam, temperature=temperature)

    train_mod.build_module = build
    try:
        yield
    finally:
        train_mod.build_module = original


def _read_domain_names(dataset: FusedBlocks) -> List[str]:
    return json.loads((Path(dataset.pivot_shards[0]).parent.parent / "layout.json").read_text())["domain_names"]


def _target_cfg(cfg, run_dir: Path, pivot_dir: Path):
    fc = cfg.fusechat
    return load_config("tiny", _sub_overrides(cfg, run_dir, [
        f"trainer.max_steps={fc.target_steps}", f"optim.lr={fc.target_lr}", f"model.pretrained={pivot_dir}",
        f"data.tokenizer={_tokenizer_path(fc.pivot, pivot_dir)}", _list_override("data.domains", list(cfg.data.domains))]))


def train_stage(cfg, run_dir: Path) -> Dict[str, Any]:
    """Fuse the candidates per source, then train one target per source (and the CLM-only baseline)."""
    fc = cfg.fusechat
    layout = _read_layout(run_dir)
    pivot_dir = run_dir / "models" / fc.pivot.name / "hf" if fc.pivot.steps else Path(fc.pivot.pretrained)
    pivot_shards = _represent_shards(run_dir, fc.pivot.name, layout)
    stats: Dict[str, Any] = {}
    runs = [(s.name, run_dir / "targets" / s.name, fc.lam) for s in fc.sources]
    if fc.clm_baseline:  # the same blocks (and fused file, unused at lam = 1) and steps, CLM only
        runs.append(("clm_only", run_dir / "clm_only", 1.0))
    for source in fc.sources:
        stats[source.name] = _fuse_shards(cfg, run_dir, layout, source.name)
    for name, stage_dir, lam in runs:
        fused_name = name if name != "clm_only" else fc.sources[0].name
        fused = [run_dir / "fused" / fused_name / _shard_name("shard", s) for s in range(layout.num_shards)]
        dataset = FusedBlocks(pivot_shards, fused, layout.shard_blocks)
        _train_and_export(_target_cfg(cfg, run_dir, pivot_dir), stage_dir,
                          lambda: _fusion_module_builder(dataset, lam, fc.temperature))
        stats.setdefault(name, {})["model"] = str(stage_dir / "hf")
    return stats


# ------------------------------------------------------------------------------------------------ merge


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
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in Path(pivot_dir).iterdir():  # config, generation config, tokenizer
        if f.is_file() and f.name != "model.safetensors" and not f.name.endswith(".safetensors.index.json"):
            shutil.copy2(f, tmp / f.name)
    merge_safetensors(method, str(Path(pivot_dir) / "model.safetensors"),
                      [str(Path(d) / "model.safetensors") for d in target_dirs], str(tmp / "model.safetensors"), **kw)
    if tokenizer is not None:  # the pivot's tokenizer may live outside its model directory
        tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


@torch.no_grad()
def validation_loss_per_domain(model, dataset, domain_names: Sequence[str], batch_size: int = 32,
                               max_blocks: int = 0) -> Dict[str, float]:
    """Mean next-token loss per domain (and 'all') over the validation blocks (token-weighted); at most
    `max_blocks` of them (0: all), spread evenly over the set."""
    from recipes.lm_module import lm_loss

    if max_blocks and max_blocks < len(dataset):
        # evenly spaced over the whole set: validation blocks are stored domain after domain, so the
        # first max_blocks would see only the first domain
        indices = np.unique(np.linspace(0, len(dataset) - 1, max_blocks).round().astype(np.int64)).tolist()
    else:
        indices = list(range(len(dataset)))
    sums = np.zeros(len(domain_names) + 1)
    counts = np.zeros(len(domain_names) + 1)
    device = _device()
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start: start + batch_size]]
        ids = torch.stack([x["input_ids"] for x in items]).to(device)
        per_tok = lm_loss(model(input_ids=ids).logits, ids, reduction="none")
        for x, row in zip(items, per_tok):
            d = int(x["domain"])
            sums[d] += float(row.sum())
            counts[d] += row.numel()
            sums[-1] += float(row.sum())
            counts[-1] += row.numel()
    out = {name: sums[i] / counts[i] for i, name in enumerate(domain_names) if counts[i]}
    out["all"] = sums[-1] / max(counts[-1], 1)
    return out


@torch.no_grad()
def generate_text(model_dir: Path, prompt: str = "def ", max_new_tokens: int = 16) -> str:
    """Load a save_pretrained directory the way `model.pretrained=` does and greedily continue `prompt`."""
    from transformers import AutoTokenizer

    from models.factory import load_pretrained

    model = load_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)


def _model_order(names) -> List[str]:
    """pivot, clm_only, the targets, the merges (evaluation.json stores its keys sorted)."""
    order = {"pivot": 0, "clm_only": 1}
    return sorted(names, key=lambda m: (order.get(m, 2 if m.startswith("target_") else 3), m))


def plot_evaluation(evaluation: Dict[str, Any], path: Path) -> Path:
    """Grouped bars: validation loss (pivot tokens) per domain for every evaluated model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(evaluation["domains"]) + ["all"]
    models = _model_order(evaluation["val_loss"])
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


def merge_stage(cfg, run_dir: Path) -> Dict[str, Any]:
    """Merge the targets (cfg.fusechat.merge_method -> merged/, the compared methods -> merged_<m>/) and
    evaluate every model on the pivot's validation blocks per domain."""
    fc = cfg.fusechat
    pivot_dir = run_dir / "models" / fc.pivot.name / "hf" if fc.pivot.steps else Path(fc.pivot.pretrained)
    target_dirs = [run_dir / "targets" / s.name / "hf" for s in fc.sources]
    for d in target_dirs:
        if not (d / "config.json").exists():
            raise ConfigError(f"{d} is missing: run --stage train first.")
    pivot_tok = _load_tokenizer(fc.pivot, pivot_dir)
    merged: Dict[str, Path] = {}
    timings: Dict[str, float] = {}
    for method in dict.fromkeys([fc.merge_method] + list(fc.compare_merge_methods)):
        out = run_dir / ("merged" if method == fc.merge_method else f"merged_{method}")
        t0 = time.perf_counter()
        merged[method] = merge_models(method, pivot_dir, target_dirs, out, pivot_tok, **merge_kwargs(cfg, method))
        timings[method] = time.perf_counter() - t0
    eval_path = run_dir / "evaluation.json"
    if eval_path.exists():
        evaluation = json.loads(eval_path.read_text())
    else:
        dm = fusion_datamodule(cfg, pivot_dir)
        models: Dict[str, Path] = {"pivot": pivot_dir}
        if (run_dir / "clm_only" / "hf").exists():
            models["clm_only"] = run_dir / "clm_only" / "hf"
        models.update({f"target_{s.name}": d for s, d in zip(fc.sources, target_dirs)})
        models.update({f"merged_{m}": p for m, p in merged.items()})
        losses = {}
        for name, path in models.items():
            losses[name] = validation_loss_per_domain(_load_model(path), dm.val_set, dm.domain_names,
                                                      fc.eval_batch_size, fc.eval_max_blocks)
        evaluation = {"val_loss": losses, "domains": list(dm.domain_names), "val_blocks": len(dm.val_set),
                      "merge_method": fc.merge_method}
        _write_json_atomic(eval_path, evaluation)
    plot_path = run_dir / "evaluation.png"
    if not plot_path.exists():
        plot_evaluation(evaluation, plot_path)
    sample = generate_text(merged[fc.merge_method])
    return {"evaluation": evaluation, "evaluation_plot": str(plot_path), "merge_seconds": timings,
            "merged_model": str(merged[fc.merge_method]),
            "merged_sample": sample}


# ------------------------------------------------------------------------------------------- pipeline


STAGE_FUNCTIONS = {"represent": represent_stage, "align": align_stage, "train": train_stage, "merge": merge_stage}


def run_stages(cfg, run_dir: Path, stages: Sequence[str]) -> Dict[str, Any]:
    _check(cfg)
    run_dir = Path(run_dir).resolve()  # sub-run configs record absolute paths
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: Dict[str, Any] = {"recipe": "fusechat", "run_dir": str(run_dir)}
    for stage in stages:
        if stage not in STAGE_FUNCTIONS:
            raise ConfigError(f"Unknown stage '{stage}'; stages: {', '.join(STAGES)} or all.")
        t0 = time.perf_counter()
        summary[stage] = STAGE_FUNCTIONS[stage](cfg, run_dir)
        summary[stage]["seconds"] = time.perf_counter() - t0
    return summary


def _flatten_headline(summary: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    evaluation = summary.get("merge", {}).get("evaluation", {})
    for model, losses in evaluation.get("val_loss", {}).items():
        for domain, value in losses.items():
            out[f"fusechat/val_loss/{model}/{domain}"] = value
    return out


def run(cfg, run_dir: Path) -> Dict[str, Any]:
    """`make train RECIPE=fusechat`: every stage in order (each skipping what is already complete)."""
    summary = run_stages(cfg, run_dir, STAGES)
    summary.update(_flatten_headline(summary))
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.fusechat", description="FuseChat stages.")
    parser.add_argument("--stage", default="all", help=f"one of {', '.join(STAGES)}, all (default)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="default: <run.root>/fusechat/<run.run_id or 'default'>")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = load_config("fusechat", args.overrides)
        stages = list(STAGES) if args.stage == "all" else [args.stage]
        if args.stage != "all" and args.stage not in STAGES:
            raise ConfigError(f"Unknown stage '{args.stage}'; stages: {', '.join(STAGES)} or all.")
        run_dir = args.run_dir or Path(cfg.run.root) / "fusechat" / (cfg.run.run_id or "default")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        summary = run_stages(cfg, run_dir, stages)
        _write_json_atomic(run_dir / f"summary_{args.stage}.json", summary)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "merge" in summary:
        _print_table(summary["merge"]["evaluation"])
    print(f"run_dir: {run_dir}")
    return 0


def _print_table(evaluation: Dict[str, Any]) -> None:
    domains = list(evaluation["domains"]) + ["all"]
    print("validation loss (pivot tokens)   " + "  ".join(f"{d:>9}" for d in domains))
    for model in _model_order(evaluation["val_loss"]):
        losses = evaluation["val_loss"][model]
        print(f"{model:<32} " + "  ".join(f"{losses.get(d, math.nan):9.4f}" for d in domains))


if __name__ == "__main__":
    # Run through the package module so the config section and classes are registered once.
    from recipes.fusechat import main as _main

    sys.exit(_main())
