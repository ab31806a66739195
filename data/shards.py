"""Token shards: a corpus tokenised once into flat token files on disk, read by index arithmetic.

Layout of a shard directory ``<cache_dir>/shards/<source>-<key>/`` (the key hashes everything the tokens
depend on: the source's identity, the tokenizer, val_fraction, shard_chars and this format's version):

    manifest.json        written last, atomically: the directory is complete iff it exists
    c000000.bin          raw little-endian tokens (uint16 when the vocabulary fits, else uint32) of one chunk of
    c000000.mask         one domain: [train tokens | validation tokens], every document followed by EOS; .mask
    c000000.json         (masked corpora only: chat data with data.loss_on=assistant) one uint8 per token, 1 where
    ...                  the token is a target of the loss; the .json (counts) is written after the .bin (and
    tokenizer/           .mask) are renamed into place: the chunk's commit mark. tokenizer/: the tokenizer the
                         tokens belong to (save_pretrained)

A corpus without masks (every text corpus) has no .mask files and no "mask" in its manifest: every token
counts, and shard directories written before masks existed read unchanged. In a masked corpus the EOS after a
document counts iff the document's last token does.

A chunk is a run of consecutive documents of one domain, closed after the document that brings it to
``shard_chars`` characters, so the chunks, and the tokens, depend on the corpus only (not on num_proc).
Chunks are tokenised by ``num_proc`` worker processes; a preparation that is cut keeps every committed
chunk and the next one tokenises only the others (written as ``*.tmp<pid>`` and renamed).

Train / validation split, by document (no validation text is ever trained on): a domain smaller than one
chunk gets the exact rule of ``corpus.split_documents`` (the ceil(f*n) documents with the smallest id hash);
in a larger domain a document is validation iff its 64-bit id hash is below f * 2**64 (decided chunk by chunk,
while streaming), except that until the domain has a validation (training) document, a chunk without one
gives its smallest-hash (largest-hash) document to that split: every domain of two or more documents has both.

Reading: the train (validation) tokens of a domain are the concatenation of its chunks' train (validation)
regions; block k of it is tokens [k*B, (k+1)*B) (the remainder is dropped), found by a binary search over
the chunks' cumulative lengths and read by offset, so every block has one domain and nothing is loaded but
the block itself.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .corpus import CorpusSource, DataError, doc_hash64

FORMAT = "lm-recipes-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
ENCODE_CHARS = 1 << 20  # characters per encode call in a worker; longer documents are encoded in pieces
OPEN_FILES = 64  # shard files a reader keeps open (least recently used closed first)
SPLIT_RULE = ("domains under shard_chars: the ceil(f*n) documents with the smallest md5(doc_id) are validation; "
              "larger domains: a document is validation iff the first 8 bytes of md5(doc_id) < f * 2**64, except "
              "that until the domain has a validation (training) document, a chunk without one gives its "
              "smallest-hash (largest-hash) document to that split")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_key(parts: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def chunk_name(chunk_id: int) -> str:
    return f"c{chunk_id:06d}"


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ split


def domain_chunks(docs: Iterable[tuple], domain: str, val_fraction: float,
                  shard_chars: int) -> Iterator[List[tuple]]:
    """A domain's documents, (doc_id, text) or (doc_id, text, loss spans), as chunks of (is_validation, text)
    or (is_validation, text, loss spans), in order (see the module docstring)."""
    threshold = min(1 << 64, int(val_fraction * (1 << 64)))
    seen = {"val": False, "train": False}

    def by_threshold(buf: List[tuple]) -> List[tuple]:
        hashes = [doc_hash64(d[0]) for d in buf]
        flags = [h < threshold for h in hashes]
        # until the domain has a document of each split, a chunk without one gives it its extreme hash
        if not seen["val"] and not any(flags):
            flags[min(range(len(buf)), key=hashes.__getitem__)] = True
        elif not seen["train"] and all(flags):
            flags[max(range(len(buf)), key=hashes.__getitem__)] = False
        seen["val"] = seen["val"] or any(flags)
        seen["train"] = seen["train"] or not all(flags)
        return [(f, *d[1:]) for f, d in zip(flags, buf)]

    buf: List[tuple] = []
    chars, large = 0, False
    for doc in docs:
        buf.append(tuple(doc))
        chars += len(doc[1])
        if chars >= shard_chars:
            large = True
            yield by_threshold(buf)
            buf, chars = [], 0
    if large:
        if buf:
            yield by_threshold(buf)
        return
    n = len(buf)
    if n < 2:
        raise DataError(f"Domain '{domain}' has {n} document(s); at least 2 are needed for a train/validation "
                        "split.")
    n_val = min(n - 1, max(1, math.ceil(val_fraction * n)))
    hashes = [doc_hash64(d[0]) for d in buf]
    val = set(sorted(range(n), key=hashes.__getitem__)[:n_val])
    yield [(j in val, *d[1:]) for j, d in enumerate(buf)]


# ------------------------------------------------------------------------------------------- tokenising


def encoder_spec(tokenizer) -> Tuple[str, Any]:
    """What a worker process needs to tokenise: a fast tokenizer's JSON, else the (picklable) tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return ("json", backend.to_str()) if backend is not None else ("object", tokenizer)


