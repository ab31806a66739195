"""FuseChat recipe (recipes/fusechat/): a cut `represent` resumes without recomputing finished shards,
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
from recipes.engine.config import load_config
from recipes.engine.runs import load_safetensors
from recipes.fusechat import represent


def save_tiny_model(out: Path, kind: str, vocab_size: int, seed: int) -> Path:
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


def save_tiny_models(root):
    """The pivot and two sources of the tests: tiny Llamas with their own tokenizers, saved under `root`."""
    return {"pivot": save_tiny_model(root / "pivot", "bpe", 400, 0),
            "code": save_tiny_model(root / "code", "unigram", 520, 1),
            "legal": save_tiny_model(root / "legal", "bpe", 460, 2)}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("fusechat_models"))


def fc_overrides(tiny_overrides, models, extra=()):
    sources = ", ".join(f"{{name: {n}, tokenizer: null, steps: 0, pretrained: '{models[n]}'}}"
                        for n in ("code", "legal"))
    return tiny_overrides + [
        f"fusechat.pivot.pretrained={models['pivot']}", "fusechat.pivot.steps=0", "fusechat.pivot.tokenizer=null",
        f"fusechat.sources=[{sources}]", "data.block_size=32", "data.batch_size=4", "fusechat.num_blocks=20",
        "fusechat.shard_blocks=8", "fusechat.represent_batch_size=4", "fusechat.target_steps=2",
        "fusechat.eval_max_blocks=24", "optim.warmup_steps=1", *extra]


def _mtimes(paths):
    return {p: p.stat().st_mtime_ns for p in paths}


def test_cut_represent_resumes_without_recomputing_finished_shards(tiny_overrides, tiny_models, tmp_path, monkeypatch):
    cfg = load_config("fusechat", fc_overrides(tiny_overrides, tiny_models))
    run_dir = tmp_path / "fc"
    real = represent.topk_representation
    calls = {"n": 0, "blocks": 0}

    def crashing(model, sequences, *args, **kw):
        calls["n"] += 1
        calls["blocks"] += len(sequences)
        if calls["n"] == 5:  # pivot shards 0-1 done (2 batches of 4 each); dies in shard 2 (4 blocks)
            raise KeyboardInterrupt("cut")
        return real(model, sequences, *args, **kw)

    monkeypatch.setattr(represent, "topk_representation", crashing)
    with pytest.raises(KeyboardInterrupt):
        fusechat.run_stages(cfg, run_dir, ["represent"])
    pivot_dir = run_dir / "represent" / "pivot"
    done = sorted(pivot_dir.glob("shard-*.safetensors"))
    assert [p.name for p in done] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    before = _mtimes(done)
    first = {p: load_safetensors(p) for p in done}

    def counting(model, sequences, *args, **kw):
        calls["blocks"] += len(sequences)
        return real(model, sequences, *args, **kw)

    calls.update(n=0, blocks=0)
    monkeypatch.setattr(represent, "topk_representation", counting)
    stats = fusechat.run_stages(cfg, run_dir, ["represent"])["represent"]
    # only the unfinished pivot shard (4 blocks) and both sources (20 blocks each) were computed
    assert stats["pivot"]["shards_computed"] == 1 and stats["code"]["shards_computed"] == 3
    assert calls["blocks"] == 4 + 20 + 20
    assert _mtimes(done) == before
    for p, tensors in first.items():
        again = load_safetensors(p)
        assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    assert not list(run_dir.rglob("*.tmp*"))

    # a complete stage computes nothing
    calls["blocks"] = 0
    stats = fusechat.run_stages(cfg, run_dir, ["represent"])["represent"]
    assert calls["blocks"] == 0 and all(stats[n]["shards_computed"] == 0 for n in ("pivot", "code", "legal"))



def test_fuse_command_continues_a_run_with_its_saved_settings(tiny_overrides, tiny_models, tmp_path):
    from recipes.engine.runs import load_run_config

    assert fusechat.main(["--stage", "represent", *fc_overrides(tiny_overrides, tiny_models), "run.run_id=cli"]) == 0
    run_dir = tmp_path / "runs" / "fusechat" / "cli"
    assert (run_dir / "stages" / "represent.json").exists() and not (run_dir / "align").exists()
    # the next stage needs only the run directory: its config.yaml holds the settings
    assert fusechat.main(["--stage", "align", "--run-dir", str(run_dir)]) == 0
    assert (run_dir / "align" / "code" / "dist-00002.safetensors").exists()
    assert (run_dir / "align" / "code" / "vocab_map-min_ed.npy").exists()
    # an override on top of the saved settings runs the stage again, without the outputs of the old value
    assert fusechat.main(["--stage", "align", "--run-dir", str(run_dir), "fusechat.vocab_map=exact"]) == 0
    assert (run_dir / "align" / "code" / "vocab_map-exact.npy").exists()
    assert not (run_dir / "align" / "code" / "vocab_map-min_ed.npy").exists()
    assert load_run_config(run_dir).fusechat.vocab_map == "exact"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) >= {"represent", "align"} and "merge" not in summary

def _recomputed_alignments(run_dir, models, source, options):
    """Every represented block of `source` aligned again from its token ids with data.alignment directly:
    [(source ids, pivot ids, alignment, one-to-one matches)]."""
    from transformers import AutoTokenizer

    from data.alignment import align_token_sequences, one_to_one_matches, substring_weight_of
    from recipes.fusechat.common import tokenizer_kind

    piv_tok = AutoTokenizer.from_pretrained(str(models["pivot"]))
    src_tok = AutoTokenizer.from_pretrained(str(models[source]))
    kinds = tokenizer_kind(src_tok), tokenizer_kind(piv_tok)
    out = []
    for shard in sorted((run_dir / "represent" / "pivot").glob("shard-*")):
        piv, src = load_safetensors(shard), load_safetensors(run_dir / "represent" / source / shard.name)
        for b in range(piv["input_ids"].shape[0]):
            p_ids = piv["input_ids"][b][: int(piv["length"][b])].tolist()
            s_ids = src["input_ids"][b][: int(src["length"][b])].tolist()
            s_tokens, p_tokens = src_tok.convert_ids_to_tokens(s_ids), piv_tok.convert_ids_to_tokens(p_ids)
            a = align_token_sequences(s_tokens, p_tokens, *kinds, substring_weight=substring_weight_of(options["cost"]),
                                      ties=options["ties"])
            out.append((s_ids, p_ids, a, one_to_one_matches(a, options["one_to_one"], s_tokens, p_tokens, *kinds)))
    return out, src_tok, piv_tok, kinds


def test_alignment_choices_default_to_ours_and_the_paper_preset_is_all_official(tiny_overrides, tiny_models):
    from recipes.fusechat.config import align_options

    def options(*extra):
        return align_options(load_config("fusechat", fc_overrides(tiny_overrides, tiny_models, list(extra))).fusechat)

    ours = {"cost": "containment_discount", "ties": "source_first", "one_to_one": "group", "ms_rule": "ours"}
    assert options() == ours  # the recipe's default (measured better: README)
    assert options("fusechat.align_preset=paper") == {k: "paper" for k in ours}
    assert options("fusechat.align_preset=paper", "fusechat.align_cost=containment_discount") == {
        "cost": "containment_discount", "ties": "paper", "one_to_one": "paper", "ms_rule": "paper"}


@pytest.mark.parametrize("preset", ["paper", "ours"])
def test_align_stage_follows_the_alignment_options(tiny_overrides, tiny_models, tmp_path, preset):
    from data.alignment import TokenAlignment, vocab_map_statistics
    from recipes.fusechat.align import vocab_list
    from recipes.fusechat.config import align_options

    cfg = load_config("fusechat", fc_overrides(tiny_overrides, tiny_models, [
        f"fusechat.align_preset={preset}", "fusechat.vocab_map=statistics"]))
    options = align_options(cfg.fusechat)
    assert options == {"paper": {"cost": "paper", "ties": "paper", "one_to_one": "paper", "ms_rule": "paper"},
                       "ours": {"cost": "containment_discount", "ties": "source_first", "one_to_one": "group",
                                "ms_rule": "ours"}}[preset]
    run_dir = tmp_path / "fc"
    summary = fusechat.run_stages(cfg, run_dir, ["represent", "align"])
    assert {k: summary["align"]["code"][k] for k in options} == options
    recomputed, src_tok, piv_tok, kinds = _recomputed_alignments(run_dir, tiny_models, "code", options)
    # The stored matches and DTW paths are data.alignment's for these options, block by block.
    stored = [load_safetensors(p) for p in sorted((run_dir / "align" / "code").glob("match-*"))]
    blocks = [(m, b) for m in stored for b in range(m["tgt_to_src"].shape[0])]
    assert len(blocks) == len(recomputed) == 20
    for (m, b), (_, p_ids, a, matches) in zip(blocks, recomputed):
        n = len(p_ids)
        assert m["tgt_to_src"][b][:n].tolist() == matches.tolist()
        first, last = a.tgt_src_ranges()
        assert m["src_first"][b][:n].tolist() == first.tolist() and m["src_last"][b][:n].tolist() == last.tolist()
    # The statistics map: the official rule counts every path pair, ours the one-to-one pairs.
    if options["ms_rule"] == "paper":
        corpus = [(s_ids, p_ids, a) for s_ids, p_ids, a, _ in recomputed]
    else:
        corpus = [(s_ids, p_ids, TokenAlignment(len(s_ids), len(p_ids), (), tuple(
            ((int(i),), (j,)) for j, i in enumerate(matches) if i >= 0), 0.0))
            for s_ids, p_ids, _, matches in recomputed]
    expected = vocab_map_statistics(corpus, vocab_list(src_tok, len(src_tok)), vocab_list(piv_tok, len(piv_tok)),
                                    *kinds, rule=options["ms_rule"])
    assert np.load(run_dir / "align" / "code" / "vocab_map-statistics.npy").tolist() == expected.tolist()
    fractions = summary["align"]["code"]
    assert 0 < fractions["matched_same_end_fraction"] <= fractions["matched_fraction"] <= 1
    assert fractions["matched_fraction"] == pytest.approx(fractions["one_to_one_fraction"])


def test_represent_outputs_match_an_independent_forward(tiny_overrides, tiny_models, tmp_path):
    from models.factory import load_pretrained

    cfg = load_config("fusechat", fc_overrides(tiny_overrides, tiny_models))
    run_dir = tmp_path / "fc"
    fusechat.run_stages(cfg, run_dir, ["represent"])
    layout = json.loads((run_dir / "represent" / "layout.json").read_text())
    assert len(layout["block_indices"]) == 20 and len(set(layout["block_indices"])) == 20
    shard = load_safetensors(run_dir / "represent" / "pivot" / "shard-00001.safetensors")
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

    src = load_safetensors(run_dir / "represent" / "code" / "shard-00001.safetensors")
    piv_tok = AutoTokenizer.from_pretrained(str(tiny_models["pivot"]))
    src_tok = AutoTokenizer.from_pretrained(str(tiny_models["code"]))
    n = int(src["length"][0])
    assert (src["input_ids"][0][n:] == -1).all() and (src["topk_ids"][0][n:] == -1).all()
    strip = lambda s: s.replace(" ", "")  # noqa: E731  (the Unigram's Metaspace adds a leading space)
    assert (strip(src_tok.decode(src["input_ids"][0][:n].tolist()))
            == strip(piv_tok.decode(shard["input_ids"][0].tolist())))


def test_pipeline_end_to_end_merged_model_loads_and_generates(tiny_overrides, tiny_models, tmp_path):
    from safetensors.torch import load_file

    from recipes.engine.build import build_base_model, build_datamodule

    # W&B offline: every sub-run gets a W&B run of its own (see the end of the test)
    cfg = load_config("fusechat", fc_overrides(tiny_overrides, tiny_models, ["fusechat.task_arithmetic_lam=1.0",
                                                                           "logging.wandb=offline"]))
    run_dir = tmp_path / "fc"
    summary = fusechat.run(cfg, run_dir)

    # align: where no one-to-one match, a one-hot (logit 0) on the pivot's gold NEXT token
    piv = load_safetensors(run_dir / "represent" / "pivot" / "shard-00000.safetensors")
    match = load_safetensors(run_dir / "align" / "code" / "match-00000.safetensors")["tgt_to_src"]
    dist = load_safetensors(run_dir / "align" / "code" / "dist-00000.safetensors")
    unmatched = (match[0, :-1] < 0).nonzero()[:, 0]
    assert len(unmatched) > 0 and 0.3 < summary["align"]["code"]["one_to_one_fraction"] < 1.0
    for i in unmatched.tolist():
        assert dist["topk_ids"][0, i, 0] == piv["input_ids"][0, i + 1] and dist["topk_logits"][0, i, 0] == 0
        assert (dist["topk_ids"][0, i, 1:] == -1).all()
    # matched rows: the source's top-k mapped through the vocabulary map (first = its best mapped id)
    vmap = np.load(run_dir / "align" / "code" / "vocab_map-min_ed.npy")
    src = load_safetensors(run_dir / "represent" / "code" / "shard-00000.safetensors")
    j = int((match[0] >= 0).nonzero()[0, 0])
    assert int(dist["topk_ids"][0, j, 0]) == vmap[int(src["topk_ids"][0, int(match[0, j]), 0])]

    # train: MinCE picked one whole candidate per sequence; the targets and the baseline were trained
    fused = load_safetensors(run_dir / "fused" / "code" / "shard-00000.safetensors")
    for b, c in enumerate(fused["choice"].long().tolist()):
        expect = piv if c == 0 else dist
        assert torch.equal(fused["topk_ids"][b].long(), expect["topk_ids"][b].long())
    for d in ("target_code", "target_legal", "clm_only"):
        s = json.loads((run_dir / d / "summary.json").read_text())
        assert s["step"] == 2
    assert json.loads((run_dir / "target_code/summary.json").read_text())["fusion/lam"] == 0.9

    # merge: task arithmetic (lam = 1) is pivot + sum of the target deltas, tensor by tensor
    base = load_file(str(tiny_models["pivot"] / "model.safetensors"))
    targets = [load_file(str(run_dir / f"target_{n}" / "hf" / "model.safetensors")) for n in ("code", "legal")]
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
               run_dir / "fused/legal/shard-00002.safetensors", run_dir / "target_code/hf/model.safetensors",
               run_dir / "merged/model.safetensors", run_dir / "evaluation.json", run_dir / "evaluation.png"]
    before = _mtimes(watched)
    again = fusechat.run(cfg, run_dir)
    assert _mtimes(watched) == before
    assert again["merge"]["evaluation"] == summary["merge"]["evaluation"]

    # a changed merge option re-runs the merge stage alone, and its outputs are made again
    ties_before = load_file(str(run_dir / "merged_ties" / "model.safetensors"))
    cfg = load_config("fusechat", fc_overrides(tiny_overrides, tiny_models, ["fusechat.task_arithmetic_lam=1.0",
                                                                           "logging.wandb=offline",
                                                                           "fusechat.ties_density=0.2"]))
    third = fusechat.run(cfg, run_dir)
    assert _mtimes(watched[:4]) == {p: before[p] for p in watched[:4]}  # represent, align, train: untouched
    ties_after = load_file(str(run_dir / "merged_ties" / "model.safetensors"))
    assert any(not torch.equal(ties_before[k], ties_after[k]) for k in ties_before)
    assert third["merge"]["evaluation"]["val_loss"]["pivot"] == summary["merge"]["evaluation"]["val_loss"]["pivot"]
    assert json.loads((run_dir / "stages" / "merge.json").read_text())["result"]["merge"]["evaluation"] \
        == third["merge"]["evaluation"]

    # every sub-run is a direct child of the run directory: its W&B id names this run, and it logged to a
    # W&B run of its own (not to the one the previous sub-run of the process started)
    from recipes.engine.runs import load_run_config, wandb_id_for

    for sub_run in ("target_code", "target_legal", "clm_only"):
        assert wandb_id_for(run_dir / sub_run) == f"{run_dir.name}-{sub_run}"
        runs = [p.name for p in (run_dir / sub_run / "wandb").glob("offline-run-*")]
        assert len(runs) == 1 and runs[0].endswith(f"-{run_dir.name}-{sub_run}"), runs
        saved = load_run_config(run_dir / sub_run)
        assert saved.run.root == str(run_dir.resolve()) and saved.run.run_id == sub_run
        assert "fusechat" in saved.logging.tags


def test_config_errors_are_clear(tiny_overrides, tiny_models):
    import re

    from recipes.engine.errors import ConfigError

    bad = {"fusechat.vocab_map=fuzzy": "fusechat.vocab_map", "fusechat.merge_method=avg": "merge method 'avg'",
           "fusechat.compare_merge_methods=[sce,mean]": "merge method 'mean'", "fusechat.lam=1.5": "fusechat.lam",
           "fusechat.temperature=0": "fusechat.temperature", "fusechat.ties_density=0": "fusechat.ties_density",
           "fusechat.sce_select_topk=2": "fusechat.sce_select_topk", "fusechat.dtw_band=-2": "fusechat.dtw_band",
           "fusechat.eval_max_blocks=-1": "fusechat.eval_max_blocks", "fusechat.target_steps=0": "target_steps",
           "fusechat.fusion=mean": "fusechat.fusion", "fusechat.ce_unit=char": "fusechat.ce_unit",
           "fusechat.logits_dtype=int8": "fusechat.logits_dtype", "fusechat.topk=0": "fusechat.topk",
           "fusechat.num_blocks=2": "fusechat.num_blocks", "fusechat.sources=[]": "sources is empty",
           "fusechat.pivot.name=code": "must be distinct", "fusechat.pivot.name=a/b": "fusechat.pivot.name",
           "fusechat.pivot.pretrained=/nonexistent/model": "not a save_pretrained directory",
           "fusechat.pivot.steps=5": "unknown embedded domain",
           "fusechat.ms_min_count=0": "fusechat.ms_min_count", "fusechat.eval_batch_size=0": "eval_batch_size",
           "fusechat.align_preset=official": "fusechat.align_preset", "fusechat.align_cost=cosine": "align_cost",
           "fusechat.align_ties=left": "fusechat.align_ties", "fusechat.one_to_one=strict": "fusechat.one_to_one",
           "fusechat.ms_rule=median": "fusechat.ms_rule", "fusechat.represent_dtype=int8": "represent_dtype",
           "fusechat.device_map=balanced": "fusechat.device_map must be auto or null"}
    for override, message in bad.items():
        trains = override.startswith("fusechat.pivot.steps")
        extra = [override] + (["fusechat.pivot.domains=[python]"] if trains else [])
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            load_config("fusechat", fc_overrides(tiny_overrides, tiny_models, extra))
        assert "\n" not in str(info.value)
    assert fusechat.main(["--stage", "distil"] + fc_overrides(tiny_overrides, tiny_models)) == 2
    # a stage after represent continues a run: it needs the run directory
    assert fusechat.main(["--stage", "align"] + fc_overrides(tiny_overrides, tiny_models)) == 2


def test_model_sub_runs_inherit_the_run_and_live_in_its_directory(tiny_overrides, tmp_path):
    from recipes.fusechat.common import model_config

    cfg = load_config("fusechat", tiny_overrides + ["trainer.precision=32-true", "logging.tags=[mine]"])
    source = cfg.fusechat.sources[0]  # the embedded default: Unigram on stdlib, context 192
    sub = model_config(cfg, source, tmp_path / "fc")
    assert (sub.run.name, sub.run.root, sub.run.run_id) == ("tiny", str(tmp_path / "fc"), "model_stdlib_unigram")
    assert list(sub.data.domains) == ["stdlib"] and sub.data.tokenizer == "unigram" and sub.data.vocab_size == 8192
    assert (sub.data.block_size, sub.data.batch_size, sub.data.cache_dir) == (192, 4, cfg.data.cache_dir)
    assert sub.trainer.max_steps == 300 and sub.trainer.precision == "32-true" and sub.optim.lr == 3e-3
    assert list(sub.logging.tags) == ["mine", "fusechat"] and sub.logging.wandb == "disabled"


@pytest.mark.parametrize("device_map", [None, "auto"])
def test_represent_loads_in_the_configured_dtype_and_placement(tiny_models, device_map):
    """fusechat.represent_dtype / device_map (the paper's: bf16, auto): bf16 weights as loaded, finite top-k and
    CE, the same representation as the float32 model up to bf16 rounding; device_map=auto (accelerate) places
    the model on this machine's devices (CPU only here)."""
    from recipes.fusechat.common import input_device, load_model

    ref = load_model(tiny_models["pivot"])
    model = load_model(tiny_models["pivot"], "bf16", device_map)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    if device_map == "auto" and not torch.cuda.is_available():  # one device: transformers places it whole there
        assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert input_device(model) == next(model.parameters()).device
    seqs = [list(range(5, 37)), list(range(40, 60))]
    got = represent.topk_representation(model, seqs, 0, 10, 400)
    want = represent.topk_representation(ref, seqs, 0, 10, 400)
    finite = got["topk_ids"] >= 0
    assert finite.sum() == 52 * 10 and torch.isfinite(got["topk_logits"][finite]).all()
    assert torch.isfinite(got["mean_ce"]).all()
    assert torch.allclose(got["mean_ce"], want["mean_ce"], atol=0.05)
    assert torch.allclose(got["topk_logits"][:, :, 0].nan_to_num(0, 0, 0), want["topk_logits"][:, :, 0].nan_to_num(
        0, 0, 0).float(), atol=0.05)


def test_device_map_auto_without_accelerate_names_the_package(tiny_models, monkeypatch):
    import importlib.util

    from recipes.engine.errors import ConfigError
    from recipes.fusechat.common import load_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(ConfigError, match="fusechat.device_map=auto needs the package accelerate"):
        load_model(tiny_models["pivot"], "bf16", "auto")


def test_a_source_reads_the_pivot_mask_through_the_text_and_the_ce_counts_only_masked_tokens(tiny_models, tmp_path):
    """Chat data (data.loss_on=assistant): a pivot block's mask carried to a source with another tokenizer via
    the decoded text, and topk_representation's mean CE over the counted predictions only."""
    from transformers import AutoTokenizer

    from data.chat import decoded_spans, token_mask
    from recipes.fusechat.common import load_model
    from tests.test_shards import TWO_TURNS, chat_datamodule

    dm = chat_datamodule(tmp_path, [TWO_TURNS] * 4, block_size=15)  # word-level pivot tokens, one chat a block
    ids, mask = dm.train_set[0]["input_ids"].tolist(), dm.train_set.loss_mask(0)
    text, spans = decoded_spans(dm.tokenizer, ids, mask)
    # the counted pivot tokens' text (the word decoder joins words with spaces): the assistant's turn, its
    # end-of-turn and the EOS, from the space that its first word's decoding brings
    start = text.index(" Hello")
    assert spans == [(start, len(text))]
    assert text[start:] == " Hello you <|end_of_turn|> </s>", text
    source = AutoTokenizer.from_pretrained(str(tiny_models["pivot"]))  # byte-level BPE: cuts the text otherwise
    enc = source(text, add_special_tokens=False, return_offsets_mapping=True)
    got = token_mask(np.asarray(enc["offset_mapping"]), spans)
    want = [int(end > start) for _, end in enc["offset_mapping"]]  # a token ending inside the assistant text
    assert got.tolist() == want and 0 < sum(want) < len(want)

    model = load_model(tiny_models["pivot"])
    seq, seq_mask = enc["input_ids"][-40:], got[-40:]  # the end of the block: both kinds of token
    assert 0 < seq_mask[1:].sum() < 39
    out = represent.topk_representation(model, [seq], 0, 10, 400, masks=[seq_mask])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, :, :400].double(), -1)
    terms = [-logp[i, seq[i + 1]].item() for i in range(len(seq) - 1) if seq_mask[i + 1]]
    assert out["num_predicted"].item() == len(terms)
    assert out["mean_ce"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert out["loss_mask"][0].tolist() == seq_mask.tolist()


def test_sigterm_during_the_merge_stage_stops_at_the_next_tensor_and_leaves_nothing(tmp_path):
    # a real SIGTERM to a process in FuseChat's merge (the command line records SIGTERM instead of dying): the
    # merge stops at the next tensor with RunInterrupted (exit 143), its temporary folder and file are gone; a
    # folder left by a merge killed earlier is removed by the next merge, which completes
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    from tests.conftest import ROOT

    g = torch.Generator().manual_seed(0)
    dirs = []
    for name in ("pivot", "t1", "t2"):
        d = tmp_path / name
        d.mkdir()
        save_file({f"w{i}": torch.randn(8, generator=g) for i in range(6)}, str(d / "model.safetensors"))
        (d / "config.json").write_text("{}")
        dirs.append(d)
    out = tmp_path / "run" / "merged"
    out.parent.mkdir()
    script = f"""
import signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from recipes.engine.early_signals import record_early_signal
from recipes.engine.loop import RunInterrupted
from models.merging import register_merge, task_arithmetic
from recipes.fusechat.merge import merge_models

signal.signal(signal.SIGTERM, record_early_signal)

@register_merge("slow_ta")
def slow_ta(b, models):
    print("tensor", flush=True)
    time.sleep(float(sys.argv[1]))
    return task_arithmetic(b, models)

try:
    merge_models("slow_ta", Path({str(dirs[0])!r}), [Path({str(dirs[1])!r}), Path({str(dirs[2])!r})],
                 Path({str(out)!r}))
except RunInterrupted as e:
    print("interrupted:", e, file=sys.stderr)
    sys.exit(e.exit_code)
print("done", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", script, "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "tensor"  # the first tensor is being merged
        assert [p.name for p in out.parent.iterdir()] == [f"merged.tmp{proc.pid}"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM during the merge stage (slow_ta, tensor w1)" in err  # stopped before the second tensor
    assert list(out.parent.iterdir()) == []  # no folder, no temporary file
    stale = out.parent / "merged.tmp99999999"  # as a SIGKILLed merge leaves it
    stale.mkdir()
    (stale / ".model.safetensors.x.tmp").write_bytes(b"\0" * 64)
    r = subprocess.run([sys.executable, "-c", script, "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("done"), r.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]
    merged = load_file(str(out / "model.safetensors"))
    ref = [load_file(str(d / "model.safetensors")) for d in dirs]
    for k, v in merged.items():
        b = ref[0][k]
        assert torch.equal(v, b + 0.3 * ((ref[1][k] - b) + (ref[2][k] - b)))  # task arithmetic, lam 0.3
