"""TokenFormer: every linear projection replaced by attention over learnable parameter tokens.

Wang et al., 2024. Plain PyTorch, one readable file:

* `Pattention`: Theta(X K^T) V with n learnable key/value parameter tokens.
* `TokenFormerConfig` / `TokenFormerForCausalLM`: a decoder-only language model built from Pattention
  layers with a Hugging Face-like interface (`forward(...).loss/.logits`, `save_pretrained`,
  `from_pretrained`).
* `grow_parameter_tokens`: progressive scaling by appending parameter tokens: `init="released"` is the
  official code's growth (random new tokens, tau = sqrt(new n)); `init="zero_key"` with tau frozen at its
  pre-growth value is exactly function-preserving.
* On import the architecture registers with `models.factory.register_architecture("tokenformer", ...)`, so
  `model.arch=tokenformer model.size=<name>` builds one in any recipe and `model.pretrained=<dir>` loads a
  saved one (config.json "model_type": "tokenformer").

No maintained library implements Pattention or TokenFormer growth, so this is written by hand.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.factory import register_architecture

NormKind = Literal["l2_norm_gelu", "gelu_l2_norm", "softmax"]
TauMode = Literal["auto", "frozen"]
NewTokenInit = Literal["random", "zero_key", "released"]

NORM_KINDS: tuple[str, ...] = ("l2_norm_gelu", "gelu_l2_norm", "softmax")
TAU_MODES: tuple[str, ...] = ("auto", "frozen")
# "released" is the official code's growth: "random" new tokens with tau = sqrt(new n) ("auto"), nothing else.
NEW_TOKEN_INITS: tuple[str, ...] = ("random", "zero_key", "released")

MODEL_TYPE = "tokenformer"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; expected one of {', '.join(choices)}")


# --------------------------------------------------------------------------------------------------
# Pattention
# --------------------------------------------------------------------------------------------------


class Pattention(nn.Module):
    """Token-parameter attention: `Theta(X K^T) V`, K: n x d_in key tokens, V: n x d_out value tokens.

    Normalisations Theta (A = X K^T, one row of n scores per input token):

    * ``"l2_norm_gelu"`` (paper default): ``GeLU(A / sqrt(sum_j A_j^2 + eps) * tau)``.
    * ``"gelu_l2_norm"``: ``GeLU(A) / sqrt(sum_j GeLU(A_j)^2 + eps) * tau``.
    * ``"softmax"``: ``softmax(A) * tau^2``, i.e. ``softmax(A) * n`` (the official code's
      exp / L1-norm * n); tau^2 so that a frozen tau also freezes this scale.

    tau is ``sqrt(n)`` for the current n (``tau="auto"``) or ``sqrt(n_frozen)`` with ``n_frozen``
    stored in the integer buffer ``tau_token_count`` (``tau="frozen"``). An integer count rather than a
    float buffer keeps tau exact when the module is cast to bf16, and it is saved with the weights.
    The norm is computed in at least fp32 (fp64 stays fp64) with a small ``eps`` inside the square
    root: the official code has no eps and divides by zero on an all-zero score row.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        n_tokens: int,
        norm: NormKind = "l2_norm_gelu",
        tau: TauMode = "auto",
        eps: float = 1e-6,
        key_init_std: float = 0.02,
        value_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("d_out", d_out), ("n_tokens", n_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Pattention {name} must be a positive int, got {value!r}")
        _check_choice("norm", norm, NORM_KINDS)
        _check_choice("tau", tau, TAU_MODES)
        if eps < 0:
            raise ValueError(f"Pattention eps must be >= 0, got {eps}")
        self.d_in = d_in
        self.d_out = d_out
        self.norm = norm
        self.tau_mode: str = tau
        self.eps = float(eps)
        self.key_init_std = float(key_init_std)
        self.value_init_std = float(value_init_std)
        self.key_tokens = nn.Parameter(torch.empty(n_tokens, d_in))
        self.value_tokens = nn.Parameter(torch.empty(n_tokens, d_out))
        self.register_buffer("tau_token_count", torch.tensor(n_tokens, dtype=torch.int64))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.key_tokens, mean=0.0, std=self.key_init_std)
        nn.init.normal_(self.value_tokens, mean=0.0, std=self.value_init_std)

    @property
    def n_tokens(self) -> int:
        return self.key_tokens.shape[0]

    @property
    def tau(self) -> float:
        """The scale used in the next forward pass."""
        count = int(self.tau_token_count) if self.tau_mode == "frozen" else self.n_tokens
        return math.sqrt(count)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, n_tokens={self.n_tokens}, norm={self.norm}, "
            f"tau={self.tau_mode}({self.tau:.4g})"
        )

    def token_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Theta(X K^T): one weight per (input token, parameter token), in x's dtype."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"Pattention expects inputs with last dim {self.d_in}, got {tuple(x.shape)}")
        scores = x @ self.key_tokens.t()
        # fp32 at least: the sum of n squares overflows / loses precision in bf16 and fp16.
        compute_dtype = torch.promote_types(scores.dtype, torch.float32)
        a = scores.to(compute_dtype)
        tau = self.tau
        if self.norm == "l2_norm_gelu":
            a = a * torch.rsqrt(a.square().sum(dim=-1, keepdim=True) + self.eps) * tau
            weights = F.gelu(a)
        elif self.norm == "gelu_l2_norm":
            g = F.gelu(a)
            weights = g * torch.rsqrt(g.square().sum(dim=-1, keepdim=True) + self.eps) * tau
        else:  # softmax
            weights = torch.softmax(a, dim=-1) * (tau * tau)
        return weights.to(scores.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.token_weights(x) @ self.value_tokens

    @torch.no_grad()
    def grow(
        self,
        new_n_tokens: int,
        init: NewTokenInit = "random",
        tau: TauMode = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        """Append parameter tokens in place; see `grow_parameter_tokens` for the semantics."""
        _check_choice("tau", tau, TAU_MODES)
        _check_new_token_init(init, tau)
        old_n = self.n_tokens
        if new_n_tokens < old_n:
            raise ValueError(f"cannot shrink a Pattention from {old_n} to {new_n_tokens} parameter tokens")
        # The tau in effect before growth: what "frozen" must keep.
        effective_count = int(self.tau_token_count) if self.tau_mode == "frozen" else old_n
        added = new_n_tokens - old_n
        if added > 0:
            keys, values = self.key_tokens, self.value_tokens
            new_keys = keys.new_zeros(added, self.d_in)
            if init in ("random", "released"):  # the keys first, then the values, from one generator
                new_keys.normal_(0.0, self.key_init_std, generator=generator)
            new_values = values.new_empty(added, self.d_out).normal_(0.0, self.value_init_std, generator=generator)
            if not new_keys.any() and not new_values.any():
                # Zero keys give GeLU(0) = 0 weights (zero value gradients) and zero values give zero
                # key gradients: such tokens never train.
                raise ValueError("new parameter tokens with zero keys AND zero values would never train")
            # torch.cat copies the old rows bitwise into [:old_n].
            self.key_tokens = nn.Parameter(torch.cat([keys.detach(), new_keys]), requires_grad=keys.requires_grad)
            self.value_tokens = nn.Parameter(
                torch.cat([values.detach(), new_values]), requires_grad=values.requires_grad
            )
        self.tau_mode = tau
        self.tau_token_count.fill_(effective_count if tau == "frozen" else new_n_tokens)


def _check_new_token_init(init: str, tau: str) -> None:
    if init in ("zero", "zeros", "zero_key_value"):
        raise ValueError(
            f"init={init!r} would make new tokens untrainable: zero keys give GeLU(0) = 0 weights, so the "
            "values get no gradient, and zero values give the keys no gradient. Use 'zero_key' (zero keys, "
            "random values: function-preserving with tau='frozen'), 'random' or 'released'."
        )
    _check_choice("init", init, NEW_TOKEN_INITS)
    if init == "released" and tau != "auto":
        raise ValueError(f"init='released' is the official growth, which sets tau = sqrt(new n) (tau='auto'); got "
                         f"tau={tau!r} (use init='random' for random tokens with another tau)")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenFormerConfig:
    """TokenFormer sizes. `qkv_tokens` is n for the Q, K, V and output Pattentions; `ffn_tokens` is the
    single FFN Pattention's token count (4n in the paper). Named sizes: `TokenFormerConfig.from_name`."""

    vocab_size: int = 50257
    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    qkv_tokens: int = 768
    ffn_tokens: int = 3072
    rotary_fraction: float = 0.25
    max_seq_len: int = 2048
    norm: str = "l2_norm_gelu"
    eps: float = 1e-6  # inside the Pattention L2 norm
    tie_embeddings: bool = True
    tau: str = "auto"
    rotary_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02  # keys and token embeddings
    # The final LayerNorm's bias. True: torch LayerNorm with weight and bias, as the official code
    # (final_norm: layernorm); False: weight only (this repository's first form). A checkpoint saved
    # without the bias loads into a model with one as a zero bias, which is the same function.
    final_norm_bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "num_layers", "hidden_size", "num_heads", "qkv_tokens", "ffn_tokens",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TokenFormerConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"TokenFormerConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if not 0.0 <= self.rotary_fraction <= 1.0:
            raise ValueError(f"TokenFormerConfig.rotary_fraction must be in [0, 1], got {self.rotary_fraction}")
        _check_choice("TokenFormerConfig.norm", self.norm, NORM_KINDS)
        _check_choice("TokenFormerConfig.tau", self.tau, TAU_MODES)
        if self.eps < 0 or self.layer_norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("TokenFormerConfig eps must be >= 0, layer_norm_eps and init_std > 0")
        if not isinstance(self.final_norm_bias, bool):
            raise ValueError(f"TokenFormerConfig.final_norm_bias must be true or false, got {self.final_norm_bias!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dims(self) -> int:
        """Rotated dims per head: the fraction rounded down to an even number (rotation acts on pairs)."""
        return int(self.head_dim * self.rotary_fraction) // 2 * 2

    @property
    def value_init_std(self) -> float:
        # Paper / official code ("wang init"): values ~ N(0, 2 / (L * sqrt(d))).
        return 2.0 / (self.num_layers * math.sqrt(self.hidden_size))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> TokenFormerConfig:
        if name not in TOKENFORMER_SIZES:
            raise ValueError(f"unknown TokenFormer size {name!r}; known sizes: {', '.join(TOKENFORMER_SIZES)}")
        return cls(**{**TOKENFORMER_SIZES[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TokenFormerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TokenFormerConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**values)


# Paper sizes: layers / d / heads / n for Q,K,V,proj / FFN tokens; GPT-NeoX vocabulary
# and 2048 context as in the paper. "tiny" and "small" are CPU test sizes.
TOKENFORMER_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=64, num_layers=2, hidden_size=32, num_heads=2, qkv_tokens=16, ffn_tokens=64,
                 max_seq_len=64),
    "small": dict(vocab_size=512, num_layers=4, hidden_size=128, num_heads=4, qkv_tokens=64, ffn_tokens=256,
                  max_seq_len=256),
    "150m": dict(num_layers=12, hidden_size=768, num_heads=12, qkv_tokens=768, ffn_tokens=3072),
    "450m": dict(num_layers=24, hidden_size=1024, num_heads=16, qkv_tokens=1024, ffn_tokens=4096),
    "900m": dict(num_layers=32, hidden_size=1280, num_heads=16, qkv_tokens=1280, ffn_tokens=5120),
    "1_5b": dict(num_layers=40, hidden_size=1536, num_heads=16, qkv_tokens=1536, ffn_tokens=6144),
}


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def fill_missing_final_norm_bias(state: dict[str, torch.Tensor], config: TokenFormerConfig) -> dict[str, torch.Tensor]:
    """`state` with a zero `final_norm.bias` added when `config` has one and the state (saved weight-only,
    as this repository did before `final_norm_bias`) does not: LayerNorm with a zero bias is the same
    function as without one. Other states are returned unchanged."""
    if config.final_norm_bias and "final_norm.weight" in state and "final_norm.bias" not in state:
        state = {**state, "final_norm.bias": torch.zeros_like(state["final_norm.weight"])}
    return state


def _zero_bias_when_missing(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook of the final LayerNorm: a missing bias (old checkpoint) becomes zeros."""
    if getattr(module, "bias", None) is not None and prefix + "weight" in state_dict \
            and prefix + "bias" not in state_dict:
        state_dict[prefix + "bias"] = torch.zeros_like(state_dict[prefix + "weight"])


@dataclass
class CausalLMOutput:
    """What `TokenFormerForCausalLM.forward` returns (mirrors the Hugging Face output's fields)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rotary_cos_sin(
    seq_len: int, rotary_dims: int, base: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (seq_len, rotary_dims), for positions 0..seq_len-1 (angles in at least fp32).

    Computed once per forward pass and shared by every layer."""
    angle_dtype = torch.promote_types(dtype, torch.float32)
    inv_freq = base ** (-torch.arange(0, rotary_dims, 2, device=device, dtype=angle_dtype) / rotary_dims)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=angle_dtype), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (GPT-NeoX half-split layout) on the first `cos.shape[-1]` dims of each head.

    x: (batch, heads, seq, head_dim); cos/sin from `rotary_cos_sin`.
    """
    rotary_dims = cos.shape[-1]
    if rotary_dims == 0:
        return x
    rotated, passed = x[..., :rotary_dims], x[..., rotary_dims:]
    rotated = rotated * cos + _rotate_half(rotated) * sin
    return torch.cat([rotated, passed], dim=-1)


class TokenFormerBlock(nn.Module):
    """Pre-norm block: LN -> Pattention Q/K/V -> causal attention -> Pattention out -> residual;
    LN -> FFN Pattention -> residual. Both LayerNorms are non-parametric."""

    def __init__(self, config: TokenFormerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size

        def pattention(n_tokens: int) -> Pattention:
            return Pattention(d, d, n_tokens, norm=config.norm, tau=config.tau, eps=config.eps,  # type: ignore[arg-type]
                              key_init_std=config.init_std, value_init_std=config.value_init_std)

        self.attn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps, elementwise_affine=False)
        self.query = pattention(config.qkv_tokens)
        self.key = pattention(config.qkv_tokens)
        self.value = pattention(config.qkv_tokens)
        self.output = pattention(config.qkv_tokens)
        self.ffn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps, elementwise_affine=False)
        self.ffn = pattention(config.ffn_tokens)

    def pattentions(self) -> dict[str, Pattention]:
        return {"query": self.query, "key": self.key, "value": self.value, "output": self.output, "ffn": self.ffn}

    def forward(
        self, hidden: torch.Tensor, attn_mask: torch.Tensor | None, rotary: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        batch, seq_len, d = hidden.shape
        heads, head_dim = self.config.num_heads, self.config.head_dim

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq_len, heads, head_dim).transpose(1, 2)

        normed = self.attn_norm(hidden)
        q, k, v = (split_heads(p(normed)) for p in (self.query, self.key, self.value))
        q = apply_partial_rotary(q, *rotary)
        k = apply_partial_rotary(k, *rotary)
        if attn_mask is None:
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        attended = attended.transpose(1, 2).reshape(batch, seq_len, d)
        hidden = hidden + self.output(attended)
        return hidden + self.ffn(self.ffn_norm(hidden))


class TokenFormerForCausalLM(nn.Module):
    """Decoder-only TokenFormer LM with a Hugging Face-like interface.

    Token embedding -> `num_layers` TokenFormer blocks -> parametric final LayerNorm (weight and bias as
    the official code; weight only with `final_norm_bias=False`) -> head tied to the embedding (a separate
    bias-free head if `tie_embeddings=False`). The final LayerNorm's bias is the model's only bias.
    """

    def __init__(self, config: TokenFormerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=config.init_std)
        self.layers = nn.ModuleList(TokenFormerBlock(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps, bias=config.final_norm_bias)
        # Checkpoints saved before the bias existed (or with final_norm_bias=False) load with a zero bias.
        self.final_norm.register_load_state_dict_pre_hook(_zero_bias_when_missing)
        self.lm_head: nn.Linear | None = None
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=config.init_std)

    # ---- forward -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids: (batch, seq) token ids. attention_mask: (batch, seq), 1 = real token, 0 = padding
        (keys only; padded positions still get logits). labels: (batch, seq); position t is predicted
        from tokens <= t-1 (shift done here), -100 is ignored."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={self.config.max_seq_len}")
        hidden = self.embed_tokens(input_ids)
        attn_mask = None if attention_mask is None else self._attention_bias_mask(attention_mask, input_ids)
        rotary = rotary_cos_sin(seq_len, self.config.rotary_dims, self.config.rotary_base, hidden.device,
                                hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, attn_mask, rotary)
        hidden = self.final_norm(hidden)
        head_weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, head_weight)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels shape {tuple(labels.shape)} does not match input_ids {tuple(input_ids.shape)}"
                )
            shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shifted_labels = labels[:, 1:].reshape(-1)
            # Cross-entropy in at least fp32 whatever the model dtype.
            loss = F.cross_entropy(
                shifted_logits.to(torch.promote_types(logits.dtype, torch.float32)), shifted_labels,
                ignore_index=-100,
            )
        return CausalLMOutput(logits=logits, loss=loss)

    @staticmethod
    def _attention_bias_mask(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                f"{tuple(input_ids.shape)}"
            )
        seq_len = input_ids.shape[1]
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=input_ids.device).tril()
        # Every query may also see itself, so a padded query never has an all-masked row (NaN).
        self_only = torch.eye(seq_len, dtype=torch.bool, device=input_ids.device)
        keys_kept = attention_mask.bool()[:, None, None, :]
        return causal & (keys_kept | self_only)  # (batch, 1, seq, seq)

    def get_input_embeddings(self) -> nn.Embedding:
        """As in Hugging Face models (models.factory reads the vocabulary size and FLOPs through it)."""
        return self.embed_tokens

    # ---- sizes -------------------------------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())  # a tied head is counted once
        if exclude_embeddings:
            total -= self.embed_tokens.weight.numel()
        return total

    def pattentions(self) -> dict[str, Pattention]:
        """Every Pattention by its module name (e.g. 'layers.0.query')."""
        return {name: module for name, module in self.named_modules() if isinstance(module, Pattention)}

    # ---- checkpoints -------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write `model.safetensors` and `config.json` (with "model_type": "tokenformer")."""
        from safetensors.torch import save_file

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        dtype = str(self.embed_tokens.weight.dtype).removeprefix("torch.")
        payload = {"model_type": MODEL_TYPE, "dtype": dtype, **self.config.to_dict()}
        (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, pretrained_directory: str | os.PathLike[str], dtype: torch.dtype | None = None
    ) -> TokenFormerForCausalLM:
        """Load a directory written by `save_pretrained` (safetensors only). The model takes the stored
        dtype unless `dtype` is given. Weights whose names or shapes differ from config.json raise a
        ValueError saying what the checkpoint holds and what the config expects."""
        from safetensors.torch import load_file

        directory = Path(pretrained_directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ValueError(f"{path} not found: expected a directory written by save_pretrained")
        payload = json.loads(config_path.read_text())
        model_type = payload.pop("model_type", None)
        if model_type != MODEL_TYPE:
            raise ValueError(f"{config_path} has model_type={model_type!r}, expected {MODEL_TYPE!r}")
        stored_dtype = payload.pop("dtype", "float32")
        config = TokenFormerConfig.from_dict(payload)
        state = fill_missing_final_norm_bias(load_file(str(weights_path)), config)

        model = cls(config)
        expected = model.state_dict()
        problems = []
        for name in sorted(set(expected) | set(state)):
            if name not in state:
                problems.append(f"missing {name} (config expects shape {tuple(expected[name].shape)})")
            elif name not in expected:
                problems.append(f"unexpected {name} with shape {tuple(state[name].shape)}")
            elif state[name].shape != expected[name].shape:
                problems.append(
                    f"{name}: checkpoint holds shape {tuple(state[name].shape)}, "
                    f"config expects {tuple(expected[name].shape)}"
                )
        if problems:
            shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
            raise ValueError(
                f"checkpoint {weights_path} does not match its config "
                f"(qkv_tokens={config.qkv_tokens}, ffn_tokens={config.ffn_tokens}, "
                f"hidden_size={config.hidden_size}, num_layers={config.num_layers}, "
                f"vocab_size={config.vocab_size}):\n  {shown}"
            )
        target_dtype = dtype if dtype is not None else getattr(torch, stored_dtype)
        model.to(dtype=target_dtype)
        model.load_state_dict(state, strict=True)
        # The tau mode is not a tensor: restore it from the config (the frozen count came with the weights).
        for pattention in model.pattentions().values():
            pattention.tau_mode = config.tau
        return model


# --------------------------------------------------------------------------------------------------
# Progressive scaling
# --------------------------------------------------------------------------------------------------

_GROWABLE_FIELDS = ("qkv_tokens", "ffn_tokens")


def grow_parameter_tokens(
    model: TokenFormerForCausalLM,
    new_counts: Mapping[str, int] | TokenFormerConfig,
    init: NewTokenInit = "random",
    tau: TauMode = "auto",
    generator: torch.Generator | None = None,
) -> TokenFormerForCausalLM:
    """Grow every Pattention's parameter tokens in place and return the model (hidden size unchanged).

    new_counts: ``{"qkv_tokens": n_new, "ffn_tokens": m_new}`` (either key may be left out: unchanged)
    or a `TokenFormerConfig` that differs from the model's only in those counts and `tau`.

    The old key/value tokens are copied bitwise into rows ``[:n_old]``. New rows:

    * ``init="random"``: keys ~ N(0, init_std), values ~ N(0, 2/(L sqrt(d))), the model's own init (the
      function changes). Drawn from `generator` per Pattention: all new keys, then all new values.
    * ``init="released"``: the official code's growth (its incremental-scaling configs build the larger
      model with its usual init and copy the trained tokens into the first rows): ``"random"`` new tokens
      with ``tau="auto"``, tau = sqrt(n_new); any other tau is refused.
    * ``init="zero_key"``: zero keys, random values. With a GeLU-based norm and ``tau="frozen"`` this is
      exactly function-preserving: zero scores leave the L2 norm unchanged and GeLU(0) = 0. The new keys get
      gradients at once (through the random values); the new values from the step after.

    ``tau="auto"`` sets tau = sqrt(n_new), which rescales every old pre-activation by sqrt(n_new/n_old), so
    the function changes even with zero keys; ``tau="frozen"`` keeps the pre-growth tau.

    Refused: shrinking, and zero keys with zero values (``init="zero"``), which never receive a gradient.

    The key/value tensors are NEW `nn.Parameter` objects: an optimizer (and any scheduler, EMA or DDP/FSDP
    wrapper) built before growth still points at the old ones and must be rebuilt.
    """
    _check_choice("tau", tau, TAU_MODES)
    _check_new_token_init(init, tau)
    config = model.config
    if isinstance(new_counts, TokenFormerConfig):
        differing = [
            f.name for f in dataclasses.fields(TokenFormerConfig)
            if f.name not in (*_GROWABLE_FIELDS, "tau") and getattr(new_counts, f.name) != getattr(config, f.name)
        ]
        if differing:
            raise ValueError(
                f"growth only changes {', '.join(_GROWABLE_FIELDS)}; the target config also differs in {differing}"
            )
        targets = {name: getattr(new_counts, name) for name in _GROWABLE_FIELDS}
    else:
        unknown = sorted(set(new_counts) - set(_GROWABLE_FIELDS))
        if unknown:
            raise ValueError(f"unknown token counts {unknown}; expected keys among {list(_GROWABLE_FIELDS)}")
        targets = {name: int(new_counts.get(name, getattr(config, name))) for name in _GROWABLE_FIELDS}
    for name, target in targets.items():
        current = getattr(config, name)
        if target < current:
            raise ValueError(f"cannot shrink {name} from {current} to {target}; growth only appends tokens")

    for layer in model.layers:
        for role, pattention in layer.pattentions().items():
            target = targets["ffn_tokens"] if role == "ffn" else targets["qkv_tokens"]
            pattention.grow(target, init=init, tau=tau, generator=generator)

    new_config = dataclasses.replace(config, tau=tau, **targets)
    model.config = new_config
    for layer in model.layers:
        layer.config = new_config
    return model


# --------------------------------------------------------------------------------------------------
# Registration with models.factory: `model.arch=tokenformer model.size=<name>` and `model.pretrained=<dir>`
# --------------------------------------------------------------------------------------------------


def config_from_spec(spec: Any) -> TokenFormerConfig:
    """The TokenFormerConfig of a `models.factory.ModelSpec`: the named size, the tokenizer's vocabulary,
    a context of at least the data's block size, then `model.overrides` (any TokenFormerConfig field)."""
    if spec.size not in TOKENFORMER_SIZES:
        raise ValueError(
            f"Unknown size '{spec.size}' for model.arch=tokenformer; known: {', '.join(TOKENFORMER_SIZES)}."
        )
    fields = dict(TOKENFORMER_SIZES[spec.size])
    fields["vocab_size"] = spec.vocab_size
    fields["max_seq_len"] = max(spec.max_seq_len, fields.get("max_seq_len", spec.max_seq_len))
    fields.update(spec.overrides or {})
    return TokenFormerConfig.from_dict(fields)


def build_from_spec(spec: Any) -> TokenFormerForCausalLM:
    return TokenFormerForCausalLM(config_from_spec(spec))


def load_from_directory(path: str) -> TokenFormerForCausalLM:
    # fp32 like the factory's transformers path: training precision is the Trainer's business.
    return TokenFormerForCausalLM.from_pretrained(path, dtype=torch.float32)


register_architecture(MODEL_TYPE, build_from_spec, TOKENFORMER_SIZES, load=load_from_directory)
