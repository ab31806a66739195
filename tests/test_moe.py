"""AdaMoE null-expert MoE (models/moe/): routing, dispatch, capacity, losses, metrics, HF retrofit."""
import math

import pytest
import torch
import torch.nn.functional as F

import models.moe.experts as moe_experts
from models.moe import (
    MoEConfig,
    NullExpertRouter,
    SparseMoEBlock,
    collect_moe_aux_losses,
    expert_capacity,
    load_balancing_loss,
    load_retrofitted,
    moe_routing_metrics,
    resolve_expert_impl,
    retrofit,
    router_z_loss,
    trainable_module_names,
)

# ------------------------------------------------------------------------------------------------
# helpers written independently of the module under test


def swiglu_reference(x, gate_up, down):
    """One SwiGLU expert on a single token vector, written out longhand."""
    inter = down.shape[1]
    gate_rows, up_rows = gate_up[:inter], gate_up[inter:]
    hidden = F.silu(gate_rows @ x) * (up_rows @ x)
    return down @ hidden


def naive_moe_output(block, tokens, topk_indices, topk_weights):
    """Per-token, per-slot Python loop: sum of weight * expert(token) over the true-expert slots."""
    out = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for j in range(topk_indices.shape[1]):
            e = int(topk_indices[t, j])
            if e < block.num_true_experts:
                out[t] += topk_weights[t, j] * swiglu_reference(
                    tokens[t], block.experts.gate_up_proj[e], block.experts.down_proj[e])
    return out


def identity_router_block(num_true, num_null, top_k, capacity_factor=None, norm_topk_prob=True, seed=0):
    """A float64 block whose router logits equal the input's first E_total coordinates (hidden = E_total),
    so each test chooses the routing by choosing the input."""
    torch.manual_seed(seed)
    total = num_true + num_null
    cfg = MoEConfig(hidden_size=total, intermediate_size=3, num_experts=num_true, num_null_experts=num_null,
                    top_k=top_k, capacity_factor=capacity_factor, norm_topk_prob=norm_topk_prob)
    block = SparseMoEBlock(cfg).double()
    with torch.no_grad():
        block.gate.weight.copy_(torch.eye(total, dtype=torch.float64)[:num_true])
        if num_null:
            block.gate.null_gate.weight.copy_(torch.eye(total, dtype=torch.float64)[num_true:])
        block.experts.gate_up_proj.normal_(0, 0.5)
        block.experts.down_proj.normal_(0, 0.5)
    return block


# ------------------------------------------------------------------------------------------------
# routing


# logits over [true0, true1, null2, null3]
ROUTING_X = torch.tensor([
    [2.0, 1.0, 0.0, 3.0],   # A: top-2 = null3, true0      -> 1 true expert, weight 1 after renorm
    [1.0, 2.0, 0.0, 0.5],   # B: top-2 = true1, true0      -> 2 true experts
    [0.0, 0.0, 5.0, 4.0],   # C: top-2 = null2, null3      -> all null, output 0
], dtype=torch.float64)


def test_router_selection_and_renormalisation_hand_computed():
    block = identity_router_block(2, 2, 2)
    logits, weights, indices = (t.detach() for t in block.gate(ROUTING_X))
    assert torch.equal(logits, ROUTING_X)
    assert [set(row.tolist()) for row in indices] == [{3, 0}, {1, 0}, {2, 3}]
    by_expert = [{int(e): float(w) for e, w in zip(i, w)} for i, w in zip(indices, weights)]
    e = math.e
    assert by_expert[0] == pytest.approx({3: 0.0, 0: 1.0})
    assert by_expert[1] == pytest.approx({1: e**2 / (e + e**2), 0: e / (e + e**2)})
    assert by_expert[2] == pytest.approx({2: 0.0, 3: 0.0})


def test_router_without_renormalisation_keeps_softmax_over_all_experts():
    block = identity_router_block(2, 2, 2, norm_topk_prob=False)
    _, weights, indices = (t.detach() for t in block.gate(ROUTING_X[1:2]))
    z = math.e + math.e**2 + 1.0 + math.exp(0.5)
    got = {int(e): float(w) for e, w in zip(indices[0], weights[0])}
    assert got == pytest.approx({1: math.e**2 / z, 0: math.e / z})


def test_block_output_hand_example_all_null_token_is_zero():
    block = identity_router_block(2, 2, 2)
    out = block(ROUTING_X)
    assert torch.equal(out[2], torch.zeros(4, dtype=torch.float64))
    expected_a = swiglu_reference(ROUTING_X[0], block.experts.gate_up_proj[0], block.experts.down_proj[0])
    torch.testing.assert_close(out[0], expected_a, rtol=0, atol=1e-12)
    e = math.e
    expected_b = sum(w * swiglu_reference(ROUTING_X[1], block.experts.gate_up_proj[i], block.experts.down_proj[i])
                     for i, w in [(1, e**2 / (e + e**2)), (0, e / (e + e**2))])
    torch.testing.assert_close(out[1], expected_b, rtol=0, atol=1e-12)
    rec = block.last_routing
    assert rec["router_logits"].shape == (3, 4) and rec["topk_indices"].shape == (3, 2)
    assert rec["num_true_experts"] == 2 and rec["num_null_experts"] == 2 and rec["top_k"] == 2
    assert rec["dropped"] is None


