"""Benchmarks (`make bench`): each is a function registered by name that returns a dict of figures.

Results are merged into bench/results.json (machine-readable) and BENCHMARKS.md is regenerated from it,
so a partial run (`make bench ARGS="--only tiny_throughput"`) keeps the other figures.
"""
from __future__ import annotations

from typing import Callable, Dict

BENCHMARKS: Dict[str, Callable[[], dict]] = {}
DESCRIPTIONS: Dict[str, str] = {}


def register(name: str, description: str):
    def deco(fn):
        BENCHMARKS[name] = fn
        DESCRIPTIONS[name] = description
        return fn

    return deco
