"""Cross-tokenizer token alignment and distribution mapping for FuseChat (its align stage).

Two models tokenise the same text differently. To distil a source model into the pivot (target)
model we need, per pivot position, the source's next-token distribution expressed in the pivot's
vocabulary. Three pieces:

1. Token alignment (`align_token_sequences`): dynamic time warping (DTW) over the two token
   sequences with cost = edit distance between the tokens' strings after normalisation
   (`normalize_token`: space markers stripped, byte-fallback pieces decoded). The DTW path is cut
   into many-to-many groups. Which pivot positions are "one-to-one" (take the source's
   distribution): `one_to_one_matches`.
2. Vocabulary maps from the source vocabulary to the pivot vocabulary: exact match (EM), minimum
   edit distance (MinED) and statistics over aligned pairs (MS).
3. Distribution alignment (`align_distributions`): at one-to-one pivot positions the source's
   top-k ids go through the vocabulary map; elsewhere a one-hot on the pivot's gold next token.

Each choice where this module differs from the official FuseChat code is an option, and "paper"
selects the official behaviour (`ALIGN_PRESETS`; the official code is FuseChat's
train/align_token_and_vocab.py):

* cost (`ALIGN_COSTS`): "paper" = plain edit distance between the two token strings;
  "containment_discount" = edit distance x 0.1 when one string contains the other (ours: the
  official code uses that discount only in its statistics-based vocabulary map, not in the DTW).
* ties of the DTW backtrack (`TIE_ORDERS`): "paper" = diagonal, then the pivot step, then the
  source step (the official argmin order); "source_first" = diagonal, then the source step.
* one-to-one (`ONE_TO_ONE`): which pivot positions take a source position's distribution. "paper" =
  the first source token on the path with the position whose text ends with the pivot token's text
  or the reverse (the official distribution alignment); "group" = a DTW group with one token on
  each side.
* MS rule (`MS_RULES`): "paper" = count every (source, pivot) pair on the DTW path, map each source
  token to the co-aligned pivot token of least discounted edit distance x sigmoid(count), exact
  matches first; "ours" = count the one-to-one pairs, map to the largest count / (1 + edit distance).

Edit distances come from rapidfuzz (C++), once per pair of distinct token strings; the DTW
recursion is numpy, vectorised over anti-diagonals and over a batch of sequences
(`align_token_sequences_batch`, what the align stage uses: the Python loop runs once per
anti-diagonal for a whole shard). No compiled code of our own. `reference_align` is a plain-Python
version of the same computation kept as the benchmark baseline and as an independent check in the
tests: paths and costs are identical, bit for bit.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Collection, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

TOKENIZER_KINDS = ("auto", "byte_level", "sentencepiece", "plain")
SENTENCEPIECE_SPACE = "\u2581"  # "▁"
BYTE_LEVEL_SPACE = "\u0120"  # "Ġ", the GPT-2 byte-level image of b" "
# In "auto" mode we do not decode byte-level strings fully (a SentencePiece "é" would be mangled),
# only the whitespace images that byte-level vocabularies use constantly.
_BYTE_LEVEL_WHITESPACE = {"\u0120": " ", "\u010a": "\n", "\u0109": "\t", "\u010d": "\r"}
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# <s>, </s>, <unk>, <pad>, <|endoftext|>, <|im_start|> ... kept verbatim so they stay recognisable.
_SPECIAL_LIKE = re.compile(r"^<\|?/?[A-Za-z_][^<>\s]*\|?>$")

Vocab = Union[Mapping[str, int], Sequence[str]]
Group = Tuple[Tuple[int, ...], Tuple[int, ...]]

# The alignment choices (module docstring); "paper" is the official FuseChat code's in each.
ALIGN_COSTS = ("paper", "containment_discount")
TIE_ORDERS = ("paper", "source_first")
ONE_TO_ONE = ("paper", "group")
MS_RULES = ("paper", "ours")
ALIGN_PRESETS: Dict[str, Dict[str, str]] = {
    "paper": {"cost": "paper", "ties": "paper", "one_to_one": "paper", "ms_rule": "paper"},
    "ours": {"cost": "containment_discount", "ties": "source_first", "one_to_one": "group", "ms_rule": "ours"},
}
CONTAINMENT_DISCOUNT = 0.1  # the weight of a pair whose strings contain one another ("containment_discount")


def substring_weight_of(cost: str) -> float:
    """The `substring_weight` of an `ALIGN_COSTS` name: 1.0 for "paper" (plain edit distance), 0.1 for
    "containment_discount"."""
    if cost not in ALIGN_COSTS:
        raise ValueError(f"Unknown alignment cost {cost!r}: expected one of {ALIGN_COSTS}.")
    return 1.0 if cost == "paper" else CONTAINMENT_DISCOUNT


# ----------------------------------------------------------------------------------------------
# Token normalisation
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_level_decoder() -> Dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode table: printable latin-1 bytes stand for themselves,
    the other 68 bytes are shifted to code points 256, 257, ... in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table: Dict[str, int] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


def normalize_token(
    token: str,
    kind: str = "auto",
    keep_space: bool = False,
    special_tokens: Collection[str] = (),
) -> str:
    """The text a token stands for, comparable across tokenizers.

    kind: "byte_level" (GPT-2 style: every character is a byte image, decoded as UTF-8, partial
    characters become U+FFFD), "sentencepiece" ("▁" is a space, "<0xNN>" byte-fallback pieces are
    that byte), "plain" (only byte fallback), or "auto" (the union of the cheap rules: "▁" and "Ġ"
    are spaces, "Ċ"/"ĉ"/"č" are newline/tab/CR, "<0xNN>" is its byte).
    keep_space: False strips every space (what the DTW cost compares: "Ġworld" == "▁world" ==
    "world"); True keeps a real " " so that vocabulary maps do not confuse word-initial and
    word-internal pieces.
    special_tokens, and anything shaped like "<s>", "</s>", "<|endoftext|>", are returned verbatim.
    A byte-fallback byte above 0x7F is a fragment of a UTF-8 character; it maps to the latin-1
    character of that byte, which only ever matches another such fragment.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"Unknown tokenizer kind {kind!r}: expected one of {TOKENIZER_KINDS}.")
    if token in special_tokens:
        return token
    byte_piece = _BYTE_FALLBACK.match(token)
    if byte_piece:
        text = chr(int(byte_piece.group(1), 16))
    elif _SPECIAL_LIKE.match(token):
        return token
    elif kind == "byte_level":
        table = _byte_level_decoder()
        if all(ch in table for ch in token):
            text = bytes(table[ch] for ch in token).decode("utf-8", errors="replace")
        else:  # not a byte-level string after all (e.g. an added token): keep its characters
            text = token
    elif kind == "sentencepiece":
        text = token.replace(SENTENCEPIECE_SPACE, " ")
    elif kind == "plain":
        text = token
    else:  # auto
        text = token.replace(SENTENCEPIECE_SPACE, " ")
        for image, char in _BYTE_LEVEL_WHITESPACE.items():
            text = text.replace(image, char)
    return text if keep_space else text.replace(" ", "")


