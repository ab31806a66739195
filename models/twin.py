"""Twin-Merging (Lu et al., NeurIPS 2024): a shared expert plus SVD-compressed exclusive experts,
combined per input by router weights.

Exclusive experts tau_t = theta_t - theta_shared are stored as factors: for each 2-D tensor
tau ~= US @ V^T with US = U*S [out, r] and V [in, r]; 1-D tensors stay dense. At inference,
`attach_lowrank_experts` wraps the affected modules so that

    y = W_shared x + sum_t w_t[b] * US_t (V_t^T x)        (nn.Linear, bias deltas added w-weighted)
    e = E_shared[ids] + sum_t w_t[b] * US_t[ids] V_t^T     (nn.Embedding)
    n = norm(x) + (sum_t w_t[b] d_t) * norm_unit(x)       (elementwise-affine norms: linear in weight)

so one batch of differently routed inputs runs in a single pass without rewriting weights.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn


@dataclass
class LowRank:
    """tau ~= us @ v.T; us: [out, r] (U scaled by S), v: [in, r]."""
    us: Tensor
    v: Tensor

    @property
    def rank(self) -> int:
        return self.us.shape[1]

    def dense(self) -> Tensor:
        return self.us @ self.v.T

    def nbytes(self) -> int:
        return self.us.numel() * self.us.element_size() + self.v.numel() * self.v.element_size()


Expert = dict[str, "LowRank | Tensor"]


RANK_ROUNDINGS = ("floor", "round")


def resolve_rank(rank: float | int, shape: Sequence[int], rounding: str = "round") -> int:
    """The SVD rank of a delta of `shape`: an int is an absolute rank; a float is a fraction of min(shape),
    rounded down ("floor": int(fraction * min(shape)), the official Twin-Merging code) or to the nearest
    ("round"). At least 1 (the official code returns an all-zero delta when the product is below 1) and at
    most min(shape)."""
    full = min(shape)
    if isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive fraction (<=1.0 as float) or an int, got {rank!r}")
    if rounding not in RANK_ROUNDINGS:
        raise ValueError(f"rounding must be one of {RANK_ROUNDINGS}, got {rounding!r}")
    if isinstance(rank, float):
        r = int(rank * full) if rounding == "floor" else int(round(rank * full))
        r = max(1, r)
    else:
        r = int(rank)
    return min(r, full)


def truncated_svd(tau: Tensor, r: int) -> LowRank:
    """The best rank-r approximation of a 2-D tensor (Eckart-Young) as factors."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    return LowRank(us=(u[:, :r] * s[:r]).contiguous(), v=vh[:r].T.contiguous())


def compress_exclusive(tau_state_dict: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], rank: float | int = 0.1,
                       rounding: str = "round") -> Expert:
    """Truncated SVD of every 2-D delta (rank: see resolve_rank); 1-D deltas stay dense (a copy). The deltas: a
    mapping, or (name, delta) pairs such as each_exclusive_task_vector yields (each used before the next)."""
    out: Expert = {}
    pairs = tau_state_dict.items() if isinstance(tau_state_dict, Mapping) else tau_state_dict
    for name, tau in pairs:
        if tau.dim() == 2:
            out[name] = truncated_svd(tau, resolve_rank(rank, tau.shape, rounding))
        elif tau.dim() <= 1:
            out[name] = tau.clone()
        else:
            raise ValueError(f"compress_exclusive: {name} has {tau.dim()} dims; only 1-D/2-D supported")
    return out


def shared_exclusions(names: Iterable[str], classifier: Iterable[str] = (), biases: bool = True) -> list[str]:
    """The tensors the official Twin-Merging code leaves out of the shared (task-arithmetic) merge: the
    classifier (`classifier`: exact names) and, with `biases`, every tensor whose name ends in ".bias"."""
    head = set(classifier)
    return [n for n in names if n in head or (biases and n.endswith(".bias"))]


def exclusive_task_vectors(shared_state: Mapping[str, Tensor], finetuned: Mapping[str, Tensor],
                           keys: Sequence[str] | None = None) -> dict[str, Tensor]:
    """tau_t = theta_t - theta_shared for the given keys (default: every floating tensor)."""
    return {k: finetuned[k].to(shared_state[k].dtype) - shared_state[k] for k in _task_keys(shared_state, keys)}


def _task_keys(shared_state: Mapping[str, Tensor], keys: Sequence[str] | None) -> list[str]:
    return list(keys) if keys is not None else [k for k, v in shared_state.items() if v.is_floating_point()]


def each_exclusive_task_vector(shared_state: Mapping[str, Tensor], finetuned: Mapping[str, Tensor],
                               keys: Sequence[str] | None = None) -> Iterator[tuple[str, Tensor]]:
    """(name, tau) with tau = theta_t - theta_shared (exclusive_task_vectors' values), tensor by tensor, each
    written into one buffer that the next overwrites: use (or copy) each before asking for the next. What the
    SVD compression needs, without the whole task vector in memory: fresh memory costs a page fault per 4 KiB,
    which made the subtraction ~15x slower than into reused memory (1.2 GB: 1.6 s against 0.1 s)."""
    keys = _task_keys(shared_state, keys)
    sizes: dict[torch.dtype, int] = {}
    for k in keys:
        sh = shared_state[k]
        sizes[sh.dtype] = max(sizes.get(sh.dtype, 0), sh.numel())
    buffers = {dt: torch.empty(n, dtype=dt) for dt, n in sizes.items()}
    for k in keys:
        sh = shared_state[k]
        out = buffers[sh.dtype][:sh.numel()].view(sh.shape)
        torch.sub(finetuned[k].to(sh.dtype), sh, out=out)
        yield k, out


