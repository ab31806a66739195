"""The represent stage: train (or take) the pivot and every source, then run each over the same texts.

The texts are a seeded sample of the pivot's training blocks (`represent/layout.json`). Each source reads the
pivot block's text in its own tokens. Per block and model, `represent/<name>/shard-NNNNN.safetensors` holds the
model's input ids, per position the top-k logits and ids (row i predicts token i + 1) and per sequence the mean
cross-entropy over the predicted tokens. Finished shards are kept, so a cut stage resumes where it stopped.

With a loss mask (chat data, data.loss_on=assistant) the mean cross-entropy covers the predicted tokens that
count (the assistant turns'), and the pivot's shards hold the mask (`loss_mask`), which the train stage turns
into labels -100. A source's tokens count where their last character lies in the text of the pivot tokens that
count (data/chat.py: decoded_spans, token_mask).

Models load with fusechat.represent_dtype (bf16 | fp16 | fp32) and fusechat.device_map (auto: spread over the
GPUs, for a source larger than one).

Several tasks (srun's or torchrun's, common.ranks) split the shards round-robin: with device_map null every task
computes its share on its own GPU; with device_map auto the unit is a node, whose local rank 0 alone computes
with all the node's GPUs. Every task then waits for all shards (common.wait_for_files) and goes on.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from recipes.engine.errors import ConfigError
from recipes.engine.pipeline import fingerprint
from recipes.engine.runs import save_safetensors_atomic, write_json_atomic

from .common import (
    LOGIT_DTYPES,
    RepresentLayout,
    check_signals,
    discard_stale,
    fusion_datamodule,
    input_device,
    layout_path,
    load_fusion_model,
    load_tokenizer,
    model_config,
    model_dir,
    my_shards,
    progress,
    ranks,
    shard_name,
    sub_run_settings,
    tokenizer_kind,
    train_and_export,
    wait_for_files,
)
from .config import REPRESENT_KEYS


def ensure_models(cfg, run_dir: Path) -> Optional[Dict[str, Path]]:
    """name -> save_pretrained directory (with tokenizer) of the pivot and every source; trains what is
    missing (a sub-run trained with other settings than now is trained again). None on a process that
    Lightning's launcher started for a training (common.train_and_export)."""
    out: Dict[str, Path] = {}
    for entry in [cfg.fusechat.pivot] + list(cfg.fusechat.sources):
        if entry.steps == 0:
            out[entry.name] = model_dir(cfg, run_dir, entry)
            continue
        sub_cfg = model_config(cfg, entry, run_dir)
        stage_dir = Path(run_dir) / f"model_{entry.name}"
        discard_stale(run_dir, f"model_{entry.name}", sub_run_settings(sub_cfg), [stage_dir])
        hf = train_and_export(sub_cfg, stage_dir)
        if hf is None:
            return None
        out[entry.name] = hf
    return out


def choose_layout(cfg, dm, run_dir: Path) -> RepresentLayout:
    """The sample of pivot training blocks (seeded), fixed at the first call and checked afterwards."""
    meta_path = layout_path(run_dir)
    fc = cfg.fusechat
    n_train = len(dm.train_set)
    if meta_path.exists():
        saved = RepresentLayout(**{k: v for k, v in json.loads(meta_path.read_text()).items()
                                   if k in ("block_indices", "shard_blocks", "topk", "domain_names")})
        if (saved.shard_blocks, saved.topk, saved.domain_names) != (fc.shard_blocks, fc.topk, list(dm.domain_names)) \
                or len(saved.block_indices) != min(fc.num_blocks, n_train):
            raise ConfigError(f"{run_dir} was represented with other settings ({meta_path}: shard_blocks="
                              f"{saved.shard_blocks}, topk={saved.topk}, {len(saved.block_indices)} blocks, "
                              f"domains {saved.domain_names}): use another run directory.")
        return saved
    g = torch.Generator().manual_seed(cfg.run.seed)
    chosen = torch.randperm(n_train, generator=g)[: min(fc.num_blocks, n_train)].tolist()
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(meta_path, {"block_indices": chosen, "shard_blocks": fc.shard_blocks, "topk": fc.topk,
                                  "domain_names": list(dm.domain_names), "train_blocks_total": n_train})
    return RepresentLayout(chosen, fc.shard_blocks, fc.topk, list(dm.domain_names))


