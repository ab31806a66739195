import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from models.twin import (
    LowRank,
    TaskRouter,
    TwinMergedModel,
    attach_lowrank_experts,
    compress_exclusive,
    exclusive_task_vectors,
    load_experts,
    lora_delta_state_dict,
    merge_explicit,
    save_experts,
    set_routing_weights,
    storage_bytes,
)

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


@pytest.mark.parametrize("dense_deltas", [False, True])
def test_lowrank_forward_equals_explicit_merge_per_sample(dense_deltas, monkeypatch):
    import models.twin as twin_module
    monkeypatch.setattr(twin_module, "DENSE_COST_FACTOR", 0.0)  # the per-sample merged weights at any length
    model, shared, experts = _setup()
    attach_lowrank_experts(model, shared, experts, dense_deltas=dense_deltas)
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
    # a task routed 0 for the whole batch is dropped from the computation, exactly
    w0 = torch.tensor([[0.6, 0.0, 0.4], [0.1, 0.0, 0.9], [1.0, 0.0, 0.0]], dtype=D)
    set_routing_weights(model, w0)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, _explicit_logits(shared, experts, w0, ids),
                              atol=1e-10, rtol=0)


def test_shared_input_group_recomputes_for_a_different_input():
    model, shared, experts = _setup()
    attach_lowrank_experts(model, shared, experts)
    attn = model.get_submodule("model.layers.0.self_attn")
    assert attn.q_proj.input_group is attn.k_proj.input_group is attn.v_proj.input_group is not None
    assert attn.o_proj.input_group is None
    w = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=D)
    set_routing_weights(model, w)
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(2, 4, 32, generator=g, dtype=D), torch.randn(2, 4, 32, generator=g, dtype=D)
    merged = [merge_explicit(shared, experts, w[b]) for b in range(2)]
    with torch.no_grad():
        for name, x in (("q_proj", x1), ("k_proj", x2), ("v_proj", x2), ("q_proj", x1)):
            got = getattr(attn, name)(x)
            for b in range(2):
                ref = x[b] @ merged[b][f"model.layers.0.self_attn.{name}.weight"].T
                assert torch.allclose(got[b], ref, atol=1e-12)


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