def test_null_gate_copy_and_random_init():
    cfg = MoEConfig(hidden_size=5, intermediate_size=4, num_experts=3, num_null_experts=7, top_k=2)
    router = NullExpertRouter(cfg)
    assert torch.equal(router.null_gate.weight, router.weight[[0, 1, 2, 0, 1, 2, 0]])
    torch.manual_seed(1)
    rand = NullExpertRouter(MoEConfig(hidden_size=5, intermediate_size=4, num_experts=3, num_null_experts=7,
                                      null_gate_init="random"))
    assert rand.null_gate.weight.shape == (7, 5)
    assert not torch.equal(rand.null_gate.weight[:3], rand.weight)
    single = NullExpertRouter(MoEConfig(hidden_size=5, intermediate_size=4, num_experts=3, num_null_experts=2,
                                        split_null_gate=False))
    assert single.null_gate is None and single.weight.shape == (5, 5)
    assert torch.equal(single.weight[3:], single.weight[:2])  # copy init inside one router
    assert single(torch.randn(4, 5))[0].shape == (4, 5)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="null_gate_init"):
        MoEConfig(hidden_size=4, intermediate_size=4, num_experts=2, null_gate_init="zeros")
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(hidden_size=4, intermediate_size=4, num_experts=2, num_null_experts=1, top_k=4)
    with pytest.raises(ValueError, match="lb_reduce"):
        MoEConfig(hidden_size=4, intermediate_size=4, num_experts=2, lb_reduce="mean")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(hidden_size=4, intermediate_size=4, num_experts=2, capacity_factor=0.0)


# ------------------------------------------------------------------------------------------------
# dispatch and capacity


def test_sorted_dispatch_equals_naive_token_loop():
    torch.manual_seed(3)
    cfg = MoEConfig(hidden_size=6, intermediate_size=5, num_experts=4, num_null_experts=3, top_k=3,
                    null_gate_init="random", init_std=0.5)
    block = SparseMoEBlock(cfg).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    out = block(x)
    assert out.shape == x.shape
    rec = block.last_routing
    expected = naive_moe_output(block, x.reshape(-1, 6), rec["topk_indices"], rec["topk_weights"])
    torch.testing.assert_close(out.reshape(-1, 6), expected, rtol=0, atol=1e-12)
    # the routing is a mix: some null slots, several true experts used
    assert (rec["topk_indices"] >= 4).any() and (rec["topk_indices"] < 4).any()


def test_capacity_formula():
    assert expert_capacity(1.25, 10, 2, 4) == 7  # ceil(6.25)
    assert expert_capacity(1.0, 5, 1, 2) == 3  # ceil(2.5)
    assert expert_capacity(2.0, 4, 2, 4) == 4