def lora_delta_state_dict(peft_model: nn.Module) -> dict[str, Tensor]:
    """Dense delta (scaling * B @ A) of every peft LoRA layer, keyed by the base weight's state-dict name
    (the name `merge_and_unload()` would give)."""
    out: dict[str, Tensor] = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight"):
            for adapter in module.lora_A.keys():
                key = name.replace("base_model.model.", "", 1) + ".weight"
                out[key] = module.get_delta_weight(adapter).detach()
    if not out:
        raise ValueError("no LoRA layers found in the given model")
    return out


def save_experts(path: str, experts: Sequence[Expert]) -> None:
    """Store the FACTORS (never the dense products) of T experts in one safetensors file."""
    from safetensors.torch import save_file
    flat: dict[str, Tensor] = {}
    for t, expert in enumerate(experts):
        for name, value in expert.items():
            if isinstance(value, LowRank):
                flat[f"{t}/{name}/us"] = value.us.contiguous()
                flat[f"{t}/{name}/v"] = value.v.contiguous()
            else:
                flat[f"{t}/{name}/dense"] = value.contiguous()
    # tmp + rename: a reader never sees a half-written file
    tmp = f"{path}.tmp"
    save_file(flat, tmp, metadata={"num_experts": str(len(experts))})
    os.replace(tmp, path)


def load_experts(path: str) -> list[Expert]:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        n = int(f.metadata()["num_experts"])
        experts: list[Expert] = [{} for _ in range(n)]
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in tensors.items():
        t, rest = key.split("/", 1)
        name, kind = rest.rsplit("/", 1)
        if kind == "dense":
            experts[int(t)][name] = value
        elif kind == "us":
            experts[int(t)][name] = LowRank(us=value, v=tensors[f"{t}/{name}/v"])
    return experts


def storage_bytes(experts: Sequence[Expert]) -> dict[str, int]:
    """Bytes of the factorised experts vs the same deltas stored dense."""
    factored = dense = 0
    for expert in experts:
        for value in expert.values():
            if isinstance(value, LowRank):
                factored += value.nbytes()
                dense += value.us.shape[0] * value.v.shape[0] * value.us.element_size()
            else:
                factored += value.numel() * value.element_size()
                dense += value.numel() * value.element_size()
    return {"factored_bytes": factored, "dense_bytes": dense}


def merge_explicit(shared_state: Mapping[str, Tensor], experts: Sequence[Expert],
                   w_single: Sequence[float] | Tensor) -> dict[str, Tensor]:
    """theta_shared + sum_t w_t * dense(expert_t): the explicitly merged state dict for one routing."""
    w = torch.as_tensor(w_single, dtype=torch.float64)
    if w.numel() != len(experts):
        raise ValueError(f"{w.numel()} routing weights for {len(experts)} experts")
    out = {k: v.clone() for k, v in shared_state.items()}
    for t, expert in enumerate(experts):
        for name, value in expert.items():
            delta = value.dense() if isinstance(value, LowRank) else value
            out[name] = out[name] + float(w[t]) * delta.to(out[name].dtype)
    return out


# ------------------------------------------------------------------------------------ LoRA, factor-wise
# The official code merges LoRA fine-tunes factor by factor: the shared expert is A_sh = lam sum_t A_t and
# B_sh = lam sum_t B_t (task arithmetic on the adapter tensors themselves), the exclusive experts are the
# SVD-truncated differences dA_t = A_t - A_sh, dB_t = B_t - B_sh, and a routing w gives the adapter
# A(w) = A_sh + sum_t w_t dA_t, B(w) = B_sh + sum_t w_t dB_t, i.e. W(w) = W_base + s B(w) A(w): bilinear in w,
# unlike merging the dense deltas s B_t A_t.
LoraPair = tuple[Tensor, Tensor]  # (A [r, in], B [out, r])


def lora_factors(peft_model: nn.Module) -> tuple[dict[str, LoraPair], dict[str, float]]:
    """(A, B) of every peft LoRA layer, keyed by the base weight's state-dict name (as lora_delta_state_dict),
    and each layer's scaling (alpha / r): the layer's delta is scaling * B @ A."""
    pairs: dict[str, LoraPair] = {}
    scaling: dict[str, float] = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight"):
            for adapter in module.lora_A.keys():
                if getattr(module, "fan_in_fan_out", False):
                    raise ValueError(f"{name}: fan_in_fan_out LoRA layers are not supported")
                key = name.replace("base_model.model.", "", 1) + ".weight"
                pairs[key] = (module.lora_A[adapter].weight.detach().clone(),
                              module.lora_B[adapter].weight.detach().clone())
                scaling[key] = float(module.scaling[adapter])
    if not pairs:
        raise ValueError("no LoRA layers found in the given model")
    return pairs, scaling


