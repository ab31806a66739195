"""Token alignment, vocabulary maps and distribution alignment (data/alignment.py)."""
from __future__ import annotations

import random
import re
from functools import lru_cache

import numpy as np
import pytest

from data.alignment import (
    ALIGN_PRESETS,
    TokenAlignment,
    align_distributions,
    align_token_sequences,
    align_token_sequences_batch,
    alignment_from_ranges,
    count_one_to_one_pairs,
    count_path_pairs,
    normalize_token,
    one_to_one_matches,
    reference_align,
    substring_weight_of,
    text_agreement,
    token_cost_matrix,
    vocab_map_exact,
    vocab_map_min_ed,
    vocab_map_statistics,
)


def levenshtein(a: str, b: str) -> int:
    """Independent edit distance for the brute-force checks (recursive, memoised)."""

    @lru_cache(maxsize=None)
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


# ---------------------------------------------------------------- normalisation


def test_normalize_token_markers_bytes_and_specials():
    assert normalize_token("Ġworld") == "world"
    assert normalize_token("▁world") == "world"
    assert normalize_token("▁world", keep_space=True) == " world"
    assert normalize_token("Ġworld", keep_space=True) == " world"
    assert normalize_token("<0x0A>") == "\n"
    assert normalize_token("Ċ") == "\n"
    assert normalize_token("<0x41>", kind="sentencepiece") == "A"
    for special in ("<s>", "</s>", "<unk>", "<|endoftext|>", "<|im_start|>"):
        assert normalize_token(special) == special
    assert normalize_token("[CLS]", special_tokens={"[CLS]"}) == "[CLS]"
    # Full GPT-2 byte-level decoding: "âĢĻ" is the UTF-8 of U+2019.
    assert normalize_token("âĢĻ", kind="byte_level") == "\u2019"
    assert normalize_token("ĠHello", kind="byte_level", keep_space=True) == " Hello"
    # SentencePiece mode does not touch byte-level images (they are ordinary characters there).
    assert normalize_token("Ġx", kind="sentencepiece") == "Ġx"
    with pytest.raises(ValueError, match="Unknown tokenizer kind"):
        normalize_token("a", kind="wordpiece")


# ---------------------------------------------------------------- DTW alignment


def test_dtw_hello_world_groups_hand_computed():
    # Normalised: [Hel, lo, world] vs [Hello, wor, ld]. With the substring discount (x0.1) the
    # cheapest path is Hel+lo -> Hello (0.2 + 0.3) and world -> wor+ld (0.2 + 0.3): cost 1.0.
    a = align_token_sequences(["Hel", "lo", "Ġworld"], ["▁Hello", "▁wor", "ld"], substring_weight=0.1)
    assert a.groups == (((0, 1), (0,)), ((2,), (1, 2)))
    assert a.path == ((0, 0), (1, 0), (2, 1), (2, 2))
    assert a.cost == pytest.approx(1.0)
    assert a.one_to_one_pairs() == []
    assert a.tgt_to_src() == [[0, 1], [2], [2]]
    assert a.src_to_tgt() == [[0], [0], [1, 2]]


def test_dtw_plain_edit_distance_takes_the_diagonal():
    # Without the discount (hand-computed accumulated costs: D11 = 4 < D12 = 5 < D21 = 6) the
    # pieces pair up one-to-one, which is why the discount exists.
    a = align_token_sequences(["Hel", "lo", "Ġworld"], ["▁Hello", "▁wor", "ld"], substring_weight=1.0)
    assert a.groups == (((0,), (0,)), ((1,), (1,)), ((2,), (2,)))
    assert a.cost == pytest.approx(2 + 2 + 3)


def test_dtw_one_to_one_positions_identifiable():
    a = align_token_sequences(["Ġthe", "Ġcat", "Ġsat"], ["▁the", "▁c", "at", "▁sat"])
    assert a.groups == (((0,), (0,)), ((1,), (1, 2)), ((2,), (3,)))
    assert a.one_to_one_pairs() == [(0, 0), (2, 3)]
    assert a.tgt_to_src_one_to_one().tolist() == [0, -1, -1, 2]
    assert a.one_to_one_fraction() == pytest.approx(2 / 4)


