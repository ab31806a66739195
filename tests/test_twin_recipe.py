import json
import math
import shutil

import pytest
import torch

from recipes.engine.config import ConfigError, load_config
from recipes.engine.loop import resume_run, train


def test_twin_merging_pipeline_end_to_end_and_resumes(tiny_overrides):
    # the paper protocol with a short router schedule (custom: the paper's values for the keys not set here)
    overrides = tiny_overrides + ["twin.base_steps=6", "twin.finetune_steps=3", "twin.eval_batches=1",
                                  "twin.protocol=custom", "twin.router_epochs=5", "twin.router_train_blocks=32",
                                  "run.run_id=e2e"]
    run_dir = train(load_config("twin_merging", overrides))
    s = json.loads((run_dir / "summary.json").read_text())
    doms = ["pydoc", "stdlib", "licenses"]
    methods = {"base", "task_arithmetic", "ties", "twin_merging"} | {f"finetuned_{d}" for d in doms}
    assert set(s["test_loss"]) == methods
    for m in methods:
        assert set(s["test_loss"][m]) == set(doms)
        assert all(math.isfinite(v) for v in s["test_loss"][m].values())
    # normalised score definition: base -> 0, each specialist on its own domain -> 1
    for d in doms:
        assert s["normalised_score"]["base"][d] == 0.0
        assert abs(s["normalised_score"][f"finetuned_{d}"][d] - 1.0) < 1e-12
    for m in methods:
        mean = sum(s["normalised_score"][m][d] for d in doms) / 3
        assert abs(s["twin/normalised_mean/" + m] - mean) < 1e-12
    assert s["expert_storage_bytes"] < s["dense_task_vector_bytes"]
    assert 0.0 <= s["router_test_acc"] <= 1.0
    assert (run_dir / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run_dir / "table.json").read_text())["test_loss"] == s["test_loss"]
    # weights are safetensors, metadata JSON: nothing pickled outside the Lightning checkpoints
    assert not list(run_dir.glob("*.pt")) and not list((run_dir / "experts").glob("*.pt"))
    assert not list(run_dir.rglob("*.tmp"))
    router_meta = json.loads((run_dir / "router.json").read_text())
    assert router_meta["select_acc"] == s["router_select_acc"] and router_meta["domains"] == doms
    # resuming the run skips every completed stage: trained weights, experts and router are untouched
    files = [run_dir / "base/hf/model.safetensors", run_dir / "ft_pydoc/hf/model.safetensors",
             run_dir / "experts/experts.safetensors", run_dir / "experts/shared.safetensors",
             run_dir / "experts/experts.json", run_dir / "router.safetensors", run_dir / "router.json"]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    s2 = resume_run(run_dir)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert json.loads((s2 / "summary.json").read_text())["test_loss"] == s["test_loss"]
    # a changed setting re-runs its stage and the later ones: here the router, retrained on the state after an
    # 8-token prefix (generation-time routing), and the evaluation
    s3 = json.loads((resume_run(run_dir, ["twin.router_prefix_len=8"]) / "summary.json").read_text())
    assert json.loads((run_dir / "router.json").read_text())["prefix_len"] == 8 and s3["router_prefix_len"] == 8
    assert (run_dir / "router.safetensors").stat().st_mtime_ns != stamps[run_dir / "router.safetensors"]
    assert s3["test_loss"]["base"] == s["test_loss"]["base"]
    # ... and nothing before the router: trained models and experts are untouched
    assert all(p.stat().st_mtime_ns == stamps[p] for p in files[:5])
    # a run directory from before the stage markers and stamps reuses every complete output (and stamps it),
    # and redoes an incomplete one: here the router, as if killed before router.json
    stamps3 = {p: p.stat().st_mtime_ns for p in files}
    shutil.rmtree(run_dir / "stages")
    for stamp_file in run_dir.glob("*/twin_stamp.json"):
        stamp_file.unlink()
    meta_file = run_dir / "experts/experts.json"
    meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items() if k != "stamp"}))
    (run_dir / "router.json").unlink()
    s4 = json.loads((resume_run(run_dir) / "summary.json").read_text())
    assert all(stamps3[p] == p.stat().st_mtime_ns for p in files[:4])
    assert (run_dir / "router.safetensors").stat().st_mtime_ns != stamps3[run_dir / "router.safetensors"]
    assert "stamp" in json.loads(meta_file.read_text()) and (run_dir / "base/twin_stamp.json").exists()
    assert s4["test_loss"] == s3["test_loss"] and s4["router_select_acc"] == s3["router_select_acc"]
    # a setting of the experts stage rebuilds the experts and everything after them, not the trained models
    stamps4 = {p: p.stat().st_mtime_ns for p in files}
    s5 = json.loads((resume_run(run_dir, ["twin.lam=0.5"]) / "summary.json").read_text())
    assert all(p.stat().st_mtime_ns == stamps4[p] for p in files[:2])
    assert all(p.stat().st_mtime_ns != stamps4[p] for p in files[2:])
    assert json.loads((run_dir / "experts/experts.json").read_text())["lam"] == 0.5
    assert s5["test_loss"]["base"] == s["test_loss"]["base"]
    assert s5["test_loss"]["task_arithmetic"] != s3["test_loss"]["task_arithmetic"]