# ----------------------------------------------------------------------------------------------
# Token alignment by DTW
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenAlignment:
    """A monotone many-to-many alignment of a source token sequence to a target (pivot) sequence.

    path: the DTW path cells (src_idx, tgt_idx) from (0, 0) to (n_src - 1, n_tgt - 1).
    groups: the path cut at its diagonal steps; each group is (src indices, tgt indices), both
    sorted. A group ((i,), (j,)) is a one-to-one match; ((0, 1), (0,)) means two source tokens
    together correspond to one target token.
    """

    n_src: int
    n_tgt: int
    path: Tuple[Tuple[int, int], ...]
    groups: Tuple[Group, ...]
    cost: float

    def one_to_one_pairs(self) -> List[Tuple[int, int]]:
        """(src_idx, tgt_idx) of every one-to-one group, in sequence order."""
        return [(src[0], tgt[0]) for src, tgt in self.groups if len(src) == 1 and len(tgt) == 1]

    def tgt_to_src_one_to_one(self) -> np.ndarray:
        """Per target position the source position it is matched one-to-one with, else -1."""
        out = np.full(self.n_tgt, -1, dtype=np.int64)
        for i, j in self.one_to_one_pairs():
            out[j] = i
        return out

    def tgt_to_src(self) -> List[List[int]]:
        """Per target position all source positions on the path with it (the many-to-many map)."""
        out: List[List[int]] = [[] for _ in range(self.n_tgt)]
        for i, j in self.path:
            out[j].append(i)
        return out

    def src_to_tgt(self) -> List[List[int]]:
        """Per source position all target positions on the path with it."""
        out: List[List[int]] = [[] for _ in range(self.n_src)]
        for i, j in self.path:
            out[i].append(j)
        return out

    def one_to_one_fraction(self) -> float:
        """Fraction of target positions matched one-to-one (0 for an empty target)."""
        return len(self.one_to_one_pairs()) / self.n_tgt if self.n_tgt else 0.0

    def tgt_src_ranges(self) -> Tuple[np.ndarray, np.ndarray]:
        """(first, last): per target position the first and last source position on the path with it.
        A monotone path is exactly these ranges (`alignment_from_ranges` rebuilds it)."""
        first = np.full(self.n_tgt, -1, dtype=np.int64)
        last = np.full(self.n_tgt, -1, dtype=np.int64)
        for i, j in self.path:
            if first[j] < 0:
                first[j] = i
            last[j] = i
        return first, last


def alignment_from_ranges(n_src: int, n_tgt: int, first: Sequence[int], last: Sequence[int],
                          cost: float = float("nan")) -> TokenAlignment:
    """The TokenAlignment whose path holds, per target position j, the source positions first[j]..last[j]
    (`TokenAlignment.tgt_src_ranges`): what the align stage stores instead of the whole path."""
    path = [(i, j) for j in range(n_tgt) for i in range(int(first[j]), int(last[j]) + 1)]
    return TokenAlignment(n_src, n_tgt, tuple(path), _groups_from_path(path), cost)


def _groups_from_path(path: Sequence[Tuple[int, int]]) -> Tuple[Group, ...]:
    """Cut the path where it steps diagonally: cells reached by a vertical or horizontal step share
    a row or a column with the previous cell, so they belong to the same many-to-many group. The
    path moves by at most one in each coordinate, so a group's indices are whole ranges."""
    if not len(path):
        return ()
    cells = np.asarray(path, dtype=np.int64).reshape(-1, 2)
    step = np.diff(cells, axis=0)
    starts = np.concatenate([[0], np.nonzero((step[:, 0] != 0) & (step[:, 1] != 0))[0] + 1])
    ends = np.concatenate([starts[1:], [len(cells)]]) - 1
    first, last = cells[starts].tolist(), cells[ends].tolist()
    return tuple((tuple(range(i0, i1 + 1)), tuple(range(j0, j1 + 1))) for (i0, j0), (i1, j1) in zip(first, last))


