"""AdaMoE against its released code: the load-balancing presets (`adamoe.lb_preset`) and the weights of the
selected true experts on Qwen2-MoE / OLMoE (`adamoe.renormalize_true`)."""
import copy

import pytest
import torch

from models.moe import (
    LB_PRESETS,
    MoEConfig,
    SparseMoEBlock,
    collect_moe_aux_losses,
    load_balancing_loss,
    resolve_renormalize_true,
    retrofit,
)
from recipes.engine.config import ConfigError, load_config

# ------------------------------------------------------------------------------------------------
# references written from the released code's semantics, independently of models/moe/losses.py


def released_mixtral_reference(logits_per_layer, top_k, num_true):
    """AdaMoE exp_2 (`load_balancing_loss_func_with_null_experts`, no padding): the layers' router logits
    concatenated, a one-hot [N, k, E] of the top-k choices averaged over the N rows (so summed over the k slots
    f_e = count_e / N), P_e = mean softmax, loss = E_total * sum f * P. Its null-averaging line indexes the
    k axis from num_true on (empty for k <= num_true) and is left out, as it changes nothing."""
    logits = torch.cat(logits_per_layer, dim=0).double()
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    num_total = logits.shape[1]
    one_hot = torch.nn.functional.one_hot(chosen, num_total).double()  # [N, k, E]
    assert top_k <= num_true  # the no-op condition of the null line
    per_slot = one_hot.mean(dim=0)  # [k, E]
    return float((per_slot * probs.mean(dim=0)[None]).sum() * num_total)


def released_llama_lora_reference(logits_per_layer, top_k, num_true):
    """AdaMoE exp_1 (MoLA `load_balancing_loss_func`): per layer, counts over all slots, the null experts'
    counts replaced by their mean, f = counts / sum(counts), P = mean softmax, E_total * sum f * P; summed."""
    total = 0.0
    for logits in logits_per_layer:
        probs = torch.softmax(logits.double(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        counts = torch.nn.functional.one_hot(chosen, logits.shape[1]).double().sum(dim=0)
        counts[num_true:] = counts[num_true:].mean()
        f = counts / counts.sum()
        total += float((f * probs.mean(dim=0)).sum() * logits.shape[1])
    return total


def record(logits, top_k, num_true):
    return {"router_logits": logits, "topk_indices": torch.topk(logits, top_k, dim=-1).indices,
            "num_true_experts": num_true, "num_null_experts": logits.shape[1] - num_true, "top_k": top_k,
            "dropped": None, "topk_weights": None}


def preset_loss(records, preset, mask=None):
    p = LB_PRESETS[preset]
    return float(load_balancing_loss(records, mask, lb_null_mode=p["lb_null_mode"], lb_reduce=p["lb_reduce"],
                                     lb_fraction=p["lb_fraction"]))


# Two layers over [true0, true1, null2, null3], k=2, router probabilities chosen so softmax(log p) = p.
P1 = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.6, 0.1]]  # top-2: {0, 1}, {2, 1}
P2 = [[0.7, 0.05, 0.15, 0.1], [0.1, 0.6, 0.2, 0.1]]  # top-2: {0, 2}, {1, 2}
HAND = [record(torch.tensor(p, dtype=torch.float64).log(), 2, 2) for p in (P1, P2)]


def test_released_mixtral_preset_hand_value_with_nulls():
    # Pooled over both layers (4 rows): counts [2, 3, 3, 0] -> f = counts / 4 = [.5, .75, .75, 0];
    # P = column sums [1.3, 1.15, 1.15, .4] / 4 = [.325, .2875, .2875, .1];
    # every expert on its own: 4 * (.5*.325 + .75*.2875 + .75*.2875 + 0) = 4 * .59375 = 2.375.
    assert preset_loss(HAND, "released_mixtral") == pytest.approx(2.375, abs=1e-12)
    assert preset_loss(HAND, "released_mixtral") == pytest.approx(
        released_mixtral_reference([r["router_logits"] for r in HAND], 2, 2), abs=1e-12)
    assert LB_PRESETS["released_mixtral"]["lb_coef"] == 1e-4 and LB_PRESETS["released_mixtral"]["z_coef"] == 0.0