@pytest.mark.slow  # ~40 s each: three Lightning runs; the fast paths are tests/test_twin.py::test_recipe_builds_*
@pytest.mark.parametrize("protocol", ["ours", "paper"])  # dense deltas s * B @ A | factor-wise (A, B)
def test_twin_merging_lora_finetunes_give_lora_experts(tiny_overrides, protocol):
    from safetensors.torch import load_file

    from models.factory import load_pretrained
    from models.twin import LowRank, load_experts, lora_dense_state, merge_lora_factorwise
    from recipes.twin_merging.experts import finetuned_lora_factors, finetuned_state, load_shared_lora
    rank, doms = 2, ["pydoc", "stdlib"]
    overrides = tiny_overrides + ["twin.base_steps=4", "twin.finetune_steps=2", "twin.eval_batches=1",
                                  "twin.protocol=custom", "twin.router_epochs=3", "twin.router_train_blocks=16",
                                  "run.run_id=lora", "twin.finetune=lora", f"twin.lora_rank={rank}",
                                  "twin.lora_targets=[q_proj,v_proj]", f"twin.rank={2 * rank}",
                                  "data.domains=[pydoc,stdlib]", "twin.finetune_lr=1e-2"]
    overrides += ["twin.lora_merge=dense"] if protocol == "ours" else []
    run_dir = train(load_config("twin_merging", overrides))
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["finetune"] == "lora" and set(s["test_loss"]["twin_merging"]) == set(doms)
    # the fine-tune stage stored a peft adapter (the export's own folder or its adapter/ subfolder)
    from recipes.twin_merging.experts import adapter_dir
    assert (adapter_dir(run_dir / "ft_pydoc/hf") / "adapter_model.safetensors").exists()
    experts = load_experts(str(run_dir / "experts/experts.safetensors"))
    shared = load_file(str(run_dir / "experts/shared.safetensors"))
    base_sd = load_pretrained(str(run_dir / "base/hf")).state_dict()
    if protocol == "paper":
        # factor-wise: shared factors lam * sum_t A_t, lam * sum_t B_t; experts A_t - A_sh, B_t - B_sh (rank <= 2:
        # kept exactly), so one-hot routing gives back each fine-tune and the shared model is base + s B_sh A_sh
        shared_f = load_shared_lora(run_dir / "experts")
        scaling = json.loads((run_dir / "experts/experts.json").read_text())["scaling"]
        loaded = [finetuned_lora_factors(run_dir / "base/hf", run_dir / f"ft_{d}/hf") for d in doms]
        for key, (a, b) in shared_f.items():
            assert torch.allclose(a, 0.29 * (loaded[0][0][key][0] + loaded[1][0][key][0]), atol=1e-6)
            assert torch.allclose(b, 0.29 * (loaded[0][0][key][1] + loaded[1][0][key][1]), atol=1e-6)
        for k, v in lora_dense_state(base_sd, shared_f, scaling).items():
            assert torch.allclose(shared[k], v, atol=1e-6)
        for t, d in enumerate(doms):
            assert all(k.endswith((".lora_A", ".lora_B")) and isinstance(v, LowRank) and v.rank == rank
                       for k, v in experts[t].items())
            one_hot = merge_lora_factorwise(base_sd, shared_f, experts, [float(i == t) for i in range(2)], scaling)
            tuned, keys = finetuned_state("lora", run_dir / "base/hf", run_dir / f"ft_{d}/hf")
            for k in tuned:
                assert torch.allclose(one_hot[k], tuned[k], atol=1e-5)
            assert max(float((tuned[k] - base_sd[k]).abs().max()) for k in keys) > 1e-4  # trained adapters
        return
    for t, d in enumerate(doms):
        # experts cover exactly the adapted matrices, as factors
        assert experts[t] and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in experts[t])
        assert all(isinstance(v, LowRank) and v.rank == 2 * rank for v in experts[t].values())
        # tau_t = delta_t - 0.3 (delta_1 + delta_2) has rank <= 2 * lora_rank, so the SVD keeps it exactly:
        # shared + expert_t reproduces the fine-tuned weights base + scaling * B @ A
        tuned, keys = finetuned_state("lora", run_dir / "base/hf", run_dir / f"ft_{d}/hf")
        assert sorted(experts[t]) == keys
        moved = 0.0
        for k in keys:
            assert torch.allclose(shared[k] + experts[t][k].dense(), tuned[k], atol=1e-5)
            moved = max(moved, float((tuned[k] - base_sd[k]).abs().max()))
        assert moved > 1e-4  # the adapters were trained (B starts at zero)
        for k in base_sd:
            if k not in keys:
                assert torch.equal(tuned[k], base_sd[k]) and torch.equal(shared[k], base_sd[k])