def test_capacity_drops_later_tokens_first_k1():
    # E_true=2, k=1, T=5, cf=1 -> C = ceil(5/2) = 3; tokens 0,1,2,3 pick expert 0, token 4 expert 1.
    block = identity_router_block(2, 0, 1, capacity_factor=1.0)
    x = torch.tensor([[5.0, 0.0]] * 4 + [[0.0, 5.0]], dtype=torch.float64)
    out = block(x)
    rec = block.last_routing
    assert rec["dropped"].squeeze(1).tolist() == [False, False, False, True, False]
    assert rec["topk_weights"].squeeze(1).tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert torch.equal(out[3], torch.zeros(2, dtype=torch.float64))
    expected = naive_moe_output(block, x, rec["topk_indices"], rec["topk_weights"])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_capacity_with_top2_and_null_slots_never_dropped():
    # E_true=2, N=1, k=2, T=4, cf=0.5 -> C = ceil(0.5*4*2/2) = 2 slots per true expert.
    # tokens 0,1,2 pick {true0, true1}; token 3 picks {null2, true0}.
    block = identity_router_block(2, 1, 2, capacity_factor=0.5)
    x = torch.tensor([[3.0, 2.0, 0.0], [2.0, 3.0, 0.0], [3.0, 2.0, 0.0], [2.0, 0.0, 3.0]], dtype=torch.float64)
    out = block(x)
    rec = block.last_routing
    dropped_experts = sorted((t, int(rec["topk_indices"][t, j])) for t, j in rec["dropped"].nonzero().tolist())
    # expert 0: tokens 0,1 kept, 2 and 3 dropped; expert 1: tokens 0,1 kept, 2 dropped; null never dropped
    assert dropped_experts == [(2, 0), (2, 1), (3, 0)]
    assert torch.equal(out[2], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(out[3], torch.zeros(3, dtype=torch.float64))
    assert float(rec["topk_weights"].detach()[rec["dropped"]].abs().sum()) == 0.0
    expected = naive_moe_output(block, x, rec["topk_indices"], rec["topk_weights"])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# losses


def routing_record(probs, indices, num_true, top_k=2):
    probs = torch.tensor(probs, dtype=torch.float64)
    return {"router_logits": probs.log(), "topk_indices": torch.tensor(indices), "topk_weights": None,
            "dropped": None, "num_true_experts": num_true, "num_null_experts": probs.shape[1] - num_true,
            "top_k": top_k}


# Experts [true0, true1, null2, null3], k=2. Values worked out by hand in the comments.
LAYER1 = routing_record([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.6, 0.1]], [[0, 1], [2, 1]], num_true=2)
# f = [1,2,1,0]/4 = [.25,.5,.25,0]; P = [.25,.25,.4,.1]
# none: 4*(.0625+.125+.1) = 1.15 ; average (f_null = .125 each): 4*(.0625+.125+.05+.0125) = 1.0
LAYER2 = routing_record([[0.7, 0.05, 0.15, 0.1], [0.1, 0.6, 0.2, 0.1]], [[0, 2], [1, 2]], num_true=2)
# f = [.25,.25,.5,0]; P = [.4,.325,.175,.1]
# none: 4*(.1+.08125+.0875) = 1.075 ; average (f_null = .25 each): 4*.25*1 = 1.0
# concat: f = [2,3,3,0]/8 ; P = [.325,.2875,.2875,.1]
# none: 4*(.25*.325 + .375*.2875*2) = 1.1875 ; average: 4*(.08125 + .375*.2875 + .1875*.2875 + .1875*.1) = 1.046875


@pytest.mark.parametrize("mode,reduce,expected", [
    ("none", "per_layer_sum", 1.15 + 1.075),
    ("average", "per_layer_sum", 2.0),
    ("none", "concat", 1.1875),
    ("average", "concat", 1.046875),
])
def test_load_balancing_loss_hand_computed(mode, reduce, expected):
    got = load_balancing_loss([LAYER1, LAYER2], lb_null_mode=mode, lb_reduce=reduce)
    assert float(got) == pytest.approx(expected, abs=1e-12)


def test_load_balancing_single_layer_hand_values():
    assert float(load_balancing_loss(LAYER1, lb_null_mode="none")) == pytest.approx(1.15, abs=1e-12)
    assert float(load_balancing_loss(LAYER1, lb_null_mode="average")) == pytest.approx(1.0, abs=1e-12)


def test_concat_mode_matches_hf_mixtral_loss_times_k():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    layers, logits_per_layer = [], []
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for _ in range(3):
        logits = torch.randn(10, 6)
        logits_per_layer.append(logits)
        layers.append({"router_logits": logits, "topk_indices": torch.topk(logits, 2, dim=-1).indices,
                       "num_true_experts": 6, "num_null_experts": 0, "top_k": 2, "dropped": None})
    for attention_mask in (None, mask):
        hf = load_balancing_loss_func(tuple(logits_per_layer), 6, 2, attention_mask)
        ours = load_balancing_loss(layers, token_mask=attention_mask, lb_null_mode="none", lb_reduce="concat")
        assert float(ours) * 2 == pytest.approx(float(hf), rel=1e-6)


def test_padding_tokens_are_excluded():
    pad = routing_record([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.6, 0.1], [0.5, 0.05, 0.05, 0.4]],
                         [[0, 1], [2, 1], [0, 3]], num_true=2)
    mask = torch.tensor([1, 1, 0])
    for mode in ("none", "average"):
        with_pad = load_balancing_loss(pad, token_mask=mask, lb_null_mode=mode)
        assert float(with_pad) == pytest.approx(float(load_balancing_loss(LAYER1, lb_null_mode=mode)), abs=1e-12)
        assert float(load_balancing_loss(pad, lb_null_mode=mode)) != pytest.approx(float(with_pad))
    assert float(router_z_loss(pad, mask)) == pytest.approx(float(router_z_loss(LAYER1)), abs=1e-12)
    with pytest.raises(ValueError, match="token mask"):
        load_balancing_loss(pad, token_mask=torch.ones(4))


def test_router_z_loss_hand_computed():
    rec = {"router_logits": torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)}
    # logsumexp = ln 2 and ln 4 = 2 ln 2 -> mean of squares = 2.5 (ln 2)^2
    assert float(router_z_loss(rec)) == pytest.approx(2.5 * math.log(2) ** 2, abs=1e-12)


