"""End-to-end training on the embedded corpus with tiny real models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.engine.build import build_base_model, build_datamodule
from recipes.engine.config import load_config
from recipes.engine.logs import read_metrics
from recipes.engine.loop import resume_run, train
from tests.conftest import ROOT


def _losses(run_dir, key="train/loss"):
    return {r["step"]: r[key] for r in read_metrics(Path(run_dir) / "metrics.csv") if r.get(key) is not None}


def test_tiny_learns(tiny_overrides):
    cfg = load_config("tiny", tiny_overrides + ["trainer.max_steps=40", "trainer.val_check_interval=20",
                                                 "trainer.log_every_n_steps=1"])
    run_dir = train(cfg)
    val = _losses(run_dir, "val/loss")
    assert len(val) == 2
    first, last = (val[k] for k in sorted(val))
    initial = _losses(run_dir)[0]  # the untrained model: about ln(4096) = 8.3
    assert initial > 7.5
    assert last < first and last < initial - 1.2, (initial, val)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 40 and summary["tokens_seen"] == 40 * 16 * 128
    assert summary["val/loss"] == pytest.approx(last, abs=1e-6)
    assert {"val/loss_pydoc", "val/loss_stdlib", "perf/tokens_per_sec_mean"} <= set(summary)
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "config.yaml").read_text().count("max_steps: 40") == 1
    train_losses = _losses(run_dir)
    assert len(train_losses) == 40  # one row per step


def test_tiny_moe_runs(tiny_overrides):
    cfg = load_config("tiny_moe", tiny_overrides + ["trainer.max_steps=6", "trainer.log_every_n_steps=1"])
    run_dir = train(cfg)
    rows = read_metrics(run_dir / "metrics.csv")
    aux = [r["train/aux_loss"] for r in rows if r.get("train/aux_loss") is not None]
    assert len(aux) == 6 and all(a > 0 for a in aux)  # Mixtral's load-balancing term is in the loss
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 6


def test_pretrained_round_trip(tiny_overrides, tmp_path):
    cfg = load_config("tiny", tiny_overrides)
    dm = build_datamodule(cfg)
    model = build_base_model(cfg, dm).eval()
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").exists()
    cfg2 = load_config("tiny", tiny_overrides + [f"model.pretrained={tmp_path / 'saved'}"])
    loaded = build_base_model(cfg2, dm).eval()
    x = dm.val_set[0]["input_ids"][None, :32]
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)


def test_resume_equals_uninterrupted(tiny_overrides):
    common = tiny_overrides + ["trainer.max_steps=12", "trainer.log_every_n_steps=1", "trainer.val_check_interval=4",
                               "checkpoint.every_n_steps=100", "optim.warmup_steps=3"]
    straight = train(load_config("tiny", common + ["run.run_id=straight"]))
    cut = train(load_config("tiny", common + ["run.run_id=cut", "trainer.stop_at_step=6"]))
    assert max(_losses(cut)) == 5  # stopped after 6 steps (logged steps 0..5)
    resumed = resume_run(cut)
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == list(range(12))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    va, vb = _losses(straight, "val/loss"), _losses(resumed, "val/loss")
    assert va.keys() == vb.keys() and all(abs(va[k] - vb[k]) < 1e-5 for k in va)
    assert json.loads((resumed / "summary.json").read_text())["tokens_seen"] == 12 * 16 * 128


def test_cli_with_wandb_offline(tmp_path, data_cache):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    r = subprocess.run([sys.executable, "-m", "recipes", "train", "tiny", f"run.root={tmp_path}",
                        f"data.cache_dir={data_cache}", "data.max_chars_per_domain=200000", "trainer.max_steps=3",
                        "trainer.progress_bar=false", "logging.wandb=auto"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("run_dir: ")
    run_dir = Path(last.split(": ", 1)[1])
    run_dir = run_dir if run_dir.is_absolute() else ROOT / run_dir
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert (run_dir / "metrics.csv").exists()


def test_non_finite_loss_stops_with_message(tmp_path, data_cache):
    r = subprocess.run([sys.executable, "-m", "recipes", "train", "tiny", f"run.root={tmp_path}",
                        f"data.cache_dir={data_cache}", "data.max_chars_per_domain=200000", "trainer.max_steps=3",
                        "trainer.progress_bar=false", "logging.wandb=disabled",
                        "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0", "checkpoint.every_n_steps=1",
                        "trainer.max_steps=6", "run.run_id=nan"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "Non-finite" in r.stderr and "last good checkpoint is kept" in r.stderr
    assert "Traceback" not in r.stderr
    last = tmp_path / "tiny" / "nan" / "checkpoints" / "last.ckpt"
    if last.exists():  # whatever was kept holds finite weights
        ckpt = torch.load(last, weights_only=False)
        assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_guard_keeps_last_good_checkpoint(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from recipes.engine.callbacks import NonFiniteGuard
    from recipes.engine.checkpointing import AtomicCheckpointIO, checkpoint_step
    from recipes.engine.module import NonFiniteLossError

    class Regression(L.LightningModule):
        """A real linear regression whose weights an (injected) bad update makes infinite at step 3."""

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def training_step(self, batch, i):
            if self.global_step == 2:
                with torch.no_grad():
                    self.lin.weight.fill_(float("inf"))
            x, y = batch
            return torch.nn.functional.mse_loss(torch.nan_to_num(self.lin(x)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    trainer = L.Trainer(max_steps=10, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        plugins=[AtomicCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True,
                                                   save_top_k=0), NonFiniteGuard(1)])
    with pytest.raises(NonFiniteLossError, match="after step 3"):
        trainer.fit(Regression(), torch.utils.data.DataLoader(data, batch_size=8))
    assert checkpoint_step(tmp_path / "last.ckpt") == 2
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_bad_model_config_is_one_message(tmp_path, data_cache):
    r = subprocess.run([sys.executable, "-m", "recipes", "train", "tiny", f"run.root={tmp_path}",
                        f"data.cache_dir={data_cache}", "data.max_chars_per_domain=200000",
                        "logging.wandb=disabled", "model.overrides.initializer_range=1e30"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "initializer_range" in r.stderr and "Traceback" not in r.stderr
