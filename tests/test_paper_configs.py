"""The papers' settings (docs/paper_scale.md), checked offline.

1. Every `*_paper*` recipe resolves, and names a model whose architecture models/paper_sizes.py writes out.
2. Those models, built on the meta device from the local architecture dicts (never the hub), have the published
   parameter counts: within half a unit of the last published digit or 0.5 %, whichever is larger.
3. `python -m recipes plan` (recipes/engine/plan.py): its model states equal DeepSpeed's own estimators, its
   largest layer is DeepSpeed's, its LoRA and activation figures follow their stated formulas.
4. Each paper recipe trains 2 steps on CPU through its own code path, width-reduced (model.overrides, small local
   models in place of the hub ids), on small fixtures in the hub datasets' own schemas (tests/fixtures/).
"""
from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from omegaconf import OmegaConf

from models.paper_sizes import (
    PAPER_MODELS,
    PAPER_SIZES,
    ROBERTA_BASE,
    build_on_meta,
    model_spec,
    paper_spec,
    parameter_counts,
)
from recipes.engine import plan
from recipes.engine.config import load_config
from recipes.engine.recipe import get_recipe, recipe_names
from tests.conftest import ROOT

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PAPER_RECIPES = ["adamoe_finetune_paper", "tokenformer_paper_124m", "tokenformer_paper_grow_354m",
                 "tokenformer_paper_grow_757m", "tokenformer_paper_grow_1_4b", "fusechat_paper",
                 "twin_merging_paper_generative", "twin_merging_paper_discriminative"]


# ------------------------------------------------------------------------------------------------ 1. configs


def test_every_paper_yaml_is_a_registered_paper_recipe():
    yamls = sorted(p.stem for p in (ROOT / "recipes").rglob("*_paper*.yaml"))
    assert yamls == sorted(PAPER_RECIPES)
    assert set(PAPER_RECIPES) <= set(recipe_names())
    for name in PAPER_RECIPES:
        assert get_recipe(name).yaml.parent.name == get_recipe(name).method


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipe_resolves_to_a_paper_size(name):
    cfg = load_config(name)
    assert cfg.model.size in PAPER_SIZES.get(cfg.model.arch, {}) or (cfg.model.arch, cfg.model.size) == (
        "llama", "125m")  # the discriminative Twin-Merging stand-in of RoBERTa-base's width and depth


def test_adamoe_paper_setting():
    cfg = load_config("adamoe_finetune_paper")
    a = cfg.adamoe
    assert cfg.model.pretrained == "mistralai/Mixtral-8x7B-v0.1" and cfg.data.tokenizer == cfg.model.pretrained
    assert PAPER_MODELS[cfg.model.pretrained].arch == cfg.model.arch
    assert PAPER_MODELS[cfg.model.pretrained].size == cfg.model.size
    assert (a.num_null_experts, a.top_k, a.null_gate_init) == (16, 4, "copy")
    assert a.lora_r > 0 and cfg.trainer.strategy == "deepspeed_stage_3" and cfg.trainer.precision == "bf16-mixed"
    # the released Mixtral code's load balancing (HF Mixtral loss, concatenated layers, per-token fractions, 1e-4)
    assert (a.lb_preset, a.lb_coef, a.lb_reduce, a.lb_null_mode, a.lb_fraction, a.z_coef) == (
        "released_mixtral", 1e-4, "concat", "none", "tokens", 0.0)
    f = cfg.adamoe_finetune
    assert (f.eval_hub_name, f.eval_hub_config, f.eval_hub_split) == ("allenai/ai2_arc", "ARC-Challenge", "test")


