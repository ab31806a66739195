"""AdaMoE: sparse mixture-of-experts layers with null experts (SPEC.md section 1).

A null expert has no parameters and outputs zero. Adding N of them to a top-k router lets a token spend
some of its k slots on "nothing", so the number of TRUE experts a token uses adapts per token.

Contents
- `MoEConfig`            typed configuration of one MoE layer (also carries the loss settings).
- `NullExpertRouter`     logits over E_true + N_null experts, top-k, weights renormalised over true experts.
- `SwiGLUExperts`        E expert MLPs stored as 3-D tensors in the Hugging Face Mixtral layout; computed by a
                         per-expert loop or by `torch.nn.functional.grouped_mm` (`expert_impl`, see
                         `resolve_expert_impl`).
- `SparseMoEBlock`       router + sorted token dispatch + optional capacity; records `last_routing`.
- `load_balancing_loss`, `router_z_loss`, `collect_moe_aux_losses`, `moe_routing_metrics`.
- `retrofit`, `load_retrofitted`, `restore_retrofit`, `trainable_module_names` for Hugging Face Mixtral / Qwen2-MoE / OLMoE.

Routing record contract (shared with models/routing_probe.py): after every forward a block sets
`self.last_routing = {"router_logits": [T, E_total], "topk_indices": [T, k], "topk_weights": [T, k],
"dropped": [T, k] bool or None, "num_true_experts": int, "num_null_experts": int, "top_k": int}`, with
T = batch*seq flattened, indices >= num_true_experts meaning null experts, and weight 0 for null and
dropped slots. `router_logits` keeps its autograd graph so the auxiliary losses can be computed from it.

Plain PyTorch: no Lightning, no imports from `recipes/`. `transformers` is imported lazily, only by the
retrofit helpers.
"""
from __future__ import annotations

import itertools
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

NULL_GATE_INITS = ("copy", "random")
LB_NULL_MODES = ("average", "none")
LB_REDUCES = ("per_layer_sum", "concat")
# How SwiGLUExperts computes its experts: "loop" (two F.linear per expert with tokens), "grouped_mm" (two
# torch.nn.functional.grouped_mm calls over all experts; falls back to the loop where it cannot run) or
# "auto" (see `resolve_expert_impl`).
EXPERT_IMPLS = ("auto", "loop", "grouped_mm")
# `auto` on CPU picks grouped_mm from this many true experts on. Measured on the 2-core CPU (forward+backward,
# 1 thread; bench `adamoe_dispatch` and a sweep over E): see `resolve_expert_impl`.
GROUPED_MM_AUTO_MIN_EXPERTS_CPU = 64
# dtypes torch's grouped_mm accepts (float64 is rejected: "Expected mat_a to be Float32, BFloat16 or Float16").
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Hugging Face model types `retrofit` knows, with the config field holding the number of routed experts.
_SUPPORTED_HF_MOE = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "olmoe": "num_experts",
}
# Key under which a retrofitted model's config records its AdaMoE settings (saved in config.json).
CONFIG_KEY = "adamoe"


