"""Distributed benchmarks: DDP scaling on 2 CPU processes, and checkpoint save/load cost per strategy.

Run: python -m bench --only ddp_scaling   |   python -m bench --only checkpoint_cost
`checkpoint_cost` runs each strategy through `python -m bench.distributed <recipes CLI args>`: the recipes CLI
with (a) the CPU adapter for DeepSpeed from tests/deepspeed_cpu.py and (b) timers around Lightning's checkpoint
save and restore, which rank 0 writes to $BENCH_CKPT_TIMES as JSON.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import register

ROOT = Path(__file__).resolve().parents[1]
SLOW = {"checkpoint_cost"}

_COMMON = ["trainer.progress_bar=false", "logging.wandb=disabled", "trainer.val_check_interval=1000",
           "trainer.log_every_n_steps=1", "trainer.accelerator=cpu", "data.batch_size=8"]


def _run(args, env=None, timeout=1800):
    e = dict(os.environ, WANDB_MODE="disabled", **(env or {}))
    e.pop("LM_RECIPES_RUN_ID", None)
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=e, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return r


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@register("ddp_scaling", "Training tokens/s of `tiny` with DDP on 2 CPU processes (gloo) against 1 process, the "
          "same per-process batch (8 x 128 tokens); scaling ratio = tokens/s(2) / tokens/s(1), ideal 2.0 with "
          "two free cores.")
def ddp_scaling() -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    try:
        steps = 40
        base = [sys.executable, "-m", "recipes", "train", "tiny", f"run.root={tmp}", f"trainer.max_steps={steps}",
                "checkpoint.every_n_steps=1000", *_COMMON]
        _run(base + ["run.run_id=one", "trainer.devices=1"])
        _run(base + ["run.run_id=two", "trainer.devices=2", "trainer.strategy=ddp"])
        one, two = _summary(tmp / "tiny" / "one"), _summary(tmp / "tiny" / "two")
        t1, t2 = one["perf/tokens_per_sec_mean"], two["perf/tokens_per_sec_mean"]
        return {"tokens_per_sec_1proc": round(t1, 1), "tokens_per_sec_2proc_ddp": round(t2, 1),
                "scaling_ratio": round(t2 / t1, 3), "steps": steps, "cpu_cores": os.cpu_count(),
                "command": "python -m recipes train tiny trainer.accelerator=cpu data.batch_size=8 "
                           "trainer.devices=1  vs  trainer.devices=2 trainer.strategy=ddp"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _strategies_here():
    import importlib.util

    names = ["ddp", "fsdp2"]
    if importlib.util.find_spec("deepspeed") is not None:
        names[1:1] = ["deepspeed_stage_2", "deepspeed_stage_3"]
    return names


@register("checkpoint_cost", "Checkpoint save and load (restore) time of `tiny` on 2 CPU processes for each "
          "strategy that runs here, as a share of the median training step time. DeepSpeed runs on CPU "
          "through the test adapter (tests/deepspeed_cpu.py).")
def checkpoint_cost() -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    out = {}
    try:
        for strategy in _strategies_here():
            times = tmp / f"{strategy}.json"
            args = [f"run.root={tmp}", f"run.run_id={strategy}", "trainer.devices=2", f"trainer.strategy={strategy}",
                    "checkpoint.every_n_steps=2", *_COMMON]
            env = {"BENCH_CKPT_TIMES": str(times)}
            _run([sys.executable, "-m", "bench.distributed", "train", "tiny", *args, "trainer.max_steps=10",
                  "trainer.stop_at_step=8"], env=env)
            _run([sys.executable, "-m", "bench.distributed", "resume", str(tmp / "tiny" / strategy)], env=env)
            t = json.loads(times.read_text())
            from recipes.engine.logs import read_metrics

            steps = [r["perf/step_time"] for r in read_metrics(tmp / "tiny" / strategy / "metrics.csv")
                     if r.get("perf/step_time") is not None]
            step = statistics.median(steps)
            save, load = statistics.median(t["save"]), statistics.median(t["load"])
            out[strategy] = {"step_s": round(step, 4), "save_s": round(save, 4), "load_s": round(load, 4),
                             "save_share_of_step": round(save / step, 3), "load_share_of_step": round(load / step, 3),
                             "saves_timed": len(t["save"])}
        out["command"] = ("python -m bench.distributed train tiny trainer.devices=2 trainer.strategy=<s> "
                          "checkpoint.every_n_steps=2 (save every 2 steps, stop at 8, resume to 10)")
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install_timers(path: str) -> None:
    """Time Trainer.save_checkpoint and the checkpoint restore on rank 0; append to the JSON at `path`."""
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    def record(kind: str, seconds: float, trainer) -> None:
        if not trainer.is_global_zero:
            return
        p = Path(path)
        data = json.loads(p.read_text()) if p.exists() else {"save": [], "load": []}
        data[kind].append(seconds)
        p.write_text(json.dumps(data))

    save = pl.Trainer.save_checkpoint

    def timed_save(self, *a, **k):
        self.strategy.barrier()
        t = time.perf_counter()
        save(self, *a, **k)
        self.strategy.barrier()
        record("save", time.perf_counter() - t, self)

    restore_modules = _CheckpointConnector._restore_modules_and_callbacks
    restore_training = _CheckpointConnector.restore_training_state

    def timed_restore_modules(self, checkpoint_path=None, *a, **k):
        t = time.perf_counter()
        restore_modules(self, checkpoint_path, *a, **k)
        self._bench_load_s = time.perf_counter() - t

    def timed_restore_training(self):
        resuming = bool(self._loaded_checkpoint)
        t = time.perf_counter()
        restore_training(self)
        if resuming:
            record("load", getattr(self, "_bench_load_s", 0.0) + time.perf_counter() - t, self.trainer)

    pl.Trainer.save_checkpoint = timed_save
    _CheckpointConnector._restore_modules_and_callbacks = timed_restore_modules
    _CheckpointConnector.restore_training_state = timed_restore_training


if __name__ == "__main__":
    if os.environ.get("BENCH_CKPT_TIMES"):
        _install_timers(os.environ["BENCH_CKPT_TIMES"])
    from tests.deepspeed_cpu import install

    install()
    from recipes.__main__ import main

    sys.exit(main())
