"""The `openmoe` recipe: the OpenMoE-style model, its capacity rules, the routing-probe
callback and `make analyze` (recipes/openmoe/analyze.py) end to end on a tiny run."""
import csv
import json
from pathlib import Path

import pytest
import torch

from recipes.engine.config import ConfigError, load_config
from recipes.engine.runs import save_run_config

# A 2-layer, 32-wide OpenMoE (both MLPs are MoE: 4 experts, top-2) on 32-token blocks.
SMALL = ["data.block_size=32", "data.batch_size=4", "data.val_batch_size=8", "trainer.val_check_interval=3",
         "trainer.limit_val_batches=2", "checkpoint.every_n_steps=3", "checkpoint.keep=-1",
         "trainer.log_every_n_steps=1", "routing_probe.every_n_steps=3", "routing_probe.save_pngs=true",
         "routing_probe.min_token_count=2",
         "model.overrides.hidden_size=32", "model.overrides.intermediate_size=64",
         "model.overrides.expert_intermediate_size=32", "model.overrides.num_hidden_layers=2",
         "model.overrides.num_attention_heads=2", "model.overrides.num_key_value_heads=2",
         "model.overrides.num_experts=4", "model.overrides.moe_every=1"]


def _base(root: Path, data_cache: str):
    return [f"run.root={root}", f"data.cache_dir={data_cache}", "logging.wandb=disabled",
            "trainer.progress_bar=false", "data.max_chars_per_domain=200000"]


# ------------------------------------------------------------------------------------------ the model


def _block(cf_train=1.25, cf_eval=2.0, group="sequence", experts=8, order="token_major"):
    from models.moe import MoEConfig
    from models.openmoe import OpenMoEBlock

    cfg = MoEConfig(hidden_size=4, intermediate_size=8, num_experts=experts, top_k=2)
    block = OpenMoEBlock(cfg, cf_train, cf_eval, group, order)
    with torch.no_grad():  # every token prefers expert 0, then expert 1 (feature 0 is always 1)
        block.gate.weight.zero_()
        block.gate.weight[0, 0] = 2.0
        block.gate.weight[1, 0] = 1.0
    return block


def test_sequence_capacity_drops_hand_computed():
    from models.openmoe import sequence_capacity_drops

    # E=2, k=1, sequences of 4: C = ceil(1.0 * 4 * 1 / 2) = 2 per expert per sequence
    idx = torch.tensor([[0], [0], [0], [1],   # seq 0: the third token to expert 0 overflows
                        [1], [0], [1], [1]])  # seq 1: the third token to expert 1 overflows
    got = sequence_capacity_drops(idx, group_size=4, num_experts=2, capacity_factor=1.0)
    assert got.squeeze(1).tolist() == [False, False, True, False, False, False, False, True]
    # k=2: order is (position, slot); E=3, C = ceil(0.75 * 2 * 2 / 3) = 1
    idx = torch.tensor([[0, 1], [1, 2]])
    got = sequence_capacity_drops(idx, group_size=2, num_experts=3, capacity_factor=0.75)
    assert got.tolist() == [[False, False], [True, False]]


def test_capacity_factor_follows_train_and_eval_mode():
    block = _block()
    x = torch.zeros(3, 16, 4)
    x[..., 0] = 1.0
    block.train()
    block(x)
    d = block.last_routing["dropped"].view(3, 16, 2)
    # every token picks experts 0 and 1; C_train = ceil(1.25 * 16 * 2 / 8) = 5 per sequence
    assert d.sum().item() == 3 * 2 * (16 - 5)
    assert not d[:, :5].any() and d[:, 5:].all()  # position order: the end of each sequence drops
    block.eval()
    block(x)
    d = block.last_routing["dropped"].view(3, 16, 2)
    assert d.sum().item() == 3 * 2 * (16 - 8)  # C_eval = ceil(2.0 * 16 * 2 / 8) = 8
    assert block.capacity_factor == 2.0
    # "batch" groups: one capacity over all 48 tokens, C = ceil(2.0 * 48 * 2 / 8) = 24, batch-major order
    block = _block(group="batch").eval()
    block(x)
    d = block.last_routing["dropped"].view(48, 2)
    assert d.sum().item() == 2 * (48 - 24) and not d[:24].any() and d[24:].all()


