"""python -m recipes data <recipe> [key=value ...]            (make data RECIPE=<name> ARGS="key=value ...")

Tokenise a recipe's corpus (its data.* section, with the overrides) once into memory-mapped token shards
under data.cache_dir, in parallel (data.num_proc) and resumably (a cut preparation continues from the
shards already written), or find them: every later run and every rank reads them. Training does the same
when they are missing; run this first to prepare before launching many processes (e.g. on a cluster whose
data.cache_dir all nodes share). Prints the shard directory and its counts per domain.
"""
from __future__ import annotations

import sys
import time


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0 if argv else 2
    from data.corpus import DataError

    from .build import build_datamodule
    from .config import load_config

    cfg = load_config(argv[0], argv[1:])  # a ConfigError is one line from the command line's handler
    t0 = time.time()
    try:
        dm = build_datamodule(cfg)
        lines = dm.summary_lines()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    print(f"data: ready in {time.time() - t0:.1f} s")
    return 0
