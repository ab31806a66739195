"""The `adamoe` and `adamoe_finetune` recipes end to end on tiny models, plus the ARC multiple-choice scorer."""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.engine.config import ConfigError, load_config
from recipes.engine.recipe import get_recipe

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "arc_tiny.jsonl"

# A 2-layer, 32-wide Mixtral (8 experts, top-2 base) on 32-token blocks: a few steps take seconds.
SMALL = ["data.block_size=32", "data.batch_size=4", "data.val_batch_size=8", "trainer.val_check_interval=4",
         "trainer.limit_val_batches=2", "checkpoint.every_n_steps=4", "trainer.log_every_n_steps=1",
         "model.overrides.hidden_size=32",
         "model.overrides.intermediate_size=48", "model.overrides.num_hidden_layers=2",
         "model.overrides.num_attention_heads=4", "model.overrides.num_key_value_heads=2"]


def _base_overrides(root: Path, data_cache: str):
    return [f"run.root={root}", f"data.cache_dir={data_cache}", "logging.wandb=disabled",
            "trainer.progress_bar=false", "data.max_chars_per_domain=200000"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_cache):
    """A 4-step `adamoe` run (the recipe's 8 true + 16 null experts, top-4) and its export."""
    from recipes.engine.export import export
    from recipes.engine.loop import train

    root = tmp_path_factory.mktemp("adamoe_runs")
    overrides = _base_overrides(root, data_cache) + SMALL + ["trainer.max_steps=4"]
    run_dir = train(load_config("adamoe", overrides))
    return {"run_dir": run_dir, "export": export(run_dir), "overrides": overrides, "root": root}


def _rows(run_dir: Path):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_short_adamoe_run_uses_fewer_true_experts_than_k(trained_run):
    run_dir = trained_run["run_dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = load_config("adamoe", trained_run["overrides"])
    k = cfg.adamoe.top_k  # the recipe's k (3) over 8 true + its null experts
    tpt = summary["moe/true_experts_per_token"]
    assert summary["step"] == 4 and summary["moe/top_k"] == k and summary["moe/reference_top_k"] == 2
    assert 0.0 < tpt < k  # null experts take some of the k slots
    assert summary["moe/flops_vs_topk"] == pytest.approx(tpt / 2)
    shares = [summary[f"moe/share_true_experts_{i}"] for i in range(k + 1)]
    assert sum(shares) == pytest.approx(1.0)
    assert sum(i * s for i, s in enumerate(shares)) == pytest.approx(tpt)  # mean of the share histogram

    rows = [r for r in _rows(run_dir) if r.get("train/loss")]
    assert rows
    for r in rows:
        # the logged weighted losses are coefficient * the logged raw losses
        assert float(r["train/moe_lb"]) == pytest.approx(cfg.adamoe.lb_coef * float(r["moe/aux_loss"]), rel=1e-5)
        assert float(r["train/moe_z"]) == pytest.approx(cfg.adamoe.z_coef * float(r["moe/z_loss"]), rel=1e-5)
        assert 0.0 <= float(r["moe/null_slot_fraction"]) <= 1.0 and float(r["moe/router_entropy"]) > 0
        used = float(r["moe/true_experts_per_token"])
        assert used == pytest.approx(k * (1 - float(r["moe/null_slot_fraction"])), abs=1e-5)  # no capacity drops
        for layer in range(2):  # per-layer expert loads are shares of that layer's slots
            experts = 8 + cfg.adamoe.num_null_experts
            assert sum(float(r[f"moe/load/l{layer}_e{e}"]) for e in range(experts)) == pytest.approx(1.0, abs=1e-5)
    val = [r for r in _rows(run_dir) if r.get("val/moe_true_experts_per_token")]
    assert float(val[-1]["val/moe_true_experts_per_token"]) == pytest.approx(tpt, rel=1e-6)


def _module_for(cfg):
    from recipes.engine.build import build_datamodule, build_module

    dm = build_datamodule(cfg)
    return build_module(cfg, dm, get_recipe("adamoe")), dm


def test_export_loads_back_through_model_pretrained(trained_run):
    from recipes.engine.checkpointing import newest_checkpoint
    from recipes.engine.export import consolidated_state_dict, model_state_dict

    cfg = load_config("adamoe", trained_run["overrides"] + [f"model.pretrained={trained_run['export']}"])
    module, _ = _module_for(cfg)
    saved = model_state_dict(consolidated_state_dict(newest_checkpoint(trained_run["run_dir"])[0]))
    params = dict(module.model.named_parameters())
    assert any("null_gate" in name for name in params)
    for name, p in params.items():  # every weight, null gates included, is the trained one
        assert torch.equal(p.detach(), saved[name]), name

    # asking for other null-expert settings than the checkpoint's is an error, not a silent re-init
    bad = load_config("adamoe", trained_run["overrides"] + [f"model.pretrained={trained_run['export']}",
                                                            "adamoe.num_null_experts=2"])
    with pytest.raises(ConfigError, match="already retrofitted"):
        _module_for(bad)


def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            num_local_experts=8, num_experts_per_tok=2)).eval()