# ---------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class MoEConfig:
    """One MoE layer with optional null experts.

    `num_experts` counts TRUE experts (E_true); `num_null_experts` (N_null) parameter-free null experts
    are added on top, so the router scores E_total = E_true + N_null experts and picks `top_k` of them.
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    num_null_experts: int = 0
    top_k: int = 2
    # "copy": null-gate rows repeat the true gate's rows (AdaMoE's Mixtral run); "random": normal(0, init_std).
    null_gate_init: str = "copy"
    # True: keep the true gate (d -> E_true) and add a separate `null_gate` (d -> N_null), which is what
    # retrofitting a pretrained router needs. False: one linear router over all E_total experts.
    split_null_gate: bool = True
    # None: no capacity limit. Otherwise each true expert takes at most ceil(cf * T * k / E_true) slots.
    capacity_factor: Optional[float] = None
    # Mixtral/Switch semantics: renormalise the selected true experts' weights to sum to 1; False keeps
    # the raw softmax probabilities (Qwen2-MoE / OLMoE default).
    norm_topk_prob: bool = True
    lb_coef: float = 1e-3  # AdaMoE: 1e-3 in the first experiment, 1e-4 in the Mixtral run
    z_coef: float = 0.0  # router z-loss is not part of AdaMoE; off unless asked for
    lb_null_mode: str = "average"
    lb_reduce: str = "per_layer_sum"
    router_jitter_noise: float = 0.0  # Mixtral's multiplicative input jitter, training mode only
    init_std: float = 0.02
    hidden_act: str = "silu"
    # Expert computation: "auto" | "loop" | "grouped_mm" (EXPERT_IMPLS; same outputs and gradients).
    expert_impl: str = "auto"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MoEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_null_experts < 0:
            raise ValueError(f"MoEConfig.num_null_experts must be >= 0, got {self.num_null_experts}")
        if self.top_k > self.num_total_experts:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} exceeds the number of experts "
                f"({self.num_experts} true + {self.num_null_experts} null = {self.num_total_experts})"
            )
        _check_choice("null_gate_init", self.null_gate_init, NULL_GATE_INITS)
        _check_choice("lb_null_mode", self.lb_null_mode, LB_NULL_MODES)
        _check_choice("lb_reduce", self.lb_reduce, LB_REDUCES)
        _check_choice("expert_impl", self.expert_impl, EXPERT_IMPLS)
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"MoEConfig.capacity_factor must be > 0 or None, got {self.capacity_factor}")
        if self.router_jitter_noise < 0:
            raise ValueError(f"MoEConfig.router_jitter_noise must be >= 0, got {self.router_jitter_noise}")

    @property
    def num_total_experts(self) -> int:
        return self.num_experts + self.num_null_experts


def _check_choice(field: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"MoEConfig.{field} must be one of {list(choices)}, got {value!r}")


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_true_experts: int) -> int:
    """Slots per true expert: C = ceil(capacity_factor * T * k / E_true)."""
    return int(math.ceil(capacity_factor * num_tokens * top_k / num_true_experts))


# ---------------------------------------------------------------------------------------------------
# Router


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax in at least float32 (as the HF routers do for bf16/fp16), float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def renormalise_over_true_experts(topk_probs: torch.Tensor, topk_indices: torch.Tensor,
                                  num_true_experts: int, normalise: bool = True) -> torch.Tensor:
    """Final mixing weights from the selected probabilities: null slots get 0; with `normalise` the
    true slots are divided by their sum, and a token that selected only null experts keeps weight 0
    everywhere (its sum is replaced by 1, as in the AdaMoE code), so its MoE output is 0."""
    is_true = topk_indices < num_true_experts
    true_probs = topk_probs * is_true.to(topk_probs.dtype)
    if not normalise:
        return true_probs
    true_sum = true_probs.sum(dim=-1, keepdim=True)
    true_sum = torch.where(true_sum > 0, true_sum, torch.ones_like(true_sum))
    return true_probs / true_sum


class NullExpertRouter(nn.Module):
    """Router over E_true true experts and N_null null experts.

    forward(hidden [..., d]) -> (router_logits [T, E_total], topk_weights [T, k], topk_indices [T, k]),
    the same triple the Hugging Face `*TopKRouter` modules return. Selection is top-k of the softmax
    over ALL E_total logits; the weights are then renormalised over the selected TRUE experts only.

    Parameters: `weight` [E_true, d] (the true gate; [E_total, d] when `split_null_gate=False`) and,
    when split and N_null > 0, `null_gate` = Linear(d -> N_null, bias=False).
    """

    def __init__(self, config: MoEConfig, true_gate_weight: Optional[nn.Parameter] = None) -> None:
        super().__init__()
        self.num_true_experts = config.num_experts
        self.num_null_experts = config.num_null_experts
        self.top_k = config.top_k
        self.hidden_size = config.hidden_size
        self.norm_topk_prob = config.norm_topk_prob
        self.split_null_gate = config.split_null_gate

        if true_gate_weight is not None:
            expected = (config.num_experts, config.hidden_size)
            if not config.split_null_gate or tuple(true_gate_weight.shape) != expected:
                raise ValueError(
                    f"an existing true gate weight needs split_null_gate=True and shape {expected}, "
                    f"got split_null_gate={config.split_null_gate}, shape {tuple(true_gate_weight.shape)}"
                )
            self.weight = true_gate_weight  # shared with the original model, not copied
        else:
            rows = config.num_experts if config.split_null_gate else config.num_total_experts
            self.weight = nn.Parameter(torch.empty(rows, config.hidden_size))
            nn.init.normal_(self.weight, mean=0.0, std=config.init_std)
            if not config.split_null_gate and config.null_gate_init == "copy" and config.num_null_experts:
                with torch.no_grad():
                    self.weight[config.num_experts:] = _repeat_rows(self.weight[: config.num_experts],
                                                                    config.num_null_experts)

        self.null_gate: Optional[nn.Linear] = None
        if config.split_null_gate and config.num_null_experts > 0:
            self.null_gate = nn.Linear(config.hidden_size, config.num_null_experts, bias=False,
                                       device=self.weight.device, dtype=self.weight.dtype)
            with torch.no_grad():
                if config.null_gate_init == "copy":
                    self.null_gate.weight.copy_(_repeat_rows(self.weight.detach(), config.num_null_experts))
                else:
                    nn.init.normal_(self.null_gate.weight, mean=0.0, std=config.init_std)

    @property
    def num_total_experts(self) -> int:
        return self.num_true_experts + self.num_null_experts

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, self.hidden_size)
        logits = F.linear(flat, self.weight)
        if self.null_gate is not None:
            logits = torch.cat([logits, self.null_gate(flat)], dim=-1)
        return logits

    def forward(self, hidden_states: torch.Tensor):
        router_logits = self.logits(hidden_states)
        probs = torch.softmax(router_logits, dim=-1, dtype=_softmax_dtype(router_logits.dtype))
        topk_probs, topk_indices = torch.topk(probs, self.top_k, dim=-1)
        topk_weights = renormalise_over_true_experts(topk_probs, topk_indices, self.num_true_experts,
                                                     normalise=self.norm_topk_prob)
        return router_logits, topk_weights, topk_indices


def _repeat_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows made by tiling `rows` (AdaMoE: weight.repeat(2, 1) for 16 nulls over 8 experts)."""
    reps = -(-count // rows.shape[0])
    return rows.repeat(reps, 1)[:count].clone()


# ---------------------------------------------------------------------------------------------------
# Experts and the block


def grouped_mm_unsupported_reason(hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                                  device: Union[str, torch.device]) -> Optional[str]:
    """Why `torch.nn.functional.grouped_mm` cannot run SwiGLU experts of this shape / dtype / device, or
    None when it can. Requirements (torch 2.13, checked on CPU): the function exists; dtype float32,
    bfloat16 or float16 (float64 is rejected); every non-unit stride a multiple of 16 bytes, i.e.
    hidden_size and intermediate_size multiples of 16 / element size (4 for float32, 8 for bf16/fp16),
    forward and backward; a CPU or CUDA (compute capability >= 8.0) device. Offsets must be int32 (the
    caller builds them); empty groups and rows past the last offset are allowed."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    if dtype not in _GROUPED_MM_DTYPES:
        return f"grouped_mm supports float32 / bfloat16 / float16, not {dtype}"
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "grouped_mm on CUDA needs compute capability >= 8.0"
    elif device.type != "cpu":
        return f"grouped_mm is not used on {device.type} devices"
    multiple = 16 // torch.empty((), dtype=dtype).element_size()
    for name, size in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if size % multiple:
            return (f"grouped_mm needs 16-byte strides: {name}={size} is not a multiple of {multiple} for {dtype}")
    return None


def resolve_expert_impl(expert_impl: str, num_experts: int, hidden_size: int, intermediate_size: int,
                        dtype: torch.dtype, device: Union[str, torch.device]) -> str:
    """The expert computation ("loop" or "grouped_mm") that `expert_impl` selects; a pure function of its
    arguments, so the choice is the same on every call with the same config, dtype and device.

    - "loop": always the loop.
    - "grouped_mm": grouped_mm where `grouped_mm_unsupported_reason` finds nothing, else the loop (with a
      warning; the outputs are the same).
    - "auto": grouped_mm where it can run AND the device is the CPU AND num_experts >=
      GROUPED_MM_AUTO_MIN_EXPERTS_CPU = 64; otherwise the loop. Why, measured on the 2-core CPU
      (float32, forward+backward, 1 thread, T=2048, alternated repetitions, time(loop) / time(grouped_mm)):
      E=8: 1.00-1.04, E=16: 0.90-0.99, E=32: 0.93-1.04, E=64 (d=128, I=64, k=8): 1.00-1.15,
      E=128: 1.10 (d=128, I=64) and 1.62 (d=64, I=32); at the compute-bound d=512, I=1024, E=8 shape the
      loop is ~6% faster (its per-expert [n_e, 2I] activations stay in cache; grouped_mm's elementwise
      SwiGLU runs over the whole [n, 2I] tensor). On CPU grouped_mm only saves the per-expert Python and
      autograd overhead, which matters once there are many small experts. On CUDA grouped_mm would be one
      kernel launch pair instead of two per expert, but neither its speed nor its dtype/architecture
      support was measured (no GPU was available), so `auto` keeps the loop there: set
      expert_impl="grouped_mm" to opt in on a GPU (it falls back to the loop, with a warning, where
      `grouped_mm_unsupported_reason` finds a reason).
    """
    _check_choice("expert_impl", expert_impl, EXPERT_IMPLS)
    if expert_impl == "loop":
        return "loop"
    reason = grouped_mm_unsupported_reason(hidden_size, intermediate_size, dtype, device)
    if reason is not None:
        if expert_impl == "grouped_mm":
            warnings.warn(f"expert_impl='grouped_mm' falls back to the loop: {reason}", stacklevel=3)
        return "loop"
    if expert_impl == "grouped_mm":
        return "grouped_mm"
    on_cpu = torch.device(device).type == "cpu"
    return "grouped_mm" if on_cpu and num_experts >= GROUPED_MM_AUTO_MIN_EXPERTS_CPU else "loop"


class SwiGLUExperts(nn.Module):
    """E SwiGLU MLPs in the Hugging Face Mixtral layout: `gate_up_proj` [E, 2I, d] (gate rows first,
    then up rows) and `down_proj` [E, d, I]; expert e computes down_e(act(gate_e x) * up_e x).

    `gate_up_proj` / `down_proj` may be existing Parameters (a retrofitted HF expert module's): they are
    registered here as they are, not copied. The expert computation runs inside this module's own
    `forward`, so frameworks that gather a module's parameters around its forward (DeepSpeed ZeRO-3)
    see the expert weights used where they are owned.

    `expert_impl` ("auto" | "loop" | "grouped_mm", see `resolve_expert_impl`) picks how the experts run on
    the sorted assignments: a Python loop with two F.linear per expert that has tokens, or two
    `torch.nn.functional.grouped_mm` calls over all experts on the same sorted layout (offsets = cumulative
    per-expert counts; the 3-D weights are used through transposed views, so the Parameters, shared or
    not, are the ones that get the gradients). Both compute the same thing; `last_impl` records which one
    the last forward used."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 hidden_act: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "silu", init_std: float = 0.02,
                 gate_up_proj: Optional[nn.Parameter] = None, down_proj: Optional[nn.Parameter] = None,
                 expert_impl: str = "auto") -> None:
        super().__init__()
        self.num_experts = num_experts
        _check_choice("expert_impl", expert_impl, EXPERT_IMPLS)
        self.expert_impl = expert_impl
        self.last_impl: Optional[str] = None
        if (gate_up_proj is None) != (down_proj is None):
            raise ValueError("SwiGLUExperts: give both gate_up_proj and down_proj, or neither")
        if gate_up_proj is None:
            gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
            down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
            nn.init.normal_(gate_up_proj, std=init_std)
            nn.init.normal_(down_proj, std=init_std)
        expected = {"gate_up_proj": (num_experts, 2 * intermediate_size, hidden_size),
                    "down_proj": (num_experts, hidden_size, intermediate_size)}
        for name, weight in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            if tuple(weight.shape) != expected[name]:
                raise ValueError(f"SwiGLUExperts.{name} must have shape {expected[name]}, got {tuple(weight.shape)}")
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = _activation(hidden_act) if isinstance(hidden_act, str) else hidden_act

    @classmethod
    def sharing(cls, hf_experts: nn.Module, expert_impl: str = "auto") -> "SwiGLUExperts":
        """Experts whose Parameters ARE those of a Hugging Face 3-D expert module (Mixtral / Qwen2-MoE /
        OLMoE layout); the state-dict keys `experts.gate_up_proj` / `experts.down_proj` stay the same."""
        num_experts, double_intermediate, hidden = hf_experts.gate_up_proj.shape
        return cls(num_experts, hidden, double_intermediate // 2, hidden_act=hf_experts.act_fn,
                   gate_up_proj=hf_experts.gate_up_proj, down_proj=hf_experts.down_proj, expert_impl=expert_impl)

    def _compute_dtype(self, device_type: str) -> torch.dtype:
        # Under autocast F.linear runs in the autocast dtype; grouped_mm is not autocast-aware, so the
        # grouped path casts to that dtype itself (and is checked against it).
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.gate_up_proj.dtype

    def resolved_impl(self, tokens: torch.Tensor) -> str:
        """"loop" or "grouped_mm": what `forward` runs for `tokens` (see `resolve_expert_impl`)."""
        if self.expert_impl == "loop":
            return "loop"
        weight = self.gate_up_proj
        dtype = self._compute_dtype(weight.device.type)
        if tokens.dtype != dtype and not torch.is_autocast_enabled(weight.device.type):
            return "loop"  # mismatched dtypes: F.linear raises its usual error
        impl = resolve_expert_impl(self.expert_impl, self.num_experts, weight.shape[2], self.down_proj.shape[2],
                                   dtype, weight.device)
        if impl == "grouped_mm" and dtype == weight.dtype and \
                (weight.data_ptr() % 16 or self.down_proj.data_ptr() % 16):
            return "loop"  # e.g. memory-mapped weights at an odd offset (torch <= 2.10 CPU needs alignment)
        return impl

    def forward(self, tokens: torch.Tensor, token_ids: torch.Tensor, slot_weights: torch.Tensor,
                counts: Sequence[int]) -> torch.Tensor:
        """Sorted dispatch: `token_ids` [n] and `slot_weights` [n] list the assignments grouped by expert
        (expert 0's first), `counts[e]` of them for expert e; entries after sum(counts) are ignored.
        Returns sum over assignments of weight * expert(token), scattered back to a [T, d] output."""
        output = torch.zeros_like(tokens)
        num_assigned = int(sum(counts))  # entries past this (null / dropped slots) are not computed
        if len(counts) != self.num_experts:
            raise ValueError(f"SwiGLUExperts: got {len(counts)} counts for {self.num_experts} experts")
        if num_assigned == 0:
            self.last_impl = None
            return output
        token_ids, slot_weights = token_ids[:num_assigned], slot_weights[:num_assigned]
        # One gather into expert order, one scatter-add back. index_select (not x[idx]) keeps the backward
        # an index_add.
        sorted_tokens = torch.index_select(tokens, 0, token_ids)
        impl = self.resolved_impl(tokens)
        # The routing weight multiplies the narrower of the expert's hidden activation [n, I] and its
        # output [n, d] (the same product, since the down projection is linear): less elementwise work.
        weights = slot_weights[:, None]
        weight_hidden = self.down_proj.shape[2] < self.down_proj.shape[1]
        if impl == "grouped_mm":
            expert_out = self._grouped(sorted_tokens, counts, weights if weight_hidden else None)
        else:
            expert_out = self._loop(sorted_tokens, counts, weights if weight_hidden else None)
        self.last_impl = impl
        if not weight_hidden:
            expert_out = expert_out * weights.to(expert_out.dtype)
        return output.index_add_(0, token_ids, expert_out.to(output.dtype))

    def _loop(self, sorted_tokens: torch.Tensor, counts: Sequence[int],
              hidden_weights: Optional[torch.Tensor]) -> torch.Tensor:
        # Per-expert pieces by split and the weights by unbind: the backward is ONE cat / stack of the
        # per-expert gradients (slicing or w[e] would make a full-size zero gradient per expert).
        counts = [int(c) for c in counts]
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        token_pieces = sorted_tokens.split(counts)
        weight_pieces = hidden_weights.split(counts) if hidden_weights is not None else None
        pieces = []
        for expert_index, count in enumerate(counts):
            if count:
                hidden = _gated(self.act_fn, F.linear(token_pieces[expert_index], gate_up[expert_index]))
                if weight_pieces is not None:
                    hidden = hidden * weight_pieces[expert_index].to(hidden.dtype)
                pieces.append(F.linear(hidden, down[expert_index]))
        return torch.cat(pieces, dim=0)

    def _grouped(self, sorted_tokens: torch.Tensor, counts: Sequence[int],
                 hidden_weights: Optional[torch.Tensor]) -> torch.Tensor:
        # offs[e] = end row of expert e in the sorted layout (int32, as grouped_mm requires); equal
        # consecutive offsets are empty experts, which grouped_mm skips (their weight gradients are 0).
        offs = torch.tensor(list(itertools.accumulate(int(c) for c in counts)), dtype=torch.int32,
                            device=sorted_tokens.device)
        dtype = self._compute_dtype(self.gate_up_proj.device.type)
        gate_up_w, down_w = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        hidden = _gated(self.act_fn, F.grouped_mm(sorted_tokens.to(dtype), gate_up_w.transpose(-2, -1), offs=offs))
        if hidden_weights is not None:
            hidden = hidden * hidden_weights.to(hidden.dtype)
        return F.grouped_mm(hidden, down_w.transpose(-2, -1), offs=offs)


class _SiluGatedProduct(torch.autograd.Function):
    """silu(gate) * up from the [n, 2I] projection output [gate | up], with a backward that writes both
    halves of the gradient into ONE [n, 2I] tensor (autograd's chunk backward would allocate a zero
    tensor and copy each half in: a full extra pass over [n, 2I]). Saves only the projection output and
    recomputes silu(gate) in the backward. Same values as F.silu(gate) * up and its autograd gradient."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        return F.silu(gate) * up

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad = torch.empty_like(gate_up)
        grad_gate, grad_up = grad.chunk(2, dim=-1)
        torch.mul(grad_out, F.silu(gate), out=grad_up)
        torch.mul(grad_out, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad


def _is_silu(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    return act_fn is F.silu or type(act_fn).__name__ in ("SiLU", "SiLUActivation")


def _gated(act_fn: Callable[[torch.Tensor], torch.Tensor], gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up for a [n, 2I] projection output [gate | up]."""
    if _is_silu(act_fn):
        return _SiluGatedProduct.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    table = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}
    if name not in table:
        raise ValueError(f"unknown hidden_act {name!r}; expected one of {sorted(table)}")
    return table[name]


