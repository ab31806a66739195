"""trainer.strategy from the recipe: the registry, DeepSpeed configs, atomic directory checkpoints, and
ZeRO-2 / ZeRO-3 / FSDP2 with 2 CPU processes (about 40 s each, in the fast suite): \
train, save, resume, export, load back, same outputs."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.engine.checkpointing import atomic_directory_saves, checkpoint_kind, checkpoint_step
from recipes.engine.config import ConfigError, load_config
from recipes.engine.logs import read_metrics
from recipes.engine.strategies import STRATEGIES, build_strategy, deepspeed_config
from tests.conftest import ROOT

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def test_registry_has_the_documented_strategies_and_rejects_others():
    assert {"auto", "ddp", "deepspeed_stage_2", "deepspeed_stage_3", "fsdp2"} <= set(STRATEGIES)
    assert build_strategy(load_config("tiny")) == "auto"
    with pytest.raises(ConfigError, match="trainer.strategy must be one of .*ddp.*got 'zero9'"):
        load_config("tiny", ["trainer.strategy=zero9"])  # at load time, before anything is built


def test_ddp_options_reach_the_strategy():
    s = build_strategy(load_config("tiny", ["trainer.strategy=ddp", "trainer.ddp.bucket_cap_mb=7"]))
    assert s._ddp_kwargs["bucket_cap_mb"] == 7 and s._ddp_kwargs["find_unused_parameters"] is False


def test_deepspeed_config_from_yaml_keys():
    cfg = load_config("tiny", ["trainer.strategy=deepspeed_stage_3", "trainer.deepspeed.offload_optimizer=true",
                               "trainer.deepspeed.offload_parameters=true", "trainer.deepspeed.reduce_bucket_size=5e8"])
    z = deepspeed_config(cfg, 3)["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 500_000_000 and isinstance(z["reduce_bucket_size"], int)
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert "allgather_bucket_size" not in z and z["stage3_prefetch_bucket_size"] == 50_000_000
    z2 = deepspeed_config(load_config("tiny", ["trainer.deepspeed.allgather_bucket_size=1000"]), 2)
    assert z2["zero_optimization"]["allgather_bucket_size"] == 1000
    assert "offload_optimizer" not in z2["zero_optimization"]
    with pytest.raises(ConfigError, match="offload_parameters needs ZeRO stage 3"):
        deepspeed_config(load_config("tiny", ["trainer.strategy=deepspeed_stage_2",
                                              "trainer.deepspeed.offload_parameters=true"]), 2)


class _DirWriter:
    """A one-process stand-in for a strategy that writes a directory checkpoint (as DeepSpeed does)."""
    is_global_zero = True
    fail_after_first_file = False

    def broadcast(self, obj, src=0):
        return obj

    def barrier(self, name=None):
        pass

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        d = Path(filepath)
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": checkpoint["global_step"]}, d / "meta.pt")
        if self.fail_after_first_file:
            raise KeyboardInterrupt  # killed mid-write
        (d / "__0_0.distcp").write_bytes(b"shard")


def test_directory_checkpoint_replaced_atomically(tmp_path):
    strategy = atomic_directory_saves(_DirWriter)()
    target = tmp_path / "last.ckpt"
    strategy.save_checkpoint({"global_step": 3}, target)
    assert checkpoint_kind(target) == "distributed" and checkpoint_step(target) == 3
    strategy.save_checkpoint({"global_step": 5}, target)
    assert checkpoint_step(target) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # nothing set aside is left over
    strategy.fail_after_first_file = True
    with pytest.raises(KeyboardInterrupt):
        strategy.save_checkpoint({"global_step": 7}, target)
    assert checkpoint_step(target) == 5 and (target / "__0_0.distcp").exists()  # the old one, whole


# ------------------------------------------------------------------------------- 2 processes

def _cli(module, *args):
    env = dict(os.environ, WANDB_MODE="disabled")
    env.pop("LM_RECIPES_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=900)


def _losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(Path(run_dir) / "metrics.csv")
            if r.get("train/loss") is not None}


def _common(tmp_path, data_cache, strategy):
    return [f"run.root={tmp_path}", f"data.cache_dir={data_cache}", "data.max_chars_per_domain=200000",
            "trainer.progress_bar=false", "logging.wandb=disabled", "trainer.max_steps=6",
            "trainer.log_every_n_steps=1", "trainer.val_check_interval=1000", "optim.warmup_steps=2",
            "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=8", "checkpoint.every_n_steps=3",
            f"trainer.strategy={strategy}"]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("ddp_ref")
    r = _cli("recipes", "train", "tiny", *_common(root, data_cache, "ddp"), "run.run_id=ref")
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = root / "tiny" / "ref"
    assert _cli("recipes.engine.export", str(run_dir)).returncode == 0
    return run_dir


@pytest.mark.parametrize("strategy,kind", [
    pytest.param("deepspeed_stage_2", "deepspeed", marks=pytest.mark.skipif(
        not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install --no-build-isolation deepspeed==0.19.8)")),
    pytest.param("deepspeed_stage_3", "deepspeed", marks=pytest.mark.skipif(
        not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install --no-build-isolation deepspeed==0.19.8)")),
    ("fsdp2", "distributed"),
])
def test_sharded_strategy_saves_resumes_exports_and_loads_back(tmp_path, data_cache, ddp_reference, strategy, kind):
    # tests.deepspeed_cpu = the recipes CLI plus the adapter that lets Lightning's DeepSpeed run on CPU
    args = _common(tmp_path, data_cache, strategy)
    r = _cli("tests.deepspeed_cpu", "train", "tiny", *args, "run.run_id=cut", "trainer.stop_at_step=4")
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = tmp_path / "tiny" / "cut"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and checkpoint_kind(last) == kind and checkpoint_step(last) == 4
    r = _cli("tests.deepspeed_cpu", "resume", str(run_dir))  # what `make resume RUN=` runs
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint_step(last) == 6

    # the sharded run follows the DDP run step by step (same data, same fp32 math; reduction order differs)
    ref, got = _losses(ddp_reference), _losses(run_dir)
    assert sorted(got) == sorted(ref) == list(range(6))
    for step in ref:
        assert abs(ref[step] - got[step]) < 1e-4, (step, ref[step], got[step])

    r = _cli("recipes.engine.export", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    from recipes.engine.build import build_base_model, build_datamodule

    base = [f"data.cache_dir={data_cache}", "data.max_chars_per_domain=200000"]
    dm = build_datamodule(load_config("tiny", base))
    ids = torch.as_tensor(dm.val_set[1]["input_ids"][:48]).unsqueeze(0).long()
    outputs = {}
    for name, export_dir in (("sharded", run_dir / "export"), ("ddp", ddp_reference / "export")):
        model = build_base_model(load_config("tiny", base + [f"model.pretrained={export_dir}"]), dm).eval()
        with torch.no_grad():
            outputs[name] = model(input_ids=ids).logits
    assert (outputs["sharded"] - outputs["ddp"]).abs().max() < 2e-3
    # loaded back = exactly the consolidated weights (not merely close to another run)
    from recipes.engine.export import consolidated_state_dict, model_state_dict

    weights = model_state_dict(consolidated_state_dict(last))
    model = build_base_model(load_config("tiny", base), dm)
    model.load_state_dict(weights, strict=False)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, outputs["sharded"])
