"""TokenFormer in the recipe system: factory registration, recipe `tokenformer`, recipe `tokenformer_grow`."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from models.factory import ModelSpec, build_model, load_pretrained
from models.tokenformer import TokenFormerForCausalLM, grow_parameter_tokens
from recipes.engine.config import ConfigError, load_config
from recipes.engine.logs import read_metrics
from recipes.engine.loop import train
from tests.conftest import ROOT


def _overrides(root, data_cache):
    return [f"run.root={root}", f"data.cache_dir={data_cache}", "logging.wandb=disabled",
            "trainer.progress_bar=false", "data.max_chars_per_domain=200000", "data.block_size=64",
            "data.batch_size=4", "model.size=tiny", "trainer.val_check_interval=1000",
            "trainer.limit_val_batches=2", "checkpoint.every_n_steps=1000", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, data_cache):
    """A `tokenformer` run of the tiny size with 8 / 32 parameter tokens, 6 steps."""
    root = tmp_path_factory.mktemp("tf_runs")
    cfg = load_config("tokenformer", _overrides(root, data_cache) + [
        "trainer.max_steps=6", "model.overrides.qkv_tokens=8", "model.overrides.ffn_tokens=32", "run.run_id=src"])
    run_dir = train(cfg)
    return run_dir, _overrides(root, data_cache)


def _last_weights(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k[len("model."):]: v for k, v in state["state_dict"].items() if k.startswith("model.")}, state


def test_factory_builds_and_loads_tokenformer(tmp_path):
    spec = ModelSpec(arch="tokenformer", size="tiny", vocab_size=100, max_seq_len=128,
                     overrides={"qkv_tokens": 8})
    model = build_model(spec)
    assert isinstance(model, TokenFormerForCausalLM)
    c = model.config
    assert (c.vocab_size, c.max_seq_len, c.qkv_tokens, c.ffn_tokens, c.hidden_size) == (100, 128, 8, 64, 32)
    model.save_pretrained(tmp_path)
    loaded = build_model(ModelSpec(arch="llama", size="tiny", vocab_size=100, max_seq_len=128, overrides={},
                                   pretrained=str(tmp_path)))  # the saved config.json decides the architecture
    assert isinstance(loaded, TokenFormerForCausalLM)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="tokenizer has 200 tokens"):
        load_pretrained(str(tmp_path), ModelSpec("tokenformer", "tiny", 200, 128, {}))
    with pytest.raises(ValueError, match="Unknown size 'huge' for model.arch=tokenformer"):
        build_model(ModelSpec("tokenformer", "huge", 100, 128, {}))
    with pytest.raises(ValueError, match="unknown TokenFormerConfig keys"):
        build_model(ModelSpec("tokenformer", "tiny", 100, 128, {"intermediate_size": 8}))


def test_tokenformer_recipe_trains_and_exports(source_run):
    from recipes.engine.export import export

    run_dir, _ = source_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 6 and summary["recipe"] == "tokenformer"
    weights, _ = _last_weights(run_dir)
    assert weights["layers.0.query.key_tokens"].shape == (8, 32)
    assert weights["layers.1.ffn.value_tokens"].shape == (32, 32)
    out = export(run_dir, out_dir=run_dir / "export")
    model = load_pretrained(str(out))
    assert isinstance(model, TokenFormerForCausalLM) and model.config.qkv_tokens == 8
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def test_grow_recipe_preserves_loss_copies_rows_and_trains(source_run):
    from recipes.tokenformer.grow import CONFIG_KEY, load_source_run

    src, overrides = source_run
    # The source run's weights come back exactly, and growth copies them into the first rows.
    model, info = load_source_run(src)
    stored, _ = _last_weights(src)
    assert info["step"] == 6 and info["tokens_seen"] == 6 * 4 * 64
    grow_parameter_tokens(model, {"qkv_tokens": 16, "ffn_tokens": 64}, init="zero_key", tau="frozen")
    for name, tensor in stored.items():
        if name.endswith(("key_tokens", "value_tokens")):
            assert torch.equal(model.state_dict()[name][: tensor.shape[0]], tensor), name
    # The recipe: zero_key + frozen tau gives the same validation loss just after growth as just before.
    cfg = load_config("tokenformer_grow", overrides + [
        f"tokenformer_grow.from_run={src}", "tokenformer_grow.qkv_tokens=16", "tokenformer_grow.ffn_tokens=64",
        "tokenformer_grow.eval_batches=2", "trainer.max_steps=3", "run.run_id=grown"])
    grown_dir = train(cfg)
    summary = json.loads((grown_dir / "summary.json").read_text())
    assert summary["grow/val_loss_before"] == pytest.approx(summary["grow/val_loss_after"], rel=1e-6, abs=1e-6)
    assert (summary["grow/from_qkv_tokens"], summary["grow/to_qkv_tokens"]) == (8, 16)
    assert summary["grow/params_after"] - summary["grow/params_before"] == 2 * (4 * 8 * 64 + 32 * 64)
    assert summary["step"] == 3 and summary["grow/total_tokens_seen"] == (6 + 3) * 4 * 64
    rows = {r["step"]: r for r in read_metrics(grown_dir / "metrics.csv")}
    assert rows[0]["grow/val_loss_before"] == pytest.approx(summary["grow/val_loss_before"])
    weights, ckpt = _last_weights(grown_dir)
    assert weights["layers.0.output.key_tokens"].shape == (16, 32)
    assert ckpt[CONFIG_KEY]["qkv_tokens"] == 16 and ckpt[CONFIG_KEY]["tau"] == "frozen"

    # A grown run can be grown again (its checkpoint says what it is); tau=auto rescales the old
    # pre-activations, so the loss changes at growth (negative control of the preservation above).
    cfg2 = load_config("tokenformer_grow", overrides + [
        f"tokenformer_grow.from_run={grown_dir}", "tokenformer_grow.qkv_tokens=24", "tokenformer_grow.ffn_tokens=64",
        "tokenformer_grow.tau=auto", "tokenformer_grow.eval_batches=2", "trainer.max_steps=1", "run.run_id=g2"])
    summary2 = json.loads((train(cfg2) / "summary.json").read_text())
    assert (summary2["grow/from_qkv_tokens"], summary2["grow/to_qkv_tokens"]) == (16, 24)
    assert (summary2["grow/from_ffn_tokens"], summary2["grow/to_ffn_tokens"]) == (64, 64)
    assert abs(summary2["grow/val_loss_after"] - summary2["grow/val_loss_before"]) > 1e-4


def test_grow_refuses_other_recipes_sizes_and_shrinking(source_run, tmp_path):
    from recipes.engine.runs import save_run_config
    from recipes.tokenformer.grow import load_source_run

    src, overrides = source_run
    # A dense Llama run (recipe `tiny`): refused before any checkpoint is read.
    llama_dir = tmp_path / "llama_run"
    llama_dir.mkdir()
    save_run_config(load_config("tiny", overrides[:5]), llama_dir / "config.yaml")
    with pytest.raises(ConfigError, match=r"recipe 'tiny' with model.arch=llama \(size tiny\)"):
        load_source_run(llama_dir)
    # A checkpoint whose sizes are not the ones its run config describes.
    other = tmp_path / "other_size"
    shutil.copytree(src, other)
    saved = yaml.safe_load((other / "config.yaml").read_text())
    saved["model"]["overrides"]["qkv_tokens"] = 12
    (other / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=r"holds a TokenFormer with num_layers=2, hidden_size=32, qkv_tokens=8, "
                                          r"ffn_tokens=32.*describes one with .*qkv_tokens=12"):
        load_source_run(other)
    # Shrinking, nothing to grow, and a missing source: refused with what the checkpoint holds.
    with pytest.raises(ConfigError, match="qkv_tokens=4 is smaller than the 8 the source checkpoint holds"):
        train(load_config("tokenformer_grow", overrides + [f"tokenformer_grow.from_run={src}",
                                                            "tokenformer_grow.qkv_tokens=4", "trainer.max_steps=1"]))
    with pytest.raises(ConfigError, match="nothing to grow"):
        train(load_config("tokenformer_grow", overrides + [f"tokenformer_grow.from_run={src}",
                                                            "tokenformer_grow.qkv_tokens=8",
                                                            "tokenformer_grow.ffn_tokens=32", "trainer.max_steps=1"]))
    with pytest.raises(ConfigError, match=r"nothing to grow \(grow_factor=1.0\)"):
        train(load_config("tokenformer_grow", overrides + [f"tokenformer_grow.from_run={src}",
                                                            "tokenformer_grow.grow_factor=1.0", "trainer.max_steps=1"]))
    with pytest.raises(ConfigError, match="from_run is not set"):
        train(load_config("tokenformer_grow", overrides + ["trainer.max_steps=1"]))
    with pytest.raises(ConfigError, match="init must be one of random, zero_key, released"):
        train(load_config("tokenformer_grow", overrides + [f"tokenformer_grow.from_run={src}",
                                                            "tokenformer_grow.init=zero"]))
    # Refused when the config is loaded: the released growth with a frozen tau, a shrinking factor.
    with pytest.raises(ConfigError, match="init=released is the official growth"):
        load_config("tokenformer_grow", overrides + ["tokenformer_grow.init=released", "tokenformer_grow.tau=frozen"])
    with pytest.raises(ConfigError, match="grow_factor must be a finite number >= 1"):
        load_config("tokenformer_grow", overrides + ["tokenformer_grow.grow_factor=0.5"])


def test_grow_targets_default_to_grow_factor_times_the_source():
    from models.tokenformer import TokenFormerConfig
    from recipes.tokenformer.grow import growth_targets, resolved_tau

    cfg = load_config("tokenformer_grow", [])
    g, old = cfg.tokenformer_grow, TokenFormerConfig.from_name("small", qkv_tokens=24, ffn_tokens=100)
    assert (g.qkv_tokens, g.ffn_tokens, g.grow_factor) == (0, 0, 2.0)
    assert growth_targets(g, old) == {"qkv_tokens": 48, "ffn_tokens": 200}
    g.grow_factor, g.ffn_tokens = 1.5, 120
    assert growth_targets(g, old) == {"qkv_tokens": 36, "ffn_tokens": 120}
    assert resolved_tau(g) == "frozen"  # zero_key keeps the pre-growth tau unless told otherwise
    g.init = "released"
    assert resolved_tau(g) == "auto"


def _cli_train(recipe, args):
    """`python -m recipes train <recipe> <args>`, what `make train RECIPE=<recipe> ARGS=...` runs; its run dir."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    r = subprocess.run([sys.executable, "-m", "recipes", "train", recipe, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return Path([line for line in r.stdout.splitlines() if line.startswith("run_dir: ")][-1][len("run_dir: "):])