def make_encoder(spec: Tuple[str, Any], offsets: bool = False) -> Callable[[List[str]], list]:
    """texts -> token ids, without special tokens (what `tokenizer(texts, add_special_tokens=False)` gives);
    offsets=True: (ids, [n, 2] character offsets) per text (a fast tokenizer's offsets)."""
    kind, payload = spec
    if kind == "json":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(payload)
        if offsets:
            return lambda texts: [(e.ids, e.offsets) for e in tok.encode_batch(texts, add_special_tokens=False)]
        batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # the same ids, without offsets
        return lambda texts: [e.ids for e in batch(texts, add_special_tokens=False)]
    if offsets:
        def encode(texts):
            try:
                out = payload(texts, add_special_tokens=False, return_offsets_mapping=True)
            except NotImplementedError:
                raise DataError("data.loss_on=assistant needs a fast tokenizer (character offsets); "
                                f"{type(payload).__name__} is not one.") from None
            return list(zip(out["input_ids"], out["offset_mapping"]))
        return encode
    return lambda texts: payload(texts, add_special_tokens=False)["input_ids"]


def text_pieces(text: str, limit: int = ENCODE_CHARS) -> List[str]:
    """A document cut into pieces of at most `limit` characters, after a newline (else a space) where there
    is one, so that one long document never has to be encoded in one call."""
    if len(text) <= limit:
        return [text]
    out, pos = [], 0
    while len(text) - pos > limit:
        end = text.rfind("\n", pos + 1, pos + limit)
        if end < 0:
            end = text.rfind(" ", pos + 1, pos + limit)
        end = pos + limit if end < 0 else end + 1
        out.append(text[pos:end])
        pos = end
    out.append(text[pos:])
    return out


