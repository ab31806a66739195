"""twin.protocol (paper | ours | custom) and the pieces of the paper protocol, each against a value worked out by
hand on tiny tensors: the shared merge without classifier / biases, floor vs round SVD ranks, the factor-wise
LoRA merge, the official router's architecture; and the classification tasks of twin_merging_cls."""
import pytest
import torch
from torch import nn

from models.merging import merge_state_dicts
from models.twin import (
    LowRank,
    PaperRouter,
    TaskRouter,
    attach_lora_factor_experts,
    build_router,
    compress_exclusive,
    exclusive_task_vectors,
    lora_dense_state,
    lora_factor_expert,
    lora_factors,
    merge_lora_factors,
    merge_lora_factorwise,
    resolve_rank,
    set_routing_weights,
    shared_exclusions,
)
from recipes.engine.config import ConfigError, load_config

D = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=D)


# ------------------------------------------------------------------ shared expert: classifier and biases excluded
def test_shared_merge_keeps_classifier_and_biases_at_the_base_by_hand():
    base = {"body.weight": t([1.0, 2.0], [3.0, 4.0]), "body.bias": t(1.0, -1.0), "head.weight": t([0.5, 0.5])}
    tuned = [{"body.weight": t([2.0, 2.0], [3.0, 6.0]), "body.bias": t(3.0, -1.0), "head.weight": t([1.5, 0.5])},
             {"body.weight": t([1.0, 0.0], [5.0, 4.0]), "body.bias": t(1.0, 5.0), "head.weight": t([0.5, -0.5])}]
    excluded = shared_exclusions(list(base), classifier=["head.weight"], biases=True)
    assert excluded == ["body.bias", "head.weight"]
    assert shared_exclusions(list(base), classifier=(), biases=False) == []
    shared = merge_state_dicts("task_arithmetic", base, tuned, lam=0.29, exclude=excluded)
    # body: base + 0.29 * ((1, 0; 0, 2) + (0, -2; 2, 0)) = base + 0.29 * (1, -2; 2, 2)
    assert torch.allclose(shared["body.weight"], t([1.29, 1.42], [3.58, 4.58]), atol=1e-12)
    assert torch.equal(shared["body.bias"], base["body.bias"])
    assert torch.equal(shared["head.weight"], base["head.weight"])
    # so the exclusive experts of the excluded tensors are theta_t - theta_base (the router picks them)
    tau = exclusive_task_vectors(shared, tuned[0])
    assert torch.equal(tau["body.bias"], t(2.0, 0.0)) and torch.equal(tau["head.weight"], t([1.0, 0.0]))
    assert torch.allclose(tau["body.weight"], t([0.71, 0.58], [-0.58, 1.42]), atol=1e-12)


def test_lm_head_is_the_classifier_only_when_untied():
    from transformers import LlamaConfig, LlamaForCausalLM

    from recipes.twin_merging.experts import classifier_keys, excluded_keys
    kw = dict(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2)
    tied = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **kw))
    untied = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **kw))
    assert classifier_keys(tied) == [] and classifier_keys(untied) == ["lm_head.weight"]
    names = list(untied.state_dict()) + ["x.bias"]
    assert excluded_keys(names, ["classifier", "bias"], ["lm_head.weight"]) == ["lm_head.weight", "x.bias"]
    assert excluded_keys(names, ["bias"], ["lm_head.weight"]) == ["x.bias"]
    assert excluded_keys(names, [], ["lm_head.weight"]) == []


