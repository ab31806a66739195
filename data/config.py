"""The data config: the `data.*` section of every recipe (the one copy; the engine's schema embeds it)."""
from __future__ import annotations

import string
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

SOURCES = ("embedded", "files", "hub")
FORMATS = ("text", "chat")
LOSS_ON = ("all", "assistant")


@dataclass
class DataConfig:
    # "embedded" = the local corpora shipped with every machine (Python docs, stdlib source, licences)
    source: str = "embedded"  # embedded | files | hub
    domains: List[str] = field(default_factory=lambda: ["pydoc", "stdlib", "licenses"])
    # source=files: the files, each a domain (.txt/.md paragraphs, .jsonl/.json records, .parquet, .csv rows);
    # source=hub: the dataset's data_files (e.g. one language of a multilingual dataset), optional
    files: List[str] = field(default_factory=list)
    text_field: str = "text"
    text_template: Optional[str] = None  # e.g. "{question} {answerKey}": a document from several columns
    # text: a document per row from text_field / text_template; chat: a conversation per row (conversations_field:
    # a list of {from, value} (ShareGPT) or {role, content} turns) rendered with chat_template (data/chat.py)
    format: str = "text"  # text | chat
    conversations_field: str = "conversations"
    chat_template: str = "openchat"  # openchat (OpenChat-3.5's) | tokenizer (the tokenizer's apply_chat_template)
    loss_on: str = "all"  # all | assistant (format=chat: only the assistant turns' tokens are predicted targets)
    hub_name: Optional[str] = None  # source=hub: a hub dataset (network) or a local dataset directory
    hub_config: Optional[str] = None  # the dataset's configuration (load_dataset's `name`), e.g. ARC-Challenge
    hub_split: str = "train"  # the split of a hub dataset or of the files (load_dataset's `split`)
    streaming: Optional[bool] = None  # read while tokenising, nothing copied; None: files yes, hub no
    num_proc: int = 0  # preparation processes (tokenisation; hub download); 0: one per available CPU core
    shard_chars: int = 8_000_000  # characters of text per token shard (the unit of parallel and resumed work)
    tokenizer_train_chars: int = 2_000_000  # source=files/hub with bpe|unigram: the tokenizer's training text
    max_chars_per_domain: int = 1_000_000  # source=embedded: each domain's character budget (0: all)
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

    def problems(self) -> List[str]:
        """One message per invalid or inconsistent setting (empty: the section is valid)."""
        out = []
        if self.source not in SOURCES:
            out.append(f"data.source must be one of {', '.join(SOURCES)}; got '{self.source}'.")
        if self.source == "files" and not self.files:
            out.append("data.source=files needs data.files=[path, ...].")
        if self.source == "hub" and not self.hub_name:
            out.append("data.source=hub needs data.hub_name=<dataset or local dataset directory>.")
        if self.hub_config and self.source != "hub":
            out.append(f"data.hub_config={self.hub_config} applies to data.source=hub only (source is "
                       f"{self.source}).")
        if self.streaming and self.source == "embedded":
            out.append("data.streaming applies to data.source=files or hub; the embedded corpus is read whole.")
        if self.num_proc < 0:
            out.append(f"data.num_proc must be >= 0 (0: one per CPU core), got {self.num_proc}.")
        if self.shard_chars < 1000:
            out.append(f"data.shard_chars must be >= 1000, got {self.shard_chars}.")
        if self.tokenizer_train_chars < 1000:
            out.append(f"data.tokenizer_train_chars must be >= 1000, got {self.tokenizer_train_chars}.")
        if self.format not in FORMATS:
            out.append(f"data.format must be one of {', '.join(FORMATS)}; got '{self.format}'.")
        if self.loss_on not in LOSS_ON:
            out.append(f"data.loss_on must be one of {', '.join(LOSS_ON)}; got '{self.loss_on}'.")
        if self.format == "chat":
            from .chat import CHAT_TEMPLATES

            if self.source == "embedded":
                out.append("data.format=chat needs data.source=files or hub (the embedded corpus is plain text).")
            if self.chat_template not in CHAT_TEMPLATES:
                out.append(f"data.chat_template must be one of {', '.join(CHAT_TEMPLATES)}; got "
                           f"'{self.chat_template}'.")
            if self.chat_template == "tokenizer" and self.tokenizer in ("bpe", "unigram"):
                out.append(f"data.chat_template=tokenizer needs a pretrained tokenizer with a chat template; "
                           f"data.tokenizer={self.tokenizer} has none (use data.chat_template=openchat).")
            if self.text_template is not None:
                out.append("data.text_template applies to data.format=text; a chat row is rendered by "
                           "data.chat_template.")
        elif self.loss_on != "all":
            out.append(f"data.loss_on={self.loss_on} needs data.format=chat (plain text has no turns).")
        if not self.hub_split:
            out.append("data.hub_split is empty: name a split (e.g. train).")
        if self.text_template is not None:
            try:
                names = [f for _, f, _, _ in string.Formatter().parse(self.text_template) if f is not None]
            except ValueError as e:
                out.append(f"data.text_template={self.text_template!r} is not a format string: {e}.")
            else:
                if not names:
                    out.append(f"data.text_template={self.text_template!r} names no column (use {{column}}).")
        return out