def test_released_llama_lora_preset_hand_value_with_nulls():
    # Layer 1: counts [1, 2, 1, 0] -> nulls averaged [1, 2, .5, .5] / 4; P = [.25, .25, .4, .1]
    #   4 * (.25*.25 + .5*.25 + .125*.4 + .125*.1) = 4 * .25 = 1.0
    # Layer 2: counts [1, 1, 2, 0] -> [1, 1, 1, 1] / 4; P sums to 1 -> 4 * .25 = 1.0. Sum over layers: 2.0.
    assert preset_loss(HAND, "released_llama_lora") == pytest.approx(2.0, abs=1e-12)
    assert preset_loss(HAND, "released_llama_lora") == pytest.approx(
        released_llama_lora_reference([r["router_logits"] for r in HAND], 2, 2), abs=1e-12)
    assert LB_PRESETS["released_llama_lora"]["lb_coef"] == 1e-3


@pytest.mark.parametrize("preset,reference", [("released_mixtral", released_mixtral_reference),
                                              ("released_llama_lora", released_llama_lora_reference)])
def test_presets_match_the_released_formulas_on_random_routing_with_nulls(preset, reference):
    torch.manual_seed(3)
    logits = [torch.randn(12, 8 + 16, dtype=torch.float64) for _ in range(3)]  # 8 true + 16 null, k=4
    ours = preset_loss([record(x, 4, 8) for x in logits], preset)
    assert ours == pytest.approx(reference(logits, 4, 8), rel=1e-12)


