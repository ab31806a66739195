"""Embedded default corpora: real text on every machine, no download, each a named domain.

- ``pydoc``:    Python's own documentation topics (``pydoc_data.topics``), one document per topic.
- ``stdlib``:   the Python standard library's source (a code domain), one document per module file,
                tests excluded, sampled deterministically by path hash up to a character budget.
- ``licenses``: Debian's licence texts under /usr/share/common-licenses (a legal domain), when present.

Also local files (.txt, .jsonl/.json, .parquet) as domains named after the file stem.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

EMBEDDED_DOMAINS = ("pydoc", "stdlib", "licenses")
LICENSES_DIR = Path("/usr/share/common-licenses")


class DataError(ValueError):
    """Bad or missing data; the message names the file or the setting."""


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


# -------------------------------------------------------------------------------------------- local files


def _decode_strict(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not valid UTF-8: byte {raw[e.start]:#04x} at offset {e.start} (line {line}). "
            "Convert it (e.g. iconv -f latin1 -t utf-8) or remove the bad bytes."
        ) from None


def file_documents(path_str: str, text_field: str = "text") -> List[Document]:
    """Read one local file as documents; errors name the file."""
    path = Path(path_str).expanduser()
    if not path.exists():
        raise DataError(f"Data file not found: {path} (from data.files).")
    if path.is_dir():
        raise DataError(f"Data file {path} is a directory; list the files inside it in data.files.")
    if path.stat().st_size == 0:
        raise DataError(f"Data file {path} is empty.")
    domain = path.stem
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".md", ""):
        text = _decode_strict(path)
        # Blank-line separated paragraphs are documents; a file without blank lines is one document.
        parts = [p for p in text.split("\n\n") if p.strip()]
        docs = [Document(domain, f"{path.name}:{i}", p) for i, p in enumerate(parts)]
    elif suffix in (".jsonl", ".json"):
        text = _decode_strict(path)
        docs = []
        lines = text.splitlines() if suffix == ".jsonl" or not text.lstrip().startswith("[") else None
        records = []
        if lines is None:
            records = json.loads(text)
        else:
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n} is not valid JSON: {e.msg}.") from None
        for i, rec in enumerate(records):
            if not isinstance(rec, dict) or text_field not in rec:
                raise DataError(f"{path} record {i} has no '{text_field}' field (set data.text_field).")
            if str(rec[text_field]).strip():
                docs.append(Document(domain, f"{path.name}:{i}", str(rec[text_field])))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise DataError(f"{path} has no column '{text_field}' (columns: {table.column_names}).")
        docs = [Document(domain, f"{path.name}:{i}", t) for i, t in enumerate(table.column(text_field).to_pylist())
                if t and str(t).strip()]
    else:
        raise DataError(f"Unsupported data file type '{suffix}' for {path}: use .txt, .jsonl, .json or .parquet.")
    if not docs:
        raise DataError(f"Data file {path} holds no text.")
    return docs


def files_documents(paths: Sequence[str], text_field: str) -> Dict[str, List[Document]]:
    if not paths:
        raise DataError("data.source=files but data.files is empty: list one or more files.")
    out: Dict[str, List[Document]] = {}
    for p in paths:
        for d in file_documents(p, text_field):
            out.setdefault(d.domain, []).append(d)
    return out


def hub_documents(name: str, split: str, text_field: str, cache_dir: str) -> Dict[str, List[Document]]:
    """A Hugging Face hub dataset (only when the user has network; never used by defaults or tests)."""
    import datasets

    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"data.hub_name={name} needs the network, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set.")
    ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    if text_field not in ds.column_names:
        raise DataError(f"Hub dataset {name} has no column '{text_field}' (columns: {ds.column_names}).")
    dom = name.split("/")[-1]
    return {dom: [Document(dom, f"{name}:{i}", t) for i, t in enumerate(ds[text_field]) if t and t.strip()]}


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


def corpus_fingerprint(domains: Dict[str, List[Document]]) -> str:
    h = hashlib.sha256()
    for dom in sorted(domains):
        h.update(dom.encode())
        for d in domains[dom]:
            h.update(d.doc_id.encode())
            h.update(hashlib.md5(d.text.encode("utf-8")).digest())
    return h.hexdigest()[:16]
