"""OpenMoE against its released code and paper: the three drop orders (model and routing probe), and the
paper's analysis quantities on hand-made count tensors."""
import math

import pytest
import torch

from models import routing_probe as rp
from models.moe import MoEConfig, colossalai_capacity
from models.openmoe import OPENMOE_SIZES, OpenMoEBlock, OpenMoEConfig, OpenMoEForCausalLM, group_capacity_drops
from recipes.engine.config import ConfigError, load_config

# ------------------------------------------------------------------------------------------------
# A hand-built routing: 2 sequences x 4 positions, E = 2 experts, k = 2 (every token uses both experts; only
# which one is its top-1 differs), capacity factor 0.625.
#   sequence 0 (tokens t0..t3): top-1 = 0, 1, 0, 0      sequence 1 (t4..t7): top-1 = 0, 0, 0, 1
# Capacities: per sequence (n = 4) C = ceil(0.625 * 4 * 2 / 2) = ceil(2.5) = 3;
#             ColossalAI over the batch (n = 8): floor(2 * 0.625 * 8 / 2) = 5, odd -> 6 (>= 4).
# token_major, per sequence: each expert's queue is t0, t1, t2, t3 (one assignment per token) -> the 4th, the
#   last token's, overflows for both experts: (t3, s0), (t3, s1), (t7, s0), (t7, s1).
# slot_major, per sequence: seq 0: expert 0 queue = top-1s t0 t2 t3, then top-2 t1 -> (t1, s1) dropped;
#   expert 1 = top-1 t1, then top-2s t0 t2 t3 -> (t3, s1). seq 1: expert 0 = t4 t5 t6, then t7 -> (t7, s1);
#   expert 1 = t7, then t4 t5 t6 -> (t6, s1).
# colossalai, the whole batch, C = 6: expert 0 = top-1s t0 t2 t3 t4 t5 t6, then top-2s t1 t7 -> (t1, s1),
#   (t7, s1); expert 1 = top-1s t1 t7, then top-2s t0 t2 t3 t4 t5 t6 -> the 7th and 8th: (t5, s1), (t6, s1).
#   (Without the rounding to even, C = 5 would also drop (t4, s1).)
TOP1 = [0, 1, 0, 0, 0, 0, 0, 1]
EXPERTS = torch.tensor([[e, 1 - e] for e in TOP1])
POSITIONS = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
ROWS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
CF = 0.625
HAND = {"token_major": {(3, 0), (3, 1), (7, 0), (7, 1)},
        "slot_major": {(1, 1), (3, 1), (7, 1), (6, 1)},
        "colossalai": {(1, 1), (7, 1), (5, 1), (6, 1)}}


def as_set(dropped):
    return {tuple(x) for x in dropped.nonzero().tolist()}


def test_capacity_formulas_hand_values():
    assert colossalai_capacity(0.625, 8, 2, 2) == 6  # floor(5) = 5 -> even 6
    assert colossalai_capacity(1.0, 8, 2, 2) == 8  # already even
    assert colossalai_capacity(0.625, 4, 2, 2) == 4  # floor(2.5) = 2, raised to the minimum 4
    assert colossalai_capacity(1.25, 2048, 2, 8) == 640  # the openmoe recipe's training batch (16 x 128)


@pytest.mark.parametrize("order", ["token_major", "slot_major", "colossalai"])
def test_each_drop_order_drops_the_hand_derived_assignments(order):
    assert len({frozenset(v) for v in HAND.values()}) == 3  # three different sets
    group = {"colossalai": 8, "slot_major": 4, "token_major": 4}[order]  # the order's own routing group
    assert as_set(group_capacity_drops(EXPERTS, group, 2, CF, order)) == HAND[order]
    assert as_set(rp.capacity_drops(EXPERTS, POSITIONS, 2, CF, order, rows=ROWS)) == HAND[order]


def _block(order, capacity_group=None):
    block = OpenMoEBlock(MoEConfig(hidden_size=2, intermediate_size=3, num_experts=2, top_k=2), CF, CF,
                         capacity_group, order).eval()
    with torch.no_grad():
        block.gate.weight.copy_(torch.eye(2))  # router logits = the input
    return block


