"""Training callbacks shared by every recipe."""
from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch

# Dense bf16 peak FLOP/s by device name fragment, for model FLOPs utilisation on GPUs.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                   "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "A6000": 155e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_BF16_FLOPS.items():
        if key in name:
            return val
    return None


class ThroughputMonitor(L.Callback):
    """Logs perf/tokens_per_sec, perf/step_time, perf/overhead_frac (share of wall time between two
    steps spent outside the training step: data loading, logging, checkpointing) and, on GPUs, perf/mfu."""

    def __init__(self, flops_per_token: Optional[float] = None):
        self.flops_per_token = flops_per_token
        self._prev_end: Optional[float] = None
        self._start: Optional[float] = None
        self.total_step_time = 0.0
        self.total_wall_time = 0.0
        self.total_tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._start is None:
            return
        step_time = now - self._start
        wall = now - self._prev_end if self._prev_end is not None else step_time
        self._prev_end = now
        tokens = int(batch["input_ids"].numel()) * trainer.world_size
        self.total_step_time += step_time
        self.total_wall_time += wall
        self.total_tokens += tokens
        metrics = {"perf/tokens_per_sec": tokens / max(wall, 1e-9), "perf/step_time": step_time,
                   "perf/overhead_frac": max(0.0, 1.0 - step_time / max(wall, 1e-9))}
        peak = peak_flops(pl_module.device)
        if peak and self.flops_per_token:
            metrics["perf/mfu"] = tokens * self.flops_per_token / max(wall, 1e-9) / (peak * trainer.world_size)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        pl_module.log("tok/s", metrics["perf/tokens_per_sec"], prog_bar=True, logger=False)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._prev_end = None  # validation time is not training overhead

    def summary(self) -> dict:
        if not self.total_wall_time:
            return {}
        return {"perf/tokens_per_sec_mean": self.total_tokens / self.total_wall_time,
                "perf/overhead_frac_mean": max(0.0, 1 - self.total_step_time / self.total_wall_time)}


class StopAtStep(L.Callback):
    """Checkpoint to last.ckpt and stop cleanly once the global step reaches `step` (a step boundary)."""

    def __init__(self, step: int, ckpt_path):
        self.step = step
        self.ckpt_path = ckpt_path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and trainer.fit_loop.epoch_loop.max_steps != trainer.global_step:
            trainer.save_checkpoint(self.ckpt_path)
            # Lower the loop's step limit rather than setting should_stop: should_stop would also trigger
            # an extra validation that an uninterrupted run does not have.
            trainer.fit_loop.epoch_loop.max_steps = trainer.global_step


class NonFiniteGuard(L.Callback):
    """Before a checkpoint step, make sure the weights are finite: an update can turn a finite loss into
    infinite weights, and that state must never replace the last good checkpoint. Lightning runs
    ModelCheckpoint after all other callbacks, so raising here keeps the previous checkpoint."""

    def __init__(self, every_n_steps: int, extra_steps=()):
        self.every = max(1, every_n_steps)
        self.extra = set(extra_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every and step not in self.extra:
            return
        bad = [n for n, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            from .lm_module import NonFiniteLossError

            raise NonFiniteLossError(
                f"Non-finite weights after step {step} ({len(bad)} tensors, e.g. {bad[0]}): stopping before the "
                "checkpoint; the last good checkpoint is kept. Lower optim.lr or raise optim.warmup_steps."
            )


class PreemptionCheckpoint(L.Callback):
    """SIGUSR1 (SLURM's warning before preemption or the time limit) -> checkpoint and requeue.

    The signal handler only sets a flag: saving inside the handler could interrupt a collective and
    hang. At the next step boundary every rank agrees on the flag (one all-reduce when distributed),
    the checkpoint is written as hpc_ckpt_<n>.ckpt in the run directory, rank 0 asks SLURM to requeue
    the job (`scontrol requeue`), and the segment ends. Lightning's own handler, which saves inside the
    signal handler, is switched off (SLURMEnvironment(auto_requeue=False)).
    """

    def __init__(self, run_dir):
        from pathlib import Path

        self.run_dir = Path(run_dir)
        self.flag = False
        self.preempted = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.flag = True

    def on_train_start(self, trainer, pl_module) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGUSR1, self._handler)

    def on_train_end(self, trainer, pl_module) -> None:
        import signal
        import threading

        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._previous)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flag = self.flag
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
        if not flag or self.preempted:
            return
        self.preempted = True
        path = trainer._checkpoint_connector.hpc_save_path(str(self.run_dir))
        trainer.save_checkpoint(path)
        print(f"[preemption] checkpoint at step {trainer.global_step}: {path}", flush=True)
        if trainer.is_global_zero:
            requeue_slurm_job()
        trainer.fit_loop.epoch_loop.max_steps = trainer.global_step


def requeue_slurm_job() -> bool:
    import os
    import subprocess

    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{array_task}" if array_job and array_task else job
    try:
        r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        print(f"[preemption] scontrol requeue {job_id}: rc={r.returncode} {r.stderr.strip()}", flush=True)
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"[preemption] requeue of {job_id} failed: {e}", flush=True)
        return False