def test_gradient_reaches_null_gate_through_output_and_balance_loss():
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, intermediate_size=6, num_experts=4, num_null_experts=4, top_k=2)
    model = torch.nn.Sequential(SparseMoEBlock(cfg), SparseMoEBlock(cfg))
    out = model(torch.randn(3, 5, 8))
    losses = collect_moe_aux_losses(model)
    assert set(losses) == {"lb", "z"}
    (out.square().mean() + losses["lb"]).backward()
    for block in model:
        grad = block.gate.null_gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    # the balance loss alone also reaches the null gate
    model.zero_grad()
    model(torch.randn(3, 5, 8))
    collect_moe_aux_losses(model)["lb"].backward()
    assert model[0].gate.null_gate.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# metrics


def test_routing_metrics_hand_example():
    block = identity_router_block(2, 2, 2)
    block(ROUTING_X)  # A: 1 true, B: 2 true, C: 0 true
    m = moe_routing_metrics(torch.nn.Sequential(block))
    assert m["moe/true_experts_per_token"] == pytest.approx(1.0)
    assert [m[f"moe/share_true_experts_{i}"] for i in range(3)] == pytest.approx([1 / 3] * 3)
    assert m["moe/null_slot_fraction"] == pytest.approx(0.5)
    assert m["moe/drop_fraction"] == 0.0
    # expert selections: e0 {A,B}, e1 {B}, e2 {C}, e3 {A,C} over 6 slots
    torch.testing.assert_close(m["expert_load"], torch.tensor([[2 / 6, 1 / 6, 1 / 6, 2 / 6]], dtype=torch.float64))
    probs = ROUTING_X.exp() / ROUTING_X.exp().sum(-1, keepdim=True)
    entropy = float(-(probs * probs.log()).sum(-1).mean())
    assert m["moe/router_entropy"] == pytest.approx(entropy, abs=1e-12)
    # with the all-null token C masked out
    masked = moe_routing_metrics(torch.nn.Sequential(block), torch.tensor([1, 1, 0]))
    assert masked["moe/true_experts_per_token"] == pytest.approx(1.5)
    assert masked["moe/share_true_experts_0"] == 0.0
    assert masked["moe/null_slot_fraction"] == pytest.approx(0.25)


def test_metrics_and_losses_need_a_forward():
    cfg = MoEConfig(hidden_size=4, intermediate_size=4, num_experts=2, num_null_experts=1)
    with pytest.raises(ValueError, match="forward"):
        collect_moe_aux_losses(torch.nn.Sequential(SparseMoEBlock(cfg)))
    with pytest.raises(ValueError, match="SparseMoEBlock"):
        moe_routing_metrics(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------
# Hugging Face retrofit

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)).eval()


def tiny_qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(**TINY, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
                         num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False)
    model = Qwen2MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # the Qwen2-MoE router initialises to zeros; give it real routing
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def tiny_olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    model = OlmoeForCausalLM(OlmoeConfig(**TINY, num_experts=4, num_experts_per_tok=2, eos_token_id=1,
                                         pad_token_id=0, bos_token_id=2)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


INPUT_IDS = torch.tensor([[3, 17, 42, 5, 9, 60, 1], [8, 8, 30, 2, 44, 12, 7]])


@pytest.mark.parametrize("factory", [tiny_mixtral, tiny_qwen2_moe, tiny_olmoe])
def test_retrofit_with_zero_nulls_is_identity_and_shares_weights(factory):
    model = factory()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    with torch.no_grad():
        reference = model(INPUT_IDS).logits
    retrofit(model, num_null_experts=0)
    blocks = [m for m in model.modules() if isinstance(m, SparseMoEBlock)]
    assert len(blocks) == 2
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)
    after = dict(model.named_parameters())
    assert set(after) == set(before)  # same names: same checkpoint keys, nothing added
    for name, p in after.items():
        assert p.data_ptr() == pointers[name] and torch.equal(p, before[name])


def test_retrofit_qwen2_keeps_shared_expert_and_unnormalised_weights():
    model = tiny_qwen2_moe()
    retrofit(model, num_null_experts=2, top_k=3, renormalize_true="false")  # the model's own (raw) weights
    model(INPUT_IDS)
    block = model.model.layers[0].mlp
    assert block.shared_expert is not None and block.shared_expert_gate is not None
    rec = block.last_routing
    probs = torch.softmax(rec["router_logits"].float(), dim=-1)
    chosen = probs.gather(1, rec["topk_indices"])
    expected = torch.where(rec["topk_indices"] < 4, chosen, torch.zeros_like(chosen))
    torch.testing.assert_close(rec["topk_weights"], expected)
    # routed output + sigmoid(shared gate) * shared expert, recomputed here from the parts
    x = torch.randn(5, 32)
    shared = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    _, w, idx = block.gate(x)
    routed = naive_moe_output(block, x, idx, w)
    torch.testing.assert_close(block(x), routed + shared, rtol=1e-5, atol=1e-6)


