"""Checkpoints that are never half-written under their final name, never unpickle code, and choosing the one
to resume.

Writing: Lightning's own checkpoint writer writes the final file in place; `AtomicCheckpointIO` writes a
temporary file in the same directory, fsyncs it, and renames it over the final name (rename is atomic on
POSIX), so a kill at any point leaves either the old checkpoint or the new one, never a torn file. A full disk
is reported with the path and the last good checkpoint (`DiskFullError`).

Reading: every checkpoint is loaded with `torch.load(weights_only=True)` (tensors, numbers, strings and plain
containers only), Lightning's own resume included (`AtomicCheckpointIO.load_checkpoint`). Directory
checkpoints, which DeepSpeed and torch's distributed checkpoint read with full unpickling, are verified file by
file first (`verify_checkpoint_safe`). Anything else is refused with `UnsafeCheckpointError`; a trusted file
of another format can be converted once with `python -m recipes convert-checkpoint <path> --trust`.
"""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .errors import ConfigError


class UnsafeCheckpointError(ConfigError):
    """A checkpoint that holds objects other than tensors and plain containers (unpickling it could run code)."""


class DiskFullError(ConfigError):
    """No space left while writing a checkpoint: the message names the path and the last good checkpoint."""


def load_checkpoint_file(path, map_location: Any = "cpu", mmap: bool = False) -> Dict[str, Any]:
    """torch.load with weights_only=True, or UnsafeCheckpointError naming the file and the offending object."""
    try:
        return torch.load(str(path), map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split("\n")
        reason = next((line.strip() for line in detail if "GLOBAL" in line or "Unsupported" in line), detail[0])
        raise UnsafeCheckpointError(
            f"Refusing to load {path}: it holds objects other than tensors and plain containers ({reason[:200]}), "
            "and unpickling those could run code. If you wrote this file yourself (e.g. with another version of "
            f"this repository) and trust it, convert it once: python -m recipes convert-checkpoint {path} --trust"
        ) from None


# torch's distributed checkpoint (FSDP2) writes its index (.metadata) with plain pickle: it is read back with
# an unpickler that only builds these classes.
_DCP_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                     "torch.distributed.checkpoint._extension", "torch.distributed.checkpoint.filesystem")
_DCP_SAFE_GLOBALS = {("torch", "Size"), ("torch", "float32"), ("torch", "bfloat16"), ("torch", "float16"),
                     ("torch", "int64"), ("torch", "int32"), ("torch", "strided"), ("torch", "device"),
                     ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                     ("builtins", "slice"), ("torch._utils", "_rebuild_tensor_v2"), ("torch", "dtype"),
                     ("torch.storage", "_load_from_bytes"), ("torch", "layout"), ("torch", "memory_format"),
                     ("torch", "contiguous_format"), ("torch", "preserve_format"),
                     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


def _deepspeed_data_classes() -> list:
    """The plain-data classes DeepSpeed's ZeRO optimizer states hold (a loss scaler's numbers, an enum, a named
    tuple of offsets): allowed when verifying a DeepSpeed checkpoint directory, nothing else."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _DCP_SAFE_MODULES or (module, name) in _DCP_SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def verify_checkpoint_safe(path: Path) -> None:
    """Raise UnsafeCheckpointError unless every file of the checkpoint loads without running code."""
    path = Path(path)
    if not path.is_dir():
        load_checkpoint_file(path, mmap=True)
        return
    allowed = _deepspeed_data_classes() if checkpoint_kind(path) == "deepspeed" else []
    for f in sorted(path.rglob("*")):
        if f.suffix == ".pt":
            with torch.serialization.safe_globals(allowed):
                load_checkpoint_file(f, mmap=True)
        elif f.name == ".metadata":
            try:
                with open(f, "rb") as fh:
                    _RestrictedUnpickler(fh).load()
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(f"Refusing to load {path}: its index {f} holds objects other than "
                                            f"checkpoint metadata ({e}).") from None


def _nearly_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < 8 * 2**20
    except OSError:
        return False


def _disk_full(path: Path, error: Exception) -> DiskFullError:
    usage = shutil.disk_usage(path.parent if path.parent.exists() else Path("."))
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    try:
        good = newest_checkpoint(run_dir)
    except ConfigError:
        good = None
    last = f"{good[0]} (step {good[1]})" if good else "none"
    return DiskFullError(f"No space left on the device writing checkpoint {path} ({usage.free // 2**20} MB free "
                         f"there; {getattr(error, 'strerror', None) or type(error).__name__}). "
                         f"The last good checkpoint is {last}; free some space and "
                         f"`make resume RUN={run_dir}`.")


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
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as a RuntimeError
            full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or _nearly_full(path.parent)
            if tmp.exists():
                tmp.unlink()
            if full:
                raise _disk_full(path, e) from None
            raise
        finally:
            if tmp.exists():
                tmp.unlink()

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None):
        # Whatever the caller asks for: never unpickle more than tensors and plain containers.
        return load_checkpoint_file(path, map_location=map_location or "cpu")


def checkpoint_kind(path: Path) -> str:
    """'file' (a Lightning .ckpt), 'deepspeed' (a DeepSpeed directory) or 'distributed' (a torch
    distributed-checkpoint directory of Lightning's ModelParallelStrategy, i.e. FSDP2)."""
    path = Path(path)
    if not path.is_dir():
        return "file"
    if (path / "meta.pt").exists():
        return "distributed"
    return "deepspeed"


def checkpoint_state_file(path: Path) -> Optional[Path]:
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
    """Global step stored in a Lightning checkpoint (file, DeepSpeed or FSDP2 directory); None if unreadable
    (corrupt, truncated); UnsafeCheckpointError if it holds objects that unpickling would have to build."""
    path = Path(path)
    try:
        state = checkpoint_state_file(path)
        if state is None:
            return None
        path = state
        ckpt = load_checkpoint_file(path, mmap=True)
        return int(ckpt["global_step"])
    except UnsafeCheckpointError:
        raise
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
    On equal steps last.ckpt wins. Unreadable (corrupt) files are skipped with a warning; a file that is not
    plain data (UnsafeCheckpointError) stops the search: it is never loaded and never silently passed over."""
    best: Optional[Tuple[Path, int]] = None
    for p in list_checkpoints(run_dir):
        step = checkpoint_step(p)
        if step is None:
            continue
        if best is None or step > best[1] or (step == best[1] and p.name == "last.ckpt"):
            best = (p, step)
    return best


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of checkpoint writes that a kill interrupted (never under a final name): delete them."""
    for d in (Path(run_dir) / "checkpoints", Path(run_dir)):
        if d.is_dir():
            for p in d.glob(".*.tmp*"):
                if p.is_file():
                    p.unlink(missing_ok=True)


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