def test_baseline_settings_keep_the_model_and_bad_settings_are_config_errors():
    import recipes.adamoe.module as adamoe

    model = _tiny_mixtral()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        reference = model(ids).logits
    cfg = load_config("adamoe", ["adamoe.num_null_experts=0", "adamoe.top_k=2"])
    model = adamoe.prepare_model(cfg, model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=1e-6)

    with pytest.raises(ConfigError, match="null_gate_init"):
        adamoe.prepare_model(load_config("adamoe", ["adamoe.null_gate_init=zeros"]), _tiny_mixtral())
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ConfigError, match=r"'mixtral', 'olmoe', 'qwen2_moe'.*'llama'"):  # supported ones + given
        adamoe.prepare_model(load_config("adamoe", ["model.arch=llama"]), llama)


def test_arc_parsing_both_layouts():
    from recipes.adamoe.finetune import parse_arc_row, read_arc_jsonl

    questions = read_arc_jsonl(str(FIXTURE))
    assert len(questions) == 16
    assert questions[0].choices[questions[0].answer] == "the Sun"  # HF layout, letter key
    assert questions[3].choices[questions[3].answer] == "a thermometer"  # AI2 layout, numeric key
    assert len(read_arc_jsonl(str(FIXTURE), limit=5)) == 5
    with pytest.raises(ValueError, match="answerKey"):
        parse_arc_row({"question": "q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"})