def test_released_mixtral_preset_equals_transformers_mixtral_loss():
    """No null experts: the preset is transformers' own `load_balancing_loss_func`, padding mask included."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    logits = [torch.randn(10, 6) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for attention_mask in (None, mask):
        hf = float(load_balancing_loss_func(tuple(logits), 6, 2, attention_mask))
        assert preset_loss([record(x, 2, 6) for x in logits], "released_mixtral", attention_mask) == \
            pytest.approx(hf, rel=1e-6)


def test_released_mixtral_preset_equals_the_aux_loss_of_a_transformers_mixtral_forward():
    """Through the models: a tiny HF Mixtral's own `aux_loss` (router_aux_loss_coef * load_balancing_loss_func
    over all layers) against the preset's weighted loss of the same model retrofitted with 0 null experts."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                        output_router_logits=True, router_aux_loss_coef=LB_PRESETS["released_mixtral"]["lb_coef"])
    hf = MixtralForCausalLM(cfg).eval()
    ours = copy.deepcopy(hf)
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, labels=ids)
        lm_only = out.loss - out.aux_loss * cfg.router_aux_loss_coef
        retrofit(ours, num_null_experts=0)
        ours(input_ids=ids, attention_mask=mask)
    p = LB_PRESETS["released_mixtral"]
    aux = collect_moe_aux_losses(ours, mask, p["lb_null_mode"], p["lb_reduce"], p["lb_fraction"])
    assert float(aux["lb"]) == pytest.approx(float(out.aux_loss), rel=1e-5)
    assert float(p["lb_coef"] * aux["lb"] + lm_only) == pytest.approx(float(out.loss), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# the preset as a config key, and through the module's loss


def test_preset_sets_the_keys_and_conflicting_keys_are_config_errors():
    cfg = load_config("adamoe", ["adamoe.lb_preset=released_mixtral"])
    assert (cfg.adamoe.lb_coef, cfg.adamoe.z_coef, cfg.adamoe.lb_reduce, cfg.adamoe.lb_null_mode,
            cfg.adamoe.lb_fraction) == (1e-4, 0.0, "concat", "none", "tokens")
    cfg = load_config("adamoe", ["adamoe.lb_preset=released_llama_lora", "adamoe.lb_coef=0.001"])  # same value
    assert (cfg.adamoe.lb_coef, cfg.adamoe.lb_reduce, cfg.adamoe.lb_null_mode, cfg.adamoe.lb_fraction) == \
        (1e-3, "per_layer_sum", "average", "slots")
    custom = load_config("adamoe", ["adamoe.lb_coef=0.05", "adamoe.lb_reduce=concat"])
    assert custom.adamoe.lb_preset == "custom"
    assert (custom.adamoe.lb_coef, custom.adamoe.lb_reduce, custom.adamoe.lb_null_mode) == (0.05, "concat", "average")
    with pytest.raises(ConfigError, match="adamoe.lb_coef=0.01 conflicts with adamoe.lb_preset=released_mixtral"):
        load_config("adamoe", ["adamoe.lb_preset=released_mixtral", "adamoe.lb_coef=0.01"])
    with pytest.raises(ConfigError, match="lb_null_mode=average conflicts"):
        load_config("adamoe", ["adamoe.lb_preset=released_mixtral", "adamoe.lb_null_mode=average"])
    with pytest.raises(ConfigError, match="z_coef=0.001 conflicts"):
        load_config("adamoe", ["adamoe.lb_preset=released_llama_lora", "adamoe.z_coef=1e-3"])
    with pytest.raises(ConfigError, match="lb_preset must be one of"):
        load_config("adamoe", ["adamoe.lb_preset=paper"])
    with pytest.raises(ConfigError, match="lb_fraction must be one of"):
        load_config("adamoe", ["adamoe.lb_fraction=rows"])
    # the fine-tuning recipe (the paper's Mixtral set-up) defaults to the released Mixtral run
    finetune = load_config("adamoe_finetune", [])
    assert finetune.adamoe.lb_preset == "released_mixtral" and finetune.adamoe.lb_coef == 1e-4


class _TwoLayers(torch.nn.Module):
    """Two identity-router blocks (router logits = the input) run on their own inputs."""

    def __init__(self):
        super().__init__()
        cfg = MoEConfig(hidden_size=4, intermediate_size=3, num_experts=2, num_null_experts=2, top_k=2)
        self.blocks = torch.nn.ModuleList([SparseMoEBlock(cfg).double(), SparseMoEBlock(cfg).double()])
        with torch.no_grad():
            for b in self.blocks:
                b.gate.weight.copy_(torch.eye(4, dtype=torch.float64)[:2])
                b.gate.null_gate.weight.copy_(torch.eye(4, dtype=torch.float64)[2:])

    def forward(self, xs):
        return [b(x) for b, x in zip(self.blocks, xs)]


@pytest.mark.parametrize("preset,raw", [("released_mixtral", 2.375), ("released_llama_lora", 2.0)])
def test_module_adds_the_preset_weighted_loss(preset, raw):
    from recipes.adamoe.module import AdaMoEModule

    cfg = load_config("adamoe", [f"adamoe.lb_preset={preset}"])
    module = AdaMoEModule.__new__(AdaMoEModule)
    torch.nn.Module.__init__(module)
    module.model = _TwoLayers()
    for key, value in AdaMoEModule.config_options(cfg).items():
        setattr(module, key, value)
    module.model([torch.tensor(p, dtype=torch.float64).log() for p in (P1, P2)])
    losses = module.extra_losses({}, None)
    assert set(losses) == {"moe_lb"}  # neither release has a z-loss
    assert float(losses["moe_lb"].detach()) == pytest.approx(LB_PRESETS[preset]["lb_coef"] * raw, rel=1e-12)
    assert float(module._raw_aux["lb"]) == pytest.approx(raw, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# renormalize_true on Qwen2-MoE / OLMoE (norm_topk_prob=False)

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)


def tiny_qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**TINY, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                               num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                                               norm_topk_prob=False)).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.normal_(0, 0.5)
        model.model.layers[0].mlp.experts.down_proj.normal_(0, 0.3)
    return model


def tiny_olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    model = OlmoeForCausalLM(OlmoeConfig(**TINY, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                                         eos_token_id=1, pad_token_id=0, bos_token_id=2)).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.normal_(0, 0.5)
    return model


