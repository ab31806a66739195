"""model.pretrained under DeepSpeed ZeRO-3 (recipes/engine/build.py `Zero3ModelFactory`): the model is built in each
process under zero.Init, transformers loads the checkpoint into the partitions, the recipe's prepare_model
(AdaMoE retrofit + LoRA) runs on the partitioned model. Fast: which runs take that path, the training dtype of
model.pretrained, the block-by-block retrofit. Slow (2 CPU processes, tests/deepspeed_cpu.py): parameters created
partitioned, weights the pretrained ones (first loss = the DDP run's), the switch back to the old path."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.engine.config import ConfigError, load_config
from recipes.engine.logs import read_metrics
from tests.conftest import ROOT

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
MIXTRAL = ["model.arch=mixtral", "model.size=tiny", "model.overrides.num_hidden_layers=2"]


def _data(data_cache):
    return [f"data.cache_dir={data_cache}", "data.max_chars_per_domain=200000", "data.block_size=64",
            "data.batch_size=4"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_cache):
    """A tiny Mixtral saved with save_pretrained, its (tied) embeddings scaled by 6 so that its loss is far from
    that of any fresh initialisation: a run that trained a fresh model instead would show at step 0."""
    from recipes.engine.build import build_base_model, build_datamodule

    cfg = load_config("tiny", _data(data_cache) + MIXTRAL)
    dm = build_datamodule(cfg)
    torch.manual_seed(11)
    model = build_base_model(cfg, dm)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(6.0)
    out = tmp_path_factory.mktemp("pretrained") / "mixtral"
    model.save_pretrained(str(out))
    return out


# ------------------------------------------------------------------------------------------------- fast

def test_which_runs_build_the_model_under_zero3(pretrained, data_cache):
    import recipes.adamoe.finetune as finetune
    from recipes.engine.build import zero3_deferred_load
    from recipes.engine.recipe import get_recipe

    z3 = _data(data_cache) + [f"model.pretrained={pretrained}", "trainer.strategy=deepspeed_stage_3"]
    assert zero3_deferred_load(load_config("tiny", z3))
    assert zero3_deferred_load(load_config("adamoe", z3), get_recipe("adamoe"))  # its module takes a model_factory
    assert not zero3_deferred_load(load_config("tiny", z3 + ["trainer.deepspeed.zero3_init=false"]))
    assert not zero3_deferred_load(load_config("tiny", z3 + ["routing_probe.enabled=true"]))
    assert not zero3_deferred_load(load_config("openmoe", z3), get_recipe("openmoe"))  # Recipe.zero3_deferred=False
    for other in ("trainer.strategy=deepspeed_stage_2", "trainer.strategy=ddp", "model.pretrained=null"):
        assert not zero3_deferred_load(load_config("tiny", z3 + [other]))
    with pytest.raises(ConfigError, match="zero3_init"):
        load_config("tiny", z3 + ["trainer.deepspeed.zero3_init=sometimes"])
    # the adamoe_finetune pipeline's train stage (Mixtral-8x7B + LoRA under ZeRO-3 in the README) takes it
    ft = load_config("adamoe_finetune", z3)
    assert zero3_deferred_load(finetune.stage_config(ft, pretrained.parent / "ft_run"), get_recipe("adamoe"))


def test_deferred_module_gets_a_factory_and_other_builds_are_whole(pretrained, data_cache):
    from recipes.engine.build import build_datamodule, build_module

    cfg = load_config("tiny", _data(data_cache) + [f"model.pretrained={pretrained}",
                                                    "trainer.strategy=deepspeed_stage_3"])
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm, training=True)
    assert module.model is None and callable(module.model_factory)
    # export / evaluation (training=False) and the switch keep building the whole model up front
    assert build_module(cfg, dm).model is not None
    cfg.trainer.deepspeed.zero3_init = False
    assert build_module(cfg, dm, training=True).model_factory is None


@pytest.mark.parametrize("precision,dtype", [("bf16-true", torch.bfloat16), ("16-true", torch.float16),
                                             ("bf16-mixed", torch.float32), ("32-true", torch.float32)])
def test_pretrained_loads_in_the_true_precision_dtype(pretrained, data_cache, precision, dtype):
    from recipes.engine.build import build_datamodule, build_module

    cfg = load_config("tiny", _data(data_cache) + [f"model.pretrained={pretrained}",
                                                    f"trainer.precision={precision}"])
    dm = build_datamodule(cfg)
    # outside training (export, eval): float32 whatever the run's precision
    reference = dict(build_module(cfg, dm).model.named_parameters())
    assert {p.dtype for p in reference.values()} == {torch.float32}
    params = dict(build_module(cfg, dm, training=True).model.named_parameters())
    assert set(params) == set(reference) and {p.dtype for p in params.values()} == {dtype}
    for name, p in params.items():  # the saved float32 values, rounded to the dtype
        assert torch.equal(p.detach(), reference[name].detach().to(dtype)), name


@pytest.mark.parametrize("init", ["random", "copy"])
def test_block_by_block_retrofit_equals_one_retrofit_call(init):
    """The ZeRO-3 retrofit (one gathered block at a time) gives the very model of one `retrofit` call: same
    modules, same shared parameters, same seeded null gates. (Unpartitioned here: gathering is then a no-op.)"""
    from transformers import MixtralConfig, MixtralForCausalLM

    from models.moe import moe_blocks, retrofit
    from recipes.adamoe.module import retrofit_partitioned

    def base():
        torch.manual_seed(0)
        return MixtralForCausalLM(MixtralConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                                num_local_experts=8, num_experts_per_tok=2)).eval()

    settings = dict(num_null_experts=6, top_k=4, null_gate_init=init, seed=7)
    one, blocks = retrofit(base(), **settings), retrofit_partitioned(base(), **settings)
    assert len(moe_blocks(blocks)) == 3 and blocks.config.adamoe == one.config.adamoe
    a, b = dict(one.named_parameters()), dict(blocks.named_parameters())
    assert set(a) == set(b) and any("null_gate" in n for n in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    gates = [blk.gate.null_gate.weight for blk in moe_blocks(blocks)]
    assert not torch.equal(gates[0], gates[1])  # one generator across the layers, not one seed per layer
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(one(ids).logits, blocks(ids).logits)


# ------------------------------------------------------------------------------- 2 processes (slow)

def _cli(module, *args):
    env = dict(os.environ, WANDB_MODE="disabled")
    env.pop("LM_RECIPES_RUN_ID", None)
    r = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _run(root, data_cache, recipe, run_id, strategy, *extra, resume=False):
    """A 2-process run (then `resume` of its directory when `resume`): losses, zero3_load lines, summary."""
    args = [f"run.root={root}", "trainer.progress_bar=false", "logging.wandb=disabled", "trainer.max_steps=2",
            "trainer.log_every_n_steps=1", "trainer.val_check_interval=1000", "trainer.accelerator=cpu",
            "trainer.devices=2", "checkpoint.every_n_steps=100", f"trainer.strategy={strategy}",
            f"run.run_id={run_id}", *_data(data_cache), *extra]
    r = _cli("tests.deepspeed_cpu", "train", recipe, *args)
    run_dir = Path(root) / recipe / run_id
    if resume:
        r = _cli("tests.deepspeed_cpu", "resume", str(run_dir))
    losses = {row["step"]: row["train/loss"] for row in read_metrics(run_dir / "metrics.csv")
              if row.get("train/loss") is not None}
    # Found anywhere in stderr (another rank's unfinished line may precede one), decoded object by object.
    decoder = json.JSONDecoder()
    stats = [decoder.raw_decode(r.stderr, m.end())[0] for m in re.finditer("zero3_load: ", r.stderr)]
    return {"losses": losses, "stats": sorted(stats, key=lambda s: s["rank"]),
            "summary": json.loads((run_dir / "summary.json").read_text())}


@pytest.fixture(scope="module")
def ddp_pretrained(tmp_path_factory, data_cache, pretrained):
    return _run(tmp_path_factory.mktemp("ddp"), data_cache, "tiny", "ddp", "ddp", f"model.pretrained={pretrained}")


def _loaded(pretrained):
    from models.factory import load_pretrained

    return load_pretrained(str(pretrained))


needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")


@pytest.mark.slow
@needs_deepspeed
def test_zero3_creates_partitioned_parameters_holding_the_pretrained_weights(tmp_path, data_cache, pretrained,
                                                                             ddp_pretrained):
    z3 = _run(tmp_path, data_cache, "tiny", "z3", "deepspeed_stage_3", f"model.pretrained={pretrained}")
    params = list(_loaded(pretrained).parameters())
    total = sum(p.numel() for p in params)
    half = sum(math.ceil(p.numel() / 2) for p in params)  # ZeRO-3 pads each parameter to a multiple of 2
    assert [s["rank"] for s in z3["stats"]] == [0, 1]
    for s in z3["stats"]:  # every parameter was created partitioned: each rank holds its half only
        assert s["parameters"] == s["partitioned_parameters"] == total
        assert s["local_partition"] == half and s["whole_parameters_in_process"] == 0
    assert z3["summary"]["num_parameters"] == total == z3["summary"]["zero3_load/parameters"]

    # the pretrained weights, not a fresh init: step 0 (before any update) is the DDP run's loss ...
    ref = ddp_pretrained["losses"]
    assert sorted(z3["losses"]) == sorted(ref) == [0, 1]
    assert abs(z3["losses"][0] - ref[0]) < 1e-4, (z3["losses"][0], ref[0])
    # after one update (gradients reduced in another order): equal to float32 rounding of the large loss
    assert z3["losses"][1] == pytest.approx(ref[1], rel=1e-4)
    # ... which a fresh model of the same architecture (same seed, same data) does not reach
    fresh = _run(tmp_path, data_cache, "tiny", "fresh", "deepspeed_stage_3", *MIXTRAL)
    assert fresh["stats"] == []  # from scratch: today's path
    assert abs(fresh["losses"][0] - ref[0]) > 0.1, (fresh["losses"][0], ref[0])


@pytest.mark.slow
@needs_deepspeed
def test_zero3_init_false_keeps_the_old_path(tmp_path, data_cache, pretrained, ddp_pretrained):
    old = _run(tmp_path, data_cache, "tiny", "old", "deepspeed_stage_3", f"model.pretrained={pretrained}",
               "trainer.deepspeed.zero3_init=false")
    assert old["stats"] == [] and not any(k.startswith("zero3_load/") for k in old["summary"])
    assert abs(old["losses"][0] - ddp_pretrained["losses"][0]) < 1e-4


@pytest.mark.slow
@needs_deepspeed
def test_adamoe_lora_retrofit_on_partitioned_model_follows_ddp(tmp_path, data_cache, pretrained):
    """AdaMoE retrofit (null gates copied from the router rows) + LoRA on the partitioned model: only the new
    parameters (null gates, adapters) are whole in a process, and the run, cut after step 0 and resumed (the
    model is built again, then the DeepSpeed checkpoint restored), follows the DDP run step by step."""
    from models.factory import count_parameters
    from recipes.engine.build import build_datamodule, build_module
    from recipes.engine.recipe import get_recipe

    extra = [f"model.pretrained={pretrained}", "adamoe.lora_r=4", "adamoe.null_gate_init=copy",
             "adamoe.num_null_experts=4", "optim.lr=1e-2", "optim.warmup_steps=1"]
    ddp = _run(tmp_path, data_cache, "adamoe", "ddp", "ddp", *extra)
    z3 = _run(tmp_path, data_cache, "adamoe", "z3", "deepspeed_stage_3", *extra, "trainer.stop_at_step=1",
              resume=True)

    cfg = load_config("adamoe", _data(data_cache) + extra)
    # in one process, whole
    whole = count_parameters(build_module(cfg, build_datamodule(cfg), get_recipe("adamoe")).model)
    base = sum(p.numel() for p in _loaded(pretrained).parameters())
    assert [s["rank"] for s in z3["stats"]] == [0, 1]  # (the resumed segment's lines)
    for s in z3["stats"]:
        assert s["partitioned_parameters"] == base and s["parameters"] == whole
        assert s["whole_parameters_in_process"] == whole - base > 0
    assert sorted(z3["losses"]) == sorted(ddp["losses"]) == [0, 1]
    for step in ddp["losses"]:  # step 1 comes after an update of the LoRA adapters and null gates
        assert abs(z3["losses"][step] - ddp["losses"][step]) < 1e-4, step
    assert z3["summary"]["moe/true_experts_per_token"] == pytest.approx(ddp["summary"]["moe/true_experts_per_token"],
                                                                         abs=1e-4)