def test_tokenformer_chain_grows_by_parameter_tokens_only():
    steps = ["tokenformer_paper_124m", "tokenformer_paper_grow_354m", "tokenformer_paper_grow_757m",
             "tokenformer_paper_grow_1_4b"]
    sizes = [PAPER_SIZES["tokenformer"][load_config(s).model.size] for s in steps]
    fixed = ("num_layers", "hidden_size", "num_heads", "vocab_size", "max_seq_len")
    assert all({k: s[k] for k in fixed} == {k: sizes[0][k] for k in fixed} for s in sizes)
    assert [s["qkv_tokens"] for s in sizes] == sorted(s["qkv_tokens"] for s in sizes)
    assert all(s["ffn_tokens"] == 4 * s["qkv_tokens"] for s in sizes)
    for name, size in zip(steps[1:], sizes[1:]):
        g = load_config(name).tokenformer_grow
        assert (g.qkv_tokens, g.ffn_tokens) == (size["qkv_tokens"], size["ffn_tokens"])
        assert g.init == "released"
    base = load_config(steps[0])
    assert (base.data.source, base.data.hub_name, base.data.text_field) == ("hub", "Skylion007/openwebtext", "text")
    # the released incremental-scaling configs: 354M = 24 layers, d 1024, 768 / 3072 tokens; 757M: 1792 / 7168
    assert (sizes[1]["num_layers"], sizes[1]["hidden_size"], sizes[1]["qkv_tokens"], sizes[2]["qkv_tokens"]) == (
        24, 1024, 768, 1792)


def test_fusechat_paper_models():
    fc = load_config("fusechat_paper").fusechat
    assert fc.pivot.pretrained == "openchat/openchat_3.5" and fc.pivot.steps == 0
    assert [s.pretrained for s in fc.sources] == ["NousResearch/Nous-Hermes-2-Mixtral-8x7B-DPO",
                                                  "NousResearch/Nous-Hermes-2-SOLAR-10.7B"]
    assert all(s.steps == 0 for s in fc.sources)
    assert (fc.lam, fc.fusion, fc.topk, fc.merge_method, fc.target_lr) == (0.9, "min_ce", 10, "varm", 5e-6)
    for m in [fc.pivot] + list(fc.sources):
        assert m.pretrained in PAPER_MODELS


# ------------------------------------------------------------------------------------------ 2. parameter counts

# (model, published total, published active per token): the figures as published; the tolerance is half a unit
# of the last digit shown or 0.5 %, whichever is larger. The TokenFormer 124M and 1.4B token counts are solved
# from these totals (models/paper_sizes.py), so for those two this is a consistency check only.
PUBLISHED = [
    ("mistralai/Mixtral-8x7B-v0.1", "46.7B", "12.9B"),
    ("NousResearch/Nous-Hermes-2-Mixtral-8x7B-DPO", "46.7B", "12.9B"),
    ("openchat/openchat_3.5", "7.24B", None),
    ("NousResearch/Nous-Hermes-2-SOLAR-10.7B", "10.7B", None),
    ("allenai/OLMoE-1B-7B-0924", "6.9B", "1.3B"),
    ("Qwen/Qwen-14B", "14B", None),
    ("tokenformer-124m", "124M", None),
    ("tokenformer-354m", "354M", None),
    ("tokenformer-757m", "757M", None),
    ("tokenformer-1.4b", "1.4B", None),
]


def published_range(text: str):
    """'46.7B' -> (value, tolerance): half a unit of the last digit shown, at least 0.5 % of the value."""
    m = re.fullmatch(r"(\d+)(?:\.(\d+))?([MB])", text)
    assert m, text
    scale = {"M": 1e6, "B": 1e9}[m.group(3)]
    value = float(m.group(1) + ("." + m.group(2) if m.group(2) else "")) * scale
    half_unit = 0.5 * 10 ** -(len(m.group(2) or "")) * scale
    return value, max(half_unit, 0.005 * value)


@pytest.mark.parametrize("name,total,active", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_parameter_count_matches_the_published_figure(name, total, active):
    model = build_on_meta(model_spec(name))
    assert all(p.is_meta for p in model.parameters())  # nothing allocated, nothing downloaded
    counts = parameter_counts(model)
    value, tol = published_range(total)
    assert abs(counts["total"] - value) <= tol, (name, counts["total"], total)
    if active:
        value, tol = published_range(active)
        assert abs(counts["active"] - value) <= tol, (name, counts["active"], active)


def test_mixtral_8x7b_architecture_is_the_published_one():
    cfg = build_on_meta(model_spec("mistralai/Mixtral-8x7B-v0.1")).config
    got = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "vocab_size",
                                         "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
                                         "tie_word_embeddings")}
    assert got == dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
                       max_position_embeddings=32768, tie_word_embeddings=False)
    rope = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    assert rope == 1e6
    olmoe = build_on_meta(model_spec("allenai/OLMoE-1B-7B-0924")).config
    assert (olmoe.num_experts, olmoe.num_experts_per_tok, olmoe.hidden_size, olmoe.num_hidden_layers) == (
        64, 8, 2048, 16)


