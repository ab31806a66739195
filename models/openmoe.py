"""A tiny OpenMoE-style decoder (Xue et al., ICML 2024).

OpenMoE is an ST-MoE style decoder: a dense Llama-like transformer in which every `moe_every`-th layer's MLP
is a sparse top-2 mixture of experts with a per-expert capacity (factor 1.25 in training, 2.0 in evaluation),
trained with a load-balancing loss (0.01) and the router z-loss (1e-3).

Here the dense decoder is transformers' `LlamaForCausalLM`; the MLP of layers i with (i + 1) % moe_every == 0
is replaced by an `OpenMoEBlock`, a `models.moe.SparseMoEBlock` (no null experts) whose capacity factor
follows the module's mode: `train_capacity_factor` under `model.train()`, `eval_capacity_factor` under
`model.eval()`. Its top-2 weights are renormalised to sum 1 by default (`norm_topk_prob`); ColossalAI's and
flaxformer's routers keep the raw softmax probabilities (`norm_topk_prob: false`).

Which assignments a full expert drops (`drop_order`, `DROP_ORDERS`), each within a routing group
(`capacity_group`: "sequence" = each sequence of S tokens, "batch" = all T = B*S tokens of the forward; null =
the order's own group, in brackets); n = tokens of the group, k = top_k, E = experts:
  "colossalai" (batch; the default): ColossalAI's `Top2Router`, the PyTorch code OpenMoE released and analysed
      its checkpoints with: every top-1 choice of the group (row by row, position order) before any top-2
      choice; C = floor(k * cf * n / E), rounded up to even, at least 4 (`models.moe.colossalai_capacity`).
  "slot_major" (sequence): the priority of T5X / flaxformer's `TokensChooseMaskedRouter` (OpenMoE's TPU
      training code): all top-1 choices of the group before any top-2, in position order;
      C = ceil(cf * n * k / E). (flaxformer itself uses C = max(round(cf * n / E), 4), no k, over groups of
      4096-8192 tokens; not reproduced: here the capacity is the same for both per-group orders.)
  "token_major" (sequence): position by position, both slots of a token before the next token;
      C = ceil(cf * n * k / E) (this repository's earlier rule).
Every expert keeps the first C assignments of its queue in that order. A dropped assignment contributes
nothing (its weight is 0, the other slot is not renormalised); the residual connection carries the token on.

On import the architecture registers with `models.factory.register_architecture("openmoe", ...)`:
`model.arch=openmoe model.size=tiny` builds one; `save_pretrained(dir)` writes `model.safetensors` +
`config.json` ("model_type": "openmoe") and `model.pretrained=<dir>` loads it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.factory import register_architecture
from models.moe import MoEConfig, SparseMoEBlock, colossalai_capacity, expert_capacity, moe_blocks

MODEL_TYPE = "openmoe"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CAPACITY_GROUPS = ("sequence", "batch")
DROP_ORDERS = ("colossalai", "slot_major", "token_major")
# The routing group each drop order uses when `capacity_group` is not given.
DEFAULT_CAPACITY_GROUP = {"colossalai": "batch", "slot_major": "sequence", "token_major": "sequence"}

OPENMOE_SIZES: Dict[str, Dict[str, Any]] = {
    # CPU / test size: 4 layers, MoE in layers 1 and 3 (8 experts, top-2).
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, num_experts=8, top_k=2, moe_every=2, expert_intermediate_size=172),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, num_experts=16, top_k=2, moe_every=2, expert_intermediate_size=344),
}


@dataclass
class OpenMoEConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 344  # dense MLP layers
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    initializer_range: float = 0.02
    # MoE
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 2  # layer i is MoE when (i + 1) % moe_every == 0
    expert_intermediate_size: int = 172
    train_capacity_factor: Optional[float] = 1.25  # None: no capacity limit
    eval_capacity_factor: Optional[float] = 2.0
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum 1 (False: raw softmax, as the released code)
    drop_order: str = "colossalai"  # colossalai | slot_major | token_major (see the module docstring)
    capacity_group: Optional[str] = None  # sequence | batch | None (the drop order's own, DEFAULT_CAPACITY_GROUP)
    lb_coef: float = 0.01
    z_coef: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_experts", "top_k", "moe_every",
                     "expert_intermediate_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"OpenMoEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"OpenMoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.moe_every > self.num_hidden_layers:
            raise ValueError(f"OpenMoEConfig.moe_every={self.moe_every} > num_hidden_layers="
                             f"{self.num_hidden_layers}: the model would have no MoE layer")
        for name in ("train_capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"OpenMoEConfig.{name} must be > 0 or None, got {value}")
        if self.drop_order not in DROP_ORDERS:
            raise ValueError(f"OpenMoEConfig.drop_order must be one of {list(DROP_ORDERS)}, got {self.drop_order!r}")
        if self.capacity_group is not None and self.capacity_group not in CAPACITY_GROUPS:
            raise ValueError(f"OpenMoEConfig.capacity_group must be one of {list(CAPACITY_GROUPS)} or None, "
                             f"got {self.capacity_group!r}")

    @property
    def moe_layers(self) -> List[int]:
        return [i for i in range(self.num_hidden_layers) if (i + 1) % self.moe_every == 0]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "OpenMoEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown OpenMoEConfig fields {unknown}; known: {sorted(known)}")
        if "capacity_group" in data and "drop_order" not in data:
            # saved before drop orders existed: the one order there was
            data = {**data, "drop_order": "token_major"}
        return cls(**data)


def group_capacity(drop_order: str, capacity_factor: float, group_size: int, top_k: int, num_experts: int) -> int:
    """Assignments each expert accepts per routing group of `group_size` tokens under `drop_order`."""
    if drop_order == "colossalai":
        return colossalai_capacity(capacity_factor, group_size, top_k, num_experts)
    return expert_capacity(capacity_factor, group_size, top_k, num_experts)


def group_capacity_drops(topk_indices: torch.Tensor, group_size: int, num_experts: int, capacity_factor: float,
                         drop_order: str = "token_major") -> torch.Tensor:
    """[T, k] bool drops with routing groups of `group_size` consecutive tokens (one sequence, or the whole
    batch when group_size = T): per group and expert the first `group_capacity(...)` assignments in the drop
    order's queue are kept, the rest dropped. "token_major": queue by (position, slot); "slot_major" and
    "colossalai": by (slot, position), i.e. every top-1 choice of the group before any top-2."""
    if drop_order not in DROP_ORDERS:
        raise ValueError(f"drop_order must be one of {list(DROP_ORDERS)}, got {drop_order!r}")
    num_tokens, k = topk_indices.shape
    if num_tokens % group_size:
        raise ValueError(f"{num_tokens} tokens do not split into groups of {group_size}")
    groups = num_tokens // group_size
    capacity = group_capacity(drop_order, capacity_factor, group_size, k, num_experts)
    grouped = topk_indices.reshape(groups, group_size, k)
    slot_first = drop_order != "token_major"
    queue = (grouped.transpose(1, 2) if slot_first else grouped).reshape(groups, group_size * k)
    one_hot = F.one_hot(queue, num_experts)  # [G, n*k, E]
    # rank of each assignment among the earlier ones to the same expert in its group's queue (0-based)
    rank = (one_hot.cumsum(dim=1) - 1).gather(2, queue.unsqueeze(-1)).squeeze(-1)
    dropped = rank >= capacity
    if slot_first:
        return dropped.reshape(groups, k, group_size).transpose(1, 2).reshape(num_tokens, k)
    return dropped.reshape(num_tokens, k)


def sequence_capacity_drops(topk_indices: torch.Tensor, group_size: int, num_experts: int,
                            capacity_factor: float) -> torch.Tensor:
    """The "token_major" drops (position, then slot) with groups of `group_size` tokens; kept for callers of the
    earlier name."""
    return group_capacity_drops(topk_indices, group_size, num_experts, capacity_factor, "token_major")


class OpenMoEBlock(SparseMoEBlock):
    """SparseMoEBlock whose capacity factor depends on the mode (training vs evaluation), whose capacity is per
    sequence ("sequence" groups) or per forward ("batch"), and whose queue order is `drop_order`."""

    def __init__(self, config: MoEConfig, train_capacity_factor: Optional[float],
                 eval_capacity_factor: Optional[float], capacity_group: Optional[str] = None,
                 drop_order: str = "colossalai") -> None:
        super().__init__(config)
        if drop_order not in DROP_ORDERS:
            raise ValueError(f"drop_order must be one of {list(DROP_ORDERS)}, got {drop_order!r}")
        capacity_group = capacity_group or DEFAULT_CAPACITY_GROUP[drop_order]
        if capacity_group not in CAPACITY_GROUPS:
            raise ValueError(f"capacity_group must be one of {list(CAPACITY_GROUPS)}, got {capacity_group!r}")
        self.train_capacity_factor = train_capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.capacity_group = capacity_group
        self.drop_order = drop_order
        self._group_size: Optional[int] = None

    @property
    def active_capacity_factor(self) -> Optional[float]:
        return self.train_capacity_factor if self.training else self.eval_capacity_factor

    def capacity_drops(self, topk_indices: torch.Tensor) -> Optional[torch.Tensor]:
        cf = self.active_capacity_factor
        if cf is None:
            return None
        num_tokens = topk_indices.shape[0]
        group = self._group_size if self.capacity_group == "sequence" and self._group_size else num_tokens
        return group_capacity_drops(topk_indices, group, self.num_true_experts, cf, self.drop_order)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.capacity_factor = self.active_capacity_factor  # read by anything inspecting the block
        self._group_size = int(hidden_states.shape[1]) if hidden_states.dim() == 3 else None
        try:
            return super().forward(hidden_states)
        finally:
            self._group_size = None


class OpenMoEForCausalLM(nn.Module):
    """LlamaForCausalLM with OpenMoEBlocks as the MLP of every `moe_every`-th layer.

    Same calling convention as the Hugging Face model it wraps: `model(input_ids=..., attention_mask=...,
    labels=...)` returns the HF output (`.logits`, `.loss`)."""

    def __init__(self, config: OpenMoEConfig) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.openmoe_config = config
        llama = LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
            max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
            initializer_range=config.initializer_range,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        )
        self.lm = LlamaForCausalLM(llama)
        moe_config = MoEConfig(hidden_size=config.hidden_size, intermediate_size=config.expert_intermediate_size,
                               num_experts=config.num_experts, num_null_experts=0, top_k=config.top_k,
                               split_null_gate=True, norm_topk_prob=config.norm_topk_prob, lb_coef=config.lb_coef,
                               z_coef=config.z_coef, init_std=config.initializer_range)
        for i in config.moe_layers:
            self.lm.model.layers[i].mlp = OpenMoEBlock(moe_config, config.train_capacity_factor,
                                                       config.eval_capacity_factor, config.capacity_group,
                                                       config.drop_order)
        # What models.factory / recipes read from `model.config` (sizes, experts, k).
        self.config = llama
        self.config.num_experts = config.num_experts
        self.config.num_experts_per_tok = config.top_k
        self.config.model_type_openmoe = MODEL_TYPE

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lm.get_input_embeddings()

    def moe_blocks(self) -> List[OpenMoEBlock]:
        return [b for b in moe_blocks(self) if isinstance(b, OpenMoEBlock)]

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """`model.safetensors` (tied head saved once, as the embedding) + `config.json`."""
        from safetensors.torch import save_file

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        if self.openmoe_config.tie_word_embeddings:
            state.pop("lm.lm_head.weight", None)
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        payload = {"model_type": MODEL_TYPE, **self.openmoe_config.to_dict()}
        (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: torch.dtype = torch.float32
                        ) -> "OpenMoEForCausalLM":
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ValueError(f"{path} not found: expected a directory written by OpenMoE save_pretrained")
        payload = json.loads(config_path.read_text())
        model_type = payload.pop("model_type", None)
        if model_type != MODEL_TYPE:
            raise ValueError(f"{config_path} has model_type={model_type!r}, expected {MODEL_TYPE!r}")
        model = cls(OpenMoEConfig.from_dict(payload))
        state = load_file(str(weights_path))
        if model.openmoe_config.tie_word_embeddings:
            state["lm.lm_head.weight"] = state["lm.model.embed_tokens.weight"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights_path} does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model.to(dtype=dtype)


# ---- registration with models.factory ---------------------------------------------------------------


def config_from_spec(spec: Any) -> OpenMoEConfig:
    if spec.size not in OPENMOE_SIZES:
        raise ValueError(f"Unknown size '{spec.size}' for model.arch=openmoe; known: {', '.join(OPENMOE_SIZES)}.")
    values = dict(OPENMOE_SIZES[spec.size])
    values.update(vocab_size=spec.vocab_size, max_position_embeddings=max(spec.max_seq_len, 64))
    if spec.eos_token_id is not None:
        values.update(eos_token_id=spec.eos_token_id, bos_token_id=spec.eos_token_id)
    if spec.pad_token_id is not None:
        values.update(pad_token_id=spec.pad_token_id)
    values.update(spec.overrides or {})
    return OpenMoEConfig.from_dict(values)


def build_from_spec(spec: Any) -> OpenMoEForCausalLM:
    return OpenMoEForCausalLM(config_from_spec(spec))


def load_from_directory(path: str) -> OpenMoEForCausalLM:
    return OpenMoEForCausalLM.from_pretrained(path, dtype=torch.float32)


register_architecture(MODEL_TYPE, build_from_spec, OPENMOE_SIZES, load=load_from_directory)