def test_retrofit_mixtral_with_nulls_records_config_and_changes_routing():
    model = tiny_mixtral()
    retrofit(model, num_null_experts=8, top_k=4)
    assert model.config.adamoe["num_null_experts"] == 8 and model.config.adamoe["top_k"] == 4
    block = model.model.layers[0].mlp
    assert block.gate.null_gate.weight.shape == (8, 32)
    assert torch.equal(block.gate.null_gate.weight, block.gate.weight.repeat(2, 1))  # copy init
    model(INPUT_IDS)
    rec = block.last_routing
    assert rec["topk_indices"].shape == (14, 4) and rec["router_logits"].shape == (14, 12)
    true_sum = rec["topk_weights"].sum(-1)
    any_true = (rec["topk_indices"] < 4).any(-1)
    torch.testing.assert_close(true_sum[any_true], torch.ones(int(any_true.sum())))
    metrics = moe_routing_metrics(model)
    assert metrics["expert_load"].shape == (2, 12)
    assert 0.0 <= metrics["moe/true_experts_per_token"] <= 4.0


def test_retrofit_rejects_unsupported_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(**TINY))
    with pytest.raises(ValueError, match="mixtral.*olmoe.*qwen2_moe|mixtral"):
        retrofit(llama, num_null_experts=2)
    model = tiny_mixtral()
    retrofit(model, 2)
    with pytest.raises(ValueError, match="already retrofitted"):
        retrofit(model, 2)


def test_save_pretrained_and_load_retrofitted_round_trip(tmp_path):
    model = tiny_mixtral()
    retrofit(model, num_null_experts=3, top_k=3, capacity_factor=2.0)
    with torch.no_grad():  # make the null gates differ from their copy initialisation
        for name in trainable_module_names(model):
            model.get_submodule(name).weight.normal_(0, 1.0)
        reference = model(INPUT_IDS).logits
    model.save_pretrained(tmp_path)
    loaded = load_retrofitted(tmp_path).eval()
    assert loaded.config.adamoe == model.config.adamoe
    assert loaded.model.layers[1].mlp.capacity_factor == 2.0
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    with torch.no_grad():
        torch.testing.assert_close(loaded(INPUT_IDS).logits, reference, rtol=0, atol=0)


def test_load_retrofitted_refuses_plain_checkpoint(tmp_path):
    tiny_mixtral().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="adamoe"):
        load_retrofitted(tmp_path)


def test_null_gate_trains_under_peft_lora():
    from peft import LoraConfig, get_peft_model

    model = tiny_mixtral()
    retrofit(model, num_null_experts=4, top_k=3)
    names = trainable_module_names(model)
    assert names == ["model.layers.0.mlp.gate.null_gate", "model.layers.1.mlp.gate.null_gate"]
    with torch.no_grad():
        reference = model(INPUT_IDS).logits
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=names))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("null_gate" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any(n.endswith("mlp.gate.weight") or "experts" in n for n in trainable)
    with torch.no_grad():  # LoRA B starts at zero and the saved copy equals the original: same function
        torch.testing.assert_close(peft_model(input_ids=INPUT_IDS).logits, reference, rtol=0, atol=1e-6)

    peft_model.train()
    out = peft_model(input_ids=INPUT_IDS, labels=INPUT_IDS)
    aux = collect_moe_aux_losses(peft_model)
    (out.loss + 1e-2 * aux["lb"]).backward()
    null_params = [p for n, p in peft_model.named_parameters() if "null_gate" in n and p.requires_grad]
    assert null_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in null_params)
    before = [p.detach().clone() for p in null_params]
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(not torch.equal(b, p) for b, p in zip(before, null_params))


# ------------------------------------------------------------------------------------------------
# grouped-GEMM expert path (expert_impl): same outputs and gradients as the per-expert loop


def forced_routing_pair(dtype=torch.float32, capacity_factor=0.5):
    """Two blocks with the same weights, expert_impl "loop" and "grouped_mm": 5 true + 3 null experts, top-2,
    hidden 8 (= E_total, a multiple of 4 as grouped_mm's 16-byte strides need) with an identity router, and
    an input whose routing (read from its first 8 coordinates) has: true expert 2 never chosen, tokens 0 and
    1 choosing only null experts, and 7 tokens wanting expert 0 against a capacity of ceil(0.5*12*2/5) = 3."""
    torch.manual_seed(11)
    blocks = []
    for impl in ("loop", "grouped_mm"):
        cfg = MoEConfig(hidden_size=8, intermediate_size=4, num_experts=5, num_null_experts=3, top_k=2,
                        capacity_factor=capacity_factor, expert_impl=impl)
        blocks.append(SparseMoEBlock(cfg).to(dtype))
    with torch.no_grad():
        blocks[0].gate.weight.copy_(torch.eye(8)[:5])
        blocks[0].gate.null_gate.weight.copy_(torch.eye(8)[5:])
        blocks[0].experts.gate_up_proj.normal_(0, 0.5)
        blocks[0].experts.down_proj.normal_(0, 0.5)
    blocks[1].load_state_dict(blocks[0].state_dict())
    x = torch.randn(12, 8)
    x[:, 2] = -10.0  # expert 2: no token
    x[0, 5] = x[0, 6] = x[1, 6] = x[1, 7] = 10.0  # tokens 0 and 1: both slots null
    x[:, 0] = -10.0
    x[2:9, 0] = 6.0  # exactly 7 tokens for expert 0, capacity 3
    return blocks[0], blocks[1], x.to(dtype)