# ------------------------------------------------------------------ SVD rank: floor (official) vs round (ours)
@pytest.mark.parametrize("fraction,shape,floor,rnd", [
    (0.1, (128, 344), 12, 13),   # 12.8: the tiny llama's attention / MLP matrices
    (0.1, (4096, 128), 12, 13),
    (0.27, (10, 10), 2, 3),      # 2.7
    (0.1, (768, 768), 76, 77),   # 76.8: RoBERTa-base, the official setting
    (0.05, (8, 8), 1, 1),        # 0.4: the official int() gives 0 (an all-zero delta); at least 1 here
])
def test_rank_floor_vs_round_by_hand(fraction, shape, floor, rnd):
    assert resolve_rank(fraction, shape, "floor") == floor
    assert resolve_rank(fraction, shape, "round") == rnd
    assert resolve_rank(5, shape, "floor") == resolve_rank(5, shape, "round") == min(5, *shape)
    tau = {"w": torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=D)}
    assert compress_exclusive(tau, rank=fraction, rounding="floor")["w"].rank == floor
    assert compress_exclusive(tau, rank=fraction, rounding="round")["w"].rank == rnd
    with pytest.raises(ValueError, match="rounding"):
        resolve_rank(fraction, shape, "ceil")


# ------------------------------------------------------------------ LoRA: factor-wise merge
def _factors():
    # two tasks' adapters of one 2x3 weight at LoRA rank 1: delta_t = s * B_t @ A_t
    a = [t([1.0, 0.0, 2.0]), t([0.0, 1.0, -2.0])]
    b = [t([1.0], [2.0]), t([3.0], [-1.0])]
    return [{"w.weight": (a[i], b[i])} for i in range(2)]


def test_factorwise_task_arithmetic_merges_a_and_b_separately_by_hand():
    f = _factors()
    shared = merge_lora_factors("task_arithmetic", f, lam=0.5)
    a_sh, b_sh = shared["w.weight"]
    assert torch.allclose(a_sh, t([0.5, 0.5, 0.0]), atol=1e-12)  # 0.5 * (A_1 + A_2)
    assert torch.allclose(b_sh, t([2.0], [0.5]), atol=1e-12)      # 0.5 * (B_1 + B_2)
    base = {"w.weight": torch.zeros(2, 3, dtype=D)}
    s = {"w.weight": 2.0}
    # factor-wise: s * B_sh @ A_sh = 2 * (2, 0.5)^T (0.5, 0.5, 0) = (2, 2, 0; 0.5, 0.5, 0)
    assert torch.allclose(lora_dense_state(base, shared, s)["w.weight"], t([2.0, 2.0, 0.0], [0.5, 0.5, 0.0]))
    # ... which is not the merge of the dense deltas: 0.5 * s * (B_1 A_1 + B_2 A_2) = (1, 3, -4; 2, -1, 6)
    dense = merge_state_dicts("task_arithmetic", base, [lora_dense_state(base, x, s) for x in f], lam=0.5)
    assert torch.allclose(dense["w.weight"], t([1.0, 3.0, -4.0], [2.0, -1.0, 6.0]))


def test_factorwise_experts_route_the_factors_by_hand():
    f = _factors()
    shared = merge_lora_factors("task_arithmetic", f, lam=0.5)
    experts = [lora_factor_expert(shared, x, rank=1) for x in f]  # rank-1 factor differences: exact
    assert set(experts[0]) == {"w.lora_A", "w.lora_B"}
    assert torch.allclose(experts[0]["w.lora_A"].dense(), t([0.5, -0.5, 2.0]), atol=1e-12)  # A_1 - A_sh
    assert torch.allclose(experts[1]["w.lora_B"].dense(), t([1.0], [-1.5]), atol=1e-12)      # B_2 - B_sh
    base = {"w.weight": t([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])}
    s = {"w.weight": 2.0}
    # one-hot routing: A(e_t) = A_t, B(e_t) = B_t, i.e. exactly the fine-tuned model
    for i in range(2):
        w = [1.0 if j == i else 0.0 for j in range(2)]
        got = merge_lora_factorwise(base, shared, experts, w, s)["w.weight"]
        assert torch.allclose(got, base["w.weight"] + 2.0 * f[i]["w.weight"][1] @ f[i]["w.weight"][0], atol=1e-12)
    # w = (0.5, 0.5): A = A_sh + 0.5 (A_1 - A_sh) + 0.5 (A_2 - A_sh) = A_sh, B likewise: the shared adapter
    got = merge_lora_factorwise(base, shared, experts, [0.5, 0.5], s)["w.weight"]
    assert torch.allclose(got, base["w.weight"] + t([2.0, 2.0, 0.0], [0.5, 0.5, 0.0]), atol=1e-12)
    # w = (1, 1): A = A_1 + A_2 - A_sh = (0.5, 0.5, 0), B = (2, 0.5): the same product; w = (0.25, 0):
    # A = A_sh + 0.25 (0.5, -0.5, 2) = (0.625, 0.375, 0.5), B = (2, 0.5) + 0.25 (-1, 1.5) = (1.75, 0.875)
    got = merge_lora_factorwise(base, shared, experts, [0.25, 0.0], s)["w.weight"]
    want = t([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]) + 2.0 * t([1.75], [0.875]) @ t([0.625, 0.375, 0.5])
    assert torch.allclose(got, want, atol=1e-12)