def test_roberta_base_has_125m_parameters():
    from transformers import RobertaConfig, RobertaModel

    with torch.device("meta"):
        model = RobertaModel(RobertaConfig(**ROBERTA_BASE))
    value, tol = published_range("125M")
    assert abs(sum(p.numel() for p in model.parameters()) - value) <= tol


def test_paper_sizes_are_named_sizes_of_the_factory():
    from models.factory import available_archs

    archs = available_archs()
    for arch, sizes in PAPER_SIZES.items():
        assert set(sizes) <= set(archs[arch]), arch


# --------------------------------------------------------------------------------------------------- 3. plan


def _zero_estimates():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])  # libraries may log to stdout first


@pytest.fixture(scope="module")
def mixtral_facts():
    return plan.model_facts(load_config("adamoe_finetune_paper"))


@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (2, 8), (4, 4)])
def test_plan_model_states_equal_deepspeeds_estimators(mixtral_facts, nodes, gpus):
    zero2, zero3 = _zero_estimates()
    f, world = mixtral_facts, nodes * gpus
    for offload in (False, True):
        ours = plan.model_state_bytes("deepspeed_stage_2", "bf16-mixed", f.total, f.total, world, f.largest_module,
                                      f.largest_unit, offload_optimizer=offload)
        _, gpu = zero2(f.total, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload)
        assert abs(sum(ours.values()) - gpu) <= 2  # integer division per term
    for offload_opt, offload_params in ((False, False), (True, False), (True, True)):
        ours = plan.model_state_bytes("deepspeed_stage_3", "bf16-mixed", f.total, f.total, world, f.largest_module,
                                      f.largest_unit, offload_optimizer=offload_opt, offload_parameters=offload_params)
        _, gpu, _ = zero3(f.total, f.largest_module, num_gpus_per_node=gpus, num_nodes=nodes,
                          cpu_offload=offload_opt, cpu_offload_params=offload_params)
        assert abs(sum(ours.values()) - gpu) <= 2


