"""Causal-LM DataModule: corpus -> token shards on disk (prepared once, data/shards.py) -> blocks -> rank shards.

Preparation (`prepare`, also `make data`): the corpus source (data/corpus.py), the tokenizer, then the shard
directory of this corpus and tokenizer under data.cache_dir: found, or built once (in parallel, resumably) by
the one process that holds the cache lock while the others wait for it and then find it.
Packing: per domain and split, documents (each followed by EOS) are concatenated and cut into blocks of
``block_size`` tokens (the remainder of each domain is dropped): a block is an index range into the
shard files, read by offset when asked for, so every block carries one domain label and the block size can
change without re-tokenising. The split is by document (see data/shards.py), so no validation text leaks
into training. A masked corpus (chat data with data.loss_on=assistant, data/chat.py) gives labels -100 where
a token is not a target of the loss: every loss that honours -100 (lm_loss, the fusion loss) then counts the
assistant tokens only.
Sharding: ``ShardedBlockSampler`` gives global rank r the positions r, r+W, r+2W, ... of a per-epoch
permutation (seeded by seed + epoch, computed by position: nothing of the size of the corpus is held),
padded by wrap-around to equal length on every rank. It is stateful, and the loader is torchdata's
``StatefulDataLoader``: Lightning stores its state in the checkpoint, so a run resumed mid-epoch continues
with exactly the next batch.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from .config import DataConfig
from .corpus import CorpusSource, DataError, Document, embedded_documents, open_source
from .shards import (
    VERSION,
    BlockArray,
    BlockIndex,
    DomainArray,
    TokenShards,
    encoder_spec,
    format_counts,
    prepare_shards,
    shard_key,
)
from .tokenizers import EMBEDDED_KINDS, load_or_train_tokenizer


class ShardBlocks(Dataset):
    """The fixed-length token blocks of one split of a shard directory, with a domain index per block.
    `blocks` and `domains` are array-likes read on access (`np.asarray` materialises them). In a masked
    corpus the labels are -100 where the loss mask is 0 (`loss_mask(i)`: block i's mask)."""

    def __init__(self, shards: TokenShards, split: str, block_size: int):
        self.index = BlockIndex(shards, split, block_size)
        self.blocks = BlockArray(self.index)
        self.domains = DomainArray(self.index)
        self.masked = shards.masked

    def __len__(self) -> int:
        return len(self.index)

    def loss_mask(self, i: int) -> np.ndarray:
        """Block i's loss mask: uint8, 1 where the token is a target (all ones without masks)."""
        return self.index.mask(int(i))

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        tokens, dom = self.index.block(int(i))
        ids = torch.from_numpy(tokens.astype(np.int64))
        labels = ids.clone()
        if self.masked:
            labels[torch.from_numpy(self.index.mask(int(i)) == 0)] = -100
        return {"input_ids": ids, "labels": labels, "domain": torch.tensor(dom)}


def pack_sequences(token_lists: List[List[int]], eos_id: int, block_size: int) -> np.ndarray:
    """Concatenate sequences, each followed by EOS, and cut into full blocks (remainder dropped): the packing
    that the shard blocks implement by index arithmetic (the reference the tests compare them with)."""
    total = sum(len(t) + 1 for t in token_lists)
    flat = np.empty(total, dtype=np.int64)
    pos = 0
    for t in token_lists:
        flat[pos : pos + len(t)] = t
        flat[pos + len(t)] = eos_id
        pos += len(t) + 1
    n_blocks = total // block_size
    return flat[: n_blocks * block_size].reshape(n_blocks, block_size)


# ------------------------------------------------------------------------------------- order and sharding

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser of x ^ key (uint64, wrapping)."""
    x = x ^ key
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def permute(positions: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded pseudo-random permutation of range(n), evaluated at `positions` (each in range(n)) without
    materialising it: a 4-round Feistel network over the smallest even number of bits that holds n,
    cycle-walked back into range(n). O(len(positions)) time and memory, whatever n."""
    x = np.asarray(positions, dtype=np.uint64).copy()
    if n <= 1:
        return x.astype(np.int64)
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2
    mask = np.uint64((1 << half) - 1)
    keys = _mix(np.arange(4, dtype=np.uint64) + np.uint64(1), np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
    todo = np.ones(len(x), dtype=bool)
    with np.errstate(over="ignore"):
        while todo.any():
            v = x[todo]
            left, right = v >> np.uint64(half), v & mask
            for k in keys:
                left, right = right, left ^ (_mix(right, k) & mask)
            v = (left << np.uint64(half)) | right
            x[todo] = v
            todo[todo] = v >= np.uint64(n)
    return x.astype(np.int64)


def epoch_order(positions: np.ndarray, n: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The block at each position of an epoch's order (positions >= n wrap around: the padding)."""
    p = np.asarray(positions, dtype=np.int64) % max(n, 1)
    return permute(p, n, seed + epoch) if shuffle else p


def shard_indices(n: int, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool) -> List[int]:
    """This rank's share of one epoch: a seeded permutation (or 0..n-1), padded to a multiple of the
    world size by wrapping around, then every world_size-th element starting at rank."""
    per_rank = -(-n // world_size)
    positions = np.arange(rank, per_rank * world_size, world_size, dtype=np.int64)
    return epoch_order(positions, n, epoch, seed, shuffle).tolist()


class ShardedBlockSampler(Sampler[int]):
    """Rank-sharded, epoch-seeded, resumable sampler (state = epoch and samples already yielded).
    `per_epoch=False` keeps the epoch-0 order every epoch (validation: the same subset under a batch limit)."""

    CHUNK = 8192  # positions computed at a time

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 per_epoch: bool = True):
        self.n, self.rank, self.world_size, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.per_epoch = per_epoch
        self.epoch = 0
        self._yielded = 0
        self._resume_from = 0

    def set_epoch(self, epoch: int) -> None:
        if self.per_epoch and epoch != self.epoch:
            self.epoch = epoch
            self._resume_from = 0

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __iter__(self) -> Iterator[int]:
        start, self._resume_from = self._resume_from, 0
        self._yielded = start
        for lo in range(start, len(self), self.CHUNK):
            hi = min(lo + self.CHUNK, len(self))
            positions = np.arange(lo, hi, dtype=np.int64) * self.world_size + self.rank
            for i in epoch_order(positions, self.n, self.epoch, self.seed, self.shuffle).tolist():
                self._yielded += 1
                yield i

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "yielded": self._yielded}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self._resume_from = int(state["yielded"])
        self._yielded = self._resume_from


def _dist_info() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def tokenizer_hash(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class LMDataModule(L.LightningDataModule):
    def __init__(self, settings: DataConfig, seed: int = 1234, trust_remote_code: bool = False,
                 progress: bool = True):
        super().__init__()
        problems = settings.problems()
        if problems:
            raise DataError(problems[0])
        self.s = settings
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.progress = progress
        self.tokenizer = None
        self.domain_names: List[str] = []
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.shards: Optional[TokenShards] = None
        self.shard_dir: Optional[Path] = None
        self.manifest: Dict[str, Any] = {}
        self.built = False  # whether this process tokenised (False: the shards were found)
        self.stats: Dict[str, Any] = {}
        self._prepared = False

    @property
    def num_proc(self) -> int:
        return self.s.num_proc or available_cpus()

    def tokenizer_documents(self, source: CorpusSource) -> List[Document]:
        """Embedded tokenizers are trained on the whole embedded corpus (all domains, default budget), so
        models trained on different domains share a tokenizer; a files / hub corpus trains on its first
        data.tokenizer_train_chars characters."""
        if self.s.tokenizer not in EMBEDDED_KINDS:
            return []
        if self.s.source == "embedded":
            allds = embedded_documents(("pydoc", "stdlib", "licenses"), 1_000_000)
            return [d for dom in sorted(allds) for d in allds[dom]]
        return source.sample(self.s.tokenizer_train_chars)

    def _log(self, msg: str) -> None:
        if self.progress:
            print(msg, file=sys.stderr, flush=True)

    def prepare(self) -> None:
        """Source, tokenizer, token shards (found or built once), then the block datasets. Every rank calls
        it: under the cache lock one process builds what is missing, the others wait and then reuse it."""
        if self._prepared:
            return
        from filelock import FileLock

        s = self.s
        cache = Path(s.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache / ".prepare.lock")):
            source = open_source(s)
            self.tokenizer = load_or_train_tokenizer(s.tokenizer, s.vocab_size, self.tokenizer_documents(source),
                                                     s.cache_dir, self.trust_remote_code)
            tok_hash = tokenizer_hash(self.tokenizer)
            source.use_tokenizer(self.tokenizer)
            identity = source.identity()
            key = shard_key({"version": VERSION, "source": identity, "tokenizer": tok_hash,
                             "val_fraction": s.val_fraction, "shard_chars": s.shard_chars})
            self.shard_dir = cache / "shards" / f"{s.source}-{key}"
            if not (self.shard_dir / "manifest.json").exists():
                self._log(f"data: tokenising the {s.source} corpus into {self.shard_dir} "
                          f"({self.num_proc} process(es))")
            info = {"tokenizer": {"spec": s.tokenizer, "hash": tok_hash, "copy": "tokenizer",
                                  "vocab_size": len(self.tokenizer)},
                    "source": identity}
            self.manifest, self.built = prepare_shards(
                self.shard_dir, source, encoder_spec(self.tokenizer), self.tokenizer.eos_token_id,
                len(self.tokenizer), s.val_fraction, s.shard_chars, self.num_proc, info, log=self._log)
            if not (self.shard_dir / "tokenizer").exists():
                tmp = self.shard_dir / f"tokenizer.tmp{os.getpid()}"
                self.tokenizer.save_pretrained(str(tmp))
                os.replace(tmp, self.shard_dir / "tokenizer")
            if self.built:
                m = self.manifest
                self._log(f"data: {m['total_tokens']:,} tokens in {len(m['shards'])} shard(s), "
                          f"{m['prepared']['seconds']} s")
        self._open()
        self._prepared = True

    def _open(self) -> None:
        s = self.s
        self.shards = TokenShards(self.shard_dir)
        self.domain_names = list(self.manifest["domains"])
        self.train_set = ShardBlocks(self.shards, "train", s.block_size)
        self.val_set = ShardBlocks(self.shards, "val", s.block_size)
        counts = self.manifest["counts"]
        for split, ds in (("train", self.train_set), ("val", self.val_set)):
            for d, dom in enumerate(self.domain_names):
                if ds.index.per_domain[d] == 0:
                    raise DataError(
                        f"data.block_size={s.block_size} is larger than the {split} text of domain '{dom}' "
                        f"({counts[dom]['tokens'][split]} tokens): lower data.block_size or add text.")
        self.stats = {"domains": self.domain_names,
                      "tokens": {dom: dict(counts[dom]["tokens"]) for dom in self.domain_names},
                      "docs": {dom: dict(counts[dom]["docs"]) for dom in self.domain_names},
                      "train_blocks": len(self.train_set), "val_blocks": len(self.val_set),
                      "block_size": s.block_size, "vocab_size": len(self.tokenizer),
                      "shard_dir": str(self.shard_dir), "built": self.built, "loss_mask": self.shards.masked}

    def summary_lines(self) -> List[str]:
        self.prepare()
        return [f"shards: {self.shard_dir} ({'prepared now' if self.built else 'reused'}; "
                f"{self.manifest['total_tokens']:,} tokens, {self.manifest['dtype']})",
                *format_counts(self.manifest),
                f"blocks of {self.s.block_size}: {len(self.train_set):,} train, {len(self.val_set):,} validation"]

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare()

    @property
    def vocab_size(self) -> int:
        self.prepare()
        return len(self.tokenizer)

    def loader(self, split: str, rank: Optional[int] = None, world_size: Optional[int] = None) -> StatefulDataLoader:
        """The resumable loader of a split for one rank (default: this process's rank in the process group)."""
        self.prepare()
        if rank is None or world_size is None:
            rank, world_size = _dist_info()
        if split == "train":
            sampler = ShardedBlockSampler(len(self.train_set), rank, world_size, seed=self.seed, shuffle=True)
            return StatefulDataLoader(self.train_set, batch_size=self.s.batch_size, sampler=sampler,
                                      num_workers=self.s.num_workers, drop_last=True,
                                      persistent_workers=self.s.num_workers > 0)
        # validation: one fixed shuffled order, so that a batch limit sees every domain
        sampler = ShardedBlockSampler(len(self.val_set), rank, world_size, seed=self.seed, shuffle=True,
                                      per_epoch=False)
        return StatefulDataLoader(self.val_set, batch_size=self.s.val_batch_size, sampler=sampler,
                                  num_workers=self.s.num_workers)

    def train_dataloader(self) -> StatefulDataLoader:
        return self.loader("train")

    def val_dataloader(self) -> StatefulDataLoader:
        return self.loader("val")