def _random_tokens(rng: random.Random, n: int) -> list:
    markers = ["", "", "Ġ", "▁"]
    return [rng.choice(markers) + "".join(rng.choice("abc") for _ in range(rng.randint(0, 4))) for _ in range(n)]


def _check_path_is_valid(a: TokenAlignment):
    assert a.path[0] == (0, 0) and a.path[-1] == (a.n_src - 1, a.n_tgt - 1)
    for (i0, j0), (i1, j1) in zip(a.path, a.path[1:]):
        assert (i1 - i0, j1 - j0) in {(1, 0), (0, 1), (1, 1)}
    # Groups partition both index ranges.
    assert sorted(i for src, _ in a.groups for i in src) == list(range(a.n_src))
    assert sorted(j for _, tgt in a.groups for j in tgt) == list(range(a.n_tgt))


@pytest.mark.parametrize("ties", ["paper", "source_first"])
@pytest.mark.parametrize("substring_weight", [0.1, 1.0])
def test_fast_dtw_agrees_with_reference_on_random_sequences(substring_weight, ties):
    rng = random.Random(1234)
    for _ in range(40):
        src = _random_tokens(rng, rng.randint(1, 14))
        tgt = _random_tokens(rng, rng.randint(1, 14))
        fast = align_token_sequences(src, tgt, substring_weight=substring_weight, ties=ties)
        slow = reference_align(src, tgt, substring_weight=substring_weight, ties=ties)
        assert fast.path == slow.path
        assert fast.groups == slow.groups
        assert fast.cost == slow.cost  # same arithmetic, bit for bit
        _check_path_is_valid(fast)


@pytest.mark.parametrize("max_cells", [1 << 22, 300])  # one batch / many small batches
def test_batched_dtw_equals_reference_for_mixed_lengths(max_cells):
    rng = random.Random(99)
    pairs = [(_random_tokens(rng, rng.randint(1, 16)), _random_tokens(rng, rng.randint(1, 16))) for _ in range(30)]
    pairs[3] = ([], pairs[3][1])  # an empty side inside the batch
    batch = align_token_sequences_batch(pairs, max_cells=max_cells)
    assert len(batch) == len(pairs)
    for (src, tgt), fast in zip(pairs, batch):
        slow = reference_align(src, tgt)
        assert (fast.n_src, fast.n_tgt) == (len(src), len(tgt))
        assert fast.path == slow.path and fast.groups == slow.groups and fast.cost == slow.cost
    banded = align_token_sequences_batch(pairs, band=1, max_cells=max_cells)
    assert [a.path for a in banded] == [align_token_sequences(s, t, band=1).path for s, t in pairs]


def test_cost_matrix_matches_the_pairwise_definition():
    # repeated strings (computed once per distinct pair), empty strings (contained in everything),
    # containment in both directions, a subsequence that is not a substring ("ac" in "abc")
    src = ["ab", "", "abc", "ab", "ac", "zz", ""]
    tgt = ["abc", "b", "", "ab", "xabcx", "abc"]
    cost = token_cost_matrix(src, tgt, substring_weight=0.1)
    for i, a in enumerate(src):
        for j, b in enumerate(tgt):
            d = levenshtein(a, b)
            assert cost[i, j] == (d * 0.1 if (a in b or b in a) else d), (a, b)
    assert cost[4, 0] == 1.0 and cost[1, 0] == pytest.approx(0.3) and cost[2, 4] == pytest.approx(0.2)
    assert token_cost_matrix([], ["a"]).shape == (0, 1)


def test_band_wide_equals_full_and_narrow_stays_valid():
    rng = random.Random(7)
    for _ in range(10):
        src = _random_tokens(rng, rng.randint(2, 20))
        tgt = _random_tokens(rng, rng.randint(2, 20))
        full = align_token_sequences(src, tgt)
        assert align_token_sequences(src, tgt, band=50).path == full.path
        narrow = align_token_sequences(src, tgt, band=0)
        _check_path_is_valid(narrow)
        assert narrow.cost >= full.cost