def test_plan_counts_as_deepspeed_counts_a_real_model():
    """The meta-device counts equal DeepSpeed's `model_to_params` on the same model built for real (reduced)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import model_to_params

    from models.factory import build_model

    cfg = load_config("adamoe_finetune_paper", [f"model.overrides.{k}={v}" for k, v in REDUCED_HF.items()])
    facts = plan.model_facts(cfg)
    real = build_model(plan.model_spec(cfg))
    assert (facts.total, facts.largest_module) == model_to_params(real)


def test_plan_cli_adamoe_lora_and_full(capsys):
    zero2, zero3 = _zero_estimates()
    assert plan.main(["adamoe_finetune_paper", "--nodes", "1", "--gpus", "8", "--gpu-mem", "80", "--json"]) == 0
    p = _last_json(capsys.readouterr().out)
    lora, full = p["rows"]
    f = p["facts"]
    assert f["total"] == 46_702_792_704 and full["trainable"] == f["total"]
    # LoRA r=8 on q, k, v, o of 32 layers (d 4096, 8 KV heads of 128) + 16 null-gate rows of 4096 per MoE layer
    per_layer = 8 * ((4096 + 4096) + (4096 + 1024) + (4096 + 1024) + (4096 + 4096))
    assert lora["trainable"] == 32 * per_layer + 16 * 4096 * 32
    _, gpu, _ = zero3(f["total"], f["largest_module"], num_gpus_per_node=8, num_nodes=1, cpu_offload=False,
                      cpu_offload_params=False)
    assert abs(full["model_states"] - gpu) <= 2
    assert lora["parameters"] == full["parameters"]  # ZeRO-3 shards the frozen weights the same way
    assert lora["optimizer"] == 12 * lora["trainable"] // 8 and lora["gradients"] == 4 * lora["trainable"] // 8
    assert lora["fits"] and not full["fits"]
    b, s, h, layers, v = 2, 256, 4096, 32, 32000
    assert lora["activations"] == 34 * b * s * h * layers + 10 * b * s * v
    assert plan.main(["adamoe_finetune_paper", "--nodes", "1", "--gpus", "8", "--gpu-mem", "12", "--json"]) == 0
    assert not _last_json(capsys.readouterr().out)["rows"][0]["fits"]


def test_plan_ddp_and_fsdp2_formulas(capsys):
    assert plan.main(["tokenformer_paper_124m", "--nodes", "2", "--gpus", "8", "--json"]) == 0
    p = _last_json(capsys.readouterr().out)
    (row,), n = p["rows"], p["facts"]["total"]
    assert (row["parameters"], row["gradients"], row["optimizer"]) == (4 * n, 4 * n, 8 * n)  # DDP, fp32 weights
    assert row["activations"] == 34 * 16 * 1024 * 1024 * 24 + 10 * 16 * 1024 * 50304
    assert plan.main(["fusechat_paper", "--nodes", "1", "--gpus", "8", "--json"]) == 0
    p = _last_json(capsys.readouterr().out)
    (row,), f = p["rows"], p["facts"]
    assert f["total"] == 7_241_748_480
    assert row["parameters"] == 4 * f["total"] // 8 + 4 * f["largest_unit"]
    assert row["optimizer"] == 8 * f["total"] // 8


def test_plan_text_and_errors(capsys):
    assert plan.main(["twin_merging_paper_generative", "--nodes", "1", "--gpus", "1", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "qwen2/qwen_14b, 14.17B parameters" in out and "LoRA (r=32)" in out and "fits 80 GiB" in out
    assert plan.main(["twin_merging_paper_generative", "--nodes", "1", "--gpus", "8"]) == 2  # one process only
    assert "trainer.devices" in capsys.readouterr().err
    assert plan.main(["no_such_recipe", "--nodes", "1", "--gpus", "1"]) == 2


@pytest.mark.slow
def test_make_plan_prints_the_table():
    out = subprocess.run(["make", "-s", "plan", "RECIPE=adamoe_finetune_paper", "NODES=1", "GPUS=8"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "deepspeed_stage_3" in out.stdout and "LoRA (r=8)" in out.stdout and "yes" in out.stdout


# ---------------------------------------------------------------------------------- 4. two steps on CPU

REDUCED_HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
REDUCED_TOKENFORMER = dict(hidden_size=32, num_layers=2, num_heads=2, qkv_tokens=8, ffn_tokens=32)


def cpu_overrides(root: Path, data_cache: str, block: int = 16) -> List[str]:
    """The paper config's code path on one CPU process, 2 steps: only the scale and the hardware change."""
    return [f"run.root={root}", f"data.cache_dir={data_cache}", "logging.wandb=disabled", "trainer.progress_bar=false",
            "trainer.strategy=auto", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=1",
            "trainer.precision=32-true", "trainer.max_steps=2", "trainer.accumulate_grad_batches=1",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
            "checkpoint.every_n_steps=2", "optim.warmup_steps=1", "data.num_workers=0", f"data.block_size={block}",
            "data.batch_size=2", "data.val_batch_size=2"]


def _model_overrides(values: Dict[str, int]) -> List[str]:
    return [f"model.overrides.{k}={v}" for k, v in values.items()]


def _summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _tokenformer_base(root: Path, data_cache: str):
    from recipes.engine.loop import train

    data = ["data.source=files", f"data.files=[{FIXTURES / 'openwebtext_sample.jsonl'}]", "data.tokenizer=bpe",
            "data.vocab_size=512", "data.val_fraction=0.2"]
    cfg = load_config("tokenformer_paper_124m", cpu_overrides(root, data_cache, 32) + data
                      + _model_overrides(REDUCED_TOKENFORMER) + ["run.run_id=base"])
    return train(cfg), data


def test_tokenformer_paper_base_trains_two_steps(tmp_path, data_cache):
    run_dir, _ = _tokenformer_base(tmp_path / "runs", data_cache)
    s = _summary(run_dir)
    assert s["step"] == 2 and math.isfinite(s["train/loss"]) and math.isfinite(s["val/loss"])
    saved = load_config("tokenformer_paper_124m", base=OmegaConf.load(run_dir / "config.yaml"))
    assert (saved.model.arch, saved.model.size) == ("tokenformer", "paper_124m")


