"""The names an export folder uses: model types, the adapter subfolder, the wrappers' weight prefix.

Imported by the wrapper configurations (and so copied into the exports that use them) and by the code of this
repository that writes and reads exports.
"""
from __future__ import annotations

# model_type of a retrofitted AdaMoE export, by the model_type of its transformers base model.
ADAMOE_MODEL_TYPES = {"mixtral": "adamoe_mixtral", "qwen2_moe": "adamoe_qwen2_moe", "olmoe": "adamoe_olmoe"}
TOKENFORMER_MODEL_TYPE = "tokenformer_causal_lm"
OPENMOE_MODEL_TYPE = "openmoe_llama"
# The wrappers hold the repository's model as `self.model`: its state-dict keys get this prefix.
WRAPPED_PREFIX = "model."
# A LoRA run's export: the merged model at the top, the peft adapter (adapter_config.json +
# adapter_model.safetensors) in this subfolder.
ADAPTER_DIR = "adapter"