def _backtrack(acc: np.ndarray, ties: str) -> List[Tuple[int, int]]:
    """Walk back from the last cell through the accumulated-cost matrix `acc` (shape (n+1, m+1),
    inf border, acc[i+1, j+1] is cell (i, j)). Ties prefer the diagonal, then (`ties`) "paper": the
    step that moves the target (pivot) index (left), then the source index (up), as the official
    code's argmin over [diagonal, left, up]; "source_first": up, then left.
    The step out of every cell is decided for the whole matrix at once (numpy); the walk reads it."""
    n, m = acc.shape[0] - 1, acc.shape[1] - 1
    diag, up, left = acc[:-1, :-1], acc[:-1, 1:], acc[1:, :-1]  # predecessors of cell (i, j)
    # 0: diagonal, 1: up (i - 1), 2: left (j - 1)
    if ties == "paper":
        move = np.where((diag <= left) & (diag <= up), 0, np.where(left <= up, 2, 1)).ravel().tolist()
    else:
        move = np.where((diag <= up) & (diag <= left), 0, np.where(up <= left, 1, 2)).ravel().tolist()
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        step = move[i * m + j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    path.reverse()
    return path


def _unique_strings(strings: Sequence[str]) -> Tuple[List[str], np.ndarray]:
    """Distinct strings in first-seen order and, per input string, its index among them."""
    index: Dict[str, int] = {}
    inverse = np.fromiter((index.setdefault(s, len(index)) for s in strings), dtype=np.int64, count=len(strings))
    return list(index), inverse


def _pair_cost_matrix(src: Sequence[str], tgt: Sequence[str], substring_weight: float, workers: int) -> np.ndarray:
    """token_cost_matrix on strings that are all distinct (the expensive part runs once per pair)."""
    distance = process.cdist(src, tgt, scorer=Levenshtein.distance, dtype=np.int32, workers=workers)
    cost = distance.astype(np.float64)
    if substring_weight != 1.0:
        # If a is a substring of b, b -> a takes only deletions, so distance == |len(b) - len(a)|:
        # only those pairs can be containments. The empty string is in every string (vectorised);
        # the remaining candidates are tested with Python's `in` (C code, one call per pair).
        src_len = np.array([len(s) for s in src])
        tgt_len = np.array([len(t) for t in tgt])
        maybe = (distance == np.abs(src_len[:, None] - tgt_len[None, :])) & (distance > 0)
        empty = (src_len[:, None] == 0) | (tgt_len[None, :] == 0)
        contains = maybe & empty
        rows, cols = np.nonzero(maybe & ~empty)
        hit = np.fromiter(
            ((src[i] in tgt[j]) or (tgt[j] in src[i]) for i, j in zip(rows.tolist(), cols.tolist())),
            dtype=bool, count=len(rows),
        )
        contains[rows[hit], cols[hit]] = True
        cost[contains] *= substring_weight
    return cost


def token_cost_matrix(
    src_strings: Sequence[str], tgt_strings: Sequence[str], substring_weight: float = 1.0, workers: int = 1
) -> np.ndarray:
    """cost[i, j] = Levenshtein(src_i, tgt_j), times `substring_weight` when one string contains the
    other. The official FuseChat DTW uses plain edit distance (`substring_weight=1`, cost "paper");
    its 0.1 discount appears only in its statistics-based vocabulary map. With the discount (cost
    "containment_discount", ours) the DTW prefers the true split ("Hel" + "lo" -> "Hello") where plain
    edit distance pairs pieces of similar length ("Hel"/"Hello", "lo"/"wor").
    A pair's cost depends only on its two strings, so it is computed once per pair of DISTINCT
    strings (a text repeats about half of its tokens) and gathered into the full matrix."""
    if not len(src_strings) or not len(tgt_strings):
        return np.zeros((len(src_strings), len(tgt_strings)), dtype=np.float64)
    src_unique, src_inverse = _unique_strings(src_strings)
    tgt_unique, tgt_inverse = _unique_strings(tgt_strings)
    cost = _pair_cost_matrix(src_unique, tgt_unique, substring_weight, workers)
    return cost[src_inverse[:, None], tgt_inverse[None, :]]


def _band_cost(cost: np.ndarray, band: Optional[int]) -> np.ndarray:
    """Sakoe-Chiba band around the straight line from (0, 0) to (n-1, m-1) (cells outside: inf cost);
    never narrower than the line's slope, so every row's allowed cells connect to the next row's."""
    if band is None:
        return cost
    n, m = cost.shape
    slope = (m - 1) / (n - 1) if n > 1 else float(m - 1)  # one row: the path is the whole row
    half_width = max(float(band), float(np.ceil(max(slope, 1.0))))
    centre = np.arange(n, dtype=np.float64)[:, None] * slope
    cols = np.arange(m)[None, :]
    return np.where(np.abs(cols - centre) <= half_width, cost, np.inf)


def _antidiagonal_view(a: np.ndarray) -> np.ndarray:
    """View of an (N + 1, M + 1, B) C-contiguous array by anti-diagonal: view[s, p] is a[p, s - p]
    (the element at address (s + p * M) * B). Only entries with 0 <= s - p <= M are a's elements;
    the callers never touch the others."""
    n1, m1, batch = a.shape
    item = a.itemsize
    return np.lib.stride_tricks.as_strided(a, shape=(n1 + m1 - 1, n1, batch),
                                           strides=(batch * item, (m1 - 1) * batch * item, item))


def _dtw_accumulate_batch(costs: Sequence[np.ndarray], band: Optional[int] = None) -> List[np.ndarray]:
    """Accumulated DTW cost of several cost matrices at once, one anti-diagonal at a time.

    Each cell needs only the two previous anti-diagonals, so the Python loop runs N + M - 1 times
    (N, M: the largest shapes of the batch) and every step is three numpy vector ops over the
    whole batch: the loop overhead is shared by the batch. Matrices are padded to (N, M) with inf
    cost; a cell inside a matrix only ever reads cells inside it or its inf/0 border, so padding
    never changes a value. Both the padded costs and the accumulator are (N + 1, M + 1, B) arrays
    (batch innermost) read and written through an anti-diagonal strided view, so a cell's three
    predecessors are plain slices of anti-diagonals s - 1 and s - 2 (no copies, no fancy
    indexing). The arithmetic is the cell-by-cell recursion's (the same two mins in the same
    order, then one addition), so results match it bit for bit. Memory: two (N + 1) x (M + 1) x B
    float64 arrays. Returns per matrix the usual (n + 1) x (m + 1) matrix (inf border row and
    column, acc[i + 1, j + 1] is cell (i, j))."""
    if not costs:
        return []
    costs = [_band_cost(np.asarray(c, dtype=np.float64), band) for c in costs]
    n_max = max(c.shape[0] for c in costs)
    m_max = max(c.shape[1] for c in costs)
    batch = len(costs)
    padded_cost = np.full((n_max + 1, m_max + 1, batch), np.inf, dtype=np.float64)
    for b, c in enumerate(costs):
        padded_cost[1 : c.shape[0] + 1, 1 : c.shape[1] + 1, b] = c
    acc = np.full((n_max + 1, m_max + 1, batch), np.inf, dtype=np.float64)
    acc[0, 0] = 0.0
    cost_diag, acc_diag = _antidiagonal_view(padded_cost), _antidiagonal_view(acc)
    best = np.empty((n_max + 1, batch), dtype=np.float64)
    for s in range(2, n_max + m_max + 1):
        lo, hi = max(1, s - m_max), min(n_max, s - 1) + 1  # rows p of anti-diagonal s inside the matrix
        out = best[: hi - lo]
        # min(acc[p-1, q-1], acc[p-1, q]) then min with acc[p, q-1], as in the reference
        np.minimum(acc_diag[s - 2, lo - 1 : hi - 1], acc_diag[s - 1, lo - 1 : hi - 1], out=out)
        np.minimum(out, acc_diag[s - 1, lo:hi], out=out)
        np.add(cost_diag[s, lo:hi], out, out=acc_diag[s, lo:hi])
    return [np.ascontiguousarray(acc[: c.shape[0] + 1, : c.shape[1] + 1, b]) for b, c in enumerate(costs)]


def _dtw_accumulate(cost: np.ndarray, band: Optional[int]) -> np.ndarray:
    """Accumulated DTW cost of one cost matrix (see `_dtw_accumulate_batch`)."""
    return _dtw_accumulate_batch([cost], band)[0]


@lru_cache(maxsize=1 << 16)
def _normalized_for_dtw(token: str, kind: str) -> str:
    """normalize_token(token, kind) memoised: the same few thousand tokens recur in every sequence."""
    return normalize_token(token, kind)


def _empty_alignment(n_src: int, n_tgt: int) -> TokenAlignment:
    return TokenAlignment(n_src, n_tgt, (), (), 0.0 if n_src == n_tgt == 0 else float("inf"))


def _check_align_args(substring_weight: float, band: Optional[int], ties: str = "paper") -> None:
    if substring_weight < 0:
        raise ValueError(f"substring_weight must be >= 0, got {substring_weight}.")
    if ties not in TIE_ORDERS:
        raise ValueError(f"Unknown tie order {ties!r}: expected one of {TIE_ORDERS}.")
    if band is not None and band < 0:
        raise ValueError(f"band must be None or >= 0, got {band}.")


def align_token_sequences(
    src_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
    src_kind: str = "auto",
    tgt_kind: str = "auto",
    substring_weight: float = 1.0,
    band: Optional[int] = None,
    workers: int = 1,
    ties: str = "paper",
) -> TokenAlignment:
    """Many-to-many alignment of two tokenisations of the same text by DTW.

    tgt is the pivot. Tokens are normalised with `normalize_token(kind, keep_space=False)`; the
    cost of pairing two tokens is their edit distance (x `substring_weight` when one contains the
    other, see `token_cost_matrix`; the default 1.0 is the official cost, 0.1 the containment
    discount). `ties`: the backtrack's tie order (`_backtrack`; the default "paper" is the official
    one). Complexity: O(n*m) time and memory for the cost and accumulated-cost matrices (edit
    distances in rapidfuzz's C++, the recursion vectorised over n + m - 1 anti-diagonals); a
    2048 x 2048 pair takes 32 MiB per matrix. `band` (in target
    positions, optional) restricts the path to a Sakoe-Chiba band around the diagonal, which keeps
    very long sequences from warping pathologically; it does not reduce the memory.
    Many sequences: `align_token_sequences_batch` gives the same results, faster.
    """
    return align_token_sequences_batch([(src_tokens, tgt_tokens)], src_kind, tgt_kind, substring_weight, band,
                                       workers, ties=ties)[0]


def align_token_sequences_batch(
    pairs: Sequence[Tuple[Sequence[str], Sequence[str]]],
    src_kind: str = "auto",
    tgt_kind: str = "auto",
    substring_weight: float = 1.0,
    band: Optional[int] = None,
    workers: int = 1,
    max_cells: int = 1 << 22,
    ties: str = "paper",
) -> List[TokenAlignment]:
    """`align_token_sequences` of every (src tokens, tgt tokens) pair, identical results; the DTW
    recursion runs over batches of pairs together (`_dtw_accumulate_batch`), each batch holding at
    most about `max_cells` padded cells per work array (float64: 32 MiB at the default)."""
    _check_align_args(substring_weight, band, ties)
    results: List[Optional[TokenAlignment]] = [None] * len(pairs)
    work: List[Tuple[int, np.ndarray]] = []
    for index, (src_tokens, tgt_tokens) in enumerate(pairs):
        n, m = len(src_tokens), len(tgt_tokens)
        if n == 0 or m == 0:
            results[index] = _empty_alignment(n, m)
            continue
        src_strings = [_normalized_for_dtw(t, src_kind) for t in src_tokens]
        tgt_strings = [_normalized_for_dtw(t, tgt_kind) for t in tgt_tokens]
        work.append((index, token_cost_matrix(src_strings, tgt_strings, substring_weight, workers)))

    def flush(chunk: List[Tuple[int, np.ndarray]]) -> None:
        for (index, cost), acc in zip(chunk, _dtw_accumulate_batch([c for _, c in chunk], band)):
            n, m = cost.shape
            path = _backtrack(acc, ties)
            results[index] = TokenAlignment(n, m, tuple(path), _groups_from_path(path), float(acc[n, m]))

    chunk: List[Tuple[int, np.ndarray]] = []
    n_max = m_max = 0
    for item in work:
        n, m = item[1].shape
        grown_n, grown_m = max(n_max, n), max(m_max, m)
        if chunk and (len(chunk) + 1) * (grown_n + 1) * (grown_m + 1) > max_cells:
            flush(chunk)
            chunk, grown_n, grown_m = [], n, m
        chunk.append(item)
        n_max, m_max = grown_n, grown_m
    if chunk:
        flush(chunk)
    return results  # type: ignore[return-value]


def reference_edit_distance(a: str, b: str) -> int:
    """Textbook Levenshtein distance, one row at a time (benchmark baseline)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def reference_align(
    src_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
    src_kind: str = "auto",
    tgt_kind: str = "auto",
    substring_weight: float = 1.0,
    ties: str = "paper",
) -> TokenAlignment:
    """BENCHMARK BASELINE: the same alignment as `align_token_sequences` (no band) computed the
    straightforward way, pure Python cell by cell, edit distance included. Used by the benchmarks
    to measure the fast path and by the tests as an independent check; not for production use."""
    _check_align_args(substring_weight, None, ties)
    n, m = len(src_tokens), len(tgt_tokens)
    if n == 0 or m == 0:
        return _empty_alignment(n, m)
    src_strings = [normalize_token(t, src_kind) for t in src_tokens]
    tgt_strings = [normalize_token(t, tgt_kind) for t in tgt_tokens]
    inf = float("inf")
    acc = [[inf] * (m + 1) for _ in range(n + 1)]
    acc[0][0] = 0.0
    for i, a in enumerate(src_strings):
        for j, b in enumerate(tgt_strings):
            distance = float(reference_edit_distance(a, b))
            cost = distance * substring_weight if (a in b or b in a) else distance
            acc[i + 1][j + 1] = cost + min(acc[i][j], acc[i][j + 1], acc[i + 1][j])
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        diag, up, left = acc[i][j], acc[i][j + 1], acc[i + 1][j]
        options = [(diag, -1, -1), (left, 0, -1), (up, -1, 0)] if ties == "paper" else \
            [(diag, -1, -1), (up, -1, 0), (left, 0, -1)]
        _, di, dj = min(options, key=lambda option: option[0])  # the first of equal costs
        i, j = i + di, j + dj
        path.append((i, j))
    path.reverse()
    return TokenAlignment(n, m, tuple(path), _groups_from_path(path), acc[n][m])


def one_to_one_matches(
    alignment: TokenAlignment,
    definition: str,
    src_tokens: Optional[Sequence[str]] = None,
    tgt_tokens: Optional[Sequence[str]] = None,
    src_kind: str = "auto",
    tgt_kind: str = "auto",
) -> np.ndarray:
    """Per target (pivot) position the source position whose prediction it takes, else -1.

    definition "group" (ours): the position's DTW group has one token on each side.
    definition "paper" (the official distribution alignment: FuseChat's default MS mode with the token
    alignment matrix, as its scripts run it): of the source tokens on the path with the position (one
    token may cover several pivot tokens), the first whose text ends with the pivot token's text or the
    reverse (texts as the DTW compares them, `normalize_token`); none (-1) if no such token. With several
    source tokens the official code then also tries the pivot text as a concatenation of them in order,
    taking the last piece; that never applies once the suffix test failed (the last piece of such a
    concatenation ends the pivot text), except in one case where it leaves the row empty (the joined
    pieces only end with the pivot text): -1 here. The official code compares decode([id]) strings,
    which keep a byte-level token's leading space and drop a SentencePiece one's; here both sides drop
    it. "paper" needs the tokens."""
    if definition not in ONE_TO_ONE:
        raise ValueError(f"Unknown one-to-one definition {definition!r}: expected one of {ONE_TO_ONE}.")
    if definition == "group":
        return alignment.tgt_to_src_one_to_one()
    if src_tokens is None or tgt_tokens is None:
        raise ValueError("one_to_one='paper' compares the token texts: give src_tokens and tgt_tokens.")
    if len(src_tokens) != alignment.n_src or len(tgt_tokens) != alignment.n_tgt:
        raise ValueError(f"{len(src_tokens)} source / {len(tgt_tokens)} target tokens for an alignment of "
                         f"{alignment.n_src} / {alignment.n_tgt}.")
    out = np.full(alignment.n_tgt, -1, dtype=np.int64)
    for j, sources in enumerate(alignment.tgt_to_src()):
        b = _normalized_for_dtw(tgt_tokens[j], tgt_kind)
        texts = [_normalized_for_dtw(src_tokens[i], src_kind) for i in sources]
        suffix = [i for i, a in zip(sources, texts) if a.endswith(b) or b.endswith(a)]
        if suffix:
            out[j] = suffix[0]
    return out


def text_agreement(
    alignment: TokenAlignment,
    matches: np.ndarray,
    src_tokens: Sequence[str],
    tgt_tokens: Sequence[str],
    src_kind: str = "auto",
    tgt_kind: str = "auto",
) -> Dict[str, int]:
    """How well an alignment follows the text, in target (pivot) positions. Texts are the normalised
    strings the DTW compares (spaces dropped), laid end to end, so each token spans [start, end) of
    the same character sequence on both sides (when the two tokenisations cover the same text).

    same_text: positions whose DTW group holds the same text on both sides (group source text ==
    group target text). matched: positions with a source match (`matches` >= 0). matched_same_end:
    matched positions whose source token ends where the target token ends, so that the source's
    next-token prediction is about the same next text as the target's."""
    src_texts = [_normalized_for_dtw(t, src_kind) for t in src_tokens]
    tgt_texts = [_normalized_for_dtw(t, tgt_kind) for t in tgt_tokens]
    src_end = np.cumsum([len(t) for t in src_texts])
    tgt_end = np.cumsum([len(t) for t in tgt_texts])
    same_text = sum(len(tgt) for src, tgt in alignment.groups
                    if "".join(src_texts[i] for i in src) == "".join(tgt_texts[j] for j in tgt))
    matched = [j for j in range(alignment.n_tgt) if matches[j] >= 0]
    same_end = sum(1 for j in matched if src_end[matches[j]] == tgt_end[j])
    return {"positions": alignment.n_tgt, "same_text": int(same_text), "matched": len(matched),
            "matched_same_end": int(same_end)}


# ----------------------------------------------------------------------------------------------
# Vocabulary maps: source id -> pivot id (-1 where unmapped)
# ----------------------------------------------------------------------------------------------


def _vocab_as_list(vocab: Vocab, name: str) -> List[Optional[str]]:
    """Tokens indexed by id; a dict vocabulary may have holes (None)."""
    if isinstance(vocab, Mapping):
        if not vocab:
            raise ValueError(f"{name} vocabulary is empty.")
        if min(vocab.values()) < 0:
            raise ValueError(f"{name} vocabulary has a negative token id.")
        tokens: List[Optional[str]] = [None] * (max(vocab.values()) + 1)
        for token, idx in vocab.items():
            tokens[idx] = token
        return tokens
    tokens = list(vocab)
    if not tokens:
        raise ValueError(f"{name} vocabulary is empty.")
    return tokens


def _canonical_forms(vocab: Vocab, kind: str, name: str) -> List[Optional[str]]:
    return [None if t is None else normalize_token(t, kind, keep_space=True) for t in _vocab_as_list(vocab, name)]


def vocab_map_exact(
    src_vocab: Vocab, pivot_vocab: Vocab, src_kind: str = "auto", pivot_kind: str = "auto"
) -> np.ndarray:
    """EM: source id -> the pivot id whose normalised text (spaces kept, see `normalize_token`)
    is identical, else -1. When several pivot tokens share a text the smallest pivot id wins."""
    src = _canonical_forms(src_vocab, src_kind, "source")
    pivot_index: Dict[str, int] = {}
    for idx, text in enumerate(_canonical_forms(pivot_vocab, pivot_kind, "pivot")):
        if text is not None and text not in pivot_index:
            pivot_index[text] = idx
    return np.array([pivot_index.get(text, -1) if text is not None else -1 for text in src], dtype=np.int64)


def vocab_map_min_ed(
    src_vocab: Vocab,
    pivot_vocab: Vocab,
    src_kind: str = "auto",
    pivot_kind: str = "auto",
    chunk_size: int = 512,
    workers: int = 1,
) -> np.ndarray:
    """MinED: the exact match if there is one, else the pivot token with the smallest Levenshtein
    distance between normalised texts (spaces kept). Ties go to the smallest pivot id (np.argmin
    takes the first minimum of a row ordered by pivot id), so the map is deterministic. Distances
    come from rapidfuzz.process.cdist in chunks of `chunk_size` source tokens (memory
    chunk_size x pivot vocabulary int32)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    mapping = vocab_map_exact(src_vocab, pivot_vocab, src_kind, pivot_kind)
    src = _canonical_forms(src_vocab, src_kind, "source")
    pivot = _canonical_forms(pivot_vocab, pivot_kind, "pivot")
    pivot_ids = np.array([i for i, t in enumerate(pivot) if t is not None], dtype=np.int64)
    pivot_texts = [pivot[i] for i in pivot_ids]
    todo = [i for i, t in enumerate(src) if t is not None and mapping[i] < 0]
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        distance = process.cdist([src[i] for i in chunk], pivot_texts, scorer=Levenshtein.distance,
                                 dtype=np.int32, workers=workers)
        mapping[chunk] = pivot_ids[np.argmin(distance, axis=1)]
    return mapping


AlignedSequence = Tuple[Sequence[int], Sequence[int], TokenAlignment]


def _check_lengths(src_ids: Sequence[int], pivot_ids: Sequence[int], alignment: TokenAlignment) -> None:
    if len(src_ids) != alignment.n_src or len(pivot_ids) != alignment.n_tgt:
        raise ValueError(f"Aligned sequence lengths ({len(src_ids)}, {len(pivot_ids)}) differ from the alignment's "
                         f"({alignment.n_src}, {alignment.n_tgt}).")


def count_one_to_one_pairs(aligned_corpus: Iterable[AlignedSequence]) -> Counter:
    """Counter of (source id, pivot id) over every one-to-one group of every aligned sequence.
    Each item is (source token ids, pivot token ids, alignment with source as src, pivot as tgt)."""
    counts: Counter = Counter()
    for src_ids, pivot_ids, alignment in aligned_corpus:
        _check_lengths(src_ids, pivot_ids, alignment)
        for i, j in alignment.one_to_one_pairs():
            counts[(int(src_ids[i]), int(pivot_ids[j]))] += 1
    return counts


def count_path_pairs(aligned_corpus: Iterable[AlignedSequence]) -> Counter:
    """Counter of (source id, pivot id) over every pivot position and each distinct source id on the
    DTW path with it (what the official statistics-based map counts: a pivot position adds 1 to each
    source id aligned with it, once per id). Items as in `count_one_to_one_pairs`."""
    counts: Counter = Counter()
    for src_ids, pivot_ids, alignment in aligned_corpus:
        _check_lengths(src_ids, pivot_ids, alignment)
        for j, sources in enumerate(alignment.tgt_to_src()):
            for s in {int(src_ids[i]) for i in sources}:
                counts[(s, int(pivot_ids[j]))] += 1
    return counts


def discounted_distance(src_text: str, pivot_text: str, src_spaced: str, pivot_spaced: str) -> float:
    """The official statistics-based map's token distance: the edit distance of the texts without
    spaces, x 0.1 when one contains the other; when either text is empty (a pure space or marker
    token), of the texts with their spaces (`normalize_token(keep_space=True)`)."""
    a, b = (src_text, pivot_text) if src_text and pivot_text else (src_spaced, pivot_spaced)
    weight = CONTAINMENT_DISCOUNT if (a in b or b in a) else 1.0
    return Levenshtein.distance(a, b) * weight


def vocab_map_statistics(
    aligned_corpus: Iterable[AlignedSequence],
    src_vocab: Vocab,
    pivot_vocab: Vocab,
    src_kind: str = "auto",
    pivot_kind: str = "auto",
    min_count: int = 1,
    fallback: str = "min_ed",
    rule: str = "paper",
) -> np.ndarray:
    """MS: learn the map from how tokens were actually aligned over a corpus.

    rule "paper" (the official code): count every (source, pivot) pair on the DTW paths
    (`count_path_pairs`); a source id with an exact match (`vocab_map_exact`) maps to it (the official
    distribution alignment tries the exact match first); any other source id s maps to the pivot id p,
    among those counted with s at least `min_count` times, with the least
    `discounted_distance(s, p) * sigmoid(count(s, p))`, ties to the smaller pivot id (the official
    argmin over ascending ids). `fallback` is not used: source ids never counted stay -1 (the official
    code maps them to the pivot's unk / eos token).

    rule "ours": for source id s, among the pivot ids p seen one-to-one with s at least `min_count` times,
    pick the largest score count(s, p) / (1 + ED(s, p)), ED on normalised texts with spaces kept;
    ties go to the smaller ED, then to the smaller pivot id. A frequent pair with a small edit
    distance wins; a frequent but textually unrelated pair (alignment noise) needs many more
    occurrences to win. Source ids never seen one-to-one take `fallback`: "min_ed" (the MinED
    map), "exact" (the EM map) or "none" (-1). The one-to-one pairs are the groups of the corpus's
    alignments (the align stage passes alignments holding the pairs of its `one_to_one` definition).
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}.")
    fallbacks = ("min_ed", "exact", "none")
    if fallback not in fallbacks:
        raise ValueError(f"Unknown fallback {fallback!r}: expected one of {fallbacks}.")
    if rule not in MS_RULES:
        raise ValueError(f"Unknown MS rule {rule!r}: expected one of {MS_RULES}.")
    src = _canonical_forms(src_vocab, src_kind, "source")
    pivot = _canonical_forms(pivot_vocab, pivot_kind, "pivot")
    if rule == "paper":
        return _vocab_map_statistics_paper(count_path_pairs(aligned_corpus), src_vocab, pivot_vocab, src_kind,
                                           pivot_kind, min_count, src, pivot)
    if fallback == "min_ed":
        mapping = vocab_map_min_ed(src_vocab, pivot_vocab, src_kind, pivot_kind)
    elif fallback == "exact":
        mapping = vocab_map_exact(src_vocab, pivot_vocab, src_kind, pivot_kind)
    else:
        mapping = np.full(len(src), -1, dtype=np.int64)
    best: Dict[int, Tuple[float, int, int]] = {}  # s -> (-score, ed, p): smaller is better
    for (s, p), count in count_one_to_one_pairs(aligned_corpus).items():
        if count < min_count:
            continue
        if not (0 <= s < len(src)) or src[s] is None:
            raise ValueError(f"Source id {s} from the aligned corpus is not in the source vocabulary.")
        if not (0 <= p < len(pivot)) or pivot[p] is None:
            raise ValueError(f"Pivot id {p} from the aligned corpus is not in the pivot vocabulary.")
        ed = Levenshtein.distance(src[s], pivot[p])
        key = (-count / (1.0 + ed), ed, p)
        if s not in best or key < best[s]:
            best[s] = key
    for s, (_, _, p) in best.items():
        mapping[s] = p
    return mapping


def _vocab_map_statistics_paper(counts: Counter, src_vocab: Vocab, pivot_vocab: Vocab, src_kind: str,
                                pivot_kind: str, min_count: int, src: List[Optional[str]],
                                pivot: List[Optional[str]]) -> np.ndarray:
    """vocab_map_statistics(rule="paper") from the path-pair counts; src / pivot: texts with spaces."""
    mapping = vocab_map_exact(src_vocab, pivot_vocab, src_kind, pivot_kind)
    best: Dict[int, Tuple[float, int]] = {}  # s -> (weighted distance, p): smaller is better
    for (s, p), count in counts.items():
        if count < min_count:
            continue
        if not (0 <= s < len(src)) or src[s] is None:
            raise ValueError(f"Source id {s} from the aligned corpus is not in the source vocabulary.")
        if not (0 <= p < len(pivot)) or pivot[p] is None:
            raise ValueError(f"Pivot id {p} from the aligned corpus is not in the pivot vocabulary.")
        if mapping[s] >= 0:
            continue  # an exact match wins
        distance = discounted_distance(src[s].replace(" ", ""), pivot[p].replace(" ", ""), src[s], pivot[p])
        key = (distance / (1.0 + math.exp(-count)), p)
        if s not in best or key < best[s]:
            best[s] = key
    for s, (_, p) in best.items():
        mapping[s] = p
    return mapping


# ----------------------------------------------------------------------------------------------
# Distribution alignment
# ----------------------------------------------------------------------------------------------


def align_distributions(
    src_topk_ids: np.ndarray,
    src_topk_logits: np.ndarray,
    alignment: TokenAlignment,
    vocab_map: np.ndarray,
    pivot_gold_ids: Sequence[int],
    k: int,
    next_token_offset: int = 1,
) -> Tuple[np.ndarray, np.ndarray]:
    """The source's stored top-k distributions re-expressed at the pivot's positions and vocabulary.

    src_topk_ids / src_topk_logits: [L_src, K] per source position (pads: id < 0 or logit -inf).
    alignment: from `align_token_sequences(source tokens, pivot tokens)`.
    vocab_map: source id -> pivot id (-1 unmapped), from one of the vocab_map_* functions.
    pivot_gold_ids: the pivot tokenisation's token ids of the text, length L_pivot (ids < 0 such as
    -100 mean "no gold token here").

    Position convention: the logits stored at position i were computed from tokens 0..i, so they
    predict token i + 1. Where pivot position i is matched one-to-one with source position j, the
    source row j is used (its ids mapped; unmapped ids dropped; duplicate pivot ids keep the higher
    logit). Everywhere else, or when no id survives the mapping, the row is a one-hot (logit 0) on
    pivot_gold_ids[i + next_token_offset], the token that position's logits predict, as FuseChat's
    align_token_and_vocab.py does (its labels are the input ids shifted by one). FuseLLM's code puts
    the one-hot on the input token i itself (next_token_offset=0), an off-by-one that teaches the
    student to repeat its input. If that gold index is past the end or negative, the row stays empty
    (all padding; FuseChat repeats the last token there).

    Returns (ids [L_pivot, k] int64 padded with -1, logits [L_pivot, k] float32 padded with -inf),
    each row sorted by logit, highest first.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    ids = np.asarray(src_topk_ids)
    logits = np.asarray(src_topk_logits, dtype=np.float64)
    vocab_map = np.asarray(vocab_map, dtype=np.int64)
    gold = np.asarray(pivot_gold_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape != logits.shape:
        raise ValueError(f"src_topk_ids {ids.shape} and src_topk_logits {logits.shape} must both be [L_src, K].")
    if ids.shape[0] != alignment.n_src:
        raise ValueError(f"{ids.shape[0]} source positions of top-k but the alignment has {alignment.n_src}.")
    if gold.ndim != 1 or gold.shape[0] != alignment.n_tgt:
        raise ValueError(f"pivot_gold_ids has shape {gold.shape}; the alignment has {alignment.n_tgt} pivot positions.")
    if ids.size and ids.max() >= len(vocab_map):
        raise ValueError(f"Source id {int(ids.max())} is outside the vocabulary map (size {len(vocab_map)}).")

    out_ids = np.full((alignment.n_tgt, k), -1, dtype=np.int64)
    out_logits = np.full((alignment.n_tgt, k), -np.inf, dtype=np.float32)
    matched = alignment.tgt_to_src_one_to_one()
    for i in range(alignment.n_tgt):
        kept: Dict[int, float] = {}
        j = matched[i]
        if j >= 0:
            for src_id, logit in zip(ids[j], logits[j]):
                if src_id < 0 or not np.isfinite(logit):
                    continue
                pivot_id = int(vocab_map[src_id])
                if pivot_id >= 0 and (pivot_id not in kept or logit > kept[pivot_id]):
                    kept[pivot_id] = float(logit)
        if not kept:
            g = i + next_token_offset
            if 0 <= g < len(gold) and gold[g] >= 0:
                kept[int(gold[g])] = 0.0
        # Highest logit first; equal logits by pivot id so the output is deterministic.
        ranked = sorted(kept.items(), key=lambda item: (-item[1], item[0]))[:k]
        for slot, (pivot_id, logit) in enumerate(ranked):
            out_ids[i, slot] = pivot_id
            out_logits[i, slot] = logit
    return out_ids, out_logits
