"""`make analyze MODEL=<hub id | dir>` (recipes/openmoe/analyze.py, `analyze --model`): the routing analysis of
one released MoE checkpoint. Tiny real MixtralForCausalLM / OlmoeForCausalLM models are built here with
transformers' config classes and saved with a tokenizer beside them (no network); the report is checked
against the models' own router logits (output_router_logits=True, top-k taken here)."""
import json
import math

import numpy as np
import pytest
import torch

BLOCK = 32
BATCH = 8
OPTIONS = [f"data.block_size={BLOCK}", "data.max_chars_per_domain=200000", "max_blocks=48", f"batch_size={BATCH}",
           "min_token_count=2", "spec_threshold=20", "capacity_factor=0.8", "position_buckets=4"]


@pytest.fixture(scope="module")
def tokenizer():
    """A 384-token byte-level BPE trained on a slice of the embedded corpus, as a PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    from data.corpus import embedded_documents
    from data.tokenizers import EOS, PAD, train_tokenizer

    docs = embedded_documents(("pydoc", "stdlib", "licenses"), 60_000)
    docs = [d for dom in sorted(docs) for d in docs[dom]]
    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer("bpe", 384, docs), eos_token=EOS, pad_token=PAD)


def _save(kind: str, directory, tokenizer):
    """A 3-layer, 32-wide model of `kind` (4 experts, top-2 for the MoE kinds), routers scaled up so that the
    top-2 choice is decisive, saved with `tokenizer` into `directory`."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                                           **common))
    elif kind == "olmoe":
        model = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(50.0)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def _cli(args, capsys):
    from recipes.__main__ import main

    rc = main(["analyze", *args])
    return rc, capsys.readouterr()