def _inputs():
    return torch.eye(2)[torch.tensor(TOP1)].reshape(2, 4, 2)  # token t: one-hot of its top-1 expert


@pytest.mark.parametrize("order", ["token_major", "slot_major", "colossalai"])
def test_openmoe_block_drops_the_hand_derived_assignments_and_the_probe_agrees(order):
    block = _block(order)
    with torch.no_grad():
        block(_inputs())
    rec = block.last_routing
    assert torch.equal(rec["topk_indices"], EXPERTS)
    assert as_set(rec["dropped"]) == HAND[order]
    assert float(rec["topk_weights"][rec["dropped"]].abs().sum()) == 0.0

    # the probe on the same routing of a dropless block (its counterfactual drops, through the hooks)
    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(2, 2)
            self.moe = _block(order)
            self.moe.train_capacity_factor = self.moe.eval_capacity_factor = None  # dropless
            with torch.no_grad():
                self.embed.weight.copy_(torch.eye(2))

        def forward(self, input_ids):
            return self.moe(self.embed(input_ids))

    root = Root().eval()
    with rp.RoutingProbe(root, capacity_factor=CF, priority=order) as probe, torch.no_grad():
        root(input_ids=torch.tensor(TOP1).reshape(2, 4))
    assert as_set(probe.last[0].dropped) == HAND[order]


def test_groups_can_be_swapped_and_legacy_token_major_batch_is_the_sparse_block_rule():
    # token_major over the whole batch (C = ceil(0.625 * 8 * 2 / 2) = 5): each expert's queue t0..t7 -> t5, t6, t7
    block = _block("token_major", "batch")
    with torch.no_grad():
        block(_inputs())
    want = {(t, s) for t in (5, 6, 7) for s in (0, 1)}
    assert as_set(block.last_routing["dropped"]) == want
    assert as_set(rp.capacity_drops(EXPERTS, POSITIONS, 2, CF, "token_major", group="batch")) == want
    # colossalai per sequence: n = 4 -> C = max(even(floor(2.5)), 4) = 4 >= every queue: nothing dropped
    assert not rp.capacity_drops(EXPERTS, POSITIONS, 2, CF, "colossalai", rows=ROWS, group="sequence").any()
    with pytest.raises(ValueError, match="rows"):
        rp.capacity_drops(EXPERTS, POSITIONS, 2, CF, "slot_major")
    with pytest.raises(ValueError, match="sequence"):
        rp.RoutingProbe(torch.nn.Linear(2, 2), priority="position", capacity_group="sequence")


@pytest.mark.parametrize("order", ["token_major", "slot_major", "colossalai"])
def test_openmoe_model_and_probe_agree_on_real_routing(order):
    torch.manual_seed(0)
    cfg = OpenMoEConfig(vocab_size=64, max_position_embeddings=32, **{**OPENMOE_SIZES["tiny"], "drop_order": order,
                                                                      "eval_capacity_factor": 1.0})
    model = OpenMoEForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (3, 32))
    with torch.no_grad():
        model(input_ids=ids)
    positions, rows = torch.arange(32).repeat(3), torch.arange(3).repeat_interleave(32)
    total = 0
    for block in model.moe_blocks():
        rec = block.last_routing
        assert block.drop_order == order
        mine = rp.capacity_drops(rec["topk_indices"], positions, 8, 1.0, order, rows=rows)
        assert torch.equal(rec["dropped"], mine)
        total += int(rec["dropped"].sum())
    assert total > 0  # capacity 1.0 on an untrained router drops something


