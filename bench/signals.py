"""What a cluster signal costs: for SIGTERM, SIGINT and SIGUSR1 (under a hand-set SLURM environment with a
stand-in scontrol), a real `tiny` training process is signalled mid-run; measured are the seconds from the
signal to the checkpoint on disk, the steps lost (steps finished before the signal but not in the checkpoint;
goal 0), the process's exit code, and after `resume` the largest per-step loss difference to an uninterrupted
run of the same config.

Run: python -m bench --only signal_checkpoint
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import register

ROOT = Path(__file__).resolve().parents[1]
SLOW = {"signal_checkpoint"}
STEPS = 40


def _args(root, cache):
    return [f"run.root={root}", f"data.cache_dir={cache}", "data.max_chars_per_domain=200000",
            "trainer.progress_bar=false", "logging.wandb=disabled", f"trainer.max_steps={STEPS}",
            "trainer.log_every_n_steps=1", "trainer.val_check_interval=1000", "optim.warmup_steps=2",
            "checkpoint.every_n_steps=1000", "data.batch_size=16", "data.block_size=128"]


def _losses(run_dir: Path) -> dict:
    from recipes.engine.logs import read_metrics

    rows = read_metrics(run_dir / "metrics.csv")
    return {r["step"]: r["train/loss"] for r in rows if r.get("train/loss") is not None}


def _env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(WANDB_MODE="disabled", **(extra or {}))
    return env


@register("signal_checkpoint", "Seconds from SIGTERM / SIGINT / SIGUSR1 to the checkpoint, steps lost, and the "
          "resumed-vs-uninterrupted loss difference, on a real `tiny` training process (2 CPU cores).")
def signal_checkpoint() -> dict:
    from recipes.engine.checkpointing import checkpoint_step

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp, cache = Path(tmp), Path(tmp) / "cache"
        subprocess.run([sys.executable, "-m", "recipes", "train", "tiny", *_args(tmp, cache), "run.run_id=straight"],
                       cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=1800)
        straight = _losses(tmp / "tiny" / "straight")
        bindir = tmp / "bin"
        bindir.mkdir()
        (bindir / "scontrol").write_text("#!/bin/sh\nexit 0\n")
        (bindir / "scontrol").chmod(0o755)
        slurm = {"PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "1",
                 "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                 "SLURM_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NAME": "bench"}
        for name, extra in (("SIGTERM", None), ("SIGINT", None), ("SIGUSR1", slurm), ("SIGTERM_slurm", slurm)):
            sig = getattr(signal, name.split("_")[0])
            run_id = name.lower()
            env = _env(extra)
            proc = subprocess.Popen([sys.executable, "-m", "recipes", "train", "tiny", *_args(tmp, cache),
                                     f"run.run_id={run_id}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            run_dir = tmp / "tiny" / run_id
            seen = -1
            while seen < 10 and proc.poll() is None:
                try:
                    seen = max(_losses(run_dir), default=-1)
                except (OSError, ValueError, KeyError):
                    pass
                time.sleep(0.05)
            sent = time.time()
            proc.send_signal(sig)
            proc.communicate(timeout=600)
            ended = time.time()
            status = json.loads((run_dir / "status.json").read_text())
            ckpt_step = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
            done_before = seen + 1  # steps logged as finished when the signal was sent (0-based index + 1)
            subprocess.run([sys.executable, "-m", "recipes", "resume", str(run_dir)], cwd=ROOT, env=env, check=True,
                           capture_output=True, timeout=1800)
            resumed = _losses(run_dir)
            out[name] = {"exit_code": proc.returncode, "seconds_to_checkpoint": status["seconds_to_checkpoint"],
                         "process_exit_s": round(ended - sent, 2),
                         "checkpoint_write_s": status["checkpoint_write_s"], "checkpoint_step": ckpt_step,
                         "steps_lost": max(0, done_before - ckpt_step),
                         "max_abs_loss_diff_vs_uninterrupted": max(abs(resumed[k] - straight[k]) for k in straight)}
    return out
