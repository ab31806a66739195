"""Signals that arrive before a run's SignalCheckpoint exists (Python start-up, imports, data preparation), and
after the command has finished (interpreter shutdown).

Kept free of heavy imports: the command line installs `record_early_signal` for SIGUSR1 and SIGTERM as its
first action, and SignalCheckpoint adopts what was recorded, so the checkpoint (and SLURM requeue) happens at
the first step boundary instead of the signal's default action killing the process."""
from __future__ import annotations

import signal
import time
from typing import List, Tuple

EARLY_SIGNALS: List[Tuple[str, float]] = []


def record_early_signal(signum, frame) -> None:
    EARLY_SIGNALS.append((signal.Signals(signum).name, time.time()))


def ignore_late_signals() -> None:
    """Once the command has finished (checkpoint, summary and status all written) a late SIGUSR1 / SIGTERM has
    nothing left to save. Python resets its own handlers to the default action while the interpreter shuts
    down, and the default action of both kills the process: a SLURM warning arriving in that second or two
    would turn a finished job into a FAILED one (exit 138). Ignoring them at the OS level outlives shutdown.
    Called by `python -m recipes` after main() returns, in the main thread."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
