"""Causal-LM DataModule: documents -> tokenised (cached `datasets.map`) -> packed blocks -> rank shards.

Packing: per domain, each document's tokens followed by EOS are concatenated and cut into blocks of
``block_size`` tokens (the remainder of each domain is dropped), so every block carries one domain label.
The split is by document (``corpus.split_documents``), so no validation text leaks into training.
Sharding: ``ShardedBlockSampler`` gives global rank r the positions r, r+W, r+2W, ... of a per-epoch
permutation (seeded by seed + epoch), padded by wrap-around to equal length on every rank. It is stateful,
and the loader is torchdata's ``StatefulDataLoader``: Lightning stores its state in the checkpoint, so a
run resumed mid-epoch continues with exactly the next batch.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from .config import DataConfig
from .corpus import (
    DataError,
    Document,
    corpus_fingerprint,
    embedded_documents,
    files_documents,
    hub_documents,
    split_documents,
)
from .tokenizers import EMBEDDED_KINDS, load_or_train_tokenizer


class PackedBlocks(Dataset):
    """Fixed-length token blocks with a domain index per block."""

    def __init__(self, blocks: np.ndarray, domains: np.ndarray):
        self.blocks = blocks
        self.domains = domains

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(self.blocks[i], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone(), "domain": torch.tensor(int(self.domains[i]))}


def pack_sequences(token_lists: List[List[int]], eos_id: int, block_size: int) -> np.ndarray:
    """Concatenate sequences, each followed by EOS, and cut into full blocks (remainder dropped)."""
    total = sum(len(t) + 1 for t in token_lists)
    flat = np.empty(total, dtype=np.int64)
    pos = 0
    for t in token_lists:
        flat[pos : pos + len(t)] = t
        flat[pos + len(t)] = eos_id
        pos += len(t) + 1
    n_blocks = total // block_size
    return flat[: n_blocks * block_size].reshape(n_blocks, block_size)


def shard_indices(n: int, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool) -> List[int]:
    """This rank's share of one epoch: a seeded permutation (or 0..n-1), padded to a multiple of the
    world size by wrapping around, then every world_size-th element starting at rank."""
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    per_rank = -(-n // world_size)
    order = order + order[: per_rank * world_size - n]
    return order[rank::world_size]


class ShardedBlockSampler(Sampler[int]):
    """Rank-sharded, epoch-seeded, resumable sampler (state = epoch and samples already yielded)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.n, self.rank, self.world_size, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.epoch = 0
        self._yielded = 0
        self._resume_from = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume_from = 0

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def __iter__(self) -> Iterator[int]:
        idx = shard_indices(self.n, self.rank, self.world_size, self.epoch, self.seed, self.shuffle)
        start, self._resume_from = self._resume_from, 0
        self._yielded = start
        for i in idx[start:]:
            self._yielded += 1
            yield i

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "yielded": self._yielded}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self._resume_from = int(state["yielded"])
        self._yielded = self._resume_from


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class LMDataModule(L.LightningDataModule):
    def __init__(self, settings: DataConfig, seed: int = 1234, trust_remote_code: bool = False):
        super().__init__()
        self.s = settings
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.tokenizer = None
        self.domain_names: List[str] = []
        self.train_set: Optional[PackedBlocks] = None
        self.val_set: Optional[PackedBlocks] = None
        self.stats: Dict[str, Any] = {}
        self._prepared = False

    # ------------------------------------------------------------------ preparation (cached, idempotent)
    def _documents(self) -> Dict[str, List[Document]]:
        s = self.s
        if s.source == "embedded":
            return embedded_documents(s.domains, s.max_chars_per_domain)
        if s.source == "files":
            return files_documents(s.files, s.text_field)
        if s.source == "hub":
            if not s.hub_name:
                raise DataError("data.source=hub needs data.hub_name.")
            return hub_documents(s.hub_name, s.hub_split, s.text_field, str(Path(s.cache_dir) / "hub"))
        raise DataError(f"Unknown data.source '{s.source}'.")

    def tokenizer_documents(self, docs: Dict[str, List[Document]]) -> List[Document]:
        """Embedded tokenizers are trained on the whole embedded corpus (all domains, default budget), so
        models trained on different domains share a tokenizer; file/hub corpora train on themselves."""
        if self.s.source == "embedded" and self.s.tokenizer in EMBEDDED_KINDS:
            allds = embedded_documents(("pydoc", "stdlib", "licenses"), 1_000_000)
            return [d for dom in sorted(allds) for d in allds[dom]]
        return [d for dom in sorted(docs) for d in docs[dom]]

    def prepare(self) -> None:
        """Load documents, get the tokenizer, tokenise and pack (all cached). Safe to call on every rank."""
        if self._prepared:
            return
        from filelock import FileLock

        s = self.s
        cache = Path(s.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache / ".prepare.lock")):
            docs = self._documents()
            self.tokenizer = load_or_train_tokenizer(
                s.tokenizer, s.vocab_size, self.tokenizer_documents(docs), s.cache_dir, self.trust_remote_code
            )
            self.domain_names = sorted(docs)
            tok_hash = hashlib.md5(self.tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:12] \
                if hasattr(self.tokenizer, "backend_tokenizer") else s.tokenizer.replace("/", "_")
            key = f"{corpus_fingerprint(docs)}-{tok_hash}-b{s.block_size}-v{s.val_fraction}"
            pack_dir = cache / "packed" / key
            if not (pack_dir / "meta.json").exists():
                self._tokenize_and_pack(docs, pack_dir)
        meta = json.loads((pack_dir / "meta.json").read_text())
        self.stats = meta
        self.train_set = PackedBlocks(np.load(pack_dir / "train_blocks.npy", mmap_mode="r"),
                                      np.load(pack_dir / "train_domains.npy"))
        self.val_set = PackedBlocks(np.load(pack_dir / "val_blocks.npy", mmap_mode="r"),
                                    np.load(pack_dir / "val_domains.npy"))
        self._prepared = True

    def _tokenize_and_pack(self, docs: Dict[str, List[Document]], pack_dir: Path) -> None:
        import datasets

        s = self.s
        tok = self.tokenizer
        eos = tok.eos_token_id
        out: Dict[str, tuple] = {}
        token_counts: Dict[str, Dict[str, int]] = {}
        map_cache = Path(s.cache_dir) / "tokenized"
        map_cache.mkdir(parents=True, exist_ok=True)
        for split_name in ("train", "val"):
            blocks, doms = [], []
            for di, dom in enumerate(self.domain_names):
                train_docs, val_docs = split_documents(docs[dom], s.val_fraction)
                part = train_docs if split_name == "train" else val_docs
                ds = datasets.Dataset.from_dict({"text": [d.text for d in part]})
                fp = hashlib.md5((pack_dir.name + dom + split_name).encode()).hexdigest()
                ds = ds.map(
                    lambda b: {"ids": tok(b["text"], add_special_tokens=False)["input_ids"]},
                    batched=True, remove_columns=["text"], new_fingerprint=fp,
                    cache_file_name=str(map_cache / f"{fp}.arrow"), desc=f"tokenise {dom}/{split_name}",
                )
                ids = ds["ids"]
                n_tokens = sum(len(x) + 1 for x in ids)
                token_counts.setdefault(dom, {})[split_name] = n_tokens
                packed = pack_sequences(list(ids), eos, s.block_size)
                if len(packed) == 0:
                    raise DataError(
                        f"data.block_size={s.block_size} is larger than the {split_name} text of domain "
                        f"'{dom}' ({n_tokens} tokens): lower data.block_size or add text."
                    )
                blocks.append(packed)
                doms.append(np.full(len(packed), di, dtype=np.int64))
            out[split_name] = (np.concatenate(blocks).astype(np.int32), np.concatenate(doms))
        tmp = pack_dir.with_name(pack_dir.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for split_name, (b, d) in out.items():
            np.save(tmp / f"{split_name}_blocks.npy", b)
            np.save(tmp / f"{split_name}_domains.npy", d)
        meta = {"domains": self.domain_names, "tokens": token_counts,
                "train_blocks": int(len(out["train"][0])), "val_blocks": int(len(out["val"][0])),
                "block_size": s.block_size, "vocab_size": len(tok)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if pack_dir.exists():  # a stale partial directory from a killed run
            import shutil
            shutil.rmtree(pack_dir)
        os.replace(tmp, pack_dir)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare()

    @property
    def vocab_size(self) -> int:
        self.prepare()
        return len(self.tokenizer)

    def train_dataloader(self) -> StatefulDataLoader:
        rank, world = _dist_info()
        sampler = ShardedBlockSampler(len(self.train_set), rank, world, seed=self.seed, shuffle=True)
        return StatefulDataLoader(self.train_set, batch_size=self.s.batch_size, sampler=sampler,
                                  num_workers=self.s.num_workers, drop_last=True,
                                  persistent_workers=self.s.num_workers > 0)

    def val_dataloader(self) -> StatefulDataLoader:
        rank, world = _dist_info()
        sampler = ShardedBlockSampler(len(self.val_set), rank, world, seed=self.seed, shuffle=False)
        return StatefulDataLoader(self.val_set, batch_size=self.s.val_batch_size, sampler=sampler,
                                  num_workers=self.s.num_workers)
