"""Twin-Merging benchmarks on the `tiny` llama shape (random weights; speed and storage do not depend on
training): dynamic low-rank merging vs one statically merged model, factor storage vs dense task vectors,
time to build the experts.

Throughput is measured single-threaded (the benchmark machines are shared and a second thread mostly adds
noise), static and dynamic interleaved over several rounds, median ratio. Routing scenarios of the dynamic
model (batch 8 x 128 tokens, T=3, rank 10%):
  mixed    every sample its own random softmax routing; exact (all 3 tasks' low-rank paths run)
  sharp    all samples from one task, router-like weights (about 0.987 / 0.007 / 0.007, differing per sample)
           with skip_below=0.05: the two near-zero tasks are dropped for the batch (approximation)
  uniform  all samples share one routing: merged weights built once per routing and cached (exact)
  mixed_dense  as `mixed`, with attach_lowrank_experts(dense_deltas=True): per-sample merged weights from
           dense deltas kept in memory (T x the linear weights), one batched matmul per layer (exact)
"""
from __future__ import annotations

import statistics
import time

import torch

from bench import register


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.factory import HF_SIZES

    cfg = LlamaConfig(vocab_size=4096, max_position_embeddings=128, **HF_SIZES["llama"]["tiny"])
    return LlamaForCausalLM(cfg).eval()


@register("twin_merging", "Twin-Merging on the tiny llama, T=3 experts at rank 10%: inference throughput of "
          "dynamic per-sample merging vs a statically merged model (goal >= 0.8x; single thread, median of "
          "interleaved rounds; scenarios mixed / sharp+skip / uniform / mixed_dense, see "
          "recipes/twin_merging/bench.py), "
          "expert storage (factors) vs dense task vectors, seconds to build shared + SVD experts.")
def twin_merging() -> dict:
    from models.merging import merge_state_dicts
    from models.twin import (
        attach_lowrank_experts,
        compress_exclusive,
        exclusive_task_vectors,
        set_routing_weights,
        storage_bytes,
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        num_tasks, batch, seq, reps, rounds = 3, 8, 128, 3, 5
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
        dynamic_dense = attach_lowrank_experts(_tiny_llama(), shared, experts, dense_deltas=True)
        ids = torch.randint(0, 4096, (batch, seq))
        mixed = torch.softmax(torch.randn(batch, num_tasks), dim=-1)
        sharp = torch.softmax(torch.tensor([5.0, 0.0, 0.0]) + 0.2 * torch.randn(batch, num_tasks), dim=-1)
        uniform = mixed[:1].expand(batch, num_tasks).clone()
        scenarios = {"mixed": (dynamic, mixed, 0.0), "sharp": (dynamic, sharp, 0.05),
                     "uniform": (dynamic, uniform, 0.0), "mixed_dense": (dynamic_dense, mixed, 0.0)}

        def tps(model) -> float:
            with torch.no_grad():
                model(input_ids=ids)  # warm-up (and, for `uniform`, the one-off merge)
                t = time.perf_counter()
                for _ in range(reps):
                    model(input_ids=ids)
            return reps * batch * seq / (time.perf_counter() - t)

        ratios = {k: [] for k in scenarios}
        static_tps, dyn_tps = [], {k: [] for k in scenarios}
        for _ in range(rounds):  # interleaved so background load hits every side alike
            for name, (model, w, skip) in scenarios.items():
                set_routing_weights(model, w, skip_below=skip)
                s, d = tps(static), tps(model)
                static_tps.append(s)
                dyn_tps[name].append(d)
                ratios[name].append(d / s)
    finally:
        torch.set_num_threads(threads)
    med = statistics.median
    out = {"static_tokens_per_sec": round(med(static_tps), 1)}
    for name in scenarios:
        out[f"{name}_tokens_per_sec"] = round(med(dyn_tps[name]), 1)
        out[f"{name}_throughput_ratio"] = round(med(ratios[name]), 3)
    out["throughput_ratio"] = out["mixed_throughput_ratio"]  # the exact, worst case
    out.update({"expert_storage_mb": round(st["factored_bytes"] / 2**20, 3),
                "dense_task_vectors_mb": round(st["dense_bytes"] / 2**20, 3),
                "storage_ratio": round(st["factored_bytes"] / st["dense_bytes"], 4),
                "build_experts_s": round(build_s, 3)})
    return out