_WORKER: Dict[str, Any] = {}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB): VmHWM, which starts anew at exec (getrusage's
    ru_maxrss of a spawned worker would include its parent's memory at the fork), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def init_worker(spec: Tuple[str, Any], pool: bool = False) -> None:
    if pool:  # num_proc processes already use the cores: no tokenizer thread pool in each
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["encode"] = make_encoder(spec)
    _WORKER["encode_offsets"] = make_encoder(spec, offsets=True)


def write_chunk(directory: str, chunk_id: int, domain: str, items: Sequence[tuple], eos_id: int,
                dtype: Any, masked: bool = False) -> Dict[str, Any]:
    """Tokenise one chunk into <directory>/cNNNNNN.bin (train tokens, then validation tokens, each document
    followed by EOS; masked: items carry loss spans, and cNNNNNN.mask holds a uint8 per token) and commit it
    with cNNNNNN.json (its counts); runs in a worker (init_worker first)."""
    from .chat import token_mask

    encode = _WORKER["encode_offsets" if masked else "encode"]
    dtype = np.dtype(dtype).newbyteorder("<")
    d, name = Path(directory), chunk_name(chunk_id)
    docs = {"train": 0, "val": 0}
    tokens = {"train": 0, "val": 0}
    loss_tokens = {"train": 0, "val": 0}
    pieces: List[tuple] = []  # (is_val, text, ends the document, first character, loss spans)
    for item in items:
        is_val, text = item[0], item[1]
        docs["val" if is_val else "train"] += 1
        parts, base = text_pieces(text), 0
        for k, p in enumerate(parts):
            pieces.append((is_val, p, k == len(parts) - 1, base, item[2] if masked else None))
            base += len(p)
    tmp = d / f"{name}.bin.tmp{os.getpid()}"
    mask_tmp = d / f"{name}.mask.tmp{os.getpid()}"
    val_parts: List[Tuple[np.ndarray, np.ndarray]] = []
    last_counts = 0  # masked: whether the document's last token so far counts (its EOS then counts)
    with open(tmp, "wb") as f, (open(mask_tmp, "wb") if masked else open(os.devnull, "wb")) as fm:
        start = 0
        while start < len(pieces):
            end, chars = start, 0
            while end < len(pieces) and (end == start or chars + len(pieces[end][1]) <= ENCODE_CHARS):
                chars += len(pieces[end][1])
                end += 1
            batch = pieces[start:end]
            out = {False: ([], []), True: ([], [])}  # is_val -> (ids, mask parts)
            for (is_val, _, last, base, spans), enc in zip(batch, encode([p[1] for p in batch])):
                ids, mask_parts = out[is_val]
                if masked:
                    enc, offsets = enc
                    m = token_mask(np.asarray(offsets, dtype=np.int64).reshape(-1, 2) + base, spans)
                    if len(m):
                        last_counts = int(m[-1])
                    mask_parts.append(m)
                ids.extend(enc)
                if last:
                    ids.append(eos_id)
                    if masked:
                        mask_parts.append(np.array([last_counts], dtype=np.uint8))
                        last_counts = 0
            for is_val in (False, True):
                ids, mask_parts = out[is_val]
                arr = np.asarray(ids, dtype=dtype)
                mask = np.concatenate(mask_parts) if mask_parts else np.zeros(0, dtype=np.uint8)
                split = "val" if is_val else "train"
                tokens[split] += len(arr)
                loss_tokens[split] += int(mask.sum()) if masked else len(arr)
                if is_val:
                    val_parts.append((arr, mask))
                else:
                    arr.tofile(f)
                    mask.tofile(fm)
            start = end
        for arr, mask in val_parts:
            arr.tofile(f)
            mask.tofile(fm)
    os.replace(tmp, d / f"{name}.bin")
    meta = {"chunk": chunk_id, "file": f"{name}.bin", "domain": domain, "docs": docs, "tokens": tokens,
            "chars": sum(len(item[1]) for item in items), "peak_rss_mb": round(peak_rss_mb(), 1)}
    if masked:
        os.replace(mask_tmp, d / f"{name}.mask")
        meta.update(mask_file=f"{name}.mask", loss_tokens=loss_tokens)
    write_json_atomic(d / f"{name}.json", meta)
    return meta


class _Runner:
    """Runs write_chunk in this process (num_proc 1) or in a pool of spawned workers, at most 2 chunks per
    worker in flight; the pool starts only when a second chunk comes (a one-chunk corpus stays in-process)."""

    def __init__(self, spec: Tuple[str, Any], num_proc: int, on_result: Callable[[Dict[str, Any]], None]):
        self.spec, self.num_proc, self.on_result = spec, num_proc, on_result
        self.pool: Optional[ProcessPoolExecutor] = None
        self.held: Optional[tuple] = None
        self.pending: set = set()

    def _inline(self, args: tuple) -> None:
        if _WORKER.get("spec") is not self.spec:
            init_worker(self.spec)
            _WORKER["spec"] = self.spec
        self.on_result(write_chunk(*args))

    def _drain(self, keep: int) -> None:
        while len(self.pending) > keep:
            finished, self.pending = wait(self.pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                self.on_result(fut.result())

    def submit(self, *args) -> None:
        if self.num_proc <= 1:
            self._inline(args)
            return
        if self.pool is None:
            if self.held is None:
                self.held = args
                return
            import multiprocessing

            self.pool = ProcessPoolExecutor(self.num_proc, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=init_worker, initargs=(self.spec, True))
            self.pending.add(self.pool.submit(write_chunk, *self.held))
            self.held = None
        self._drain(2 * self.num_proc - 1)
        self.pending.add(self.pool.submit(write_chunk, *args))

    def finish(self) -> None:
        if self.held is not None:
            args, self.held = self.held, None
            self._inline(args)
        self._drain(0)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# ------------------------------------------------------------------------------------------ preparation


def _shard_files_ok(d: Path, meta: Dict[str, Any], itemsize: int, masked: bool) -> bool:
    """Whether a chunk's .bin (and, masked, its .mask) exist with the sizes its counts give."""
    n = meta["tokens"]["train"] + meta["tokens"]["val"]
    try:
        if (d / meta["file"]).stat().st_size != itemsize * n:
            return False
        return not masked or ("mask_file" in meta and (d / meta["mask_file"]).stat().st_size == n)
    except OSError:
        return False


def _committed_chunks(d: Path, itemsize: int, masked: bool = False) -> Dict[int, Dict[str, Any]]:
    """The chunks whose .json commit mark exists and whose .bin (and .mask) have the sizes it records."""
    out = {}
    for meta_file in sorted(d.glob("c[0-9]*.json")):
        try:
            meta = json.loads(meta_file.read_text())
            if _shard_files_ok(d, meta, itemsize, masked):
                out[int(meta["chunk"])] = meta
        except (ValueError, KeyError):
            continue
    return out


def read_manifest(directory: Path) -> Optional[Dict[str, Any]]:
    """The manifest of a complete shard directory (every shard present with its size), else None."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        return None
    itemsize = np.dtype(manifest["dtype"]).itemsize
    masked = bool(manifest.get("mask"))
    for sh in manifest["shards"]:
        if not _shard_files_ok(directory, sh, itemsize, masked):
            return None
    return manifest


def prepare_shards(directory: Path, source: CorpusSource, spec: Tuple[str, Any], eos_id: int, vocab_size: int,
                   val_fraction: float, shard_chars: int, num_proc: int, info: Dict[str, Any],
                   log: Optional[Callable[[str], None]] = None) -> Tuple[Dict[str, Any], bool]:
    """Find or build the shard directory; returns (manifest, built). Resumes a cut preparation. The caller
    holds a lock on the cache, so that one process prepares and the others then find the manifest. A
    `source.masked` corpus gets a loss mask per token (.mask files, "mask": true in the manifest)."""
    manifest = read_manifest(directory)
    if manifest is not None:
        return manifest, False
    t0 = time.time()
    directory.mkdir(parents=True, exist_ok=True)
    for stale in list(directory.glob("*.tmp*")):  # partial files of a cut preparation
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    dtype = token_dtype(vocab_size)
    masked = bool(getattr(source, "masked", False))
    metas = _committed_chunks(directory, dtype.itemsize, masked)
    reused = len(metas)
    progress = {"tokens": 0, "chunks": 0, "last": t0, "rss": 0.0}

    def on_result(meta: Dict[str, Any]) -> None:
        metas[int(meta["chunk"])] = meta
        progress["tokens"] += meta["tokens"]["train"] + meta["tokens"]["val"]
        progress["chunks"] += 1
        progress["rss"] = max(progress["rss"], meta.get("peak_rss_mb", 0.0))
        now = time.time()
        if log is not None and now - progress["last"] >= 5.0:
            progress["last"] = now
            log(f"data: {progress['chunks']} chunks tokenised ({reused} reused), "
                f"{progress['tokens'] / 1e6:.1f}M tokens, {progress['tokens'] / max(now - t0, 1e-9) / 1e6:.2f}M "
                "tokens/s")

    runner = _Runner(spec, num_proc, on_result)
    chunk_id = 0
    try:
        for dom in source.domains:
            for items in domain_chunks(source.documents(dom), dom, val_fraction, shard_chars):
                if chunk_id not in metas:
                    runner.submit(str(directory), chunk_id, dom, items, eos_id, dtype.name, masked)
                chunk_id += 1
        runner.finish()
    finally:
        runner.close()
    shards = [metas[i] for i in range(chunk_id)]
    counts: Dict[str, Dict[str, Any]] = {}
    for sh in shards:
        c = counts.setdefault(sh["domain"], {"docs": {"train": 0, "val": 0}, "tokens": {"train": 0, "val": 0},
                                             "chars": 0, "shards": 0})
        if masked:
            c.setdefault("loss_tokens", {"train": 0, "val": 0})
        for split in SPLITS:
            c["docs"][split] += sh["docs"][split]
            c["tokens"][split] += sh["tokens"][split]
            if masked:
                c["loss_tokens"][split] += sh["loss_tokens"][split]
        c["chars"] += sh["chars"]
        c["shards"] += 1
    for dom in source.domains:
        if dom not in counts:
            raise DataError(f"Domain '{dom}' holds no text.")
        for split in SPLITS:
            if counts[dom]["docs"][split] == 0:
                raise DataError(f"Domain '{dom}' has no {'validation' if split == 'val' else 'training'} document "
                                f"under data.val_fraction={val_fraction}: change data.val_fraction.")
    total = sum(c["tokens"]["train"] + c["tokens"]["val"] for c in counts.values())
    manifest = {"format": FORMAT, "version": VERSION, "key": directory.name, "dtype": dtype.name,
                "eos_id": int(eos_id), "vocab_size": int(vocab_size), **info, "val_fraction": val_fraction,
                "split_rule": SPLIT_RULE, "shard_chars": shard_chars, "domains": list(source.domains),
                "counts": counts, "total_tokens": total,
                "shards": [{k: sh[k] for k in ("file", "mask_file", "domain", "docs", "tokens", "loss_tokens", "chars")
                            if k in sh} for sh in shards],
                "prepared": {"seconds": round(time.time() - t0, 2), "num_proc": num_proc,
                             "chunks_reused": reused, "worker_peak_rss_mb": progress["rss"],
                             "date": time.strftime("%Y-%m-%d %H:%M:%S")}}
    if masked:
        manifest["mask"] = True
        manifest["mask_rule"] = ("uint8 per token, 1 = a target of the loss: the token's last character is in an "
                                 "assistant turn (data/chat.py); a document's EOS counts iff its last token does")
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest, True


# ---------------------------------------------------------------------------------------------- reading


class TokenShards:
    """A complete shard directory, read by offset (`os.pread`). Per split and domain, the token stream is the
    concatenation of the domain's chunks' regions of that split (`read`). Nothing is mapped: a read copies
    just its tokens, the pages stay in the operating system's page cache (shared by every rank, worker and
    run), and a process's resident memory stays flat however much of the corpus it reads. Pickling
    (DataLoader workers) carries the manifest's index only; each process opens the files itself."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise DataError(f"{self.directory} is not a complete token shard directory (no valid {MANIFEST}); "
                            "prepare it with `make data`.")
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.domains: List[str] = list(manifest["domains"])
        self.files = [sh["file"] for sh in manifest["shards"]]
        self.masked = bool(manifest.get("mask"))  # per-token loss masks (.mask files); else every token counts
        self.mask_files = [sh["mask_file"] for sh in manifest["shards"]] if self.masked else []
        # (split, domain index) -> (shard index, first token in the file, length) per segment, and the
        # segments' start positions in the stream
        self.segments: Dict[Tuple[str, int], np.ndarray] = {}
        self.starts: Dict[Tuple[str, int], np.ndarray] = {}
        for split in SPLITS:
            for di, dom in enumerate(self.domains):
                segs = []
                for k, sh in enumerate(manifest["shards"]):
                    n = sh["tokens"][split]
                    if sh["domain"] == dom and n > 0:
                        segs.append((k, 0 if split == "train" else sh["tokens"]["train"], n))
                arr = np.array(segs, dtype=np.int64).reshape(-1, 3)
                self.segments[(split, di)] = arr
                self.starts[(split, di)] = np.concatenate([[0], np.cumsum(arr[:, 2])]).astype(np.int64)
        self._fds: "OrderedDict[Tuple[int, bool], int]" = OrderedDict()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()
        return state

    def __del__(self):
        try:
            self.close()
        except (OSError, TypeError):  # at interpreter exit
            pass

    def close(self) -> None:
        """Close the open files (the next read opens them again)."""
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = OrderedDict()

    def stream_tokens(self, split: str, domain: int) -> int:
        return int(self.starts[(split, domain)][-1])

    def _fd(self, k: int, mask: bool = False) -> int:
        key = (k, mask)
        fd = self._fds.get(key)
        if fd is None:
            if len(self._fds) >= OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(self.directory / (self.mask_files if mask else self.files)[k], os.O_RDONLY)
            self._fds[key] = fd
        else:
            self._fds.move_to_end(key)
        return fd

    def _pread(self, k: int, first: int, count: int, mask: bool = False) -> np.ndarray:
        dtype = np.dtype(np.uint8) if mask else self.dtype
        size = dtype.itemsize
        raw = os.pread(self._fd(k, mask), count * size, first * size)
        if len(raw) != count * size:
            name = (self.mask_files if mask else self.files)[k]
            raise DataError(f"{self.directory / name} is shorter than its manifest says: prepare again "
                            "(delete the directory).")
        return np.frombuffer(raw, dtype=dtype)

    def read(self, split: str, domain: int, start: int, length: int, mask: bool = False) -> np.ndarray:
        """Tokens [start, start+length) of a split's stream of one domain (mask=True: their loss mask, uint8;
        all ones when the corpus has no masks)."""
        if mask and not self.masked:
            return np.ones(length, dtype=np.uint8)
        segs, starts = self.segments[(split, domain)], self.starts[(split, domain)]
        if start < 0 or start + length > starts[-1]:
            raise IndexError(f"tokens [{start}, {start + length}) outside the {split} stream of "
                             f"'{self.domains[domain]}' ({int(starts[-1])} tokens)")
        j = int(np.searchsorted(starts, start, side="right")) - 1
        parts = []
        while length > 0:
            k, first, n = (int(x) for x in segs[j])
            off = start - int(starts[j])
            take = min(length, n - off)
            parts.append(self._pread(k, first + off, take, mask))
            start, length, j = start + take, length - take, j + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class BlockIndex:
    """Blocks of `block_size` tokens of one split, domain after domain: block i -> (domain, tokens)."""

    def __init__(self, shards: TokenShards, split: str, block_size: int):
        self.shards, self.split, self.block_size = shards, split, block_size
        self.per_domain = np.array([shards.stream_tokens(split, d) // block_size
                                    for d in range(len(shards.domains))], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.per_domain)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def domain(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} out of range ({len(self)} blocks)")
        return int(np.searchsorted(self.offsets, i, side="right")) - 1

    def block(self, i: int) -> Tuple[np.ndarray, int]:
        d = self.domain(i)
        k = i - int(self.offsets[d])
        return self.shards.read(self.split, d, k * self.block_size, self.block_size), d

    def mask(self, i: int) -> np.ndarray:
        """Block i's loss mask (uint8, 1 = the token is a target; all ones in a corpus without masks)."""
        d = self.domain(i)
        k = i - int(self.offsets[d])
        return self.shards.read(self.split, d, k * self.block_size, self.block_size, mask=True)