def run_with_grads(block, x, grad):
    block.zero_grad(set_to_none=True)
    inp = x.detach().clone().requires_grad_(True)
    out = block(inp)
    out.backward(grad)
    return out.detach(), inp.grad, {n: p.grad for n, p in block.named_parameters()}


def test_grouped_mm_equals_loop_with_empty_expert_null_tokens_and_drops():
    loop, grouped, x = forced_routing_pair()
    grad = torch.randn_like(x)
    out_l, gx_l, gp_l = run_with_grads(loop, x, grad)
    out_g, gx_g, gp_g = run_with_grads(grouped, x, grad)
    assert loop.experts.last_impl == "loop" and grouped.experts.last_impl == "grouped_mm"
    rec = grouped.last_routing
    idx, dropped = rec["topk_indices"], rec["dropped"]
    # the routing has what the test is about
    assert not (idx == 2).any()
    assert (idx[:2] >= 5).all()
    assert int(((idx == 0) & dropped).sum()) == 4 and int(((idx == 0) & ~dropped).sum()) == 3
    # null-only tokens and tokens whose only true slot was dropped output exactly 0 on both paths
    zero_rows = [t for t in range(12) if not bool(((idx[t] < 5) & ~dropped[t]).any())]
    assert zero_rows[:2] == [0, 1] and len(zero_rows) >= 2
    for out in (out_l, out_g):
        assert torch.equal(out[zero_rows], torch.zeros(len(zero_rows), 8))
    # same outputs and gradients (float32: grouped_mm has no float64 kernel)
    torch.testing.assert_close(out_g, out_l, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_g, gx_l, rtol=1e-6, atol=1e-6)
    assert set(gp_g) == set(gp_l)
    for name in gp_l:
        torch.testing.assert_close(gp_g[name], gp_l[name], rtol=1e-6, atol=1e-6, msg=name)
    # the expert with no token gets exactly zero weight gradient, the used ones do not
    for grads in (gp_l, gp_g):
        assert torch.equal(grads["experts.gate_up_proj"][2], torch.zeros(8, 8))
        assert torch.equal(grads["experts.down_proj"][2], torch.zeros(8, 4))
        assert grads["experts.gate_up_proj"][0].abs().sum() > 0
    # independent reference: the per-token loop of the test helpers, in float64
    ref = naive_moe_output(loop.double(), x.double(), idx, rec["topk_weights"].double())
    torch.testing.assert_close(out_g.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl,hidden,inter,dtype,block_elements", [
    # routing weight on the hidden (I < d) / on the output; gate and up projected apart (I*8 B not a multiple
    # of 64) or together (I = 16)
    ("loop", 6, 5, torch.float64, None), ("loop", 5, 9, torch.float64, None), ("loop", 8, 16, torch.float64, None),
    # grouped_mm: all experts in one block / one block per expert / blocks of a few experts
    ("grouped_mm", 8, 4, torch.float32, None), ("grouped_mm", 4, 12, torch.float32, None),
    ("grouped_mm", 8, 4, torch.float32, 1), ("grouped_mm", 8, 4, torch.float32, 90)])
