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


def checkpoint_kind(path: Path) -> str:
    """'file' (a Lightning .ckpt), 'deepspeed' (a DeepSpeed directory) or 'distributed' (a torch
    distributed-checkpoint directory of Lightning's ModelParallelStrategy, i.e. FSDP2)."""
    path = Path(path)
    if not path.is_dir():
        return "file"
    if (path / "meta.pt").exists():
        return "distributed"
    return "deepspeed"


def _state_file(path: Path) -> Optional[Path]:
    """The file of a checkpoint that holds Lightning's own state (global step, loops, callbacks)."""
    kind = checkpoint_kind(path)
    if kind == "file":
        return path
    if kind == "distributed":
        return path / "meta.pt"
    # DeepSpeed: <dir>/checkpoint/mp_rank_00_model_states.pt carries Lightning's state as client state
    cands = sorted(path.glob("checkpoint/mp_rank_00_model_states.pt")) or sorted(path.glob("**/*model_states.pt"))
    return cands[0] if cands else None


def checkpoint_step(path: Path) -> Optional[int]:
    """Global step stored in a Lightning checkpoint (file, DeepSpeed or FSDP2 directory); None if unreadable."""
    path = Path(path)
    try:
        state = _state_file(path)
        if state is None:
            return None
        path = state
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
            # a directory checkpoint set aside by a replacement that a kill interrupted (see below)
            found += [p for p in d.glob(".*.ckpt.old") if not (d / p.name[1:-len(".old")]).exists()]
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


def atomic_directory_saves(strategy_cls: type) -> type:
    """A subclass of a Lightning strategy whose directory checkpoints (DeepSpeed, FSDP2 sharded) are
    written to a hidden `.<name>.partial` directory by every rank and then swapped in by rank 0:
    `<name>` -> `.<name>.old`, `.<name>.partial` -> `<name>`, remove `.<name>.old`. A kill at any moment
    leaves either the previous complete checkpoint (under its name or, between the two renames, as
    `.<name>.old`, which `list_checkpoints` picks up) or the new one. Single-file saves are unchanged."""
    import shutil

    class AtomicDirectorySaves(strategy_cls):
        def save_checkpoint(self, checkpoint, filepath, storage_options=None):
            final = Path(self.broadcast(str(filepath)))
            writes_directory = getattr(self, "_save_distributed_checkpoint", True)
            if not writes_directory:  # one file through the (atomic) CheckpointIO
                return super().save_checkpoint(checkpoint, final, storage_options)
            partial = final.with_name(f".{final.name}.partial")
            old = final.with_name(f".{final.name}.old")
            if self.is_global_zero:
                final.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(partial, ignore_errors=True)
            self.barrier("atomic_ckpt_start")
            super().save_checkpoint(checkpoint, partial, storage_options)
            self.barrier("atomic_ckpt_written")
            if self.is_global_zero:
                _fsync_tree(partial)
                if final.exists():
                    shutil.rmtree(old, ignore_errors=True)
                    if final.is_dir():
                        os.replace(final, old)
                    else:
                        final.unlink()
                os.replace(partial, final)
                _fsync_dir(final.parent)
                shutil.rmtree(old, ignore_errors=True)
            self.barrier("atomic_ckpt_done")

    AtomicDirectorySaves.__name__ = AtomicDirectorySaves.__qualname__ = f"Atomic{strategy_cls.__name__}"
    return AtomicDirectorySaves


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