def hand_mixture(hf_block, null_weight, x, top_k, renormalise):
    """The mixture written out: logits [true gate | null gate], softmax over all 4 + 2 experts, top-k; weights
    p_e (renormalise: p_e / sum of the chosen TRUE p) for true slots, 0 for null slots; each chosen true expert
    computed longhand from transformers' own expert tensors (down(silu(gate x) * up x)), token by token, plus
    Qwen2-MoE's gated shared expert."""
    num_true = hf_block.gate.weight.shape[0]
    logits = torch.cat([x @ hf_block.gate.weight.T, x @ null_weight.T], dim=-1)
    p = torch.softmax(logits, dim=-1)
    top_p, top_i = torch.topk(p, top_k, dim=-1)
    is_true = top_i < num_true
    w = torch.where(is_true, top_p, torch.zeros_like(top_p))
    if renormalise:
        s = w.sum(-1, keepdim=True)
        w = w / torch.where(s > 0, s, torch.ones_like(s))
    gate_up, down = hf_block.experts.gate_up_proj, hf_block.experts.down_proj
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = int(top_i[t, j])
            if e < num_true:
                gate, up = (gate_up[e] @ x[t]).chunk(2)
                out[t] += w[t, j] * (down[e] @ (torch.nn.functional.silu(gate) * up))
    if getattr(hf_block, "shared_expert", None) is not None:
        out = out + torch.sigmoid(hf_block.shared_expert_gate(x)) * hf_block.shared_expert(x)
    return out, is_true


@pytest.mark.parametrize("factory", [tiny_qwen2_moe, tiny_olmoe])
@pytest.mark.parametrize("setting,renormalise", [("auto", True), ("true", True), ("false", False)])
def test_retrofitted_qwen2_moe_and_olmoe_mix_the_true_experts_as_written(factory, setting, renormalise):
    model = factory()
    hf_block = copy.deepcopy(model.model.layers[0].mlp)
    assert resolve_renormalize_true(model, setting, 2) is renormalise
    retrofit(model, num_null_experts=2, top_k=3, null_gate_init="random", seed=5, renormalize_true=setting)
    block = model.model.layers[0].mlp
    assert model.config.adamoe["renormalize_true"] == setting
    torch.manual_seed(1)
    x = torch.randn(40, 32)
    with torch.no_grad():
        expected, is_true = hand_mixture(hf_block, block.gate.null_gate.weight, x, 3, renormalise)
        got = block(x)
    assert 0 < int(is_true.sum()) < is_true.numel()  # some slots went to null experts
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if renormalise:  # the chosen true weights sum to 1 for tokens with a true expert
        sums = block.last_routing["topk_weights"].sum(-1)[is_true.any(-1)]
        torch.testing.assert_close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("factory", [tiny_qwen2_moe, tiny_olmoe])
def test_auto_without_nulls_keeps_the_models_own_unnormalised_weights(factory):
    model = factory()
    ids = torch.tensor([[3, 17, 42, 5, 9, 60, 1]])
    with torch.no_grad():
        reference = model(ids).logits
    assert resolve_renormalize_true(model, "auto", 0) is False  # norm_topk_prob=False: raw probabilities
    retrofit(model, num_null_experts=0, renormalize_true="auto")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=1e-6)


def test_recipe_rejects_a_renormalize_rule_other_than_the_retrofitted_checkpoints(tmp_path):
    import recipes.adamoe.module as adamoe

    model = tiny_olmoe()
    retrofit(model, num_null_experts=2, top_k=3, renormalize_true="false", seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    from transformers import OlmoeForCausalLM

    base = OlmoeForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    cfg = load_config("adamoe", [f"model.pretrained={tmp_path / 'ckpt'}", "model.arch=olmoe",
                                 "adamoe.num_null_experts=2", "adamoe.top_k=3", "adamoe.renormalize_true=true"])
    with pytest.raises(ConfigError, match="renormalize_true=false"):
        adamoe.prepare_model(cfg, base)
    base = OlmoeForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    cfg = load_config("adamoe", [f"model.pretrained={tmp_path / 'ckpt'}", "model.arch=olmoe",
                                 "adamoe.num_null_experts=2", "adamoe.top_k=3"])  # auto: the checkpoint's rule
    restored = adamoe.prepare_model(cfg, base)
    assert restored.model.layers[0].mlp.gate.norm_topk_prob is False


def test_old_checkpoints_without_the_key_keep_the_models_own_rule():
    from models.moe import saved_retrofit_settings

    model = tiny_qwen2_moe()
    retrofit(model, num_null_experts=2, top_k=3)
    del model.config.adamoe["renormalize_true"]
    assert saved_retrofit_settings(model)["renormalize_true"] == "false"  # Qwen2-MoE norm_topk_prob=False
