"""The corpora, as named domains of documents: embedded text, local files and hub datasets.

Embedded default corpora: real text on every machine, no download, each a named domain.

- ``pydoc``:    Python's own documentation topics (``pydoc_data.topics``), one document per topic.
- ``stdlib``:   the Python standard library's source (a code domain), one document per module file,
                tests excluded, sampled deterministically by path hash up to a character budget.
- ``licenses``: Debian's licence texts under /usr/share/common-licenses (a legal domain), when present.

Local files (``data.source=files``) and hub datasets (``data.source=hub``, also local dataset directories)
are read through ``datasets.load_dataset`` (config, split, data_files, streaming), batch by batch: a
``CorpusSource`` yields each domain's documents in order and is never read whole into memory. With
``data.format=chat`` a row is a conversation, rendered by data/chat.py; with ``data.loss_on=assistant`` its
document also carries the character spans the loss counts (``masked``).
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from .errors import DataError  # defined apart so that data/chat.py raises it without importing this module

EMBEDDED_DOMAINS = ("pydoc", "stdlib", "licenses")
LICENSES_DIR = Path("/usr/share/common-licenses")


@dataclass(frozen=True)
class Document:
    domain: str
    doc_id: str  # stable identifier (topic name, relative path), used for the train/val split
    text: str


def _stable_hash(s: str) -> str:
    return hashlib.md5(s.encode("utf-8")).hexdigest()


def _take_budget(docs: Iterable[Document], max_chars: Optional[int]) -> List[Document]:
    """Documents in a stable hash order until the character budget is used (the last one truncated)."""
    ordered = sorted(docs, key=lambda d: _stable_hash(d.doc_id))
    if not max_chars or max_chars <= 0:
        return ordered
    out, used = [], 0
    for d in ordered:
        if used >= max_chars:
            break
        text = d.text[: max_chars - used]
        out.append(Document(d.domain, d.doc_id, text))
        used += len(text)
    return out


def pydoc_documents() -> List[Document]:
    from pydoc_data.topics import topics

    return [Document("pydoc", name, text) for name, text in sorted(topics.items()) if text.strip()]


def stdlib_documents() -> List[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__", "dist-packages"}
    docs = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if skip.intersection(rel.parts):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of stdlib files are deliberately not UTF-8
        if text.strip():
            docs.append(Document("stdlib", str(rel), text))
    return docs


def license_documents() -> List[Document]:
    if not LICENSES_DIR.is_dir():
        return []
    docs, seen = [], set()
    for f in sorted(LICENSES_DIR.iterdir()):
        real = f.resolve()
        if not real.is_file() or real in seen:  # symlinks like GPL -> GPL-3 would duplicate text
            continue
        seen.add(real)
        try:
            text = real.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            text = real.read_text(encoding="latin-1")
        if text.strip():
            docs.append(Document("licenses", f.name, text))
    return docs


_LOADERS = {"pydoc": pydoc_documents, "stdlib": stdlib_documents, "licenses": license_documents}


def embedded_documents(domains: Sequence[str], max_chars_per_domain: Optional[int]) -> Dict[str, List[Document]]:
    out: Dict[str, List[Document]] = {}
    for dom in domains:
        if dom not in _LOADERS:
            raise DataError(
                f"Unknown embedded domain '{dom}' in data.domains; available: {', '.join(EMBEDDED_DOMAINS)}."
            )
        docs = _take_budget(_LOADERS[dom](), max_chars_per_domain)
        if docs:  # licences are absent on non-Debian machines: the domain is simply left out
            out[dom] = docs
    if not out:
        raise DataError(f"None of the embedded domains {list(domains)} has any text on this machine.")
    return out


def split_documents(docs: List[Document], val_fraction: float) -> tuple[List[Document], List[Document]]:
    """Deterministic document-level split: the ceil(f*n) documents with the smallest id hash are validation."""
    if len(docs) < 2:
        raise DataError(
            f"Domain '{docs[0].domain if docs else '?'}' has {len(docs)} document(s); at least 2 are needed "
            "for a train/validation split."
        )
    import math

    order = sorted(range(len(docs)), key=lambda i: _stable_hash(docs[i].doc_id))
    n_val = min(len(docs) - 1, max(1, math.ceil(val_fraction * len(docs))))
    val_idx = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def doc_hash64(doc_id: str) -> int:
    """The first 8 bytes of md5(doc_id) as an unsigned integer: the order split_documents sorts by, and the
    uniform number the hash-threshold split of large domains compares with val_fraction * 2**64."""
    return int.from_bytes(hashlib.md5(doc_id.encode("utf-8")).digest()[:8], "big")


def corpus_fingerprint(domains: Dict[str, List[Document]]) -> str:
    h = hashlib.sha256()
    for dom in sorted(domains):
        h.update(dom.encode())
        for d in domains[dom]:
            h.update(d.doc_id.encode())
            h.update(hashlib.md5(d.text.encode("utf-8")).digest())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------- files and hub datasets

# suffix -> (datasets builder, its options); text files: one document per blank-line separated paragraph
FILE_BUILDERS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    ".txt": ("text", {"sample_by": "paragraph"}), ".text": ("text", {"sample_by": "paragraph"}),
    ".md": ("text", {"sample_by": "paragraph"}), "": ("text", {"sample_by": "paragraph"}),
    ".jsonl": ("json", {}), ".json": ("json", {}), ".parquet": ("parquet", {}), ".csv": ("csv", {}),
}
READ_BATCH = 256  # rows per batch read from a dataset


def check_data_file(path_str: str) -> Path:
    """A local data file that exists, is a file, is not empty and has a readable type; errors name it."""
    path = Path(path_str).expanduser()
    if not path.exists():
        raise DataError(f"Data file not found: {path} (from data.files).")
    if path.is_dir():
        raise DataError(f"Data file {path} is a directory; list the files inside it in data.files.")
    if path.stat().st_size == 0:
        raise DataError(f"Data file {path} is empty.")
    if path.suffix.lower() not in FILE_BUILDERS:
        raise DataError(f"Unsupported data file type '{path.suffix}' for {path}: use .txt, .md, .jsonl, .json, "
                        ".parquet or .csv.")
    return path.resolve()


def utf8_problem(path: Path, chunk: int = 1 << 24) -> Optional[str]:
    """The message for the first invalid UTF-8 byte of a file (read in chunks), or None if it is valid."""
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk)
            pending = dec.getstate()[0]  # an incomplete sequence carried over from the previous chunk
            try:
                dec.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                data = pending + raw
                line = lines + data[: e.start].count(b"\n") + 1
                return (f"{path} is not valid UTF-8: byte {data[e.start]:#04x} at offset "
                        f"{offset - len(pending) + e.start} (line {line}). "
                        "Convert it (e.g. iconv -f latin1 -t utf-8) or remove the bad bytes.")
            if not raw:
                return None
            offset += len(raw)
            lines += raw.count(b"\n")


def _caused_by(e: BaseException, kind: type) -> bool:
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, kind):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = " ".join(lines[:2]) or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _file_stat(path: Path) -> Dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


@dataclass(frozen=True)
class DatasetPart:
    """One `datasets.load_dataset` call whose rows are (part of) one domain's documents."""

    domain: str
    label: str  # prefix of the document ids: '<label>:<row>'
    path: str  # load_dataset's path: a builder (json, text, ...) for files, the dataset otherwise
    name: Optional[str] = None  # the dataset configuration
    data_files: Optional[Tuple[str, ...]] = None
    options: Tuple[Tuple[str, Any], ...] = ()  # builder options, e.g. (("sample_by", "paragraph"),)
    file: Optional[Path] = None  # the local file (source=files), named by errors


