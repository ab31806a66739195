"""Export folders that transformers loads anywhere, and reading them back in this repository.

- `save_export(model, out_dir, tokenizer)` (writer.py): plain transformers models as `save_pretrained`; AdaMoE,
  TokenFormer and OpenMoE models with a model_type of their own, `auto_map` and their code (the wrappers
  configuration_*.py / modeling_*.py of this package plus the model sources they import, bundle.py), so
  `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` gives the trained model in a process
  that has never seen this repository, and the same call without trust_remote_code fails instead of building
  another model. A peft model also leaves its adapter in `<folder>/adapter`.
- `load_export(path)` and the model types registered with models.factory on import (loading.py): the same
  folders read with this repository's own classes, no remote code.

Plain PyTorch + transformers: no Lightning, no imports from `recipes/`.
"""
from __future__ import annotations

from models.hub_export.adamoe_base import (
    base_config_of_adamoe_export,
    is_adamoe_export,
    load_adamoe_base,
    read_config,
)
from models.hub_export.export_names import (
    ADAMOE_MODEL_TYPES,
    ADAPTER_DIR,
    OPENMOE_MODEL_TYPE,
    TOKENFORMER_MODEL_TYPE,
)
from models.hub_export.loading import load_export, load_openmoe_export, load_tokenformer_export, register_loaders
from models.hub_export.writer import ExportKind, export_kind, register_export_kind, save_export

register_loaders()

__all__ = [
    "ADAMOE_MODEL_TYPES", "ADAPTER_DIR", "OPENMOE_MODEL_TYPE", "TOKENFORMER_MODEL_TYPE",
    "base_config_of_adamoe_export", "is_adamoe_export", "load_adamoe_base", "load_export", "load_openmoe_export",
    "load_tokenformer_export", "read_config", "register_loaders",
    "ExportKind", "export_kind", "register_export_kind", "save_export",
]
