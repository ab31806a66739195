"""Twin-Merging benchmarks on the `tiny` llama shape (random weights; speed and storage do not depend on
training): dynamic low-rank merging vs one statically merged model, factor storage vs dense task vectors,
time to build the experts."""
from __future__ import annotations

import time

import torch

from . import register


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    from models.factory import HF_SIZES
    cfg = LlamaConfig(vocab_size=4096, max_position_embeddings=128, **HF_SIZES["llama"]["tiny"])
    return LlamaForCausalLM(cfg).eval()


@register("twin_merging", "Twin-Merging on the tiny llama, T=3 experts at rank 10%: inference throughput of "
          "dynamic per-sample merging vs a statically merged model (goal >= 0.8x), expert storage (factors) vs "
          "dense task vectors, seconds to build shared + SVD experts.")
def twin_merging() -> dict:
    from models.merging import merge_state_dicts
    from models.twin import (attach_lowrank_experts, compress_exclusive, exclusive_task_vectors,
                             set_routing_weights, storage_bytes)
    torch.manual_seed(0)
    num_tasks, batch, seq, reps = 3, 8, 128, 5
    static = _tiny_llama()
    base = {k: v.clone() for k, v in static.state_dict().items()}
    tuned = [{k: v + 0.01 * torch.randn_like(v) for k, v in base.items()} for _ in range(num_tasks)]

    t0 = time.perf_counter()
    shared = merge_state_dicts("task_arithmetic", base, tuned, lam=0.3)
    experts = [compress_exclusive(exclusive_task_vectors(shared, t), rank=0.1) for t in tuned]
    build_s = time.perf_counter() - t0
    st = storage_bytes(experts)

    static.load_state_dict(shared)
    dynamic = attach_lowrank_experts(_tiny_llama(), shared, experts)
    set_routing_weights(dynamic, torch.softmax(torch.randn(batch, num_tasks), dim=-1))
    ids = torch.randint(0, 4096, (batch, seq))

    def tps(model) -> float:
        with torch.no_grad():
            model(input_ids=ids)  # warm-up
            t = time.perf_counter()
            for _ in range(reps):
                model(input_ids=ids)
        return reps * batch * seq / (time.perf_counter() - t)

    # interleave so background load on shared cores hits both sides alike
    s1, d1, s2, d2 = tps(static), tps(dynamic), tps(static), tps(dynamic)
    static_tps, dynamic_tps = (s1 + s2) / 2, (d1 + d2) / 2
    return {"static_tokens_per_sec": round(static_tps, 1), "dynamic_tokens_per_sec": round(dynamic_tps, 1),
            "throughput_ratio": round(dynamic_tps / static_tps, 3),
            "expert_storage_mb": round(st["factored_bytes"] / 2**20, 3),
            "dense_task_vectors_mb": round(st["dense_bytes"] / 2**20, 3),
            "storage_ratio": round(st["factored_bytes"] / st["dense_bytes"], 4),
            "build_experts_s": round(build_s, 3)}
