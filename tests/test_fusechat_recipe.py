"""FuseChat recipe (recipes/fusechat.py): a cut `represent` resumes without recomputing finished shards,
the stored representations and aligned distributions are what they claim, and the tiny pipeline runs end
to end into a merged model that `model.pretrained=` loads and that generates.

The pivot and sources are tiny random Llamas saved with `save_pretrained` next to small tokenizers of two
kinds (byte-level BPE and Unigram) trained in the test, used with steps=0 (the path a user's checkpoint
takes), so only the fusion targets are trained with Lightning.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import recipes.fusechat as fusechat
from recipes.config import load_config


def _save_model(out: Path, kind: str, vocab_size: int, seed: int) -> Path:
    from transformers import PreTrainedTokenizerFast

    from data.corpus import embedded_documents
    from data.tokenizers import EOS, PAD, UNK, train_tokenizer
    from models.factory import ModelSpec, build_model

    docs = embedded_documents(("pydoc", "stdlib", "licenses"), 40_000)
    raw = train_tokenizer(kind, vocab_size, [d for dom in sorted(docs) for d in docs[dom]])
    extra = {"unk_token": UNK} if kind == "unigram" else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS, pad_token=PAD, **extra)
    torch.manual_seed(seed)
    model = build_model(ModelSpec("llama", "tiny", len(tok), 64, dict(hidden_size=32, intermediate_size=64,
                                                                       num_hidden_layers=2, num_attention_heads=2,
                                                                       num_key_value_heads=2),
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusechat_models")
    return {"pivot": _save_model(root / "pivot", "bpe", 400, 0),
            "code": _save_model(root / "code", "unigram", 520, 1),
            "legal": _save_model(root / "legal", "bpe", 460, 2)}


def _overrides(tiny_overrides, models, extra=()):
    sources = ", ".join(f"{{name: {n}, tokenizer: null, steps: 0, pretrained: '{models[n]}'}}" for n in ("code", "legal"))
    return tiny_overrides + [
        f"fusechat.pivot.pretrained={models['pivot']}", "fusechat.pivot.steps=0", "fusechat.pivot.tokenizer=null",
        f"fusechat.sources=[{sources}]", "data.block_size=32", "data.batch_size=4", "fusechat.num_blocks=20",
        "fusechat.shard_blocks=8", "fusechat.represent_batch_size=4", "fusechat.target_steps=2",
        "fusechat.eval_max_blocks=24", "optim.warmup_steps=1", *extra]


def _mtimes(paths):
    return {p: p.stat().st_mtime_ns for p in paths}


def test_cut_represent_resumes_without_recomputing_finished_shards(tiny_overrides, tiny_models, tmp_path, monkeypatch):
    cfg = load_config("fusechat", _overrides(tiny_overrides, tiny_models))
    run_dir = tmp_path / "fc"
    real = fusechat.topk_representation
    calls = {"n": 0, "blocks": 0}

    def crashing(model, sequences, *args, **kw):
        calls["n"] += 1
        calls["blocks"] += len(sequences)
        if calls["n"] == 5:  # pivot shards 0-1 done (2 batches of 4 each); dies in shard 2 (4 blocks)
            raise KeyboardInterrupt("cut")
        return real(model, sequences, *args, **kw)

    monkeypatch.setattr(fusechat, "topk_representation", crashing)
    with pytest.raises(KeyboardInterrupt):
        fusechat.run_stages(cfg, run_dir, ["represent"])
    pivot_dir = run_dir / "represent" / "pivot"
    done = sorted(pivot_dir.glob("shard-*.safetensors"))
    assert [p.name for p in done] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    before = _mtimes(done)
    first = {p: fusechat._load_shard(p) for p in done}

    def counting(model, sequences, *args, **kw):
        calls["blocks"] += len(sequences)
        return real(model, sequences, *args, **kw)

    calls.update(n=0, blocks=0)
    monkeypatch.setattr(fusechat, "topk_representation", counting)
    stats = fusechat.run_stages(cfg, run_dir, ["represent"])["represent"]
    # only the unfinished pivot shard (4 blocks) and both sources (20 blocks each) were computed
    assert stats["pivot"]["shards_computed"] == 1 and stats["code"]["shards_computed"] == 3
    assert calls["blocks"] == 4 + 20 + 20
    assert _mtimes(done) == before
    for p, tensors in first.items():
        again = fusechat._load_shard(p)
        assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    assert not list(run_dir.rglob("*.tmp*"))

    # a complete stage computes nothing
    calls["blocks"] = 0
    stats = fusechat.run_stages(cfg, run_dir, ["represent"])["represent"]
    assert calls["blocks"] == 0 and all(stats[n]["shards_computed"] == 0 for n in ("pivot", "code", "legal"))


def test_represent_outputs_match_an_independent_forward(tiny_overrides, tiny_models, tmp_path):
    from models.factory import load_pretrained

    cfg = load_config("fusechat", _overrides(tiny_overrides, tiny_models))
    run_dir = tmp_path / "fc"
    fusechat.run_stages(cfg, run_dir, ["represent"])
    layout = json.loads((run_dir / "represent" / "layout.json").read_text())
    assert len(layout["block_indices"]) == 20 and len(set(layout["block_indices"])) == 20
    shard = fusechat._load_shard(run_dir / "represent" / "pivot" / "shard-00001.safetensors")
    model = load_pretrained(str(tiny_models["pivot"])).eval()
    ids = shard["input_ids"][:2].long()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    # row i holds the top-10 of the logits at i (the prediction of token i + 1)
    top = logits.topk(10, dim=-1)
    assert torch.equal(shard["topk_ids"][:2].long(), top.indices)
    assert torch.allclose(shard["topk_logits"][:2].double(), top.values, atol=2e-2)  # stored as float16
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.allclose(shard["mean_ce"][:2].double(), nll.mean(1), atol=1e-5)
    assert shard["num_predicted"][:2].tolist() == [31, 31]

    # a source sees the same text in its own tokens: decoding both gives the same string
    from transformers import AutoTokenizer

    src = fusechat._load_shard(run_dir / "represent" / "code" / "shard-00001.safetensors")
    piv_tok = AutoTokenizer.from_pretrained(str(tiny_models["pivot"]))
    src_tok = AutoTokenizer.from_pretrained(str(tiny_models["code"]))
    n = int(src["length"][0])
    assert (src["input_ids"][0][n:] == -1).all() and (src["topk_ids"][0][n:] == -1).all()
    strip = lambda s: s.replace(" ", "")  # noqa: E731  (the Unigram's Metaspace adds a leading space)
    assert strip(src_tok.decode(src["input_ids"][0][:n].tolist())) == strip(piv_tok.decode(shard["input_ids"][0].tolist()))


def test_pipeline_end_to_end_merged_model_loads_and_generates(tiny_overrides, tiny_models, tmp_path):
    from safetensors.torch import load_file

    from recipes.train import build_base_model, build_datamodule

    cfg = load_config("fusechat", _overrides(tiny_overrides, tiny_models, ["fusechat.task_arithmetic_lam=1.0"]))
    run_dir = tmp_path / "fc"
    summary = fusechat.run(cfg, run_dir)

    # align: where no one-to-one match, a one-hot (logit 0) on the pivot's gold NEXT token
    piv = fusechat._load_shard(run_dir / "represent" / "pivot" / "shard-00000.safetensors")
    match = fusechat._load_shard(run_dir / "align" / "code" / "match-00000.safetensors")["tgt_to_src"]
    dist = fusechat._load_shard(run_dir / "align" / "code" / "dist-00000.safetensors")
    unmatched = (match[0, :-1] < 0).nonzero()[:, 0]
    assert len(unmatched) > 0 and 0.3 < summary["align"]["code"]["one_to_one_fraction"] < 1.0
    for i in unmatched.tolist():
        assert dist["topk_ids"][0, i, 0] == piv["input_ids"][0, i + 1] and dist["topk_logits"][0, i, 0] == 0
        assert (dist["topk_ids"][0, i, 1:] == -1).all()
    # matched rows: the source's top-k mapped through the vocabulary map (first = its best mapped id)
    vmap = np.load(run_dir / "align" / "code" / "vocab_map-min_ed.npy")
    src = fusechat._load_shard(run_dir / "represent" / "code" / "shard-00000.safetensors")
    j = int((match[0] >= 0).nonzero()[0, 0])
    assert int(dist["topk_ids"][0, j, 0]) == vmap[int(src["topk_ids"][0, int(match[0, j]), 0])]

    # train: MinCE picked one whole candidate per sequence; the targets and the baseline were trained
    fused = fusechat._load_shard(run_dir / "fused" / "code" / "shard-00000.safetensors")
    for b, c in enumerate(fused["choice"].long().tolist()):
        expect = piv if c == 0 else dist
        assert torch.equal(fused["topk_ids"][b].long(), expect["topk_ids"][b].long())
    for d in ("targets/code", "targets/legal", "clm_only"):
        s = json.loads((run_dir / d / "summary.json").read_text())
        assert s["step"] == 2
    assert json.loads((run_dir / "targets/code/summary.json").read_text())["fusion/lam"] == 0.9

    # merge: task arithmetic (lam = 1) is pivot + sum of the target deltas, tensor by tensor
    base = load_file(str(tiny_models["pivot"] / "model.safetensors"))
    targets = [load_file(str(run_dir / "targets" / n / "hf" / "model.safetensors")) for n in ("code", "legal")]
    merged_ta = load_file(str(run_dir / "merged_task_arithmetic" / "model.safetensors"))
    for name, b in base.items():
        assert torch.allclose(merged_ta[name], b + (targets[0][name] - b) + (targets[1][name] - b), atol=1e-6)
    assert not torch.equal(targets[0]["model.embed_tokens.weight"], base["model.embed_tokens.weight"])

    ev = summary["merge"]["evaluation"]["val_loss"]
    assert set(ev) == {"pivot", "clm_only", "target_code", "target_legal", "merged_sce", "merged_varm",
                       "merged_task_arithmetic", "merged_ties"}
    assert all(math.isfinite(v) for losses in ev.values() for v in losses.values())
    assert isinstance(summary["merge"]["merged_sample"], str) and summary["merge"]["merged_sample"].startswith("def")
    assert (run_dir / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the merged model loads through model.pretrained= and generates new tokens
    merged = run_dir / "merged"
    sub = load_config("tiny", tiny_overrides + [f"model.pretrained={merged}", f"data.tokenizer={merged}",
                                                "data.block_size=32"])
    dm = build_datamodule(sub)
    model = build_base_model(sub, dm).eval()
    prompt = torch.tensor([dm.tokenizer("def f(x):", add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                         pad_token_id=dm.tokenizer.pad_token_id)
    assert out.shape[1] == prompt.shape[1] + 5 and torch.equal(out[0, : prompt.shape[1]], prompt[0])

    # a second run skips every complete stage: nothing is rewritten
    watched = [run_dir / "represent/code/shard-00000.safetensors", run_dir / "align/code/dist-00000.safetensors",
               run_dir / "fused/legal/shard-00002.safetensors", run_dir / "targets/code/hf/model.safetensors",
               run_dir / "merged/model.safetensors", run_dir / "evaluation.json", run_dir / "evaluation.png"]
    before = _mtimes(watched)
    again = fusechat.run(cfg, run_dir)
    assert _mtimes(watched) == before
    assert again["merge"]["evaluation"] == summary["merge"]["evaluation"]


def test_config_errors_are_clear(tiny_overrides, tiny_models):
    from recipes.config import ConfigError

    with pytest.raises(ConfigError, match="fusechat.vocab_map"):
        fusechat.run_stages(load_config("fusechat", _overrides(tiny_overrides, tiny_models, ["fusechat.vocab_map=fuzzy"])),
                            Path("/nonexistent"), ["align"])
    with pytest.raises(ConfigError, match="merge method 'avg'"):
        fusechat.run_stages(load_config("fusechat", _overrides(tiny_overrides, tiny_models, ["fusechat.merge_method=avg"])),
                            Path("/nonexistent"), ["merge"])
    assert fusechat.main(["--stage", "distil"] + _overrides(tiny_overrides, tiny_models)) == 2
