"""Model-merging arithmetic (mergekit-style): each method is a small function over tensors of one
parameter, registered by name in MERGE_METHODS and applied tensor by tensor to whole state dicts or to
safetensors files (streamed so memory stays near one tensor per model).

Conventions (mergekit 0.1.5 unless stated): every tensor is merged, statistics are per tensor, arithmetic
is done in float32 (or float64 if the inputs are float64) and cast back to the base dtype.

Top-k on exact ties: `topk_mask` sorts magnitudes with a STABLE descending sort over the flattened tensor,
so among equal magnitudes at the cut-off the elements with the lowest flat index are kept. (torch.topk and
peft.utils.merge_utils.magnitude_based_pruning leave that order unspecified.)
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

MergeFn = Callable[..., Tensor]
MERGE_METHODS: dict[str, MergeFn] = {}


def register_merge(name: str) -> Callable[[MergeFn], MergeFn]:
    def wrap(fn: MergeFn) -> MergeFn:
        MERGE_METHODS[name] = fn
        return fn
    return wrap


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def task_vector(theta: Tensor, base: Tensor) -> Tensor:
    """tau = theta - base, in the working precision."""
    if theta.shape != base.shape:
        raise ValueError(f"task_vector: shape {tuple(theta.shape)} != base shape {tuple(base.shape)}")
    dt = _work_dtype(base)
    return theta.to(dt) - base.to(dt)


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} models")
    return [float(w) for w in weights]


def _stack_deltas(base: Tensor, models: Sequence[Tensor]) -> Tensor:
    if len(models) == 0:
        raise ValueError("need at least one model to merge")
    return torch.stack([task_vector(m, base) for m in models])


def topk_mask(x: Tensor, density: float) -> Tensor:
    """Boolean mask keeping the int(density*numel) largest |x| (stable: lower flat index wins ties)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    k = int(density * x.numel())
    flat = x.reshape(-1).abs()
    if k >= flat.numel():
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if k <= 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    # O(n) selection instead of a full sort, same elements as the stable descending sort: everything
    # above the k-th largest value, then the lowest-index elements equal to it until k are kept.
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    mask = flat > threshold
    tied = flat == threshold
    need = k - int(mask.sum())
    if int(tied.sum()) == need:  # no tie straddles the cut-off (the usual case)
        mask |= tied
    else:
        mask[tied.nonzero()[:need, 0]] = True
    return mask.view(x.shape)


def _elect_sign(weighted_deltas: Tensor) -> Tensor:
    """Majority sign by total mass; an exact zero sum counts as + (mergekit)."""
    total = weighted_deltas.sum(dim=0)
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


@register_merge("task_arithmetic")
def task_arithmetic(base: Tensor, models: Sequence[Tensor], weights: Sequence[float] | None = None,
                    lam: float = 0.3) -> Tensor:
    """theta = base + lam * sum_j w_j (theta_j - base)."""
    deltas = _stack_deltas(base, models)
    w = torch.tensor(_weights(len(models), weights), dtype=deltas.dtype).view(-1, *[1] * base.dim())
    merged = base.to(deltas.dtype) + lam * (w * deltas).sum(dim=0)
    return merged.to(base.dtype)


@register_merge("ties")
def ties(base: Tensor, models: Sequence[Tensor], density: float = 0.5,
         weights: Sequence[float] | None = None, lam: float = 1.0) -> Tensor:
    """TIES (mergekit 0.1.5): trim each delta to its top-k magnitudes, weight, elect the sign of the
    weighted sum (0 -> +), then average the agreeing untrimmed entries with the weights as divisor.
    Differs from peft.utils.merge_utils.ties, which elects the sign on UNweighted trimmed deltas and
    divides by the count of agreeing entries only when weights are uniform; `lam` scales the result."""
    deltas = _stack_deltas(base, models)
    w = torch.tensor(_weights(len(models), weights), dtype=deltas.dtype).view(-1, *[1] * base.dim())
    trimmed = torch.stack([d * topk_mask(d, density) for d in deltas])
    weighted = trimmed * w
    sign = _elect_sign(weighted)
    # A trimmed (zero) entry has sign 0 so never agrees: it leaves the divisor.
    agree = torch.sign(weighted) == sign
    mixed = (weighted * agree).sum(dim=0)
    divisor = (w * agree).sum(dim=0)
    divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return (base.to(deltas.dtype) + lam * mixed / divisor).to(base.dtype)