@pytest.mark.slow
def test_tokenformer_paper_growth_chain_trains_two_steps_each(tmp_path, data_cache):
    from recipes.engine.loop import train

    source, data = _tokenformer_base(tmp_path / "runs", data_cache)
    counts = {"354m": (16, 64), "757m": (32, 128), "1_4b": (64, 256)}  # the chain's growth, width-reduced
    for size, (qkv, ffn) in counts.items():
        name = f"tokenformer_paper_grow_{size}"
        overrides = cpu_overrides(tmp_path / "runs", data_cache, 32) + data + [
            f"tokenformer_grow.from_run={source}", f"tokenformer_grow.qkv_tokens={qkv}",
            f"tokenformer_grow.ffn_tokens={ffn}", "tokenformer_grow.eval_batches=1", f"run.run_id=grow_{size}"]
        source = train(load_config(name, overrides))
        s = _summary(source)
        assert s["step"] == 2 and math.isfinite(s["val/loss"])
        assert s["grow/to_qkv_tokens"] == qkv and s["grow/to_ffn_tokens"] == ffn


def _reduced_pretrained(hub_id: str, out: Path, tokenizer=None) -> Path:
    """The paper model of `hub_id` from its local architecture dict, width-reduced, saved as a save_pretrained
    directory: what `model.pretrained=<hub id>` loads at scale, at test size."""
    from models.factory import build_model

    m = PAPER_MODELS[hub_id]
    torch.manual_seed(0)
    model = build_model(paper_spec(m.arch, m.size, {**dict(m.overrides), **REDUCED_HF}))
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def test_adamoe_paper_trains_two_steps(tmp_path, data_cache):
    from recipes.engine.loop import train

    pretrained = _reduced_pretrained("mistralai/Mixtral-8x7B-v0.1", tmp_path / "mixtral")
    arc = FIXTURES / "arc_challenge_sample.jsonl"  # the allenai/ai2_arc record layout
    cfg = load_config("adamoe_finetune_paper", cpu_overrides(tmp_path / "runs", data_cache) + [
        f"model.pretrained={pretrained}", "data.tokenizer=bpe", "data.vocab_size=512", "data.val_fraction=0.25",
        f"adamoe_finetune.train_file={arc}", f"adamoe_finetune.eval_file={arc}", "adamoe_finetune.eval_hub_name=null",
        "run.run_id=paper"])
    assert cfg.adamoe == load_config("adamoe_finetune_paper").adamoe  # the method's settings are the paper's
    s = _summary(train(cfg))
    assert s["step"] == 2 and math.isfinite(s["train/loss"])
    assert s["moe/top_k"] == 4 and s["moe/num_null_experts"] == 16 and s["moe/reference_top_k"] == 2
    assert s["eval/finetuned_n_questions"] == 16 and 0.0 <= s["eval/finetuned_accuracy"] <= 1.0
    assert (Path(s["export_dir"]) / "config.json").exists()


def render_openchat(conversations: List[dict]) -> str:
    """A FuseChat-Mixture conversation in OpenChat-3.5's template (written out here: the tokenizer's training text)."""
    return "".join("GPT4 Correct " + ("User" if t["from"] == "human" else "Assistant") + ": " + t["value"]
                   + "<|end_of_turn|>" for t in conversations)


