"""Routing probe (models/routing_probe/): hooks on every MoE block, capacity drops, analyses.

Expectations are independent of the probe: hand-computed batches, HF's own router logits
(output_router_logits=True), a numpy simulation of uniform routing, closed forms.
"""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from models import routing_probe as rp
from models.factory import ModelSpec, build_model
from models.moe import MoEConfig, SparseMoEBlock, retrofit

VOCAB = 64


def _hf(arch, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model(ModelSpec(arch=arch, size="tiny", vocab_size=VOCAB, max_seq_len=32,
                                  overrides=dict(overrides)))
    model.eval()
    if arch in ("qwen2_moe", "olmoe"):  # these init the router weight to zeros: give it a real spread
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p.normal_(0.0, 0.5)
    return model


class TableRouter(nn.Module):
    """Routes by token id: hidden[:, 0] carries the id, `table[id]` is the expert list (HF router triple)."""

    def __init__(self, table: torch.Tensor, num_experts: int) -> None:
        super().__init__()
        self.register_buffer("table", table.long())
        self.num_experts = num_experts
        self.top_k = table.shape[1]

    def forward(self, hidden):
        ids = hidden.reshape(-1, hidden.shape[-1])[:, 0].round().long()
        experts = self.table[ids]
        logits = torch.zeros(ids.shape[0], self.num_experts).scatter(1, experts, 1.0)
        weights = torch.full(experts.shape, 1.0 / experts.shape[1])
        return logits, weights, experts


class RandomRouter(nn.Module):
    """k distinct experts uniformly at random per token occurrence, from a seeded generator."""

    def __init__(self, num_experts: int, top_k: int, seed: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, hidden):
        n = hidden.reshape(-1, hidden.shape[-1]).shape[0]
        logits = torch.rand(n, self.num_experts, generator=self.generator)
        experts = logits.topk(self.top_k, dim=-1).indices
        return logits, torch.full(experts.shape, 1.0 / self.top_k), experts


class IdModel(nn.Module):
    """Embedding whose first feature is the token id, then one SparseMoEBlock (its gate may be replaced)."""

    def __init__(self, vocab: int, num_experts: int, top_k: int, gate: nn.Module = None,
                 capacity_factor=None, hidden: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        with torch.no_grad():
            self.embed.weight.normal_(0, 0.1)
            self.embed.weight[:, 0] = torch.arange(vocab, dtype=torch.float32)
        self.block = SparseMoEBlock(MoEConfig(hidden_size=hidden, intermediate_size=8, num_experts=num_experts,
                                              top_k=top_k, capacity_factor=capacity_factor))
        if gate is not None:
            self.block.gate = gate

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.block(self.embed(input_ids))


def _hooks(model):
    keys = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
            "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
            "_load_state_dict_pre_hooks")
    return {name: {k: dict(getattr(m, k, {})) for k in keys} for name, m in model.named_modules()}


# ---------------------------------------------------------------------------------------------------
# Specialisation


def test_token_id_router_gives_specialisation_one():
    E, k = 4, 2
    ids = torch.arange(VOCAB)
    table = torch.stack([ids % E, (ids + 1) % E], dim=1)  # top-2 decided by token id alone
    model = IdModel(VOCAB, E, k, gate=TableRouter(table, E))
    torch.manual_seed(1)
    batch = torch.randint(0, VOCAB, (8, 32))
    with rp.RoutingProbe(model, max_positions=32) as probe:
        model(input_ids=batch)
    layer = probe.stats.layers[0]
    assert layer.specialisation("token", min_count=2) == 1.0
    # Same through the pure function with k (no null experts: occurrences = assignments / k).
    assert rp.token_id_specialisation(layer.counts_by_token, 2, top_k=k) == 1.0
    # Positions carry random ids, so they are far from specialised.
    assert layer.specialisation("position", 1) < 0.8
    # Exact per-id counts: id v sent to v%E and (v+1)%E once per occurrence.
    occ = torch.bincount(batch.reshape(-1), minlength=VOCAB).double()
    expected = torch.zeros(VOCAB, E, dtype=torch.float64)
    expected[ids, ids % E] += occ
    expected[ids, (ids + 1) % E] += occ
    assert torch.equal(layer.counts_by_token, expected)
    assert torch.equal(layer.tokens_by_token, occ)
    co = torch.zeros(E, E, dtype=torch.float64)
    for t in batch.reshape(-1).tolist():
        a, b = t % E, (t + 1) % E
        co[a, a] += 1
        co[b, b] += 1
        co[a, b] += 1
        co[b, a] += 1
    assert torch.equal(layer.coactivation, co)
    assert torch.equal(layer.load, co.diagonal())
    top = rp.top_tokens_per_expert(layer.counts_by_token, k=3)
    for e, tokens in enumerate(top):
        for t in tokens:
            assert t % E in (e, (e - 1) % E)


def _simulate_uniform(m: int, E: int, k: int, reps: int, seed: int):
    """numpy: m occurrences each picking k distinct experts uniformly; mean modal share and mean std."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((reps, E))
    for _ in range(m):
        picks = np.argsort(rng.random((reps, E)), axis=1)[:, :k]
        np.add.at(counts, (np.arange(reps)[:, None], picks), 1)
    modal = counts.max(1) / m
    ratios = counts / (m * k)
    return modal.mean(), ratios.std(axis=1).mean(), np.sqrt((ratios.var(axis=1)).mean())


def test_uniform_random_router_matches_simulation():
    E, k, m, n_ids = 8, 2, 24, 48
    model = IdModel(n_ids, E, k, gate=RandomRouter(E, k, seed=3))
    ids = torch.arange(n_ids).repeat(m).reshape(m, n_ids)  # every id exactly m times
    with rp.RoutingProbe(model, max_positions=n_ids) as probe:
        model(input_ids=ids)
    layer = probe.stats.layers[0]
    spec = layer.specialisation("token", min_count=m)
    std = layer.std_vs_uniform("token", min_count=m)
    sim_modal, sim_std, sim_root_var = _simulate_uniform(m, E, k, reps=4000, seed=0)
    # Spread of a mean over n_ids groups: about sd(single)/sqrt(n_ids); sd(single modal share) < 0.1.
    assert abs(spec - sim_modal) < 3 * 0.1 / math.sqrt(n_ids)
    assert spec > k / E  # finite samples: above the infinite-sample k/E
    assert std["n_groups"] == n_ids
    # Closed form of the reference equals the simulated root of the expected variance.
    assert std["uniform_std"] == pytest.approx(math.sqrt((E - k) / (E * E * m * k)), rel=1e-12)
    assert std["uniform_std"] == pytest.approx(sim_root_var, rel=0.03)
    assert std["mean_std"] == pytest.approx(sim_std, rel=0.1)


def test_group_std_closed_form_and_specialised_groups():
    # A fully specialised group (all 10 assignments to one of E=4 experts): ratios (1,0,0,0), std sqrt(3)/4.
    counts = torch.tensor([[10.0, 0, 0, 0], [5, 5, 5, 5], [1, 0, 0, 0]])
    out = rp.group_std_vs_uniform(counts, min_count=5)  # k=1: the third group (1 occurrence) is excluded
    assert out["n_groups"] == 2
    assert out["mean_std"] == pytest.approx((math.sqrt(3) / 4 + 0.0) / 2)
    expected_uniform = (math.sqrt(3 / (16 * 10)) + math.sqrt(3 / (16 * 20))) / 2
    assert out["uniform_std"] == pytest.approx(expected_uniform)
    assert rp.token_id_specialisation(counts, 5) == pytest.approx((1.0 + 0.25) / 2)
    assert math.isnan(rp.token_id_specialisation(counts, 100))


# ---------------------------------------------------------------------------------------------------
# Capacity


# Two rows of two positions, flattened batch-major: t0=(row0,pos0) t1=(row0,pos1) t2=(row1,pos0) t3=(row1,pos1).
EXPERTS = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
POSITIONS = torch.tensor([0, 1, 0, 1])
# E=2, k=2, T=4, cf=0.5: C = ceil(0.5 * 4 * 2 / 2) = 2 per expert.
# position priority: expert 0 queue t0s0, t2s1, t1s0, t3s0 -> drops t1s0, t3s0; expert 1: t0s1, t2s0, t1s1, t3s1.
DROP_POSITION = torch.tensor([[False, False], [True, True], [False, False], [True, True]])
# slot priority: expert 0 queue t0s0, t1s0, t3s0, t2s1 -> drops t3s0, t2s1; expert 1: t2s0, t0s1, t1s1, t3s1.
DROP_SLOT = torch.tensor([[False, False], [False, True], [False, True], [True, True]])


def test_capacity_drops_hand_computed():
    assert torch.equal(rp.capacity_drops(EXPERTS, POSITIONS, 2, 0.5, "position"), DROP_POSITION)
    assert torch.equal(rp.capacity_drops(EXPERTS, POSITIONS, 2, 0.5, "slot"), DROP_SLOT)
    assert not rp.capacity_drops(EXPERTS, POSITIONS, 2, 1.0, "position").any()  # C = 4 >= every load
    # Null experts (index >= E) are neither counted nor dropped: E=1, C = ceil(1 * 3 * 2 / 1) ... use cf 1/3:
    # C = ceil(1/3 * 3 * 2 / 1) = 2; expert 0 queue t0s0, t1s1, t2s0 -> t2s0 dropped; nulls untouched.
    with_null = torch.tensor([[0, 1], [1, 0], [0, 1]])
    got = rp.capacity_drops(with_null, torch.tensor([0, 1, 2]), 1, 1 / 3, "position")
    assert torch.equal(got, torch.tensor([[False, False], [False, False], [True, False]]))
    with pytest.raises(ValueError, match="priority"):
        rp.capacity_drops(EXPERTS, POSITIONS, 2, 0.5, "random")
    with pytest.raises(ValueError, match="capacity_factor"):
        rp.capacity_drops(EXPERTS, POSITIONS, 2, 0.0)


@pytest.mark.parametrize("priority,drops,per_assignment,per_token", [
    ("position", DROP_POSITION, [0.0, 1.0], [0.0, 1.0]),
    ("slot", DROP_SLOT, [0.25, 0.75], [0.0, 0.5]),
])
def test_probe_drop_rates_on_dropless_model(priority, drops, per_assignment, per_token):
    # Token ids 0..3 route as EXPERTS; batch rows [0, 1] and [2, 3] give the flattened order above.
    model = IdModel(4, 2, 2, gate=TableRouter(EXPERTS, 2))
    probe = rp.RoutingProbe(model, capacity_factor=0.5, priority=priority, position_buckets=2, max_positions=2)
    with probe:
        model(input_ids=torch.tensor([[0, 1], [2, 3]]))
    assert torch.equal(probe.last[0].dropped, drops)
    assert torch.equal(probe.last[0].positions, POSITIONS)
    curve = rp.drop_rate_by_position(probe.stats, 0)
    assert curve["per_assignment"] == per_assignment
    assert curve["per_token"] == per_token
    assert curve["bucket_edges"] == [0, 1, 2]
    assert rp.drop_rate_by_position(probe.stats, probe.layers[0]) == curve


def test_probe_reports_real_drops_of_a_capacity_block():
    # The block itself drops (capacity_factor 0.5, batch-major priority): expert 0 queue t0s0, t1s0, t2s1, t3s0
    # -> drops t2s1, t3s0; expert 1 queue t0s1, t1s1, t2s0, t3s1 -> drops t2s0, t3s1. The probe's own factor
    # must not replace the real drops.
    model = IdModel(4, 2, 2, gate=TableRouter(EXPERTS, 2), capacity_factor=0.5)
    with rp.RoutingProbe(model, capacity_factor=0.5, priority="slot") as probe:
        model(input_ids=torch.tensor([[0, 1], [2, 3]]))
    real = torch.tensor([[False, False], [False, False], [True, True], [True, True]])
    assert torch.equal(probe.last[0].dropped, real)
    assert torch.equal(probe.last[0].weights[real], torch.zeros(4))


# ---------------------------------------------------------------------------------------------------
# Saturation


def test_router_saturation_self_and_permuted():
    model = _hf("mixtral")
    batch = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    with rp.RoutingProbe(model) as probe:
        model(input_ids=batch)
    first = [r.experts.clone() for r in probe.last]

    reloaded = _hf("mixtral", seed=99)
    reloaded.load_state_dict(model.state_dict())
    with rp.RoutingProbe(reloaded) as probe:
        reloaded(input_ids=batch)
    for a, b in zip(first, probe.last):
        assert rp.router_saturation(a, b.experts) == {"top1_agreement": 1.0, "topk_overlap": 1.0}

    # Swap experts 0 and 1 in layer 0's router: every choice e becomes pi(e). Layer 0's input is unchanged.
    gate = reloaded.model.layers[0].mlp.gate
    with torch.no_grad():
        gate.weight[[0, 1]] = gate.weight[[1, 0]].clone()
    with rp.RoutingProbe(reloaded) as probe:
        reloaded(input_ids=batch)
    a, b = first[0], probe.last[0].experts
    pi = torch.tensor([1, 0] + list(range(2, 8)))
    assert torch.equal(b, pi[a])
    k = a.shape[1]
    in01 = ((a == 0) | (a == 1)).sum(1)
    expected_top1 = float((a[:, 0] >= 2).double().mean())
    expected_overlap = float(torch.where(in01 == 1, (k - 1) / k, 1.0).double().mean())
    got = rp.router_saturation(a, b)
    assert got["top1_agreement"] == pytest.approx(expected_top1)
    assert got["topk_overlap"] == pytest.approx(expected_overlap)
    assert got["top1_agreement"] < 1.0
    with pytest.raises(ValueError, match="same tokens"):
        rp.router_saturation(a, b[:-1])


# ---------------------------------------------------------------------------------------------------
# Hooks on real models


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe"])
def test_hooks_see_every_layer_of_hf_models(arch):
    model = _hf(arch)
    batch = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(batch)
    mask[1, 9:] = 0  # right padding
    probe = rp.RoutingProbe(model, max_positions=12, position_buckets=3)
    with probe:
        out = model(input_ids=batch, attention_mask=mask, output_router_logits=True)
    n_layers = model.config.num_hidden_layers
    assert probe.layers == [f"model.layers.{i}.mlp" for i in range(n_layers)]
    assert [r.layer for r in probe.last] == list(range(n_layers))
    real = mask.reshape(-1).bool()
    k = model.config.num_experts_per_tok
    for record, logits in zip(probe.last, out.router_logits):
        # HF's own router logits, top-k of their softmax, real tokens only.
        expected = torch.softmax(logits.float(), -1).topk(k, dim=-1).indices[real]
        assert torch.equal(record.experts, expected)
        assert torch.equal(record.token_ids, batch.reshape(-1)[real])
        assert record.positions.tolist() == list(range(12)) + list(range(9)) + list(range(12))
    for layer in probe.stats.layers:
        assert layer.n_tokens == int(mask.sum())
        assert float(layer.load.sum()) == int(mask.sum()) * k
        assert float(layer.drops_by_bucket["assignments_dropped"].sum()) == 0.0  # dropless, no factor given


def test_hooks_on_retrofitted_sparse_blocks_skip_null_experts():
    model = retrofit(_hf("mixtral"), num_null_experts=4, seed=0)
    batch = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with rp.RoutingProbe(model, capacity_factor=1.0) as probe:
        model(input_ids=batch)
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseMoEBlock)]
    assert probe.layers == [n for n, _ in blocks] and len(blocks) == model.config.num_hidden_layers
    saw_null = False
    for record, (_, block), layer in zip(probe.last, blocks, probe.stats.layers):
        assert torch.equal(record.experts, block.last_routing["topk_indices"])
        true = record.experts < block.num_true_experts
        saw_null |= bool((~true).any())
        assert layer.num_experts == 8 and float(layer.load.sum()) == float(true.sum())
        assert not (record.dropped & ~true).any()  # null slots are never dropped
        assert float(layer.drops_by_bucket["assignments_total"].sum()) == float(true.sum())
        # Occurrence-based specialisation never exceeds 1 even with null slots.
        assert layer.specialisation("token", 1) <= 1.0
    assert saw_null


def test_hooks_on_repository_openmoe_model():
    from models.openmoe import OpenMoEConfig, OpenMoEForCausalLM

    torch.manual_seed(0)
    cfg = OpenMoEConfig(vocab_size=VOCAB)
    model = OpenMoEForCausalLM(cfg).train()  # training capacity factor: the blocks drop for real
    batch = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with rp.RoutingProbe(model) as probe, torch.no_grad():
        model(input_ids=batch)
    assert len(probe.layers) == len(cfg.moe_layers) == len(probe.last) == len(model.moe_blocks()) > 0
    for record, block in zip(probe.last, model.moe_blocks()):
        expected = block.last_routing["dropped"]
        expected = torch.zeros_like(record.dropped) if expected is None else expected
        assert torch.equal(record.dropped, expected)


# ---------------------------------------------------------------------------------------------------
# Detach, memory, domains, padding, merge, errors


def test_detach_restores_model_exactly():
    model = _hf("qwen2_moe")
    batch = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    hooks_before = _hooks(model)
    logits_before = model(input_ids=batch).logits
    probe = rp.RoutingProbe(model, capacity_factor=1.25).attach()
    assert _hooks(model) != hooks_before
    logits_probed = model(input_ids=batch).logits
    probe.detach()
    assert _hooks(model) == hooks_before
    logits_after = model(input_ids=batch).logits
    assert torch.equal(logits_before, logits_probed) and torch.equal(logits_before, logits_after)
    state = probe.stats.state_dict()
    n_forwards, last = probe.stats.n_forwards, probe.last
    model(input_ids=batch)  # detached: nothing runs
    assert probe.stats.n_forwards == n_forwards and probe.last is last
    assert torch.equal(probe.stats.layers[0].load, state["layers"][0]["load"])
    with probe:  # re-attachable
        model(input_ids=batch)
    assert probe.stats.n_forwards == n_forwards + 1
    assert _hooks(model) == hooks_before


def test_aggregates_do_not_grow_with_forwards():
    model = _hf("olmoe")
    gen = torch.Generator().manual_seed(5)
    probe = rp.RoutingProbe(model, capacity_factor=1.0, max_positions=16).attach()
    probe.set_domains(torch.tensor([0, 1]), ["a", "b"])
    model(input_ids=torch.randint(0, VOCAB, (2, 16), generator=gen))
    size = probe.stats.tensors_numel()
    for _ in range(6):
        model(input_ids=torch.randint(0, VOCAB, (2, 16), generator=gen))
    probe.detach()
    assert probe.stats.tensors_numel() == size
    assert len(probe.last) == model.config.num_hidden_layers
    assert all(r.experts.shape == (32, 2) for r in probe.last)
    assert probe.stats.layers[0].n_tokens == 7 * 32


def test_domains_padding_merge_and_report():
    E, k = 4, 2
    ids = torch.arange(VOCAB)
    model = IdModel(VOCAB, E, k, gate=TableRouter(torch.stack([ids % E, (ids + 1) % E], 1), E))
    batch_a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask_a = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])  # left padding: row 1 starts at position 0 on token 6
    batch_b = torch.tensor([[9, 9, 9, 9]])
    probe = rp.RoutingProbe(model, capacity_factor=0.5, max_positions=4, position_buckets=2)
    with probe:
        probe.set_domains(torch.tensor([0, 2]), ["x", "y", "z"])
        model(input_ids=batch_a, attention_mask=mask_a)
        assert probe.last[0].positions.tolist() == [0, 1, 2, 3, 0, 1, 2]
        assert probe.last[0].token_ids.tolist() == [1, 2, 3, 4, 6, 7, 8]
        probe.set_domains(torch.tensor([[1, 1, -1, -1]]))
        model(input_ids=batch_b)
    layer = probe.stats.layers[0]
    with probe:  # explicit position_ids win (generation with a cache); then back to the two batches' stats
        saved = probe.stats.state_dict()
        probe.set_domains(None)
        model(input_ids=batch_b[:, :2], position_ids=torch.tensor([[5, 6]]))
        assert probe.last[0].positions.tolist() == [5, 6]
        probe.stats = rp.RoutingStats.from_state_dict(saved)
    layer = probe.stats.layers[0]
    assert layer.tokens_by_domain.tolist() == [4.0, 2.0, 3.0]  # unlabelled (-1) tokens excluded
    assert layer.counts_by_domain[1].tolist() == [0.0, 2.0, 2.0, 0.0]  # token 9 -> experts 1, 2
    assert layer.specialisation("domain", 1) == pytest.approx((0.5 + 1.0 + 2 / 3) / 3)
    assert probe.stats.domain_names == ["x", "y", "z"]

    # Merging two probes' stats = one probe over both batches.
    p1, p2 = rp.RoutingProbe(model, capacity_factor=0.5, max_positions=4, position_buckets=2), \
        rp.RoutingProbe(model, capacity_factor=0.5, max_positions=4, position_buckets=2)
    with p1:
        p1.set_domains(torch.tensor([0, 2]), ["x", "y", "z"])
        model(input_ids=batch_a, attention_mask=mask_a)
    with p2:
        p2.set_domains(torch.tensor([[1, 1, -1, -1]]))
        model(input_ids=batch_b)
    merged = rp.RoutingStats.from_state_dict(p1.stats.state_dict()).merge(p2.stats)
    for key, value in probe.stats.layers[0].state_dict().items():
        other = merged.layers[0].state_dict()[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), key
        elif isinstance(value, dict):
            assert all(torch.equal(value[x], other[x]) for x in value), key
        else:
            assert value == other, key

    report = rp.analysis_report(probe.stats, tokenizer=type("T", (), {"decode": lambda self, t: f"<{t[0]}>"})())
    json.dumps(report)
    entry = report["layers"]["block"]
    assert entry["specialisation"]["token_id"] is None  # no id reaches min_token_count=5 occurrences
    assert entry["top_tokens"]["decoded"][1][0] == "<9>"
    probe.reset()
    assert probe.stats.layers[0].n_tokens == 0 and probe.last == []


def test_small_analyses_closed_form():
    co = torch.tensor([[4.0, 1, 3], [1, 2, 1], [3, 1, 0]])
    co[2, 2] = 0  # an expert never chosen
    p = rp.coactivation_probability(co)
    assert p[0].tolist() == [1.0, 0.25, 0.75] and p[1].tolist() == [0.5, 1.0, 0.5] and p[2].tolist() == [0, 0, 0]
    stats = rp.load_statistics(torch.tensor([1.0, 1.0, 2.0]))
    assert stats["min"] == 0.25 and stats["max"] == 0.5 and stats["max_over_ideal"] == 1.5
    assert stats["std"] == pytest.approx(math.sqrt(((0.25 - 1 / 3) ** 2 * 2 + (0.5 - 1 / 3) ** 2) / 3))
    assert rp.top_tokens_per_expert(torch.tensor([[3.0, 0], [5, 1], [3, 0]]), k=2) == [[1, 0], [1]]


def test_errors_are_clear():
    dense = build_model(ModelSpec(arch="llama", size="tiny", vocab_size=VOCAB, max_seq_len=16, overrides={}))
    with pytest.raises(ValueError, match="no MoE block"):
        rp.RoutingProbe(dense).attach()
    model = _hf("mixtral")
    with pytest.raises(ValueError, match="priority"):
        rp.RoutingProbe(model, priority="random")
    with pytest.raises(ValueError, match="capacity_factor"):
        rp.RoutingProbe(model, capacity_factor=0)
    with rp.RoutingProbe(model) as probe:
        with pytest.raises(ValueError, match="input_ids"):
            model(inputs_embeds=torch.zeros(1, 4, model.config.hidden_size))
        probe.set_domains(torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError, match="domain labels"):
            model(input_ids=torch.zeros(2, 4, dtype=torch.long))
        with pytest.raises(RuntimeError, match="already attached"):
            probe.attach()


def test_block_reruns_are_not_counted_twice():
    # Activation checkpointing may re-run a block inside the root forward or during backward, after the
    # root forward returned. Both kinds of re-run must leave the aggregates as after one run.
    class RunsTwice(IdModel):
        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            self.block(h)
            return self.block(h)

    torch.manual_seed(0)
    model = RunsTwice(VOCAB, 4, 2)
    batch = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    with rp.RoutingProbe(model) as probe:
        model(input_ids=batch)
        model.block(model.embed(batch))  # after the root forward: ignored, no error
    assert probe.stats.layers[0].n_tokens == 16 and float(probe.stats.layers[0].load.sum()) == 32
    assert len(probe.last) == 1
    fresh = rp.RoutingProbe(model).attach()
    with pytest.raises(RuntimeError, match="outside a forward"):
        model.block(model.embed(batch))  # never through the probed model: a clear error
    fresh.detach()


def test_vocabulary_grows_to_the_ids_seen_when_unknown():
    class NoEmbeddingAccessor(IdModel):
        get_input_embeddings = None

    torch.manual_seed(0)
    model = NoEmbeddingAccessor(VOCAB, 4, 2)
    with rp.RoutingProbe(model) as probe:
        model(input_ids=torch.tensor([[3, 7, 7]]))
        assert probe.stats.layers[0].counts_by_token.shape == (8, 4)
        model(input_ids=torch.tensor([[12, 1, 1]]))
    layer = probe.stats.layers[0]
    assert layer.counts_by_token.shape == (13, 4)
    assert layer.tokens_by_token[[1, 3, 7, 12]].tolist() == [2.0, 1.0, 2.0, 1.0]
    assert float(layer.counts_by_token.sum()) == 12.0  # 6 tokens x k=2
    with rp.RoutingProbe(model, vocab_size=VOCAB) as fixed:
        model(input_ids=torch.tensor([[3]]))
    assert fixed.stats.layers[0].counts_by_token.shape == (VOCAB, 4)
