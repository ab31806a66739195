import json
import math

import pytest
import torch

from recipes.config import ConfigError, load_config
from recipes.train import train


def test_twin_merging_pipeline_end_to_end_and_resumes(tiny_overrides):
    overrides = tiny_overrides + ["twin.base_steps=6", "twin.finetune_steps=3", "twin.eval_batches=1",
                                  "twin.router_epochs=5", "run.run_id=e2e"]
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
    # second call skips every completed stage: trained weights, experts and router are untouched
    files = [run_dir / "base/hf/model.safetensors", run_dir / "ft_pydoc/hf/model.safetensors",
             run_dir / "experts/experts.safetensors", run_dir / "experts/shared.safetensors",
             run_dir / "experts/experts.json", run_dir / "router.safetensors", run_dir / "router.json"]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    s2 = train(load_config("twin_merging", overrides))
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert json.loads((s2 / "summary.json").read_text())["test_loss"] == s["test_loss"]
    # a stage whose completion marker is missing (killed before it) or whose settings changed is redone:
    # here the router, retrained on the state after an 8-token prefix (generation-time routing)
    (run_dir / "router.json").unlink()
    s3 = json.loads((train(load_config("twin_merging", overrides + ["twin.router_prefix_len=8"]))
                     / "summary.json").read_text())
    assert json.loads((run_dir / "router.json").read_text())["prefix_len"] == 8 and s3["router_prefix_len"] == 8
    assert (run_dir / "router.safetensors").stat().st_mtime_ns != stamps[run_dir / "router.safetensors"]
    assert s3["test_loss"]["base"] == s["test_loss"]["base"]
    experts_file = run_dir / "experts/experts.safetensors"
    assert experts_file.stat().st_mtime_ns == stamps[experts_file]


@pytest.mark.slow  # ~40 s: three Lightning runs; the fast path is tests/test_twin.py::test_recipe_builds_*
def test_twin_merging_lora_finetunes_give_lora_experts(tiny_overrides):
    from safetensors.torch import load_file

    from models.factory import load_pretrained
    from models.twin import LowRank, load_experts
    from recipes.twin_merging import finetuned_state
    rank, doms = 2, ["pydoc", "stdlib"]
    overrides = tiny_overrides + ["twin.base_steps=4", "twin.finetune_steps=2", "twin.eval_batches=1",
                                  "twin.router_epochs=3", "run.run_id=lora", "twin.finetune=lora",
                                  f"twin.lora_rank={rank}", "twin.lora_targets=[q_proj,v_proj]",
                                  f"twin.rank={2 * rank}", "data.domains=[pydoc,stdlib]", "twin.finetune_lr=1e-2"]
    run_dir = train(load_config("twin_merging", overrides))
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["finetune"] == "lora" and set(s["test_loss"]["twin_merging"]) == set(doms)
    # the fine-tune stage stored a peft adapter, not a full model
    assert (run_dir / "ft_pydoc/hf/adapter_model.safetensors").exists()
    assert not (run_dir / "ft_pydoc/hf/model.safetensors").exists()
    experts = load_experts(str(run_dir / "experts/experts.safetensors"))
    shared = load_file(str(run_dir / "experts/shared.safetensors"))
    base_sd = load_pretrained(str(run_dir / "base/hf")).state_dict()
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


def test_twin_config_errors(tiny_overrides):
    with pytest.raises(ConfigError, match="twin.finetune"):
        train(load_config("twin_merging", tiny_overrides + ["twin.finetune=qlora", "run.run_id=bad"]))
    with pytest.raises(ConfigError, match="two domains"):
        train(load_config("twin_merging", tiny_overrides + ["data.domains=[pydoc]", "run.run_id=bad2"]))


def test_wandb_table_offline(tmp_path, monkeypatch):
    from recipes.twin_merging import log_to_wandb, normalised_scores, plot_scores
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
