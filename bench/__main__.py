"""python -m bench [--only name,name] [--list]: run benchmarks, update bench/results.json and BENCHMARKS.md."""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

from . import BENCHMARKS, DESCRIPTIONS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"
# The engine's benchmarks here, and each method's own next to it (recipes/<method>/bench.py).
MODULES = (["bench." + p.stem for p in sorted((ROOT / "bench").glob("*.py")) if not p.stem.startswith("_")]
           + ["recipes." + p.parent.name + ".bench" for p in sorted((ROOT / "recipes").glob("*/bench.py"))])


def _load_modules():
    slow = set()
    for m in MODULES:
        try:
            mod = importlib.import_module(m)
            slow |= set(getattr(mod, "SLOW", ()))
        except ModuleNotFoundError as e:
            if e.name != m:
                raise
    return slow


def write_markdown(results: dict) -> None:
    """BENCHMARKS.md from the results (bench/report.py renders it). Descriptions of benchmarks whose module is
    loaded come from the registry; the others from what results.json stored with their figures."""
    from .report import render

    (ROOT / "BENCHMARKS.md").write_text(render(results, DESCRIPTIONS))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    slow = _load_modules()
    if a.list:
        for n in BENCHMARKS:
            print(f"{n}{' (slow)' if n in slow else ''}: {DESCRIPTIONS[n]}")
        return 0
    names = [n for n in a.only.split(",") if n] or [n for n in BENCHMARKS if n not in slow]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    import os
    machine = f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.python_version()}"
    failed = 0
    for n in names:
        print(f"[bench] {n} ...", flush=True)
        t = time.time()
        entry = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "description": DESCRIPTIONS[n]}
        try:
            entry["figures"] = BENCHMARKS[n]()
        except Exception as e:
            traceback.print_exc()
            entry["error"] = f"{type(e).__name__}: {e}"[:500]
            failed += 1
        entry["bench_wall_s"] = round(time.time() - t, 1)
        if RESULTS.exists():  # re-read: other benchmarks may have been written while this one ran
            results = json.loads(RESULTS.read_text())
        results[n] = entry
        print(f"[bench] {n}: {entry.get('figures', entry.get('error'))}", flush=True)
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True))
        write_markdown(results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