def expert_forward(experts: nn.Module, expert_index: int, tokens: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU MLP on a [n, d] batch of tokens."""
    gate, up = F.linear(tokens, experts.gate_up_proj[expert_index]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[expert_index])


class SparseMoEBlock(nn.Module):
    """Top-k MoE feed-forward block with null experts and an optional capacity limit.

    forward(hidden [B, S, d] or [T, d]) -> same shape. Dispatch: the T*k (token, slot) assignments that
    go to a true expert and were not dropped are argsorted by expert id, each expert runs once on its
    contiguous run of tokens, and results are scattered back with index_add. Null experts compute
    nothing.

    Capacity (when `capacity_factor` is set): each true expert accepts at most
    C = ceil(capacity_factor * T * k / E_true) assignments per forward, T counting every token of the
    batch (padding included, the block does not see the mask). Priority is position order: assignments
    are taken in flattened token order (batch-major, then sequence position, then slot), so later tokens
    overflow first. A dropped assignment contributes nothing and its weight is 0; the other slots'
    weights are not renormalised. Null slots are never dropped.

    Optional `shared_expert` / `shared_expert_gate` (Qwen2-MoE): output += sigmoid(gate(x)) * shared(x).
    """

    def __init__(self, config: MoEConfig, router: Optional[NullExpertRouter] = None,
                 experts: Optional[nn.Module] = None, shared_expert: Optional[nn.Module] = None,
                 shared_expert_gate: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.config = config
        self.num_true_experts = config.num_experts
        self.num_null_experts = config.num_null_experts
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.jitter_noise = config.router_jitter_noise
        # Module names `gate` and `experts` match the HF blocks so checkpoint keys stay the same.
        self.gate = router if router is not None else NullExpertRouter(config)
        self.experts = experts if experts is not None else SwiGLUExperts(
            config.num_experts, config.hidden_size, config.intermediate_size, config.hidden_act, config.init_std,
            expert_impl=config.expert_impl)
        if shared_expert_gate is not None and shared_expert is None:
            raise ValueError("shared_expert_gate given without a shared_expert")
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.last_routing: Optional[Dict[str, Any]] = None

    def capacity_drops(self, topk_indices: torch.Tensor) -> Optional[torch.Tensor]:
        """[T, k] bool, True where a true-expert assignment overflows its expert's capacity."""
        if self.capacity_factor is None:
            return None
        num_tokens, k = topk_indices.shape
        capacity = expert_capacity(self.capacity_factor, num_tokens, k, self.num_true_experts)
        flat = topk_indices.reshape(-1)
        is_true = flat < self.num_true_experts
        # Null slots go to a sentinel bucket that is never capacity-limited.
        bucket = torch.where(is_true, flat, torch.full_like(flat, self.num_true_experts))
        order = torch.argsort(bucket, stable=True)  # stable: position order inside each expert
        counts = torch.bincount(bucket, minlength=self.num_true_experts + 1)
        group_start = torch.cumsum(counts, dim=0) - counts
        rank_sorted = torch.arange(flat.numel(), device=flat.device) - group_start[bucket[order]]
        rank = torch.empty_like(rank_sorted)
        rank[order] = rank_sorted
        return (is_true & (rank >= capacity)).reshape(num_tokens, k)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        in_shape = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        tokens = hidden_states.reshape(-1, in_shape[-1])

        router_logits, topk_weights, topk_indices = self.gate(tokens)
        dropped = self.capacity_drops(topk_indices)
        if dropped is not None:
            topk_weights = topk_weights.masked_fill(dropped, 0.0)
        active = topk_indices < self.num_true_experts
        if dropped is not None:
            active = active & ~dropped

        output = self._dispatch(tokens, topk_indices, topk_weights, active)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            output = output + shared

        self.last_routing = {
            "router_logits": router_logits,
            "topk_indices": topk_indices,
            "topk_weights": topk_weights,
            "dropped": dropped,
            "num_true_experts": self.num_true_experts,
            "num_null_experts": self.num_null_experts,
            "top_k": self.top_k,
        }
        return output.reshape(in_shape)

    def _dispatch(self, tokens: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor,
                  active: torch.Tensor) -> torch.Tensor:
        k = topk_indices.shape[1]
        flat_expert = topk_indices.reshape(-1)
        # Inactive slots (null expert or dropped) sort into a last bucket that is never computed.
        bucket = torch.where(active.reshape(-1), flat_expert, torch.full_like(flat_expert, self.num_true_experts))
        order = torch.argsort(bucket, stable=True)
        counts = torch.bincount(bucket, minlength=self.num_true_experts + 1)[: self.num_true_experts].tolist()
        token_of_slot = order // k
        weight_of_slot = topk_weights.reshape(-1)[order]

        return self.experts(tokens, token_of_slot, weight_of_slot, counts)

    @classmethod
    def from_hf_block(cls, block: nn.Module, num_null_experts: int, top_k: int, norm_topk_prob: bool,
                      null_gate_init: str = "copy", **config_fields: Any) -> "SparseMoEBlock":
        """A block that SHARES `block`'s router weight, expert module (3-D weights) and, if present, its
        shared expert; only the null gate is new. The original Parameters are neither copied nor changed."""
        experts = block.experts
        if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False) \
                or not getattr(experts, "is_concatenated", True):
            raise ValueError(f"{type(experts).__name__}: only the concatenated [gate; up], untransposed, "
                             "bias-free expert layout is supported")
        gate_weight = block.gate.weight
        num_true, hidden = gate_weight.shape
        config = MoEConfig(
            hidden_size=hidden, intermediate_size=experts.down_proj.shape[-1], num_experts=num_true,
            num_null_experts=num_null_experts, top_k=top_k, null_gate_init=null_gate_init,
            split_null_gate=True, norm_topk_prob=norm_topk_prob,
            router_jitter_noise=float(getattr(block, "jitter_noise", 0.0) or 0.0), **config_fields,
        )
        router = NullExpertRouter(config, true_gate_weight=gate_weight)
        return cls(config, router=router, experts=SwiGLUExperts.sharing(experts, expert_impl=config.expert_impl),
                   shared_expert=getattr(block, "shared_expert", None),
                   shared_expert_gate=getattr(block, "shared_expert_gate", None))


