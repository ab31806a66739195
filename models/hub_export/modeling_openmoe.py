"""OpenMoE causal LM for transformers (copied into every OpenMoE export folder by models/hub_export).

`OpenMoEHFForCausalLM` holds the repository's own `OpenMoEForCausalLM` (bundled next to this file: a
transformers Llama whose every `moe_every`-th MLP is an OpenMoE block with capacity) as `self.model` and calls
it: the forward pass is that module's, not a re-implementation. Weights are the trained model's state dict under
the `model.` prefix. The capacity factor follows the mode as in training: `model.eval()` (what from_pretrained
returns) uses the evaluation factor, `model.train()` the training one.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import PreTrainedModel

from models.hub_export.configuration_openmoe import OpenMoEHFConfig
from models.openmoe import OpenMoEConfig, OpenMoEForCausalLM


class OpenMoEHFForCausalLM(PreTrainedModel):
    config_class = OpenMoEHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["LlamaDecoderLayer"]
    # The inner Llama ties its head to its embedding (config.tie_word_embeddings, mirrored from OpenMoEConfig);
    # transformers only collects the ties of direct children, so the wrapper declares this one.
    _tied_weights_keys = {"model.lm.lm_head.weight": "model.lm.model.embed_tokens.weight"}

    def __init__(self, config: OpenMoEHFConfig) -> None:
        super().__init__(config)
        self.model = OpenMoEForCausalLM(OpenMoEConfig.from_dict(config.openmoe))
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any):
        """The inner transformers Llama's forward (labels, past_key_values, ... as there)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
