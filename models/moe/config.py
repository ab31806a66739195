"""Configuration of one AdaMoE layer: `MoEConfig`, the allowed option values, and the capacity formula.

Plain PyTorch: no Lightning, no imports from `recipes/`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

NULL_GATE_INITS = ("copy", "random")
LB_NULL_MODES = ("average", "none")
LB_REDUCES = ("per_layer_sum", "concat")
# f_e of the load-balancing loss: "slots" = assignments / (T * k) (sums to 1), "tokens" = assignments / T (sums
# to k; Hugging Face Mixtral's `load_balancing_loss_func`, hence k times the "slots" value).
LB_FRACTIONS = ("slots", "tokens")
# How the selected true experts' weights are formed when null experts are present (`retrofit`):
# "true" renormalise over the selected true experts (AdaMoE's formula), "false" keep the raw softmax
# probabilities over all E_true + N_null experts, "auto" = "true" with null experts and the model's own rule
# (Mixtral: renormalise; Qwen2-MoE / OLMoE: their `norm_topk_prob`) without them.
RENORMALIZE_TRUE = ("auto", "true", "false")
# The load-balancing settings of AdaMoE's two released training runs (github.com/CengZihao/AdaMoE); "custom"
# takes lb_coef / lb_reduce / lb_null_mode / lb_fraction / z_coef as given. Neither release has a z-loss.
#   released_mixtral     exp_2 (LLaMA-Factory, Mixtral-8x7B): transformers' Mixtral loss over the router
#                        outputs of all layers concatenated, f_e = count_e / T, times E_total, every expert
#                        balanced on its own (its null-averaging line slices the top-k axis: a no-op), 1e-4.
#   released_llama_lora  exp_1 (MoLA, LLaMA + LoRA experts): per layer, f_e = count_e / (T * k) with the null
#                        experts' counts replaced by their mean, times E_total, summed over layers, 1e-3.
LB_PRESETS: Dict[str, Optional[Dict[str, Any]]] = {
    "released_mixtral": {"lb_coef": 1e-4, "lb_reduce": "concat", "lb_null_mode": "none", "lb_fraction": "tokens",
                         "z_coef": 0.0},
    "released_llama_lora": {"lb_coef": 1e-3, "lb_reduce": "per_layer_sum", "lb_null_mode": "average",
                            "lb_fraction": "slots", "z_coef": 0.0},
    "custom": None,
}
# How SwiGLUExperts computes its experts: "loop" (two F.linear per expert with tokens), "grouped_mm" (two
# torch.nn.functional.grouped_mm calls over all experts; falls back to the loop where it cannot run) or
# "auto" (see `resolve_expert_impl`).
EXPERT_IMPLS = ("auto", "loop", "grouped_mm")


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
    lb_fraction: str = "slots"  # LB_FRACTIONS
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
        check_choice("null_gate_init", self.null_gate_init, NULL_GATE_INITS)
        check_choice("lb_null_mode", self.lb_null_mode, LB_NULL_MODES)
        check_choice("lb_reduce", self.lb_reduce, LB_REDUCES)
        check_choice("lb_fraction", self.lb_fraction, LB_FRACTIONS)
        check_choice("expert_impl", self.expert_impl, EXPERT_IMPLS)
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"MoEConfig.capacity_factor must be > 0 or None, got {self.capacity_factor}")
        if self.router_jitter_noise < 0:
            raise ValueError(f"MoEConfig.router_jitter_noise must be >= 0, got {self.router_jitter_noise}")

    @property
    def num_total_experts(self) -> int:
        return self.num_experts + self.num_null_experts


def check_choice(field: str, value: str, choices: Sequence[str]) -> None:
    """Raise ValueError unless `value` is one of `choices` (the message names `MoEConfig.<field>`)."""
    if value not in choices:
        raise ValueError(f"MoEConfig.{field} must be one of {list(choices)}, got {value!r}")


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_true_experts: int) -> int:
    """Slots per true expert: C = ceil(capacity_factor * T * k / E_true)."""
    return int(math.ceil(capacity_factor * num_tokens * top_k / num_true_experts))


def colossalai_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int,
                        min_capacity: int = 4) -> int:
    """ColossalAI's MoE router capacity (OpenMoE's PyTorch code, `MoeRouter.get_capacity`): C = floor(k * cf * T /
    E), plus 1 when odd, and at least `min_capacity`."""
    capacity = int(math.floor(top_k * capacity_factor * num_tokens / num_experts))
    capacity += capacity % 2
    return max(capacity, int(min_capacity))