# ---------------------------------------------------------------------------------------------------
# Auxiliary losses over the recorded routing


def _flat_mask(token_mask: Optional[torch.Tensor], num_tokens: int, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """Token weights [T] (1 = real token, 0 = padding); accepts [T] or [B, S] masks."""
    if token_mask is None:
        return torch.ones(num_tokens, device=device, dtype=dtype)
    if token_mask.numel() != num_tokens:
        raise ValueError(f"token mask has {token_mask.numel()} entries (shape {tuple(token_mask.shape)}) "
                         f"but the routing record has {num_tokens} tokens")
    return token_mask.reshape(-1).to(device=device, dtype=dtype)


def _as_routing_list(routings: Union[Dict[str, Any], Sequence[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    routing_list = [routings] if isinstance(routings, dict) else list(routings)
    if not routing_list:
        raise ValueError("no routing records: run a forward pass through the MoE blocks first")
    return routing_list


def _layer_counts_and_probs(routing: Dict[str, Any], token_mask: Optional[torch.Tensor]):
    """(slot counts per expert [E_total], summed probabilities [E_total], number of real tokens)."""
    logits = routing["router_logits"]
    num_tokens, num_total = logits.shape
    probs = torch.softmax(logits, dim=-1, dtype=_softmax_dtype(logits.dtype))
    mask = _flat_mask(token_mask, num_tokens, logits.device, probs.dtype)
    indices = routing["topk_indices"]
    slot_weight = mask[:, None].expand_as(indices).reshape(-1)
    counts = torch.zeros(num_total, device=logits.device, dtype=probs.dtype)
    counts = counts.scatter_add(0, indices.reshape(-1), slot_weight)
    prob_sum = (probs * mask[:, None]).sum(dim=0)
    return counts, prob_sum, mask.sum()


def _balance_value(counts: torch.Tensor, prob_sum: torch.Tensor, num_real_tokens: torch.Tensor,
                   top_k: int, num_true: int, lb_null_mode: str) -> torch.Tensor:
    denom = torch.clamp(num_real_tokens, min=1.0)
    slot_fraction = counts / (denom * top_k)  # f_e: share of the T*k slots
    mean_prob = prob_sum / denom  # P_e
    if lb_null_mode == "average" and slot_fraction.shape[0] > num_true:
        # Balance the null group as a whole: every null expert gets the mean null count.
        null_mean = slot_fraction[num_true:].mean()
        slot_fraction = torch.cat([slot_fraction[:num_true], null_mean.expand(slot_fraction.shape[0] - num_true)])
    return slot_fraction.shape[0] * torch.sum(slot_fraction * mean_prob)


def load_balancing_loss(routings: Union[Dict[str, Any], Sequence[Dict[str, Any]]],
                        token_mask: Optional[torch.Tensor] = None, lb_null_mode: str = "average",
                        lb_reduce: str = "per_layer_sum") -> torch.Tensor:
    """AdaMoE load-balancing loss over the routing records of all MoE layers.

    Per layer: f_e = (slots assigned to expert e) / (T*k), P_e = mean router probability of e over the
    tokens, loss = E_total * sum_e f_e * P_e (1.0 at perfect balance). With lb_null_mode="average" each
    null expert's f_e is replaced by the mean f over the null experts. `token_mask` ([T] or [B, S], 1 =
    real token) removes padding from both f and P. Counts are of the router's selections (a capacity
    drop still counts: the router chose it).

    lb_reduce="per_layer_sum": the per-layer losses are summed (SPEC). "concat": all layers' tokens are
    pooled first, then one loss is taken, as Hugging Face Mixtral does; that value equals HF's
    `load_balancing_loss_func` divided by k (HF normalises counts by T instead of T*k).
    """
    if lb_null_mode not in LB_NULL_MODES:
        raise ValueError(f"lb_null_mode must be one of {list(LB_NULL_MODES)}, got {lb_null_mode!r}")
    if lb_reduce not in LB_REDUCES:
        raise ValueError(f"lb_reduce must be one of {list(LB_REDUCES)}, got {lb_reduce!r}")
    routing_list = _as_routing_list(routings)
    layers = []
    for routing in routing_list:
        counts, prob_sum, real = _layer_counts_and_probs(routing, token_mask)
        layers.append((counts, prob_sum, real, int(routing["top_k"]), int(routing["num_true_experts"])))

    if lb_reduce == "per_layer_sum":
        return torch.stack([_balance_value(c, p, n, k, e, lb_null_mode) for c, p, n, k, e in layers]).sum()

    shapes = {(c.shape[0], k, e) for c, _, _, k, e in layers}
    if len(shapes) != 1:
        raise ValueError(f"lb_reduce='concat' needs the same (E_total, top_k, E_true) in every layer, got {shapes}")
    _, top_k, num_true = shapes.pop()
    device = layers[0][0].device
    counts = torch.stack([c.to(device) for c, _, _, _, _ in layers]).sum(dim=0)
    prob_sum = torch.stack([p.to(device) for _, p, _, _, _ in layers]).sum(dim=0)
    real = torch.stack([n.to(device) for _, _, n, _, _ in layers]).sum()
    return _balance_value(counts, prob_sum, real, top_k, num_true, lb_null_mode)


def router_z_loss(routings: Union[Dict[str, Any], Sequence[Dict[str, Any]]],
                  token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2, summed over layers."""
    total = []
    for routing in _as_routing_list(routings):
        logits = routing["router_logits"]
        lse = torch.logsumexp(logits.to(_softmax_dtype(logits.dtype)), dim=-1)
        mask = _flat_mask(token_mask, logits.shape[0], logits.device, lse.dtype)
        total.append((lse.square() * mask).sum() / torch.clamp(mask.sum(), min=1.0))
    return torch.stack(total).sum()


def moe_blocks(model: nn.Module) -> List[SparseMoEBlock]:
    """All SparseMoEBlocks of a model in module (= layer) order."""
    return [m for m in model.modules() if isinstance(m, SparseMoEBlock)]


def _recorded_routings(model: nn.Module) -> List[Dict[str, Any]]:
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no SparseMoEBlock (retrofit a HF MoE model first)")
    routings = [b.last_routing for b in blocks]
    if any(r is None for r in routings):
        raise ValueError("a SparseMoEBlock has no routing record yet: run a forward pass first")
    return routings


def collect_moe_aux_losses(model: nn.Module, token_mask: Optional[torch.Tensor] = None,
                           lb_null_mode: Optional[str] = None, lb_reduce: Optional[str] = None
                           ) -> Dict[str, torch.Tensor]:
    """{"lb": load-balancing loss, "z": router z-loss} over every SparseMoEBlock's last forward.
    Modes default to the first block's MoEConfig. The caller weights them (config.lb_coef / z_coef)."""
    routings = _recorded_routings(model)
    first_config = moe_blocks(model)[0].config
    return {
        "lb": load_balancing_loss(routings, token_mask, lb_null_mode or first_config.lb_null_mode,
                                  lb_reduce or first_config.lb_reduce),
        "z": router_z_loss(routings, token_mask),
    }


@torch.no_grad()
def moe_routing_metrics(model: nn.Module, token_mask: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """Routing statistics of the last forward, over real tokens and all MoE layers.

    Floats: "moe/true_experts_per_token" (true experts actually computed per token per layer: null and
    dropped slots excluded; the FLOPs proxy), "moe/share_true_experts_{i}" for i = 0..k (share of
    (token, layer) pairs using i true experts), "moe/null_slot_fraction", "moe/drop_fraction",
    "moe/router_entropy" (nats, softmax over all E_total experts).
    Tensor: "expert_load" [layers, E_total], the share of each layer's real slots sent to each expert
    (selections, so each row sums to 1); not a scalar, hence no "moe/" prefix.
    """
    routings = _recorded_routings(model)
    top_k = int(routings[0]["top_k"])
    num_true_per_token, null_slots, dropped_slots, entropy, real_slots, real_tokens = [], 0.0, 0.0, 0.0, 0.0, 0.0
    loads = []
    for routing in routings:
        indices = routing["topk_indices"]
        k = int(routing["top_k"])
        if k != top_k:
            raise ValueError("moe_routing_metrics needs the same top_k in every MoE layer")
        logits = routing["router_logits"]
        probs = torch.softmax(logits, dim=-1, dtype=_softmax_dtype(logits.dtype))
        mask = _flat_mask(token_mask, indices.shape[0], indices.device, probs.dtype) > 0
        is_true = indices < int(routing["num_true_experts"])
        computed = is_true if routing["dropped"] is None else is_true & ~routing["dropped"]
        num_true_per_token.append(computed.sum(dim=-1)[mask])
        null_slots += float((~is_true)[mask].sum())
        if routing["dropped"] is not None:
            dropped_slots += float(routing["dropped"][mask].sum())
        entropy += float(-(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)[mask].sum())
        n_real = float(mask.sum())
        real_tokens += n_real
        real_slots += n_real * k
        counts = torch.bincount(indices[mask].reshape(-1), minlength=logits.shape[1]).to(probs.dtype)
        loads.append(counts / max(n_real * k, 1.0))
    used = torch.cat(num_true_per_token)
    denom_tokens = max(used.numel(), 1)
    metrics: Dict[str, Any] = {"moe/true_experts_per_token": float(used.to(torch.float64).mean()) if used.numel() else 0.0}
    for i in range(top_k + 1):
        metrics[f"moe/share_true_experts_{i}"] = float((used == i).sum()) / denom_tokens
    metrics["moe/null_slot_fraction"] = null_slots / max(real_slots, 1.0)
    metrics["moe/drop_fraction"] = dropped_slots / max(real_slots, 1.0)
    metrics["moe/router_entropy"] = entropy / max(real_tokens, 1.0)
    widths = {load.shape[0] for load in loads}
    metrics["expert_load"] = torch.stack(loads).cpu() if len(widths) == 1 else [load.cpu() for load in loads]
    return metrics


# ---------------------------------------------------------------------------------------------------
# Retrofitting Hugging Face MoE causal LMs


def _hf_sparse_block_classes() -> tuple:
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    return (MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, OlmoeSparseMoeBlock)


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _SUPPORTED_HF_MOE:
        raise ValueError(f"retrofit supports Hugging Face model types {sorted(_SUPPORTED_HF_MOE)}; "
                         f"got {model_type!r} ({type(model).__name__})")
    return model_type


def retrofit(model: nn.Module, num_null_experts: int, top_k: Optional[int] = None,
             null_gate_init: str = "copy", capacity_factor: Optional[float] = None,
             lb_null_mode: str = "average", lb_reduce: str = "per_layer_sum", lb_coef: float = 1e-3,
             z_coef: float = 0.0, seed: Optional[int] = None, expert_impl: str = "auto") -> nn.Module:
    """Add `num_null_experts` null experts to every sparse block of a HF Mixtral / Qwen2-MoE / OLMoE
    causal LM, in place; returns the model.

    Each HF sparse block is replaced by a `SparseMoEBlock` that shares the block's router weight, its
    expert module (3-D weights) and Qwen2-MoE's shared expert + shared-expert gate: the original
    Parameters are untouched, only `gate.null_gate` is new. `top_k` defaults to the model's
    num_experts_per_tok (AdaMoE's Mixtral run raised it from 2 to 4). Weight normalisation follows the
    model: Mixtral renormalises over the selected true experts; Qwen2-MoE / OLMoE do so only when
    `config.norm_topk_prob`. With num_null_experts=0 and the original top_k the logits equal the
    original model's.

    The settings are recorded in `model.config.adamoe`, so `save_pretrained` + `load_retrofitted(path)`
    restores the model. HF's own `output_router_logits` aux loss is not null-aware and is switched off
    (`config.output_router_logits = False`): use `collect_moe_aux_losses` instead.

    `expert_impl` ("auto" | "loop" | "grouped_mm") is how the new blocks compute the (shared) experts; it
    changes speed only, not outputs, and is not recorded in `config.adamoe` (a restored model uses "auto").
    """
    model_type = _model_type(model)
    if moe_blocks(model):
        raise ValueError("model is already retrofitted (it contains SparseMoEBlocks)")
    if num_null_experts < 0:
        raise ValueError(f"num_null_experts must be >= 0, got {num_null_experts}")
    config = model.config
    top_k = int(top_k if top_k is not None else config.num_experts_per_tok)
    norm_topk_prob = True if model_type == "mixtral" else bool(getattr(config, "norm_topk_prob", False))
    if null_gate_init not in NULL_GATE_INITS:
        raise ValueError(f"null_gate_init must be one of {list(NULL_GATE_INITS)}, got {null_gate_init!r}")
    if expert_impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl must be one of {list(EXPERT_IMPLS)}, got {expert_impl!r}")

    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    hf_classes = _hf_sparse_block_classes()
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, hf_classes)]
    if not targets:
        raise ValueError(f"no sparse MoE block found in {type(model).__name__}")
    try:
        for name, block in targets:
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            new_block = SparseMoEBlock.from_hf_block(
                block, num_null_experts=num_null_experts, top_k=top_k, norm_topk_prob=norm_topk_prob,
                null_gate_init=null_gate_init, capacity_factor=capacity_factor, lb_null_mode=lb_null_mode,
                lb_reduce=lb_reduce, lb_coef=lb_coef, z_coef=z_coef, expert_impl=expert_impl,
            )
            setattr(parent, child_name, new_block)
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)

    setattr(config, CONFIG_KEY, {
        "num_null_experts": int(num_null_experts), "top_k": top_k, "null_gate_init": null_gate_init,
        "capacity_factor": capacity_factor, "lb_null_mode": lb_null_mode, "lb_reduce": lb_reduce,
        "lb_coef": lb_coef, "z_coef": z_coef,
    })
    config.output_router_logits = False
    return model


_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def _null_gates_by_layer(model: nn.Module) -> Dict[int, nn.Linear]:
    gates: Dict[int, nn.Linear] = {}
    for name, block in model.named_modules():
        if isinstance(block, SparseMoEBlock) and block.gate.null_gate is not None:
            match = _LAYER_INDEX.search(name + ".")
            if match is None:
                raise ValueError(f"cannot find the layer index of MoE block {name!r}")
            gates[int(match.group(1))] = block.gate.null_gate
    return gates


def _checkpoint_null_gate_tensors(path: Path) -> Dict[int, torch.Tensor]:
    """Null-gate weights in a safetensors checkpoint directory, keyed by layer index.

    Keyed by layer rather than by full name because transformers 5 renames some modules on save
    (e.g. Mixtral's `mlp` is written as `block_sparse_moe`); the layer index survives the renaming."""
    from safetensors import safe_open

    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"no safetensors checkpoint (model.safetensors or its index) in {path}")
    found: Dict[int, torch.Tensor] = {}
    for file_name in files:
        with safe_open(str(path / file_name), framework="pt") as handle:
            for key in handle.keys():
                if "null_gate" in key:
                    match = _LAYER_INDEX.search(key)
                    if match is None:
                        raise ValueError(f"null-gate tensor {key!r} in {file_name} has no layer index")
                    found[int(match.group(1))] = handle.get_tensor(key)
    return found


def load_retrofitted(path: Union[str, Path], **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a model saved with `save_pretrained` after `retrofit`: the base model through
    `AutoModelForCausalLM.from_pretrained` (the null gates are unknown to it and skipped), then
    `retrofit` with the settings in `config.adamoe`, then the saved null-gate weights.
    `path` must be a local directory."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"load_retrofitted needs a local checkpoint directory; {path} is not one")
    settings = getattr(AutoConfig.from_pretrained(str(path)), CONFIG_KEY, None)
    if not settings:
        raise ValueError(f"{path}/config.json has no '{CONFIG_KEY}' entry: it was not saved from a retrofitted "
                         "model; load it with from_pretrained and call retrofit()")
    # The null-gate tensors are "unexpected" for the base architecture; we load them ourselves below.
    previous_verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **from_pretrained_kwargs)
    finally:
        hf_logging.set_verbosity(previous_verbosity)
    return restore_retrofit(model, path)


def restore_retrofit(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Finish loading a retrofitted checkpoint whose base weights are already in `model` (loaded with
    `from_pretrained(path)`, which skips the null gates): `retrofit` with the settings saved in
    `model.config.adamoe`, then copy the null-gate weights from the safetensors files in `path`."""
    path = Path(path)
    settings = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not settings:
        raise ValueError(f"the model loaded from {path} has no config.{CONFIG_KEY}: it is not a retrofitted "
                         "checkpoint")
    retrofit(model, **dict(settings))

    gates = _null_gates_by_layer(model)
    if not gates:  # retrofitted with num_null_experts=0: nothing saved, nothing to load
        return model
    saved = _checkpoint_null_gate_tensors(path)
    if set(gates) != set(saved):
        raise ValueError(f"{path}: null gates saved for layers {sorted(saved)} but the model has them in "
                         f"layers {sorted(gates)}")
    with torch.no_grad():
        for layer, gate in gates.items():
            tensor = saved[layer]
            if tuple(tensor.shape) != tuple(gate.weight.shape):
                raise ValueError(f"{path}: layer {layer} null gate has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(gate.weight.shape)}")
            gate.weight.copy_(tensor.to(device=gate.weight.device, dtype=gate.weight.dtype))
    return model


def trainable_module_names(model: nn.Module) -> List[str]:
    """Full names of the null-gate modules, the only new parameters of a retrofitted model: pass them
    as `LoraConfig(modules_to_save=trainable_module_names(model))` so they train under LoRA (PEFT
    matches a module whose name equals an entry or ends with "." plus an entry)."""
    names = [f"{name}.gate.null_gate" for name, block in model.named_modules()
             if isinstance(block, SparseMoEBlock) and block.gate.null_gate is not None]
    if not names:
        raise ValueError("no null gates found: retrofit the model with num_null_experts > 0 first")
    return names
