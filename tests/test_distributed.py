"""DDP on CPU, kill -9 at random points, atomic checkpoints (signals: tests/test_signals.py)."""
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recipes.engine.checkpointing import AtomicCheckpointIO, checkpoint_step, newest_checkpoint
from recipes.engine.logs import read_metrics
from tests.conftest import ROOT


def _cli(*args, env=None, timeout=600):
    e = dict(os.environ, WANDB_MODE="disabled", **(env or {}))
    return subprocess.run([sys.executable, "-m", "recipes", *args], cwd=ROOT, capture_output=True, text=True,
                          env=e, timeout=timeout)


def _common(tmp_path, data_cache, steps):
    return [f"run.root={tmp_path}", f"data.cache_dir={data_cache}", "data.max_chars_per_domain=200000",
            "trainer.progress_bar=false", "logging.wandb=disabled", f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=1", "trainer.val_check_interval=1000", "optim.warmup_steps=2"]


def _train_losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(Path(run_dir) / "metrics.csv")
            if r.get("train/loss") is not None}


def _assert_same_curve(a, b, n):
    assert sorted(a) == sorted(b) == list(range(n)), (sorted(a), sorted(b))
    for k in a:
        assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])


def test_ddp_two_processes_trains_and_resumes(tmp_path, data_cache):
    ddp = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=8"]
    r = _cli("train", "tiny", *_common(tmp_path, data_cache, 8), *ddp, "run.run_id=straight")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli("train", "tiny", *_common(tmp_path, data_cache, 8), *ddp, "run.run_id=cut", "trainer.stop_at_step=4")
    assert r.returncode == 0, r.stderr[-3000:]
    cut = tmp_path / "tiny" / "cut"
    assert checkpoint_step(cut / "checkpoints" / "last.ckpt") == 4
    r = _cli("resume", str(cut))
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_curve(_train_losses(tmp_path / "tiny" / "straight"), _train_losses(cut), 8)
    s = json.loads((cut / "summary.json").read_text())
    assert s["step"] == 8 and s["tokens_seen"] == 8 * 2 * 8 * 128  # steps * ranks * batch * block


def test_atomic_checkpoint_survives_failed_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "w": torch.ones(3)}, target)

    def torn_save(obj, f, *a, **k):  # writes half a file, then the process "dies"
        f.write(b"\x80\x02garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 4, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert checkpoint_step(target) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_corrupt_newest_checkpoint_is_skipped(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    AtomicCheckpointIO().save_checkpoint({"global_step": 7}, ck / "last.ckpt")
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        best = newest_checkpoint(tmp_path)
    assert best == (ck / "last.ckpt", 7)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kill9_at_random_points_always_resumes(tmp_path, data_cache, seed):
    rng = random.Random(seed)
    steps = 24
    args = _common(tmp_path, data_cache, steps) + ["checkpoint.every_n_steps=1", "run.run_id=k"]
    run_dir = tmp_path / "tiny" / "k"
    for attempt in range(2):  # two kills at random moments (checkpoints are written every step)
        proc = subprocess.Popen([sys.executable, "-m", "recipes", "train" if attempt == 0 else "resume",
                                 *(["tiny", *args] if attempt == 0 else [str(run_dir)])], cwd=ROOT,
                                env=dict(os.environ, WANDB_MODE="disabled"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(6.0, 14.0))
        proc.kill()
        proc.wait()
    r = _cli("resume", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["step"] == steps


def test_run_id_is_shared_with_ddp_children_only(tmp_path, monkeypatch):
    from recipes.engine.config import load_config
    from recipes.engine.runs import make_run_dir

    monkeypatch.delenv("LM_RECIPES_RUN_ID", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")  # the launching process (Lightning sets 0 there)
    first = make_run_dir(load_config("tiny", [f"run.root={tmp_path}"]))
    second = make_run_dir(load_config("tiny", [f"run.root={tmp_path}"]))
    assert first != second  # a second run in one process is a run of its own, not a leak of the first's id
    monkeypatch.setenv("LOCAL_RANK", "1")  # a child the DDP launcher started: it joins the parent's run
    assert make_run_dir(load_config("tiny", [f"run.root={tmp_path}"])) == second