def _shared_tokenizer(texts: List[str], out: Path):
    """One small byte-level BPE shared by the pivot and the sources (the paper's three models share theirs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>", "<pad>", "<|end_of_turn|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out))
    return fast


def test_fusechat_paper_trains_two_steps(tmp_path, data_cache):
    from recipes.engine.loop import train
    from recipes.engine.runs import load_safetensors

    fixture = FIXTURES / "fusechat_mixture_sample.jsonl"
    rows = [json.loads(line) for line in fixture.read_text().splitlines()]
    assert all({"id", "conversations"} <= set(r) for r in rows)  # the FuseAI/FuseChat-Mixture record layout
    tok = _shared_tokenizer([render_openchat(r["conversations"]) for r in rows], tmp_path / "tokenizer")
    paper_cfg = load_config("fusechat_paper")
    paper = paper_cfg.fusechat
    # the paper's data path: FuseChat-Mixture's conversations rendered with OpenChat's template, loss on the
    # assistant turns; models in bf16 spread by device_map auto
    assert (paper_cfg.data.source, paper_cfg.data.hub_name, paper_cfg.data.format, paper_cfg.data.chat_template,
            paper_cfg.data.loss_on) == ("hub", "FuseAI/FuseChat-Mixture", "chat", "openchat", "assistant")
    assert (paper.represent_dtype, paper.device_map) == ("bf16", "auto")
    dirs = {m.name: _reduced_pretrained(m.pretrained, tmp_path / m.name, tok) for m in [paper.pivot, *paper.sources]}
    sources = ", ".join(f"{{name: {s.name}, tokenizer: null, steps: 0, pretrained: {dirs[s.name]}}}"
                        for s in paper.sources)
    cfg = load_config("fusechat_paper", cpu_overrides(tmp_path / "runs", data_cache, 32) + [
        "data.source=files", "data.hub_name=null", f"data.files=[{fixture}]", "data.val_fraction=0.25",
        f"data.tokenizer={dirs[paper.pivot.name]}", f"fusechat.pivot.pretrained={dirs[paper.pivot.name]}",
        f"fusechat.sources=[{sources}]", "fusechat.num_blocks=8", "fusechat.shard_blocks=4",
        "fusechat.represent_batch_size=2", "fusechat.target_steps=2", "fusechat.eval_batch_size=2",
        "fusechat.eval_max_blocks=2", "run.run_id=paper"])
    for key in ("lam", "fusion", "topk", "vocab_map", "merge_method", "target_lr", "temperature", "represent_dtype",
                "device_map"):
        assert cfg.fusechat[key] == paper[key]
    for key in ("format", "conversations_field", "chat_template", "loss_on"):
        assert cfg.data[key] == paper_cfg.data[key]
    run_dir = train(cfg)
    s = _summary(run_dir)
    # the represented pivot blocks carry the assistant-only mask, and it holds both kinds of token
    shard = load_safetensors(Path(run_dir) / "represent" / paper.pivot.name / "shard-00000.safetensors")
    mask = shard["loss_mask"]
    assert 0 < int(mask.sum()) < mask.numel()
    assert shard["topk_logits"].dtype == torch.float16 and torch.isfinite(shard["mean_ce"]).all()
    from recipes.fusechat.train import FusedBlocks

    fused = FusedBlocks([Path(run_dir) / "represent" / paper.pivot.name / "shard-00000.safetensors"],
                        [Path(run_dir) / "fused" / paper.sources[0].name / "shard-00000.safetensors"], 4)
    item = fused[0]  # the targets' labels: -100 exactly where the pivot block's mask is 0
    assert torch.equal(item["labels"] == -100, mask[0] == 0)
    evaluation = s["merge"]["evaluation"]["val_loss"] if "merge" in s else None
    losses = {k: v for k, v in s.items() if k.startswith("fusechat/val_loss/")}
    assert losses and all(math.isfinite(v) for v in losses.values()), (evaluation, sorted(s)[:20])
    assert any("merged_varm" in k for k in losses)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["generative", "discriminative"])
def test_twin_merging_paper_trains_two_steps(tmp_path, data_cache, setting):
    from recipes.engine.loop import train

    name = f"twin_merging_paper_{setting}"
    paper = load_config(name).twin
    cfg = load_config(name, cpu_overrides(tmp_path / "runs", data_cache, 32) + _model_overrides(REDUCED_HF) + [
        "data.max_chars_per_domain=20000", "data.vocab_size=512", "twin.base_steps=2", "twin.finetune_steps=2",
        "twin.eval_batches=1", "run.run_id=paper"])
    for key in ("protocol", "finetune", "lam", "rank", "lora_rank", "lora_alpha", "lora_targets"):
        assert cfg.twin[key] == paper[key]
    s = _summary(train(cfg))
    assert all(math.isfinite(v) for v in s["test_loss"]["twin_merging"].values())
    assert set(s["test_loss"]) >= {"base", "task_arithmetic", "ties", "twin_merging"}
