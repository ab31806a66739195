"""FuseChat fusion functions and the pairwise fusion loss.

Distributions are stored sparsely as top-k (ids, logits) per position, [B, L, K], padded with
id -1 / logit -inf. A row's probabilities are softmax(kept logits / T) over its non-pad entries;
a row with no entries carries no target and is left out of every average.

Position convention (the same as `data.alignment.align_distributions`): row i of a stored
distribution is the prediction made after reading tokens 0..i, i.e. of token i + 1, exactly like
the student's logits at position i. No shift is applied to the fusion term; the CLM term shifts
labels the usual way.

Plain PyTorch: no Lightning, usable from any training loop.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Candidate = Tuple[torch.Tensor, torch.Tensor]  # (ids [B, L, K], logits [B, L, K])


def _valid_entries(target_ids: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    return (target_ids >= 0) & torch.isfinite(target_logits)


def sparse_target_probs(
    target_ids: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """softmax(logits / T) over each row's valid entries; 0 on pads and on rows with no entry."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    valid = _valid_entries(target_ids, target_logits)
    row_has_target = valid.any(dim=-1, keepdim=True)
    scaled = torch.where(valid, target_logits / temperature, torch.full_like(target_logits, float("-inf")))
    # An all-pad row would give softmax(-inf, ...) = NaN; give it zeros instead and mask it.
    scaled = torch.where(row_has_target, scaled, torch.zeros_like(scaled))
    return torch.softmax(scaled, dim=-1) * valid


