"""Configuration of OpenMoE exports (copied into every OpenMoE export folder by models/hub_export).

The model is `models.openmoe.OpenMoEForCausalLM` (bundled next to this file); its own configuration,
`OpenMoEConfig`, is stored whole under the `openmoe` key, so the export builds exactly the trained architecture
whatever fields that dataclass has. A few standard fields mirror it for tools that read them.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from transformers import PretrainedConfig

from models.hub_export.export_names import OPENMOE_MODEL_TYPE

# Standard transformers fields copied from OpenMoEConfig (same names there).
MIRRORED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


class OpenMoEHFConfig(PretrainedConfig):
    """`openmoe`: the fields of models.openmoe.OpenMoEConfig (its `to_dict()`)."""

    model_type = OPENMOE_MODEL_TYPE

    def __init__(self, openmoe: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        self.openmoe = dict(openmoe or {})
        for name in MIRRORED_FIELDS:
            if name in self.openmoe:
                kwargs[name] = self.openmoe[name]
        super().__init__(**kwargs)
