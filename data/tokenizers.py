"""Embedded default tokenizers, trained with Hugging Face `tokenizers` at first use and cached.

Two different kinds, so that cross-tokenizer fusion is exercised for real:
- ``bpe``:     byte-level BPE (GPT-2 style, ``Ġ`` space marker), no unknown tokens.
- ``unigram``: SentencePiece-style Unigram with Metaspace (``▁`` marker) and byte fallback.
Training is deterministic for a given corpus, kind and size; the result is cached under
``<cache_dir>/tokenizers/<kind>-<vocab>-<corpus hash>/tokenizer.json`` (written atomically).
Anything else in ``data.tokenizer`` is a path to a saved tokenizer (or a hub name, with network).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterable, List

from .corpus import DataError, Document, corpus_fingerprint

EOS = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"
EMBEDDED_KINDS = ("bpe", "unigram")


def _progress(message: str) -> None:
    """One line on stderr about tokenizer training (it takes seconds to minutes on a large corpus), from the
    first process only: DDP children and other SLURM tasks find the same cache a moment later."""
    if all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "RANK", "SLURM_PROCID")):
        print(f"[data] {message}", file=sys.stderr, flush=True)


def _show_progress() -> bool:
    """The trainers' own progress bars (from the Rust side of `tokenizers`) on an interactive terminal only: in
    a log file they are noise."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _batches(docs: List[Document], size: int = 256) -> Iterable[List[str]]:
    for i in range(0, len(docs), size):
        yield [d.text for d in docs[i : i + size]]


def train_tokenizer(kind: str, vocab_size: int, docs: List[Document]):
    """Train a raw `tokenizers.Tokenizer` of the given kind on the documents (in the given order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=_show_progress(),
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size - 256,  # the 256 byte-fallback pieces are added after training
            special_tokens=[EOS, PAD, UNK],
            unk_token=UNK,
            show_progress=_show_progress(),
        )
        tok.train_from_iterator(_batches(docs), trainer=trainer, length=len(docs))
        return _canonical_unigram(tok)
    else:
        raise DataError(f"Unknown embedded tokenizer '{kind}' (data.tokenizer): use one of {EMBEDDED_KINDS} or a path.")
    tok.train_from_iterator(_batches(docs), trainer=trainer, length=len(docs))
    return tok


def _canonical_unigram(tok):
    """The Unigram trainer is not bit-deterministic (hash-map order and float summation change the
    last digits of scores and the order of equal-score pieces); the piece set is stable. Round the
    scores and sort, so the same corpus always gives the same tokenizer, then add byte fallback."""
    import json

    from tokenizers import Tokenizer, models

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    specials = [v for v in vocab if v[0] in (EOS, PAD, UNK)]
    # Required single characters get made-up scores in hash order (steps of ~1e-4): coarser rounding
    # for them makes their order canonical; real pieces keep 6 decimals.
    pieces = sorted(([p, round(s, 2 if len(p) == 1 else 6)] for p, s in vocab if p not in (EOS, PAD, UNK)),
                    key=lambda v: (-v[1], v[0]))
    floor = min(s for _, s in pieces) - 10.0
    byte_pieces = [[f"<0x{b:02X}>", floor] for b in range(256)]
    vocab = specials + pieces + byte_pieces
    out = Tokenizer(models.Unigram([tuple(v) for v in vocab], unk_id=[v[0] for v in vocab].index(UNK),
                                   byte_fallback=True))
    out.pre_tokenizer = tok.pre_tokenizer
    out.decoder = tok.decoder
    from tokenizers import AddedToken

    out.add_special_tokens([AddedToken(t, special=True) for t in (EOS, PAD, UNK)])
    return out


def _wrap(tokenizer_file: Path):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token=EOS, pad_token=PAD)
    if fast.convert_tokens_to_ids(UNK) != fast.unk_token_id and UNK in fast.get_vocab():
        fast.unk_token = UNK
    return fast


def load_or_train_tokenizer(kind_or_path: str, vocab_size: int, docs: List[Document], cache_dir: str,
                            trust_remote_code: bool = False):
    """The tokenizer for a config: an embedded kind (trained once, cached) or a path/hub name."""
    if kind_or_path in EMBEDDED_KINDS:
        key = f"{kind_or_path}-{vocab_size}-{corpus_fingerprint({'_': docs})}"
        out_dir = Path(cache_dir) / "tokenizers" / key
        out_file = out_dir / "tokenizer.json"
        if not out_file.exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            chars = sum(len(d.text) for d in docs)
            _progress(f"training the {kind_or_path} tokenizer (vocabulary {vocab_size}) on {len(docs)} documents, "
                      f"{chars / 1e6:.1f}M characters (once; cached in {out_dir}) ...")
            t0 = time.perf_counter()
            tok = train_tokenizer(kind_or_path, vocab_size, docs)
            tmp = out_dir / f"tokenizer.json.tmp{os.getpid()}"
            tok.save(str(tmp))
            os.replace(tmp, out_file)
            _progress(f"tokenizer trained in {time.perf_counter() - t0:.1f} s: {out_file}")
        return _wrap(out_file)
    from transformers import AutoTokenizer

    path = Path(kind_or_path).expanduser()
    if path.exists():
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(kind_or_path, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise DataError(
                f"data.tokenizer='{kind_or_path}' is neither an embedded kind ({', '.join(EMBEDDED_KINDS)}), "
                f"nor an existing path, nor loadable from the hub ({type(e).__name__})."
            ) from None
    if tok.eos_token_id is None:
        raise DataError(f"Tokenizer {kind_or_path} has no EOS token; packing needs one to separate documents.")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
