"""Backbone benchmarks: training throughput of `tiny`, step-time overhead, data pipeline memory, setup."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import register

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env=None, timeout=1800):
    t = time.time()
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{r.stderr[-3000:]}")
    return r, time.time() - t


@register("tiny_throughput", "Training throughput of recipe `tiny` (2 CPU cores) and the share of wall time "
          "between steps spent outside forward/backward/optimizer (data, logging, checkpointing; target < 10%).")
def tiny_throughput() -> dict:
    tmp = tempfile.mkdtemp(prefix="bench_tiny_")
    try:
        args = [sys.executable, "-m", "recipes", "train", "tiny", f"run.root={tmp}", "trainer.max_steps=100",
                "trainer.progress_bar=false", "logging.wandb=disabled", "checkpoint.every_n_steps=25",
                "trainer.val_check_interval=1000"]
        r, wall = _run(args)
        run_dir = Path(r.stdout.strip().splitlines()[-1].split(": ", 1)[1])
        run_dir = run_dir if run_dir.is_absolute() else ROOT / run_dir
        s = json.loads((run_dir / "summary.json").read_text())
        return {"tokens_per_sec": round(s["perf/tokens_per_sec_mean"], 1),
                "overhead_frac": round(s["perf/overhead_frac_mean"], 4),
                "steps": s["step"], "checkpoints_every": 25, "process_wall_s": round(wall, 1),
                "command": "python -m recipes train tiny trainer.max_steps=100 checkpoint.every_n_steps=25"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_PIPELINE = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from data.config import DataConfig
from data.datamodule import LMDataModule
t = time.time()
dm = LMDataModule(DataConfig(cache_dir={cache!r}, max_chars_per_domain=0))
dm.prepare()
n = 0
for b in dm.train_dataloader():
    n += b["input_ids"].numel()
print(json.dumps({{"prepare_and_iterate_s": time.time() - t, "train_tokens_packed": n,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "corpus_tokens": sum(v["train"] + v["val"] for v in dm.stats["tokens"].values())}}))
"""


@register("data_pipeline_memory", "Peak resident memory and time of the data pipeline over the WHOLE embedded "
          "corpus (no character budget): tokenizer, tokenisation, packing and one pass of the train loader.")
def data_pipeline_memory() -> dict:
    cache = tempfile.mkdtemp(prefix="bench_data_")
    try:
        r, _ = _run([sys.executable, "-c", _PIPELINE.format(root=str(ROOT), cache=cache)])
        out = json.loads(r.stdout.strip().splitlines()[-1])
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


@register("setup_time", "Time of `make train RECIPE=tiny ARGS=trainer.max_steps=1` on a fresh clone: first "
          "(creates .venv from requirements.txt) and second time. Slow: only with --only setup_time.")
def setup_time() -> dict:
    tmp = tempfile.mkdtemp(prefix="bench_setup_")
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), f"{tmp}/fresh"], check=True)
        env = dict(os.environ, WANDB_MODE="disabled")
        times = []
        for _ in range(2):
            t = time.time()
            subprocess.run(["make", "train", "RECIPE=tiny", "ARGS=trainer.max_steps=1 trainer.progress_bar=false"],
                           cwd=f"{tmp}/fresh", env=env, check=True, capture_output=True)
            times.append(round(time.time() - t, 1))
        return {"first_s": times[0], "second_s": times[1]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


SLOW = {"setup_time"}