def test_empty_sequences_and_bad_arguments():
    a = align_token_sequences([], ["x"])
    assert a.groups == () and a.tgt_to_src_one_to_one().tolist() == [-1]
    assert align_token_sequences([], []).cost == 0.0
    with pytest.raises(ValueError, match="band"):
        align_token_sequences(["a"], ["a"], band=-1)


# ---------------------------------------------------------------- the official choices ("paper") and ours


def test_presets_and_costs():
    assert ALIGN_PRESETS["paper"] == {"cost": "paper", "ties": "paper", "one_to_one": "paper", "ms_rule": "paper"}
    assert substring_weight_of("paper") == 1.0 and substring_weight_of("containment_discount") == 0.1
    with pytest.raises(ValueError, match="alignment cost"):
        substring_weight_of("cosine")
    with pytest.raises(ValueError, match="tie order"):
        align_token_sequences(["a"], ["a"], ties="pivot_last")


def test_paper_cost_and_containment_discount_give_different_hand_derived_alignments():
    # Normalised: source [Hel, lo, world], pivot [Hello, wor, ld].
    src, tgt = ["Hel", "lo", "Ġworld"], ["▁Hello", "▁wor", "ld"]
    # "paper" (plain edit distance). Costs: Hel: 2 3 3 / lo: 3 2 1 / world: 4 2 3. Accumulated:
    # D00 = 2, D01 = 5, D02 = 8; D10 = 5, D11 = 2 + min(2, 5, 5) = 4, D12 = 1 + min(5, 8, 4) = 5;
    # D20 = 9, D21 = 2 + min(5, 4, 9) = 6, D22 = 3 + min(4, 5, 6) = 7. Back from (2, 2): diagonal (4 < 5, 6),
    # diagonal (2 < 5, 5): the pieces pair up one-to-one, cost 7.
    paper = align_token_sequences(src, tgt, substring_weight=substring_weight_of("paper"), ties="paper")
    assert paper.path == ((0, 0), (1, 1), (2, 2)) and paper.cost == 7.0
    # "containment_discount": Hel, lo in Hello and wor, ld in world cost 0.2, 0.3, 0.2, 0.3; the path
    # Hel+lo -> Hello, world -> wor+ld costs 1.0 (see test_dtw_hello_world_groups_hand_computed).
    ours = align_token_sequences(src, tgt, substring_weight=substring_weight_of("containment_discount"),
                                 ties="paper")
    assert ours.groups == (((0, 1), (0,)), ((2,), (1, 2))) and ours.cost == pytest.approx(1.0)
    for a in (paper, ours):
        slow = reference_align(src, tgt, substring_weight=1.0 if a is paper else 0.1, ties="paper")
        assert a.path == slow.path


def test_tie_order_paper_takes_the_pivot_step_first():
    # Source [a, b, a], pivot [b, a, b], plain edit distance: costs 1 0 1 / 0 1 0 / 1 0 1. Accumulated:
    # D00 = 1, D01 = 1, D02 = 2; D10 = 1, D11 = 1 + min(1, 1, 1) = 2, D12 = 0 + min(1, 2, 2) = 1;
    # D20 = 2, D21 = 0 + min(1, 2, 2) = 1, D22 = 1 + min(2, 1, 1) = 2. At (2, 2) the diagonal (2) loses and the
    # pivot step to (2, 1) ties the source step to (1, 2) at 1.
    src, tgt = ["a", "b", "a"], ["b", "a", "b"]
    paper = align_token_sequences(src, tgt, "plain", "plain", substring_weight=1.0, ties="paper")
    # The official order (argmin over [diagonal, pivot step, source step]): (2, 2) -> (2, 1); there the
    # diagonal D10 = 1 beats D20 = D11 = 2 -> (1, 0); then the only way, up to (0, 0).
    assert paper.path == ((0, 0), (1, 0), (2, 1), (2, 2)) and paper.cost == 2.0
    # Source step first: (2, 2) -> (1, 2); diagonal D01 = 1 < 2 -> (0, 1); then left to (0, 0).
    ours = align_token_sequences(src, tgt, "plain", "plain", substring_weight=1.0, ties="source_first")
    assert ours.path == ((0, 0), (0, 1), (1, 2), (2, 2)) and ours.cost == 2.0
    for ties, a in (("paper", paper), ("source_first", ours)):
        assert reference_align(src, tgt, "plain", "plain", 1.0, ties).path == a.path