def _indices(key, n: int) -> Optional[np.ndarray]:
    if isinstance(key, (int, np.integer)):
        return None
    return np.arange(n)[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)


class BlockArray:
    """The blocks of a split as an (n, block_size) int64 array-like, read on access (never all in memory
    unless asked for with np.asarray)."""

    def __init__(self, index: BlockIndex):
        self.index = index

    @property
    def shape(self) -> Tuple[int, int]:
        return len(self.index), self.index.block_size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        idx = _indices(key, len(self))
        if idx is None:
            i = int(key) + (len(self) if key < 0 else 0)
            return self.index.block(i)[0].astype(np.int64)
        out = np.empty((len(idx), self.index.block_size), dtype=np.int64)
        for row, i in enumerate(idx):
            out[row] = self.index.block(int(i) + (len(self) if i < 0 else 0))[0]
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class DomainArray:
    """The domain index of every block of a split, computed from the per-domain block counts."""

    def __init__(self, index: BlockIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key):
        idx = _indices(key, len(self))
        if idx is None:
            return self.index.domain(int(key) + (len(self) if key < 0 else 0))
        idx = np.where(idx < 0, idx + len(self), idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"block index out of range ({len(self)} blocks)")
        return np.searchsorted(self.index.offsets, idx, side="right").astype(np.int64) - 1

    def __iter__(self) -> Iterator[int]:
        for d, n in enumerate(self.index.per_domain.tolist()):
            for _ in range(n):
                yield d

    def __array__(self, dtype=None, copy=None):
        out = np.repeat(np.arange(len(self.index.per_domain), dtype=np.int64), self.index.per_domain)
        return out if dtype is None else out.astype(dtype)


def format_counts(manifest: Dict[str, Any]) -> List[str]:
    """Human-readable lines: tokens and documents per domain and split."""
    lines = []
    for dom in manifest["domains"]:
        c = manifest["counts"][dom]
        loss = (f" ({c['loss_tokens']['train']:,} / {c['loss_tokens']['val']:,} of them in the loss)"
                if "loss_tokens" in c else "")
        lines.append(f"  {dom}: {c['tokens']['train']:,} train / {c['tokens']['val']:,} validation tokens{loss}, "
                     f"{c['docs']['train']:,} / {c['docs']['val']:,} documents, {c['shards']} shard(s)")
    return lines