def _saved_finetunes(tmp_path, mode):
    """A tiny float32 llama saved as the base, and two fine-tunes of it saved the way the recipe's fine-tune
    stage exports them: full models (save_pretrained) or peft LoRA adapters (adapter safetensors)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    dirs = []
    for t in range(2):
        torch.manual_seed(10 + t)
        if mode == "full":
            m = LlamaForCausalLM(cfg)
            m.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()})
        else:
            m = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
            m.base_model.model.load_state_dict(base.state_dict(), strict=False)
        m.save_pretrained(tmp_path / f"ft{t}")
        dirs.append(tmp_path / f"ft{t}")
    return tmp_path / "base", dirs, {k: v.clone() for k, v in base.state_dict().items()}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_recipe_builds_experts_from_full_and_lora_finetunes(tmp_path, mode):
    import json

    from safetensors.torch import load_file

    from recipes.twin_merging.experts import build_experts, finetuned_state
    base_dir, ft_dirs, base_sd = _saved_finetunes(tmp_path, mode)
    loaded = [finetuned_state(mode, base_dir, d) for d in ft_dirs]
    tuned, keys = [sd for sd, _ in loaded], loaded[0][1]
    if mode == "lora":  # only the adapted matrices change, by scaling * B @ A
        assert keys == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv")
        assert all(torch.equal(tuned[0][k], base_sd[k]) for k in base_sd if k not in keys)
    else:
        assert keys is None
    build_experts(tmp_path / "experts", base_sd, tuned, keys, lam=0.3, rank=4 if mode == "lora" else 0.25,
                  meta={"finetune": mode})
    shared = load_file(str(tmp_path / "experts/shared.safetensors"))
    experts = load_experts(str(tmp_path / "experts/experts.safetensors"))
    meta = json.loads((tmp_path / "experts/experts.json").read_text())
    assert meta["finetune"] == mode and meta["num_experts"] == 2
    assert meta["factored_bytes"] < meta["dense_bytes"]
    for k in base_sd:  # shared = base + 0.3 * sum of deltas
        assert torch.allclose(shared[k], base_sd[k] + 0.3 * sum(t[k] - base_sd[k] for t in tuned), atol=1e-6)
    for t, expert in enumerate(experts):
        assert set(expert) == (set(keys) if keys else set(base_sd))
        for k, v in expert.items():
            tau = tuned[t][k] - shared[k]
            if mode == "lora":  # rank(delta_t - 0.3 (delta_0 + delta_1)) <= 4: the factors are exact
                assert v.rank == 4 and torch.allclose(shared[k] + v.dense(), tuned[t][k], atol=1e-5)
            elif tau.dim() == 2:  # Eckart-Young: the error is the energy of the dropped singular values
                s = torch.linalg.svdvals(tau)
                err = torch.linalg.matrix_norm(tau - v.dense())
                assert v.rank == round(0.25 * min(tau.shape))
                assert abs(err.item() - s[v.rank:].norm().item()) < 1e-4 * max(1.0, s.norm().item())
            else:
                assert torch.allclose(v, tau)


def _explicit_logits(shared, experts, w, ids):
    out = []
    for b in range(ids.shape[0]):
        ref = tiny_llama()
        ref.load_state_dict(merge_explicit(shared, experts, w[b]))
        with torch.no_grad():
            out.append(ref(input_ids=ids[b:b + 1]).logits)
    return torch.cat(out)


def test_inactive_tasks_are_skipped_exactly_and_skip_below_zeroes_small_weights():
    model, shared, experts = _setup()
    attach_lowrank_experts(model, shared, experts)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    # task 1 routed exactly 0 for the whole batch: its paths are dropped, the result stays exact
    w = torch.tensor([[0.7, 0.0, 0.3], [0.4, 0.0, 0.6]], dtype=D)
    set_routing_weights(model, w)
    assert model._twin_routing.active().tolist() == [True, False, True]
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.allclose(got, _explicit_logits(shared, experts, w, ids), atol=1e-10, rtol=0)
    # skip_below: a task whose weight is <= 0.05 for every sample counts as 0 (the approximation it buys)
    w2 = torch.tensor([[0.70, 0.05, 0.25], [0.50, 0.02, 0.48]], dtype=D)
    set_routing_weights(model, w2, skip_below=0.05)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    w2_zeroed = w2.clone()
    w2_zeroed[:, 1] = 0.0
    assert torch.allclose(got, _explicit_logits(shared, experts, w2_zeroed, ids), atol=1e-10, rtol=0)
    assert not torch.allclose(got, _explicit_logits(shared, experts, w2, ids), atol=1e-6)


def test_uniform_routing_uses_a_cached_merged_weight_refreshed_on_change():
    model, shared, experts = _setup()
    attach_lowrank_experts(model, shared, experts)
    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(4))
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    for row in ([0.2, 0.5, 0.3], [0.0, 0.0, 1.0]):
        w = torch.tensor([row] * 3, dtype=D)
        set_routing_weights(model, w)
        assert model._twin_routing.uniform()
        with torch.no_grad():
            got = model(input_ids=ids).logits
        # the cached weight is exactly the explicitly merged one, for the current routing
        merged = merge_explicit(shared, experts, w[0])
        assert torch.allclose(q._merged_memo[1][0], merged["model.layers.0.self_attn.q_proj.weight"], atol=1e-12)
        assert torch.allclose(got, _explicit_logits(shared, experts, w, ids), atol=1e-10, rtol=0)
    set_routing_weights(model, torch.tensor([[0.2, 0.5, 0.3]] * 3, dtype=D), cache_merged=False)
    assert not model._twin_routing.uniform()
    with pytest.raises(ValueError, match="routing weights"):
        set_routing_weights(model, torch.ones(3, 2, dtype=D))


def test_prefix_routing_reads_only_the_prefix_and_generate_matches_the_merged_model():
    from models.twin import router_features
    model, shared, experts = _setup()
    attach_lowrank_experts(model, shared, experts)
    torch.manual_seed(0)
    twin = TwinMergedModel(model, TaskRouter(32, 3).to(D), prefix_len=4)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 50, (2, 9), generator=g)
    other = torch.cat([ids[:, :4], torch.randint(0, 50, (2, 5), generator=g)], dim=1)
    w = twin.route(ids)
    assert torch.allclose(w, twin.route(other), atol=1e-12)  # same prefix, same routing
    # hand check of the feature: the hidden state at position 3 (and at the last real token when padded)
    h = torch.arange(2 * 5 * 3, dtype=D).view(2, 5, 3)
    assert torch.equal(router_features(h, None, 4), h[:, 3])
    assert torch.equal(router_features(h, torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]), 4),
                       torch.stack([h[0, 1], h[1, 3]]))
    # generation with the prompt's routing = greedy generation of the explicitly merged model
    prompt = ids[:1, :6]
    out = twin.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref = tiny_llama()
    ref.load_state_dict(merge_explicit(shared, experts, twin.route(prompt)[0]))
    assert torch.equal(out, ref.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_dense_path_cost_model_and_work_buffer():
    import models.twin as twin_module
    model, shared, experts = _setup()  # rank 4 of 3 experts: R = 12 factor columns per 32 x 32 projection
    attach_lowrank_experts(model, shared, experts, dense_deltas=True)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    set_routing_weights(model, torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], dtype=D))
    # per-sample merged weights pay when S * R * (out + in) > 4 * T * out * in: S * 12 * 64 > 4 * 3 * 1024,
    # i.e. from S = 17 tokens per sample; decoding one token at a time keeps the low-rank paths
    assert not q._dense_pays(torch.zeros(2, 16, 32, dtype=D)) and q._dense_pays(torch.zeros(2, 17, 32, dtype=D))
    assert twin_module.DENSE_COST_FACTOR == 4.0
    # a task routed 0 everywhere leaves both sides: T = 2, R = 8 -> S * 8 * 64 > 4 * 2 * 1024, again S >= 17
    set_routing_weights(model, torch.tensor([[0.2, 0.0, 0.8], [0.6, 0.0, 0.4]], dtype=D))
    assert not q._dense_pays(torch.zeros(2, 16, 32, dtype=D)) and q._dense_pays(torch.zeros(2, 17, 32, dtype=D))
    up = model.get_submodule("model.layers.0.mlp.up_proj")  # 48 x 32: S * 8 * 80 > 4 * 2 * 1536 from S = 20
    assert not up._dense_pays(torch.zeros(2, 19, 32, dtype=D)) and up._dense_pays(torch.zeros(2, 20, 32, dtype=D))
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(7))
    w = torch.tensor([[0.2, 0.0, 0.8], [0.6, 0.0, 0.4]], dtype=D)
    with torch.no_grad():
        got = model(input_ids=ids).logits  # long enough: the dense path, through the shared work buffer
    assert model._twin_routing._scratch is not None
    assert torch.allclose(got, _explicit_logits(shared, experts, w, ids), atol=1e-10, rtol=0)
    # with autograd recording no buffer is reused (backward may need every per-sample weight)
    with torch.enable_grad():
        assert model._twin_routing.scratch(10, got) is None


def test_each_exclusive_task_vector_streams_the_same_values_and_experts():
    # the build's task vectors, tensor by tensor into one reused buffer per dtype, equal exclusive_task_vectors
    # bit for bit, and compressing them as they stream gives the experts of the whole-dict path
    from models.twin import each_exclusive_task_vector

    g = torch.Generator().manual_seed(4)
    shared = {"w1": torch.randn(12, 8, generator=g), "b": torch.randn(12, generator=g),
              "w2": torch.randn(6, 20, generator=g), "h": torch.randn(5, 3, generator=g).double()}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in shared.items()}
    whole = exclusive_task_vectors(shared, tuned)
    seen = []
    for name, tau in each_exclusive_task_vector(shared, tuned):
        assert torch.equal(tau, whole[name]) and tau.dtype == whole[name].dtype
        seen.append((name, tau.data_ptr()))
    assert [n for n, _ in seen] == list(whole)
    assert seen[0][1] == seen[2][1]  # w1 and w2 (float32) share the buffer
    streamed = compress_exclusive(each_exclusive_task_vector(shared, tuned), rank=2)
    ref = compress_exclusive(whole, rank=2)
    for k in ref:
        a, b = streamed[k], ref[k]
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert torch.equal(a.us, b.us) and torch.equal(a.v, b.v)
    assert torch.equal(streamed["b"], whole["b"])  # a 1-D delta kept as a copy, not the overwritten buffer