def merge_lora_factors(method: str, factors: Sequence[Mapping[str, LoraPair]], **kw) -> dict[str, LoraPair]:
    """Merge LoRA adapters factor-wise: A and B separately, each with models.merging's `method` over the
    adapter tensors as task vectors from zero (task_arithmetic: lam * sum_t A_t and lam * sum_t B_t)."""
    from .merging import MERGE_METHODS

    fn = MERGE_METHODS[method]
    out: dict[str, LoraPair] = {}
    for key, (a0, b0) in factors[0].items():
        a = fn(torch.zeros_like(a0), [f[key][0] for f in factors], **kw)
        b = fn(torch.zeros_like(b0), [f[key][1] for f in factors], **kw)
        out[key] = (a, b)
    return out


def lora_dense_state(base_state: Mapping[str, Tensor], factors: Mapping[str, LoraPair],
                     scaling: Mapping[str, float]) -> dict[str, Tensor]:
    """base_state with W = W_base + scaling * B @ A on every adapted weight."""
    out = {k: v.clone() for k, v in base_state.items()}
    for key, (a, b) in factors.items():
        out[key] = out[key] + scaling[key] * (b.to(out[key].dtype) @ a.to(out[key].dtype))
    return out


def lora_factor_module(key: str) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'model.layers.0.self_attn.q_proj' (expert names append
    '.lora_A' / '.lora_B')."""
    return key[: -len(".weight")] if key.endswith(".weight") else key


def lora_factor_expert(shared: Mapping[str, LoraPair], tuned: Mapping[str, LoraPair], rank: float | int = 0.1,
                       rounding: str = "round") -> Expert:
    """The exclusive expert of one LoRA task, factor-wise: SVD of A_t - A_sh and of B_t - B_sh. Their rank:
    the rank rule (resolve_rank) on the adapted weight's shape [out, in], at most the LoRA rank r (a factor
    difference never has more), so a fraction keeps the same budget per weight as the dense experts."""
    out: Expert = {}
    for key, (a_sh, b_sh) in shared.items():
        a_t, b_t = tuned[key]
        r = min(a_t.shape[0], resolve_rank(rank, (b_t.shape[0], a_t.shape[1]), rounding))
        mod = lora_factor_module(key)
        out[f"{mod}.lora_A"] = truncated_svd(a_t - a_sh, r)
        out[f"{mod}.lora_B"] = truncated_svd(b_t - b_sh, r)
    return out


def _dense(value: "LowRank | Tensor") -> Tensor:
    return value.dense() if isinstance(value, LowRank) else value


def merge_lora_factorwise(base_state: Mapping[str, Tensor], shared: Mapping[str, LoraPair],
                          experts: Sequence[Expert], w_single: Sequence[float] | Tensor,
                          scaling: Mapping[str, float]) -> dict[str, Tensor]:
    """The explicitly merged state dict of one routing w: W = W_base + s (B_sh + sum_t w_t dB_t)
    (A_sh + sum_t w_t dA_t) on every adapted weight."""
    w = torch.as_tensor(w_single, dtype=torch.float64)
    if w.numel() != len(experts):
        raise ValueError(f"{w.numel()} routing weights for {len(experts)} experts")
    merged = {}
    for key, (a, b) in shared.items():
        mod = lora_factor_module(key)
        a, b = a.clone(), b.clone()
        for t, e in enumerate(experts):
            if f"{mod}.lora_A" in e:
                a = a + float(w[t]) * _dense(e[f"{mod}.lora_A"]).to(a.dtype)
                b = b + float(w[t]) * _dense(e[f"{mod}.lora_B"]).to(b.dtype)
        merged[key] = (a, b)
    return lora_dense_state(base_state, merged, scaling)


class _Routing:
    """Per-sample routing weights [B, T] shared by all wrapped modules of one model, plus what the modules
    derive from them once per routing (not once per module): the active tasks, whether all rows are equal,
    and per-rank scale matrices."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.w: Tensor | None = None
        self.version = 0
        self.skip_below = 0.0
        self.cache_merged = True
        self._memo: dict = {}
        self._scratch: Tensor | None = None

    def set(self, w: Tensor | None, skip_below: float = 0.0, cache_merged: bool = True) -> None:
        if w is not None and (w.dim() != 2 or w.shape[1] != self.num_experts):
            raise ValueError(f"routing weights must be [batch, {self.num_experts}], got {tuple(w.shape)}")
        if skip_below < 0:
            raise ValueError(f"skip_below must be >= 0, got {skip_below}")
        if w is not None and skip_below > 0:  # those tasks count as 0 everywhere (norms and biases too)
            w = w * (w.abs().amax(dim=0, keepdim=True) > skip_below)
        self.w, self.skip_below, self.cache_merged = w, float(skip_below), bool(cache_merged)
        self.version += 1
        self._memo = {}

    def get(self, batch: int, like: Tensor) -> Tensor:
        if self.w is None:
            raise RuntimeError("call set_routing_weights(model, w) before the forward pass")
        if self.w.shape != (batch, self.num_experts):
            raise ValueError(f"routing weights {tuple(self.w.shape)} != ({batch}, {self.num_experts})")
        key = ("w", like.dtype, like.device)
        if key not in self._memo:
            self._memo[key] = self.w.to(device=like.device, dtype=like.dtype)
        return self._memo[key]

    def active(self) -> Tensor | None:
        """Bool [T]: tasks with a nonzero weight for some sample (after skip_below); None when all are."""
        if "active" not in self._memo:
            act = self.w.abs().amax(dim=0) > 0
            self._memo["active"] = None if bool(act.all()) else act
        return self._memo["active"]

    def scratch(self, numel: int, like: Tensor) -> Tensor | None:
        """A flat work buffer of `numel` elements shared by all wrapped modules of the model, reused across
        calls (a fresh allocation of megabytes per layer costs page faults); None while autograd records
        (a buffer that backward may read must not be overwritten)."""
        if torch.is_grad_enabled():
            return None
        buf = self._scratch
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._scratch = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel]

    def uniform(self) -> bool:
        """Every sample has the same routing (then one merged weight serves the whole batch)."""
        if "uniform" not in self._memo:
            self._memo["uniform"] = bool(self.cache_merged and (self.w == self.w[:1]).all())
        return self._memo["uniform"]