def sparse_fusion_ce(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logits: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy of the student against a sparse top-k target, mean over positions.

    loss = mean over positions (mask true and target non-empty) of
           -sum_k p_k * log_softmax(student_logits)[id_k],  p = softmax(target_logits / T) over
    the non-pad entries. Only the K stored entries are gathered from the student: the dense
    B x L x V target distribution is never built. The temperature scales the target only (the paper's definition:
    target = softmax(kept logits / T)). Returns a 0-dim tensor (0, still in the graph, when no
    position counts).
    """
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, L, V], got shape {tuple(student_logits.shape)}.")
    if target_ids.shape != target_logits.shape or target_ids.dim() != 3:
        raise ValueError(
            f"target_ids {tuple(target_ids.shape)} and target_logits {tuple(target_logits.shape)} "
            "must both be [B, L, K]."
        )
    if target_ids.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"Targets cover {tuple(target_ids.shape[:2])} (B, L) positions but the student has "
            f"{tuple(student_logits.shape[:2])}."
        )
    vocab_size = student_logits.shape[-1]
    if target_ids.numel() and int(target_ids.max()) >= vocab_size:
        raise ValueError(f"Target id {int(target_ids.max())} is outside the student's vocabulary of {vocab_size}.")
    if mask is not None and mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask must be [B, L] = {tuple(student_logits.shape[:2])}, got {tuple(mask.shape)}.")

    target_probs = sparse_target_probs(target_ids, target_logits.to(student_logits.dtype), temperature)
    log_normaliser = torch.logsumexp(student_logits, dim=-1, keepdim=True)  # [B, L, 1]
    picked = student_logits.gather(-1, target_ids.clamp(min=0).long())  # pads read id 0, weighted 0
    per_position = -(target_probs * (picked - log_normaliser)).sum(dim=-1)  # [B, L]

    counts = _valid_entries(target_ids, target_logits).any(dim=-1)
    if mask is not None:
        counts = counts & mask.bool()
    weight = counts.to(per_position.dtype)
    return (per_position * weight).sum() / weight.sum().clamp(min=1.0)


def _stack_candidates(candidates: Sequence[Candidate]) -> Tuple[torch.Tensor, torch.Tensor]:
    """[C, B, L, K_max] ids and logits, each candidate padded to the widest K."""
    if not candidates:
        raise ValueError("At least one candidate distribution is needed.")
    shapes = {tuple(ids.shape[:2]) for ids, _ in candidates}
    if len(shapes) != 1:
        raise ValueError(f"Candidates cover different (B, L) positions: {sorted(shapes)}.")
    for c, (ids, logits) in enumerate(candidates):
        if ids.shape != logits.shape or ids.dim() != 3:
            raise ValueError(f"Candidate {c}: ids {tuple(ids.shape)} and logits {tuple(logits.shape)} "
                             "must both be [B, L, K].")
    width = max(ids.shape[-1] for ids, _ in candidates)
    dtype = torch.float32  # at least float32; float64 inputs stay float64
    for _, logits in candidates:
        dtype = torch.promote_types(dtype, logits.dtype)
    padded_ids, padded_logits = [], []
    for ids, logits in candidates:
        extra = width - ids.shape[-1]
        padded_ids.append(F.pad(ids.long(), (0, extra), value=-1))
        padded_logits.append(F.pad(logits.to(dtype), (0, extra), value=float("-inf")))
    return torch.stack(padded_ids), torch.stack(padded_logits)


def _stack_ces(ces: Union[torch.Tensor, Sequence[torch.Tensor]], n_candidates: int, batch: int) -> torch.Tensor:
    stacked = ces if isinstance(ces, torch.Tensor) else torch.stack([torch.as_tensor(c) for c in ces])
    if stacked.shape != (n_candidates, batch):
        raise ValueError(f"ces must be [C, B] = ({n_candidates}, {batch}) (one CE per candidate and sequence), "
                         f"got {tuple(stacked.shape)}.")
    return stacked.float()


def fuse_min_ce(
    candidates: Sequence[Candidate], ces: Union[torch.Tensor, Sequence[torch.Tensor]]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MinCE: per sequence, the whole distribution of the candidate whose CE against the gold
    tokens is smallest. ces[c, b] is candidate c's mean CE on sequence b. Ties go to the lowest
    candidate index (put the pivot first to prefer it). Returns (ids [B, L, K], logits [B, L, K],
    chosen candidate index [B]); K is the widest candidate's, narrower ones padded."""
    ids, logits = _stack_candidates(candidates)
    n_candidates, batch = ids.shape[:2]
    choice = torch.argmin(_stack_ces(ces, n_candidates, batch), dim=0)  # first minimum on ties
    rows = torch.arange(batch)
    return ids[choice, rows], logits[choice, rows], choice


def fuse_weighted(
    candidates: Sequence[Candidate], ces: Union[torch.Tensor, Sequence[torch.Tensor]], k: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted average by exp(-CE): w[c, b] = softmax over candidates of -ces[:, b].

    Union of top-k sets: at each position the fused distribution is q(id) = sum_c w_c p_c(id),
    where p_c is candidate c's softmax over its own stored entries and p_c(id) = 0 for an id
    outside c's set. The union can hold up to sum_c K_c ids; the `k` (default: the widest
    candidate's K) most probable are kept, ties to the earlier entry (candidate order, then slot).
    Returned logits are log q, so softmax over the kept entries gives q renormalised over them
    (a candidate with an empty row at a position drops out there the same way)."""
    ids, logits = _stack_candidates(candidates)  # [C, B, L, K]
    n_candidates, batch, length, width = ids.shape
    weights = torch.softmax(-_stack_ces(ces, n_candidates, batch), dim=0)  # [C, B]
    probs = sparse_target_probs(ids, logits) * weights[:, :, None, None]
    # Concatenate the candidates' entries per position: [B, L, S] with S = C * K.
    union_ids = ids.permute(1, 2, 0, 3).reshape(batch, length, n_candidates * width)
    union_probs = probs.permute(1, 2, 0, 3).reshape(batch, length, n_candidates * width)
    valid = union_ids >= 0
    same_id = (union_ids[..., :, None] == union_ids[..., None, :]) & valid[..., :, None] & valid[..., None, :]
    total = (same_id * union_probs[..., None, :]).sum(dim=-1)  # each entry's id summed over duplicates
    size = union_ids.shape[-1]
    earlier = torch.ones(size, size, dtype=torch.bool).tril(diagonal=-1)  # earlier[s, s'] = s' < s
    first_occurrence = valid & ~(same_id & earlier).any(dim=-1)
    fused = torch.where(first_occurrence, total, torch.zeros_like(total))

    keep = width if k is None else k
    if keep < 1:
        raise ValueError(f"k must be >= 1, got {keep}.")
    keep = min(keep, size)
    order = torch.sort(fused, dim=-1, descending=True, stable=True).indices[..., :keep]
    top_probs = fused.gather(-1, order)
    present = top_probs > 0
    out_ids = torch.where(present, union_ids.gather(-1, order), torch.full_like(order, -1))
    out_logits = torch.where(present, top_probs.clamp(min=torch.finfo(top_probs.dtype).tiny).log(),
                             torch.full_like(top_probs, float("-inf")))
    return out_ids, out_logits


class FusionLossOutput(NamedTuple):
    loss: torch.Tensor  # lam * clm + (1 - lam) * fusion
    clm: torch.Tensor
    fusion: torch.Tensor


def fusion_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    fused_ids: torch.Tensor,
    fused_logits: torch.Tensor,
    lam: float = 0.9,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> FusionLossOutput:
    """FuseChat pairwise training loss: lam * CLM + (1 - lam) * CE(student, fused distribution).

    labels: [B, L] token ids with `ignore_index` on unsupervised tokens (Hugging Face convention:
    labels align with the inputs, the shift happens here). CLM: student_logits[:, i] predicts
    labels[:, i + 1]. Fusion: fused row i is the distribution of token i + 1 too, so it is compared
    with student_logits[:, i] where labels[:, i + 1] is supervised; the last position never is.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}.")
    if labels.shape != student_logits.shape[:2]:
        raise ValueError(f"labels must be [B, L] = {tuple(student_logits.shape[:2])}, got {tuple(labels.shape)}.")
    vocab_size = student_logits.shape[-1]
    shifted_logits = student_logits[:, :-1].reshape(-1, vocab_size)
    next_labels = labels[:, 1:].reshape(-1)
    if bool((next_labels != ignore_index).any()):
        clm = F.cross_entropy(shifted_logits, next_labels, ignore_index=ignore_index)
    else:  # nothing supervised: a zero that still belongs to the graph
        clm = student_logits.sum() * 0.0
    supervised_next = torch.zeros_like(labels, dtype=torch.bool)
    supervised_next[:, :-1] = labels[:, 1:] != ignore_index
    fusion = sparse_fusion_ce(student_logits, fused_ids, fused_logits, supervised_next, temperature)
    return FusionLossOutput(lam * clm + (1.0 - lam) * fusion, clm, fusion)
