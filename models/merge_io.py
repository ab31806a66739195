"""Safetensors input/output for streaming merges (models.merging.merge_safetensors).

SafetensorsFile parses and validates a file's header itself (8-byte little-endian header length, then a JSON
header of dtype / shape / data_offsets per tensor) and hands out zero-copy tensors over a memory map of the
file; `release` drops a tensor's pages from this process (they stay in the page cache), so resident memory
stays near the tensors in use. SafetensorsWriter writes the header first (the names, dtypes and shapes are
known up front, hence the offsets), then each tensor as it is produced, into a temporary file next to the
output; `commit` flushes, fsyncs and renames it into place with ordinary permissions (0o666 & ~umask). On Linux
each tensor's bytes are handed to the disk as soon as they are written (sync_file_range, which starts the
writeback without waiting for it), so the disk works while later tensors are merged and the final fsync has
little left to wait for.
Any exception (KeyboardInterrupt included) before the commit removes the temporary file.

Every problem with an input is a MergeInputError (a ValueError) whose message names the file and, where
there is one, the tensor.
"""
from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
import tempfile
import threading
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

# safetensors dtype names <-> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # the limit the safetensors library itself applies
_WRITEBACK_MIN = 4 << 20  # bytes written before the writer starts their writeback


def _sync_file_range():
    """libc's sync_file_range (Linux), or None: SYNC_FILE_RANGE_WRITE (2) starts the writeback of a range of
    dirty pages and returns; durability still comes from fsync."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_RANGE = _sync_file_range()


class MergeInputError(ValueError):
    """A merge input is unusable: the message names the file and the tensor."""


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "start", "end")

    def __init__(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], start: int, end: int):
        self.name, self.dtype, self.shape, self.start, self.end = name, dtype, shape, start, end

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensors by name in file order, __metadata__, offset of the data section); MergeInputError on a file
    that is not safetensors, a garbled header, or a header promising more bytes than the file holds."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MergeInputError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header "
                                      "length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n + 8 > size:
                raise MergeInputError(f"{path}: not a safetensors file or truncated (header length {n}, file size "
                                      f"{size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise MergeInputError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeInputError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise MergeInputError(f"{path}: not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MergeInputError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MergeInputError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
        info = TensorInfo(name, dtype, shape, start, end)
        nbytes = info.numel * dtype.itemsize
        if min(shape, default=0) < 0 or start < 0 or end - start != nbytes:
            raise MergeInputError(f"{path}: tensor {name!r} has data_offsets {[start, end]} that do not fit its "
                                  f"shape {list(shape)} and dtype {entry['dtype']}")
        if data_start + end > size:
            raise MergeInputError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file "
                                  f"has {size} bytes")
        tensors[name] = info
    return dict(sorted(tensors.items(), key=lambda kv: kv[1].start)), meta, data_start


class SafetensorsFile:
    """A validated safetensors file, memory-mapped; tensors are zero-copy views of the map."""

    def __init__(self, path: str):
        self.path = str(path)
        self.tensors, self.metadata, self._data = read_header(self.path)
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()  # tensors are read from several threads (merge_safetensors)

    def _mapped(self) -> mmap.mmap:
        with self._lock:
            if self._map is None:
                with open(self.path, "rb") as f:
                    # a private mapping: pages are shared with the page cache until written (never, here), and
                    # torch.frombuffer accepts it as a writable buffer
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            return self._map

    def tensor(self, name: str) -> Tensor:
        info = self.tensors[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        offset = self._data + info.start
        if offset % info.dtype.itemsize:  # unaligned data (not written by safetensors): copy it
            buf = bytearray(self._mapped()[offset:offset + info.end - info.start])
            return torch.frombuffer(buf, dtype=info.dtype).view(info.shape)
        return torch.frombuffer(self._mapped(), dtype=info.dtype, count=info.numel, offset=offset).view(info.shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident set (a later read maps them again)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.tensors[name]
        page = mmap.PAGESIZE
        lo = (self._data + info.start) // page * page
        hi = (self._data + info.end) // page * page
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor still views the map: it closes when the last one goes
                pass
            self._map = None


def check_finite(t: Tensor, name: str, path: str) -> None:
    """MergeInputError if a floating tensor holds NaN or +-inf (one pass: min and max propagate NaN)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.reshape(-1))
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        bad = int((~torch.isfinite(t)).sum())
        raise MergeInputError(f"{path}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf)")


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor: `layout` (name -> (dtype, shape), in file order) fixes the
    header up front; `write` must then be called for every name in that order; `commit` moves the file into
    place. Use as a context manager: leaving it by an exception removes the temporary file."""

    def __init__(self, path: str, layout: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = os.path.abspath(path)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._order: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        offset = 0
        for name, (dtype, shape) in layout.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, tuple(shape)))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._head = struct.pack("<Q", len(raw)) + raw
        self._next = 0
        self._file = None
        self.tmp: str | None = None
        self._written = self._synced = 0  # bytes written, bytes whose writeback has been started

    def __enter__(self) -> "SafetensorsWriter":
        out_dir = os.path.dirname(self.path)
        os.makedirs(out_dir, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=out_dir)
        self._file = os.fdopen(fd, "wb")
        self._file.write(self._head)
        self._written = len(self._head)
        return self

    def write(self, name: str, t: Tensor) -> None:
        want, dtype, shape = self._order[self._next]
        if name != want or t.dtype != dtype or tuple(t.shape) != shape:
            raise RuntimeError(f"writer expected {want!r} {dtype} {list(shape)}, got {name!r} {t.dtype} "
                               f"{list(t.shape)}")
        if t.numel():
            data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data
            self._file.write(data)
            self._written += data.nbytes
        self._next += 1
        if _SYNC_RANGE is not None and self._written - self._synced >= _WRITEBACK_MIN:
            self._file.flush()
            if _SYNC_RANGE(self._file.fileno(), self._synced, self._written - self._synced, 2) == 0:
                self._synced = self._written

    def commit(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"writer got {self._next} of {len(self._order)} tensors")
        self._file.flush()
        os.fsync(self._file.fileno())
        os.fchmod(self._file.fileno(), 0o666 & ~_umask())
        self._file.close()
        os.replace(self.tmp, self.path)
        self.tmp = None
        try:  # make the rename durable too
            dfd = os.open(os.path.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self.tmp is not None:
            try:
                os.remove(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a tensor name equals one of `patterns` or matches it as an fnmatch pattern (*, ?, [...])."""
    from fnmatch import fnmatchcase

    return any(name == p or fnmatchcase(name, p) for p in patterns)