def _rank_task(ranks: Sequence[int]) -> Tensor:
    return torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks, dtype=torch.long))


class _LowRankPaths(nn.Module):
    """Shared logic of the wrapped Linear / Embedding: concatenated factors of all experts, the columns of
    the active tasks for the current routing, and a merged-weight cache for uniform routings."""

    def _init_factors(self, us: Sequence[Tensor], v: Sequence[Tensor], ranks: Sequence[int]) -> None:
        self.ranks = list(ranks)
        self.register_buffer("us_cat", torch.cat(list(us), dim=1).contiguous())
        self.register_buffer("v_cat", torch.cat(list(v), dim=1).contiguous())
        self.register_buffer("rank_task", _rank_task(ranks), persistent=False)
        self._cols_memo: tuple = (-1, None)
        self._merged_memo: tuple = (-1, None)

    def _factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(us, v, rank_task) restricted to the routing's active tasks (memoised per routing)."""
        act = self.routing.active()
        if act is None:
            return self.us_cat, self.v_cat, self.rank_task
        if self._cols_memo[0] != self.routing.version:
            keep = act.to(self.rank_task.device)[self.rank_task]
            self._cols_memo = (self.routing.version,
                               (self.us_cat[:, keep], self.v_cat[:, keep], self.rank_task[keep]))
        return self._cols_memo[1]

    def _merged(self, build) -> Tensor:
        if self._merged_memo[0] != self.routing.version:
            self._merged_memo = (self.routing.version, build())
        return self._merged_memo[1]


# Weight of one multiply-add of building per-sample merged weights (memory-bound) against one of a GEMM, in
# the dense path's cost model (LowRankExpertLinear._dense_pays).
DENSE_COST_FACTOR = 4.0

# Sibling linears that the usual transformer blocks feed the SAME input tensor.
SHARED_INPUT_SIBLINGS = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"),
                         ("w1", "w3")]


class _InputGroup:
    """Wrapped sibling linears fed one input tensor (q/k/v, gate/up): the first member called computes the
    scaled projections of all members with one matmul x @ [V_1 | V_2 | ...]; the others reuse their slice
    when they get the very same tensor object (checked by identity, for the same routing), else they
    compute it again (still correct)."""

    def __init__(self, members: Sequence["LowRankExpertLinear"]) -> None:
        self.members = list(members)
        self._v: tuple = (-1, None)
        self._last: tuple = (None, -1, None)

    def scaled_xv(self, member: "LowRankExpertLinear", x: Tensor, w: Tensor) -> Tensor:
        routing = member.routing
        if self._v[0] != routing.version:
            parts = [m._factors() for m in self.members]
            bounds, start = [], 0
            for p in parts:
                bounds.append((start, start + p[1].shape[1]))
                start += p[1].shape[1]
            self._v = (routing.version, torch.cat([p[1] for p in parts], dim=1),
                       torch.cat([p[2] for p in parts]), bounds)
        _, v_all, rank_task, bounds = self._v
        if self._last[0] is not x or self._last[1] != routing.version:
            z = (x @ v_all).view(x.shape[0], -1, v_all.shape[1]) * w[:, rank_task].unsqueeze(1)
            self._last = (x, routing.version, z)
        a, e = bounds[self.members.index(member)]
        return self._last[2][..., a:e]

    def release(self) -> None:
        self._last = (None, -1, None)