def test_dropped_assignment_contributes_nothing():
    block = _block(cf_train=None, cf_eval=0.25).eval()  # C = ceil(0.25 * 4 * 2 / 8) = 1
    x = torch.zeros(1, 4, 4)
    x[..., 0] = 1.0
    x[..., 1] = torch.arange(4.0)
    with torch.no_grad():
        out = block(x)
    w = block.last_routing["topk_weights"].view(4, 2)
    assert w[1:].abs().sum() == 0 and float(w[0].sum()) == pytest.approx(1.0)
    assert out[0, 1:].abs().max() == 0  # tokens 1..3 lost both assignments: MoE output 0
    block.eval_capacity_factor = None  # dropless: every token gets its experts
    with torch.no_grad():
        assert block(x)[0, 1:].abs().max() > 0


def test_save_and_load_through_model_pretrained(tmp_path):
    from models.factory import ModelSpec, build_model, load_pretrained
    from models.openmoe import OpenMoEForCausalLM

    spec = ModelSpec(arch="openmoe", size="tiny", vocab_size=97, max_seq_len=16,
                     overrides={"hidden_size": 16, "intermediate_size": 24, "expert_intermediate_size": 8,
                                "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 2,
                                "moe_every": 1})
    torch.manual_seed(0)
    model = build_model(spec).eval()
    assert isinstance(model, OpenMoEForCausalLM) and len(model.moe_blocks()) == 3
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(str(tmp_path / "m"), spec).eval()
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "openmoe"
    with pytest.raises(ValueError, match="moe_every"):
        build_model(ModelSpec(arch="openmoe", size="tiny", vocab_size=97, max_seq_len=16,
                              overrides={"num_hidden_layers": 2, "moe_every": 3}))


# ------------------------------------------------------------------------------------------ run + analyze


@pytest.fixture(scope="module")
def openmoe_run(tmp_path_factory, data_cache):
    from recipes.engine.loop import train

    root = tmp_path_factory.mktemp("openmoe_runs")
    overrides = _base(root, data_cache) + SMALL + ["trainer.max_steps=6"]
    run_dir = train(load_config("openmoe", overrides))
    return {"run_dir": run_dir, "overrides": overrides, "root": root}


@pytest.fixture(scope="module")
def analysis(openmoe_run):
    from recipes.openmoe.analyze import analyze

    report = analyze(openmoe_run["run_dir"], ["max_blocks=24", "batch_size=8", "position_buckets=4",
                                              "min_token_count=2", "spec_threshold=20"], progress=False)
    return report


