"""TokenFormer benchmarks: training throughput against a dense Llama of equal parameter count (eager and
torch.compile), and the progressive-scaling experiment (small run -> grown run vs the grown size from scratch)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from bench import register

ROOT = Path(__file__).resolve().parents[2]  # the repository root
SLOW = {"tokenformer_growth"}

VOCAB, BLOCK, BATCH = 4096, 128, 16  # the recipes' defaults (base.yaml)


def _tokenformer_small():
    from models.tokenformer import TokenFormerConfig, TokenFormerForCausalLM

    return TokenFormerForCausalLM(TokenFormerConfig.from_name("small", vocab_size=VOCAB, max_seq_len=BLOCK))


def _llama_like(target_params: int):
    """A Llama with the TokenFormer's d / layers / heads whose MLP width makes the parameter count equal
    (as close as an integer width allows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d, layers, heads = 128, 4, 4
    fixed = VOCAB * d + layers * (4 * d * d + 2 * d) + d  # tied embedding, attention, RMSNorm weights
    width = round((target_params - fixed) / (3 * d * layers))
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=width, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=BLOCK,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def _train_step_fn(model: torch.nn.Module, forward: Callable, ids: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = forward(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _interleaved_tokens_per_s(
    steps: Dict[str, Callable[[], None]], rounds: int = 4, per_round: int = 4
) -> Dict[str, float]:
    """Median tokens/s of each step function, timed in alternating blocks (the machine is shared)."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                step()
            times[name].append((time.perf_counter() - t0) / per_round)
    return {name: BATCH * BLOCK / statistics.median(ts) for name, ts in times.items()}


@register("tokenformer_throughput", "Training throughput (forward + backward + AdamW, batch 16 x 128) of TokenFormer "
          "`small` (d=128, 4 layers, n=64, FFN 256 tokens) vs a dense Llama with the same d/layers/heads and an MLP "
          "width that equalises the parameter count; eager and torch.compile (inductor, CPU), timed side by side.")
def tokenformer_throughput() -> dict:
    torch.manual_seed(0)
    tokenformer = _tokenformer_small()
    n_tf = sum(p.numel() for p in tokenformer.parameters())
    llama = _llama_like(n_tf)
    n_llama = sum(p.numel() for p in llama.parameters())
    ids = torch.randint(0, VOCAB, (BATCH, BLOCK), generator=torch.Generator().manual_seed(0))
    eager = {"tokenformer": _train_step_fn(tokenformer, tokenformer, ids), "llama": _train_step_fn(llama, llama, ids)}
    for step in eager.values():  # warm-up (allocator, first-call costs)
        step()
    tps = _interleaved_tokens_per_s(eager)
    out = {"params_tokenformer": n_tf, "params_llama": n_llama,
           "llama_intermediate_size": llama.config.intermediate_size,
           "eager_tokens_per_s_tokenformer": round(tps["tokenformer"], 1),
           "eager_tokens_per_s_llama": round(tps["llama"], 1),
           "eager_ratio_tokenformer_over_llama": round(tps["tokenformer"] / tps["llama"], 3),
           "threads": torch.get_num_threads()}
    try:
        compiled, compile_s = {}, {}
        for name, model in (("tokenformer", tokenformer), ("llama", llama)):
            fn = _train_step_fn(model, torch.compile(model), ids)
            t0 = time.perf_counter()
            fn()
            fn()  # the first backward compiles too
            compile_s[name] = time.perf_counter() - t0
            compiled[name] = fn
        ctps = _interleaved_tokens_per_s(compiled)
        out.update({"compiled_tokens_per_s_tokenformer": round(ctps["tokenformer"], 1),
                    "compiled_tokens_per_s_llama": round(ctps["llama"], 1),
                    "compiled_ratio_tokenformer_over_llama": round(ctps["tokenformer"] / ctps["llama"], 3),
                    "compile_speedup_tokenformer": round(ctps["tokenformer"] / tps["tokenformer"], 3),
                    "compile_speedup_llama": round(ctps["llama"] / tps["llama"], 3),
                    "compile_warmup_s_tokenformer": round(compile_s["tokenformer"], 1),
                    "compile_warmup_s_llama": round(compile_s["llama"], 1)})
    except Exception as e:  # inductor needs a C++ compiler; report rather than fail the eager figures
        out["compiled_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


# ------------------------------------------------------------------------------------- growth experiment

# Sized for a shared, busy 2-core CPU (~15 CPU-minutes in all): a 1024-token BPE vocabulary (so that the
# tied head does not dwarf the Pattention layers), batch 8 x 64 tokens, validation on the first 4 validation
# batches (4 x 32 x 64 = 8k tokens, the same ones in every run) every 20 steps.
GROWTH_VOCAB, GROWTH_BLOCK, GROWTH_BATCH, GROWTH_VAL_BATCHES = 1024, 64, 8, 4
SCRATCH_STEPS, SOURCE_STEPS = 200, 100
GROWN_STEPS = SCRATCH_STEPS - SOURCE_STEPS  # source + grown = the scratch run's steps and tokens
SMALL_COUNTS, BIG_COUNTS = (32, 128), (64, 256)  # (qkv_tokens, ffn_tokens), d=128 and 4 layers throughout
# zero_key + tau frozen (function-preserving) always; random + tau auto (the released code) with
# TOKENFORMER_GROWTH_VARIANTS=all (one more run).
GROWTH_VARIANTS = (("zero_key", "frozen"), ("random", "auto"))
GROWTH_COMMON = ["trainer.progress_bar=false", "logging.wandb=disabled", "trainer.val_check_interval=20",
                 f"trainer.limit_val_batches={GROWTH_VAL_BATCHES}", "checkpoint.every_n_steps=100000",
                 f"data.vocab_size={GROWTH_VOCAB}", f"data.block_size={GROWTH_BLOCK}",
                 f"data.batch_size={GROWTH_BATCH}", "model.size=small"]
FIGURE = ROOT / "docs" / "figures" / "tokenformer_growth.png"


def _train(root: Path, recipe: str, run_id: str, args: List[str]) -> Path:
    run_dir = root / recipe / run_id
    if (run_dir / "summary.json").exists():
        return run_dir  # complete: skip
    seed = os.environ.get("TOKENFORMER_GROWTH_SEED")  # a replicate: other init and data order
    cmd = [sys.executable, "-m", "recipes", "train", recipe, f"run.root={root}", f"run.run_id={run_id}",
           *GROWTH_COMMON, *args, *([f"run.seed={seed}"] if seed else [])]
    print("[tokenformer_growth] " + " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return run_dir


def _val_curve(run_dir: Path, token_offset: int = 0) -> List[tuple]:
    from recipes.engine.logs import read_metrics

    rows = read_metrics(run_dir / "metrics.csv")
    return [(token_offset + int(r["train/tokens_seen"]), r["val/loss"]) for r in rows
            if r.get("val/loss") is not None and r.get("train/tokens_seen") is not None]


def _first_reaching(curve: List[tuple], target: float) -> Optional[int]:
    """Tokens at which a (tokens, loss) curve first reaches `target`, linearly interpolated between
    validation points; None if it never does."""
    if curve and curve[0][1] <= target:
        return curve[0][0]
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return int(round(t0 + (l0 - target) / (l0 - l1) * (t1 - t0)))
    return None


def _loss_at(curve: List[tuple], tokens: int) -> Optional[float]:
    """A (tokens, loss) curve's loss at `tokens`, linearly interpolated; None outside the curve."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if t0 <= tokens <= t1:
            return round(l0 + (l1 - l0) * (tokens - t0) / (t1 - t0), 4)
    return None


def _growth_params(qkv: int, ffn: int) -> int:
    from models.tokenformer import TokenFormerConfig, TokenFormerForCausalLM

    config = TokenFormerConfig.from_name("small", vocab_size=GROWTH_VOCAB, qkv_tokens=qkv, ffn_tokens=ffn)
    return TokenFormerForCausalLM(config).num_parameters()


def training_flops_per_token(qkv: int, ffn: int, vocab: int = VOCAB, block: int = BLOCK) -> float:
    """6 x (Pattention parameters + tied LM head, used as a d x V matmul) + attention 12 L d s.

    A Pattention costs 2 n d_in + 2 n d_out FLOPs per token forward (X K^T, then Theta @ V), i.e. 2 per
    parameter like a linear layer; the head is counted because at this size it is as costly as the layers."""
    from models.tokenformer import TOKENFORMER_SIZES

    c = TOKENFORMER_SIZES["small"]
    d, layers = c["hidden_size"], c["num_layers"]
    pattention_params = layers * (4 * qkv + ffn) * 2 * d
    return 6.0 * (pattention_params + vocab * d) + 12.0 * layers * d * block


@register("tokenformer_growth", "Progressive scaling on the embedded corpus (TokenFormer `small`: d=128, 4 layers, "
          f"vocabulary {GROWTH_VOCAB}, batch {GROWTH_BATCH}x{GROWTH_BLOCK}): "
          f"{SMALL_COUNTS[0]}/{SMALL_COUNTS[1]} parameter tokens (qkv/ffn) trained "
          f"{SOURCE_STEPS} steps, grown to {BIG_COUNTS[0]}/{BIG_COUNTS[1]} (zero_key + tau frozen; with "
          "TOKENFORMER_GROWTH_VARIANTS=all also random + tau auto as in the released code) "
          f"and trained {GROWN_STEPS} steps with a fresh optimizer/schedule, vs "
          f"{BIG_COUNTS[0]}/{BIG_COUNTS[1]} from scratch for {SCRATCH_STEPS} steps (same total tokens). Slow "
          "(~15 CPU-minutes); runs under $TOKENFORMER_EVIDENCE_DIR (default runs/tokenformer_evidence), plot "
          "docs/figures/tokenformer_growth.png.")
def tokenformer_growth() -> dict:
    root = Path(os.environ.get("TOKENFORMER_EVIDENCE_DIR", ROOT / "runs" / "tokenformer_evidence")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    big = [f"model.overrides.qkv_tokens={BIG_COUNTS[0]}", f"model.overrides.ffn_tokens={BIG_COUNTS[1]}"]
    small = [f"model.overrides.qkv_tokens={SMALL_COUNTS[0]}", f"model.overrides.ffn_tokens={SMALL_COUNTS[1]}"]
    # TOKENFORMER_GROWTH_REPORT_ONLY=1: no training, report the runs found (a scratch run cut short is
    # reported as far as it got, flagged by scratch_complete=False).
    report_only = os.environ.get("TOKENFORMER_GROWTH_REPORT_ONLY") == "1"
    train_run = (lambda root, recipe, run_id, args: root / recipe / run_id) if report_only else _train
    source = train_run(root, "tokenformer", "source_small", [f"trainer.max_steps={SOURCE_STEPS}", *small])
    scratch = train_run(root, "tokenformer", "scratch_big", [f"trainer.max_steps={SCRATCH_STEPS}", *big])
    variants = GROWTH_VARIANTS if os.environ.get("TOKENFORMER_GROWTH_VARIANTS") == "all" else GROWTH_VARIANTS[:1]
    grown = {}
    for init, tau in variants:
        grown[(init, tau)] = train_run(root, "tokenformer_grow", f"grown_{init}_{tau}", [
            f"trainer.max_steps={GROWN_STEPS}", f"tokenformer_grow.from_run={source}",
            f"tokenformer_grow.qkv_tokens={BIG_COUNTS[0]}", f"tokenformer_grow.ffn_tokens={BIG_COUNTS[1]}",
            f"tokenformer_grow.init={init}", f"tokenformer_grow.tau={tau}",
            f"tokenformer_grow.eval_batches={GROWTH_VAL_BATCHES}"])

    source_tokens = json.loads((source / "summary.json").read_text())["tokens_seen"]
    scratch_curve = _val_curve(scratch)
    source_curve = _val_curve(source)
    target = scratch_curve[-1][1]
    f_small = training_flops_per_token(*SMALL_COUNTS, vocab=GROWTH_VOCAB, block=GROWTH_BLOCK)
    f_big = training_flops_per_token(*BIG_COUNTS, vocab=GROWTH_VOCAB, block=GROWTH_BLOCK)
    scratch_flops = scratch_curve[-1][0] * f_big
    figures: Dict[str, object] = {
        "params_small": _growth_params(*SMALL_COUNTS), "params_big": _growth_params(*BIG_COUNTS),
        "scratch_complete": (scratch / "summary.json").exists(),
        "scratch_steps": scratch_curve[-1][0] // (GROWTH_BATCH * GROWTH_BLOCK),
        "scratch_final_val_loss": round(target, 4), "scratch_tokens": scratch_curve[-1][0],
        "scratch_flops": scratch_flops,
        "source_final_val_loss": round(source_curve[-1][1], 4), "source_tokens": source_tokens,
        "train_flops_per_token_small": f_small, "train_flops_per_token_big": f_big}
    curves = {}
    for (init, tau), run_dir in grown.items():
        s = json.loads((run_dir / "summary.json").read_text())
        curve = [(source_tokens, s["grow/val_loss_after"])] + _val_curve(run_dir, source_tokens)
        curves[(init, tau)] = curve
        tag = f"{init}_{tau}"
        reach = _first_reaching(curve, target)
        reach_flops = None if reach is None else source_tokens * f_small + (reach - source_tokens) * f_big
        figures.update({
            f"{tag}_val_loss_before_growth": round(s["grow/val_loss_before"], 4),
            f"{tag}_val_loss_after_growth": round(s["grow/val_loss_after"], 4),
            f"{tag}_final_val_loss": round(curve[-1][1], 4),
            f"{tag}_final_minus_scratch_final": round(curve[-1][1] - target, 4),
            f"{tag}_tokens": curve[-1][0],
            f"scratch_val_loss_at_{tag}_final_tokens": _loss_at(scratch_curve, curve[-1][0]),
            f"{tag}_total_flops": source_tokens * f_small + (curve[-1][0] - source_tokens) * f_big,
            f"{tag}_tokens_to_reach_scratch_final": reach if reach is not None else "not reached",
            f"{tag}_token_fraction_of_scratch": None if reach is None else round(reach / scratch_curve[-1][0], 3),
            f"{tag}_flops_fraction_of_scratch": None if reach_flops is None else round(reach_flops / scratch_flops, 3),
        })
    figures["wall_s"] = round(time.time() - t_start, 1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, unit in zip(axes, ("tokens", "flops")):
        def xs(curve, small_until):
            if unit == "tokens":
                return [t for t, _ in curve]
            return [min(t, small_until) * f_small + max(0, t - small_until) * f_big for t, _ in curve]

        ax.plot(xs(scratch_curve, 0), [v for _, v in scratch_curve], color="k", marker=".",
                label=f"{BIG_COUNTS[0]}/{BIG_COUNTS[1]} tokens from scratch")
        ax.plot(xs(source_curve, 10**15), [v for _, v in source_curve], color="C0", marker=".",
                label=f"{SMALL_COUNTS[0]}/{SMALL_COUNTS[1]} tokens (source)")
        for i, ((init, tau), curve) in enumerate(curves.items()):
            ax.plot(xs(curve, source_tokens), [v for _, v in curve], color=f"C{i + 1}", marker=".",
                    label=f"grown to {BIG_COUNTS[0]}/{BIG_COUNTS[1]} ({init}, tau {tau})")
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.axvline(xs([(source_tokens, 0)], source_tokens)[0], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("training tokens" if unit == "tokens" else
                      "training FLOPs (6 x (Pattention + head params) + attention)")
        ax.set_ylabel("validation loss")
        first = min(v for _, v in source_curve[:2] + scratch_curve[:2])
        ax.set_ylim(min(v for c in [scratch_curve, source_curve, *curves.values()] for _, v in c) - 0.1,
                    max(first, target + 0.5))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("TokenFormer progressive scaling on the embedded corpus (d=128, 4 layers; dashed: growth)")
    fig.tight_layout()
    figure = root / "growth.png" if os.environ.get("TOKENFORMER_GROWTH_SEED") else FIGURE
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=90)
    plt.close(fig)
    (root / "growth.json").write_text(json.dumps({"figures": figures, "curves": {
        "scratch": scratch_curve, "source": source_curve,
        **{f"grown_{i}_{t}": c for (i, t), c in curves.items()}}}, indent=1))
    figures["plot"] = str(figure.relative_to(ROOT) if figure.is_relative_to(ROOT) else figure)
    return figures


# ------------------------------------------------------------------------------------- the paper's claim

# Progressive scaling against training from scratch, with several seeds, at a size a busy 2-core CPU runs in
# ~10 minutes (one thread per run: on a shared machine 2 threads were 14x slower per step than 1). The source
# trains CLAIM_SOURCE_STEPS at 32/128 tokens and is grown with the recipe's defaults (grow_factor 2 -> 64/256;
# init zero_key, and init=released as the official code); each grown model trains CLAIM_GROWN_STEPS more, so
# source + grown = the scratch run's CLAIM_SOURCE_STEPS + CLAIM_GROWN_STEPS steps and tokens. With
# TOKENFORMER_CLAIM_NOBIAS=1 the scratch run is repeated without the final LayerNorm's bias (the form this
# repository had before; the official code has it).
CLAIM_SEEDS = (1, 2, 3)
CLAIM_SOURCE_STEPS, CLAIM_GROWN_STEPS = 200, 200
CLAIM_VAL_BATCHES, CLAIM_VAL_EVERY = 8, 50
CLAIM_COMMON = ["trainer.progress_bar=false", "logging.wandb=disabled", f"trainer.val_check_interval={CLAIM_VAL_EVERY}",
                f"trainer.limit_val_batches={CLAIM_VAL_BATCHES}", "checkpoint.every_n_steps=100000",
                f"data.vocab_size={GROWTH_VOCAB}", f"data.block_size={GROWTH_BLOCK}",
                f"data.batch_size={GROWTH_BATCH}", "model.size=small"]


def _spread(values: List[float]) -> Dict[str, float]:
    """Mean, sample standard deviation, min and max of per-seed values."""
    return {"mean": round(statistics.mean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4)}


def _claim_run(root: Path, recipe: str, run_id: str, args: List[str]) -> Path:
    """One training run in this process (skipped when its summary exists)."""
    from recipes.engine.config import load_config
    from recipes.engine.loop import train

    run_dir = root / recipe / run_id
    if (run_dir / "summary.json").exists():
        return run_dir
    print(f"[tokenformer_claim] {recipe} {run_id}", flush=True)
    return Path(train(load_config(recipe, [f"run.root={root}", f"run.run_id={run_id}", "run.overwrite=true",
                                           *CLAIM_COMMON, *args])))


@register("tokenformer_claim", "TokenFormer's claim at toy scale, 3 seeds: a 32/128-token `small` model (d=128, 4 "
          f"layers, vocabulary {GROWTH_VOCAB}, batch {GROWTH_BATCH}x{GROWTH_BLOCK}) trained {CLAIM_SOURCE_STEPS} "
          f"steps and grown with the recipe defaults (x2 -> 64/256; init zero_key, and init=released) for "
          f"{CLAIM_GROWN_STEPS} more steps, vs 64/256 from scratch for {CLAIM_SOURCE_STEPS + CLAIM_GROWN_STEPS} "
          "steps (same tokens); validation loss at equal tokens, tokens and FLOPs to reach scratch's final loss; "
          "with TOKENFORMER_CLAIM_NOBIAS=1 also scratch without the final LayerNorm bias. One thread per run; runs "
          "under $TOKENFORMER_CLAIM_DIR (default bench/tmp/tokenformer_claim).")
def tokenformer_claim() -> dict:
    root = Path(os.environ.get("TOKENFORMER_CLAIM_DIR", ROOT / "bench" / "tmp" / "tokenformer_claim")).resolve()
    ablate = os.environ.get("TOKENFORMER_CLAIM_NOBIAS") == "1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t_start = time.time()
    small = [f"model.overrides.qkv_tokens={SMALL_COUNTS[0]}", f"model.overrides.ffn_tokens={SMALL_COUNTS[1]}"]
    big = [f"model.overrides.qkv_tokens={BIG_COUNTS[0]}", f"model.overrides.ffn_tokens={BIG_COUNTS[1]}"]
    total = CLAIM_SOURCE_STEPS + CLAIM_GROWN_STEPS
    f_small = training_flops_per_token(*SMALL_COUNTS, vocab=GROWTH_VOCAB, block=GROWTH_BLOCK)
    f_big = training_flops_per_token(*BIG_COUNTS, vocab=GROWTH_VOCAB, block=GROWTH_BLOCK)
    per_seed: Dict[str, List[float]] = {}

    def add(name: str, value: Optional[float]) -> None:
        per_seed.setdefault(name, []).append(float("nan") if value is None else float(value))

    try:
        for seed in CLAIM_SEEDS:
            seeded = [f"run.seed={seed}"]
            source = _claim_run(root, "tokenformer", f"source_s{seed}",
                                [*seeded, *small, f"trainer.max_steps={CLAIM_SOURCE_STEPS}"])
            scratch = _claim_run(root, "tokenformer", f"scratch_s{seed}", [*seeded, *big, f"trainer.max_steps={total}"])
            no_bias = None
            if ablate:
                no_bias = _claim_run(root, "tokenformer", f"scratch_nobias_s{seed}", [
                    *seeded, *big, "model.overrides.final_norm_bias=false", f"trainer.max_steps={total}"])
            grown = {init: _claim_run(root, "tokenformer_grow", f"grown_{init}_s{seed}",
                                      [*seeded, f"tokenformer_grow.from_run={source}", f"tokenformer_grow.init={init}",
                                       f"tokenformer_grow.eval_batches={CLAIM_VAL_BATCHES}",
                                       f"trainer.max_steps={CLAIM_GROWN_STEPS}"])
                     for init in ("zero_key", "released")}
            source_tokens = json.loads((source / "summary.json").read_text())["tokens_seen"]
            scratch_curve = _val_curve(scratch)
            target = scratch_curve[-1][1]
            scratch_flops = scratch_curve[-1][0] * f_big
            add("scratch_final_val_loss", target)
            if no_bias is not None:
                add("scratch_nobias_final_val_loss", _val_curve(no_bias)[-1][1])
                add("scratch_nobias_minus_scratch", per_seed["scratch_nobias_final_val_loss"][-1] - target)
            add("source_final_val_loss", _val_curve(source)[-1][1])
            for init, run_dir in grown.items():
                s = json.loads((run_dir / "summary.json").read_text())
                curve = [(source_tokens, s["grow/val_loss_after"])] + _val_curve(run_dir, source_tokens)
                assert curve[-1][0] == scratch_curve[-1][0], "grown and scratch runs must see the same tokens"
                reach = _first_reaching(curve, target)
                add(f"grown_{init}_final_val_loss", curve[-1][1])
                add(f"grown_{init}_minus_scratch", curve[-1][1] - target)
                add(f"grown_{init}_loss_jump_at_growth", s["grow/val_loss_after"] - s["grow/val_loss_before"])
                add(f"grown_{init}_token_fraction_to_scratch_final",
                    None if reach is None else reach / scratch_curve[-1][0])
                add(f"grown_{init}_flops_fraction_to_scratch_final", None if reach is None else
                    (source_tokens * f_small + (reach - source_tokens) * f_big) / scratch_flops)
    finally:
        torch.set_num_threads(threads)
    tokens = total * GROWTH_BATCH * GROWTH_BLOCK
    source_tokens = CLAIM_SOURCE_STEPS * GROWTH_BATCH * GROWTH_BLOCK
    figures: Dict[str, object] = {
        "seeds": list(CLAIM_SEEDS), "tokens": tokens, "source_tokens": source_tokens,
        "params_small": _growth_params(*SMALL_COUNTS), "params_big": _growth_params(*BIG_COUNTS),
        "grown_total_flops_fraction_of_scratch": round(
            (source_tokens * f_small + (tokens - source_tokens) * f_big) / (tokens * f_big), 3)}
    for name, values in per_seed.items():
        figures[name] = [round(v, 4) for v in values]
        finite = [v for v in values if v == v]
        if len(finite) == len(values):
            figures[f"{name}_stats"] = _spread(finite)
        else:
            figures[f"{name}_stats"] = f"not reached with {len(values) - len(finite)} of {len(values)} seeds"
    figures["wall_s"] = round(time.time() - t_start, 1)
    return figures