class LowRankExpertLinear(_LowRankPaths):
    """y = W x + b + sum_t w_t[b] (US_t (V_t^T x) + db_t). All experts' factors are concatenated, so a batch
    needs one narrow matmul x @ V_cat [d_in, sum r], a per-sample per-rank scaling, and one GEMM accumulated
    into the base output in place (addmm_) - whatever the routing. Tasks routed 0 (or <= skip_below) for the
    whole batch drop out of both matmuls; a batch whose samples share one routing uses a merged weight W'
    (built once per routing, cached) and costs what the static model costs."""

    def __init__(self, base: nn.Linear, factors: Sequence[LowRank | None], bias_deltas: Sequence[Tensor | None],
                 routing: _Routing) -> None:
        super().__init__()
        self.base, self.routing = base, routing
        dt, out_f, in_f = base.weight.dtype, base.out_features, base.in_features
        self._init_factors([f.us.to(dt) if f is not None else torch.zeros(out_f, 0, dtype=dt) for f in factors],
                           [f.v.to(dt) if f is not None else torch.zeros(in_f, 0, dtype=dt) for f in factors],
                           [f.rank if f is not None else 0 for f in factors])
        self.input_group: _InputGroup | None = None
        self.register_buffer("dense_stack", None, persistent=False)
        if any(b is not None for b in bias_deltas):
            self.register_buffer("bias_stack", torch.stack([b.to(dt) if b is not None else
                                                            torch.zeros(out_f, dtype=dt) for b in bias_deltas]))
        else:
            self.bias_stack = None

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        w = self.routing.get(b, x)
        if self.routing.uniform():
            weight, bias = self._merged(lambda: self._merge_row(w[0]))
            return nn.functional.linear(x, weight, bias)
        if self.dense_stack is not None and x.dim() >= 2 and self._dense_pays(x):
            return self._forward_dense(x, w)
        y = self.base(x)
        us, v, rank_task = self._factors()
        if v.shape[1] > 0:
            if self.input_group is not None:
                z = self.input_group.scaled_xv(self, x, w)
            else:
                z = (x @ v).view(b, -1, v.shape[1]) * w[:, rank_task].unsqueeze(1)
            y2 = y.view(-1, y.shape[-1])
            y2.addmm_(z.reshape(-1, v.shape[1]), us.T)
        if self.bias_stack is not None:
            y = y + (w @ self.bias_stack).view((b,) + (1,) * (x.dim() - 2) + (-1,))
        return y

    def materialise_dense(self) -> None:
        """Keep the dense deltas [T, out, in] for the per-sample merged-weight path."""
        stack = [self.us_cat[:, self.rank_task == t] @ self.v_cat[:, self.rank_task == t].T
                 for t in range(len(self.ranks))]
        self.dense_stack = torch.stack(stack)
        self._stack_memo: tuple = (-1, None)

    def _dense_pays(self, x: Tensor) -> bool:
        """Whether per-sample merged weights are cheaper than the low-rank paths for this input: building them
        costs T_active * out * in multiply-adds per sample, memory-bound (counted DENSE_COST_FACTOR times),
        the low-rank paths S * R * (out + in) (S tokens per sample, R active factor columns). Long sequences
        take the dense path; decoding one token at a time takes the low-rank paths."""
        out_f, in_f = self.base.weight.shape
        v = self._factors()[1]
        act = self.routing.active()
        tasks = len(self.ranks) if act is None else int(act.sum())
        tokens = x.numel() // (x.shape[0] * in_f)
        return tokens * v.shape[1] * (out_f + in_f) > DENSE_COST_FACTOR * tasks * out_f * in_f

    def _active_stack(self) -> tuple[Tensor, Tensor | None]:
        act = self.routing.active()
        if act is None:
            return self.dense_stack, None
        if self._stack_memo[0] != self.routing.version:  # one copy per routing, not one per call
            self._stack_memo = (self.routing.version, self.dense_stack[act.to(self.dense_stack.device)])
        return self._stack_memo[1], act

    def _forward_dense(self, x: Tensor, w: Tensor) -> Tensor:
        b = x.shape[0]
        stack, act = self._active_stack()
        if act is not None:  # tasks routed 0 for the whole batch cost nothing
            w = w[:, act]
        out_f, in_f = self.base.weight.shape
        # W_b = W + sum_t w[b, t] D_t for every sample, as one GEMM (K = T) with W broadcast as the addend,
        # written into the model's reused work buffer
        flat = stack.reshape(stack.shape[0], -1)
        buf = self.routing.scratch(b * out_f * in_f, x)
        if buf is None:
            weights = torch.addmm(self.base.weight.reshape(1, -1), w, flat)
        else:
            weights = torch.addmm(self.base.weight.reshape(1, -1), w, flat, out=buf.view(b, -1))
        x3 = x.reshape(b, -1, x.shape[-1])
        y = torch.bmm(x3, weights.view(b, out_f, in_f).transpose(1, 2))
        if self.base.bias is not None:
            y += self.base.bias
        if self.bias_stack is not None:
            y += (w @ self.bias_stack[act.to(self.bias_stack.device)] if act is not None
                  else w @ self.bias_stack).unsqueeze(1)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _merge_row(self, w_row: Tensor) -> tuple[Tensor, Tensor | None]:
        weight = torch.addmm(self.base.weight, self.us_cat * w_row[self.rank_task], self.v_cat.T)
        bias = self.base.bias
        if self.bias_stack is not None:
            db = w_row @ self.bias_stack
            bias = db if bias is None else bias + db
        return weight, bias


class LowRankExpertEmbedding(_LowRankPaths):
    def __init__(self, base: nn.Embedding, factors: Sequence[LowRank | Tensor | None], routing: _Routing) -> None:
        super().__init__()
        self.base, self.routing = base, routing
        dt = base.weight.dtype
        for f in factors:
            if f is not None and not isinstance(f, LowRank):
                raise ValueError("embedding deltas must be LowRank")
        n, d = base.weight.shape
        self._init_factors([f.us.to(dt) if f is not None else torch.zeros(n, 0, dtype=dt) for f in factors],
                           [f.v.to(dt) if f is not None else torch.zeros(d, 0, dtype=dt) for f in factors],
                           [f.rank if f is not None else 0 for f in factors])

    def forward(self, ids: Tensor) -> Tensor:
        e = self.base(ids)
        w = self.routing.get(ids.shape[0], e)
        us, v, rank_task = self._factors()
        if v.shape[1] == 0:
            return e
        if self.routing.uniform():
            z = us[ids] * w[0, rank_task]
        else:
            z = us[ids] * w[:, rank_task].view(ids.shape[0], *([1] * (ids.dim() - 1)), -1)
        e2 = e.view(-1, e.shape[-1])
        e2.addmm_(z.view(-1, v.shape[1]), v.T)
        return e