@register_merge("dare")
def dare(base: Tensor, models: Sequence[Tensor], density: float = 0.5,
         weights: Sequence[float] | None = None, rescale: bool = True,
         generator: torch.Generator | None = None, lam: float = 1.0) -> Tensor:
    """DARE (linear): drop each delta entry with probability 1-density, rescale survivors by 1/density,
    then theta = base + lam * sum_j w_j d_j."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"dare density must be in (0, 1], got {density}")
    deltas = _stack_deltas(base, models)
    keep = torch.rand(deltas.shape, generator=generator, dtype=deltas.dtype) < density
    dropped = deltas * keep
    if rescale:
        dropped = dropped / density
    w = torch.tensor(_weights(len(models), weights), dtype=deltas.dtype).view(-1, *[1] * base.dim())
    return (base.to(deltas.dtype) + lam * (w * dropped).sum(dim=0)).to(base.dtype)


@register_merge("sce")
def sce(pivot: Tensor, models: Sequence[Tensor], select_topk: float = 0.1,
        masked_final_sum: bool = True) -> Tensor:
    """SCE (FuseChat 2.0): Select positions by top-k variance of the deltas across models, Calculate
    weights w_j = mean(masked d_j^2) normalised (uniform if they sum below 1e-6), Erase entries whose sign
    disagrees with the sign of the summed masked deltas; theta = pivot + sum w_j e_j d_j / sum w_j e_j.
    masked_final_sum=True (mergekit 0.1.5): the sign election, the erase step and the final sum use the
    masked deltas, so unselected positions stay at the pivot. False (the formula as written in FuseChat,
    theta = pivot + sum w_j e_j d_j / sum w_j e_j with the raw deltas d_j): the selection only decides
    the weights; every position takes the sign-consensus weighted mean of the raw deltas. Entries equal
    to zero never agree with the elected sign, so a position where no delta is non-zero stays at pivot."""
    deltas = _stack_deltas(pivot, models)
    n = deltas.shape[0]
    # population variance across models (written out: torch.var over a short leading dim is ~10x slower)
    var = (deltas - deltas.mean(dim=0)).square().mean(dim=0) if n > 1 else deltas[0].abs()
    mask = topk_mask(var, select_topk)
    masked = deltas * mask
    energy = (masked ** 2).reshape(n, -1).mean(dim=1)
    if float(energy.sum()) < 1e-6:
        energy = torch.ones_like(energy)
    w = (energy / energy.sum()).view(-1, *[1] * pivot.dim())
    final = masked if masked_final_sum else deltas
    sign = _elect_sign(final)
    erase = torch.sign(final) == sign  # masked mode: unselected entries are 0, never kept
    num = (w * final * erase).sum(dim=0)
    den = (w * erase).sum(dim=0)
    den = torch.where(den.abs() < 1e-12, torch.ones_like(den), den)
    return (pivot.to(deltas.dtype) + num / den).to(pivot.dtype)


@register_merge("varm")
def varm(pivot: Tensor, models: Sequence[Tensor]) -> Tensor:
    """VaRM (FuseChat v1): per tensor, w_j = mean(d_j^2) / sum_k mean(d_k^2) (uniform if all zero);
    theta = pivot + sum_j w_j d_j."""
    deltas = _stack_deltas(pivot, models)
    n = deltas.shape[0]
    energy = (deltas ** 2).reshape(n, -1).mean(dim=1)
    if float(energy.sum()) == 0.0:
        energy = torch.ones_like(energy)
    w = (energy / energy.sum()).view(-1, *[1] * pivot.dim())
    return (pivot.to(deltas.dtype) + (w * deltas).sum(dim=0)).to(pivot.dtype)


def _get_method(method: str) -> MergeFn:
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[method]


def merge_state_dicts(method: str, base_sd: Mapping[str, Tensor], sds: Sequence[Mapping[str, Tensor]],
                      exclude: Iterable[str] = (), **kw) -> dict[str, Tensor]:
    """Merge every tensor of base_sd with the same-named tensors of each sd in `sds`; the names in `exclude`
    are not merged and keep base_sd's value (a copy)."""
    fn = _get_method(method)
    skip = set(exclude)
    out: dict[str, Tensor] = {}
    for name, base in base_sd.items():
        if name in skip:
            out[name] = base.clone()
            continue
        missing = [i for i, sd in enumerate(sds) if name not in sd]
        if missing:
            raise ValueError(f"tensor {name!r} missing from model(s) {missing}")
        out[name] = fn(base, [sd[name] for sd in sds], **kw)
    return out


def merge_safetensors(method: str, base_path: str, model_paths: Sequence[str], out_path: str,
                      **kw) -> None:
    """Streaming merge of safetensors files: one tensor (per model) in memory at a time; written to a
    temporary file next to out_path and moved into place atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    fn = _get_method(method)
    merged: dict[str, Tensor] = {}
    with safe_open(base_path, framework="pt") as base_f:
        handles = [safe_open(p, framework="pt") for p in model_paths]
        for name in base_f.keys():
            base = base_f.get_tensor(name)
            models = []
            for p, h in zip(model_paths, handles):
                if name not in h.keys():
                    raise ValueError(f"tensor {name!r} missing from {p}")
                models.append(h.get_tensor(name))
            merged[name] = fn(base, models, **kw).contiguous()
            del base, models
        meta = base_f.metadata()
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".safetensors.tmp", dir=out_dir)
    os.close(fd)
    try:
        save_file(merged, tmp, metadata=meta)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
