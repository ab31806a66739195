"""Sparse fusion CE, fusion functions and the pairwise FuseChat loss (models/fusion.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.fusion import fuse_min_ce, fuse_weighted, fusion_loss, sparse_fusion_ce

NEG_INF = float("-inf")


def dense_target(ids: torch.Tensor, logits: torch.Tensor, vocab: int, temperature: float = 1.0) -> torch.Tensor:
    """Reference: the dense [B, L, V] target built position by position in plain Python."""
    B, L, K = ids.shape
    out = torch.zeros(B, L, vocab, dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            kept = [(int(t), float(z)) for t, z in zip(ids[b, i], logits[b, i]) if t >= 0 and math.isfinite(z)]
            if not kept:
                continue
            norm = sum(math.exp(z / temperature) for _, z in kept)
            for t, z in kept:
                out[b, i, t] += math.exp(z / temperature) / norm
    return out


def dense_ce(student: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per_position = -(target * F.log_softmax(student, dim=-1)).sum(-1)
    has_target = target.sum(-1) > 0
    use = mask & has_target
    return per_position[use].mean()


def _random_sparse(B, L, K, V, generator):
    ids = torch.stack([torch.stack([torch.randperm(V, generator=generator)[:K] for _ in range(L)]) for _ in range(B)])
    logits = torch.randn(B, L, K, generator=generator, dtype=torch.float64)
    return ids, logits


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_fusion_ce_equals_dense_computation(temperature):
    g = torch.Generator().manual_seed(0)
    B, L, K, V = 2, 5, 4, 11
    student = torch.randn(B, L, V, generator=g, dtype=torch.float64)
    ids, logits = _random_sparse(B, L, K, V, g)
    # Pads: some trailing entries, one whole row empty, and a masked position.
    ids[0, 1, 2:] = -1
    logits[0, 1, 2:] = NEG_INF
    ids[1, 3, :] = -1
    logits[1, 3, :] = NEG_INF
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 0] = False
    got = sparse_fusion_ce(student, ids, logits, mask, temperature)
    expected = dense_ce(student, dense_target(ids, logits, V, temperature), mask)
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)


def test_sparse_fusion_ce_one_hot_is_cross_entropy_and_gradient_flows():
    student = torch.tensor([[[1.0, 2.0, 0.5]]], dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[[1, -1]]])
    logits = torch.tensor([[[0.0, NEG_INF]]], dtype=torch.float64)
    loss = sparse_fusion_ce(student, ids, logits)
    expected = -(2.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5)))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    softmax = torch.softmax(student.detach(), -1)
    assert torch.allclose(student.grad, softmax - torch.tensor([[[0.0, 1.0, 0.0]]], dtype=torch.float64))


def test_sparse_fusion_ce_no_positions_is_zero_and_validates():
    student = torch.randn(1, 2, 5, requires_grad=True)
    ids = torch.full((1, 2, 3), -1)
    logits = torch.full((1, 2, 3), NEG_INF)
    loss = sparse_fusion_ce(student, ids, logits)
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="outside the student's vocabulary"):
        sparse_fusion_ce(student, torch.full((1, 2, 3), 5), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match=r"\[B, L, K\]"):
        sparse_fusion_ce(student, ids, logits[..., :2])
    with pytest.raises(ValueError, match="temperature"):
        sparse_fusion_ce(student, ids, logits, temperature=0.0)


def test_fuse_min_ce_picks_lowest_ce_per_sequence():
    pivot = (torch.tensor([[[0, 1]], [[2, 3]]]), torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]]))
    source = (torch.tensor([[[4, 5, 6]], [[7, 8, 9]]]), torch.tensor([[[3.0, 2.0, 1.0]], [[3.0, 2.0, 1.0]]]))
    ces = torch.tensor([[1.0, 2.0],   # pivot: best on sequence 0
                        [1.5, 0.5]])  # source: best on sequence 1
    ids, logits, choice = fuse_min_ce([pivot, source], ces)
    assert choice.tolist() == [0, 1]
    assert ids.tolist() == [[[0, 1, -1]], [[7, 8, 9]]]  # the narrower pivot padded to K = 3
    assert logits[0, 0].tolist() == [1.0, 0.0, NEG_INF]
    # A tie goes to the first candidate (the pivot).
    _, _, tied = fuse_min_ce([pivot, source], torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    assert tied.tolist() == [0, 0]
    with pytest.raises(ValueError, match="ces must be"):
        fuse_min_ce([pivot, source], torch.tensor([1.0, 2.0]))


def test_fuse_weighted_union_of_top_k_sets():
    # One sequence, one position. Candidate A: ids {1, 2} with probs (0.5, 0.5);
    # candidate B: ids {2, 3} with softmax(log 3, 0) = (0.75, 0.25). CE 0 and log 3:
    # weights exp(0), exp(-log 3) normalised = (0.75, 0.25).
    a = (torch.tensor([[[1, 2]]]), torch.tensor([[[0.0, 0.0]]]))
    b = (torch.tensor([[[2, 3]]]), torch.tensor([[[math.log(3.0), 0.0]]]))
    ces = torch.tensor([[0.0], [math.log(3.0)]])
    ids, logits = fuse_weighted([a, b], ces, k=3)
    expected = {1: 0.75 * 0.5, 2: 0.75 * 0.5 + 0.25 * 0.75, 3: 0.25 * 0.25}
    got = {int(t): math.exp(float(z)) for t, z in zip(ids[0, 0], logits[0, 0])}
    assert got.keys() == expected.keys()
    for t in expected:
        assert got[t] == pytest.approx(expected[t], rel=1e-6)
    assert ids[0, 0].tolist() == [2, 1, 3]  # sorted by fused probability
    # Default k = widest candidate (2): the least likely id is cut, softmax renormalises the rest.
    ids2, logits2 = fuse_weighted([a, b], ces)
    assert ids2[0, 0].tolist() == [2, 1]
    p = torch.softmax(logits2[0, 0], -1)
    assert p[0].item() == pytest.approx(expected[2] / (expected[2] + expected[1]), rel=1e-6)


def test_fuse_weighted_equal_candidates_give_that_candidate():
    g = torch.Generator().manual_seed(1)
    ids, logits = _random_sparse(2, 3, 4, 20, g)
    fused_ids, fused_logits = fuse_weighted([(ids, logits), (ids, logits)], torch.tensor([[0.3, 2.0], [1.1, 0.1]]))
    original = dense_target(ids, logits, 20)
    fused = dense_target(fused_ids, fused_logits, 20)
    assert torch.allclose(original, fused, atol=1e-6)


def test_fusion_loss_combines_clm_and_shifted_fusion_term():
    g = torch.Generator().manual_seed(2)
    B, L, V, K = 2, 4, 9, 3
    student = torch.randn(B, L, V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 2] = -100  # position 1 of sequence 0 has no supervised next token
    fused_ids, fused_logits = _random_sparse(B, L, K, V, g)
    out = fusion_loss(student, labels, fused_ids, fused_logits, lam=0.9)

    # Independent reference: CLM over positions i whose next label is supervised, and the fusion
    # CE of student row i against fused row i at those same positions.
    log_probs = F.log_softmax(student.detach(), -1)
    target = dense_target(fused_ids, fused_logits, V)
    clm_terms, fusion_terms = [], []
    for b in range(B):
        for i in range(L - 1):
            if labels[b, i + 1] == -100:
                continue
            clm_terms.append(-log_probs[b, i, labels[b, i + 1]].item())
            fusion_terms.append(-(target[b, i] * log_probs[b, i]).sum().item())
    clm = sum(clm_terms) / len(clm_terms)
    fusion = sum(fusion_terms) / len(fusion_terms)
    assert out.clm.item() == pytest.approx(clm, abs=1e-10)
    assert out.fusion.item() == pytest.approx(fusion, abs=1e-10)
    assert out.loss.item() == pytest.approx(0.9 * clm + 0.1 * fusion, abs=1e-10)
    out.loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    # The last position never contributes (no next token) and nor does an unsupervised one.
    assert torch.all(student.grad[:, -1] == 0)
    assert torch.all(student.grad[0, 1] == 0)
    with pytest.raises(ValueError, match="lam"):
        fusion_loss(student, labels, fused_ids, fused_logits, lam=1.5)


def test_batch_loss_of_masked_chat_data_is_the_mean_over_assistant_tokens(tmp_path):
    """A batch of chat blocks (data.loss_on=assistant) through CausalLMModule's and FuseChat's FusionModule's
    own loss: each equals the direct mean over the positions whose next token is an assistant token, read from
    the shards' mask files (not from the labels)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recipes.engine.module import CausalLMModule
    from recipes.fusechat.train import FusionModule
    from tests.test_shards import FOUR_TURNS, TWO_TURNS, chat_datamodule

    dm = chat_datamodule(tmp_path, [FOUR_TURNS, TWO_TURNS] * 4, block_size=16)
    rows = list(range(4))
    items = [dm.train_set[i] for i in rows]
    batch = {k: torch.stack([x[k] for x in items]) for k in ("input_ids", "labels")}
    mask = torch.stack([torch.from_numpy(dm.train_set.loss_mask(i).astype(bool)) for i in rows])
    assert 0 < int(mask.sum()) < mask.numel()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(dm.tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=32)).eval()
    ids = batch["input_ids"]
    with torch.no_grad():
        log_probs = F.log_softmax(model(input_ids=ids).logits.double(), -1)
    positions = [(b, i) for b in range(len(rows)) for i in range(ids.shape[1] - 1) if mask[b, i + 1]]
    clm = sum(-log_probs[b, i, ids[b, i + 1]].item() for b, i in positions) / len(positions)
    everything = -log_probs[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
    assert abs(clm - everything) > 1e-3  # the mask changes the loss

    loss, _ = CausalLMModule(model, {}, 1)._step(batch)
    assert loss.item() == pytest.approx(clm, rel=1e-5)

    g = torch.Generator().manual_seed(3)
    V = len(dm.tokenizer)
    fused_ids, fused_logits = _random_sparse(len(rows), ids.shape[1], 3, V, g)
    fused = {**batch, "fused_ids": fused_ids, "fused_logits": fused_logits.float()}
    target = dense_target(fused_ids, fused_logits, V)
    fusion = sum(-(target[b, i] * log_probs[b, i]).sum().item() for b, i in positions) / len(positions)
    loss, _ = FusionModule(model, {}, 1, lam=0.9)._step(fused)
    assert loss.item() == pytest.approx(0.9 * clm + 0.1 * fusion, rel=1e-5)