def _unit_copy(norm: nn.Module) -> nn.Module:
    """A copy of an elementwise-affine norm with weight 1 and bias 0 (non-persistent buffers, so they follow
    .to() but stay out of the state dict): norm(x; 1, 0)."""
    unit = copy.deepcopy(norm)
    for name, fill in (("weight", 1.0), ("bias", 0.0)):
        p = getattr(unit, name, None)
        if isinstance(p, torch.Tensor):
            delattr(unit, name)
            unit.register_buffer(name, torch.full_like(p.detach(), fill), persistent=False)
    return unit


class DenseDeltaNorm(nn.Module):
    """Norm whose output is linear in its elementwise `weight` (and `bias`): RMSNorm, LayerNorm.
    norm(x; W + dW, b + db) = unit(x) * (W + dW) + b + db, with unit(x) = norm(x; 1, 0) computed once."""

    def __init__(self, base: nn.Module, weight_deltas: Sequence[Tensor | None],
                 bias_deltas: Sequence[Tensor | None], routing: _Routing) -> None:
        super().__init__()
        self.base, self.routing = base, routing
        self.unit = _unit_copy(base)
        dt = base.weight.dtype
        zeros = torch.zeros_like(base.weight)
        self.register_buffer("w_stack", torch.stack([d.to(dt) if d is not None else zeros for d in weight_deltas]))
        self.has_bias = getattr(base, "bias", None) is not None
        if any(d is not None for d in bias_deltas):
            if not self.has_bias:
                raise ValueError(f"bias delta for a {type(base).__name__} without bias")
            self.register_buffer("b_stack", torch.stack([d.to(dt) if d is not None else zeros for d in bias_deltas]))
        else:
            self.b_stack = None

    def forward(self, x: Tensor) -> Tensor:
        w = self.routing.get(x.shape[0], x)
        unit = self.unit(x)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
        gain = self.base.weight + (w @ self.w_stack).view(shape)
        y = unit * gain
        if self.has_bias:
            y = y + self.base.bias
            if self.b_stack is not None:
                y = y + (w @ self.b_stack).view(shape)
        return y


def attach_lowrank_experts(model: nn.Module, shared_state: Mapping[str, Tensor],
                           experts: Sequence[Expert], dense_deltas: bool = False) -> nn.Module:
    """Load the shared weights into `model` (in place) and wrap every module that has an expert delta.
    Every expert key must be covered by a Linear weight/bias, an Embedding weight, or the weight/bias of
    an elementwise-affine norm (a module with a 1-D `weight`), else ValueError.

    dense_deltas=True trades memory for speed on mixed batches: each Linear keeps the T dense products
    US_t V_t^T (T times its weight, in memory only; the stored experts stay factors) and runs a batch as
    one batched matmul with per-sample weights W + sum_t w_t[b] D_t (merging costs T/seq_len of the layer's
    FLOPs instead of the low-rank paths' sum_t r_t (d_in + d_out) / (d_in d_out))."""
    model.load_state_dict(dict(shared_state), strict=False)
    routing = _Routing(len(experts))
    keys = set().union(*[e.keys() for e in experts]) if experts else set()
    covered: set[str] = set()
    targets = []
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        wk, bk = prefix + "weight", prefix + "bias"
        if wk not in keys and bk not in keys:
            continue
        if isinstance(module, nn.Linear):
            factors = []
            for e in experts:
                f = e.get(wk)
                if f is not None and not isinstance(f, LowRank):
                    f = truncated_svd(f, min(f.shape))  # dense 2-D given: exact factors
                factors.append(f)
            wrapped = LowRankExpertLinear(module, factors, [e.get(bk) for e in experts], routing)
            if dense_deltas:
                wrapped.materialise_dense()
        elif isinstance(module, nn.Embedding):
            wrapped = LowRankExpertEmbedding(module, [e.get(wk) for e in experts], routing)
        elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1:
            wrapped = DenseDeltaNorm(module, [e.get(wk) for e in experts], [e.get(bk) for e in experts], routing)
        else:
            raise ValueError(f"cannot attach an expert to {mod_name} ({type(module).__name__})")
        covered.update(k for k in (wk, bk) if k in keys)
        targets.append((mod_name, wrapped))
    # Tied weights (lm_head = embed_tokens) appear under one module name only in named_modules.
    tied = {k for k in keys - covered if _is_tied_alias(model, k, covered)}
    missing = keys - covered - tied
    if missing:
        raise ValueError(f"expert keys with no supported module: {sorted(missing)[:5]}")
    for mod_name, wrapped in targets:
        parent_name, _, child = mod_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapped)
    by_name = dict(targets)
    for mod_name, wrapped in targets:
        parent_name, _, child = mod_name.rpartition(".")
        for names in SHARED_INPUT_SIBLINGS:
            if child == names[0]:
                sib = [by_name.get(f"{parent_name}.{n}" if parent_name else n) for n in names]
                sib = [m for m in sib if isinstance(m, LowRankExpertLinear)]
                if len(sib) > 1 and len({m.base.in_features for m in sib}) == 1:
                    group = _InputGroup(sib)
                    for m in sib:
                        m.input_group = group
    model._twin_routing = routing  # type: ignore[attr-defined]
    return model