def test_default_flow_train_then_grow_with_defaults(tmp_path, data_cache):
    # make train RECIPE=tokenformer; make train RECIPE=tokenformer_grow ARGS="tokenformer_grow.from_run=<run>":
    # every model and growth setting at its default (the `small` size, 64 / 256 tokens -> 2x), only the
    # schedule and data made small.
    quick = [f"run.root={tmp_path}", f"data.cache_dir={data_cache}", "logging.wandb=disabled",
             "trainer.progress_bar=false", "data.max_chars_per_domain=200000", "trainer.max_steps=2",
             "trainer.limit_val_batches=1"]
    source = _cli_train("tokenformer", quick)
    grown = _cli_train("tokenformer_grow", quick + [f"tokenformer_grow.from_run={source}"])
    summary = json.loads((grown / "summary.json").read_text())
    assert (summary["grow/from_qkv_tokens"], summary["grow/from_ffn_tokens"]) == (64, 256)
    assert (summary["grow/to_qkv_tokens"], summary["grow/to_ffn_tokens"]) == (128, 512)
    assert (summary["grow/init"], summary["grow/tau"]) == ("zero_key", "frozen")
    assert summary["grow/val_loss_after"] == pytest.approx(summary["grow/val_loss_before"], rel=1e-6)
    assert summary["step"] == 2
    weights, ckpt = _last_weights(grown)
    assert weights["layers.3.ffn.key_tokens"].shape == (512, 128)
    assert weights["final_norm.bias"].shape == (128,)
