import torch
import pytest
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from models.twin import (LowRank, TaskRouter, TwinMergedModel, attach_lowrank_experts, compress_exclusive,
                         exclusive_task_vectors, load_experts, lora_delta_state_dict, merge_explicit,
                         save_experts, set_routing_weights, storage_bytes)

D = torch.float64


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(D).eval()


def perturbed_states(base_sd, n, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in base_sd.items()}
            for _ in range(n)]


def test_svd_rank_and_eckart_young():
    g = torch.Generator().manual_seed(0)
    tau = {"w": torch.randn(12, 8, generator=g, dtype=D), "b": torch.randn(12, generator=g, dtype=D)}
    ex = compress_exclusive(tau, rank=0.5)  # fraction of min(12, 8) = 4
    assert isinstance(ex["w"], LowRank) and ex["w"].rank == 4
    assert torch.equal(ex["b"], tau["b"])
    s = torch.linalg.svdvals(tau["w"])
    err = torch.linalg.matrix_norm(tau["w"] - ex["w"].dense())
    assert abs(err.item() - s[4:].norm().item()) < 1e-10
    assert compress_exclusive(tau, rank=3)["w"].rank == 3
    with pytest.raises(ValueError):
        compress_exclusive(tau, rank=0)


def test_save_load_and_storage(tmp_path):
    g = torch.Generator().manual_seed(0)
    ex = [compress_exclusive({"w": torch.randn(40, 30, generator=g), "b": torch.randn(40, generator=g)}, rank=2)
          for _ in range(3)]
    save_experts(str(tmp_path / "e.safetensors"), ex)
    back = load_experts(str(tmp_path / "e.safetensors"))
    assert len(back) == 3
    for a, b in zip(ex, back):
        assert torch.equal(a["w"].us, b["w"].us) and torch.equal(a["w"].v, b["w"].v)
        assert torch.equal(a["b"], b["b"])
    st = storage_bytes(ex)
    # per expert: factors (40+30)*2 floats + 40 bias vs dense 40*30 + 40; float32 = 4 bytes
    assert st == {"factored_bytes": 3 * 4 * (140 + 40), "dense_bytes": 3 * 4 * (1200 + 40)}


def _setup(rank=4):
    model = tiny_llama()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = perturbed_states(base_sd, 3)
    shared = {k: base_sd[k] + 0.3 * sum(t[k] - base_sd[k] for t in tuned) for k in base_sd}
    experts = [compress_exclusive(exclusive_task_vectors(shared, t), rank=rank) for t in tuned]
    return model, shared, experts


def test_one_hot_routing_is_shared_plus_that_expert():
    _, shared, experts = _setup()
    merged = merge_explicit(shared, experts, [0.0, 1.0, 0.0])
    for k, v in experts[1].items():
        dense = v.dense() if isinstance(v, LowRank) else v
        assert torch.allclose(merged[k], shared[k] + dense, atol=1e-12)


def test_lowrank_forward_equals_explicit_merge_per_sample():
    model, shared, experts = _setup()
    attach_lowrank_experts(model, shared, experts)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(2))
    w = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.1, 0.9]], dtype=D)
    set_routing_weights(model, w)
    with torch.no_grad():
        batched = model(input_ids=ids).logits
    for b in range(3):
        ref = tiny_llama()
        ref.load_state_dict(merge_explicit(shared, experts, w[b]))
        with torch.no_grad():
            single = ref(input_ids=ids[b:b + 1]).logits
        assert torch.allclose(batched[b:b + 1], single, atol=1e-10, rtol=0)


def test_twin_model_routes_and_runs():
    model, shared, experts = _setup()
    attach_lowrank_experts(model, shared, experts)
    router = TaskRouter(32, 3).to(D)
    twin = TwinMergedModel(model, router)
    ids = torch.randint(0, 50, (2, 5))
    w = twin.route(ids)
    assert w.shape == (2, 3) and torch.allclose(w.sum(-1), torch.ones(2, dtype=D))
    assert twin(ids).logits.shape == (2, 5, 50)


def test_router_separates_synthetic_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3
    labels = torch.randint(0, 3, (600,), generator=g)
    x = centers[labels] + torch.randn(600, 16, generator=g)
    torch.manual_seed(0)
    router = TaskRouter(16, 3)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(router(x[:400]), labels[:400]).backward()
        opt.step()
    acc = (router(x[400:]).argmax(-1) == labels[400:]).float().mean().item()
    assert acc > 0.95


def test_lora_adapter_delta_compresses():
    from peft import LoraConfig, get_peft_model
    model = tiny_llama()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    deltas = lora_delta_state_dict(peft_model)
    assert len(deltas) == 4 and all(k.endswith("proj.weight") for k in deltas)
    ex = compress_exclusive(deltas, rank=4)
    for k, d in deltas.items():
        assert torch.allclose(ex[k].dense(), d, atol=1e-10)  # rank-4 delta is recovered exactly
    # merged peft model equals base + delta
    base_sd = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    merged = peft_model.merge_and_unload().state_dict()
    for k, d in deltas.items():
        assert torch.allclose(merged[k], base_sd[k] + d, atol=1e-10)