@torch.no_grad()
def topk_representation(model, sequences: Sequence[Sequence[int]], pad_id: int, k: int, vocab_limit: int,
                        max_len: Optional[int] = None,
                        masks: Optional[Sequence[Sequence[int]]] = None) -> Dict[str, torch.Tensor]:
    """Run `model` over a batch of token sequences (right-padded); per position the top-k logits and ids
    over the first `vocab_limit` logits (embedding rows past the tokenizer are never a prediction), and per
    sequence the mean next-token cross-entropy (row i predicts token i + 1) over the predicted tokens whose
    mask is 1 (`masks`: one 0/1 per token of each sequence, returned as `loss_mask`; None: every token counts).
    Sequences longer than max_len are cut there (a model with learned positions cannot read further)."""
    seqs = [list(s)[:max_len] if max_len else list(s) for s in sequences]
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max())
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    counted = torch.zeros((len(seqs), width), dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        counted[b, : len(s)] = True if masks is None else torch.as_tensor(np.asarray(masks[b][: len(s)]) != 0)
    positions = torch.arange(width)[None, :]
    attention = (positions < lengths[:, None]).long()
    dev = input_device(model)
    logits = model(input_ids=ids.to(dev), attention_mask=attention.to(dev)).logits
    out_dev = logits.device  # the last device of a model spread over several (device_map=auto)
    logits = logits[..., :vocab_limit].float()
    values, top_ids = logits.topk(min(k, vocab_limit), dim=-1)
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -log_probs.gather(-1, ids[:, 1:].to(out_dev).clamp(max=vocab_limit - 1)[..., None])[..., 0]
    predicted = counted[:, 1:].to(out_dev)
    counts = predicted.sum(1)
    mean_ce = (nll * predicted).sum(1) / counts.clamp(min=1)
    pad = ~(positions < lengths[:, None]).to(out_dev)
    top_ids = top_ids.masked_fill(pad[..., None], -1)
    values = values.masked_fill(pad[..., None], float("-inf"))
    out = {"input_ids": torch.where(attention.bool(), ids, torch.full_like(ids, -1)).int(),
           "length": lengths.int(), "topk_ids": top_ids.int().cpu(), "topk_logits": values.cpu(),
           "mean_ce": mean_ce.cpu(), "num_predicted": counts.int().cpu()}
    if masks is not None:
        out["loss_mask"] = counted.to(torch.uint8)
    return out


def max_positions(model) -> Optional[int]:
    """The longest input a model reads (learned position embeddings), or None when it has no such limit."""
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _concat_padded(parts, key: str, pad, width: int) -> torch.Tensor:
    padded = []
    for p in parts:
        t = p[key]
        extra = width - t.shape[1]
        if extra:
            t = torch.cat([t, torch.full((t.shape[0], extra) + tuple(t.shape[2:]), pad, dtype=t.dtype)], dim=1)
        padded.append(t)
    return torch.cat(padded)


def _represent_model(cfg, dm, layout: RepresentLayout, entry, model_path: Path, out_dir: Path,
                     todo: Sequence[int]) -> int:
    """Write the shards `todo` of one model; returns how many of its sequences were cut at its max length."""
    from data.chat import decoded_spans, token_mask

    fc = cfg.fusechat
    pivot_tok = dm.tokenizer
    model = load_fusion_model(cfg, model_path)
    is_pivot = entry.name == fc.pivot.name
    masked = dm.train_set.masked
    tok = pivot_tok if is_pivot else load_tokenizer(entry, model_path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    max_len = max_positions(model)
    vocab_limit = min(len(tok), model.get_output_embeddings().weight.shape[0])
    truncated = 0
    bar = progress(sum(layout.shard_range(s)[1] - layout.shard_range(s)[0] for s in todo),
                   f"represent {entry.name}", cfg.trainer.progress_bar)
    for shard in todo:
        start, end = layout.shard_range(shard)
        chosen = layout.block_indices[start:end]
        blocks = [np.asarray(dm.train_set.blocks[i], dtype=np.int64) for i in chosen]
        block_masks = [dm.train_set.loss_mask(i) for i in chosen] if masked else None
        masks = block_masks
        if is_pivot:
            sequences = [b.tolist() for b in blocks]
        elif masked:  # the same text in the source's own tokens; its tokens count inside the counted text
            decoded = [decoded_spans(pivot_tok, b.tolist(), m) for b, m in zip(blocks, block_masks)]
            if not getattr(tok, "is_fast", False):
                raise ConfigError(f"fusechat source '{entry.name}': a loss mask (data.loss_on=assistant) needs a fast "
                                  "tokenizer (character offsets) for the source.")
            enc = tok([t for t, _ in decoded], add_special_tokens=False, return_offsets_mapping=True)
            sequences = enc["input_ids"]
            masks = [token_mask(np.asarray(off, dtype=np.int64).reshape(-1, 2), spans)
                     for off, (_, spans) in zip(enc["offset_mapping"], decoded)]
        else:  # the same text, in the source's own tokens
            texts = [pivot_tok.decode(b.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
                     for b in blocks]
            sequences = tok(texts, add_special_tokens=False)["input_ids"]
        truncated += sum(1 for s in sequences if max_len and len(s) > max_len)
        parts = []
        for b in range(0, len(sequences), fc.represent_batch_size):
            batch = sequences[b: b + fc.represent_batch_size]
            batch_masks = masks[b: b + fc.represent_batch_size] if masks is not None else None
            check_signals(f"the represent stage ({entry.name}, shard {shard})")
            parts.append(topk_representation(model, batch, pad_id, fc.topk, vocab_limit, max_len, batch_masks))
            bar.update(len(batch))
        width = max(int(p["input_ids"].shape[1]) for p in parts)
        padded = [("input_ids", -1), ("topk_ids", -1), ("topk_logits", float("-inf"))]
        if masked:  # which tokens are targets of the loss (the train stage's labels)
            padded.append(("loss_mask", 0))
        tensors = {key: _concat_padded(parts, key, pad, width) for key, pad in padded}
        tensors["topk_logits"] = tensors["topk_logits"].to(LOGIT_DTYPES[fc.logits_dtype])
        for key in ("length", "mean_ce", "num_predicted"):
            tensors[key] = torch.cat([p[key] for p in parts])
        index = torch.tensor(layout.block_indices[start:end], dtype=torch.long)
        tensors["block_index"] = index
        tensors["domain"] = torch.as_tensor(np.asarray(dm.train_set.domains)[index.numpy()], dtype=torch.long)
        save_safetensors_atomic(out_dir / shard_name("shard", shard), tensors,
                                {"model": str(model_path), "kind": tokenizer_kind(tok), "task": str(ranks().rank)})
    bar.close()
    del model
    return truncated


def represent_stage(cfg, run_dir: Path, results: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """Top-k logits + ids per position and mean CE per sequence of every model over the same texts."""
    fc = cfg.fusechat
    t0 = time.perf_counter()
    models = ensure_models(cfg, run_dir)
    if models is None:  # a process Lightning started for a training: the launching process goes on
        return None
    stats: Dict[str, Any] = {"models_seconds": time.perf_counter() - t0}
    discard_stale(run_dir, "represent", fingerprint(cfg, REPRESENT_KEYS), [Path(run_dir) / "represent"])
    dm = fusion_datamodule(cfg, run_dir, models[fc.pivot.name])
    layout = choose_layout(cfg, dm, run_dir)
    r = ranks()
    per_node = fc.get("device_map") == "auto"  # a model spread over all of a node's GPUs: one task per node
    mine = my_shards(layout.num_shards, per_node)
    every: List[Path] = []
    for entry in [fc.pivot] + list(fc.sources):
        out_dir = Path(run_dir) / "represent" / entry.name
        out_dir.mkdir(parents=True, exist_ok=True)
        todo = [s for s in mine if not (out_dir / shard_name("shard", s)).exists()]
        stats[entry.name] = {"shards_computed": len(todo), "shards_total": layout.num_shards}
        if r.world > 1:
            print(f"[fusechat] task {r.rank} of {r.world} (node {r.node}, local {r.local_rank}): represent "
                  f"{entry.name}: computing shards {todo} of {layout.num_shards}", flush=True)
        if todo:
            stats[entry.name]["sequences_truncated"] = _represent_model(cfg, dm, layout, entry, models[entry.name],
                                                                        out_dir, todo)
        every += [out_dir / shard_name("shard", s) for s in range(layout.num_shards)]
    if r.world > 1:  # the other tasks' shares: every task goes on to the next stage with all shards
        stats["task"] = {"rank": r.rank, "world": r.world, "unit": "node" if per_node else "task"}
        wait_for_files(every, "the represent shards")
        print(f"[fusechat] task {r.rank} of {r.world}: represent finished, all {len(every)} shards there",
              flush=True)
    stats["seconds"] = time.perf_counter() - t0
    return {"recipe": cfg.run.name, "run_dir": str(run_dir), "represent": stats}