def test_fused_experts_gradients_equal_autograd_of_the_naive_loop(impl, hidden, inter, dtype, block_elements,
                                                                    monkeypatch):
    """The one-node expert computation (hand-written backward) against autograd through the per-token loop
    of the test helpers in float64, with null experts and capacity drops: output and every gradient; then
    with frozen experts and an input that needs no gradient (only the router trains)."""
    if block_elements is not None:
        monkeypatch.setattr(moe_experts, "_BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(5)
    cfg = MoEConfig(hidden_size=hidden, intermediate_size=inter, num_experts=4, num_null_experts=2, top_k=3,
                    null_gate_init="random", init_std=0.5, capacity_factor=0.5, expert_impl=impl)
    block = SparseMoEBlock(cfg).to(dtype)
    x = torch.randn(14, hidden, dtype=dtype)
    grad = torch.randn_like(x)
    out, gx, gp = run_with_grads(block, x, grad)
    assert block.experts._fusable(x) and block.experts.last_impl == impl
    rec = block.last_routing
    assert rec["dropped"].any() and (rec["topk_indices"] >= 4).any()  # drops and null slots both happen
    kept = rec["topk_indices"][~rec["dropped"] & (rec["topk_indices"] < 4)]
    blocks = moe_experts._expert_blocks(torch.bincount(kept, minlength=4).tolist(), impl == "grouped_mm",
                                        max(2 * inter, hidden))
    sizes = sorted(e1 - e0 for e0, e1, _, _ in blocks)
    assert sizes == {None: [4], 1: [1, 1, 1, 1], 90: [1, 1, 2]}[block_elements] if impl == "grouped_mm" \
        else sizes == [1, 1, 1, 1]

    ref_block = SparseMoEBlock(cfg).double()
    ref_block.load_state_dict(block.state_dict())
    inp = x.double().requires_grad_(True)
    _, weights, idx = ref_block.gate(inp)
    weights = weights.masked_fill(ref_block.capacity_drops(idx), 0.0)
    ref = naive_moe_output(ref_block, inp, idx, weights)
    ref.backward(grad.double())
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    torch.testing.assert_close(gx.double(), inp.grad, **tol)
    for name, p in ref_block.named_parameters():
        torch.testing.assert_close(gp[name].double(), p.grad, msg=name, **tol)

    block.experts.requires_grad_(False)
    block.zero_grad(set_to_none=True)
    block(x).backward(grad)
    assert block.experts.gate_up_proj.grad is None
    for name, p in block.gate.named_parameters():
        torch.testing.assert_close(p.grad.double(), dict(ref_block.gate.named_parameters())[name].grad, **tol)


def test_grouped_mm_all_tokens_null_computes_nothing():
    _, grouped, x = forced_routing_pair(capacity_factor=None)
    x[:, 5:] = 10.0  # every token picks two null experts
    inp = x.clone().requires_grad_(True)
    out = grouped(inp)
    assert torch.equal(out, torch.zeros_like(x))
    assert grouped.experts.last_impl is None  # no expert ran
    # the router still trains (through the logits: here an aux loss); the experts get no gradient at all
    (out.sum() + collect_moe_aux_losses(torch.nn.Sequential(grouped))["lb"]).backward()
    assert grouped.gate.null_gate.weight.grad is not None
    assert grouped.experts.gate_up_proj.grad is None and grouped.experts.down_proj.grad is None


def test_grouped_mm_bf16_and_autocast_match_the_loop():
    torch.manual_seed(2)
    cfg = dict(hidden_size=16, intermediate_size=24, num_experts=6, num_null_experts=2, top_k=3, init_std=0.3)
    loop = SparseMoEBlock(MoEConfig(**cfg, expert_impl="loop"))
    grouped = SparseMoEBlock(MoEConfig(**cfg, expert_impl="grouped_mm"))
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(40, 16)
    outs, grads = [], []
    for block in (loop, grouped):  # fp32 weights, bf16 matmuls on both paths
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
        out.float().square().sum().backward()
        outs.append(out.float())
        grads.append(block.experts.gate_up_proj.grad)
    assert grouped.experts.last_impl == "grouped_mm" and grads[1].dtype == torch.float32
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=2e-2)
    loop, grouped, xb = loop.bfloat16(), grouped.bfloat16(), x.bfloat16()
    g = torch.randn_like(xb)
    out_l, gx_l, gp_l = run_with_grads(loop, xb, g)
    out_g, gx_g, gp_g = run_with_grads(grouped, xb, g)
    assert grouped.experts.last_impl == "grouped_mm"
    torch.testing.assert_close(out_g, out_l, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gx_g, gx_l, rtol=2e-2, atol=2e-3)
    for name in gp_l:
        torch.testing.assert_close(gp_g[name], gp_l[name], rtol=2e-2, atol=2e-3, msg=name)