def test_one_to_one_definitions_hand_cases():
    src, tgt = ["Hel", "lo", "Ġworld"], ["▁Hello", "▁wor", "ld"]
    diagonal = align_token_sequences(src, tgt, substring_weight=1.0, ties="paper")
    # "group": every 1:1 group. "paper": one source token on the path and a suffix relation of the texts:
    # Hello/Hel and wor/lo have none; world ends with ld.
    assert one_to_one_matches(diagonal, "group").tolist() == [0, 1, 2]
    assert one_to_one_matches(diagonal, "paper", src, tgt).tolist() == [-1, -1, 2]
    # One source token over two pivot tokens: no 1:1 group, but each pivot position has exactly one source
    # token; only "lo" is a suffix of "Hello", so the source's prediction (what follows "Hello") goes there.
    one_to_two = align_token_sequences(["▁Hello"], ["Hel", "lo"])
    assert one_to_two.path == ((0, 0), (0, 1))
    assert one_to_one_matches(one_to_two, "group").tolist() == [-1, -1]
    assert one_to_one_matches(one_to_two, "paper", ["▁Hello"], ["Hel", "lo"]).tolist() == [-1, 0]
    # Two source tokens over one pivot token: the first source token with the suffix relation, "lo",
    # whose prediction (what follows "Hel" + "lo") is the pivot's. "x" + "Hel" + "lo" -> "xHello": only "lo".
    two_to_one = align_token_sequences(["Hel", "lo"], ["Hello"])
    assert one_to_one_matches(two_to_one, "group").tolist() == [-1]
    assert one_to_one_matches(two_to_one, "paper", ["Hel", "lo"], ["Hello"]).tolist() == [1]
    three_to_one = align_token_sequences(["x", "Hel", "lo"], ["xHello"])
    assert one_to_one_matches(three_to_one, "paper", ["x", "Hel", "lo"], ["xHello"]).tolist() == [2]
    # None with the relation: "ab" + "cd" over "abcd!" -> no source distribution.
    none = align_token_sequences(["ab", "cd"], ["abcd!"])
    assert one_to_one_matches(none, "paper", ["ab", "cd"], ["abcd!"]).tolist() == [-1]
    with pytest.raises(ValueError, match="give src_tokens"):
        one_to_one_matches(one_to_two, "paper")
    with pytest.raises(ValueError, match="one-to-one definition"):
        one_to_one_matches(one_to_two, "strict")


def test_text_agreement_hand_counts():
    src, tgt = ["Hel", "lo", "Ġworld"], ["▁Hello", "▁wor", "ld"]
    ours = align_token_sequences(src, tgt, substring_weight=0.1)
    # Both groups hold the same text (Hel+lo = Hello, world = wor+ld): 3 pivot positions; no 1:1 group.
    assert text_agreement(ours, one_to_one_matches(ours, "group"), src, tgt) == {
        "positions": 3, "same_text": 3, "matched": 0, "matched_same_end": 0}
    paper = align_token_sequences(src, tgt, substring_weight=1.0, ties="paper")
    # No group holds the same text; the one match (ld <- world) ends at character 10 on both sides.
    assert text_agreement(paper, one_to_one_matches(paper, "paper", src, tgt), src, tgt) == {
        "positions": 3, "same_text": 0, "matched": 1, "matched_same_end": 1}
    # "group" matches of the same path: Hel ends at 3, Hello at 5; lo at 5, wor at 8; world and ld at 10.
    assert text_agreement(paper, one_to_one_matches(paper, "group"), src, tgt)["matched_same_end"] == 1


def test_path_ranges_round_trip_and_path_pair_counts():
    a = align_token_sequences(["Hel", "lo", "Ġworld"], ["▁Hello", "▁wor", "ld"], substring_weight=0.1)
    first, last = a.tgt_src_ranges()
    assert first.tolist() == [0, 2, 2] and last.tolist() == [1, 2, 2]
    rebuilt = alignment_from_ranges(3, 3, first, last)
    assert rebuilt.path == a.path and rebuilt.groups == a.groups
    # Pivot position 0 has source ids {7} (twice on the path: counted once), position 1 has {8}.
    two_to_one = alignment_from_ranges(3, 2, [0, 2], [1, 2])
    counts = count_path_pairs([([7, 7, 8], [3, 4], two_to_one)])
    assert counts == {(7, 3): 1, (8, 4): 1}
    assert count_one_to_one_pairs([([7, 7, 8], [3, 4], two_to_one)]) == {(8, 4): 1}