def _peft_tiny(seed):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).to(D).eval()
    torch.manual_seed(seed)
    peft = get_peft_model(LlamaForCausalLM(cfg).to(D), LoraConfig(r=3, lora_alpha=6, init_lora_weights=False,
                                                                   target_modules=["q_proj", "v_proj", "down_proj"]))
    peft.base_model.model.load_state_dict(base.state_dict(), strict=False)
    return base, peft


def test_lora_factor_experts_forward_equals_the_factorwise_merge_per_sample():
    from transformers import LlamaForCausalLM

    from models.twin import lora_delta_state_dict
    base, _ = _peft_tiny(1)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    factors, scalings = [], None
    for seed in (1, 2, 3):
        peft = _peft_tiny(seed)[1]
        f, scalings = lora_factors(peft)
        deltas = lora_delta_state_dict(peft)  # peft's own scaling * B @ A
        for k, (a, b) in f.items():
            assert torch.allclose(scalings[k] * b @ a, deltas[k], atol=1e-12)
        factors.append(f)
    assert scalings and all(s == 2.0 for s in scalings.values())
    shared = merge_lora_factors("task_arithmetic", factors, lam=0.29)
    experts = [lora_factor_expert(shared, f, rank=0.1, rounding="floor") for f in factors]
    # rank 0.1 of a 32 x 32 / 32 x 48 weight: floor 3, at most the LoRA rank 3: the factors are exact
    assert all(v.rank == 3 for e in experts for v in e.values())
    twin = attach_lora_factor_experts(LlamaForCausalLM(base.config).to(D).eval(), base_sd, shared, experts, scalings)
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    w = t([1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.4, 0.6])
    for routing in (w, t([0.2, 0.5, 0.3], [0.2, 0.5, 0.3], [0.2, 0.5, 0.3])):  # mixed, then uniform (cached)
        set_routing_weights(twin, routing)
        with torch.no_grad():
            got = twin(input_ids=ids).logits
        for i in range(3):
            ref = LlamaForCausalLM(base.config).to(D).eval()
            ref.load_state_dict(merge_lora_factorwise(base_sd, shared, experts, routing[i], scalings))
            with torch.no_grad():
                assert torch.allclose(got[i:i + 1], ref(input_ids=ids[i:i + 1]).logits, atol=1e-10, rtol=0)
    # all-zero routing = the shared model base + s B_sh A_sh
    set_routing_weights(twin, torch.zeros(3, 3, dtype=D))
    ref = LlamaForCausalLM(base.config).to(D).eval()
    ref.load_state_dict(lora_dense_state(base_sd, shared, scalings))
    with torch.no_grad():
        assert torch.allclose(twin(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-10, rtol=0)


# ------------------------------------------------------------------ router: the official 3-layer MLP
def test_paper_router_architecture():
    r = PaperRouter(hidden_size=16, num_tasks=3, width=32)
    shapes = {k: tuple(v.shape) for k, v in r.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert shapes == {"fc1.weight": (32, 16), "fc1.bias": (32,), "bn1.weight": (32,), "bn1.bias": (32,),
                      "bn1.running_mean": (32,), "bn1.running_var": (32,), "fc2.weight": (32, 32), "fc2.bias": (32,),
                      "bn2.weight": (32,), "bn2.bias": (32,), "bn2.running_mean": (32,), "bn2.running_var": (32,),
                      "fc3.weight": (3, 32), "fc3.bias": (3,)}
    # 16*32+32 + 2*32 + 32*32+32 + 2*32 + 32*3+3 trainable parameters
    assert sum(p.numel() for p in r.parameters()) == 544 + 64 + 1056 + 64 + 99
    assert r.dropout.p == 0.5 and PaperRouter(16, 3).fc1.out_features == 1024  # default width 1024
    # the forward, by hand in eval mode: BatchNorm with running stats, LeakyReLU slope 0.01, no dropout
    r.eval()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    h = nn.functional.leaky_relu(r.bn1(r.fc1(x)), 0.01)
    h = nn.functional.leaky_relu(r.bn2(r.fc2(h)), 0.01)
    assert torch.allclose(r(x), r.fc3(h), atol=1e-6)
    r.train()
    torch.manual_seed(0)
    assert not torch.allclose(r(x), r(x))  # dropout 0.5 while training
    assert isinstance(build_router("paper", 16, 3, 8), PaperRouter)
    assert isinstance(build_router("ours", 16, 3, 8), TaskRouter)
    with pytest.raises(ValueError):
        build_router("mlp", 16, 3, 8)


def test_fit_router_paper_schedule_and_selection():
    from recipes.twin_merging.router import fit_router, sample_per_task
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    y = torch.randint(0, 3, (300,), generator=g)
    x = centers[y] + torch.randn(300, 8, generator=g)
    state, meta = fit_router(x[:200], y[:200], x[200:], y[200:], 3, arch="paper", width=32, epochs=50, lr=5e-3,
                             seed=0, log=lambda m: None)
    assert meta["arch"] == "paper" and meta["width"] == 32 and meta["select_acc"] > 0.9
    r = build_router("paper", 8, 3, 32)
    r.load_state_dict(state)
    assert float((r.eval()(x[200:]).argmax(-1) == y[200:]).float().mean()) == meta["select_acc"]
    # per-task sampling: at most n of each task, seeded
    picked = sample_per_task([0, 0, 0, 1, 1, 2], 2, seed=0)
    assert sorted([0, 0, 0, 1, 1, 2][i] for i in picked) == [0, 0, 1, 1, 2]
    assert picked == sample_per_task([0, 0, 0, 1, 1, 2], 2, seed=0)


# ------------------------------------------------------------------ twin.protocol presets
def test_protocol_presets_resolve_and_conflicts_are_one_line_errors(tiny_overrides):
    from recipes.twin_merging.config import PROTOCOLS, resolved
    paper = resolved(load_config("twin_merging", tiny_overrides).twin)
    assert paper == PROTOCOLS["paper"] and paper["lam"] == 0.29 and paper["rank_rounding"] == "floor"
    assert paper["router"] == "paper" and paper["router_width"] == 1024 and paper["router_epochs"] == 50
    assert paper["router_lr"] == 5e-4 and paper["lora_merge"] == "factorwise"
    assert paper["shared_exclude"] == ["classifier", "bias"]
    ours = resolved(load_config("twin_merging", tiny_overrides + ["twin.protocol=ours"]).twin)
    assert ours["lam"] == 0.3 and ours["rank_rounding"] == "round" and ours["router"] == "ours"
    assert ours["router_epochs"] == 300 and ours["shared_exclude"] == [] and ours["lora_merge"] == "dense"
    # a key set to the preset's own value is no conflict; custom takes paper's values for unset keys
    load_config("twin_merging", tiny_overrides + ["twin.lam=0.29", "twin.shared_exclude=[bias,classifier]"])
    custom = resolved(load_config("twin_merging", tiny_overrides + ["twin.protocol=custom", "twin.lam=0.5",
                                                                    "twin.router=ours"]).twin)
    assert custom == dict(PROTOCOLS["paper"], lam=0.5, router="ours")
    for override, match in [("twin.lam=0.3", "twin.lam=0.3 conflicts with twin.protocol=paper"),
                            ("twin.rank_rounding=round", "twin.rank_rounding"),
                            ("twin.router_width=64", "router_width"), ("twin.shared_exclude=[bias]", "shared_exclude"),
                            ("twin.lora_merge=dense", "lora_merge")]:
        with pytest.raises(ConfigError, match=match) as e:
            load_config("twin_merging", tiny_overrides + [override])
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="conflicts with twin.protocol=ours"):
        load_config("twin_merging", tiny_overrides + ["twin.protocol=ours", "twin.lam=0.29"])
    for override, match in [("twin.protocol=official", "twin.protocol"), ("twin.router=mlp", "twin.router"),
                            ("twin.shared_exclude=[norm]", "shared_exclude"),
                            ("twin.router_epochs=0", "router_epochs")]:
        with pytest.raises(ConfigError, match=match):
            load_config("twin_merging", tiny_overrides + ["twin.protocol=custom", override])


# ------------------------------------------------------------------ the classification tasks
def test_classification_task_labels_by_hand():
    from recipes.twin_merging.cls import TASKS
    assert TASKS["stdlib_def"].label("x = 1\n    def run(self):\n") == 1
    assert TASKS["stdlib_def"].label("undefined = 'def'\n# def is a keyword\n") == 0
    assert TASKS["pydoc_digit"].label("See section 3.2") == 1 and TASKS["pydoc_digit"].label("no numbers") == 0
    assert TASKS["licenses_licence"].label("this LICENSE applies") == 1
    assert TASKS["licenses_licence"].label("the Licence, Version") == 1
    assert TASKS["licenses_licence"].label("the Program is free software") == 0
    assert len({task.domain for task in TASKS.values()}) == len(TASKS)  # one domain each: routable


def test_twin_merging_cls_config_errors(tiny_overrides):
    cfg = load_config("twin_merging_cls", tiny_overrides)
    assert list(cfg.twin_cls.tasks) == ["stdlib_def", "pydoc_digit", "licenses_licence"]
    for override, match in [("twin_cls.tasks=[stdlib_def]", "at least two"), ("twin_cls.tasks=[nope,pydoc_digit]",
                                                                               "unknown task"),
                            ("data.domains=[pydoc,stdlib]", "leaves out"), ("twin.finetune=lora", "not supported"),
                            ("twin.lam=0.3", "conflicts")]:
        with pytest.raises(ConfigError, match=match) as e:
            load_config("twin_merging_cls", tiny_overrides + [override])
        assert "\n" not in str(e.value)


def test_factor_rank_is_the_weight_budget_capped_at_the_lora_rank():
    f = {"w.weight": (torch.randn(4, 40, dtype=D), torch.randn(30, 4, dtype=D))}
    zero = {"w.weight": (torch.zeros(4, 40, dtype=D), torch.zeros(30, 4, dtype=D))}
    # 0.1 * min(30, 40) = 3 (floor) < LoRA rank 4; 0.5 * 30 = 15 -> capped at 4; an int is absolute
    assert lora_factor_expert(zero, f, rank=0.1, rounding="floor")["w.lora_A"].rank == 3
    assert lora_factor_expert(zero, f, rank=0.5)["w.lora_B"].rank == 4
    assert lora_factor_expert(zero, f, rank=2)["w.lora_A"].rank == 2
    assert isinstance(lora_factor_expert(zero, f, rank=2)["w.lora_B"], LowRank)
