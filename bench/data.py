"""Data benchmarks: token-shard preparation and the shard loader on corpora of about 10 MB, 100 MB and 1 GB.

The corpora are local text: the embedded corpus without a budget (the standard library's source, Python's
documentation topics, the licence texts: about 12.8 MB) written again and again, each pass in another
seeded document order, as JSON lines, until the size is reached. Each is prepared (`data.source=files`,
the default num_proc: one process per core) and then read by the training loader, each in a subprocess
of its own. Peak resident memory: VmHWM of /proc/self/status (the quantity of resource.getrusage's
ru_maxrss, also reported, which for a spawned worker would include its parent's memory at the fork); the
tokenising workers report theirs. Everything generated is deleted.
`BENCH_DATA_SIZES=10MB,100MB` runs a subset.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import register

ROOT = Path(__file__).resolve().parents[1]
TMP = ROOT / "bench" / "tmp" / "data"
SIZES = {"10MB": 10_000_000, "100MB": 100_000_000, "1GB": 1_000_000_000}
LOADER_SECONDS = 60.0  # the loader reads at most this long (the whole epoch when it is shorter)
TINY_TOKENS_PER_SEC = 10_000  # what recipe `tiny` trains on 2 CPU cores (BENCHMARKS.md tiny_throughput)

_COMMON = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
def rss_now():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
def ru_maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from data.config import DataConfig
from data.datamodule import LMDataModule
settings = DataConfig(source="files", files=[{corpus!r}], cache_dir={cache!r})
"""

_PREPARE = _COMMON + """
base = rss_now()
t = time.time()
dm = LMDataModule(settings, progress=False)
dm.prepare()
m = dm.manifest
print(json.dumps({{"wall_s": time.time() - t, "tokenise_s": m["prepared"]["seconds"], "tokens": m["total_tokens"],
                  "shards": len(m["shards"]), "num_proc": m["prepared"]["num_proc"],
                  "shard_mb": sum((dm.shard_dir / s["file"]).stat().st_size for s in m["shards"]) / 1e6,
                  "rss_after_imports_mb": base, "peak_rss_mb": peak(), "ru_maxrss_mb": ru_maxrss(),
                  "peak_rss_worker_mb": m["prepared"]["worker_peak_rss_mb"]}}))
"""

_LOADER = _COMMON + """
dm = LMDataModule(settings, progress=False)
dm.prepare()
assert not dm.built
base = rss_now()
loader = dm.train_dataloader()
n, t = 0, time.time()
for batch in loader:
    n += batch["input_ids"].numel()
    if time.time() - t > {seconds}:
        break
dt = time.time() - t
print(json.dumps({{"tokens": n, "seconds": dt, "epoch_fraction": n / (len(dm.train_set) * dm.s.block_size),
                  "rss_before_mb": base, "peak_rss_mb": peak(), "ru_maxrss_mb": ru_maxrss()}}))
"""


def write_corpus(path: Path, target_bytes: int) -> dict:
    """JSON lines of real local text, pass after pass in a differently seeded order, until target_bytes."""
    from data.corpus import EMBEDDED_DOMAINS, embedded_documents

    docs = [d.text for ds in embedded_documents(EMBEDDED_DOMAINS, 0).values() for d in ds]
    written, n_docs, seed = 0, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            order = list(range(len(docs)))
            random.Random(seed).shuffle(order)
            for i in order:
                line = json.dumps({"text": docs[i]}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                n_docs += 1
                if written >= target_bytes:
                    break
            seed += 1
    return {"bytes": written, "docs": n_docs, "passes": seed}


def _measure(script: str, timeout: float) -> dict:
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if r.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


@register("data_prepare_scale", "Token-shard preparation (make data: tokenise once, num_proc workers) and the "
          "shard loader of training, on local-text corpora of ~10 MB, ~100 MB and ~1 GB: tokens/s and peak "
          "RSS (subprocesses, getrusage) of each, against the ~10k tokens/s recipe `tiny` trains at. Slow "
          "(~15 min on 2 cores): only with --only data_prepare_scale.")
def data_prepare_scale() -> dict:
    wanted = os.environ.get("BENCH_DATA_SIZES", ",".join(SIZES)).split(",")
    out: dict = {"cores": os.cpu_count(), "load_avg_at_start": round(os.getloadavg()[0], 1)}
    for name in wanted:
        work = TMP / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            corpus = work / "corpus.jsonl"
            t = time.time()
            info = write_corpus(corpus, SIZES[name])
            write_s = time.time() - t
            fmt = dict(root=str(ROOT), corpus=str(corpus), cache=str(work / "cache"), seconds=LOADER_SECONDS)
            prep = _measure(_PREPARE.format(**fmt), timeout=3600)
            load = _measure(_LOADER.format(**fmt), timeout=600)
            tok_s = prep["tokens"] / prep["tokenise_s"]
            load_s = load["tokens"] / load["seconds"]
            out[name] = {
                "corpus_mb": round(info["bytes"] / 1e6, 1), "docs": info["docs"], "write_s": round(write_s, 1),
                "tokens": prep["tokens"], "shards": prep["shards"], "shard_mb": round(prep["shard_mb"], 1),
                "num_proc": prep["num_proc"], "prepare_wall_s": round(prep["wall_s"], 1),
                "prepare_tokenise_s": round(prep["tokenise_s"], 1), "prepare_tokens_per_s": round(tok_s),
                "prepare_rss_after_imports_mb": round(prep["rss_after_imports_mb"]),
                "prepare_peak_rss_mb": round(prep["peak_rss_mb"]), "prepare_ru_maxrss_mb": round(prep["ru_maxrss_mb"]),
                "prepare_peak_rss_worker_mb": round(prep["peak_rss_worker_mb"]),
                "loader_tokens_per_s": round(load_s), "loader_x_tiny_training": round(load_s / TINY_TOKENS_PER_SEC),
                "loader_epoch_fraction_read": round(load["epoch_fraction"], 3),
                "loader_rss_before_mb": round(load["rss_before_mb"]), "loader_peak_rss_mb": round(load["peak_rss_mb"]),
                "loader_ru_maxrss_mb": round(load["ru_maxrss_mb"]),
            }
            print(f"[bench] data {name}: {out[name]}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    out["command"] = "python -m bench --only data_prepare_scale"
    return out


SLOW = {"data_prepare_scale"}
