"""Model-merging arithmetic (mergekit-style): each method is a function over the tensors of one parameter
(`fn(base, models, **kw) -> merged`), registered by name in MERGE_METHODS and applied tensor by tensor to
whole state dicts (merge_state_dicts) or to safetensors files (merge_safetensors).

merge_safetensors streams: it validates every header first (names, shapes, sizes), then reads the inputs
memory-mapped tensor by tensor and writes each merged tensor as soon as it is made (in file order, on a
writer thread), so memory stays near one tensor per model plus the one being written. Small tensors (up to
1/THREADS of the largest) are merged side by side, one per thread; a bigger one runs alone, split into
chunks over the threads. The output appears atomically (temporary file, fsync, rename) or not at all. Bad
inputs raise MergeInputError naming the tensor and the file (docs/merging.md).

Each method runs in passes over cache-sized chunks of the flattened tensor, in place where it can, with the
per-tensor statistics (top-k thresholds, weights) computed in earlier passes; the results are those of the
plain whole-tensor formulas in the docstrings, bit for bit up to the sign of a zero (tests/test_merging.py
checks them against such formulas with torch.equal). Arithmetic is in float32 (float64 if the base is
float64), cast back to the base dtype.

Conventions (mergekit 0.1.5 unless stated, table in docs/merging.md): statistics are per tensor; top-k keeps
the k largest magnitudes and, among equal values at the cut-off, the lowest flat indices (a stable
descending sort; torch.topk leaves that order unspecified); TIES keeps at least one element per tensor when
density > 0; SCE's variance is torch.var(unbiased=False) across models and its k is counted over the
positions of non-zero variance, so a single model selects nothing and SCE returns the pivot.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from . import merge_kernels as K
from .merge_io import MergeInputError, SafetensorsFile, SafetensorsWriter, check_finite, matches

MergeFn = Callable[..., Tensor]
MERGE_METHODS: dict[str, MergeFn] = {}
CHUNK = 1 << 16  # elements per chunk: a few chunks per model stay in cache
KERNEL_CHUNK = 1 << 18  # elements per chunk for the fused loops (one pass each: only the thread split matters)
# The fused numba loops of models.merge_kernels (same results as the torch ops; MERGE_KERNELS=0 turns them off)
KERNELS = K.AVAILABLE and os.environ.get("MERGE_KERNELS", "1") != "0"
_DIRECT_SELECT = 1 << 14  # up to this many elements top-k selection is a plain kthvalue
_SAMPLE = 1 << 14  # about this many sampled values bracket the k-th largest of a bigger tensor
# TIES on a float32 tensor up to this size (or any size on one thread) runs as one compiled call: one thread is
# faster there than chunks on several, and it leaves the GIL to the tensors merged side by side
_WHOLE_TENSOR = 1 << 20
# Chunks run on this many Python threads (torch releases the GIL inside an op; each op runs on one intra-op
# thread): the cores are used without OpenMP barriers, which stall whenever a core is busy elsewhere.
THREADS = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (THREADS, pid, pool): a forked child makes its own
_pool_lock = threading.Lock()


def _map(fn: Callable[..., object], spans: Sequence[tuple], min_items: int = 4) -> list:
    """[fn(*span) for each span], in order, the spans shared among THREADS threads (in the calling thread when
    there are fewer than min_items, or when it is one of the threads itself)."""
    if THREADS <= 1 or len(spans) < min_items or _in_pool():
        return [fn(*span) for span in spans]
    return list(_get_pool().map(lambda span: _on_pool_thread(fn, *span), spans))


def _in_pool() -> bool:
    """Whether this is one of the pool's threads (work it starts runs inline: the pool never waits on itself)."""
    return threading.current_thread().name.startswith("merge-chunk")


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool[:2] != (THREADS, os.getpid()):
            _pool = (THREADS, os.getpid(), ThreadPoolExecutor(THREADS, thread_name_prefix="merge-chunk"))
        return _pool[2]


def _on_pool_thread(fn: Callable[..., object], *args) -> object:
    if torch.get_num_threads() != 1:  # this thread's own OpenMP setting
        torch.set_num_threads(1)
    return fn(*args)


__all__ = ["MERGE_METHODS", "MergeInputError", "register_merge", "task_vector", "topk_mask", "task_arithmetic",
           "ties", "dare", "sce", "varm", "merge_state_dicts", "merge_safetensors"]


class _Buffers:
    """Reused memory for merge_safetensors: a fresh buffer costs a page fault per 4 KiB on first touch
    (measured: filling fresh memory takes ~8x refilling it), once per tensor per buffer. take() lends a tensor
    over the smallest free buffer that fits (or a new one); give() returns it; at most `keep` free buffers
    stay, so memory stays near what the largest tensor needs at once. Thread-safe (the writer gives back)."""

    def __init__(self, keep: int = 4):
        self.keep, self.free, self.lent = keep, [], {}
        self.lock = threading.Lock()

    def take(self, shape: int | tuple[int, ...], dtype: torch.dtype) -> Tensor:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        with self.lock:
            fits = [i for i, b in enumerate(self.free) if b.numel() >= nbytes]
            buf = self.free.pop(min(fits, key=lambda i: self.free[i].numel())) if fits else None
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        t = buf[:nbytes].view(dtype).view(shape)
        with self.lock:
            self.lent[t.data_ptr()] = buf
        return t

    def give(self, t: Tensor) -> None:
        """Return a tensor from take() (any other tensor is ignored); it must not be used afterwards."""
        with self.lock:
            buf = self.lent.pop(t.data_ptr(), None) if t.numel() else None
            if buf is None:
                return
            self.free.append(buf)
            if len(self.free) > self.keep:
                self.free.pop(min(range(len(self.free)), key=lambda i: self.free[i].numel()))


# set by merge_safetensors while it runs (its results go to the file, then back); unset: plain torch.empty
_buffers: contextvars.ContextVar[_Buffers | None] = contextvars.ContextVar("merge_buffers", default=None)


# set by merge_safetensors around each tensor's merge: [False, where its inputs lie (_where_inputs_lie)];
# _Job.run sets the flag when its loops saw every delta of exactly those inputs finite (merge_safetensors then
# skips its own pass over them; a method that merges other tensors, derived ones or a subset, proves nothing)
_inputs_finite: contextvars.ContextVar[list | None] = contextvars.ContextVar("merge_inputs_finite", default=None)


def _empty(shape: int | tuple[int, ...], dtype: torch.dtype) -> Tensor:
    pool = _buffers.get()
    return pool.take(shape, dtype) if pool is not None else torch.empty(shape, dtype=dtype)


def _release(*ts: Tensor) -> None:
    pool = _buffers.get()
    if pool is not None:
        for t in ts:
            pool.give(t)


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread: the many small in-cache ops gain nothing from OpenMP, and on a busy machine every
    op's barrier waits for a descheduled thread (measured: 3x to 40x slower with 2 threads on 2 loaded cores)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _single_threaded(fn: MergeFn) -> MergeFn:
    @functools.wraps(fn)
    def run(*args, **kw):
        with _one_thread():
            return fn(*args, **kw)
    return run