def test_drop_order_is_a_recipe_override_checked_at_config_load():
    cfg = load_config("openmoe", [])
    assert cfg.model.overrides.drop_order == "colossalai" and cfg.model.overrides.capacity_group is None
    cfg = load_config("openmoe", ["model.overrides.drop_order=slot_major"])
    assert cfg.model.overrides.drop_order == "slot_major"
    with pytest.raises(ConfigError, match="drop_order must be one of"):
        load_config("openmoe", ["model.overrides.drop_order=random"])
    # a saved config from before drop orders (capacity_group only) keeps the order it was trained with
    old = OpenMoEConfig.from_dict({**OPENMOE_SIZES["tiny"], "capacity_group": "sequence"})
    assert old.drop_order == "token_major"


# ------------------------------------------------------------------------------------------------
# the paper's analysis quantities on hand-made counts


def test_drop_order_rates_by_position_hand_values():
    out = rp.drop_order_rates(EXPERTS, POSITIONS, ROWS, 2, CF, rows_per_forward=2, position_buckets=2,
                              max_positions=4)
    assert out["bucket_edges"] == [0, 2, 4]
    # buckets: positions 0-1 (t0 t1 t4 t5, 8 assignments) and 2-3 (t2 t3 t6 t7)
    assert out["token_major"]["per_assignment"] == [0.0, 0.5] and out["token_major"]["per_token"] == [0.0, 0.5]
    assert out["slot_major"]["per_assignment"] == [0.125, 0.375] and out["slot_major"]["per_token"] == [0.0, 0.0]
    assert out["colossalai"]["per_assignment"] == [0.25, 0.25] and out["colossalai"]["per_token"] == [0.0, 0.0]
    assert out["colossalai"]["overall_per_assignment"] == 0.25
    # one sequence per forward: ColossalAI's minimum capacity 4 covers every queue
    one = rp.drop_order_rates(EXPERTS, POSITIONS, ROWS, 2, CF, rows_per_forward=1, position_buckets=2,
                              max_positions=4, orders=["colossalai"])
    assert one["colossalai"]["per_assignment"] == [0.0, 0.0]


def test_expert_ratio_std_hand_values():
    # E = 4, k = 2. id 0: seen 130 times, counts [130, 130, 0, 0] -> ratios [.5, .5, 0, 0], std .25;
    # id 1: seen 128 times (not MORE than 128): out; id 2: 200 times, [100] * 4 -> std 0.
    counts = torch.tensor([[130.0, 130, 0, 0], [128, 0, 128, 0], [100, 100, 100, 100]])
    occurrences = torch.tensor([130.0, 128, 200])
    out = rp.expert_ratio_std(counts, occurrences, more_than=128)
    assert out["n_groups"] == 2 and out["mean_std"] == pytest.approx(0.125, abs=1e-12)
    # uniform top-2 routing of n assignments: sqrt((E - k) / (E^2 n)), n = 260 and 400
    uniform = (math.sqrt(2 / (16 * 260)) + math.sqrt(2 / (16 * 400))) / 2
    assert out["uniform_std"] == pytest.approx(uniform, rel=1e-12)
    assert rp.expert_ratio_std(counts, occurrences, more_than=200)["n_groups"] == 0


def test_distribution_distance_hand_values():
    # E = 2, k = 1; ids 0 and 1 seen 4 times, id 2 once (below min_count 2).
    a = torch.tensor([[3.0, 1.0], [2.0, 2.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 1.0]])
    out = rp.distribution_distance(a, b, torch.tensor([4.0, 4.0, 1.0]), min_count=2)
    # id 0: p = [.75, .25], q = [.25, .75]: TV = .5; JSD = H(m) - (H(p) + H(q)) / 2 = 1 - H2(.75), JS = sqrt(JSD)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert out["n_groups"] == 2
    assert out["mean_tv"] == pytest.approx(0.25, abs=1e-12)
    assert out["mean_js"] == pytest.approx(math.sqrt(1 - h) / 2, abs=1e-12)
    same = rp.distribution_distance(a, a, torch.tensor([4.0, 4.0, 1.0]), min_count=1)
    assert same["mean_tv"] == 0.0 and same["mean_js"] == 0.0 and same["n_groups"] == 3
    assert rp.distribution_distance(a, b, torch.tensor([4.0, 4.0, 1.0]), min_count=5)["n_groups"] == 0
