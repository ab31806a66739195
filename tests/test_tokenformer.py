"""TokenFormer: Pattention formula, growth (function preservation and its negative control), checkpoints."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from models.tokenformer import (
    Pattention,
    TokenFormerConfig,
    TokenFormerForCausalLM,
    grow_parameter_tokens,
)


def exact_gelu(z: torch.Tensor) -> torch.Tensor:
    # Written from the definition, not F.gelu: z * Phi(z).
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def reference_pattention(x, keys, values, norm, tau, eps):
    """Row-by-row reference of Theta(X K^T) V, written independently of the module."""
    out = torch.zeros(x.shape[0], values.shape[1], dtype=torch.float64)
    for i in range(x.shape[0]):
        scores = torch.stack([torch.dot(x[i], keys[j]) for j in range(keys.shape[0])])
        if norm == "l2_norm_gelu":
            weights = exact_gelu(scores / math.sqrt(float((scores**2).sum()) + eps) * tau)
        elif norm == "gelu_l2_norm":
            g = exact_gelu(scores)
            weights = g / math.sqrt(float((g**2).sum()) + eps) * tau
        else:
            e = torch.exp(scores - scores.max())
            weights = e / e.sum() * keys.shape[0]
        for j in range(keys.shape[0]):
            out[i] += weights[j] * values[j]
    return out


def tiny_model(seed: int = 0, dtype=torch.float64, **overrides) -> TokenFormerForCausalLM:
    torch.manual_seed(seed)
    return TokenFormerForCausalLM(TokenFormerConfig.from_name("tiny", **overrides)).to(dtype)


def random_ids(seed: int, batch: int = 2, seq: int = 12, vocab: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


# ---- Pattention --------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm", "softmax"])
def test_pattention_matches_independent_formula(norm):
    torch.manual_seed(1)
    layer = Pattention(5, 3, 7, norm=norm, eps=1e-6).double()
    with torch.no_grad():
        layer.key_tokens.normal_()
        layer.value_tokens.normal_()
    x = torch.randn(4, 5, dtype=torch.float64)
    expected = reference_pattention(x, layer.key_tokens.detach(), layer.value_tokens.detach(), norm,
                                    tau=math.sqrt(7), eps=1e-6)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_pattention_hand_computed_value():
    # x = [3, 4], K = I (n = 2): scores [3, 4], norm 5, tau sqrt(2) -> z = [0.6, 0.8] * sqrt(2).
    layer = Pattention(2, 1, 2, eps=0.0).double()
    with torch.no_grad():
        layer.key_tokens.copy_(torch.eye(2, dtype=torch.float64))
        layer.value_tokens.copy_(torch.tensor([[1.0], [10.0]], dtype=torch.float64))
    z = [0.6 * math.sqrt(2), 0.8 * math.sqrt(2)]
    gelu = [v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in z]
    expected = gelu[0] * 1.0 + gelu[1] * 10.0
    out = layer(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    assert out.item() == pytest.approx(expected, rel=1e-13)


def test_l2_norm_gelu_is_invariant_to_scaling_keys_and_gelu_l2_norm_is_not():
    torch.manual_seed(2)
    x = torch.randn(6, 8, dtype=torch.float64)
    outputs = {}
    for norm in ("l2_norm_gelu", "gelu_l2_norm"):
        layer = Pattention(8, 4, 10, norm=norm, eps=0.0).double()
        with torch.no_grad():
            layer.key_tokens.normal_()
            layer.value_tokens.normal_()
        base = layer(x)
        with torch.no_grad():
            layer.key_tokens.mul_(7.5)  # positive pre-scale of X K^T
        outputs[norm] = (base, layer(x))
    torch.testing.assert_close(*outputs["l2_norm_gelu"], rtol=1e-12, atol=1e-12)
    # Negative control: GeLU before the norm sees the scale.
    assert not torch.allclose(*outputs["gelu_l2_norm"], rtol=1e-6, atol=1e-6)


def test_pattention_computes_norm_in_fp32_for_bf16():
    torch.manual_seed(3)
    layer = Pattention(16, 16, 32)
    x = torch.randn(4, 16)
    full = layer.token_weights(x)
    half = layer.to(torch.bfloat16).token_weights(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=2e-2, atol=2e-2)
    assert layer.tau == math.sqrt(32)  # the integer tau count survives the cast


def test_pattention_rejects_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        Pattention(4, 4, 4, norm="relu")
    with pytest.raises(ValueError, match="tau"):
        Pattention(4, 4, 4, tau="fixed")
    with pytest.raises(ValueError, match="n_tokens"):
        Pattention(4, 4, 0)
    with pytest.raises(ValueError, match="last dim 4"):
        Pattention(4, 4, 4)(torch.randn(2, 5))


# ---- config and model ----------------------------------------------------------------------------


def test_named_sizes_match_the_paper_table():
    table = {"150m": (12, 768, 12, 768, 3072), "450m": (24, 1024, 16, 1024, 4096),
             "900m": (32, 1280, 16, 1280, 5120), "1_5b": (40, 1536, 16, 1536, 6144)}
    for name, sizes in table.items():
        c = TokenFormerConfig.from_name(name)
        assert (c.num_layers, c.hidden_size, c.num_heads, c.qkv_tokens, c.ffn_tokens) == sizes
    with pytest.raises(ValueError, match="known sizes: tiny, small"):
        TokenFormerConfig.from_name("7b")
    with pytest.raises(ValueError, match="not divisible"):
        TokenFormerConfig.from_name("tiny", num_heads=3)


def test_parameter_count_is_16nd_per_layer():
    config = TokenFormerConfig(vocab_size=50, num_layers=3, hidden_size=24, num_heads=4, qkv_tokens=10,
                               ffn_tokens=40, max_seq_len=16)
    model = TokenFormerForCausalLM(config)
    n, d = 10, 24
    per_layer = 4 * n * (d + d) + 4 * n * (d + d)  # Q, K, V, out + FFN with 4n tokens
    assert per_layer == 16 * n * d
    for layer in model.layers:
        assert sum(p.numel() for p in layer.parameters()) == 16 * n * d
    # Tied embedding counted once; the final LayerNorm's weight and bias are the only other parameters.
    assert model.num_parameters() == 50 * d + 3 * 16 * n * d + 2 * d
    assert model.num_parameters(exclude_embeddings=True) == 3 * 16 * n * d + 2 * d
    assert [name for name, _ in model.named_parameters() if "bias" in name] == ["final_norm.bias"]
    weight_only = TokenFormerForCausalLM(TokenFormerConfig(**{**config.to_dict(), "final_norm_bias": False}))
    assert weight_only.num_parameters() == 50 * d + 3 * 16 * n * d + d
    assert not any("bias" in name for name, _ in weight_only.named_parameters())


def test_final_norm_is_layernorm_with_weight_and_bias_as_the_official_code():
    # The official model's final norm is torch LayerNorm(d) with weight and bias (final_norm: layernorm);
    # checked against the definition (h - mean) / sqrt(var + eps) * w + b written out here.
    model = tiny_model(seed=2)
    with torch.no_grad():
        model.final_norm.weight.normal_()
        model.final_norm.bias.normal_()
    captured = {}
    model.final_norm.register_forward_hook(lambda m, inputs, out: captured.update(x=inputs[0], y=out))
    model(random_ids(3))
    x, y = captured["x"], captured["y"]
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * model.final_norm.weight + model.final_norm.bias
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="final_norm_bias must be true or false"):
        TokenFormerConfig.from_name("tiny", final_norm_bias="yes")


def test_checkpoint_without_final_norm_bias_loads_as_zero_bias(tmp_path):
    # The first form of this model: a weight-only final LayerNorm, and config.json without the key.
    old = tiny_model(seed=5, final_norm_bias=False)
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["final_norm_bias"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "final_norm.bias" not in load_file(str(tmp_path / "model.safetensors"))
    loaded = TokenFormerForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.final_norm_bias is True
    assert torch.equal(loaded.final_norm.bias, torch.zeros(32, dtype=torch.float64))
    ids = random_ids(8)
    assert torch.equal(loaded(ids).logits, old(ids).logits)
    # Inside another module (a Lightning checkpoint's "model." prefix), strict loading works too.
    wrapper, old_wrapper = torch.nn.Module(), torch.nn.Module()
    wrapper.model, old_wrapper.model = tiny_model(seed=6), old
    wrapper.load_state_dict(old_wrapper.state_dict(), strict=True)
    assert torch.equal(wrapper.model(ids).logits, old(ids).logits)


def test_init_scales():
    torch.manual_seed(0)
    config = TokenFormerConfig(vocab_size=16, num_layers=4, hidden_size=256, num_heads=4, qkv_tokens=256,
                               ffn_tokens=1024, max_seq_len=16)
    model = TokenFormerForCausalLM(config)
    keys = torch.cat([p.key_tokens.flatten() for p in model.pattentions().values()])
    values = torch.cat([p.value_tokens.flatten() for p in model.pattentions().values()])
    assert keys.std().item() == pytest.approx(0.02, rel=0.02)
    assert values.std().item() == pytest.approx(2 / (4 * math.sqrt(256)), rel=0.02)


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = tiny_model()
    ids = random_ids(0, batch=2, seq=9)
    labels = ids.clone()
    labels[0, 3] = -100
    labels[1, -1] = -100
    out = model(ids, labels=labels)
    log_probs = torch.log_softmax(out.logits, dim=-1)
    terms = []
    for b in range(2):
        for t in range(8):
            target = labels[b, t + 1].item()
            if target != -100:
                terms.append(-log_probs[b, t, target])
    assert len(terms) == 14
    torch.testing.assert_close(out.loss, torch.stack(terms).mean(), rtol=1e-12, atol=1e-12)


def test_causal_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    ids = random_ids(1, seq=16)
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 64
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_left_padding_with_mask_matches_unpadded():
    # Rotary attention depends only on relative positions and Pattention is per token, so masked
    # left padding must not change the real tokens' logits.
    model = tiny_model()
    ids = random_ids(2, batch=1, seq=10)
    padded = torch.cat([torch.zeros(1, 4, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 10)], dim=1).long()
    expected = model(ids).logits
    got = model(padded, attention_mask=mask).logits[:, 4:]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # Negative control: without the mask the padding is attended to.
    assert not torch.allclose(model(padded).logits[:, 4:], expected, rtol=1e-6, atol=1e-6)


def test_rotary_fraction_is_quarter_of_head_dims():
    config = TokenFormerConfig.from_name("small")  # head_dim 32
    assert config.rotary_dims == 8


def test_partial_rotary_matches_hand_rotation():
    from models.tokenformer import apply_partial_rotary, rotary_cos_sin

    # head_dim 8, 4 rotated dims: pairs (0, 2) with frequency 1 and (1, 3) with 10000^(-2/4) = 0.01.
    x = torch.randn(1, 1, 3, 8, dtype=torch.float64)
    cos, sin = rotary_cos_sin(3, 4, 10000.0, x.device, x.dtype)
    out = apply_partial_rotary(x, cos, sin)
    for pos in range(3):
        v, o = x[0, 0, pos], out[0, 0, pos]
        for i, j, freq in ((0, 2, 1.0), (1, 3, 0.01)):
            a = pos * freq
            assert o[i].item() == pytest.approx(v[i].item() * math.cos(a) - v[j].item() * math.sin(a), abs=1e-12)
            assert o[j].item() == pytest.approx(v[j].item() * math.cos(a) + v[i].item() * math.sin(a), abs=1e-12)
        assert torch.equal(o[4:], v[4:])  # the other 75% of the head dims pass through


def test_tiny_model_loss_falls_with_adamw():
    torch.manual_seed(0)
    model = TokenFormerForCausalLM(TokenFormerConfig.from_name("tiny"))
    ids = random_ids(3, batch=4, seq=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(64), rel=0.1)  # near-uniform at init
    assert losses[-1] < 0.6 * losses[0]


# ---- growth ------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm"])
def test_zero_key_frozen_growth_preserves_logits(norm):
    model = tiny_model(norm=norm)
    ids = random_ids(4)
    before = model(ids).logits
    grow_parameter_tokens(model, {"qkv_tokens": 24, "ffn_tokens": 100}, init="zero_key", tau="frozen")
    assert model.layers[0].query.n_tokens == 24 and model.layers[1].ffn.n_tokens == 100
    assert model.layers[0].query.tau == math.sqrt(16) and model.layers[0].ffn.tau == math.sqrt(64)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-10, atol=1e-12)


def test_zero_key_growth_with_auto_tau_changes_logits():
    model = tiny_model()
    ids = random_ids(4)
    before = model(ids).logits
    grow_parameter_tokens(model, {"qkv_tokens": 24, "ffn_tokens": 100}, init="zero_key", tau="auto")
    assert model.layers[0].query.tau == math.sqrt(24)
    assert not torch.allclose(model(ids).logits, before, rtol=1e-6, atol=1e-6)


def test_random_growth_changes_logits_and_config_is_updated():
    model = tiny_model()
    ids = random_ids(4)
    before = model(ids).logits
    grown = grow_parameter_tokens(model, TokenFormerConfig.from_name("tiny", qkv_tokens=20, ffn_tokens=80),
                                  init="random", tau="frozen")
    assert grown is model
    assert (model.config.qkv_tokens, model.config.ffn_tokens, model.config.tau) == (20, 80, "frozen")
    assert not torch.allclose(model(ids).logits, before, rtol=1e-6, atol=1e-6)


def test_released_growth_matches_the_official_recipe_re_derived():
    # The official growth (incremental-scaling configs): the larger model is built with its usual init
    # (keys N(0, 0.02), values "wang" N(0, 2 / (L sqrt d))), the trained tokens are copied into the first
    # rows, and every Pattention uses tau = sqrt(its new n). Re-derived here: the same generator draws, the
    # concatenated tokens, and the Pattention formula of `reference_pattention` with tau = sqrt(n_new).
    model = tiny_model(seed=9)
    old = {name: (p.key_tokens.detach().clone(), p.value_tokens.detach().clone())
           for name, p in model.pattentions().items()}
    grow_parameter_tokens(model, {"qkv_tokens": 24, "ffn_tokens": 96}, init="released",
                          generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for name, p in model.pattentions().items():  # the growth order: layers, then query/key/value/output/ffn
        keys, values = old[name]
        n_new = 96 if name.endswith("ffn") else 24
        new_keys = torch.empty(n_new - keys.shape[0], 32, dtype=torch.float64).normal_(0.0, 0.02, generator=g)
        new_values = torch.empty(n_new - keys.shape[0], 32, dtype=torch.float64).normal_(
            0.0, 2 / (2 * math.sqrt(32)), generator=g)
        all_keys, all_values = torch.cat([keys, new_keys]), torch.cat([values, new_values])
        assert torch.equal(p.key_tokens.detach(), all_keys) and torch.equal(p.value_tokens.detach(), all_values)
        assert p.tau == math.sqrt(n_new) and p.tau_mode == "auto"
        expected = reference_pattention(x, all_keys, all_values, "l2_norm_gelu", math.sqrt(n_new), 1e-6)
        torch.testing.assert_close(p(x), expected, rtol=1e-9, atol=1e-12)
    assert (model.config.qkv_tokens, model.config.ffn_tokens, model.config.tau) == (24, 96, "auto")
    with pytest.raises(ValueError, match="official growth, which sets tau"):
        grow_parameter_tokens(tiny_model(), {"qkv_tokens": 20}, init="released", tau="frozen")


def test_new_tokens_get_gradients_after_zero_key_growth():
    model = tiny_model()
    old_keys = {name: p.key_tokens.detach().clone() for name, p in model.pattentions().items()}
    grow_parameter_tokens(model, {"qkv_tokens": 20, "ffn_tokens": 72}, init="zero_key", tau="frozen")
    ids = random_ids(5)
    model(ids, labels=ids).loss.backward()
    for name, p in model.pattentions().items():
        n_old = old_keys[name].shape[0]
        assert torch.equal(p.key_tokens.detach()[:n_old], old_keys[name])
        assert (p.key_tokens.detach()[n_old:] == 0).all()
        # Keys learn at once (d/dA GeLU(0) = 1/2, times the random values) ...
        assert p.key_tokens.grad[n_old:].abs().sum(dim=1).gt(0).all(), name
        # ... values only once the keys have moved: their weights GeLU(0) are exactly 0 now.
        assert (p.value_tokens.grad[n_old:] == 0).all(), name
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.step()
    optimizer.zero_grad()
    model(ids, labels=ids).loss.backward()
    for name, p in model.pattentions().items():
        n_old = old_keys[name].shape[0]
        assert p.value_tokens.grad[n_old:].abs().sum() > 0, name


def test_growth_refuses_untrainable_init_shrinking_and_other_changes():
    model = tiny_model()
    with pytest.raises(ValueError, match="untrainable"):
        grow_parameter_tokens(model, {"qkv_tokens": 20}, init="zero")
    with pytest.raises(ValueError, match="cannot shrink qkv_tokens from 16 to 8"):
        grow_parameter_tokens(model, {"qkv_tokens": 8})
    with pytest.raises(ValueError, match="unknown token counts"):
        grow_parameter_tokens(model, {"hidden_size": 64})
    with pytest.raises(ValueError, match="hidden_size"):
        grow_parameter_tokens(model, TokenFormerConfig.from_name("tiny", hidden_size=64))
    with pytest.raises(ValueError, match="init="):
        grow_parameter_tokens(model, {"qkv_tokens": 20}, init="xavier")
    assert model.layers[0].query.n_tokens == 16  # nothing changed by the refused calls


# ---- checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_round_trip_gives_identical_logits(tmp_path, dtype):
    model = tiny_model(dtype=dtype)
    model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["model_type"] == "tokenformer" and saved_config["qkv_tokens"] == 16
    loaded = TokenFormerForCausalLM.from_pretrained(tmp_path)
    assert loaded.embed_tokens.weight.dtype == dtype
    assert loaded.config == model.config
    ids = random_ids(6)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_grown_frozen_model_round_trips(tmp_path):
    model = tiny_model()
    grow_parameter_tokens(model, {"qkv_tokens": 24}, init="zero_key", tau="frozen")
    model.save_pretrained(tmp_path)
    loaded = TokenFormerForCausalLM.from_pretrained(tmp_path)
    assert loaded.layers[0].query.tau == math.sqrt(16)  # the frozen tau came back with the weights
    ids = random_ids(7)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_growth_from_saved_model_copies_rows_exactly(tmp_path):
    tiny_model(seed=3).save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    model = TokenFormerForCausalLM.from_pretrained(tmp_path)
    grow_parameter_tokens(model, {"qkv_tokens": 32, "ffn_tokens": 128}, init="random", tau="auto",
                          generator=torch.Generator().manual_seed(0))
    grown = model.state_dict()
    for name, tensor in stored.items():
        if name.endswith(("key_tokens", "value_tokens")):
            assert grown[name].shape[0] == 2 * tensor.shape[0]
            assert torch.equal(grown[name][: tensor.shape[0]], tensor), name
            assert grown[name][tensor.shape[0]:].abs().sum() > 0, name
        elif name.endswith("tau_token_count"):
            assert int(grown[name]) == 2 * int(tensor)
        else:
            assert torch.equal(grown[name], tensor), name


def test_checkpoint_with_other_sizes_names_both(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["qkv_tokens"] = 32
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layers\.0\.key\.key_tokens: checkpoint holds shape \(16, 32\), "
                                         r"config expects \(32, 32\)"):
        TokenFormerForCausalLM.from_pretrained(tmp_path)
    config["model_type"] = "llama"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type='llama'"):
        TokenFormerForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        TokenFormerForCausalLM.from_pretrained(tmp_path / "missing")
