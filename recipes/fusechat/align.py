"""The align stage: each source's top-k re-expressed in the pivot's vocabulary, at the pivot's positions.

Per source, under align/<source>/:
1. match-NNNNN   DTW over the two tokenisations of every block (cost fusechat.align_cost, tie order
                 align_ties): pivot position -> the source position it is matched one-to-one with (-1: none;
                 definition fusechat.one_to_one), and the DTW path as per-pivot-position source ranges.
2. vocab_map-<kind>.npy   source id -> pivot id (-1: unmapped) by exact match, minimum edit distance or
                 statistics over the aligned pairs (fusechat.vocab_map; the statistics by fusechat.ms_rule).
3. dist-NNNNN    the source's top-k through the map at matched positions; elsewhere a one-hot on the pivot's
                 gold next token.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from recipes.engine.pipeline import fingerprint
from recipes.engine.runs import load_safetensors, save_safetensors_atomic

from .common import (
    LOGIT_DTYPES,
    RepresentLayout,
    check_signals,
    discard_stale,
    load_tokenizer,
    model_dir,
    my_shards,
    progress,
    ranks,
    read_layout,
    represent_shards,
    shard_name,
    tokenizer_kind,
    wait_for_files,
)
from .config import ALIGN_KEYS, align_options

AGREEMENT = ("positions", "same_text", "matched", "matched_same_end")  # data.alignment.text_agreement's counts


def vocab_list(tokenizer, width: int) -> List[Optional[str]]:
    """Token strings by id, `width` long (ids past the tokenizer: None, never mapped)."""
    tokens: List[Optional[str]] = [None] * width
    for token, idx in tokenizer.get_vocab().items():
        if 0 <= idx < width:
            tokens[idx] = token
    return tokens


def one_to_one_alignment(n_src: int, n_tgt: int, tgt_to_src: np.ndarray):
    """A TokenAlignment that carries only the one-to-one groups of a stored DTW result (all that
    `align_distributions` reads)."""
    from data.alignment import TokenAlignment

    groups = tuple(((int(i),), (j,)) for j, i in enumerate(tgt_to_src) if i >= 0)
    return TokenAlignment(n_src, n_tgt, (), groups, float("nan"))


def match_shard(piv: Dict[str, torch.Tensor], src: Dict[str, torch.Tensor], pivot_tok, src_tok,
                options: Dict[str, str], band: Optional[int]) -> Dict[str, torch.Tensor]:
    """The match-NNNNN tensors of one pair of represent shards: the whole shard through one batched DTW (the
    same paths as one call per block, faster) with the alignment choices `options` (`config.align_options`).
    tgt_to_src: the one-to-one match per pivot position; src_first / src_last: the DTW path; agreement: per
    block the counts of `data.alignment.text_agreement` (AGREEMENT)."""
    from data.alignment import align_token_sequences_batch, one_to_one_matches, substring_weight_of, text_agreement

    pivot_kind, src_kind = tokenizer_kind(pivot_tok), tokenizer_kind(src_tok)
    matches = torch.full(piv["input_ids"].shape, -1, dtype=torch.int32)
    first, last = torch.full_like(matches, -1), torch.full_like(matches, -1)
    agreement = torch.zeros(piv["input_ids"].shape[0], len(AGREEMENT), dtype=torch.int64)
    pairs = []
    for b in range(piv["input_ids"].shape[0]):
        p_ids = piv["input_ids"][b][: int(piv["length"][b])].tolist()
        s_ids = src["input_ids"][b][: int(src["length"][b])].tolist()
        pairs.append((src_tok.convert_ids_to_tokens(s_ids), pivot_tok.convert_ids_to_tokens(p_ids)))
    alignments = align_token_sequences_batch(pairs, src_kind, pivot_kind, substring_weight_of(options["cost"]),
                                             band=band, ties=options["ties"])
    for b, ((src_tokens, pivot_tokens), alignment) in enumerate(zip(pairs, alignments)):
        matched = one_to_one_matches(alignment, options["one_to_one"], src_tokens, pivot_tokens, src_kind,
                                     pivot_kind)
        matches[b, : alignment.n_tgt] = torch.from_numpy(matched).int()
        block_first, block_last = alignment.tgt_src_ranges()
        first[b, : alignment.n_tgt] = torch.from_numpy(block_first).int()
        last[b, : alignment.n_tgt] = torch.from_numpy(block_last).int()
        counts = text_agreement(alignment, matched, src_tokens, pivot_tokens, src_kind, pivot_kind)
        agreement[b] = torch.tensor([counts[k] for k in AGREEMENT])
    return {"tgt_to_src": matches, "src_first": first, "src_last": last, "agreement": agreement}


def _match_shards(cfg, layout: RepresentLayout, pivot_paths, src_paths, out_dir: Path, todo: Sequence[int],
                  pivot_tok, src_tok, name: str) -> None:
    """match-NNNNN of the shards `todo` (`match_shard`)."""
    options = align_options(cfg.fusechat)
    bar = progress(sum(layout.shard_range(s)[1] - layout.shard_range(s)[0] for s in todo), f"align {name}",
                   cfg.trainer.progress_bar)
    for s in todo:
        check_signals(f"the align stage ({name}, match shard {s})")
        piv, src = load_safetensors(pivot_paths[s]), load_safetensors(src_paths[s])
        tensors = match_shard(piv, src, pivot_tok, src_tok, options, cfg.fusechat.dtw_band)
        bar.update(int(piv["input_ids"].shape[0]))
        save_safetensors_atomic(out_dir / shard_name("match", s), tensors)
    bar.close()


def _vocab_map(cfg, layout: RepresentLayout, pivot_paths, src_paths, match_paths, pivot_tok, src_tok) -> np.ndarray:
    """Source id -> pivot id (-1: unmapped) by fusechat.vocab_map, `len(src_tok)` long. The statistics map
    counts the one-to-one pairs (fusechat.ms_rule=ours) or every pair on the DTW path (paper)."""
    from data.alignment import alignment_from_ranges, vocab_map_exact, vocab_map_min_ed, vocab_map_statistics

    fc = cfg.fusechat
    pivot_kind, src_kind = tokenizer_kind(pivot_tok), tokenizer_kind(src_tok)
    src_vocab = vocab_list(src_tok, len(src_tok))
    piv_vocab = vocab_list(pivot_tok, len(pivot_tok))
    if fc.vocab_map == "exact":
        return vocab_map_exact(src_vocab, piv_vocab, src_kind, pivot_kind)
    if fc.vocab_map == "min_ed":
        return vocab_map_min_ed(src_vocab, piv_vocab, src_kind, pivot_kind)

    def corpus() -> Iterator[Tuple[List[int], List[int], Any]]:
        for s in range(layout.num_shards):
            piv, src = load_safetensors(pivot_paths[s]), load_safetensors(src_paths[s])
            match = load_safetensors(match_paths[s])
            for b in range(piv["input_ids"].shape[0]):
                n_p, n_s = int(piv["length"][b]), int(src["length"][b])
                if rule == "paper":
                    alignment = alignment_from_ranges(n_s, n_p, match["src_first"][b][:n_p].tolist(),
                                                      match["src_last"][b][:n_p].tolist())
                else:
                    alignment = one_to_one_alignment(n_s, n_p, match["tgt_to_src"][b][:n_p].numpy())
                yield src["input_ids"][b][:n_s].tolist(), piv["input_ids"][b][:n_p].tolist(), alignment

    rule = align_options(fc)["ms_rule"]
    return vocab_map_statistics(corpus(), src_vocab, piv_vocab, src_kind, pivot_kind, min_count=fc.ms_min_count,
                                rule=rule)


def _dist_shards(cfg, pivot_paths, src_paths, match_paths, vmap: np.ndarray, out_dir: Path,
                 todo: Sequence[int]) -> Tuple[int, int]:
    """dist-NNNNN of the shards `todo`; returns (pivot positions matched one-to-one, pivot positions)."""
    from data.alignment import align_distributions

    fc = cfg.fusechat
    matched = total = 0
    for s in todo:
        check_signals(f"the align stage (dist shard {s})")
        piv, src, match = (load_safetensors(pivot_paths[s]), load_safetensors(src_paths[s]),
                           load_safetensors(match_paths[s]))
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
                one_to_one_alignment(n_s, n_p, tgt_to_src), vmap, piv["input_ids"][b][:n_p].numpy(), fc.topk)
            ids[b, :n_p] = torch.from_numpy(out_ids).int()
            logits[b, :n_p] = torch.from_numpy(out_logits)
        save_safetensors_atomic(out_dir / shard_name("dist", s),
                                {"topk_ids": ids, "topk_logits": logits.to(LOGIT_DTYPES[fc.logits_dtype])})
    return matched, total


def align_source(cfg, run_dir: Path, layout: RepresentLayout, entry, pivot_tok) -> Dict[str, Any]:
    """All three steps for one source (each resuming the shards it has not finished)."""
    fc = cfg.fusechat
    out_dir = Path(run_dir) / "align" / entry.name
    out_dir.mkdir(parents=True, exist_ok=True)
    pivot_paths = represent_shards(run_dir, fc.pivot.name, layout)
    src_paths = represent_shards(run_dir, entry.name, layout)
    src_tok = load_tokenizer(entry, model_dir(cfg, run_dir, entry))
    mine = my_shards(layout.num_shards)  # CPU work: every task takes a share
    todo = [s for s in mine if not (out_dir / shard_name("match", s)).exists()]
    _match_shards(cfg, layout, pivot_paths, src_paths, out_dir, todo, pivot_tok, src_tok, entry.name)
    match_paths = [out_dir / shard_name("match", s) for s in range(layout.num_shards)]
    wait_for_files(match_paths, f"the match shards of {entry.name}")  # the other tasks' shares
    stats: Dict[str, Any] = {}
    map_path = out_dir / f"vocab_map-{fc.vocab_map}.npy"
    src_width = len(src_tok)  # represent keeps top-k ids below the tokenizer's size
    if ranks().rank != 0:  # global rank 0 makes the map; the other tasks read it
        wait_for_files([map_path], f"the vocabulary map of {entry.name}")
    if not map_path.exists():
        t0 = time.perf_counter()
        vmap = _vocab_map(cfg, layout, pivot_paths, src_paths, match_paths, pivot_tok, src_tok)
        vmap = np.concatenate([vmap, np.full(max(0, src_width - len(vmap)), -1, dtype=np.int64)])
        tmp = map_path.with_name(map_path.name + f".tmp{os.getpid()}.npy")
        np.save(tmp, vmap)
        os.replace(tmp, map_path)
        stats["vocab_map_seconds"] = time.perf_counter() - t0
    vmap = np.load(map_path)
    if len(vmap) < src_width:
        vmap = np.concatenate([vmap, np.full(src_width - len(vmap), -1, dtype=np.int64)])
    todo = [s for s in mine if not (out_dir / shard_name("dist", s)).exists()]
    matched, total = _dist_shards(cfg, pivot_paths, src_paths, match_paths, vmap, out_dir, todo)
    wait_for_files([out_dir / shard_name("dist", s) for s in range(layout.num_shards)],
                   f"the dist shards of {entry.name}")
    stats.update(shards_computed=len(todo),
                 vocab_mapped_fraction=float((vmap[:src_width] >= 0).mean()), **align_options(fc))
    if total:
        stats["one_to_one_fraction"] = matched / total
    stats.update(text_agreement_fractions(match_paths))
    return stats


def text_agreement_fractions(match_paths: Sequence[Path]) -> Dict[str, float]:
    """Over all blocks: the fraction of pivot positions whose DTW group holds the same text on both sides
    (same_text_fraction), matched to a source position (matched_fraction), and matched to a source token
    that ends where the pivot token ends (matched_same_end_fraction: the source then predicts the same
    next text), and that last count over the matched positions (same_end_of_matched)."""
    return agreement_fractions(sum(load_safetensors(p)["agreement"].sum(dim=0) for p in match_paths))


def agreement_fractions(total: torch.Tensor) -> Dict[str, float]:
    """`text_agreement_fractions` of summed AGREEMENT counts."""
    counts = dict(zip(AGREEMENT, total.tolist()))
    positions = max(counts["positions"], 1)
    return {"same_text_fraction": counts["same_text"] / positions, "matched_fraction": counts["matched"] / positions,
            "matched_same_end_fraction": counts["matched_same_end"] / positions,
            "same_end_of_matched": counts["matched_same_end"] / max(counts["matched"], 1)}


def align_stage(cfg, run_dir: Path, results: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """DTW token alignment, vocabulary map and distribution alignment onto the pivot vocabulary."""
    fc = cfg.fusechat
    t0 = time.perf_counter()
    layout = read_layout(run_dir)
    discard_stale(run_dir, "align", fingerprint(cfg, ALIGN_KEYS), [Path(run_dir) / "align"])
    pivot_tok = load_tokenizer(fc.pivot, model_dir(cfg, run_dir, fc.pivot))
    stats: Dict[str, Any] = {e.name: align_source(cfg, run_dir, layout, e, pivot_tok) for e in fc.sources}
    stats["seconds"] = time.perf_counter() - t0
    return {"align": stats}