def test_ms_rule_paper_and_ours_pick_differently():
    # Source "abx" (no exact pivot match) is aligned once with pivot "ab" and five times with "q".
    # ours: count / (1 + ED): ab 1 / 2 = 0.5, q 5 / 4 = 1.25 -> q.
    # paper: discounted ED x sigmoid(count): "ab" is in "abx": 1 x 0.1 x sigmoid(1) = 0.0731;
    #        q: 3 x sigmoid(5) = 2.980 -> ab.
    # Source "c" has the exact pivot match "c" but was aligned only with "q": paper keeps the exact match,
    # ours takes the counted pair. Source "zz" was never aligned: paper leaves it -1, ours falls back to MinED.
    src, pivot = ["abx", "c", "zz"], ["q", "ab", "c", "z"]
    one = _one_pair_alignment()
    corpus = [([0], [1], one)] + [([0], [0], one)] * 5 + [([1], [0], one)] * 2
    assert vocab_map_statistics(corpus, src, pivot, "plain", "plain", rule="ours").tolist() == [0, 0, 3]
    assert vocab_map_statistics(corpus, src, pivot, "plain", "plain", rule="paper").tolist() == [1, 2, -1]
    # min_count applies to the path counts too: with 2, "abx" keeps only q.
    assert vocab_map_statistics(corpus, src, pivot, "plain", "plain", min_count=2,
                                rule="paper").tolist() == [0, 2, -1]
    # Equal weighted distances go to the smaller pivot id (the official argmin over ascending ids).
    tie = [([0], [1], one), ([0], [0], one)]
    assert vocab_map_statistics(tie, ["ab"], ["ax", "ay"], "plain", "plain", rule="paper").tolist() == [0]
    with pytest.raises(ValueError, match="MS rule"):
        vocab_map_statistics(corpus, src, pivot, rule="median")


# ---------------------------------------------------------------- vocabulary maps

SRC_VOCAB = ["▁the", "the", "▁cat", "▁ca", "<0x0A>", "xyz", "▁dogs", "<s>", "qq"]
PIVOT_VOCAB = {"Ġthe": 0, "the": 1, "Ġcat": 2, "Ċ": 3, "Ġdog": 4, "xy": 5, "yz": 6, "<s>": 7, "ab": 8}


def test_vocab_map_exact():
    got = vocab_map_exact(SRC_VOCAB, PIVOT_VOCAB)
    #           ▁the the ▁cat ▁ca \n  xyz ▁dogs <s> qq
    assert got.tolist() == [0, 1, 2, -1, 3, -1, -1, 7, -1]


def test_vocab_map_min_ed_matches_brute_force():
    got = vocab_map_min_ed(SRC_VOCAB, PIVOT_VOCAB, chunk_size=2)
    pivot_by_id = sorted((i, normalize_token(t, keep_space=True)) for t, i in PIVOT_VOCAB.items())
    expected = []
    for tok in SRC_VOCAB:
        s = normalize_token(tok, keep_space=True)
        exact = [i for i, p in pivot_by_id if p == s]
        expected.append(exact[0] if exact else min(pivot_by_id, key=lambda ip: (levenshtein(s, ip[1]), ip[0]))[0])
    assert got.tolist() == expected
    # Hand-checked rows: " ca" -> " cat" (1 edit); "xyz" ties "xy"/"yz" at 1 -> smaller id 5.
    assert got[3] == 2 and got[5] == 5 and got[6] == 4


def test_vocab_map_min_ed_random_vocab_brute_force():
    rng = random.Random(3)
    src = sorted({"".join(rng.choice("abcd") for _ in range(rng.randint(1, 5))) for _ in range(60)})
    pivot = sorted({"".join(rng.choice("abcde") for _ in range(rng.randint(1, 5))) for _ in range(40)})
    got = vocab_map_min_ed(src, pivot, "plain", "plain")
    for s_id, s in enumerate(src):
        best = min(range(len(pivot)), key=lambda p: (levenshtein(s, pivot[p]), p))
        assert got[s_id] == best