def _is_tied_alias(model: nn.Module, key: str, covered: set[str]) -> bool:
    sd = model.state_dict(keep_vars=True)
    return key in sd and any(sd[c] is sd[key] for c in covered if c in sd)


def set_routing_weights(model: nn.Module, w: Tensor | None, skip_below: float = 0.0,
                        cache_merged: bool = True) -> None:
    """Per-sample routing weights [B, T] for the next forward passes (None clears them).
    skip_below: a task whose weight is <= skip_below for every sample of the batch is left out of the
    low-rank paths (0.0: only exact zeros, so results are exact; > 0 trades exactness for speed).
    cache_merged: when all samples share one routing, merge each weight once (W' = W + sum_t w_t US_t V_t^T,
    cached until the routing changes) and run the plain layers."""
    routing = getattr(model, "_twin_routing", None)
    if routing is None:
        raise ValueError("model has no attached experts; call attach_lowrank_experts first")
    routing.set(w, skip_below=skip_below, cache_merged=cache_merged)


class LoraFactorExpertLinear(nn.Module):
    """A Linear with factor-wise LoRA experts: y = W_base x + s B(w_b) (A(w_b) x) per sample b, where
    A(w) = A_sh + sum_t w_t dA_t and B(w) = B_sh + sum_t w_t dB_t. With A_cat = [A_sh; dA_1; ...; dA_T] and
    B_cat = [B_sh | dB_1 | ... | dB_T] (the factor differences kept dense: each is only r x in or out x r):
    p = x A_cat^T, u = p_0 + sum_t w_t p_t, y += s [u, w_1 u, ..., w_T u] B_cat^T: two narrow matmuls, exact.
    A batch whose samples share one routing uses the merged weight W + s B(w) A(w), built once per routing."""

    def __init__(self, base: nn.Linear, a_sh: Tensor, b_sh: Tensor, d_a: Sequence[Tensor | None],
                 d_b: Sequence[Tensor | None], scaling: float, routing: _Routing) -> None:
        super().__init__()
        self.base, self.routing, self.scaling = base, routing, float(scaling)
        dt = base.weight.dtype
        r = a_sh.shape[0]
        self.r = r
        self.register_buffer("a_cat", torch.cat([a_sh.to(dt)] + [(d if d is not None else torch.zeros_like(a_sh))
                                                                  .to(dt) for d in d_a]).contiguous())
        self.register_buffer("b_cat", torch.cat([b_sh.to(dt)] + [(d if d is not None else torch.zeros_like(b_sh))
                                                                  .to(dt) for d in d_b], dim=1).contiguous())
        self._merged_memo: tuple = (-1, None)

    def _ab(self, w_row: Tensor) -> tuple[Tensor, Tensor]:
        """A(w), B(w) of one routing row."""
        n, r = len(w_row) + 1, self.r
        ext = torch.cat([w_row.new_ones(1), w_row])
        a = (ext.view(n, 1, 1) * self.a_cat.view(n, r, -1)).sum(dim=0)
        b = (self.b_cat.view(self.b_cat.shape[0], n, r) * ext.view(1, n, 1)).sum(dim=1)
        return a, b

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        w = self.routing.get(b, x)
        if self.routing.uniform():
            if self._merged_memo[0] != self.routing.version:
                a, bb = self._ab(w[0])
                self._merged_memo = (self.routing.version, torch.addmm(self.base.weight, bb, a, alpha=self.scaling))
            return nn.functional.linear(x, self._merged_memo[1], self.base.bias)
        y = self.base(x)
        n, r = w.shape[1] + 1, self.r
        ext = torch.cat([w.new_ones(b, 1), w], dim=1)  # [B, T + 1]: weight 1 for the shared factors
        p = (x @ self.a_cat.T).view(b, -1, n, r)
        u = (p * ext.view(b, 1, n, 1)).sum(dim=2)  # A(w_b) x
        q = (u.unsqueeze(2) * ext.view(b, 1, n, 1)).reshape(-1, n * r)  # [u, w_1 u, ..., w_T u]
        y.view(-1, y.shape[-1]).addmm_(q, self.b_cat.T, alpha=self.scaling)
        return y


def attach_lora_factor_experts(model: nn.Module, base_state: Mapping[str, Tensor],
                               shared: Mapping[str, LoraPair], experts: Sequence[Expert],
                               scaling: Mapping[str, float]) -> nn.Module:
    """Load the BASE weights into `model` (in place) and wrap every Linear that has LoRA factors: `shared`
    maps its weight's state-dict name to (A_sh, B_sh); each expert holds `<module>.lora_A` / `.lora_B`
    (LowRank or dense; see lora_factor_expert). set_routing_weights / TwinMergedModel then work as with
    attach_lowrank_experts; all-zero routing weights give the shared model base + s B_sh A_sh."""
    model.load_state_dict(dict(base_state), strict=False)
    routing = _Routing(len(experts))
    for key, (a_sh, b_sh) in shared.items():
        mod_name = lora_factor_module(key)
        module = model.get_submodule(mod_name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"LoRA factors for {mod_name}, a {type(module).__name__} (not a Linear)")
        d_a = [_dense(e[f"{mod_name}.lora_A"]) if f"{mod_name}.lora_A" in e else None for e in experts]
        d_b = [_dense(e[f"{mod_name}.lora_B"]) if f"{mod_name}.lora_B" in e else None for e in experts]
        wrapped = LoraFactorExpertLinear(module, a_sh, b_sh, d_a, d_b, scaling[key], routing)
        parent_name, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
    model._twin_routing = routing  # type: ignore[attr-defined]
    return model


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mask-aware mean over the sequence: [B, S, H] -> [B, H]."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class TaskRouter(nn.Module):
    """The router of protocol `ours`: LayerNorm -> Linear(hidden, width) -> GELU -> Dropout -> Linear(width, T),
    over the shared model's pooled last hidden state -> T logits."""

    def __init__(self, hidden_size: int, num_tasks: int, width: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(width, num_tasks))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.net(pooled)


