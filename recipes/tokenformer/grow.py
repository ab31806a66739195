"""TokenFormer progressive scaling: grow a trained TokenFormer run and train on.

    python -m recipes train tokenformer_grow tokenformer_grow.from_run=<run_dir>      # 2x the source's tokens
    python -m recipes train tokenformer_grow tokenformer_grow.from_run=<run_dir> tokenformer_grow.init=released

1. The source run (recipe `tokenformer`, or an earlier `tokenformer_grow` run) is read from its run
   directory: its config.yaml says which TokenFormer it trained, its newest checkpoint (last.ckpt, or any
   kind `recipes.engine.export` can consolidate) holds the weights. A run of another architecture, or a
   checkpoint whose tensors do not match the sizes its run claims, is refused with a message that says
   what the checkpoint holds.
2. `grow_parameter_tokens` appends parameter tokens (old rows copied bitwise) with `init` / `tau`, up to
   `qkv_tokens` / `ffn_tokens`, or `grow_factor` times the source's counts where those are 0 (the default).
3. The validation loss on the first `eval_batches` validation batches is measured just before and just
   after growth (logged at step 0 as grow/val_loss_before, grow/val_loss_after, and in summary.json).
4. Standard training continues with a FRESH optimizer and LR schedule (optim.*, trainer.max_steps of this
   run): growth creates new Parameters, so nothing of the source run's optimizer could be reused anyway.

The `model.*` section of this recipe is not used for the architecture: the model is the source run's,
grown. `from` would be the natural key name but is a Python keyword, hence `from_run`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from recipes.engine.errors import ConfigError
from recipes.engine.module import CausalLMModule, lm_loss

SOURCE_RECIPES = ("tokenformer", "tokenformer_grow")
CONFIG_KEY = "tokenformer_config"  # this recipe's checkpoints carry the grown model's config under it


# The tau each init takes when tokenformer_grow.tau is not set: zero_key keeps the pre-growth tau (the growth
# is then function-preserving); random and released (the official growth) set tau = sqrt(new n).
DEFAULT_TAU = {"zero_key": "frozen", "random": "auto", "released": "auto"}


@dataclass
class TokenFormerGrowConfig:
    from_run: Optional[str] = None  # run directory of a finished tokenformer / tokenformer_grow run
    qkv_tokens: int = 0  # new token count of the Q, K, V and output Pattentions (0 = grow_factor x the source's)
    ffn_tokens: int = 0  # new token count of the FFN Pattention (0 = grow_factor x the source's)
    grow_factor: float = 2.0  # the growth of a count left at 0 (rounded to a whole number of tokens)
    init: str = "zero_key"  # zero_key (zero keys, random values) | random | released (the official growth)
    tau: Optional[str] = None  # frozen (keep the pre-growth tau) | auto (sqrt(new n)); None: the init's own
    eval_batches: int = 8  # validation batches for the loss just before / just after growth
    seed: Optional[int] = None  # seed of the new tokens' random init (default: run.seed)


def resolved_tau(g) -> str:
    """The tau of a growth: tokenformer_grow.tau, or the init's own (DEFAULT_TAU) when it is not set."""
    return g.tau if g.tau is not None else DEFAULT_TAU[g.init]


