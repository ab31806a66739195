"""`python -m recipes convert-checkpoint <path> --trust`: rewrite a checkpoint file that holds objects other than
tensors and plain containers (e.g. numpy scalars or arrays written by other tools or versions) as plain data,
so that it loads with `torch.load(weights_only=True)` like every checkpoint of this repository.

Converting never unpickles with full trust: besides plain data it admits numpy's array and scalar reconstructors
only (anything else is refused, naming it), and `--trust` confirms that you wrote the file yourself. The original
is kept beside it as `<name>.orig`; the converted file is written atomically and verified."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpointing import UnsafeCheckpointError, load_checkpoint_file

PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.Size, torch.device)


def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """Containers -> dict/list/tuple, numpy arrays -> tensors, numpy scalars -> Python numbers; anything else
    is an error naming where it sits (nothing is silently dropped)."""
    import numpy as np

    if isinstance(obj, PLAIN):
        return obj
    if isinstance(obj, dict):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(out) if isinstance(obj, tuple) else out
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    raise UnsafeCheckpointError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which has no plain-data "
                                "form; this checkpoint cannot be converted.")


def _load_with_numpy(path: Path) -> Any:
    """torch.load(weights_only=True) with numpy's array/scalar reconstructors additionally allowed: still never a
    full unpickle. Any other non-plain object is an error naming it (it cannot be converted)."""
    import importlib
    import pickle

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise UnsafeCheckpointError(f"{path} cannot be read as plain data ({e}); it cannot be converted.") from None
    other = [n for n in names if not n.startswith("numpy.")]
    if other:
        raise UnsafeCheckpointError(f"{path} holds {', '.join(other)}: not plain data and not numpy; this checkpoint "
                                    "cannot be converted.")
    allowed = []
    for name in names:
        module, _, attr = name.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attr))
    if allowed:  # numpy dtypes are rebuilt through their classes, which the scan above does not list
        import numpy as np

        allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    with torch.serialization.safe_globals(allowed):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def convert(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UnsafeCheckpointError(f"{path} is a directory checkpoint; convert-checkpoint rewrites single files.")
    plain = to_plain(_load_with_numpy(path))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(plain, str(tmp))
    load_checkpoint_file(tmp)  # it must now load safely
    os.replace(path, path.with_name(path.name + ".orig"))
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipes convert-checkpoint", description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("--trust", action="store_true",
                   help="required: you confirm you wrote this file yourself")
    a = p.parse_args(argv)
    if not a.trust:
        print("error: convert only files you wrote yourself; pass --trust to confirm.",
              file=sys.stderr)
        return 2
    try:
        load_checkpoint_file(a.path)
        print(f"{a.path} already loads as plain data; nothing to do.")
        return 0
    except UnsafeCheckpointError:
        pass
    try:
        out = convert(a.path)
    except UnsafeCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted: {out} (original kept as {out.name}.orig)")
    return 0
