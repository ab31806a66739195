"""TokenFormer causal LM for transformers (copied into every TokenFormer export folder by models/hub_export).

`TokenFormerHFForCausalLM` holds the repository's own `TokenFormerForCausalLM` (bundled next to this file) as
`self.model` and calls it: the forward pass is that module's, not a re-implementation. Weights are the trained
model's state dict under the `model.` prefix.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from models.hub_export.configuration_tokenformer import TokenFormerHFConfig
from models.tokenformer import TokenFormerConfig, TokenFormerForCausalLM


class TokenFormerHFForCausalLM(PreTrainedModel):
    config_class = TokenFormerHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TokenFormerBlock"]

    def __init__(self, config: TokenFormerHFConfig) -> None:
        super().__init__(config)
        self.model = TokenFormerForCausalLM(TokenFormerConfig.from_dict(config.tokenformer))
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, return_dict: Optional[bool] = None, **kwargs: Any):
        """input_ids (batch, seq); attention_mask (batch, seq), 1 = token, 0 = padding; labels: the loss as
        TokenFormerForCausalLM computes it (shifted inside, -100 ignored). No KV cache, no hidden states or
        attentions: asking for them (use_cache=True, output_attentions=True, ...) is an error."""
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
        if unsupported:
            raise TypeError(f"TokenFormerHFForCausalLM.forward does not support {unsupported}")
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        result = CausalLMOutput(loss=out.loss, logits=out.logits)
        return result.to_tuple() if return_dict is False else result
