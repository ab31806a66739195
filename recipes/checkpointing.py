"""Checkpoints that are never half-written under their final name, and choosing the one to resume.

Lightning's own checkpoint writer writes the final file in place; `AtomicCheckpointIO` writes a
temporary file in the same directory, fsyncs it, and renames it over the final name (rename is atomic
on POSIX), so a kill at any point leaves either the old checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            if tmp.exists():
                tmp.unlink()


def checkpoint_step(path: Path) -> Optional[int]:
    """Global step stored in a Lightning checkpoint (file or DeepSpeed directory); None if unreadable."""
    path = Path(path)
    try:
        if path.is_dir():  # DeepSpeed: <dir>/checkpoint/mp_rank_00_model_states.pt holds the Lightning state
            cands = sorted(path.glob("checkpoint/mp_rank_00_model_states.pt")) or sorted(path.glob("**/*model_states.pt"))
            if not cands:
                return None
            path = cands[0]
        # Lightning's own checkpoints hold optimizer and loop state, not just tensors.
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        return int(ckpt["global_step"])
    except Exception as e:
        warnings.warn(f"Skipping unreadable checkpoint {path}: {type(e).__name__}: {e}")
        return None


def list_checkpoints(run_dir: Path) -> List[Path]:
    run_dir = Path(run_dir)
    found = []
    for d in (run_dir / "checkpoints", run_dir):
        if d.is_dir():
            found += [p for p in d.iterdir() if (p.suffix == ".ckpt") and not p.name.startswith(".")]
    return sorted(set(found))


def newest_checkpoint(run_dir: Path) -> Optional[Tuple[Path, int]]:
    """The checkpoint with the highest global step among last.ckpt, step checkpoints and SLURM
    hpc_ckpt_*.ckpt (Lightning alone would prefer an hpc checkpoint even when last.ckpt is newer).
    On equal steps last.ckpt wins. Unreadable (corrupt) files are skipped with a warning."""
    best: Optional[Tuple[Path, int]] = None
    for p in list_checkpoints(run_dir):
        step = checkpoint_step(p)
        if step is None:
            continue
        if best is None or step > best[1] or (step == best[1] and p.name == "last.ckpt"):
            best = (p, step)
    return best