def register_merge(name: str) -> Callable[[MergeFn], MergeFn]:
    def wrap(fn: MergeFn) -> MergeFn:
        MERGE_METHODS[name] = fn
        return fn
    return wrap


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def task_vector(theta: Tensor, base: Tensor) -> Tensor:
    """tau = theta - base, in the working precision."""
    if theta.shape != base.shape:
        raise ValueError(f"task_vector: shape {tuple(theta.shape)} != base shape {tuple(base.shape)}")
    dt = _work_dtype(base)
    return theta.to(dt) - base.to(dt)


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} models")
    return [float(w) for w in weights]


class _Job:
    """One tensor's merge: flat views of base and models, the working dtype, chunk spans, the output."""

    def __init__(self, base: Tensor, models: Sequence[Tensor]):
        if len(models) == 0:
            raise ValueError("need at least one model to merge")
        for m in models:
            if m.shape != base.shape:
                raise ValueError(f"task_vector: shape {tuple(m.shape)} != base shape {tuple(base.shape)}")
        self.shape, self.out_dtype = base.shape, base.dtype
        self.dt = _work_dtype(base)
        self.base = base.detach().reshape(-1)
        self.models = [m.detach().reshape(-1) for m in models]
        self.n, self.numel = len(models), base.numel()
        # the fused loops: up to K.MAX_MODELS models (beyond, torch sums stacked rows in its own order), CPU
        self.fast = (KERNELS and self.n <= K.MAX_MODELS and
                     all(t.device.type == "cpu" for t in [self.base, *self.models]))
        # fused loops: chunks up to KERNEL_CHUNK, at least 2 per thread once a tensor is worth splitting
        step = min(KERNEL_CHUNK, max(1 << 14, -(-self.numel // (2 * THREADS)))) if self.fast else CHUNK
        self.spans = [(s, min(s + step, self.numel)) for s in range(0, self.numel, step)]
        self.out = _empty(self.numel, base.dtype)
        self.npdt = np.float64 if self.dt == torch.float64 else np.float32

    def each(self, fn: Callable[[int, int], object]) -> list:
        """fn(s, e) on every chunk (in parallel; results in chunk order)."""
        return _map(fn, self.spans, min_items=2 if self.fast else 4)

    def b(self, s: int, e: int) -> Tensor:
        return self.base[s:e].to(self.dt)

    def delta(self, j: int, s: int, e: int, bc: Tensor) -> Tensor:
        return self.models[j][s:e].to(self.dt) - bc

    def put(self, s: int, e: int, value: Tensor) -> None:
        self.out[s:e].copy_(value)

    def result(self) -> Tensor:
        return self.out.view(self.shape)

    def scalars(self, values: Sequence[float]) -> list[Tensor]:
        """Per-model weights as 0-d tensors of the working dtype (the arithmetic of a stacked weight vector)."""
        return list(torch.tensor(values, dtype=self.dt))

    # ---- the fused loops' side: numpy views of the working dtype ----

    def np_values(self, t: Tensor, s: int, e: int) -> np.ndarray:
        x = t[s:e]
        return (x if x.dtype == self.dt else x.to(self.dt)).numpy()

    def np_chunk(self, s: int, e: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """(base, models) on [s, e) as numpy arrays of the working dtype (views when no conversion is needed)."""
        return self.np_values(self.base, s, e), tuple(self.np_values(m, s, e) for m in self.models)

    def np_scalars(self, values: Sequence[float]) -> np.ndarray:
        return np.array(values, dtype=self.npdt)  # rounded as torch.tensor(values, dtype) rounds

    def run(self, body: Callable[[np.ndarray, tuple, int, np.ndarray], bool]) -> Tensor:
        """body(base, models, s, out) on every chunk; out is a view of the output (or a working-dtype buffer
        cast into it afterwards, as Tensor.copy_ rounds). body returns whether every delta of its chunk is
        finite (the output loops of models.merge_kernels do); when all are, merge_safetensors is told that
        this tensor's inputs are finite (_inputs_finite) and skips its own check."""
        def chunk(s: int, e: int) -> bool:
            b, ms = self.np_chunk(s, e)
            if self.out.dtype == self.dt:
                return body(b, ms, s, self.out[s:e].numpy())
            tmp = torch.empty(e - s, dtype=self.dt)
            ok = body(b, ms, s, tmp.numpy())
            self.out[s:e].copy_(tmp)
            return ok

        if all(self.each(chunk)):
            self.inputs_were_finite()
        return self.result()

    def inputs_were_finite(self) -> None:
        """Tell merge_safetensors (_inputs_finite) that every delta of this job was finite, when its inputs
        are the very tensors it read."""
        seen = _inputs_finite.get()
        if seen is not None and seen[1] == _where_inputs_lie(self.base, self.models):
            seen[0] = True


def _where_inputs_lie(base: Tensor, models: Sequence[Tensor]) -> tuple:
    """(data pointer, numel) of the base and of each model: which tensors a merge is working on."""
    return tuple((t.data_ptr(), t.numel()) for t in [base, *models])


def _sum0(parts: list[Tensor]) -> Tensor:
    """torch.stack(parts).sum(0), bit for bit (torch adds up to K.MAX_MODELS = 4 rows in order); one part: that
    part."""
    if len(parts) > K.MAX_MODELS:
        return torch.stack(parts).sum(0)
    if len(parts) == 1:
        return parts[0]
    acc = parts[0] + parts[1]
    for p in parts[2:]:
        acc += p
    return acc


# ---- top-k selection -------------------------------------------------------------------------------------

Scan = Callable[[int, int, float, float], tuple[int, Tensor]]
Find = Callable[[int, int, float, int], tuple[int, int]]


def _bracket(sample: Tensor, numel: int, k: float, extra_sd: float = 0.0) -> tuple[float, float]:
    """(hi, lo): a sample's bracket of the k-th largest of numel values, 4 standard deviations of the sample
    quantile wide (plus 4 x extra_sd sample ranks either side: the uncertainty of an estimated k) plus 16."""
    s = sample.numel()
    hi_i, lo_i = K.bracket_ranks(s, numel, k, extra_sd)  # ranks in descending order, 0-based
    ks = [s - r - 1 for r in (hi_i, lo_i) if 0 <= r < s]  # 0-based ascending positions
    at = dict(zip(ks, _smallest(sample, ks))) if ks else {}
    hi = float(at[s - hi_i - 1]) if hi_i >= 0 else math.inf
    lo = float(at[s - lo_i - 1]) if lo_i < s else -math.inf
    return hi, lo


def _smallest(x: Tensor, ranks: Sequence[int]) -> np.ndarray:
    """np.partition(x, ranks)[ranks] (0-based, NaN last) of a 1-D tensor of values >= 0 (the selections' |d|
    and variances): by a radix select on float32's bits (K.select_nonneg_f32: 4-5x faster than numpy's
    introselect on the collected candidates, and not slowed by many equal values), else by introselect
    (itself several times faster than torch.kthvalue on CPU)."""
    a = x.numpy()
    if any(not 0 <= r < a.size for r in ranks):
        raise IndexError(f"ranks {list(ranks)} out of range for {a.size} values")
    if KERNELS and a.dtype == np.float32:
        out = np.empty(len(ranks), dtype=np.float32)
        K.select_nonneg_f32(np.ascontiguousarray(a), np.asarray(ranks, dtype=np.int64), out)
        return out
    return np.partition(a, ranks)[list(ranks)]


def _select(values: Callable[[int, int], Tensor], spans: Sequence[tuple[int, int]], numel: int, k: int,
            sample: Tensor | None, fast: tuple[Scan, Find] | None = None,
            scanned: tuple[float, float, int, list[Tensor]] | None = None) -> tuple[float, int]:
    """(threshold, cut) of the top-k of non-negative values (given chunk by chunk): the k largest are the
    values > threshold plus those == threshold at flat index < cut (a stable descending sort's first k).
    Exact for any input; linear time: a sample brackets the k-th largest in [lo, hi], one pass counts the
    values above hi and collects those inside, and kthvalue runs on the few collected. `fast` does the passes on
    one chunk in fused loops: scan(a, b, hi, lo) -> (count above hi, the values in [lo, hi]), and
    find(a, b, thr, need) -> (count equal to thr, index in the chunk of the need-th of them or -1).
    `scanned` = (hi, lo, count above hi, the values in [lo, hi] chunk by chunk, (chunk start, their indices in
    the chunk) chunk by chunk): the bracket and the scan done already (several models' in one pass), lo != hi;
    a tie at the cut-off is then resolved from the indices, without another pass."""
    if scanned is not None:
        hi, lo = scanned[:2]
    else:
        hi, lo = _bracket(sample, numel, k)
    shrink = torch.nn.functional.hardshrink

    def scan(a: int, b: int) -> tuple[int, Tensor | int]:
        if fast is not None and lo != hi:
            return fast[0](a, b, hi, lo)
        x = values(a, b)
        above = int(torch.sign(shrink(x, hi)).nansum()) if hi < math.inf else 0  # x >= 0: counts x > hi
        if lo == hi:
            return above, int(torch.count_nonzero(x == hi))
        if lo > 0:  # the values in [lo, hi], others 0 (hardshrink instead of two comparisons)
            z = shrink(x, _below(lo, x.dtype))
            z -= shrink(z, hi)
            return above, z[z != 0]
        return above, x[(x >= lo) & (x <= hi)]

    scans = ([(scanned[2] if i == 0 else 0, c) for i, c in enumerate(scanned[3])] if scanned is not None
             else _map(scan, spans))
    above = sum(a for a, _ in scans)
    n_eq = sum(c for _, c in scans) if lo == hi else 0
    inside = [] if lo == hi else [c for _, c in scans]
    if lo == hi:
        if not above < k <= above + n_eq:
            return _select_direct(torch.cat([values(a, b) for a, b in spans]), k)
        thr, n_above, n_tie = lo, above, n_eq
    else:
        cand = torch.cat(inside)
        if not above < k <= above + cand.numel():  # a sample far off, or NaN (rejected before a merge)
            return _select_direct(torch.cat([values(a, b) for a, b in spans]), k)
        thr = _kth(cand, cand.numel() - (k - above) + 1)
        thr_t = torch.tensor(thr, dtype=cand.dtype)
        n_above = above + int(torch.count_nonzero(cand > thr_t))
        n_tie = int(torch.count_nonzero(cand == thr_t))
    need = k - n_above
    if need == n_tie:
        return thr, numel
    if scanned is not None:  # every value equal to thr is in the bracket, so among the collected, in order
        for values, (a, where) in zip(inside, scanned[4]):
            tied = where[values.numpy() == np.asarray(thr, dtype=values.numpy().dtype)]
            if need <= tied.size:
                return thr, a + int(tied[need - 1]) + 1
            need -= tied.size
    seen = 0  # ties straddle the cut-off: find the flat index of the need-th tied value
    for a, b in spans:
        if fast is not None:
            count, i = fast[1](a, b, thr, need - seen)
            if i >= 0:
                return thr, a + i + 1
            seen += count
            continue
        idx = (values(a, b) == thr).nonzero()[:, 0]
        if seen + idx.numel() >= need:
            return thr, a + int(idx[need - seen - 1]) + 1
        seen += idx.numel()
    return _select_direct(torch.cat([values(a, b) for a, b in spans]), k)  # only with NaN: raises


def _kth(x: Tensor, k: int) -> float:
    """torch.kthvalue(x, k) (the k-th smallest, 1-based) of a 1-D tensor of values >= 0; NaN sorts last."""
    return float(_smallest(x, [k - 1])[0])


def _select_direct(flat: Tensor, k: int) -> tuple[float, int]:
    if flat.is_floating_point() and bool(torch.isnan(flat).any()):
        raise ValueError("top-k selection over values that include NaN (a non-finite input)")
    thr_t = torch.kthvalue(flat, flat.numel() - k + 1).values
    need = k - int(torch.count_nonzero(flat > thr_t))
    tied = (flat == thr_t).nonzero()[:, 0]
    return float(thr_t), (flat.numel() if need == tied.numel() else int(tied[need - 1]) + 1)


def _threshold(values: Callable[[int, int], Tensor], job: _Job, k: int,
               sampled: Callable[[int], Tensor], fast: tuple[Scan, Find] | None = None) -> tuple[float, int]:
    if job.numel <= _DIRECT_SELECT:
        return _select_direct(values(0, job.numel), k)
    return _select(values, job.spans, job.numel, k, sampled(max(1, job.numel // _SAMPLE)), fast)


_scratch = threading.local()  # per thread: the fused scans' collection buffer, reused


def _scratch_buf(shape: tuple[int, ...], dtype: np.dtype, slot: str = "buf") -> np.ndarray:
    """A reused per-thread buffer (one per slot name) viewed as an array of that shape and dtype."""
    size = math.prod(shape)
    buf = getattr(_scratch, slot, None)
    if buf is None or buf.size < size * dtype.itemsize:
        buf = np.empty(max(size * dtype.itemsize, 1 << 20), dtype=np.uint8)
        setattr(_scratch, slot, buf)
    return buf[:size * dtype.itemsize].view(dtype).reshape(shape)


def _nan_error() -> ValueError:
    return ValueError("top-k selection over values that include NaN (a non-finite input)")


def _collect(scan_fn: Callable[..., tuple[int, int, bool]], n: int, *args) -> tuple[int, Tensor]:
    """Run a fused scan into a buffer of n values: (count above, the collected values as a tensor)."""
    buf = _scratch_buf((n,), args[0].dtype)
    above, c, nan = scan_fn(*args, buf)
    if nan:
        raise _nan_error()
    return above, torch.from_numpy(buf[:c].copy())


def _ties_cuts_fused(job: _Job, k: int) -> list[tuple[float, int]] | None:
    """Every model's top-k (threshold, cut) of |d_j| with one fused pass for all models (their brackets from
    samples first); None when a sample cannot bracket (many equal values: the per-model path handles it)."""
    step = max(1, job.numel // _SAMPLE)
    base_s = job.base[::step].to(job.dt)
    samples = [(m[::step].to(job.dt) - base_s).abs_() for m in job.models]
    brackets = [_bracket(smp, job.numel, k) for smp in samples]
    if any(hi == lo for hi, lo in brackets):
        return None
    his = np.array([hi for hi, _ in brackets])
    los = np.array([lo for _, lo in brackets])
    chunks = job.each(lambda a, b: _scan_abs_deltas(job, a, b, range(job.n), his, los))

    def finish(j: int) -> tuple[float, int]:
        above = int(sum(int(c[0][j]) for c in chunks))
        # the scan has collected every value of the bracket with its index: no further pass over the tensor
        return _select(lambda s, e: job.delta(j, s, e, job.b(s, e)).abs_(), job.spans, job.numel, k, None,
                       None, (his[j], los[j], above, [c[1][j] for c in chunks], [c[2][j] for c in chunks]))

    return _map(finish, [(j,) for j in range(job.n)], min_items=2)  # the models' selections side by side


def _ties_whole(job: _Job, k: int, wv: list[float], lam: float) -> Tensor | None:
    """ties() on a job whose inputs (and so output) are float32, in one call of K.ties_tensor_f32 (the same
    selection and loop as the chunked path, so the same bits); None when its bracket cannot be used and nothing
    was written."""
    b, ms = job.np_chunk(0, job.numel)  # views: no copy of float32 inputs
    thr, cut = np.empty(job.n), np.empty(job.n, dtype=np.int64)
    status, finite = K.ties_tensor_f32(b, ms, k, max(1, job.numel // _SAMPLE), job.np_scalars(wv), job.npdt(lam),
                                       all(x == 1.0 for x in wv), job.npdt(1e-8), job.npdt(1.0), thr, cut,
                                       job.out.numpy())
    if status == 2:
        raise _nan_error()
    if status == 1:
        return None
    if finite:
        job.inputs_were_finite()
    return job.result()


def _scan_abs_deltas(job: _Job, a: int, b: int, models: Sequence[int], his: np.ndarray,
                     los: np.ndarray) -> tuple[np.ndarray, list[Tensor], list[tuple[int, np.ndarray]]]:
    """The selection's pass over |d_j| on the chunk [a, b) for the given models (model models[i] bracketed by
    [los[i], his[i]]): (count above the bracket per model, the values inside it per model, (a, their indices
    within the chunk, int32) per model)."""
    bb = job.np_values(job.base, a, b)
    ms = tuple(job.np_values(job.models[j], a, b) for j in models)
    inside = _scratch_buf((len(ms), b - a), bb.dtype)
    where = _scratch_buf((len(ms), b - a), np.dtype(np.int32), "where")  # chunks are far below 2**31
    counts = np.empty((len(ms), 2), dtype=np.int64)
    if bb.dtype == np.float32:
        lo_bits = np.maximum(los, 0).astype(np.float32).view(np.uint32)  # |d| >= 0: a bracket below 0 is 0
        nan = K.scan_abs_deltas_f32(bb, ms, his, lo_bits, his.astype(np.float32).view(np.uint32) - lo_bits,
                                    inside, where, counts)
    else:
        nan = K.scan_abs_deltas(bb, ms, his, los, inside, where, counts)
    if nan:
        raise _nan_error()
    n = counts[:, 1]
    return (counts[:, 0].copy(), [torch.from_numpy(inside[i, :n[i]].copy()) for i in range(len(ms))],
            [(a, where[i, :n[i]].copy()) for i in range(len(ms))])


def _find_abs_delta_equal(job: _Job, j: int, a: int, b: int, thr: float, need: int) -> tuple[int, int]:
    return K.find_abs_delta_equal(job.np_values(job.base, a, b), job.np_values(job.models[j], a, b), thr, need)


def _keep(x: Tensor, thr: float, cut: int, s: int, e: int) -> Tensor:
    """The top-k mask on the chunk [s, e) of the values, given (threshold, cut) from _select."""
    if e <= cut:
        return x >= thr
    keep = x > thr
    if s < cut:
        keep[:cut - s] |= x[:cut - s] == thr
    return keep


def topk_mask(x: Tensor, density: float, min_keep: int = 0) -> Tensor:
    """Boolean mask keeping the max(int(density*numel), min_keep) largest |x| (min_keep only when density > 0;
    stable: lower flat index wins ties)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    flat = x.reshape(-1).abs()
    k = int(density * flat.numel())
    if density > 0:
        k = max(k, min_keep)
    if k >= flat.numel():
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if k <= 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    thr, cut = _select_direct(flat, k)
    return _keep(flat, thr, cut, 0, flat.numel()).view(x.shape)


def _elect_sign(total: Tensor) -> Tensor:
    """Majority sign of a (weighted) sum; an exact zero counts as + (mergekit)."""
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


# The chunk loops below use float arithmetic where the formulas compare and mask: on CPU a comparison and a
# multiply by a bool mask cost several times a float op (measured). Each rewrite gives the same values (up to
# the sign of a zero): hardshrink(x, lam) is x where |x| > lam, else 0; relu(sign(p) * S) is 1 where p has
# the sign S, else 0.

@functools.lru_cache(maxsize=256)
def _below(x: float, dt: torch.dtype) -> float:
    """The largest value of dtype dt below x (x a value of dt): |v| >= x <=> |v| > _below(x)."""
    return float(torch.nextafter(torch.tensor(x, dtype=dt), torch.tensor(-math.inf, dtype=dt)))


@functools.lru_cache(maxsize=64)
def _as(x: float, dt: torch.dtype) -> float:
    """x rounded to dtype dt (as a comparison of a dt tensor with the Python number x rounds it)."""
    return float(torch.tensor(x, dtype=dt))


def _trim(d: Tensor, thr: float, cut: int, s: int, e: int) -> Tensor:
    """d on the chunk [s, e) with the entries outside the top-k of |d| (see _select) set to 0."""
    if s < cut < e:
        return d.mul_(_keep(d.abs(), thr, cut, s, e))
    if e <= cut:  # |d| >= thr
        if thr <= 0:
            return d
        return torch.nn.functional.hardshrink(d, _below(thr, d.dtype))
    return torch.nn.functional.hardshrink(d, thr)  # |d| > thr


def _agreement(parts: list[Tensor], total: Tensor) -> list[Tensor]:
    """Per part, 1.0 where it has the elected sign of `total` (zero counts as +), else 0.0 (zeros never
    agree): the float form of sign(part) == _elect_sign(total)."""
    elected = torch.sign(total).add_(0.5).sign_()
    return [torch.sign(p).mul_(elected).clamp_min_(0) for p in parts]


def _one_if_below(x: Tensor, eps: float) -> Tensor:
    """torch.where(x.abs() < eps, 1, x) (eps compared in x's dtype)."""
    h = torch.nn.functional.hardshrink(x, _below(_as(eps, x.dtype), x.dtype))
    return h.add_(torch.sign(h.abs()).neg_().add_(1))


# ---- methods ---------------------------------------------------------------------------------------------

@register_merge("task_arithmetic")
@_single_threaded
def task_arithmetic(base: Tensor, models: Sequence[Tensor], weights: Sequence[float] | None = None,
                    lam: float = 0.3) -> Tensor:
    """theta = base + lam * sum_j w_j (theta_j - base)."""
    job = _Job(base, models)
    wv = _weights(job.n, weights)
    if job.fast:
        wn, lam_n = job.np_scalars(wv), job.npdt(lam)
        return job.run(lambda b, ms, s, out: K.weighted_sum(b, ms, wn, lam_n, out))
    w = job.scalars(wv)

    def chunk(s: int, e: int) -> None:
        bc = job.b(s, e)
        parts = []
        for j in range(job.n):
            d = job.delta(j, s, e, bc)
            parts.append(d if wv[j] == 1.0 else d.mul_(w[j]))
        job.put(s, e, bc + lam * _sum0(parts))

    job.each(chunk)
    return job.result()


@register_merge("ties")
@_single_threaded
def ties(base: Tensor, models: Sequence[Tensor], density: float = 0.5,
         weights: Sequence[float] | None = None, lam: float = 1.0) -> Tensor:
    """TIES (mergekit 0.1.5): trim each delta to its top-k magnitudes (k = int(density*numel), at least 1 when
    density > 0), weight, elect the sign of the weighted sum (0 -> +), then average the agreeing untrimmed
    entries with the weights as divisor (1 where it is below 1e-8): theta = base + lam * mixed / divisor.
    Differs from peft.utils.merge_utils.ties, which elects the sign on UNweighted trimmed deltas and divides
    by the count of agreeing entries only when weights are uniform; `lam` scales the result."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    job = _Job(base, models)
    wv = _weights(job.n, weights)
    w = job.scalars(wv)
    k = max(int(density * job.numel), 1) if density > 0 else 0

    if (job.fast and all(t.dtype == torch.float32 for t in [job.base, *job.models]) and 0 < k < job.numel
            and job.numel > _DIRECT_SELECT and (job.numel <= _WHOLE_TENSOR or THREADS <= 1 or _in_pool())):
        whole = _ties_whole(job, k, wv, lam)  # one compiled call; None: a case for the paths below
        if whole is not None:
            return whole
    fused = (job.fast and 0 < k < job.numel and job.numel > _DIRECT_SELECT
             and _ties_cuts_fused(job, k))  # one pass for all models; else model by model

    def model_cut(j: int) -> tuple[float, int] | None:
        """(threshold, cut) of model j's top-k; None: keep all."""
        if k >= job.numel:
            return None
        if k == 0:
            return math.inf, 0
        fast = None
        if job.fast:
            def scan(a: int, b: int, hi: float, lo: float) -> tuple[int, Tensor]:
                above, inside, _ = _scan_abs_deltas(job, a, b, [j], np.array([hi]), np.array([lo]))
                return int(above[0]), inside[0]

            fast = (scan, functools.partial(_find_abs_delta_equal, job, j))
        return _threshold(lambda s, e: job.delta(j, s, e, job.b(s, e)).abs_(), job, k,
                          lambda st: (job.models[j][::st].to(job.dt) - job.base[::st].to(job.dt)).abs_(), fast)

    cuts = fused or [model_cut(j) for j in range(job.n)]  # each selection's passes run on the threads
    if job.fast:
        thr = np.array([-1.0 if c is None else c[0] for c in cuts])  # -1: keep every entry
        cut = np.array([0 if c is None else c[1] for c in cuts], dtype=np.int64)
        wn, lam_n, eps, one = job.np_scalars(wv), job.npdt(lam), job.npdt(1e-8), job.npdt(1.0)
        uniform = all(x == 1.0 for x in wv)
        def body(b: np.ndarray, ms: tuple, s: int, out: np.ndarray) -> bool:
            # split at the cut-offs inside the chunk: each piece runs the loop without index comparisons
            ends = sorted({0, b.size, *(int(c) - s for c in cut if s < c < s + b.size)})
            return all([K.ties_chunk(b[p:q], tuple(m[p:q] for m in ms), wn, thr, cut, s + p, lam_n, uniform, eps,
                                     one, out[p:q]) for p, q in zip(ends, ends[1:])])

        return job.run(body)

    def chunk(s: int, e: int) -> None:
        bc = job.b(s, e)
        weighted = []
        for j in range(job.n):
            d = job.delta(j, s, e, bc)
            if cuts[j] is not None:
                d = _trim(d, *cuts[j], s, e)
            weighted.append(d if wv[j] == 1.0 else d.mul_(w[j]))
        # a trimmed (zero) entry never agrees: it leaves the divisor
        agree = _agreement(weighted, _sum0(weighted))
        mixed = _sum0([x.mul_(a) for x, a in zip(weighted, agree)])
        if all(x == 1.0 for x in wv):
            divisor = _sum0(agree).clamp_min_(1)  # a count: below 1e-8 means 0
        else:
            divisor = _one_if_below(_sum0([w[j] * a for j, a in enumerate(agree)]), 1e-8)
        job.put(s, e, bc + (mixed if lam == 1.0 else lam * mixed) / divisor)

    job.each(chunk)
    return job.result()


@register_merge("dare")
@_single_threaded
def dare(base: Tensor, models: Sequence[Tensor], density: float = 0.5,
         weights: Sequence[float] | None = None, rescale: bool = True,
         generator: torch.Generator | None = None, lam: float = 1.0) -> Tensor:
    """DARE (linear): drop each delta entry with probability 1-density (keep where U[0,1) < density), rescale
    survivors by 1/density, then theta = base + lam * sum_j w_j d_j. The uniforms are counter-based: one 64-bit
    seed per model is drawn from `generator` (torch's default generator when None), and entry i of model j
    gets output i + 1 of SplitMix64 seeded with it, as a float32 of 24 random bits (K.uniforms). So any chunk
    is drawn on its own, in parallel, and the result does not depend on the chunking or the thread count;
    the same generator state gives the same merge."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"dare density must be in (0, 1], got {density}")
    job = _Job(base, models)
    wv = _weights(job.n, weights)
    seeds = torch.randint(-2 ** 63, 2 ** 63 - 1, (job.n,), generator=generator, dtype=torch.int64)
    seeds = seeds.numpy().view(np.uint64)
    if job.fast:
        wn, lam_n, dens = job.np_scalars(wv), job.npdt(lam), job.npdt(density)
        return job.run(lambda b, ms, s, out: K.dare_chunk(b, ms, wn, seeds, s, dens, rescale, lam_n,
                                                         job.npdt(1.0), out))
    w = job.scalars(wv)
    # beyond K.MAX_MODELS models the rows are kept for torch's stacked sum (its order then depends on the layout)
    rows = torch.empty(job.n, job.numel, dtype=job.dt) if job.n > K.MAX_MODELS else None
    total = torch.empty(job.numel, dtype=job.dt) if rows is None else None
    d32 = _as(density, job.dt)
    for j in range(job.n):
        def chunk(s: int, e: int, j: int = j) -> None:
            d = job.delta(j, s, e, job.b(s, e))
            uniform = torch.from_numpy(K.uniforms(int(seeds[j]), s, e - s)).to(job.dt)
            d.mul_(uniform.neg_().add_(d32).sign_().clamp_min_(0))  # 1.0 where u < density, else 0.0
            if rescale:
                d.div_(density)
            if wv[j] != 1.0:
                d.mul_(w[j])
            if rows is not None:
                rows[j, s:e] = d
            elif j == 0:
                total[s:e] = d
            else:
                total[s:e] += d

        job.each(chunk)
    if rows is not None:
        total = rows.sum(0)
        del rows
    job.each(lambda s, e: job.put(s, e, job.b(s, e) + lam * total[s:e]))
    return job.result()


def _energies(job: _Job, deltas: Callable[[int, int, Tensor], list[Tensor]]) -> Tensor:
    """mean(d_j^2) per model in the working dtype: the squares summed in float64 (each chunk's sum, then the
    chunks' in order) and divided by numel, then rounded; what (d.double()**2).mean() gives up to float64
    rounding (so the rounded result is the same but for a sum within ~1e-16 of a rounding boundary)."""
    def chunk(s: int, e: int) -> list[float]:
        return [float(d.double().square_().sum()) for d in deltas(s, e, job.b(s, e))]

    return _mean_of_sums(job, job.each(chunk))


def _mean_of_sums(job: _Job, per_chunk: list) -> Tensor:
    totals = [0.0] * job.n
    for sums in per_chunk:
        for j in range(job.n):
            totals[j] += float(sums[j])
    return torch.tensor([t / job.numel for t in totals], dtype=torch.float64).to(job.dt)


def _torch_var(deltas: list[Tensor]) -> Tensor:
    """torch.var(torch.stack(deltas), dim=0, unbiased=False), bit for bit and much faster: torch runs
    Welford's recurrence in float64 per position and rounds the result to the working dtype."""
    mean = deltas[0].double()
    m2 = torch.zeros_like(mean)
    for j, x in enumerate(deltas[1:], start=2):
        x = x.double()
        delta = x - mean
        mean += delta / j
        x -= mean
        m2 += x.mul_(delta)
    return m2.div_(len(deltas)).to(deltas[0].dtype)


@register_merge("sce")
@_single_threaded
def sce(pivot: Tensor, models: Sequence[Tensor], select_topk: float = 0.1,
        masked_final_sum: bool = True) -> Tensor:
    """SCE (FuseChat 2.0): Select positions by top-k variance of the deltas across models (torch.var,
    unbiased=False; k = int(select_topk * number of non-zero variances); select_topk >= 1 selects every
    position), Calculate weights w_j = mean(masked d_j^2) normalised (uniform if they sum below 1e-6), Erase
    entries whose sign disagrees with the sign of the summed masked deltas;
    theta = pivot + sum w_j e_j d_j / sum w_j e_j (denominator 1 where it is below 1e-12).
    masked_final_sum=True (mergekit 0.1.5): the sign election, the erase step and the final sum use the
    masked deltas, so unselected positions stay at the pivot. False (the formula as written in FuseChat,
    theta = pivot + sum w_j e_j d_j / sum w_j e_j with the raw deltas d_j): the selection only decides
    the weights; every position takes the sign-consensus weighted mean of the raw deltas. Entries equal
    to zero never agree with the elected sign, so a position where no delta is non-zero stays at pivot."""
    if not 0.0 <= select_topk <= 1.0:
        raise ValueError(f"select_topk must be in [0, 1], got {select_topk}")
    job = _Job(pivot, models)
    n = job.n
    if job.fast:
        return _sce_fast(job, select_topk, masked_final_sum)
    if select_topk >= 1:
        select = None  # every position
    else:
        var = torch.empty(job.numel, dtype=job.dt)

        def var_chunk(s: int, e: int) -> None:
            bc = job.b(s, e)
            var[s:e] = _torch_var([job.delta(j, s, e, bc) for j in range(n)])

        job.each(var_chunk)
        k = int(select_topk * int(torch.count_nonzero(var)))
        select = (math.inf, 0) if k == 0 else _threshold(lambda s, e: var[s:e], job, k, lambda st: var[::st])

    def masked(s: int, e: int, bc: Tensor) -> list[Tensor]:
        """The deltas on [s, e), multiplied by the selection mask (1.0 selected, 0.0 not)."""
        deltas = [job.delta(j, s, e, bc) for j in range(n)]
        if select is None:
            return deltas
        thr, cut = select
        if s < cut < e:
            mask = _keep(var[s:e], thr, cut, s, e).to(job.dt)
        else:  # var >= 0 and a selected var > 0: sign(hardshrink(var)) is the mask
            mask = torch.sign(torch.nn.functional.hardshrink(var[s:e], _below(thr, job.dt) if e <= cut else thr))
        return [d.mul_(mask) for d in deltas]

    energy = _energies(job, masked)
    if float(energy.sum()) < 1e-6:
        energy = torch.ones_like(energy)
    w = list(energy / energy.sum())

    def final_chunk(s: int, e: int) -> None:
        bc = job.b(s, e)
        final = masked(s, e, bc) if masked_final_sum else [job.delta(j, s, e, bc) for j in range(n)]
        erase = _agreement(final, _sum0(final))  # masked mode: unselected entries are 0, never kept
        num = _sum0([f.mul_(w[j]).mul_(erase[j]) for j, f in enumerate(final)])
        den = _one_if_below(_sum0([w[j] * x for j, x in enumerate(erase)]), 1e-12)
        job.put(s, e, bc + num / den)

    job.each(final_chunk)
    return job.result()


def _sce_fast(job: _Job, select_topk: float, masked_final_sum: bool) -> Tensor:
    """sce() with the fused loops: the same stages and roundings."""
    var = _empty(job.numel if select_topk < 1 else 0, job.dt)
    var_np = var.numpy()
    select = (-1.0, 0)  # thr < 0: every position
    w = None
    if select_topk < 1:
        one_pass = _sce_one_pass(job, select_topk, var_np) if job.dt == torch.float32 else None
        if one_pass is not None and not isinstance(one_pass, int):
            thr, cut, w = one_pass
            select = (thr, cut)
        else:
            if one_pass is None:  # the variance is not computed yet
                job.each(lambda s, e: K.welford_var(*job.np_chunk(s, e), var_np[s:e]))
                one_pass = int(torch.count_nonzero(var))
            k = int(select_topk * one_pass)
            select = (math.inf, 0) if k == 0 else _threshold(
                lambda s, e: var[s:e], job, k, lambda st: var[::st],
                (lambda a, b, hi, lo: _collect(K.scan_values, b - a, var_np[a:b], hi, lo),
                 lambda a, b, thr, need: K.find_value_equal(var_np[a:b], thr, need)))
    thr, cut = select
    if w is None:
        w = _energy_weights(job, var_np, thr, cut, 1e-6)
    eps, one = job.npdt(1e-12), job.npdt(1.0)

    def body(b: np.ndarray, ms: tuple, s: int, out: np.ndarray) -> bool:
        v = var_np[s:s + b.size] if var_np.size else var_np
        return K.sce_chunk(b, ms, v, thr, cut, s, masked_final_sum, w, eps, one, out)

    out = job.run(body)
    _release(var)  # (the closures above that view it are done)
    return out


def _sce_one_pass(job: _Job, select_topk: float, var_np: np.ndarray) -> tuple[float, int, np.ndarray] | int | None:
    """SCE's variance, top-k selection and energy weights with one pass over the inputs (float32 working dtype,
    tensors big enough to sample): a sample of positions brackets the k-th largest variance first (k estimated
    from the sample's share of non-zero variances); K.sce_first_pass then computes every variance, counts,
    collects the bracketed ones with their indices, and sums d_j^2 over the positions above the bracket; the
    selection finishes on the collected values and their energies are added from the inputs at their
    indices. Returns (thr, cut, weights) as _select and _energy_weights give them; the count of non-zero
    variances when the bracket missed (var_np is then filled: the caller goes on from there); None when no
    bracket was tried."""
    numel = job.numel
    if numel <= _DIRECT_SELECT:
        return None
    step = max(1, numel // _SAMPLE)
    sample = torch.empty(len(range(0, numel, step)), dtype=job.dt)
    K.welford_var(job.base[::step].to(job.dt).contiguous().numpy(),
                  tuple(m[::step].to(job.dt).contiguous().numpy() for m in job.models), sample.numpy())
    s = sample.numel()
    p = int(torch.count_nonzero(sample)) / s  # share of non-zero variances, estimated
    k_est = select_topk * p * numel
    if not 0 < k_est < numel:
        return None
    hi, lo = _bracket(sample, numel, k_est, extra_sd=select_topk * math.sqrt(s * p * (1 - p)))  # (+ k's error)
    lo = max(lo, 0.0)  # variances are >= 0
    if not lo < hi:
        return None
    lo_bits = np.float32(lo).view(np.uint32)
    span = np.uint32(np.float32(hi).view(np.uint32) - lo_bits)
    n = job.n

    def chunk(a: int, b: int) -> tuple:
        bb, ms = job.np_chunk(a, b)
        lanes = np.empty((n, 16))
        cand_v = np.empty(b - a, dtype=np.float32)
        cand_i = np.empty(b - a, dtype=np.int64)
        cand_sq = _scratch_buf((n, b - a), np.dtype(np.float64))
        counts = np.empty(4, dtype=np.int64)
        K.sce_first_pass(bb, ms, var_np[a:b], hi, lo_bits, span, lanes, cand_v, cand_i, cand_sq, counts)
        if counts[3]:
            raise _nan_error()
        c = int(counts[2])
        return int(counts[0]), int(counts[1]), cand_v[:c], cand_i[:c] + a, cand_sq[:, :c].copy(), lanes.sum(1)

    parts = job.each(chunk)
    nnz = sum(x[0] for x in parts)
    above = sum(x[1] for x in parts)
    k = int(select_topk * nnz)
    cand = np.concatenate([x[2] for x in parts])
    if k == 0 or not above < k <= above + cand.size:
        return nnz
    idx = np.concatenate([x[3] for x in parts])
    thr = _kth(torch.from_numpy(cand.copy()), cand.size - (k - above) + 1)
    thr32 = np.float32(thr)
    need = k - (above + int(np.count_nonzero(cand > thr32)))
    tied = idx[cand == thr32]
    cut = numel if need == tied.size else int(tied[need - 1]) + 1
    chosen = (cand > thr32) | ((cand == thr32) & (idx < cut))
    # the float64 sums of d_j^2: above the bracket (the lanes, chunk by chunk), then the chosen candidates
    sums = np.sum([x[5] for x in parts], axis=0) + np.concatenate([x[4] for x in parts], axis=1)[:, chosen].sum(1)
    energy = _mean_of_sums(job, [sums])
    if float(energy.sum()) < 1e-6:
        energy = torch.ones_like(energy)
    return thr, cut, (energy / energy.sum()).numpy().astype(job.npdt)


def _energy_weights(job: _Job, var_np: np.ndarray | None, thr: float, cut: int,
                    floor: float | None) -> np.ndarray:
    """w_j = mean(d_j^2) / sum_k mean(d_k^2) over the deltas masked by the variance top-k (var_np, thr, cut;
    thr < 0: unmasked), uniform when the sum is below `floor` (None: when it is exactly 0); the means as
    _energies computes them."""
    def chunk(s: int, e: int) -> np.ndarray:
        b, ms = job.np_chunk(s, e)
        sums = np.empty(job.n)
        K.energy_sums(b, ms, b if thr < 0 else var_np[s:e], thr, cut, s, sums)  # var not read when thr < 0
        return sums

    energy = _mean_of_sums(job, job.each(chunk))
    total = float(energy.sum())
    if (total < floor) if floor is not None else (total == 0.0):
        energy = torch.ones_like(energy)
    return (energy / energy.sum()).numpy().astype(job.npdt)


@register_merge("varm")
@_single_threaded
def varm(pivot: Tensor, models: Sequence[Tensor]) -> Tensor:
    """VaRM (FuseChat v1): per tensor, w_j = mean(d_j^2) / sum_k mean(d_k^2) (uniform if all zero);
    theta = pivot + sum_j w_j d_j."""
    job = _Job(pivot, models)
    if job.fast:
        w, one = _energy_weights(job, None, -1.0, 0, None), job.npdt(1.0)
        return job.run(lambda b, ms, s, out: K.weighted_sum(b, ms, w, one, out))
    energy = _energies(job, lambda s, e, bc: [job.delta(j, s, e, bc) for j in range(job.n)])
    if float(energy.sum()) == 0.0:
        energy = torch.ones_like(energy)
    w = list(energy / energy.sum())

    def chunk(s: int, e: int) -> None:
        bc = job.b(s, e)
        job.put(s, e, bc + _sum0([job.delta(j, s, e, bc).mul_(w[j]) for j in range(job.n)]))

    job.each(chunk)
    return job.result()


# ---- whole models ----------------------------------------------------------------------------------------

def _check_finite(t: Tensor, name: str, path: str) -> None:
    """merge_io.check_finite, the min/max pass split over the threads for a big tensor."""
    if not t.is_floating_point() or t.numel() < (1 << 21):
        return check_finite(t, name, path)
    flat, step = t.reshape(-1), 1 << 20

    def finite(s: int, e: int) -> bool:
        lo, hi = torch.aminmax(flat[s:e])
        return math.isfinite(float(lo)) and math.isfinite(float(hi))

    if not all(_map(finite, [(s, min(s + step, flat.numel())) for s in range(0, flat.numel(), step)])):
        check_finite(t, name, path)  # raises, with the count


class _WriteBehind:
    """Hands tensors to a SafetensorsWriter on a thread, so that the output is written (and the disk works)
    while the next tensor is merged; at most one tensor waits, so memory stays bounded. Errors of the
    writing thread are raised by the next write or by close; abort stops it without further writes."""

    def __init__(self, writer: SafetensorsWriter, buffers: _Buffers):
        self.writer, self.buffers, self.error, self.stop = writer, buffers, None, False
        self.q: queue.Queue = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._run, name="merge-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None and not self.stop:
                try:
                    self.writer.write(*item)
                except BaseException as e:  # noqa: BLE001 - handed to the merging thread
                    self.error = e
                self.buffers.give(item[1])
            del item

    def write(self, name: str, t: Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((name, t))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self.stop = True
        self.q.put(None)
        self.thread.join()

def _get_method(method: str) -> MergeFn:
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[method]


def _side_by_side(names: Sequence[str], numel: Mapping[str, int], job: Callable[[str], Tensor],
                  emit: Callable[[str, Tensor], None], before: Callable[[str], None] | None = None) -> None:
    """emit(name, job(name)) for every name, in order. Names whose numel (absent: 0) is up to 1/THREADS of the
    largest run side by side, one per pool thread and each single-threaded (a tensor that small gains nothing
    from being split), so that at most THREADS are under way and together they are no bigger than the
    largest; a bigger one waits for those and runs alone, splitting itself over the threads. before(name), if
    given, runs first for each name, in this thread. The first failure in name order is raised, after the
    jobs under way have stopped."""
    largest = max(numel.values(), default=0)
    limit = largest // THREADS if THREADS > 1 and not _in_pool() else -1  # (never wait on the pool from it)
    inflight: collections.deque = collections.deque()  # (name, future), in order

    def emit_first() -> None:
        name, fut = inflight.popleft()
        emit(name, fut.result())

    try:
        for name in names:
            if before is not None:
                before(name)
            if numel.get(name, 0) <= limit:
                while len(inflight) >= THREADS:
                    emit_first()
                inflight.append((name, _get_pool().submit(contextvars.copy_context().run, _on_pool_thread,
                                                          job, name)))
            else:
                while inflight:
                    emit_first()
                emit(name, job(name))
        while inflight:
            emit_first()
    except BaseException:
        for _, fut in inflight:
            fut.cancel()
        concurrent.futures.wait([fut for _, fut in inflight])
        raise


def merge_state_dicts(method: str, base_sd: Mapping[str, Tensor], sds: Sequence[Mapping[str, Tensor]],
                      exclude: Iterable[str] = (), **kw) -> dict[str, Tensor]:
    """Merge every tensor of base_sd with the same-named tensors of each sd in `sds`; the names in `exclude`
    are not merged and keep base_sd's value (a copy). Names only in `sds` are ignored. Small tensors are
    merged side by side on the threads, as merge_safetensors does; the result keeps base_sd's order."""
    fn = _get_method(method)
    skip = set(exclude)
    for name in base_sd:
        missing = [i for i, sd in enumerate(sds) if name not in sd and name not in skip]
        if missing:
            raise MergeInputError(f"tensor {name!r} missing from model(s) {missing}")

    def one(name: str) -> Tensor:
        base = base_sd[name]
        if name in skip:
            return base.clone()
        return fn(base, [sd[name] for sd in sds], **kw)

    out: dict[str, Tensor] = {}
    with _one_thread():
        _side_by_side(list(base_sd), {n: base_sd[n].numel() for n in base_sd if n not in skip}, one,
                      out.__setitem__)
    return out


def merge_safetensors(method: str, base_path: str, model_paths: Sequence[str], out_path: str, *,
                      passthrough: Iterable[str] = (), check_finite_values: bool = True,
                      on_tensor: Callable[[str], None] | None = None, **kw) -> None:
    """Streaming merge of safetensors files into out_path (see the module docstring); `kw` goes to the method.

    Every tensor of the base is merged with the same-named tensor of each model, except those named in
    `passthrough` (exact names or fnmatch patterns such as "lm_head.*"), which are copied from the base and
    may be absent from, or extra in, the models. Raised before anything is written (MergeInputError naming
    tensor and file): an unreadable, foreign or truncated file; a tensor of the models missing from the base;
    a tensor of the base missing from a model; a shape mismatch. A NaN or inf in an input tensor
    (check_finite_values) is found when that tensor is merged, before it is written, and aborts the merge: no
    output, no temporary file (the fused loops prove a tensor's inputs finite on their own pass; otherwise
    they are checked in a pass of their own).
    `on_tensor(name)` is called before each tensor; an exception it raises (a signal handler's, say) stops the
    merge the same way.
    """
    fn = _get_method(method)
    if not model_paths:
        raise ValueError("need at least one model to merge")
    try:  # a misspelt keyword fails here, not after the first tensor
        inspect.signature(fn).bind(None, [], **kw)
    except TypeError as e:
        raise ValueError(f"merge method {method!r}: {e}") from None
    passthrough = tuple(passthrough)
    base_f = SafetensorsFile(base_path)
    model_fs = [SafetensorsFile(p) for p in model_paths]
    try:
        in_all = set.intersection(*(set(f.tensors) for f in model_fs)) if model_fs else set()
        for name in sorted(in_all - set(base_f.tensors)):
            if not matches(name, passthrough):
                raise MergeInputError(f"{base_path}: tensor {name!r} of every model is missing from the base; "
                                      "pass it through (passthrough=) to drop it")
        for f in model_fs:
            for name in f.tensors:
                if name not in base_f.tensors and name not in in_all and not matches(name, passthrough):
                    raise MergeInputError(f"{f.path}: tensor {name!r} is not in the base {base_path}")
        merged = [name for name in base_f.tensors if not matches(name, passthrough)]
        for name in merged:
            info = base_f.tensors[name]
            for f in model_fs:
                other = f.tensors.get(name)
                if other is None:
                    raise MergeInputError(f"{f.path}: tensor {name!r} of the base {base_path} is missing")
                if other.shape != info.shape:
                    raise MergeInputError(f"{f.path}: tensor {name!r} has shape {list(other.shape)}, the base "
                                          f"{base_path} has {list(info.shape)}")
        merged_set = set(merged)
        layout = {name: (info.dtype, info.shape) for name, info in base_f.tensors.items()}

        def one(name: str) -> Tensor:
            """The output tensor `name`: read (and checked), merged; its inputs' pages released."""
            base = base_f.tensor(name)
            if name not in merged_set:
                if check_finite_values:
                    _check_finite(base, name, base_f.path)
                return base
            models = [f.tensor(name) for f in model_fs]
            # the check rides on the merge's own pass where the method's loops report every delta finite;
            # otherwise (or when the method fails: a selection over NaN, say) the inputs are checked here,
            # before anything of this tensor is written
            seen, error = [False, _where_inputs_lie(base, models)], None
            token = _inputs_finite.set(seen)
            try:
                out = fn(base, models, **kw)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the input check
                error = e
            finally:
                _inputs_finite.reset(token)
            if check_finite_values and not seen[0]:
                _check_finite(base, name, base_f.path)
                for f, m in zip(model_fs, models):
                    _check_finite(m, name, f.path)
            if error is not None:
                raise error
            if out.shape != base.shape or out.dtype != base.dtype:
                raise RuntimeError(f"merge method {method!r} returned {out.dtype} {list(out.shape)} "
                                   f"for tensor {name!r} ({base.dtype} {list(base.shape)})")
            del models
            for f in [base_f, *model_fs]:
                f.release(name)
            return out

        buffers = _Buffers(keep=4 + 2 * THREADS)
        token = _buffers.set(buffers)
        with _one_thread(), SafetensorsWriter(out_path, layout, base_f.metadata) as writer:
            behind = _WriteBehind(writer, buffers)
            try:
                _side_by_side(list(layout), {n: base_f.tensors[n].numel for n in merged}, one, behind.write,
                              before=on_tensor)
                behind.close()
            except BaseException:
                behind.abort()
                raise
            writer.commit()
    finally:
        if "token" in locals():
            _buffers.reset(token)
        for f in [base_f, *model_fs]:
            f.close()