class CorpusSource:
    """A corpus as named domains whose documents are read in order, lazily. Subclasses define `domains`,
    `identity()` (a JSON description that changes when the text may have changed) and `documents()`.
    `masked`: documents are (doc_id, text, spans) with the character spans the loss counts (data/chat.py)."""

    kind = "?"
    domains: List[str]
    masked = False

    def identity(self) -> Dict[str, Any]:
        raise NotImplementedError

    def use_tokenizer(self, tokenizer) -> None:
        """The tokenizer the corpus is tokenised with (a chat template may need it), before identity()."""

    def documents(self, domain: str) -> Iterator[tuple]:
        """(doc_id, text) of the domain's non-blank documents, in the source's order; (doc_id, text, spans)
        when `masked`."""
        raise NotImplementedError

    def sample(self, max_chars: int) -> List[Document]:
        """The first documents of every domain, max_chars in all (split evenly; the last one truncated):
        what an embedded-kind tokenizer trains on for a files / hub corpus."""
        per_domain = max(1, max_chars // max(1, len(self.domains)))
        out: List[Document] = []
        for dom in self.domains:
            used = 0
            for doc_id, text, *_ in self.documents(dom):
                text = text[: per_domain - used]
                out.append(Document(dom, doc_id, text))
                used += len(text)
                if used >= per_domain:
                    break
        return out


class EmbeddedSource(CorpusSource):
    kind = "embedded"

    def __init__(self, domains: Sequence[str], max_chars_per_domain: int):
        self.docs = embedded_documents(domains, max_chars_per_domain)
        self.domains = sorted(self.docs)
        self.max_chars_per_domain = max_chars_per_domain

    def identity(self) -> Dict[str, Any]:
        return {"kind": "embedded", "domains": self.domains, "max_chars_per_domain": self.max_chars_per_domain,
                "fingerprint": corpus_fingerprint(self.docs)}

    def documents(self, domain: str) -> Iterator[Tuple[str, str]]:
        for d in self.docs[domain]:
            if d.text.strip():
                yield d.doc_id, d.text


class DatasetSource(CorpusSource):
    """Local files or a hub dataset through `datasets.load_dataset`, read batch by batch (streaming: straight
    from the files, nothing copied; otherwise from datasets' Arrow cache under <cache_dir>/hub)."""

    def __init__(self, kind: str, parts: Sequence[DatasetPart], split: str, text_field: str,
                 text_template: Optional[str], streaming: bool, num_proc: int, cache_dir: str,
                 identity: Dict[str, Any], chat=None, conversations_field: str = "conversations"):
        self.kind, self.parts, self.split = kind, list(parts), split
        self.text_field, self.text_template = text_field, text_template
        self.streaming, self.num_proc, self.cache_dir = streaming, num_proc, cache_dir
        self.domains = sorted({p.domain for p in self.parts})
        self._identity = identity
        self.chat, self.conversations_field = chat, conversations_field  # chat: a data.chat.ChatRenderer
        self.masked = chat is not None and chat.loss_on == "assistant"

    @property
    def column(self) -> Optional[str]:
        """The one column a row's document is read from (None: text_template reads several)."""
        if self.chat is not None:
            return self.conversations_field
        return None if self.text_template is not None else self.text_field

    def use_tokenizer(self, tokenizer) -> None:
        if self.chat is not None:
            self.chat.use_tokenizer(tokenizer)

    def identity(self) -> Dict[str, Any]:
        if self.chat is not None:
            return {**self._identity, "split": self.split, "format": "chat",
                    "conversations_field": self.conversations_field, **self.chat.identity()}
        text = {"text_template": self.text_template} if self.text_template else {"text_field": self.text_field}
        return {**self._identity, "split": self.split, **text}

    def describe(self, part: DatasetPart) -> str:
        if part.file is not None:
            return str(part.file)
        config = f", config {part.name}" if part.name else ""
        return f"dataset {part.path}{config}, split {self.split}"

    def load(self, part: DatasetPart):
        """The part's `datasets` Dataset (or IterableDataset when streaming); errors are one DataError."""
        import datasets

        kwargs: Dict[str, Any] = dict(part.options)
        if self.num_proc > 1 and not self.streaming and part.file is None:
            kwargs["num_proc"] = self.num_proc
        try:
            return datasets.load_dataset(part.path, part.name, data_files=list(part.data_files or []) or None,
                                         split=self.split, streaming=self.streaming,
                                         cache_dir=str(Path(self.cache_dir) / "hub"), **kwargs)
        except Exception as e:  # datasets raises ValueError, FileNotFoundError, DatasetGenerationError, ...
            raise self._error(part, e) from None

    def _error(self, part: DatasetPart, e: BaseException) -> DataError:
        if part.file is not None and _caused_by(e, UnicodeDecodeError):
            problem = utf8_problem(part.file)
            if problem:
                return DataError(problem)
        where = (f"data.hub_name={part.path}" + (f" data.hub_config={part.name}" if part.name else "")
                 + f" data.hub_split={self.split}") if part.file is None else f"data.hub_split={self.split}"
        return DataError(f"Could not read {self.describe(part)} ({where}): {type(e).__name__}: {_one_line(e)}")

    def _texts(self, part: DatasetPart, batch: Dict[str, list]) -> List[Optional[str]]:
        if self.text_template is None:
            if self.text_field not in batch:
                raise self._missing_column(part, batch)
            return [None if v is None else str(v) for v in batch[self.text_field]]
        keys = list(batch)
        out = []
        for j in range(len(batch[keys[0]]) if keys else 0):
            row = {k: batch[k][j] for k in keys}
            try:
                out.append(self.text_template.format_map(row))
            except KeyError as e:
                raise DataError(f"data.text_template names column {e}, which {self.describe(part)} does not have "
                                f"(columns: {keys}).") from None
            except (IndexError, TypeError, AttributeError, ValueError) as e:
                raise DataError(f"data.text_template={self.text_template!r} does not fit the rows of "
                                f"{self.describe(part)}: {type(e).__name__}: {e}.") from None
        return out

    def _missing_column(self, part: DatasetPart, columns) -> DataError:
        if self.chat is not None:
            return DataError(f"{self.describe(part)} has no column '{self.conversations_field}' (columns: "
                             f"{list(columns)}); set data.conversations_field (data.format=chat).")
        return DataError(f"{self.describe(part)} has no column '{self.text_field}' (columns: {list(columns)}); set "
                         "data.text_field or data.text_template.")

    def _chats(self, part: DatasetPart, batch: Dict[str, list], row: int) -> List[Optional[tuple]]:
        if self.conversations_field not in batch:
            raise self._missing_column(part, batch)
        return [None if conv is None else self.chat(conv, f"{self.describe(part)} row {row + j}")
                for j, conv in enumerate(batch[self.conversations_field])]

    def documents(self, domain: str) -> Iterator[tuple]:
        for part in self.parts:
            if part.domain != domain:
                continue
            ds = self.load(part)
            column = self.column
            if column is not None and ds.column_names is not None:
                if column not in ds.column_names:
                    raise self._missing_column(part, ds.column_names)
                ds = ds.select_columns([column])
            row = 0
            batches = ds.iter(batch_size=READ_BATCH)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except DataError:
                    raise
                except Exception as e:  # a streaming read fails here, not at load_dataset
                    raise self._error(part, e) from None
                if self.chat is not None:
                    for doc in self._chats(part, batch, row):
                        if doc is not None and doc[0].strip():
                            doc_id = f"{part.label}:{row}"
                            yield (doc_id, doc[0], doc[1]) if self.masked else (doc_id, doc[0])
                        row += 1
                    continue
                for text in self._texts(part, batch):
                    if text is not None and text.strip():
                        yield f"{part.label}:{row}", text
                    row += 1


def _chat(s):
    """The chat renderer of data.format=chat, else None."""
    if getattr(s, "format", "text") != "chat":
        return None
    from .chat import ChatRenderer

    return ChatRenderer(s.chat_template, s.loss_on)


def _files_source(s) -> DatasetSource:
    parts, stats = [], []
    for p in s.files:
        path = check_data_file(p)
        builder, options = FILE_BUILDERS[path.suffix.lower()]
        parts.append(DatasetPart(domain=path.stem, label=path.name, path=builder, data_files=(str(path),),
                                 options=tuple(sorted(options.items())), file=path))
        stats.append(_file_stat(path))
    streaming = True if s.streaming is None else bool(s.streaming)
    return DatasetSource("files", parts, s.hub_split, s.text_field, s.text_template, streaming, s.num_proc,
                         s.cache_dir, {"kind": "files", "files": stats}, _chat(s), s.conversations_field)


def _local_dataset_files(root: Path, limit: int = 10_000) -> List[Dict[str, Any]]:
    out = []
    for f in sorted(root.rglob("*")):
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts):
            out.append(_file_stat(f))
            if len(out) >= limit:
                break
    return out


