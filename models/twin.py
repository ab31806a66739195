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

from dataclasses import dataclass
from typing import Mapping, Sequence

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


def _resolve_rank(rank: float | int, shape: torch.Size) -> int:
    full = min(shape)
    if isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive fraction (<=1.0 as float) or an int, got {rank!r}")
    r = max(1, int(round(rank * full))) if isinstance(rank, float) else int(rank)
    return min(r, full)


def compress_exclusive(tau_state_dict: Mapping[str, Tensor], rank: float | int = 0.1) -> Expert:
    """Truncated SVD of every 2-D delta (float rank = fraction of min(dims), int = absolute); 1-D dense."""
    out: Expert = {}
    for name, tau in tau_state_dict.items():
        if tau.dim() == 2:
            r = _resolve_rank(rank, tau.shape)
            u, s, vh = torch.linalg.svd(tau, full_matrices=False)
            out[name] = LowRank(us=(u[:, :r] * s[:r]).contiguous(), v=vh[:r].T.contiguous())
        elif tau.dim() <= 1:
            out[name] = tau.clone()
        else:
            raise ValueError(f"compress_exclusive: {name} has {tau.dim()} dims; only 1-D/2-D supported")
    return out


def exclusive_task_vectors(shared_state: Mapping[str, Tensor], finetuned: Mapping[str, Tensor],
                           keys: Sequence[str] | None = None) -> dict[str, Tensor]:
    """tau_t = theta_t - theta_shared for the given keys (default: every floating tensor)."""
    keys = list(keys) if keys is not None else [k for k, v in shared_state.items() if v.is_floating_point()]
    return {k: finetuned[k].to(shared_state[k].dtype) - shared_state[k] for k in keys}


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
    save_file(flat, path, metadata={"num_experts": str(len(experts))})


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


class _Routing:
    """Per-sample routing weights [B, T] shared by all wrapped modules of one model."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.w: Tensor | None = None

    def get(self, batch: int, like: Tensor) -> Tensor:
        if self.w is None:
            raise RuntimeError("call set_routing_weights(model, w) before the forward pass")
        if self.w.shape != (batch, self.num_experts):
            raise ValueError(f"routing weights {tuple(self.w.shape)} != ({batch}, {self.num_experts})")
        return self.w.to(like.dtype)


def _per_rank_weights(w: Tensor, ranks: Sequence[int]) -> Tensor:
    """[B, T] -> [B, sum r]: each task's weight repeated over its rank columns."""
    return torch.repeat_interleave(w, torch.tensor(ranks, device=w.device), dim=1)


class LowRankExpertLinear(nn.Module):
    def __init__(self, base: nn.Linear, factors: Sequence[LowRank | None], bias_deltas: Sequence[Tensor | None],
                 routing: _Routing) -> None:
        super().__init__()
        self.base, self.routing = base, routing
        dt, out_f, in_f = base.weight.dtype, base.out_features, base.in_features
        ranks = [f.rank if f is not None else 0 for f in factors]
        self.ranks = ranks
        # Concatenate all experts' factors so the batch needs one matmul pair, whatever the routing.
        self.register_buffer("v_cat", torch.cat([f.v.to(dt) if f is not None else torch.zeros(in_f, 0, dtype=dt)
                                                 for f in factors], dim=1))
        self.register_buffer("us_cat", torch.cat([f.us.to(dt) if f is not None else torch.zeros(out_f, 0, dtype=dt)
                                                  for f in factors], dim=1))
        self.register_buffer("bias_stack", torch.stack([b.to(dt) if b is not None else torch.zeros(out_f, dtype=dt)
                                                        for b in bias_deltas]))

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        w = self.routing.get(x.shape[0], y)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
        if self.v_cat.shape[1] > 0:
            z = (x @ self.v_cat) * _per_rank_weights(w, self.ranks).view(shape)
            y = y + z @ self.us_cat.T
        return y + (w @ self.bias_stack).view(shape)


class LowRankExpertEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, factors: Sequence[LowRank | Tensor | None], routing: _Routing) -> None:
        super().__init__()
        self.base, self.routing = base, routing
        dt = base.weight.dtype
        for f in factors:
            if f is not None and not isinstance(f, LowRank):
                raise ValueError("embedding deltas must be LowRank")
        self.ranks = [f.rank if f is not None else 0 for f in factors]
        n, d = base.weight.shape
        self.register_buffer("us_cat", torch.cat([f.us.to(dt) if f is not None else torch.zeros(n, 0, dtype=dt)
                                                  for f in factors], dim=1))
        self.register_buffer("v_cat", torch.cat([f.v.to(dt) if f is not None else torch.zeros(d, 0, dtype=dt)
                                                 for f in factors], dim=1))

    def forward(self, ids: Tensor) -> Tensor:
        e = self.base(ids)
        w = self.routing.get(ids.shape[0], e)
        z = self.us_cat[ids] * _per_rank_weights(w, self.ranks).view(ids.shape[0], *([1] * (ids.dim() - 1)), -1)
        return e + z @ self.v_cat.T


class DenseDeltaNorm(nn.Module):
    """Norm whose output is linear in its elementwise `weight` (and `bias`): RMSNorm, LayerNorm."""

    def __init__(self, base: nn.Module, weight_deltas: Sequence[Tensor | None],
                 bias_deltas: Sequence[Tensor | None], routing: _Routing) -> None:
        super().__init__()
        self.base, self.routing = base, routing
        dt = base.weight.dtype
        zeros = torch.zeros_like(base.weight)
        self.register_buffer("w_stack", torch.stack([d.to(dt) if d is not None else zeros for d in weight_deltas]))
        self.register_buffer("b_stack", torch.stack([d.to(dt) if d is not None else zeros for d in bias_deltas]))

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        w = self.routing.get(x.shape[0], y)
        params = {"weight": torch.ones_like(self.base.weight)}
        if getattr(self.base, "bias", None) is not None:
            params["bias"] = torch.zeros_like(self.base.bias)
        unit = torch.func.functional_call(self.base, params, (x,))
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
        return y + unit * (w @ self.w_stack).view(shape) + (w @ self.b_stack).view(shape)


def attach_lowrank_experts(model: nn.Module, shared_state: Mapping[str, Tensor],
                           experts: Sequence[Expert]) -> nn.Module:
    """Load the shared weights into `model` (in place) and wrap every module that has an expert delta.
    Every expert key must be covered by a Linear weight/bias, an Embedding weight, or the weight/bias of
    an elementwise-affine norm (a module with a 1-D `weight`), else ValueError."""
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
                    f = compress_exclusive({wk: f}, rank=min(f.shape))[wk]  # dense 2-D given: exact factors
                factors.append(f)
            wrapped = LowRankExpertLinear(module, factors, [e.get(bk) for e in experts], routing)
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
    model._twin_routing = routing  # type: ignore[attr-defined]
    return model


def _is_tied_alias(model: nn.Module, key: str, covered: set[str]) -> bool:
    sd = model.state_dict(keep_vars=True)
    return key in sd and any(sd[c] is sd[key] for c in covered if c in sd)


def set_routing_weights(model: nn.Module, w: Tensor | None) -> None:
    """Per-sample routing weights [B, T] for the next forward passes (None clears them)."""
    routing = getattr(model, "_twin_routing", None)
    if routing is None:
        raise ValueError("model has no attached experts; call attach_lowrank_experts first")
    routing.w = w


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mask-aware mean over the sequence: [B, S, H] -> [B, H]."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class TaskRouter(nn.Module):
    """MLP over the shared model's mean-pooled last hidden state -> T logits."""

    def __init__(self, hidden_size: int, num_tasks: int, width: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(width, num_tasks))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.net(pooled)


class TwinMergedModel(nn.Module):
    """Shared model with attached experts + router: forward routes every sample (softmax of the router on
    the shared model's pooled hidden state, i.e. all routing weights zero) then runs the routed pass."""

    def __init__(self, model: nn.Module, router: TaskRouter) -> None:
        super().__init__()
        if getattr(model, "_twin_routing", None) is None:
            raise ValueError("attach_lowrank_experts(model, ...) first")
        self.model, self.router = model, router

    @torch.no_grad()
    def route(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        n = self.model._twin_routing.num_experts
        p = next(self.model.parameters())
        set_routing_weights(self.model, torch.zeros(input_ids.shape[0], n, dtype=p.dtype, device=p.device))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        pooled = mean_pool(out.hidden_states[-1], attention_mask)
        return torch.softmax(self.router(pooled.to(next(self.router.parameters()).dtype)), dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                routing_weights: Tensor | None = None, **kw):
        w = routing_weights if routing_weights is not None else self.route(input_ids, attention_mask)
        set_routing_weights(self.model, w)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
