"""The expert MLPs of an MoE layer and how they are computed on sorted token assignments.

`SwiGLUExperts` stores E SwiGLU MLPs as 3-D tensors in the Hugging Face Mixtral layout and runs them
either by a per-expert loop or by `torch.nn.functional.grouped_mm` (`expert_impl`, see
`resolve_expert_impl`). SiLU experts in one dtype outside autocast (the usual case) run as ONE autograd
node with a written-out backward (`_SortedSwiGLUExperts`); other activations, mixed dtypes and autocast
run the same computation as an autograd graph (`_loop` / `_grouped`).

Plain PyTorch: no Lightning, no imports from `recipes/`.
"""
from __future__ import annotations

import itertools
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from models.moe.config import EXPERT_IMPLS, check_choice

# `auto` on CPU picks grouped_mm from this many true experts on. Measured on the 2-core CPU (forward+backward,
# 1 thread; bench `adamoe_dispatch` and a sweep over E): see `resolve_expert_impl`.
GROUPED_MM_AUTO_MIN_EXPERTS_CPU = 64
# dtypes torch's grouped_mm accepts (float64 is rejected: "Expected mat_a to be Float32, BFloat16 or Float16").
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
      GROUPED_MM_AUTO_MIN_EXPERTS_CPU = 64; otherwise the loop. The two differ only where experts are
      small: grouped_mm merges consecutive experts into cache-sized blocks (one grouped_mm call per block
      and GEMM), the loop runs one expert at a time; an expert above the block size is alone either way (E=8
      at the benchmark shapes: the same schedule). Measured on the 2-core CPU (float32, forward+backward,
      1 thread, T=2048, d=128, I=64, alternated repetitions, time(loop) / time(grouped_mm)): E=16 (k=4)
      1.03, E=32 (k=8) 0.98, E=64 (k=8) 1.07-1.12: grouped_mm only saves per-expert Python and dispatch
      overhead, which matters once there are many small experts. On CUDA grouped_mm would be one
      kernel launch pair instead of two per expert, but neither its speed nor its dtype/architecture
      support was measured (no GPU was available), so `auto` keeps the loop there: set
      expert_impl="grouped_mm" to opt in on a GPU (it falls back to the loop, with a warning, where
      `grouped_mm_unsupported_reason` finds a reason).
    """
    check_choice("expert_impl", expert_impl, EXPERT_IMPLS)
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
    the sorted assignments: a Python loop with two GEMMs per expert that has tokens, or
    `torch.nn.functional.grouped_mm` calls over blocks of consecutive experts on the same sorted layout
    (offsets = cumulative per-expert counts; the 3-D weights are used through views, so the Parameters,
    shared or not, are the ones that get the gradients). Both compute the same thing; `last_impl` records
    which one the last forward used."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 hidden_act: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "silu", init_std: float = 0.02,
                 gate_up_proj: Optional[nn.Parameter] = None, down_proj: Optional[nn.Parameter] = None,
                 expert_impl: str = "auto") -> None:
        super().__init__()
        self.num_experts = num_experts
        check_choice("expert_impl", expert_impl, EXPERT_IMPLS)
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

    def _fusable(self, tokens: torch.Tensor) -> bool:
        """Whether `_SortedSwiGLUExperts` computes the experts: SiLU, one dtype, no autocast. Otherwise the
        same computation runs as an autograd graph of the per-expert / grouped ops (`_loop`, `_grouped`)."""
        return (_is_silu(self.act_fn) and not torch.is_autocast_enabled(tokens.device.type)
                and tokens.dtype == self.gate_up_proj.dtype == self.down_proj.dtype
                and tokens.device == self.gate_up_proj.device)

    def forward(self, tokens: torch.Tensor, token_ids: torch.Tensor, slot_weights: torch.Tensor,
                counts: Sequence[int]) -> torch.Tensor:
        """Sorted dispatch: `token_ids` [n] and `slot_weights` [n] list the assignments grouped by expert
        (expert 0's first), `counts[e]` of them for expert e; entries after sum(counts) are ignored.
        Returns sum over assignments of weight * expert(token), scattered back to a [T, d] output."""
        num_assigned = int(sum(counts))  # entries past this (null / dropped slots) are not computed
        if len(counts) != self.num_experts:
            raise ValueError(f"SwiGLUExperts: got {len(counts)} counts for {self.num_experts} experts")
        if num_assigned == 0:
            self.last_impl = None
            return torch.zeros_like(tokens)
        token_ids, slot_weights = token_ids[:num_assigned], slot_weights[:num_assigned]
        impl = self.resolved_impl(tokens)
        # The routing weight multiplies the narrower of the expert's hidden activation [n, I] and its
        # output [n, d] (the same product, since the down projection is linear): less elementwise work.
        weight_hidden = self.down_proj.shape[2] < self.down_proj.shape[1]
        if self._fusable(tokens):
            self.last_impl = impl
            return _SortedSwiGLUExperts.apply(tokens, self.gate_up_proj, self.down_proj, token_ids, slot_weights,
                                              tuple(int(c) for c in counts), impl == "grouped_mm", weight_hidden)
        # One gather into expert order, one scatter-add back. index_select (not x[idx]) keeps the backward
        # an index_add.
        sorted_tokens = torch.index_select(tokens, 0, token_ids)
        weights = slot_weights[:, None]
        if impl == "grouped_mm":
            expert_out = self._grouped(sorted_tokens, counts, weights if weight_hidden else None)
        else:
            expert_out = self._loop(sorted_tokens, counts, weights if weight_hidden else None)
        self.last_impl = impl
        if not weight_hidden:
            expert_out = expert_out * weights.to(expert_out.dtype)
        return torch.zeros_like(tokens).index_add_(0, token_ids, expert_out.to(tokens.dtype))

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


# Expert blocks of the grouped schedule: consecutive experts whose rows times max(2I, d) stay within this many
# elements (1 MiB of float32) share one grouped_mm call per GEMM; an expert above it is a block on its own.
_BLOCK_ELEMENTS = 1 << 18


def _expert_blocks(counts: Sequence[int], grouped: bool, width: int) -> List[Tuple[int, int, int, int]]:
    """(first expert, end expert, first row, end row) of each block of consecutive experts that have rows,
    in order. Without `grouped` every expert is a block; with it consecutive experts are merged while the
    block's rows * `width` stay within `_BLOCK_ELEMENTS`. Experts without rows inside a block stay in it
    (grouped_mm gives them empty groups); leading / trailing ones are left out."""
    blocks: List[Tuple[int, int, int, int]] = []
    row = 0
    for e, count in enumerate(counts):
        if not count:
            continue
        if grouped and blocks and (row + count - blocks[-1][2]) * width <= _BLOCK_ELEMENTS:
            blocks[-1] = (blocks[-1][0], e + 1, blocks[-1][2], row + count)
        else:
            blocks.append((e, e + 1, row, row + count))
        row += count
    return blocks


def _swiglu_forward(gate_up: torch.Tensor, weights: torch.Tensor, weight_hidden: bool) -> Tuple[torch.Tensor, ...]:
    """From the [r, 2I] projection [gate | up]: (silu(gate), hidden = silu(gate) * up, the down GEMM's input =
    hidden * weights ([r, 1]) when `weight_hidden`, else hidden itself)."""
    inter = gate_up.shape[1] // 2
    silu_gate = F.silu(gate_up[:, :inter])
    hidden = torch.mul(silu_gate, gate_up[:, inter:])
    return silu_gate, hidden, torch.mul(hidden, weights) if weight_hidden else hidden


def _swiglu_backward(d_hidden: torch.Tensor, gate_up: torch.Tensor, silu_gate: torch.Tensor,
                     hidden: torch.Tensor, weights: Optional[torch.Tensor],
                     grad_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """The gradient [r, 2I] of the projection [gate | up], given `d_hidden` [r, I], the gradient of
    (weights *) silu(gate) * up; with `grad_weights` [r] also writes the gradient of the per-row weights
    (rowsum(d_hidden * hidden), `hidden` = silu(gate) * up unscaled). Overwrites `d_hidden`."""
    inter = d_hidden.shape[1]
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    if grad_weights is not None:
        torch.linalg.vecdot(d_hidden, hidden, out=grad_weights)
    if weights is not None:
        d_hidden.mul_(weights)
    d_gate_up = torch.empty_like(gate_up)
    d_gate, d_up = d_gate_up[:, :inter], d_gate_up[:, inter:]
    torch.mul(d_hidden, silu_gate, out=d_up)
    torch.mul(d_hidden, up, out=d_gate)
    torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
    return d_gate_up


def _split_swiglu_backward(d_hidden: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, silu_gate: torch.Tensor,
                           hidden: torch.Tensor, weights: Optional[torch.Tensor], grad_weights: Optional[torch.Tensor],
                           gate_up_weight: torch.Tensor, xs: torch.Tensor, grad_x: torch.Tensor,
                           grad_gate_up_weight: Optional[torch.Tensor], need_x: bool) -> None:
    """One expert with gate and up projected apart: from `d_hidden` (gradient of (weights *) silu(gate) * up)
    writes the input gradient into `grad_x` (when `need_x`), the weight gradient into `grad_gate_up_weight`
    [2I, d] (when given) and the routing-weight gradient into `grad_weights` (when given)."""
    inter = d_hidden.shape[1]
    if grad_weights is not None:
        torch.linalg.vecdot(d_hidden, hidden, out=grad_weights)
    if weights is not None:
        d_hidden.mul_(weights)
    d_up = torch.mul(d_hidden, silu_gate)
    d_gate = d_hidden.mul_(up)
    torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
    if need_x:
        torch.mm(d_gate, gate_up_weight[:inter], out=grad_x).addmm_(d_up, gate_up_weight[inter:])
    if grad_gate_up_weight is not None:
        torch.mm(d_gate.t(), xs, out=grad_gate_up_weight[:inter])
        torch.mm(d_up.t(), xs, out=grad_gate_up_weight[inter:])


def _scale_output_grad_(d_out: torch.Tensor, out: torch.Tensor, weights: torch.Tensor,
                        grad_weights: Optional[torch.Tensor]) -> None:
    """Routing weight on the output side: `d_out` (gradient of weights * out) becomes the gradient of `out`;
    `grad_weights` [r], when given, gets rowsum(d_out * out)."""
    if grad_weights is not None:
        torch.linalg.vecdot(d_out, out, out=grad_weights)
    d_out.mul_(weights)


class _SortedSwiGLUExperts(torch.autograd.Function):
    """The whole sorted expert computation of SiLU experts as ONE autograd node: gather the assigned tokens,
    gate_up GEMM, silu(gate) * up, routing weight, down GEMM, scatter-add back to [T, d], with a written-out
    backward (per expert and projection one GEMM for the input gradient and one for the weight gradient,
    written into one [E, ...] buffer; experts without tokens get 0). The values of the autograd graph of
    `_loop` / `_grouped` (bit for bit, except where gate and up are projected apart: float rounding).

    The rows are processed block by block (`_expert_blocks`): each block's tokens are gathered, computed and
    scattered back before the next block, so its working set stays in cache and every buffer is block-sized
    (no large allocations, which page-fault whenever the allocator has returned memory to the system).
    `grouped=False`: one expert per block, two mm per block. `grouped=True`: consecutive small experts share
    a block and one grouped_mm call per GEMM (fewer calls when there are many small experts).

    forward(tokens [T, d], gate_up_proj [E, 2I, d], down_proj [E, d, I], token_ids [n] (assignments sorted
    by expert), slot_weights [n], counts (E ints summing to n), grouped, weight_hidden (the routing weight
    scales the hidden [n, I], else the output [n, d])). Saves per block the gathered tokens, the projection,
    silu(gate), the hidden and the down GEMM's input (or, when the weight scales the output, the unscaled
    output)."""

    @staticmethod
    def forward(ctx, tokens, gate_up_proj, down_proj, token_ids, slot_weights, counts, grouped, weight_hidden):
        w = slot_weights[:, None].to(tokens.dtype)
        inter, hidden_size = down_proj.shape[2], down_proj.shape[1]
        blocks = _expert_blocks(counts, grouped, max(2 * inter, hidden_size))
        # rows of I elements that are not whole cache lines make elementwise work on the gate / up halves of
        # one [r, 2I] projection slow (measured 2x at I=172): one-expert blocks then project gate and up apart
        # (not in 16-bit dtypes, where the input gradient's two-GEMM sum would round once more)
        split = (inter * tokens.element_size()) % 64 != 0 and tokens.element_size() >= 4
        result = torch.zeros_like(tokens)
        saved = []
        for e0, e1, r0, r1 in blocks:
            ids, w_b = token_ids[r0:r1], w[r0:r1]
            offs = _block_offsets(counts, e0, e1, tokens.device)
            xs = tokens.index_select(0, ids)
            up = None
            if offs is None and split:
                gate_up = torch.mm(xs, gate_up_proj[e0, :inter].t())  # the gate only
                up = torch.mm(xs, gate_up_proj[e0, inter:].t())
                silu_gate = F.silu(gate_up)
                hidden = torch.mul(silu_gate, up)
                down_in = torch.mul(hidden, w_b) if weight_hidden else hidden
            else:
                if offs is None:
                    gate_up = torch.mm(xs, gate_up_proj[e0].t())
                else:
                    gate_up = F.grouped_mm(xs, gate_up_proj[e0:e1].transpose(-2, -1), offs=offs)
                silu_gate, hidden, down_in = _swiglu_forward(gate_up, w_b, weight_hidden)
            if offs is None:
                out = torch.mm(down_in, down_proj[e0].t())
            else:
                out = F.grouped_mm(down_in, down_proj[e0:e1].transpose(-2, -1), offs=offs)
            result.index_add_(0, ids, out if weight_hidden else out * w_b)
            saved.append((xs, gate_up, up, silu_gate, hidden, down_in if weight_hidden else out))
        ctx.save_for_backward(gate_up_proj, down_proj, token_ids, w, *(t for group in saved for t in group))
        ctx.meta = (counts, blocks, weight_hidden, tokens.shape[0], slot_weights.dtype)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_result):
        gate_up_proj, down_proj, token_ids, w, *flat = ctx.saved_tensors
        counts, blocks, weight_hidden, num_tokens, weights_dtype = ctx.meta
        need_x, need_gu, need_dn, _, need_w = ctx.needs_input_grad[:5]
        grad_w = w.new_empty(w.shape[0]) if need_w else None
        grad_tokens = grad_result.new_zeros(num_tokens, grad_result.shape[1]) if need_x else None
        # experts outside every block (no rows) keep a zero gradient; grouped_mm zeroes those inside one
        new = torch.zeros if any(c == 0 for c in counts) else torch.empty
        grad_dn = new(down_proj.shape, dtype=w.dtype, device=w.device) if need_dn else None
        grad_gu = new(gate_up_proj.shape, dtype=w.dtype, device=w.device) if need_gu else None
        for b, (e0, e1, r0, r1) in enumerate(blocks):
            xs, gate_up, up, silu_gate, hidden, keep = flat[6 * b:6 * b + 6]  # up: None unless split
            ids, w_b = token_ids[r0:r1], w[r0:r1]
            grad_w_b = None if grad_w is None else grad_w[r0:r1]
            offs = _block_offsets(counts, e0, e1, w.device)
            dy = grad_result.index_select(0, ids)
            if not weight_hidden:
                _scale_output_grad_(dy, keep, w_b, grad_w_b)
            down_in = keep if weight_hidden else hidden
            if offs is None:
                d_hidden = torch.mm(dy, down_proj[e0])
                if need_dn:
                    torch.mm(dy.t(), down_in, out=grad_dn[e0])
            else:
                d_hidden = F.grouped_mm(dy, down_proj[e0:e1], offs=offs)
                if need_dn:
                    grad_dn[e0:e1] = F.grouped_mm(dy.t(), down_in, offs=offs)
            if up is not None:
                _split_swiglu_backward(d_hidden, gate_up, up, silu_gate, hidden, w_b if weight_hidden else None,
                                       grad_w_b if weight_hidden else None, gate_up_proj[e0], xs, dy,
                                       grad_gu[e0] if need_gu else None, need_x)
                if need_x:
                    grad_tokens.index_add_(0, ids, dy)
                continue
            d_gate_up = _swiglu_backward(d_hidden, gate_up, silu_gate, hidden, w_b if weight_hidden else None,
                                         grad_w_b if weight_hidden else None)
            if offs is None:
                if need_x:
                    grad_tokens.index_add_(0, ids, torch.mm(d_gate_up, gate_up_proj[e0], out=dy))
                if need_gu:
                    torch.mm(d_gate_up.t(), xs, out=grad_gu[e0])
            else:
                if need_x:
                    grad_tokens.index_add_(0, ids, F.grouped_mm(d_gate_up, gate_up_proj[e0:e1], offs=offs))
                if need_gu:
                    grad_gu[e0:e1] = F.grouped_mm(d_gate_up.t(), xs, offs=offs)
        if grad_w is not None:
            grad_w = grad_w.to(weights_dtype)
        return grad_tokens, grad_gu, grad_dn, None, grad_w, None, None, None


def _block_offsets(counts: Sequence[int], e0: int, e1: int, device: torch.device) -> Optional[torch.Tensor]:
    """grouped_mm's int32 end offsets of experts e0..e1-1 inside their block; None for a one-expert block."""
    if e1 - e0 == 1:
        return None
    return torch.tensor(list(itertools.accumulate(counts[e0:e1])), dtype=torch.int32, device=device)


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
