"""Safetensors weights of an export: written from a state dict (tied tensors once, sharded like transformers
when large) and read back whole.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_SIZE = "5GB"


def _storage_key(tensor: torch.Tensor) -> Tuple[int, int, Tuple[int, ...], Tuple[int, ...], torch.dtype]:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype)


def untied(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(`state` with every tensor that is the same view of the same storage as an earlier one left out,
    {left-out name: the kept name}). Tied weights (a head sharing the embedding) are stored once, as
    transformers does; the model ties them again when it is built."""
    kept: Dict[str, torch.Tensor] = {}
    first: Dict[tuple, str] = {}
    dropped: Dict[str, str] = {}
    for name, tensor in state.items():
        key = _storage_key(tensor)
        if key in first:
            dropped[name] = first[key]
            continue
        first[key] = name
        kept[name] = tensor
    return kept, dropped


def save_weights(state: Dict[str, torch.Tensor], out_dir: Path, max_shard_size: str = MAX_SHARD_SIZE) -> List[str]:
    """Write `state` (tied tensors once) as model.safetensors, or as shards plus model.safetensors.index.json
    when it is larger than `max_shard_size`; returns the file names written."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state, _ = untied({name: tensor.detach() for name, tensor in state.items()})
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    written = []
    for file_name, names in split.filename_to_tensors.items():
        save_file({name: state[name].contiguous().cpu() for name in names}, str(out_dir / file_name),
                  metadata={"format": "pt"})
        written.append(file_name)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        (out_dir / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(WEIGHTS_INDEX_NAME)
    return written


def load_weights(path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of the safetensors weights in export folder `path` (one file or shards with an index)."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / WEIGHTS_INDEX_NAME).is_file():
        files = sorted(set(json.loads((path / WEIGHTS_INDEX_NAME).read_text())["weight_map"].values()))
    elif (path / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise ValueError(f"{path} has no safetensors weights ({WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME})")
    state: Dict[str, torch.Tensor] = {}
    for file_name in files:
        state.update(load_file(str(path / file_name)))
    return state