def _rows(run_dir: Path):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_callback_logs_probe_scalars_to_metrics_csv(openmoe_run):
    run_dir = openmoe_run["run_dir"]
    rows = {int(r["step"]): r for r in _rows(run_dir)}
    probed = sorted(s for s, r in rows.items() if r.get("moe/drop_rate"))
    assert probed == [2, 5]  # every routing_probe.every_n_steps=3 steps (rows are 0-based step indices)
    for s in probed:
        r = rows[s]
        for key in ("moe/specialisation_token_id", "moe/specialisation_position", "moe/drop_rate",
                    "moe/drop_rate_token", "moe/drop_rate_last_bucket"):
            assert 0.0 <= float(r[key]) <= 1.0, key
        # a token is dropped only when all its k=2 assignments are: never more often than assignments
        assert float(r["moe/drop_rate_token"]) <= float(r["moe/drop_rate"]) + 1e-9
        assert float(r["moe/load_max_over_ideal"]) >= 1.0 - 1e-9  # the busiest expert is at least ideal
        assert float(r["moe/load_max_over_ideal"]) <= 4.0 + 1e-9  # at most all of a layer's load on one of E=4
        assert r.get("train/loss")  # same row as the step's own training metrics
    pngs = sorted(p.name for p in (run_dir / "analysis" / "steps").glob("*.png"))
    assert pngs == ["step0000002_drop_rate.png", "step0000002_load_heatmap.png",
                    "step0000005_drop_rate.png", "step0000005_load_heatmap.png"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["moe/val_drop_fraction"] <= 1.0 and summary["moe/num_moe_layers"] == 2
    train_rows = [r for r in rows.values() if r.get("train/moe_lb")]
    for r in train_rows:  # logged weighted losses = coefficient * raw losses (0.01 and 1e-3)
        assert float(r["train/moe_lb"]) == pytest.approx(0.01 * float(r["moe/aux_loss"]), rel=1e-5)
        assert float(r["train/moe_z"]) == pytest.approx(1e-3 * float(r["moe/z_loss"]), rel=1e-5)


def test_analyze_report_keys_ranges_and_figures(openmoe_run, analysis):
    run_dir = openmoe_run["run_dir"]
    report = json.loads((run_dir / "analysis" / "report.json").read_text())
    assert [c["step"] for c in report["checkpoints"]] == [3, 6]
    assert report["capacity"]["capacity_factor"] == 2.0 and report["capacity"]["group"] == "batch"
    assert report["capacity"]["drop_order"] == "colossalai"  # the recipe's default
    assert report["data"]["blocks"] == 24 and report["data"]["tokens"] == 24 * 32
    assert set(report["data"]["blocks_per_domain"].values()) == {8}  # an equal share per domain
    layers = report["layers"]
    assert len(layers) == 2 and report["num_experts"] == 4 and report["top_k"] == 2
    for ckpt in report["checkpoints"]:
        for name in layers:
            L = ckpt["layers"][name]
            for group in ("token_id", "position", "domain"):
                assert 0.0 < L["specialisation"][group] <= 1.0
                assert L["std_vs_uniform"][group]["uniform_std"] >= 0.0
            assert len(L["top_tokens"]["ids"]) == 4 and all(len(t) <= 10 for t in L["top_tokens"]["ids"])
            assert all(isinstance(s, str) for t in L["top_tokens"]["decoded"] for s in t)
            drop = L["drop_rate_by_position"]
            assert len(drop["per_assignment"]) == 4 and len(drop["bucket_edges"]) == 5
            assert all(0.0 <= t <= a + 1e-9 <= 1.0 + 1e-9 for a, t in zip(drop["per_assignment"], drop["per_token"]))
            co = torch.tensor(L["coactivation"])
            assert co.shape == (4, 4)
            chosen = co.diagonal() > 0  # P(a | a) = 1 for experts that were chosen at all
            assert torch.all(co.diagonal()[chosen] == 1.0)
            others = co.sum(dim=1) - co.diagonal()  # top-2: given a, exactly one other expert b is chosen
            assert torch.allclose(others[chosen], torch.ones_like(others[chosen]), atol=1e-6)
            assert L["load"]["max_over_ideal"] >= 1.0 - 1e-9
            assert sum(L["load_share"]) == pytest.approx(1.0)
            sat = L["saturation_vs_final"]
            assert 0.0 <= sat["top1_agreement"] <= 1.0 and 0.0 <= sat["topk_overlap"] <= 1.0
            paper = L["paper_specialisation"]  # spec_threshold=20 below: ids seen more than 20 times
            assert paper["more_than"] == 20 and paper["token_id"]["n_groups"] > 0
            assert paper["position"]["n_groups"] == 32  # every position of the 32-token blocks, seen 24 times
            for group in ("token_id", "position"):
                assert paper[group]["mean_std"] >= 0.0 and paper[group]["uniform_std"] > 0.0
            early = L["early_routing_vs_final"]
            assert 0.0 <= early["mean_tv"] <= 1.0 and 0.0 <= early["mean_js"] <= 1.0
            assert early["n_groups"] == paper["token_id"]["n_groups"]  # the same frequent ids
            orders = L["drop_rate_by_order"]
            assert set(orders) == {"bucket_edges", "colossalai", "slot_major", "token_major"}
            # the counterfactual of the model's own order (colossalai over each forward of 8 blocks) is its
            # real drop rate: same routing, same groups, same rule
            assert orders["colossalai"]["per_assignment"] == pytest.approx(drop["per_assignment"], abs=1e-12)
            assert orders["colossalai"]["per_token"] == pytest.approx(drop["per_token"], abs=1e-12)
    final = report["checkpoints"][-1]["layers"]
    for name in layers:  # the final checkpoint against itself
        assert final[name]["saturation_vs_final"] == {"top1_agreement": 1.0, "topk_overlap": 1.0}
        assert final[name]["early_routing_vs_final"]["mean_tv"] == 0.0
    assert report["paper_layer"] == layers[-1]  # fewer than three MoE layers: the last one
    summary = report["summary"]
    assert summary["paper_layer"] == layers[-1] and summary["paper_specialisation"]["more_than"] == 20
    assert set(summary["drop_rate_by_order_last_bucket"]) == {"colossalai", "slot_major", "token_major"}
    assert list(summary["early_routing_tv_by_step"]) == ["3", "6"]
    for fig in ("load_heatmap", "drop_rate", "specialisation", "std_vs_uniform", "saturation", "coactivation",
                "specialisation_over_steps", "paper_specialisation", "early_routing", "drop_rate_by_order"):
        path = run_dir / "analysis" / f"{fig}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
    assert report["throughput"]["tokens_per_s"] > 0


def test_analyze_drop_rates_match_the_model_itself(openmoe_run, analysis):
    """Independent check: the final checkpoint's eval-mode drops, read off the blocks' own routing records."""
    from models.moe import moe_blocks
    from recipes.engine.build import build_base_model, build_datamodule
    from recipes.openmoe.analyze import load_weights, run_checkpoints, validation_blocks

    run_dir = openmoe_run["run_dir"]
    cfg = load_config("openmoe", openmoe_run["overrides"])
    dm = build_datamodule(cfg)
    model = build_base_model(cfg, dm)
    load_weights(model, run_checkpoints(run_dir)[-1][1])
    model.eval()
    ids, _ = validation_blocks(dm, 24, 0)
    dropped = {i: torch.zeros(32) for i in range(2)}
    with torch.no_grad():
        for start in range(0, 24, 8):
            model(input_ids=ids[start:start + 8])
            for i, block in enumerate(moe_blocks(model)):
                d = block.last_routing["dropped"].view(-1, 32, 2).float()
                dropped[i] += d.sum(dim=(0, 2))  # per position
    final = analysis["checkpoints"][-1]["layers"]
    for i, name in enumerate(analysis["layers"]):
        per_bucket = (dropped[i].view(4, 8).sum(dim=1) / (24 * 8 * 2)).tolist()  # 8 positions x 2 slots per bucket
        assert final[name]["drop_rate_by_position"]["per_assignment"] == pytest.approx(per_bucket, abs=1e-9)


def test_analyze_clear_errors(tmp_path, data_cache, openmoe_run):
    from recipes.openmoe.analyze import AnalysisError, analyze, parse_options

    with pytest.raises(AnalysisError, match="does not exist"):
        analyze(tmp_path / "nope")
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    save_run_config(load_config("openmoe", _base(tmp_path, data_cache) + SMALL), empty / "config.yaml")
    with pytest.raises(AnalysisError, match="no readable checkpoint"):
        analyze(empty)
    # A dense (llama) run with a real step checkpoint of its module is not an MoE run.
    dense = tmp_path / "dense_run"
    (dense / "checkpoints").mkdir(parents=True)
    cfg = load_config("tiny", _base(tmp_path, data_cache) + ["data.block_size=32", "model.overrides.hidden_size=32",
                                                            "model.overrides.num_hidden_layers=1"])
    save_run_config(cfg, dense / "config.yaml")
    torch.save({"global_step": 1, "state_dict": {}}, dense / "checkpoints" / "step0000001.ckpt")
    with pytest.raises(AnalysisError, match="not an MoE run"):
        analyze(dense)
    with pytest.raises(AnalysisError, match="Unknown config key 'bogus'"):
        parse_options(["bogus=1"])
    with pytest.raises(AnalysisError, match="Did you mean: top_n"):
        parse_options(["topn=3"])
    with pytest.raises(AnalysisError, match="expects type int"):
        parse_options(["top_n=many"])
    with pytest.raises(AnalysisError, match="must be >= 1"):
        parse_options(["batch_size=0"])
    with pytest.raises(AnalysisError, match="spec_threshold must be >= 0"):
        parse_options(["spec_threshold=-1"])
    with pytest.raises(AnalysisError, match="the model has 2 MoE layers"):  # before any checkpoint is read
        analyze(openmoe_run["run_dir"], ["layer=2", "wandb=false"], progress=False, figures=False)


def test_routing_probe_config_errors(tmp_path, data_cache):
    from recipes.engine.routing_callback import routing_callbacks

    with pytest.raises(ConfigError, match="every_n_steps"):  # at load time, before any training
        load_config("openmoe", _base(tmp_path, data_cache) + ["routing_probe.every_n_steps=0"])
    # opt-in for other recipes: off unless asked for
    assert routing_callbacks(load_config("adamoe", _base(tmp_path, data_cache)), tmp_path) == []
    assert len(routing_callbacks(load_config("adamoe", _base(tmp_path, data_cache) +
                                             ["routing_probe.enabled=true"]), tmp_path)) == 1