def test_expert_impl_choice_is_a_function_of_the_config():
    cpu, f32 = torch.device("cpu"), torch.float32
    # auto: grouped_mm from 64 experts on CPU where grouped_mm can run, the loop otherwise
    assert resolve_expert_impl("auto", 64, 128, 64, f32, cpu) == "grouped_mm"
    assert resolve_expert_impl("auto", 128, 128, 172, f32, cpu) == "grouped_mm"
    assert resolve_expert_impl("auto", 63, 128, 64, f32, cpu) == "loop"
    assert resolve_expert_impl("auto", 8, 128, 172, f32, cpu) == "loop"
    assert resolve_expert_impl("auto", 64, 128, 64, torch.float64, cpu) == "loop"  # no float64 kernel
    assert resolve_expert_impl("auto", 64, 128, 172, torch.bfloat16, cpu) == "loop"  # 172*2 B not 16-aligned
    assert resolve_expert_impl("auto", 64, 128, 176, torch.bfloat16, cpu) == "grouped_mm"
    assert resolve_expert_impl("auto", 64, 130, 64, f32, cpu) == "loop"  # 130*4 B not 16-aligned
    assert resolve_expert_impl("loop", 64, 128, 64, f32, cpu) == "loop"
    assert resolve_expert_impl("grouped_mm", 2, 128, 64, f32, cpu) == "grouped_mm"
    # the same answer every time, and through the block built from the config
    assert {resolve_expert_impl("auto", 64, 16, 8, f32, cpu) for _ in range(5)} == {"grouped_mm"}
    for experts, expected in ((64, "grouped_mm"), (8, "loop")):
        block = SparseMoEBlock(MoEConfig(hidden_size=16, intermediate_size=8, num_experts=experts, top_k=8))
        assert block.config.expert_impl == "auto"
        for _ in range(2):
            block(torch.randn(10, 16))
            assert block.experts.last_impl == expected
    with pytest.raises(ValueError, match="expert_impl"):
        MoEConfig(hidden_size=8, intermediate_size=8, num_experts=2, expert_impl="bmm")


def test_grouped_mm_falls_back_to_the_loop_in_float64_with_a_warning():
    block = identity_router_block(2, 2, 2)  # float64
    block.experts.expert_impl = "grouped_mm"
    with pytest.warns(UserWarning, match="float64"):
        out = block(ROUTING_X)
    assert block.experts.last_impl == "loop"
    e = math.e
    expected_b = sum(w * swiglu_reference(ROUTING_X[1], block.experts.gate_up_proj[i], block.experts.down_proj[i])
                     for i, w in [(1, e**2 / (e + e**2)), (0, e / (e + e**2))])
    torch.testing.assert_close(out[1], expected_b, rtol=0, atol=1e-12)


def test_retrofit_with_grouped_mm_matches_hf_and_trains_the_shared_weights():
    reference_model = tiny_mixtral()
    ids = INPUT_IDS
    out_ref = reference_model(ids, labels=ids)
    out_ref.loss.backward()
    model = tiny_mixtral()  # same seed: same weights
    retrofit(model, num_null_experts=0, expert_impl="grouped_mm")
    block = model.model.layers[0].mlp
    assert block.experts.gate_up_proj is model.model.layers[0].mlp.experts.gate_up_proj
    out = model(ids, labels=ids)
    assert block.experts.last_impl == "grouped_mm"
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref_params = dict(reference_model.named_parameters())
    for name, p in model.named_parameters():  # same names: the HF expert Parameters get the gradients
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="expert_impl"):
        retrofit(tiny_mixtral(), num_null_experts=1, expert_impl="fast")


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_grouped_mm_equals_loop_for_other_activations(act):
    torch.manual_seed(4)
    cfg = dict(hidden_size=8, intermediate_size=12, num_experts=5, num_null_experts=1, top_k=2, init_std=0.4,
               hidden_act=act)
    loop = SparseMoEBlock(MoEConfig(**cfg, expert_impl="loop"))
    grouped = SparseMoEBlock(MoEConfig(**cfg, expert_impl="grouped_mm"))
    grouped.load_state_dict(loop.state_dict())
    x, g = torch.randn(30, 8), torch.randn(30, 8)
    out_l, gx_l, gp_l = run_with_grads(loop, x, g)
    out_g, gx_g, gp_g = run_with_grads(grouped, x, g)
    assert grouped.experts.last_impl == "grouped_mm"
    torch.testing.assert_close(out_g, out_l, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_g, gx_l, rtol=1e-6, atol=1e-6)
    for name in gp_l:
        torch.testing.assert_close(gp_g[name], gp_l[name], rtol=1e-6, atol=1e-6, msg=name)


def test_grouped_mm_uses_the_loop_for_weights_not_16_byte_aligned():
    torch.manual_seed(5)
    cfg = MoEConfig(hidden_size=8, intermediate_size=4, num_experts=3, top_k=2, expert_impl="grouped_mm")
    block = SparseMoEBlock(cfg)
    x = torch.randn(6, 8)
    reference = block(x)
    assert block.experts.last_impl == "grouped_mm"
    experts = block.experts
    with torch.no_grad():  # the same values, stored one float32 (4 bytes) into a buffer
        buffer = torch.empty(experts.gate_up_proj.numel() + 1)
        buffer[1:] = experts.gate_up_proj.reshape(-1)
        experts.gate_up_proj = torch.nn.Parameter(buffer[1:].view(3, 8, 8))
    assert experts.gate_up_proj.data_ptr() % 16 != 0
    torch.testing.assert_close(block(x), reference, rtol=1e-6, atol=1e-6)
    assert experts.last_impl == "loop"
