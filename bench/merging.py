"""Merge speed: `models.merging.merge_safetensors` against the time to only read its inputs.

Inputs are built here, never downloaded: a Llama (transformers' LlamaConfig, untied embeddings, float32) as a
base and three "fine-tunes" (the base plus seeded Gaussian noise), each an HF model folder (config.json +
one model.safetensors), written tensor by tensor so that building them needs about one tensor of memory.
Two sizes: `small` 25,785,216 parameters (4 x 103 MB) and `large` 301,507,584 (4 x 1.21 GB). They are cached
under $MERGE_BENCH_DIR (default /tmp/merge_bench), keyed by their config and seed; the large set is deleted at
the end unless MERGE_BENCH_KEEP=1.

Every measurement runs in a fresh subprocess (`python -m bench.merging --child ...`) with the page cache warm:
  - read: the four input files read once, both through safetensors (every tensor by get_tensor) and as plain
    16 MB chunks (readinto); `read_s` is the faster of the two;
  - write: the base's tensors written to one output by the merge's SafetensorsWriter (fsync, rename): the
    output side alone; read_s + write_s is the I/O floor of a merge on this disk;
  - merge: merge_safetensors(method, base, fine-tunes, out) including the output write; wall time and peak RSS
    (VmHWM of /proc/self/status, which includes the ~0.3 GB of the imports, also reported on its own). The
    compiled loops are loaded first (models.merge_kernels.load, once per process) and timed apart.
Fastest of 3 repetitions (small) or 2 (large), the read and every method run in turn inside each repetition so
load from other processes hits them alike. After the first small run of each method, the output is checked
against merge_state_dicts of the same module on a few tensors (DARE, which draws random masks: each element
of the output must be the base plus a subset sum of the deltas / density).

`merge_breakdown` splits each method's time on the small set (one process per method): the merge as run, the
same merge with its output on tmpfs (no disk), and the method alone over tensors already in memory.

MERGE_IMPL=/path/to/merging.py measures another implementation file (imported in place of models.merging; a
file in another checkout's models/ folder brings that folder's merge_kernels.py and merge_io.py with it, so
`git worktree add /tmp/old <commit>` and --impl before=/tmp/old/models/merging.py measure a whole commit);
MERGEKIT_PYTHON=/path/to/venv/bin/python adds mergekit's `run_merge` (timed in the same way, in that venv) as
extra columns. `python -m bench.merging --impl before=/tmp/old.py --impl now=models/merging.py --sizes small
--json out.json` compares implementations side by side in one run without touching bench/results.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import register

ROOT = Path(__file__).resolve().parents[1]
SIZES: Dict[str, dict] = {
    "small": dict(vocab_size=16000, hidden_size=384, num_hidden_layers=6, intermediate_size=1440,
                  num_attention_heads=6, num_key_value_heads=6),
    "large": dict(vocab_size=16000, hidden_size=1024, num_hidden_layers=20, intermediate_size=3008,
                  num_attention_heads=16, num_key_value_heads=16),
}
REPS = {"small": 3, "large": 2}
METHODS: Dict[str, dict] = {"task_arithmetic": {}, "ties": {"density": 0.5}, "dare": {"density": 0.5},
                            "sce": {}, "varm": {}}
N_MODELS = 3
SEED = 0
INIT_STD = 0.02  # the base's weights
DELTA_STD = 0.002  # each fine-tune = base + this much Gaussian noise
CHUNK = 16 << 20
FORMAT = 1  # bump when the generated inputs change
CHILD_TIMEOUT = 3600
SLOW = {"merge_speed_large"}
BREAKDOWN_REPS = 5


# ------------------------------------------------------------------------------------------------ inputs


def _cache_root() -> Path:
    return Path(os.environ.get("MERGE_BENCH_DIR", "/tmp/merge_bench"))


def _shapes(size: str) -> Tuple[List[Tuple[str, Tuple[int, ...]]], object]:
    """(name, shape) of every tensor of the size's LlamaForCausalLM state dict, built on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SIZES[size], tie_word_embeddings=False, max_position_embeddings=2048,
                      architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items()], cfg