def _reference(model_dir, data_cache):
    """Per MoE layer, the top-2 experts of every token of the analysed validation blocks, from the model's own
    router logits (same blocks, same batches), and the blocks."""
    from transformers import AutoModelForCausalLM

    from data.config import DataConfig
    from data.datamodule import LMDataModule
    from recipes.openmoe.analyze import validation_blocks

    dm = LMDataModule(DataConfig(block_size=BLOCK, max_chars_per_domain=200000, cache_dir=data_cache,
                                 tokenizer=str(model_dir)), seed=0, progress=False)
    dm.prepare()
    ids, _ = validation_blocks(dm, 48, 0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    per_layer = None
    with torch.no_grad():
        for start in range(0, ids.shape[0], BATCH):
            out = model(input_ids=ids[start:start + BATCH], output_router_logits=True, use_cache=False)
            top = [logits.float().topk(2, dim=-1).indices for logits in out.router_logits]
            per_layer = [[t] for t in top] if per_layer is None else [a + [t] for a, t in zip(per_layer, top)]
    return ids, [torch.cat(chunks) for chunks in per_layer]


def _hand_drops(experts: np.ndarray, capacity_factor: float, num_experts: int):
    """Dropped assignments [T, k] of one forward batch of [B, S] tokens under C = ceil(cf * T * k / E), served in
    position order, then batch row, then slot (a plain loop)."""
    B, S, k = experts.shape
    capacity = math.ceil(capacity_factor * B * S * k / num_experts)
    used = [0] * num_experts
    dropped = np.zeros_like(experts, dtype=bool)
    for s in range(S):
        for b in range(B):
            for j in range(k):
                e = experts[b, s, j]
                if used[e] >= capacity:
                    dropped[b, s, j] = True
                else:
                    used[e] += 1
    return dropped


@pytest.mark.parametrize("kind", ["mixtral", "olmoe"])
def test_report_matches_router_logits(kind, tmp_path, tokenizer, data_cache, capsys):
    model_dir = _save(kind, tmp_path / kind, tokenizer)
    out = tmp_path / "out"
    rc, cap = _cli(["--model", str(model_dir), f"data.cache_dir={data_cache}", f"out={out}", *OPTIONS], capsys)
    assert rc == 0, cap.err
    assert f"report: {out / 'report.json'}" in cap.out
    report = json.loads((out / "report.json").read_text())
    ids, experts = _reference(model_dir, data_cache)
    E, k = 4, 2

    assert report["mode"] == "model" and report["model_type"] == kind
    assert report["layers"] == [f"model.layers.{i}.mlp" for i in range(3)]
    assert (report["num_experts"], report["top_k"]) == (E, k)
    assert report["data"]["tokens"] == ids.numel() == report["data"]["blocks"] * BLOCK
    assert report["paper_layer"] == "model.layers.2.mlp"  # the third MoE layer
    entry = report["checkpoints"][0]
    tokens = ids.reshape(-1).numpy()
    positions = np.tile(np.arange(BLOCK), ids.shape[0])
    for i, name in enumerate(report["layers"]):
        layer = entry["layers"][name]
        chosen = experts[i].numpy()  # [T, k]
        # load: assignments per expert
        assert layer["load_counts"] == np.bincount(chosen.reshape(-1), minlength=E).tolist()
        # the paper's specialisation by token id: mean population std of each frequent id's expert ratios
        counts = np.zeros((len(tokenizer), E))
        np.add.at(counts, (np.repeat(tokens, k), chosen.reshape(-1)), 1.0)
        occurrences = np.bincount(tokens, minlength=len(tokenizer))
        frequent = occurrences > 20
        ratios = counts[frequent] / counts[frequent].sum(1, keepdims=True)
        paper = layer["paper_specialisation"]["token_id"]
        assert paper["n_groups"] == int(frequent.sum()) > 0
        assert paper["mean_std"] == pytest.approx(ratios.std(axis=1).mean(), rel=1e-9)
        # drops under capacity factor 0.8 over each forward batch, by position bucket
        dropped = np.concatenate([
            _hand_drops(chosen.reshape(-1, BLOCK, k)[b:b + BATCH], 0.8, E).reshape(-1, k)
            for b in range(0, ids.shape[0], BATCH)])
        edges = layer["drop_rate_by_position"]["bucket_edges"]
        bucket = np.searchsorted(edges, positions, side="right") - 1
        want = [dropped[bucket == b].sum() / (k * (bucket == b).sum()) for b in range(len(edges) - 1)]
        assert layer["drop_rate_by_position"]["per_assignment"] == pytest.approx(want, abs=1e-12)
        assert want[-1] > want[0]  # position priority: the end of the sequence overflows first
    # one checkpoint: no curves over training, said so in the report
    assert "early_routing_learning" in report["not_measured"]
    assert "saturation_top1_by_step" not in report["summary"]
    assert "early_routing_vs_final" not in entry["layers"][report["paper_layer"]]
    figures = {"load_heatmap", "drop_rate", "drop_rate_by_order", "specialisation", "paper_specialisation",
               "std_vs_uniform", "coactivation"}
    assert set(report["figures"]) == figures
    for name in figures:
        assert (out / f"{name}.png").stat().st_size > 1000
    assert not (out / "saturation.png").exists() and not (out / "early_routing.png").exists()


def test_clear_errors(tmp_path, tokenizer, monkeypatch, capsys):
    dense = _save("llama", tmp_path / "dense", tokenizer)
    rc, cap = _cli(["--model", str(dense), f"out={tmp_path / 'o'}"], capsys)
    assert rc == 2
    line = cap.err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "model_type llama" in line and "mixtral" in line and "olmoe" in line
    assert not (tmp_path / "o").exists()

    rc, cap = _cli(["--model", str(tmp_path / "missing")], capsys)
    assert rc == 2 and "no such local directory" in cap.err

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, cap = _cli(["--model", "no-such-org-x9/no-such-moe"], capsys)
    assert rc == 2 and "HF_HUB_OFFLINE" in cap.err and "not in the local Hugging Face cache" in cap.err

    rc, cap = _cli(["--model", str(dense), "wandb=true"], capsys)
    assert rc == 2 and "files only" in cap.err
    rc, cap = _cli(["runs/x", "--model", str(dense)], capsys)
    assert rc == 2 and "not both" in cap.err
    rc, cap = _cli([], capsys)
    assert rc == 2 and "--model" in cap.err


def test_output_folder_name():
    from recipes.openmoe.analyze import model_output_name

    assert model_output_name("allenai/OLMoE-1B-7B-0924") == "allenai--OLMoE-1B-7B-0924"
    assert model_output_name("mistralai/Mixtral-8x7B-v0.1") == "mistralai--Mixtral-8x7B-v0.1"
    assert model_output_name("org/we ird:name") == "org--we_ird_name"