def _hub_source(s) -> DatasetSource:
    name = s.hub_name
    local = _is_local(name)
    if not local and (os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise DataError(f"data.hub_name={name} needs the network, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set "
                        "(and it is not a local dataset directory).")
    path = str(Path(name).expanduser().resolve()) if local else name
    identity: Dict[str, Any] = {"kind": "hub", "name": path, "config": s.hub_config,
                                "data_files": list(s.files)}
    if local:
        root = Path(path)
        identity["local_files"] = _local_dataset_files(root) if root.is_dir() else [_file_stat(root)]
    domain = s.hub_config or Path(path.rstrip("/")).name
    label = f"{name}/{s.hub_config}/{s.hub_split}" if s.hub_config else f"{name}/{s.hub_split}"
    part = DatasetPart(domain=domain, label=label, path=path, name=s.hub_config,
                       data_files=tuple(s.files) or None)
    streaming = False if s.streaming is None else bool(s.streaming)
    return DatasetSource("hub", [part], s.hub_split, s.text_field, s.text_template, streaming, s.num_proc,
                         s.cache_dir, identity, _chat(s), s.conversations_field)


def open_source(s) -> CorpusSource:
    """The corpus of a DataConfig `s`: cheap (files are only stat-ed; datasets load when first read)."""
    if s.source == "embedded":
        return EmbeddedSource(s.domains, s.max_chars_per_domain)
    if s.source == "files":
        if not s.files:
            raise DataError("data.source=files but data.files is empty: list one or more files.")
        return _files_source(s)
    if s.source == "hub":
        if not s.hub_name:
            raise DataError("data.source=hub needs data.hub_name.")
        return _hub_source(s)
    raise DataError(f"Unknown data.source '{s.source}'.")