class PaperRouter(nn.Module):
    """The router of the official Twin-Merging code (its `SimpleMLP`): three linear layers,
    Linear(hidden, width) -> BatchNorm1d -> LeakyReLU -> Dropout(0.5) -> Linear(width, width) -> BatchNorm1d ->
    LeakyReLU -> Dropout(0.5) -> Linear(width, T). (The official width is 1024 in its generative code and
    2 x hidden in its discriminative code.) BatchNorm: call .eval() before inference."""

    def __init__(self, hidden_size: int, num_tasks: int, width: int = 1024, dropout: float = 0.5) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(hidden_size, width), nn.BatchNorm1d(width)
        self.fc2, self.bn2 = nn.Linear(width, width), nn.BatchNorm1d(width)
        self.fc3 = nn.Linear(width, num_tasks)
        self.dropout = nn.Dropout(dropout)

    def forward(self, pooled: Tensor) -> Tensor:
        x = self.dropout(nn.functional.leaky_relu(self.bn1(self.fc1(pooled))))
        x = self.dropout(nn.functional.leaky_relu(self.bn2(self.fc2(x))))
        return self.fc3(x)


ROUTER_ARCHS = ("paper", "ours")


def build_router(arch: str, hidden_size: int, num_tasks: int, width: int) -> nn.Module:
    """`paper`: PaperRouter (dropout 0.5); `ours`: TaskRouter (no dropout)."""
    if arch == "paper":
        return PaperRouter(hidden_size, num_tasks, width=width)
    if arch == "ours":
        return TaskRouter(hidden_size, num_tasks, width=width)
    raise ValueError(f"router arch must be one of {ROUTER_ARCHS}, got {arch!r}")


def router_features(hidden: Tensor, attention_mask: Tensor | None, prefix_len: int | None = None) -> Tensor:
    """What the router reads: the mask-aware mean of the last hidden state, or with `prefix_len` (for
    generation, where the rest of the text does not exist yet) the last hidden state at the last token of
    the first prefix_len tokens (right padding assumed)."""
    if prefix_len is None:
        return mean_pool(hidden, attention_mask)
    if prefix_len <= 0:
        raise ValueError(f"prefix_len must be > 0, got {prefix_len}")
    b, s = hidden.shape[:2]
    if attention_mask is None:
        idx = torch.full((b,), min(prefix_len, s) - 1, device=hidden.device)
    else:
        idx = (attention_mask.sum(dim=1).clamp(max=prefix_len) - 1).clamp_min(0)
    return hidden[torch.arange(b, device=hidden.device), idx]


class TwinMergedModel(nn.Module):
    """Shared model with attached experts + router: forward routes every sample (softmax of the router on
    the shared model's hidden states, i.e. all routing weights zero) then runs the routed pass.
    prefix_len: route on the state after the first prefix_len tokens (the router must have been trained on
    the same features); `generate` routes once on the prompt and keeps that routing for every new token."""

    def __init__(self, model: nn.Module, router: nn.Module, prefix_len: int | None = None) -> None:
        super().__init__()
        if getattr(model, "_twin_routing", None) is None:
            raise ValueError("attach_lowrank_experts(model, ...) first")
        self.model, self.router, self.prefix_len = model, router, prefix_len

    @torch.no_grad()
    def route(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        n = self.model._twin_routing.num_experts
        p = next(self.model.parameters())
        if self.prefix_len is not None:  # causal model: the prefix's states do not depend on what follows
            input_ids = input_ids[:, :self.prefix_len]
            attention_mask = attention_mask[:, :self.prefix_len] if attention_mask is not None else None
        set_routing_weights(self.model, torch.zeros(input_ids.shape[0], n, dtype=p.dtype, device=p.device))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        feats = router_features(out.hidden_states[-1], attention_mask, self.prefix_len)
        return torch.softmax(self.router(feats.to(next(self.router.parameters()).dtype)), dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                routing_weights: Tensor | None = None, **kw):
        w = routing_weights if routing_weights is not None else self.route(input_ids, attention_mask)
        set_routing_weights(self.model, w)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kw) -> Tensor:
        """Route once on the prompt, then HF generate with that routing (one weight set per sample; with
        batch size 1 the merged-weight cache makes every step cost what the static model costs)."""
        if kw.get("num_beams", 1) != 1 or kw.get("num_return_sequences", 1) != 1:
            raise ValueError("Twin generate supports num_beams=1 and num_return_sequences=1 only")
        set_routing_weights(self.model, self.route(input_ids, attention_mask))
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
