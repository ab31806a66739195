"""Configuration of TokenFormer exports (copied into every TokenFormer export folder by models/hub_export).

The model is `models.tokenformer.TokenFormerForCausalLM` (bundled next to this file); its own configuration,
`TokenFormerConfig`, is stored whole under the `tokenformer` key, so the export builds exactly the trained
architecture whatever fields that dataclass has. A few standard fields mirror it for tools that read them.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from transformers import PretrainedConfig

from models.hub_export.export_names import TOKENFORMER_MODEL_TYPE

# transformers field -> TokenFormerConfig field, copied for tools that look for the standard names.
MIRRORED_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
                   "num_attention_heads": "num_heads", "max_position_embeddings": "max_seq_len"}


class TokenFormerHFConfig(PretrainedConfig):
    """`tokenformer`: the fields of models.tokenformer.TokenFormerConfig (its `to_dict()`)."""

    model_type = TOKENFORMER_MODEL_TYPE

    def __init__(self, tokenformer: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        self.tokenformer = dict(tokenformer or {})
        for name, native in MIRRORED_FIELDS.items():
            if native in self.tokenformer:
                kwargs[name] = self.tokenformer[native]
        # The head is tied (or not) inside the TokenFormer module itself: nothing for transformers to tie.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