@pytest.mark.parametrize("override,match", [
    ("twin.finetune=qlora", "twin.finetune"), ("data.domains=[pydoc]", "two domains"),
    ("twin.ties_density=1.5", "twin.ties_density"), ("twin.rank=0", "twin.rank"), ("twin.rank=2.5", "whole number"),
    ("twin.lam=-1", "twin.lam"), ("twin.router_prefix_len=-1", "router_prefix_len"),
    ("twin.router_prefix_len=999", "router_prefix_len"), ("twin.eval_batches=0", "twin.eval_batches"),
    ("twin.lora_targets=[]", "twin.lora_targets"), ("twin.lora_rank=0", "twin.lora_rank"),
    ("data.domains=[pydoc,nope]", "unknown embedded domain"), ("data.domains=[pydoc,pydoc]", "twice"),
    ("model.pretrained=/somewhere", "model.pretrained"), ("data.source=files", "data.source"),
    ("trainer.devices=2", "one process"), ("trainer.devices=[0,1]", "one process")])
def test_twin_config_errors_at_load(tiny_overrides, override, match):
    # every option is checked when the config is loaded, before any stage runs: one line, no traceback
    with pytest.raises(ConfigError, match=match) as e:
        load_config("twin_merging", tiny_overrides + [override, "run.run_id=bad"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override,match", [
    ("twin_lora_ft.rank=0", "twin_lora_ft.rank"), ("twin_lora_ft.alpha=0", "twin_lora_ft.alpha"),
    ("twin_lora_ft.dropout=1.0", "twin_lora_ft.dropout"), ("twin_lora_ft.targets=[]", "twin_lora_ft.targets")])