def _one_pair_alignment() -> TokenAlignment:
    return TokenAlignment(1, 1, ((0, 0),), (((0,), (0,)),), 0.0)


def test_vocab_map_statistics_rule():
    src = ["ab", "zz", "cd", "ef"]
    pivot = ["abc", "ab", "zz", "xyz", "ef"]
    one = _one_pair_alignment()
    corpus = (
        [([0], [0], one)] * 3  # "ab"->"abc": count 3, ED 1, score 1.5
        + [([0], [1], one)] * 2  # "ab"->"ab":  count 2, ED 0, score 2.0  <- wins
        + [([1], [3], one)] * 5  # "zz"->"xyz": count 5, ED 2, score 5/3  <- wins over...
        + [([1], [2], one)] * 1  # "zz"->"zz":  count 1, ED 0, score 1.0
    )
    assert count_one_to_one_pairs(corpus)[(0, 0)] == 3
    got = vocab_map_statistics(corpus, src, pivot, "plain", "plain", rule="ours")
    # "cd" unseen -> MinED fallback: ED to abc=3, ab=2, zz=2, xyz=3, ef=2 -> smallest id at 2: 1.
    # "ef" unseen -> exact match 4.
    assert got.tolist() == [1, 3, 1, 4]
    assert vocab_map_statistics(corpus, src, pivot, "plain", "plain", fallback="none",
                                rule="ours").tolist() == [1, 3, -1, -1]
    # min_count drops the rarer pairs: "zz" only has a count-5 pair left; "ab" has 3 -> "abc".
    assert vocab_map_statistics(
        corpus, src, pivot, "plain", "plain", min_count=3, fallback="none", rule="ours"
    ).tolist() == [0, 3, -1, -1]
    with pytest.raises(ValueError, match="fallback"):
        vocab_map_statistics(corpus, src, pivot, fallback="random")


# ---------------------------------------------------------------- distribution alignment


def _hand_alignment() -> TokenAlignment:
    # source [0][1 2][3]  <->  pivot [0][1][2]: positions 0 and 2 one-to-one, 1 is two-to-one.
    path = ((0, 0), (1, 1), (2, 1), (3, 2))
    return TokenAlignment(4, 3, path, (((0,), (0,)), ((1, 2), (1,)), ((3,), (2,))), 0.0)


VOCAB_MAP = np.array([10, 11, 10, -1, 12, 13])  # source id -> pivot id


def test_align_distributions_mapping_duplicates_and_one_hot():
    src_ids = np.array([[0, 2, 3], [1, 4, 5], [1, 4, 5], [4, 0, -1]])
    src_logits = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, 1.5, -np.inf]])
    pivot_gold = [20, 21, 22]
    ids, logits = align_distributions(src_ids, src_logits, _hand_alignment(), VOCAB_MAP, pivot_gold, k=3)
    # Row 0: ids 0 and 2 both map to 10 -> keep the higher logit 3.0; id 3 unmapped, dropped.
    assert ids[0].tolist() == [10, -1, -1]
    assert logits[0].tolist() == [3.0, -np.inf, -np.inf]
    # Row 1: not one-to-one -> one-hot on the pivot token its logits predict: gold[1 + 1] = 22.
    assert ids[1].tolist() == [22, -1, -1] and logits[1, 0] == 0.0
    # Row 2: source row 3 mapped (4 -> 12 at 0.5, 0 -> 10 at 1.5), sorted by logit, pad kept.
    assert ids[2].tolist() == [10, 12, -1]
    assert logits[2].tolist() == [1.5, 0.5, -np.inf]


