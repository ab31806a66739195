"""AdaMoE: sparse mixture-of-experts layers with null experts.

A null expert has no parameters and outputs zero. Adding N of them to a top-k router lets a token spend
some of its k slots on "nothing", so the number of TRUE experts a token uses adapts per token.

Modules (everything public is re-exported here, so `from models.moe import X` works for all of them)
- `config`      `MoEConfig`, typed configuration of one MoE layer (also carries the loss settings); the
                allowed option values; `LB_PRESETS` (the load-balancing settings of AdaMoE's two released
                runs); `expert_capacity`, `colossalai_capacity`.
- `router`      `NullExpertRouter`: logits over E_true + N_null experts, top-k, weights renormalised over
                true experts.
- `experts`     `SwiGLUExperts`: E expert MLPs stored as 3-D tensors in the Hugging Face Mixtral layout;
                computed by a per-expert loop or by `torch.nn.functional.grouped_mm` (`expert_impl`, see
                `resolve_expert_impl`).
- `block`       `SparseMoEBlock`: router + sorted token dispatch + optional capacity; records
                `last_routing`. `moe_blocks`, `recorded_routings`.
- `losses`      `load_balancing_loss`, `router_z_loss`, `collect_moe_aux_losses`.
- `metrics`     `moe_routing_metrics`.
- `hf_retrofit` `retrofit`, `load_retrofitted`, `restore_retrofit`, `trainable_module_names` for Hugging
                Face Mixtral / Qwen2-MoE / OLMoE; `resolve_renormalize_true` (how retrofitted blocks weight
                the selected true experts). (Not named `retrofit`: that name is the function.)

Routing record contract (shared with models/routing_probe): after every forward a block sets
`self.last_routing = {"router_logits": [T, E_total], "topk_indices": [T, k], "topk_weights": [T, k],
"dropped": [T, k] bool or None, "num_true_experts": int, "num_null_experts": int, "top_k": int}`, with
T = batch*seq flattened, indices >= num_true_experts meaning null experts, and weight 0 for null and
dropped slots. `router_logits` keeps its autograd graph so the auxiliary losses can be computed from it.

Plain PyTorch: no Lightning, no imports from `recipes/`. `transformers` is imported lazily, only by the
retrofit helpers.
"""
from __future__ import annotations

from models.moe.block import SparseMoEBlock, moe_blocks, recorded_routings
from models.moe.config import (
                               EXPERT_IMPLS,
                               LB_FRACTIONS,
                               LB_NULL_MODES,
                               LB_PRESETS,
                               LB_REDUCES,
                               NULL_GATE_INITS,
                               RENORMALIZE_TRUE,
                               MoEConfig,
                               check_choice,
                               colossalai_capacity,
                               expert_capacity,
)
from models.moe.experts import (
                               GROUPED_MM_AUTO_MIN_EXPERTS_CPU,
                               SwiGLUExperts,
                               expert_forward,
                               grouped_mm_unsupported_reason,
                               resolve_expert_impl,
)
from models.moe.hf_retrofit import (
                               CONFIG_KEY,
                               checkpoint_null_gate_tensors,
                               hf_sparse_block_classes,
                               load_retrofitted,
                               model_norm_topk_prob,
                               null_gates_by_layer,
                               resolve_renormalize_true,
                               restore_retrofit,
                               retrofit,
                               saved_retrofit_settings,
                               trainable_module_names,
)
from models.moe.losses import collect_moe_aux_losses, flat_mask, load_balancing_loss, router_z_loss
from models.moe.metrics import moe_routing_metrics
from models.moe.router import NullExpertRouter, renormalise_over_true_experts, softmax_dtype

__all__ = [
    # config
    "NULL_GATE_INITS", "LB_NULL_MODES", "LB_REDUCES", "LB_FRACTIONS", "LB_PRESETS", "RENORMALIZE_TRUE",
    "EXPERT_IMPLS", "MoEConfig", "check_choice", "expert_capacity", "colossalai_capacity",
    # router
    "softmax_dtype", "renormalise_over_true_experts", "NullExpertRouter",
    # experts
    "GROUPED_MM_AUTO_MIN_EXPERTS_CPU", "grouped_mm_unsupported_reason", "resolve_expert_impl", "SwiGLUExperts",
    "expert_forward",
    # block
    "SparseMoEBlock", "moe_blocks", "recorded_routings",
    # losses and metrics
    "flat_mask", "load_balancing_loss", "router_z_loss", "collect_moe_aux_losses", "moe_routing_metrics",
    # Hugging Face retrofit
    "CONFIG_KEY", "hf_sparse_block_classes", "retrofit", "null_gates_by_layer", "checkpoint_null_gate_tensors",
    "load_retrofitted", "restore_retrofit", "trainable_module_names", "model_norm_topk_prob",
    "resolve_renormalize_true", "saved_retrofit_settings",
]
