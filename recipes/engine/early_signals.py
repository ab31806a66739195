"""Signals that arrive before a run's SignalCheckpoint exists (Python start-up, imports, data preparation).

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