def check_config(cfg) -> None:
    import math

    from models.tokenformer import NEW_TOKEN_INITS, TAU_MODES

    g = cfg.tokenformer_grow
    if g.init not in NEW_TOKEN_INITS:
        raise ConfigError(f"tokenformer_grow.init must be one of {', '.join(NEW_TOKEN_INITS)}; got '{g.init}' "
                          "(zero keys AND zero values would leave the new tokens untrainable).")
    if g.tau is not None and g.tau not in TAU_MODES:
        raise ConfigError(f"tokenformer_grow.tau must be one of {', '.join(TAU_MODES)} or null; got '{g.tau}'.")
    if g.init == "released" and resolved_tau(g) != "auto":
        raise ConfigError("tokenformer_grow.init=released is the official growth, which sets tau = sqrt(new n): "
                          f"leave tokenformer_grow.tau unset or auto (got '{g.tau}'), or use init=random.")
    if g.eval_batches < 1:
        raise ConfigError(f"tokenformer_grow.eval_batches must be >= 1, got {g.eval_batches}.")
    if g.qkv_tokens < 0 or g.ffn_tokens < 0:
        raise ConfigError(f"tokenformer_grow.qkv_tokens / ffn_tokens must be >= 0, got {g.qkv_tokens}, {g.ffn_tokens}.")
    if not (math.isfinite(g.grow_factor) and g.grow_factor >= 1.0):
        raise ConfigError(f"tokenformer_grow.grow_factor must be a finite number >= 1, got {g.grow_factor}.")


def growth_targets(g, old) -> Dict[str, int]:
    """The grown counts: tokenformer_grow.qkv_tokens / ffn_tokens, or grow_factor x the source's where 0."""
    return {name: int(getattr(g, name)) or int(round(g.grow_factor * getattr(old, name)))
            for name in ("qkv_tokens", "ffn_tokens")}


# ------------------------------------------------------------------------------------------ the source run


def _describe(config) -> str:
    return (f"num_layers={config.num_layers}, hidden_size={config.hidden_size}, qkv_tokens={config.qkv_tokens}, "
            f"ffn_tokens={config.ffn_tokens}, vocab_size={config.vocab_size}")


