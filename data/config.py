"""The data config: the `data.*` section of every recipe (the one copy; the engine's schema embeds it)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional


@dataclass
class DataConfig:
    # "embedded" = the local corpora shipped with every machine (Python docs, stdlib source, licences)
    source: str = "embedded"  # embedded | files | hub
    domains: List[str] = field(default_factory=lambda: ["pydoc", "stdlib", "licenses"])
    files: List[str] = field(default_factory=list)  # for source=files: .txt / .jsonl / .json / .parquet
    text_field: str = "text"
    hub_name: Optional[str] = None  # for source=hub (needs network and the user's own consent)
    hub_split: str = "train"
    max_chars_per_domain: int = 1_000_000
    tokenizer: str = "bpe"  # bpe | unigram (embedded, trained at first use) or a path / hub name
    vocab_size: int = 4096
    block_size: int = 128
    val_fraction: float = 0.05
    batch_size: int = 16
    val_batch_size: int = 32
    num_workers: int = 0
    cache_dir: str = ".cache"

    @classmethod
    def from_mapping(cls, m: Dict[str, Any]) -> "DataConfig":
        """From a plain dict (e.g. the resolved `data` section); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in m.items() if k in names}
        for k in ("domains", "files"):
            if k in known:
                known[k] = list(known[k])
        return cls(**known)