def test_scoring_cli_matches_the_in_process_scorer(trained_run, capsys):
    from transformers import AutoTokenizer

    from models.moe import load_retrofitted
    from recipes.adamoe.finetune import evaluate_multiple_choice, read_arc_jsonl, score_main

    export = trained_run["export"]
    assert score_main(["--model", str(export), "--arc", str(FIXTURE), "--limit", "6", "--device-map", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = evaluate_multiple_choice(load_retrofitted(export), AutoTokenizer.from_pretrained(str(export)),
                                        read_arc_jsonl(str(FIXTURE), 6))
    assert printed["n_questions"] == 6
    for key in ("accuracy", "accuracy_norm", "true_experts_per_token"):
        assert printed[key] == pytest.approx(expected[key]), key
    assert score_main(["--model", str(export), "--arc", str(FIXTURE) + ".missing"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_choice_scores_equal_unpadded_reference(trained_run):
    """Batched, right-padded scoring == each choice scored alone with an explicit log-softmax sum."""
    from transformers import AutoTokenizer

    from models.moe import load_retrofitted
    from recipes.adamoe.finetune import MCQuestion, choice_logprobs, evaluate_multiple_choice

    model = load_retrofitted(trained_run["export"]).eval()
    tok = AutoTokenizer.from_pretrained(str(trained_run["export"]))
    context = "Question: What is copied by shutil?\nAnswer:"
    choices = [" files", " the whole directory tree of a path", " nothing"]
    scores, used, pairs = choice_logprobs(model, tok, context, choices)
    ctx = tok(context)["input_ids"]
    expected = []
    for c in choices:
        cont = tok(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        expected.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    torch.testing.assert_close(scores.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-4)
    real_tokens = sum(len(ctx) + len(tok(c, add_special_tokens=False)["input_ids"]) for c in choices)
    assert pairs == 2 * real_tokens and 0 < used < 4 * pairs  # padding excluded, 2 MoE layers, k = 4

    best = int(torch.tensor(expected).argmax())
    result = evaluate_multiple_choice(model, tok, [MCQuestion("What is copied by shutil?", [c.strip() for c in choices],
                                                              best)])
    assert result["accuracy"] == 1.0 and result["n_questions"] == 1


def _finetune_overrides(trained_run):
    trained = load_config("adamoe", trained_run["overrides"])
    overrides = _base_overrides(trained_run["root"], trained.data.cache_dir)
    return overrides + [f"model.pretrained={trained_run['export']}", f"adamoe_finetune.train_file={FIXTURE}",
                        # the export's own null experts and k (a retrofitted checkpoint refuses others)
                        f"adamoe.num_null_experts={trained.adamoe.num_null_experts}",
                        f"adamoe.top_k={trained.adamoe.top_k}",
                        f"adamoe_finetune.eval_file={FIXTURE}", "adamoe.lora_r=2", "trainer.max_steps=3",
                        "data.block_size=16", "data.batch_size=4", "data.val_fraction=0.25",
                        "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "optim.lr=1e-2",
                        "optim.warmup_steps=1", "checkpoint.every_n_steps=3", "trainer.log_every_n_steps=1"]


def _check_finetuned_run(run_dir: Path, pretrained: Path) -> None:
    """summary + eval keys, and the export: LoRA merged, null gates and LoRA targets trained, the rest frozen."""
    from models.moe import load_retrofitted

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval/finetuned_n_questions"] == 16
    for which in ("finetuned", "base"):
        acc = summary[f"eval/{which}_accuracy"]
        assert 0.0 <= acc <= 1.0 and math.isclose(acc * 16, round(acc * 16))
        assert 0.0 < summary[f"eval/{which}_true_experts_per_token"] < 4.0
    assert summary["step"] == 3 and "moe/true_experts_per_token" in summary

    before = load_retrofitted(pretrained)
    after = load_retrofitted(run_dir / "export")
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    assert set(a) == set(b)  # LoRA merged away: the same architecture as the pretrained model
    for name in a:
        if "null_gate" in name or "self_attn" in name and name.endswith(("q_proj.weight", "v_proj.weight")):
            assert not torch.equal(a[name], b[name]), f"{name} did not train"
        elif "self_attn" not in name:
            assert torch.equal(a[name], b[name]), f"{name} changed although LoRA freezes it"


def test_finetune_with_lora_on_arc(trained_run):
    from recipes.engine.loop import train

    overrides = _finetune_overrides(trained_run)
    run_dir = train(load_config("adamoe_finetune", overrides))
    _check_finetuned_run(run_dir, trained_run["export"])

    # stages skip completed work: a second run of the same directory changes nothing
    mtime = (run_dir / "eval.json").stat().st_mtime
    train(load_config("adamoe_finetune", overrides + [f"run.run_id={run_dir.name}"]), run_dir=run_dir)
    assert (run_dir / "eval.json").stat().st_mtime == mtime


def _bigram_mixtral(vocab_size: int):
    """A retrofitted tiny Mixtral (8 true + 8 null experts, top-4) whose attention and experts output zero
    (o_proj = down_proj = 0): the hidden state of a token stays its embedding, so the next-token
    distribution after token a is softmax(lm_head @ rmsnorm(embed[a])) and the router of every layer sees
    rmsnorm_post(embed[a]): both computable by hand from the weights."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from models.moe import retrofit

    torch.manual_seed(3)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             num_local_experts=8, num_experts_per_tok=2))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 0.5)
    retrofit(model, num_null_experts=8, top_k=4, null_gate_init="random", seed=5)
    return model.eval()


def _rmsnorm(x, norm):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()


def test_arc_scorer_on_fixture_matches_hand_computed_bigram_scores(trained_run):
    """evaluate_multiple_choice on the fixture == accuracy / acc_norm / true experts per token computed
    by hand from a model whose log-probabilities and routing are closed-form functions of its weights."""
    from transformers import AutoTokenizer

    from recipes.adamoe.finetune import choice_logprobs, evaluate_multiple_choice, read_arc_jsonl

    tok = AutoTokenizer.from_pretrained(str(trained_run["export"]))  # the embedded BPE tokenizer of the runs
    model = _bigram_mixtral(len(tok)).requires_grad_(False)
    embed = model.model.embed_tokens.weight
    log_bigram = torch.log_softmax(_rmsnorm(embed, model.model.norm) @ model.lm_head.weight.double().T,
                                   dim=-1)  # [prev, next]

    def true_experts(token: int) -> int:  # per layer: top-4 of softmax over [true gate | null gate] logits
        total = 0
        for layer in model.model.layers:
            x = _rmsnorm(embed[token], layer.post_attention_layernorm)
            logits = torch.cat([layer.mlp.gate.weight.double() @ x, layer.mlp.gate.null_gate.weight.double() @ x])
            total += int((torch.topk(logits, 4).indices < 8).sum())
        return total

    questions = read_arc_jsonl(str(FIXTURE))
    prompt = "Question: {question}\nAnswer:"
    correct = correct_norm = used = pairs = 0
    for q in questions:
        ctx = tok(prompt.format(question=q.question))["input_ids"]
        scores, norm_scores = [], []
        q_used = q_pairs = 0
        for choice in q.choices:
            ids = ctx + tok(" " + choice, add_special_tokens=False)["input_ids"]
            score = sum(float(log_bigram[ids[p - 1], ids[p]]) for p in range(len(ctx), len(ids)))
            scores.append(score)
            norm_scores.append(score / len(" " + choice))
            q_used += sum(true_experts(t) for t in ids)
            q_pairs += 2 * len(ids)  # 2 MoE layers, real tokens only (the batch is right-padded)
        got, got_used, got_pairs = choice_logprobs(model, tok, prompt.format(question=q.question),
                                                   [" " + c for c in q.choices])
        torch.testing.assert_close(got.double(), torch.tensor(scores, dtype=torch.float64), rtol=0, atol=1e-4)
        assert (got_used, got_pairs) == (q_used, q_pairs)
        used, pairs = used + q_used, pairs + q_pairs
        correct += int(max(range(len(scores)), key=scores.__getitem__) == q.answer)
        correct_norm += int(max(range(len(scores)), key=norm_scores.__getitem__) == q.answer)

    result = evaluate_multiple_choice(model, tok, questions, prompt)
    assert result["n_questions"] == 16
    assert result["accuracy"] == correct / 16 and result["accuracy_norm"] == correct_norm / 16
    assert result["true_experts_per_token"] == pytest.approx(used / pairs, rel=1e-12)
    assert 0 < used / pairs < 4


def test_lora_trains_adapters_and_null_gates_only():
    import recipes.adamoe.module as adamoe

    cfg = load_config("adamoe", ["adamoe.lora_r=2", "adamoe.null_gate_init=copy"])
    model = adamoe.prepare_model(cfg, _tiny_mixtral())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    null_gates = {n for n in trainable if "null_gate" in n}
    assert len(null_gates) == 2  # one per layer, trained in full (modules_to_save)
    assert all("lora_" in n for n in trainable - null_gates)
    assert not any("experts" in n or ".gate.weight" in n and "null_gate" not in n for n in trainable)
    model.train()
    logits = model(input_ids=torch.randint(0, 50, (2, 7))).logits
    logits.float().pow(2).mean().backward()
    for n, p in model.named_parameters():
        if n in null_gates:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_finetune_with_lora_under_zero3_on_two_processes(trained_run):
    """adamoe_finetune with LoRA under DeepSpeed ZeRO-3, 2 CPU processes (gloo, tests/deepspeed_cpu.py):
    trains, then rank 0 alone scores and exports; the export has trained null gates and frozen experts."""
    root = trained_run["root"] / "zero3"
    args = _finetune_overrides(trained_run) + [f"run.root={root}", "run.run_id=z3", "trainer.accelerator=cpu",
                                               "trainer.devices=2", "trainer.strategy=deepspeed_stage_3"]
    env = dict(os.environ, WANDB_MODE="disabled")
    env.pop("LM_RECIPES_RUN_ID", None)  # set by this process's own runs; the CLI must make its own
    r = subprocess.run([sys.executable, "-m", "tests.deepspeed_cpu", "train", "adamoe_finetune", *args],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    run_dir = root / "adamoe_finetune" / "z3"
    assert (run_dir / "train" / "checkpoints").is_dir()
    _check_finetuned_run(run_dir, trained_run["export"])


def test_expert_impl_setting_reaches_every_block_and_computes_the_same():
    import recipes.adamoe.module as adamoe
    from models.moe import moe_blocks

    torch.manual_seed(0)
    model = adamoe.prepare_model(load_config("adamoe", ["adamoe.expert_impl=grouped_mm"]), _tiny_mixtral())
    blocks = moe_blocks(model)
    assert blocks and {b.experts.expert_impl for b in blocks} == {"grouped_mm"}
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        grouped = model(ids).logits
        used = {b.experts.last_impl for b in blocks}
        for b in blocks:
            b.experts.expert_impl = "loop"
        loop = model(ids).logits
    assert used == {"grouped_mm"} and {b.experts.last_impl for b in blocks} == {"loop"}
    torch.testing.assert_close(grouped, loop, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="expert_impl"):
        adamoe.prepare_model(load_config("adamoe", ["adamoe.expert_impl=fast"]), _tiny_mixtral())