def sizes_held(state: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """The TokenFormer sizes a state dict holds, read off its tensor shapes."""
    layers = {int(k.split(".")[1]) for k in state if k.startswith("layers.")}
    if "embed_tokens.weight" not in state or "layers.0.query.key_tokens" not in state:
        sample = ", ".join(list(state)[:4])
        raise ConfigError(f"the checkpoint holds no TokenFormer weights (its tensors are named like: {sample}).")
    vocab, hidden = state["embed_tokens.weight"].shape
    return {"num_layers": len(layers), "hidden_size": int(hidden),
            "qkv_tokens": int(state["layers.0.query.key_tokens"].shape[0]),
            "ffn_tokens": int(state["layers.0.ffn.key_tokens"].shape[0]), "vocab_size": int(vocab)}


def read_checkpoint(ckpt: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(model state dict without the `model.` prefix, Lightning's other entries such as tokens_seen)."""
    from recipes.engine.checkpointing import (
        checkpoint_kind,
        checkpoint_state_file,
        load_checkpoint_file,
        verify_checkpoint_safe,
    )

    verify_checkpoint_safe(ckpt)
    from recipes.engine.export import consolidated_state_dict, model_state_dict

    if checkpoint_kind(ckpt) == "file":
        full = load_checkpoint_file(ckpt)
        return model_state_dict(full["state_dict"]), {k: v for k, v in full.items() if k != "state_dict"}
    weights = model_state_dict(consolidated_state_dict(ckpt))
    state_file = checkpoint_state_file(ckpt)
    meta = load_checkpoint_file(state_file) if state_file else {}
    return weights, {k: v for k, v in meta.items() if k in ("tokens_seen", "global_step", CONFIG_KEY)}


def load_source_run(run_dir: str | Path):
    """The TokenFormer of a finished run, with its newest checkpoint's weights.

    Returns (model, info) with info = {recipe, checkpoint, step, tokens_seen}. Raises ConfigError for a
    run of another recipe or architecture, and for a checkpoint whose sizes are not the run's."""
    from models.factory import ModelSpec
    from models.tokenformer import TokenFormerConfig, TokenFormerForCausalLM, config_from_spec
    from recipes.engine.checkpointing import newest_checkpoint
    from recipes.engine.runs import load_run_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"tokenformer_grow.from_run={run_dir} is not a directory (give a tokenformer run dir).")
    saved = load_run_config(run_dir)
    recipe = saved.get("run", {}).get("name")
    arch = saved.get("model", {}).get("arch")
    from recipes.engine.recipe import REGISTRY, load_all

    load_all()
    method = REGISTRY[recipe].method if recipe in REGISTRY else None
    if (recipe not in SOURCE_RECIPES and method != "tokenformer") or arch != "tokenformer":
        raise ConfigError(
            f"tokenformer_grow.from_run={run_dir} is a run of recipe '{recipe}' with model.arch={arch} "
            f"(size {saved.get('model', {}).get('size')}); only TokenFormer runs (recipes "
            f"{', '.join(SOURCE_RECIPES)} and the paper-scale TokenFormer recipes) can be grown."
        )
    found = newest_checkpoint(run_dir)
    if found is None:
        raise ConfigError(f"tokenformer_grow.from_run={run_dir} has no readable checkpoint (checkpoints/last.ckpt).")
    ckpt, step = found
    state, meta = read_checkpoint(ckpt)
    held = sizes_held(state)

    # What the run says it trained: a grown run stores its config in its checkpoints; a `tokenformer` run
    # is described by its model section (the vocabulary comes from its tokenizer, i.e. the checkpoint).
    if CONFIG_KEY in meta:
        expected = TokenFormerConfig.from_dict(meta[CONFIG_KEY])
        claim = "its checkpoint's stored config"
    else:
        m = saved["model"]
        spec = ModelSpec(arch="tokenformer", size=m.get("size"), vocab_size=held["vocab_size"],
                         max_seq_len=int(saved["data"]["block_size"]), overrides=dict(m.get("overrides") or {}))
        try:
            expected = config_from_spec(spec)
        except ValueError as e:
            raise ConfigError(f"tokenformer_grow.from_run={run_dir}: its model section is not a valid "
                              f"TokenFormer ({e})") from None
        claim = f"its config (model.size={m.get('size')}, model.overrides={dict(m.get('overrides') or {})})"
    claimed = {k: getattr(expected, k) for k in held}
    if held != claimed:
        raise ConfigError(
            f"checkpoint {ckpt} holds a TokenFormer with {', '.join(f'{k}={v}' for k, v in held.items())}, "
            f"but {claim} describes one with {_describe(expected)}: the checkpoint belongs to another size."
        )
    model = TokenFormerForCausalLM(expected)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"checkpoint {ckpt} does not load into the TokenFormer its run describes "
                          f"({_describe(expected)}): {e}") from None
    info = {"recipe": recipe, "checkpoint": str(ckpt), "step": int(step),
            "tokens_seen": int(meta.get("tokens_seen", 0))}
    return model, info


# --------------------------------------------------------------------------------------------- growth


@torch.no_grad()
def validation_loss(model: torch.nn.Module, dm, max_batches: int) -> float:
    """Mean next-token loss over the first `max_batches` validation batches (token-weighted, as the
    module's validation), in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(dm.val_dataloader()):
            if i >= max_batches:
                break
            logits = model(input_ids=batch["input_ids"]).logits
            per_token = lm_loss(logits, batch["labels"], reduction="none")
            mask = batch["labels"][:, 1:] != -100
            total += float((per_token * mask).sum())
            count += int(mask.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError("tokenformer_grow: the validation set is empty; cannot measure the loss around growth.")
    return total / count


def grow_source_run(cfg, dm):
    """Load the source run, measure, grow, measure. Returns (grown model, growth record)."""
    from models.tokenformer import grow_parameter_tokens

    g = cfg.tokenformer_grow
    if not g.from_run:
        raise ConfigError("tokenformer_grow.from_run is not set: give the run directory of a finished "
                          "`tokenformer` run, e.g. tokenformer_grow.from_run=runs/tokenformer/<run_id>.")
    model, source = load_source_run(g.from_run)
    old = model.config
    if old.vocab_size != dm.vocab_size:
        raise ConfigError(
            f"the source run's TokenFormer has {old.vocab_size} embedding rows but this run's tokenizer has "
            f"{dm.vocab_size} tokens: use the source run's data.tokenizer and data.vocab_size."
        )
    if cfg.data.block_size > old.max_seq_len:
        raise ConfigError(f"data.block_size={cfg.data.block_size} exceeds the source model's max_seq_len="
                          f"{old.max_seq_len}.")
    targets = growth_targets(g, old)
    for name, target in targets.items():
        if target < getattr(old, name):
            raise ConfigError(f"tokenformer_grow.{name}={target} is smaller than the {getattr(old, name)} the "
                              f"source checkpoint holds ({_describe(old)}); growth only appends tokens.")
    if targets == {"qkv_tokens": old.qkv_tokens, "ffn_tokens": old.ffn_tokens}:
        raise ConfigError(f"tokenformer_grow.qkv_tokens / ffn_tokens equal the source's sizes ({_describe(old)}): "
                          f"nothing to grow (grow_factor={g.grow_factor}); set a larger count or grow_factor.")
    params_before = model.num_parameters()
    loss_before = validation_loss(model, dm, g.eval_batches)
    seed = cfg.run.seed if g.seed is None else g.seed
    tau = resolved_tau(g)
    grow_parameter_tokens(model, targets, init=g.init, tau=tau, generator=torch.Generator().manual_seed(int(seed)))
    loss_after = validation_loss(model, dm, g.eval_batches)
    record = {
        "grow/val_loss_before": loss_before, "grow/val_loss_after": loss_after,
        "grow/from_qkv_tokens": old.qkv_tokens, "grow/from_ffn_tokens": old.ffn_tokens,
        "grow/to_qkv_tokens": targets["qkv_tokens"], "grow/to_ffn_tokens": targets["ffn_tokens"],
        "grow/params_before": params_before, "grow/params_after": model.num_parameters(),
        "grow/source_step": source["step"], "grow/source_tokens_seen": source["tokens_seen"],
        "grow/source_checkpoint": source["checkpoint"], "grow/init": g.init, "grow/tau": tau,
    }
    return model, record


class GrownTokenFormerModule(CausalLMModule):
    """The shared LM module plus the growth record: logged at step 0, merged into summary.json, and the
    grown TokenFormerConfig stored in every checkpoint (so a grown run can itself be grown)."""

    def __init__(self, *args, growth: Dict[str, Any], **kwargs):
        super().__init__(*args, **kwargs)
        self.growth = dict(growth)

    @classmethod
    def from_config(cls, cfg, model, datamodule, model_factory=None, **kwargs):
        """The freshly built `model.*` model is replaced by the source run's TokenFormer, grown."""
        del model  # the architecture is the source run's
        grown, record = grow_source_run(cfg, datamodule)
        print(f"tokenformer_grow: {record['grow/from_qkv_tokens']}/{record['grow/from_ffn_tokens']} -> "
              f"{record['grow/to_qkv_tokens']}/{record['grow/to_ffn_tokens']} parameter tokens (qkv/ffn), "
              f"val loss {record['grow/val_loss_before']:.4f} before, {record['grow/val_loss_after']:.4f} after "
              f"(init={record['grow/init']}, tau={record['grow/tau']})")
        return super().from_config(cfg, grown, datamodule, model_factory=model_factory, growth=record, **kwargs)

    def on_train_start(self) -> None:
        if self.global_step == 0:  # not again on resume
            scalars = {k: float(v) for k, v in self.growth.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for logger in self.loggers:
                logger.log_metrics(scalars, step=0)

    def summary_metrics(self) -> Dict[str, Any]:
        out = dict(self.growth)
        # Tokens of the whole history (source run + this run), for loss-vs-tokens comparisons.
        out["grow/total_tokens_seen"] = self.growth["grow/source_tokens_seen"] + self.tokens_seen
        return out

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CONFIG_KEY] = self.model.config.to_dict()
