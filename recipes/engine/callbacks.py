"""Training callbacks shared by every recipe."""
from __future__ import annotations

import sys
import time
import warnings
from typing import Any, Dict, Optional, Sequence

import lightning as L
import torch

# trainer.precision -> the dtype the matmuls run in (for the peak FLOP/s of the device)
PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "bf16": torch.bfloat16,
                    "16-mixed": torch.float16, "16-true": torch.float16, "16": torch.float16,
                    "32-true": torch.float32, "32": torch.float32, "64-true": torch.float64, "64": torch.float64}
GIB = float(2 ** 30)


def peak_flops(device: torch.device, precision: str = "bf16-mixed") -> Optional[float]:
    """Peak FLOP/s of one device at a training precision, from Lightning's table
    (lightning.fabric.utilities.throughput.get_available_flops: device- and dtype-aware, TF32 for fp32 matmuls on
    Ampere and later); None on CPUs and devices or precisions the table lacks."""
    from lightning.fabric.utilities.throughput import get_available_flops

    dtype = PRECISION_DTYPES.get(str(precision))
    if device.type == "cpu" or dtype is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "FLOPs not found for ...": the caller says it once, with the fix
        flops = get_available_flops(device, dtype)
    return float(flops) if flops else None


class ThroughputMonitor(L.Callback):
    """Per training step: perf/tokens_per_sec, perf/step_time, perf/overhead_frac (share of wall time between two
    steps spent outside the training step: data loading, logging, checkpointing), perf/tflops (model TFLOP/s per
    device, FLOPs per token from models.factory.flops_per_token), on GPUs perf/mfu (that / the device's peak) and
    perf/gpu_mem_alloc_gb / perf/gpu_mem_reserved_gb (peak memory so far)."""

    def __init__(self, flops_per_token: Optional[float] = None, block_size: Optional[int] = None,
                 peak_flops_per_device: Optional[float] = None):
        # Counted from the model at the first step when not given (a ZeRO-3 model exists only from set-up on).
        self.flops_per_token = flops_per_token
        self.block_size = block_size
        self.peak_override = peak_flops_per_device  # logging.peak_flops: replaces Lightning's table
        self.peak: Optional[float] = None
        self._peak_known = False
        self._prev_end: Optional[float] = None
        self._start: Optional[float] = None
        self.total_step_time = 0.0
        self.total_wall_time = 0.0
        self.total_tokens = 0
        self.steps = 0
        self._world_size = 1
        self.mem_alloc_gb: Optional[float] = None
        self.mem_reserved_gb: Optional[float] = None

    def _resolve_peak(self, trainer, pl_module) -> None:
        self._peak_known = True
        if self.peak_override:
            self.peak = float(self.peak_override)
            return
        self.peak = peak_flops(pl_module.device, str(trainer.precision))
        if self.peak is None and pl_module.device.type == "cuda" and trainer.is_global_zero:
            name = torch.cuda.get_device_name(pl_module.device)
            print(f"perf/mfu not logged: Lightning knows no peak FLOP/s for {name!r} at precision "
                  f"{trainer.precision}; set logging.peak_flops=<dense FLOP/s of one device> (e.g. 989e12 for bf16 "
                  "on an H100/H200 SXM).", file=sys.stderr, flush=True)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self.flops_per_token is None and self.block_size:
            from models.factory import flops_per_token

            self.flops_per_token = flops_per_token(pl_module.model, self.block_size)
        if not self._peak_known:
            self._resolve_peak(trainer, pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._start is None:
            return
        step_time = now - self._start
        wall = now - self._prev_end if self._prev_end is not None else step_time
        self._prev_end = now
        tokens = int(batch["input_ids"].numel()) * trainer.world_size
        self._world_size = trainer.world_size
        self.total_step_time += step_time
        self.total_wall_time += wall
        self.total_tokens += tokens
        self.steps += 1
        metrics = {"perf/tokens_per_sec": tokens / max(wall, 1e-9), "perf/step_time": step_time,
                   "perf/overhead_frac": max(0.0, 1.0 - step_time / max(wall, 1e-9))}
        if self.flops_per_token:
            per_device = tokens * self.flops_per_token / max(wall, 1e-9) / trainer.world_size
            metrics["perf/tflops"] = per_device / 1e12
            if self.peak:
                metrics["perf/mfu"] = per_device / self.peak
        if pl_module.device.type == "cuda":
            self.mem_alloc_gb = torch.cuda.max_memory_allocated(pl_module.device) / GIB
            self.mem_reserved_gb = torch.cuda.max_memory_reserved(pl_module.device) / GIB
            metrics["perf/gpu_mem_alloc_gb"] = self.mem_alloc_gb
            metrics["perf/gpu_mem_reserved_gb"] = self.mem_reserved_gb
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        pl_module.log("tok/s", metrics["perf/tokens_per_sec"], prog_bar=True, logger=False)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._prev_end = None  # validation time is not training overhead

    def totals(self) -> Dict[str, float]:
        """This segment's sums: training steps, tokens, time inside steps, wall time from step to step."""
        return {"steps": self.steps, "tokens": self.total_tokens, "step_time_s": self.total_step_time,
                "train_wall_s": self.total_wall_time}

    def summary(self, totals: Optional[Sequence[Dict[str, float]]] = None) -> dict:
        """Means for summary.json over `totals` (every segment's totals(); default: this segment's) and this
        segment's peak GPU memory (rank 0's device)."""
        parts = list(totals) if totals else [self.totals()]
        wall = sum(p.get("train_wall_s", 0.0) for p in parts)
        out: Dict[str, float] = {}
        if wall:
            tokens = sum(p.get("tokens", 0) for p in parts)
            out = {"perf/tokens_per_sec_mean": tokens / wall,
                   "perf/overhead_frac_mean": max(0.0, 1 - sum(p.get("step_time_s", 0.0) for p in parts) / wall)}
            if self.flops_per_token:
                world = max(1, self._world_size)
                out["perf/tflops_mean"] = tokens * self.flops_per_token / wall / world / 1e12
                if self.peak:
                    out["perf/mfu_mean"] = out["perf/tflops_mean"] * 1e12 / self.peak
        if self.mem_alloc_gb is not None:
            out["perf/gpu_mem_alloc_gb_peak"] = self.mem_alloc_gb
            out["perf/gpu_mem_reserved_gb_peak"] = self.mem_reserved_gb
        return out


def save_last_checkpoint(trainer, fallback_path) -> str:
    """Write last.ckpt now, through the run's ModelCheckpoint when it has one (so that its own bookkeeping knows
    this step is saved and it writes no second copy, e.g. `last-v1.ckpt`, at the end of fit)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = trainer.checkpoint_callback
    if isinstance(cb, ModelCheckpoint) and cb.save_last:
        cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))  # Lightning has no public call for this
        return cb.last_model_path
    trainer.save_checkpoint(fallback_path)
    return str(fallback_path)


class StopAtStep(L.Callback):
    """Checkpoint to last.ckpt and stop cleanly once the global step reaches `step` (a step boundary)."""

    def __init__(self, step: int, ckpt_path):
        self.step = step
        self.ckpt_path = ckpt_path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and trainer.fit_loop.epoch_loop.max_steps != trainer.global_step:
            save_last_checkpoint(trainer, self.ckpt_path)
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
            from .module import NonFiniteLossError

            raise NonFiniteLossError(
                f"Non-finite weights after step {step} ({len(bad)} tensors, e.g. {bad[0]}): stopping before the "
                "checkpoint; the last good checkpoint is kept. Lower optim.lr or raise optim.warmup_steps."
            )


class SignalCheckpoint(L.Callback):
    """Every signal a cluster or a user sends ends in ONE checkpoint at the next step boundary:

    SIGUSR1  SLURM's warning before the time limit / preemption (launch.sh: --signal=SIGUSR1@120)
    SIGTERM  preemption, `scancel`, the time limit without an earlier signal (SLURM then waits KillWait,
             30 s by default, before SIGKILL)
    SIGINT   Ctrl-C; a second Ctrl-C stops at once (every checkpoint on disk is whole: they are written
             to a temporary name and renamed)

    The handler only records the signal: saving inside it could interrupt a collective and hang. At the next
    step boundary every rank agrees (one all-reduce when distributed), last.ckpt is written (the only
    checkpoint of the interruption), the run is marked resumable in status.json, rank 0 asks SLURM to requeue
    the job for SIGUSR1 / SIGTERM (`scontrol requeue`), and the segment ends. Lightning's own SIGTERM handling
    (stop without a checkpoint) and SLURM handler (two checkpoints) are replaced."""

    SIGNALS = ("SIGUSR1", "SIGTERM", "SIGINT")

    def __init__(self, run_dir):
        from pathlib import Path

        self.run_dir = Path(run_dir)
        self.received: Optional[str] = None
        self.received_at: Optional[float] = None
        self.training = False
        self.interrupted: Optional[Dict[str, Any]] = None
        self._previous: Dict[int, Any] = {}

    # ---------------------------------------------------------------- the handler
    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        from .early_signals import EARLY_SIGNALS

        if EARLY_SIGNALS and self.received is None:
            self.received, self.received_at = EARLY_SIGNALS[0]
            EARLY_SIGNALS.clear()
            print(f"[signal] {self.received} during start-up: checkpoint at the first step boundary", flush=True)
        for name in self.SIGNALS:
            signum = getattr(signal, name)
            previous = signal.signal(signum, self.handler)
            if signum not in self._previous:
                self._previous[signum] = previous

    def uninstall(self) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def handler(self, signum, frame) -> None:
        import os
        import signal
        import sys

        name = signal.Signals(signum).name
        if self.received is not None and name == "SIGINT":
            print(f"\n[signal] second SIGINT: stopping now. Checkpoints on disk are whole; resume with "
                  f"`make resume RUN={self.run_dir}`.", file=sys.stderr, flush=True)
            os._exit(130)
        if not self.training and name == "SIGINT":
            raise KeyboardInterrupt  # before the first step there is nothing to save: stop now
        if self.received is None:
            self.received, self.received_at = name, time.time()
            print(f"\n[signal] {name}: checkpoint at the next step boundary"
                  + (" (Ctrl-C again to stop at once)" if name == "SIGINT" else ""), file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- Lightning hooks
    def on_train_start(self, trainer, pl_module) -> None:
        self.training = True
        self.install()  # after Lightning registered its own SIGTERM handler at the start of fit

    def on_train_end(self, trainer, pl_module) -> None:
        self.training = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flag = self.received is not None
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
        if not flag or self.interrupted is not None:
            return
        name = self.received or "SIGTERM"  # a rank that did not receive it follows the others
        t0 = time.time()
        path = save_last_checkpoint(trainer, self.run_dir / "checkpoints" / "last.ckpt")
        saved = time.time()
        requeued = False
        if trainer.is_global_zero and name in ("SIGUSR1", "SIGTERM"):
            requeued = requeue_slurm_job()
        self.interrupted = {"signal": name, "step": trainer.global_step, "checkpoint": str(path),
                            "seconds_to_checkpoint": saved - (self.received_at or t0),
                            "checkpoint_write_s": saved - t0, "requeued": requeued}
        trainer.fit_loop.epoch_loop.max_steps = trainer.global_step  # ends this segment, no extra validation


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