def _input_dir(size: str) -> Path:
    key = json.dumps({"cfg": SIZES[size], "seed": SEED, "init": INIT_STD, "delta": DELTA_STD, "n": N_MODELS,
                      "format": FORMAT}, sort_keys=True)
    return _cache_root() / f"{size}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _model_names() -> List[str]:
    return ["base"] + [f"ft{j}" for j in range(1, N_MODELS + 1)]


def _paths(folder: Path) -> List[str]:
    return [str(folder / m / "model.safetensors") for m in _model_names()]


def _generator(model: str, name: str):
    import torch

    return torch.Generator().manual_seed(zlib.crc32(f"{SEED}:{model}:{name}".encode()))


def build_inputs(size: str) -> Path:
    """The base and fine-tunes of `size` (cached): written tensor by tensor into all four files at once."""
    import torch

    folder = _input_dir(size)
    if (folder / "complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    shapes, cfg = _shapes(size)
    need = 4 * 4 * sum(_numel(s) for _, s in shapes) * 3 // 2  # inputs + room for two outputs
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if free < need:
        raise RuntimeError(f"merge benchmark: {folder.parent} has {free / 1e9:.1f} GB free, the {size} inputs and "
                           f"outputs need {need / 1e9:.1f} GB (set MERGE_BENCH_DIR to a roomier place)")
    from contextlib import ExitStack

    from models.merge_io import SafetensorsWriter

    layout = {name: (torch.float32, shape) for name, shape in shapes}
    with ExitStack() as stack:  # one writer per model; an exception leaves no file under the final name
        writers = []
        for m in _model_names():
            (folder / m).mkdir(parents=True)
            cfg.save_pretrained(folder / m)
            writers.append(stack.enter_context(
                SafetensorsWriter(str(folder / m / "model.safetensors"), layout, {"format": "pt"})))
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                base = torch.ones(shape)
            else:
                base = torch.randn(shape, generator=_generator("base", name)) * INIT_STD
            writers[0].write(name, base)
            for j, w in enumerate(writers[1:], 1):
                delta = torch.randn(shape, generator=_generator(f"ft{j}", name))
                w.write(name, delta.mul_(DELTA_STD).add_(base))
        for w in writers:
            w.commit()
    (folder / "complete").write_text(json.dumps({"size": size, "config": SIZES[size]}))
    return folder


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ------------------------------------------------------------------------------------------------ children


def _status_mb(field: str) -> float:
    """A memory figure of /proc/self/status (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    return float("nan")


def _load_impl(impl: str):
    if not impl:
        import models.merging as mod

        return mod
    import importlib.util
    import types

    folder = Path(impl).resolve().parent
    if folder != (ROOT / "models").resolve() and (folder / "merge_kernels.py").exists():
        # a file of another checkout: its relative imports (kernels, I/O) resolve to its own folder, so a whole
        # earlier commit is measured (a package named after the folder's path, whose modules load from it)
        pkg_name = "merge_impl_" + hashlib.sha1(str(folder).encode()).hexdigest()[:10]
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = [str(folder)]
        sys.modules[pkg_name] = pkg
        name = pkg_name + ".merging"
    else:
        import models  # noqa: F401  (loaded as a module of the package: its relative imports resolve to it)

        name = "models.merging_impl"
    spec = importlib.util.spec_from_file_location(name, impl)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _child_read(paths: Sequence[str]) -> dict:
    import torch
    from safetensors import safe_open

    buf = bytearray(CHUNK)

    def chunks() -> int:
        n = 0
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while True:
                    got = f.readinto(buf)
                    if not got:
                        break
                    n += got
        return n

    sink = torch.empty(CHUNK, dtype=torch.uint8)

    def tensors() -> int:
        """Every tensor through get_tensor, its bytes copied once (get_tensor may return a lazy view of a
        memory map: the copy is what reads it)."""
        nonlocal sink
        n = 0
        for p in paths:
            with safe_open(p, framework="pt") as f:
                for k in f.keys():
                    t = f.get_tensor(k).reshape(-1).view(torch.uint8)
                    if t.numel() > sink.numel():
                        sink = torch.empty(t.numel(), dtype=torch.uint8)
                    sink[:t.numel()].copy_(t)
                    n += t.numel()
                    del t
        return n

    nbytes = chunks()  # warm the page cache (and safetensors), untimed
    tensors()
    t = time.perf_counter()
    chunks()
    chunk_s = time.perf_counter() - t
    t = time.perf_counter()
    tensor_bytes = tensors()
    tensor_s = time.perf_counter() - t
    return {"bytes": nbytes, "tensor_bytes": tensor_bytes, "chunks_s": chunk_s, "safetensors_s": tensor_s,
            "peak_rss_mb": _status_mb("VmHWM")}


def read_seconds(paths: Sequence[str]) -> float:
    """The time to read the files once, page cache warm: the faster of plain chunked reads and safetensors'
    get_tensor (merge_speed's read_s), measured in this process."""
    r = _child_read(paths)
    return min(r["chunks_s"], r["safetensors_s"])


def _child_write(path: str, out: str) -> dict:
    """The output side alone: the base's tensors (page cache warm) written to `out` by the merge's own
    SafetensorsWriter (temporary file, fsync, rename), as a merge writes its result."""
    from models.merge_io import SafetensorsFile, SafetensorsWriter

    f = SafetensorsFile(path)
    for name in f.tensors:  # fault the map in, untimed
        f.tensor(name).sum()
    t = time.perf_counter()
    with SafetensorsWriter(out, {n: (i.dtype, i.shape) for n, i in f.tensors.items()}, f.metadata) as w:
        for name in f.tensors:
            w.write(name, f.tensor(name))
        w.commit()
    wall = time.perf_counter() - t
    f.close()
    return {"write_s": wall}


def _child_merge(impl: str, method: str, kw: dict, paths: Sequence[str], out: str, check: bool) -> dict:
    import safetensors.torch  # noqa: F401  (imported before timing, as any caller would have it)
    import torch

    mod = _load_impl(impl)
    # the compiled loops load from numba's cache once per process (~0.3 s): reported apart, like the imports
    kernels = getattr(mod, "K", None)
    load_s = kernels.load() if kernels is not None and getattr(mod, "KERNELS", False) else 0.0
    rss0 = _status_mb("VmRSS")
    t = time.perf_counter()
    mod.merge_safetensors(method, paths[0], list(paths[1:]), out, **kw)
    wall = time.perf_counter() - t
    res = {"time_s": wall, "peak_rss_mb": _status_mb("VmHWM"), "rss_after_imports_mb": rss0,
           "threads": torch.get_num_threads(), "kernel_load_s": load_s}
    if check:
        res["check"] = _check(mod, method, kw, paths, out)
    return res


def _child_breakdown(method: str, kw: dict, paths: Sequence[str], out: str, reps: int) -> dict:
    """Where one method's merge time goes, in one process, the three timed in turn `reps` times (fastest of
    each): `disk_s` the merge as users run it (output to `out`, fsync included); `memory_s` the same merge
    with its output on tmpfs (/dev/shm: the writer's copy into the page cache, no disk); `compute_s` the
    method alone over the tensors already in memory (copied from the files beforehand, untimed), one tensor
    after another in file order. One untimed merge first loads the compiled loops and warms the caches."""
    import torch

    from models import merge_kernels
    from models.merge_io import SafetensorsFile
    from models.merging import MERGE_METHODS, merge_safetensors

    merge_kernels.load()
    shm = Path("/dev/shm")
    mem_out = str(shm / f"merge_breakdown_{os.getpid()}.safetensors") if shm.is_dir() else ""
    files = [SafetensorsFile(p) for p in paths]
    tensors = [(files[0].tensor(n).clone(), [f.tensor(n).clone() for f in files[1:]]) for n in files[0].tensors]
    for f in files:
        f.close()
    fn = MERGE_METHODS[method]

    def compute() -> None:
        for base, models in tensors:
            fn(base, models, **kw)

    runs: Dict[str, Callable[[], None]] = {"disk_s": lambda: merge_safetensors(method, paths[0], list(paths[1:]),
                                                                                 out, **kw)}
    if mem_out:
        runs["memory_s"] = lambda: merge_safetensors(method, paths[0], list(paths[1:]), mem_out, **kw)
    runs["compute_s"] = compute
    runs["disk_s"]()
    best: Dict[str, float] = {}
    try:
        for _ in range(reps):
            for key, run in runs.items():
                t = time.perf_counter()
                run()
                best[key] = min(best.get(key, math.inf), time.perf_counter() - t)
    finally:
        for f in (out, mem_out):
            if f and os.path.exists(f):
                os.remove(f)
    return {**best, "threads": torch.get_num_threads()}


def _check(mod, method: str, kw: dict, paths: Sequence[str], out: str) -> dict:
    """The merged file has the base's tensors; a few of them equal merge_state_dicts' result (DARE: each
    element is base + a subset sum of the deltas / density)."""
    import itertools

    import torch
    from safetensors import safe_open

    with safe_open(out, framework="pt") as f:
        out_keys = set(f.keys())
        with safe_open(paths[0], framework="pt") as b:
            names = sorted(b.keys())
        if out_keys != set(names):
            return {"ok": False, "why": f"output tensors differ from the base's: {sorted(out_keys ^ set(names))[:4]}"}
        layers = [n for n in names if n.endswith("q_proj.weight")]
        picked = ["model.norm.weight", layers[0], layers[-1].replace("self_attn.q_proj", "mlp.down_proj"),
                  "model.embed_tokens.weight"]
        merged = {n: f.get_tensor(n) for n in picked}
    sds = []
    for p in paths:
        with safe_open(p, framework="pt") as g:
            sds.append({n: g.get_tensor(n) for n in picked})
    worst, bad, total = 0.0, 0, 0
    for n in picked:
        got = merged[n]
        if method == "dare":
            base = sds[0][n]
            deltas = [sd[n] - base for sd in sds[1:]]
            density = kw.get("density", 0.5)
            err = torch.full_like(base, float("inf"))
            for keep in itertools.product((0, 1), repeat=len(deltas)):
                cand = base + sum(k * d for k, d in zip(keep, deltas)) / density
                err = torch.minimum(err, (got - cand).abs())
            tol = 1e-6 + 1e-5 * base.abs()
        else:
            ref = mod.merge_state_dicts(method, sds[0], sds[1:], **kw)[n]
            err = (got - ref).abs()
            tol = 1e-6 + 1e-5 * ref.abs()
        worst = max(worst, float(err.max()))
        bad += int((err > tol).sum())
        total += err.numel()
    return {"ok": bad == 0, "tensors": len(picked), "elements": total, "mismatched": bad, "max_abs_diff": worst}


def _run_child(args: List[str], env_extra: Optional[dict] = None, python: str = sys.executable) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    r = subprocess.run([python, *args], cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"merge benchmark child {args[:4]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ mergekit

_MERGEKIT_CHILD = r"""
import json, sys, time
cfg_yaml, out = sys.argv[1], sys.argv[2]
import torch, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
def mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
config = MergeConfiguration.model_validate(yaml.safe_load(open(cfg_yaml)))
rss0 = mb("VmRSS")
t = time.perf_counter()
run_merge(config, out, options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False,
                                            write_model_card=False, quiet=True))
print(json.dumps({"time_s": time.perf_counter() - t, "peak_rss_mb": mb("VmHWM"), "rss_after_imports_mb": rss0}))
"""


def _mergekit_yaml(method: str, kw: dict, folder: Path) -> str:
    """mergekit's config for the same merge as ours (weights 1, our defaults for lambda / density / top-k)."""
    base = str(folder / "base")
    per_model: dict = {"weight": 1.0}
    top: dict = {}
    mk_method = method
    if method == "task_arithmetic":
        top = {"lambda": 0.3}
    elif method in ("ties", "dare"):
        per_model["density"] = kw.get("density", 0.5)
        mk_method = "ties" if method == "ties" else "dare_linear"
        top = {"normalize": method == "ties", "lambda": 1.0}
    elif method == "sce":
        top = {"select_topk": 0.1}
        per_model = {}
    else:
        return ""
    models = [{"model": str(folder / f"ft{j}"), **({"parameters": per_model} if per_model else {})}
              for j in range(1, N_MODELS + 1)]
    cfg = {"merge_method": mk_method, "base_model": base, "models": models, "dtype": "float32",
           "parameters": top}
    return json.dumps(cfg)  # JSON is YAML


# ------------------------------------------------------------------------------------------------ harness


def measure(size: str, impls: Dict[str, str], reps: Optional[int] = None, mergekit_python: str = "",
            check: bool = True, log=print) -> dict:
    """Figures for one input size: read baseline and, per implementation and method, the fastest merge."""
    reps = reps or REPS[size]
    folder = build_inputs(size)
    paths = _paths(folder)
    out_dir = folder / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    out = str(out_dir / "model.safetensors")
    shapes, _ = _shapes(size)
    largest = max(_numel(s) for _, s in shapes) * 4
    params = sum(_numel(s) for _, s in shapes)
    runs: Dict[Tuple[str, str], List[dict]] = {}
    reads: List[dict] = []
    writes: List[dict] = []
    mk_cfgs = {}
    if mergekit_python:
        for m, kw in METHODS.items():
            text = _mergekit_yaml(m, kw, folder)
            if text:
                (out_dir / f"{m}.yaml").write_text(text)
                mk_cfgs[m] = str(out_dir / f"{m}.yaml")
    methods = list(METHODS)
    for rep in range(reps):
        reads.append(_run_child(["-m", "bench.merging", "--child", "read", "--paths", *paths]))
        writes.append(_run_child(["-m", "bench.merging", "--child", "write", "--out", out, "--paths", paths[0]]))
        os.remove(out)
        log(f"[merge bench] {size} rep {rep}: read {reads[-1]['chunks_s']:.2f}s / {reads[-1]['safetensors_s']:.2f}s, "
            f"write {writes[-1]['write_s']:.2f}s")
        order = methods[rep % len(methods):] + methods[:rep % len(methods)]  # rotate who goes first
        for m in order:
            for impl_name, impl in impls.items():
                args = ["-m", "bench.merging", "--child", "merge", "--method", m, "--kw", json.dumps(METHODS[m]),
                        "--out", out, "--paths", *paths]
                if check and rep == 0 and size == "small":
                    args.append("--check")
                r = _run_child(args, {"MERGE_IMPL": impl})
                runs.setdefault((impl_name, m), []).append(r)
                os.remove(out)
                log(f"[merge bench] {size} rep {rep}: {impl_name} {m} {r['time_s']:.2f}s "
                    f"peak {r['peak_rss_mb']:.0f} MB{' check ' + str(r['check']) if 'check' in r else ''}")
            if m in mk_cfgs:
                mk_out = out_dir / "mergekit"
                r = _run_child(["-c", _MERGEKIT_CHILD, mk_cfgs[m], str(mk_out)], python=mergekit_python)
                shutil.rmtree(mk_out, ignore_errors=True)
                runs.setdefault(("mergekit", m), []).append(r)
                log(f"[merge bench] {size} rep {rep}: mergekit {m} {r['time_s']:.2f}s peak {r['peak_rss_mb']:.0f} MB")
    shutil.rmtree(out_dir, ignore_errors=True)
    chunks_s = min(r["chunks_s"] for r in reads)
    tensors_s = min(r["safetensors_s"] for r in reads)
    read_s = min(chunks_s, tensors_s)
    write_s = min(r["write_s"] for r in writes)
    fig: dict = {
        "params": params, "tensors": len(shapes), "input_files_mb": round(reads[0]["bytes"] / 1e6, 1),
        "largest_tensor_mb": round(largest / 1e6, 2), "one_tensor_per_model_mb": round(5 * largest / 1e6, 1),
        "read_s": round(read_s, 3), "read_chunks_s": round(chunks_s, 3), "read_safetensors_s": round(tensors_s, 3),
        "read_peak_rss_mb": round(max(r["peak_rss_mb"] for r in reads)), "repetitions": reps,
        "write_s": round(write_s, 3), "io_floor_s": round(read_s + write_s, 3),
    }
    for impl_name in [*impls, "mergekit"]:
        table = {}
        for m in methods:
            rs = runs.get((impl_name, m))
            if not rs:
                continue
            best = min(rs, key=lambda r: r["time_s"])
            row = {"time_s": round(best["time_s"], 3), "time_over_read": round(best["time_s"] / read_s, 2),
                   "time_over_io_floor": round(best["time_s"] / (read_s + write_s), 2),
                   "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs)),
                   "peak_minus_imports_mb": round(max(r["peak_rss_mb"] - r["rss_after_imports_mb"] for r in rs))}
            if any(r.get("kernel_load_s") for r in rs):
                row["kernel_load_s"] = round(min(r["kernel_load_s"] for r in rs), 3)
            checks = [r["check"] for r in rs if "check" in r]
            if checks:
                c = checks[0]
                if "elements" not in c:
                    row["check"] = f"MISMATCH: {c['why']}"
                elif c["ok"]:
                    row["check"] = f"ok: {c['elements']:,} elements match (max diff {c['max_abs_diff']:.1e})"
                else:
                    row["check"] = (f"MISMATCH: {c['mismatched']:,} of {c['elements']:,} elements differ "
                                    f"(max diff {c['max_abs_diff']:.1e})")
            if impl_name != "mergekit" and ("mergekit", m) in runs:
                mk = min(r["time_s"] for r in runs[("mergekit", m)])
                row["mergekit_over_ours"] = round(mk / best["time_s"], 2)
            table[m] = row
        if table:
            fig[impl_name] = table
    return fig


def _impls_from_env() -> Dict[str, str]:
    impl = os.environ.get("MERGE_IMPL", "")
    return {"methods": str(Path(impl).resolve()) if impl else ""}


def _registered(size: str) -> dict:
    keep = os.environ.get("MERGE_BENCH_KEEP", "") not in ("", "0")
    try:
        fig = measure(size, _impls_from_env(), mergekit_python=os.environ.get("MERGEKIT_PYTHON", ""))
    finally:
        if size == "large" and not keep:
            shutil.rmtree(_input_dir(size), ignore_errors=True)
    impl = os.environ.get("MERGE_IMPL")
    fig["note"] = ((f"implementation: {impl}. " if impl else "")
                   + "time_over_read = merge wall time (output write included) / read_s; io_floor_s = read_s + "
                   "write_s (the base's tensors written by the merge's writer, fsync included): what any merge must "
                   "spend on this disk; kernel_load_s (once per process, not in time_s) loads the compiled loops; "
                   "peak_rss_mb includes the imports (torch: peak_rss_mb - peak_minus_imports_mb); goal: "
                   "time_over_read <= ~3 and peak_minus_imports_mb near one_tensor_per_model_mb.")
    fig["command"] = f"python -m bench --only merge_speed{'_large' if size == 'large' else ''}"
    return fig


_DESCRIPTION = ("Merge speed of models.merging.merge_safetensors (task_arithmetic, ties and dare at density 0.5, "
                "sce, varm; other arguments default) on a locally built float32 Llama, base + 3 fine-tunes "
                "(base + seeded noise), one safetensors file each: {what}. Each merge runs in a fresh subprocess, "
                "output write included; `read_s` is the time to only read the four inputs once (page cache warm, "
                "the faster of safetensors get_tensor and plain 16 MB reads); `write_s` is the time to only write one "
                "output (the base's tensors through the merge's writer, fsync and rename included) and `io_floor_s` "
                "= read_s + write_s, what any merge spends on this disk; `kernel_load_s` (not in the merge time, "
                "once per process) loads the compiled loops from numba's cache; peak RSS is VmHWM. Fastest of {reps} "
                "repetitions, the read, the write and the methods in turn inside each. Goal: every method within "
                "~3x of read_s, peak memory near one tensor per model (largest tensor x 5) above the imports. With "
                "MERGEKIT_PYTHON set to a Python that has mergekit 0.1.5, mergekit's run_merge on the same inputs "
                "(timed the same way; no VaRM there) adds a `mergekit` table and a `mergekit_over_ours` column.")


@register("merge_speed", _DESCRIPTION.format(
    what="25,785,216 parameters (4 x 103 MB); each output is checked against merge_state_dicts on 4 tensors",
    reps=3))
def merge_speed() -> dict:
    return _registered("small")


@register("merge_speed_large", _DESCRIPTION.format(
    what="301,507,584 parameters (4 x 1.21 GB; inputs built under /tmp, deleted afterwards unless "
    "MERGE_BENCH_KEEP=1). Slow: only with --only merge_speed_large", reps=2))
def merge_speed_large() -> dict:
    return _registered("large")


def breakdown(size: str = "small", reps: int = BREAKDOWN_REPS, log=print) -> dict:
    """Per method, its merge time split three ways (see _child_breakdown), each over read_s (fastest of 3
    reads in fresh processes, one before each third of the methods)."""
    paths = _paths(build_inputs(size))
    out_dir = _input_dir(size) / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    reads, rows = [], {}
    try:
        for i, m in enumerate(METHODS):
            if i % 2 == 0:
                reads.append(_run_child(["-m", "bench.merging", "--child", "read", "--paths", *paths]))
            r = _run_child(["-m", "bench.merging", "--child", "breakdown", "--method", m, "--kw",
                            json.dumps(METHODS[m]), "--out", str(out_dir / "model.safetensors"),
                            "--reps", str(reps), "--paths", *paths])
            rows[m] = r
            log(f"[merge breakdown] {m}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k.endswith("_s")))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    read_s = min(min(r["chunks_s"], r["safetensors_s"]) for r in reads)
    table = {}
    for m, r in rows.items():
        row = {}
        for key in ("disk_s", "memory_s", "compute_s"):
            if key in r:
                row[key] = round(r[key], 3)
                row[key[:-2] + "_over_read"] = round(r[key] / read_s, 2)
        if "memory_s" in r:
            row["compute_share"] = f"{r['compute_s'] / r['disk_s']:.0%}"
        table[m] = row
    return {"size": size, "read_s": round(read_s, 3), "repetitions": reps, "methods": table,
            "command": "python -m bench --only merge_breakdown"}


@register("merge_breakdown", "Where a merge's time goes, on the small inputs of merge_speed (25.8M parameters, "
          "base + 3 fine-tunes, float32), per method, in one process per method, the three timed in turn 5 times "
          "(fastest of each): `disk` the merge as run (output file written and fsynced), `memory` the same merge "
          "writing its output to tmpfs (/dev/shm: no disk), `compute` the method alone over the tensors already in "
          "memory, one tensor after another in file order; each also over read_s (reading the four inputs once). "
          "compute_over_read above ~3 means the arithmetic alone, not the I/O, keeps a method from merge_speed's "
          "goal on this machine; compute_share = compute / disk.")
def merge_breakdown() -> dict:
    return breakdown("small")


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=["read", "merge", "write", "breakdown"])
    ap.add_argument("--paths", nargs="*")
    ap.add_argument("--method")
    ap.add_argument("--kw", default="{}")
    ap.add_argument("--out")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--impl", action="append", default=[], help="name=path of a merging.py ('' = models.merging)")
    ap.add_argument("--sizes", default="small")
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--json", default="")
    ap.add_argument("--mergekit-python", default=os.environ.get("MERGEKIT_PYTHON", ""))
    ap.add_argument("--keep", action="store_true", help="keep the large inputs")
    a = ap.parse_args(argv)
    if a.child == "read":
        print(json.dumps(_child_read(a.paths)))
        return 0
    if a.child == "write":
        print(json.dumps(_child_write(a.paths[0], a.out)))
        return 0
    if a.child == "breakdown":
        print(json.dumps(_child_breakdown(a.method, json.loads(a.kw), a.paths, a.out, a.reps or BREAKDOWN_REPS)))
        return 0
    if a.child == "merge":
        print(json.dumps(_child_merge(os.environ.get("MERGE_IMPL", ""), a.method, json.loads(a.kw), a.paths, a.out,
                                      a.check)))
        return 0
    impls = {}
    for spec in a.impl or ["methods="]:
        name, _, path = spec.partition("=")
        impls[name] = str(Path(path).resolve()) if path else ""
    results = {}
    for size in a.sizes.split(","):
        try:
            results[size] = measure(size, impls, reps=a.reps or None, mergekit_python=a.mergekit_python)
        finally:
            if size == "large" and not a.keep:
                shutil.rmtree(_input_dir(size), ignore_errors=True)
        print(json.dumps({size: results[size]}, indent=1), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