def test_twin_lora_ft_config_errors_at_load(tiny_overrides, override, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config("twin_lora_ft", tiny_overrides + [override])
    assert "\n" not in str(e.value)


def test_sub_run_configs_inherit_the_parent(tiny_overrides, tmp_path):
    from recipes.twin_merging.stages import base_config, finetune_config
    cfg = load_config("twin_merging", tiny_overrides + [
        "twin.base_steps=7", "twin.finetune_steps=3", "twin.finetune_lr=2e-3", "optim.betas=[0.8,0.9]",
        "run.seed=5", "data.block_size=64", "trainer.precision=32-true", "logging.tags=[mine]",
        "twin.finetune=lora", "twin.lora_rank=3", "twin.lora_targets=[q_proj]"])
    run_dir = tmp_path / "r"
    base = base_config(cfg, run_dir)
    assert base.run.name == "tiny" and base.trainer.max_steps == 7 and base.run.seed == 5
    assert base.data.block_size == 64 and list(base.data.domains) == list(cfg.data.domains)
    assert base.data.cache_dir == cfg.data.cache_dir and base.trainer.precision == "32-true"
    assert list(base.optim.betas) == [0.8, 0.9] and base.optim.lr == cfg.optim.lr
    assert list(base.logging.tags) == ["mine", "twin_merging"] and not base.model.pretrained
    ft = finetune_config(cfg, run_dir, "stdlib")
    assert ft.run.name == "twin_lora_ft" and ft.run.run_id == "ft_stdlib" and list(ft.data.domains) == ["stdlib"]
    assert ft.model.pretrained == str((run_dir / "base" / "hf").resolve())
    assert ft.trainer.max_steps == 3 and ft.optim.lr == 2e-3 and ft.optim.weight_decay == 0.0
    assert ft.twin_lora_ft.rank == 3 and list(ft.twin_lora_ft.targets) == ["q_proj"]


def test_stage_keys_router_prefix_retrains_only_the_router(tiny_overrides):
    from recipes.engine.pipeline import fingerprint
    from recipes.twin_merging.stages import stages, stamp
    a = load_config("twin_merging", tiny_overrides)
    b = load_config("twin_merging", tiny_overrides + ["twin.router_prefix_len=8"])
    names = [s.name for s in stages(a)]
    assert names == ["base", "finetune_pydoc", "finetune_stdlib", "finetune_licenses", "experts", "router",
                     "evaluate"]
    changed = [s.name for s in stages(a) if fingerprint(a, s.keys) != fingerprint(b, s.keys)]
    assert changed == ["router"]
    assert [n for n in names if stamp(a, n) != stamp(b, n)] == ["router", "evaluate"]
    # a setting of an early stage changes the stamps of that stage and of everything after it
    c = load_config("twin_merging", tiny_overrides + ["twin.finetune_steps=7"])
    assert [n for n in names if stamp(a, n) != stamp(c, n)] == names[1:]
    # lora options matter only to LoRA fine-tunes
    d = load_config("twin_merging", tiny_overrides + ["twin.lora_rank=3"])
    assert all(stamp(a, n) == stamp(d, n) for n in names)


def test_training_stage_redoes_outputs_of_other_settings(tiny_overrides, tmp_path, monkeypatch):
    # a training stage reuses its hf/ only when its stamp is the current one (or it has none: an older run
    # directory); another stamp's outputs and checkpoints are removed and the sub-run trains from step 0
    import recipes.engine.export as engine_export
    import recipes.engine.loop as engine_loop
    from recipes.twin_merging.stages import STAMP_FILE, base_config, train_and_export
    calls = []

    def fake_train(sub, run_dir, resume):
        calls.append(resume)
        (run_dir / "summary.json").write_text(json.dumps({"step": sub.trainer.max_steps}))

    def fake_export(stage_dir, out_dir):
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_text("new")

    monkeypatch.setattr(engine_loop, "train", fake_train)
    monkeypatch.setattr(engine_export, "export", fake_export)
    cfg = load_config("twin_merging", tiny_overrides)
    run_dir = tmp_path / "run"
    stage = run_dir / "base"
    (stage / "hf").mkdir(parents=True)
    (stage / "hf/model.safetensors").write_text("old")
    assert train_and_export(cfg, run_dir, "base", base_config(cfg, run_dir), "A") == stage / "hf"  # no stamp
    assert calls == [] and json.loads((stage / STAMP_FILE).read_text())["stamp"] == "A"
    assert train_and_export(cfg, run_dir, "base", base_config(cfg, run_dir), "A") == stage / "hf"
    assert calls == [] and (stage / "hf/model.safetensors").read_text() == "old"
    (stage / "checkpoints").mkdir()
    (stage / "checkpoints/last.ckpt").write_text("not a checkpoint of these settings")
    assert train_and_export(cfg, run_dir, "base", base_config(cfg, run_dir), "B") == stage / "hf"
    assert calls == [False] and (stage / "hf/model.safetensors").read_text() == "new"
    assert not (stage / "checkpoints/last.ckpt").exists() and not (stage / "hf.tmp").exists()
    assert json.loads((stage / STAMP_FILE).read_text())["stamp"] == "B"


def test_wandb_table_offline(tmp_path, monkeypatch):
    from recipes.twin_merging.evaluate import log_to_wandb, normalised_scores, plot_scores
    monkeypatch.setenv("WANDB_MODE", "offline")
    doms = ["a", "b"]
    table = {"base": {"a": 3.0, "b": 4.0}, "finetuned_a": {"a": 2.0, "b": 4.5}, "finetuned_b": {"a": 3.5, "b": 2.0},
             "twin_merging": {"a": 2.5, "b": 2.5}}
    norm = normalised_scores(table, doms)
    # hand-computed: (3 - 2.5) / (3 - 2) = 0.5 and (4 - 2.5) / (4 - 2) = 0.75
    assert norm["twin_merging"] == {"a": 0.5, "b": 0.75, "mean": 0.625}
    assert norm["finetuned_a"]["b"] == pytest.approx(-0.25)
    fig = plot_scores(norm, doms, tmp_path / "s.png")
    cfg = load_config("twin_merging", [f"run.root={tmp_path}", "logging.wandb=offline"])
    summary = {"domains": doms, "test_loss": table, "normalised_score": norm, "twin/normalised_mean/twin": 0.625}
    assert log_to_wandb(cfg, tmp_path, summary, fig) is True
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_twin_merging_cls_end_to_end(tiny_overrides):
    # the classification setting at toy size: every stage runs, the table has the paper's score
    overrides = tiny_overrides + ["twin.base_steps=4", "twin.finetune_steps=3", "twin.protocol=custom",
                                  "twin.router_epochs=3", "twin.router_train_blocks=16", "twin.router_width=32",
                                  "twin.eval_batches=1", "run.run_id=cls"]
    run_dir = train(load_config("twin_merging_cls", overrides))
    s = json.loads((run_dir / "summary.json").read_text())
    tasks = ["stdlib_def", "pydoc_digit", "licenses_licence"]
    methods = {"base", "task_arithmetic", "ties", "twin_merging"} | {f"finetuned_{t}" for t in tasks}
    assert s["tasks"] == tasks and set(s["test_accuracy"]) == methods
    for m in methods:
        for t in tasks:
            acc = s["test_accuracy"][m][t]
            assert 0.0 <= acc <= 1.0
            # the paper's score: accuracy / the accuracy of the task's fine-tuned model
            assert s["normalised_accuracy"][m][t] == pytest.approx(acc / s["test_accuracy"][f"finetuned_{t}"][t])
    for t in tasks:
        assert s["normalised_accuracy"][f"finetuned_{t}"][t] == pytest.approx(1.0)
        assert 0.5 <= s["majority_accuracy"][t] <= 1.0 and s["test_examples"][t] > 0
    assert 0.0 <= s["router_test_acc"] <= 1.0
    assert json.loads((run_dir / "router.json").read_text())["arch"] == "paper"
    for t in tasks:
        assert (run_dir / f"ft_{t}/head.safetensors").exists() and (run_dir / f"ft_{t}/body.safetensors").exists()
    assert (run_dir / "scores.png").exists() and json.loads((run_dir / "table.json").read_text())["tasks"] == tasks