def test_align_distributions_gold_position_offset_and_end():
    src_ids = np.array([[3, 3], [1, 1], [1, 1], [3, -1]])  # rows 0 and 3 map to nothing
    src_logits = np.zeros((4, 2))
    pivot_gold = [20, 21, 22]
    ids, _ = align_distributions(src_ids, src_logits, _hand_alignment(), VOCAB_MAP, pivot_gold, k=2)
    # Next-token convention: row i falls back to gold[i + 1]; the last row has no next token.
    assert ids[:, 0].tolist() == [21, 22, -1]
    # FuseLLM's convention (the input token itself) is available for comparison.
    ids0, _ = align_distributions(src_ids, src_logits, _hand_alignment(), VOCAB_MAP, pivot_gold, k=2,
                                  next_token_offset=0)
    assert ids0[:, 0].tolist() == [20, 21, 22]
    # An ignored gold label (-100) gives an empty row instead of a one-hot on a bogus id.
    ids_ignored, _ = align_distributions(src_ids, src_logits, _hand_alignment(), VOCAB_MAP, [20, -100, 22], k=2)
    assert ids_ignored[:, 0].tolist() == [-1, 22, -1]


def test_align_distributions_truncates_to_k_and_validates():
    src_ids = np.array([[0, 1, 4, 5]] * 4)
    src_logits = np.array([[4.0, 3.0, 2.0, 1.0]] * 4)
    ids, logits = align_distributions(src_ids, src_logits, _hand_alignment(), VOCAB_MAP, [1, 2, 3], k=2)
    assert ids[0].tolist() == [10, 11] and logits[0].tolist() == [4.0, 3.0]
    with pytest.raises(ValueError, match="source positions"):
        align_distributions(src_ids[:3], src_logits[:3], _hand_alignment(), VOCAB_MAP, [1, 2, 3], k=2)
    with pytest.raises(ValueError, match="pivot_gold_ids"):
        align_distributions(src_ids, src_logits, _hand_alignment(), VOCAB_MAP, [1, 2], k=2)


# ---------------------------------------------------------------- two real tokenizers


def _stripped_spans(strings):
    spans, pos = [], 0
    for s in strings:
        spans.append((pos, pos + len(s)))
        pos += len(s)
    return spans


# Measured on this text: paper 0.904, ours 0.872 (containment discount + paper one-to-one: 0.915; plain edit
# distance + group one-to-one: 0.798).
@pytest.mark.parametrize("preset,bar", [("paper", 0.88), ("ours", 0.85)])
def test_real_bpe_and_unigram_tokenizers_align_common_words(preset, bar):
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    names = sorted(topics)
    train_texts = [topics[n] for n in names[:12]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(train_texts, trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.train_from_iterator(train_texts, trainers.UnigramTrainer(
        vocab_size=500, unk_token="<unk>", special_tokens=["<unk>"], show_progress=False))

    text = topics[names[60]][:3000]  # held out from training
    pivot_tokens = bpe.encode(text).tokens
    src_tokens = unigram.encode(text).tokens
    assert pivot_tokens != src_tokens
    pivot_strings = [normalize_token(t, "byte_level") for t in pivot_tokens]
    src_strings = [normalize_token(t, "sentencepiece") for t in src_tokens]
    # Normalisation recovers the text (spaces removed) from both tokenisations.
    assert "".join(pivot_strings) == text.replace(" ", "") == "".join(src_strings)

    options = ALIGN_PRESETS[preset]
    alignment = align_token_sequences(src_tokens, pivot_tokens, "sentencepiece", "byte_level",
                                      substring_weight=substring_weight_of(options["cost"]), ties=options["ties"])
    matches = one_to_one_matches(alignment, options["one_to_one"], src_tokens, pivot_tokens, "sentencepiece",
                                 "byte_level")
    # Ground truth from character spans: a word that is a single token in both tokenisations
    # should come out as a one-to-one match of exactly those two tokens.
    pivot_at = {span: i for i, span in enumerate(_stripped_spans(pivot_strings))}
    src_at = {span: i for i, span in enumerate(_stripped_spans(src_strings))}
    stripped_offset = np.cumsum([0] + [ch != " " for ch in text])
    words = [(int(stripped_offset[m.start()]), int(stripped_offset[m.end()]))
             for m in re.finditer(r"[A-Za-z]{2,}", text)]
    common = [w for w in words if w in pivot_at and w in src_at]
    assert len(common) >= 30
    rate = sum(matches[pivot_at[w]] == src_at[w] for w in common) / len(common)
    assert rate > bar, rate
