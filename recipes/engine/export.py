"""Export a run's newest checkpoint as a folder that transformers loads (safetensors + config + tokenizer [+ code]).

    python -m recipes export <run_dir> [--checkpoint PATH] [--out DIR]      (make export RUN=<run_dir>)

The output (default <run_dir>/export) is written by `models.hub_export.save_export`: a plain transformers model
(llama, mixtral, ... as the recipe built it) as `save_pretrained`; an AdaMoE (retrofitted), TokenFormer or OpenMoE
model under a model_type of its own with `auto_map` and its code, so `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` gives the trained model anywhere and refuses without trust_remote_code; a LoRA (peft)
run merged, with its adapter in <export>/adapter. It loads back here with `model.pretrained=<run_dir>/export`.
An existing export there is replaced whole (written aside, then swapped in). Every checkpoint kind is
consolidated into one full fp32 state dict first:
  - a Lightning .ckpt file: its `state_dict`;
  - a DeepSpeed directory (ZeRO-2/3): DeepSpeed's own zero_to_fp32 merges the fp32 master weights of all
    ranks (needs the deepspeed package);
  - a torch distributed-checkpoint directory (FSDP2, Lightning's ModelParallelStrategy): the shards are
    read back into full tensors in this single process.
The LightningModule's keys are `model.<name>`; the prefix is stripped and the weights are loaded into a
freshly built model of the run's own recipe (so retrofitted architectures keep their extra modules),
strictly: a missing or unexpected tensor is an error, not a silent random weight.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from models.hub_export import save_export

from .checkpointing import checkpoint_kind, load_checkpoint_file, newest_checkpoint, verify_checkpoint_safe

MODULE_PREFIX = "model."  # CausalLMModule keeps the HF-style model as `self.model`


def _deepspeed_state_dict(ckpt_dir: Path) -> Dict[str, torch.Tensor]:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise RuntimeError(f"{ckpt_dir} is a DeepSpeed checkpoint; consolidating it needs the deepspeed package "
                           "(pip install --no-build-isolation deepspeed==0.19.8).") from None
    tag = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").exists() else None
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))


def _distributed_state_dict(ckpt_dir: Path) -> Dict[str, torch.Tensor]:
    """Full tensors of the `state_dict` entries of a torch distributed checkpoint, read without a process
    group: the metadata lists each tensor's full size and dtype; empty tensors of that shape are filled."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(ckpt_dir))
    meta = reader.read_metadata()
    prefix = "state_dict."
    empty: Dict[str, torch.Tensor] = {}
    for key, item in meta.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata):
            empty[key[len(prefix):]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not empty:
        raise RuntimeError(f"{ckpt_dir} holds no model tensors (no 'state_dict.*' entries).")
    loaded = {"state_dict": empty}
    dcp.load(loaded, storage_reader=reader, no_dist=True)
    return loaded["state_dict"]


def consolidated_state_dict(ckpt: Path) -> Dict[str, torch.Tensor]:
    """The LightningModule's full state dict (keys `model.*`, fp32 where training kept fp32 masters)."""
    ckpt = Path(ckpt)
    verify_checkpoint_safe(ckpt)  # DeepSpeed and torch's reader unpickle fully: check every file first
    kind = checkpoint_kind(ckpt)
    if kind == "deepspeed":
        return _deepspeed_state_dict(ckpt)
    if kind == "distributed":
        return _distributed_state_dict(ckpt)
    state = load_checkpoint_file(ckpt)
    return state["state_dict"]


def model_state_dict(module_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys under `model.` with the prefix stripped; the module's other entries (e.g. a compiled alias
    `_forward.*` of the same weights) are dropped."""
    out = {k[len(MODULE_PREFIX):]: v for k, v in module_state.items() if k.startswith(MODULE_PREFIX)}
    if not out:
        sample = ", ".join(list(module_state)[:3])
        raise RuntimeError(f"No '{MODULE_PREFIX}*' weights in the checkpoint (keys look like: {sample}).")
    return out


def export(run_dir: Path, out_dir: Optional[Path] = None, checkpoint: Optional[Path] = None) -> Path:
    """Write run_dir/export (or out_dir) from `checkpoint` (default: the newest one); returns the path."""
    from .build import build_datamodule, build_module
    from .recipe import get_recipe
    from .runs import load_run

    run_dir = Path(run_dir)
    cfg = load_run(run_dir)
    recipe = cfg.run.name
    if checkpoint is None:
        found = newest_checkpoint(run_dir)
        if found is None:
            from .errors import ConfigError

            raise ConfigError(f"No readable checkpoint in {run_dir} (checkpoints/*.ckpt, hpc_ckpt_*.ckpt).")
        checkpoint = found[0]
    dm = build_datamodule(cfg)  # the run's tokenizer (cached) and vocabulary size
    model = build_module(cfg, dm, get_recipe(recipe)).model
    weights = model_state_dict(consolidated_state_dict(checkpoint))
    # tied weights (embeddings / head) may be stored once; loading the one sets the other
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not is_tied(model, k)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"Checkpoint {checkpoint} does not match the {type(model).__name__} of recipe "
                           f"'{recipe}': missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}.")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    save_export(model, out_dir, dm.tokenizer)
    return out_dir


def is_tied(model: torch.nn.Module, key: str) -> bool:
    """True when `key` names a tensor that shares storage with another parameter (tied head/embeddings),
    so loading that other one already set it."""
    params = dict(model.named_parameters(remove_duplicate=False))
    t = params.get(key)
    if t is None:
        return False
    return any(other is t for name, other in params.items() if name != key)


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import ConfigError

    p = argparse.ArgumentParser(prog="python -m recipes export", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint file or directory (default: newest)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: <run_dir>/export)")
    args = p.parse_args(argv)
    try:
        out = export(args.run_dir, args.out, args.checkpoint)
    except (ConfigError, RuntimeError, ValueError) as e:  # ConfigError includes UnsafeCheckpointError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
