"""The `fusechat` config section and its checks, run when the config is loaded (before any training).

Only the standard library here: importing the recipe (to register it) stays cheap.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from recipes.engine.errors import ConfigError

STAGES = ("represent", "align", "train", "merge")
VOCAB_MAPS = ("min_ed", "exact", "statistics")
FUSIONS = ("min_ce", "weighted")
CE_UNITS = ("token", "sequence")
LOGIT_DTYPE_NAMES = ("float16", "bfloat16", "float32")
REPRESENT_DTYPES = ("bf16", "fp16", "fp32")
DEVICE_MAPS = ("auto",)
EMBEDDED_TOKENIZERS = ("bpe", "unigram")
# Model names become directory names (model_<name>, target_<name>) and parts of W&B run ids.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# The config keys each stage's output depends on, cumulatively (a stage's output also depends on everything
# the stages before it read): a change re-runs the stage (recipes.engine.pipeline) and discards its stale files.
# The data keys the fusion's texts depend on (and that the sub-runs inherit: common.SUB_RUN_DATA_KEYS).
DATA_TEXT_KEYS = ("source", "domains", "files", "text_field", "hub_name", "hub_config", "hub_split",
                  "max_chars_per_domain", "block_size", "batch_size", "val_fraction", "format",
                  "conversations_field", "chat_template", "loss_on")
_DATA_KEYS = tuple(f"data.{k}" for k in DATA_TEXT_KEYS)
REPRESENT_KEYS = ("fusechat.pivot", "fusechat.sources", "fusechat.num_blocks", "fusechat.topk",
                  "fusechat.shard_blocks", "fusechat.logits_dtype", "fusechat.represent_dtype", "run.seed",
                  "model.arch", "model.size", "optim.warmup_steps", *_DATA_KEYS)
ALIGN_KEYS = REPRESENT_KEYS + ("fusechat.vocab_map", "fusechat.ms_min_count", "fusechat.dtw_band",
                               "fusechat.align_preset", "fusechat.align_cost", "fusechat.align_ties",
                               "fusechat.one_to_one", "fusechat.ms_rule")
TRAIN_KEYS = ALIGN_KEYS + ("fusechat.fusion", "fusechat.ce_unit", "fusechat.lam", "fusechat.temperature",
                           "fusechat.target_steps", "fusechat.target_lr", "fusechat.clm_baseline")
MERGE_KEYS = TRAIN_KEYS + ("fusechat.merge_method", "fusechat.compare_merge_methods", "fusechat.sce_select_topk",
                           "fusechat.sce_masked_final_sum", "fusechat.ties_density", "fusechat.task_arithmetic_lam",
                           "fusechat.eval_batch_size", "fusechat.eval_max_blocks")
STAGE_KEYS = {"represent": REPRESENT_KEYS, "align": ALIGN_KEYS, "train": TRAIN_KEYS, "merge": MERGE_KEYS}


@dataclass
class FuseModelConfig:
    """One model of the fusion. steps > 0 trains it (from `pretrained` if given, else from scratch) with
    recipe `tiny` settings on `domains`; steps = 0 uses `pretrained` as it is."""

    name: str = "pivot"
    tokenizer: Optional[str] = "bpe"  # bpe | unigram (embedded) | a path / hub name; None: `pretrained`'s
    vocab_size: int = 4096  # for embedded tokenizers
    domains: List[str] = field(default_factory=lambda: ["pydoc", "stdlib", "licenses"])
    steps: int = 80
    lr: float = 3e-3
    pretrained: Optional[str] = None  # a save_pretrained directory (or hub name, with network)
    arch: Optional[str] = None  # None: model.arch
    size: Optional[str] = None  # None: model.size
    # None: data.block_size / data.batch_size. A source whose tokenizer cuts text finer needs a longer
    # context than the pivot's block to read a whole pivot block (longer sequences are truncated).
    block_size: Optional[int] = None
    batch_size: Optional[int] = None


@dataclass
class FuseChatConfig:
    pivot: FuseModelConfig = field(default_factory=FuseModelConfig)
    sources: List[FuseModelConfig] = field(default_factory=list)
    # represent
    num_blocks: int = 800  # training blocks of the pivot's data (a seeded sample) that are represented
    topk: int = 10
    shard_blocks: int = 64  # blocks per shard file
    represent_batch_size: int = 16
    logits_dtype: str = "float16"  # stored top-k logits: float16 | bfloat16 | float32
    # How the represent and merge stages load the models: weights' dtype (null: float32 for a local directory,
    # transformers' default for a hub name) and placement (null: each model whole on one device; auto:
    # spread over every visible GPU, then CPU, by accelerate: a source larger than one GPU).
    represent_dtype: Optional[str] = None  # bf16 | fp16 | fp32 | null
    device_map: Optional[str] = None  # auto | null
    # align
    vocab_map: str = "min_ed"  # min_ed | exact | statistics
    ms_min_count: int = 1
    dtw_band: Optional[int] = None  # Sakoe-Chiba band (target positions); None: full DTW
    # The alignment's choices (data/alignment.py); each null takes the preset's value. Preset "paper": the
    # official FuseChat code's in each; "ours": containment_discount, source_first, group, ours (what
    # fusechat.yaml sets: measured better, README "Results in brief").
    align_preset: str = "paper"  # paper | ours
    align_cost: Optional[str] = None  # paper (plain edit distance) | containment_discount (x0.1 if contained)
    align_ties: Optional[str] = None  # paper (diagonal, pivot step, source step) | source_first
    one_to_one: Optional[str] = None  # paper (one source token on the path + suffix test) | group (1:1 group)
    ms_rule: Optional[str] = None  # paper (path pairs, min discounted ED x sigmoid(count)) | ours (count/(1+ED))
    # train
    fusion: str = "min_ce"  # min_ce | weighted
    ce_unit: str = "token"  # MinCE compares mean CE per token ("token") or the sequence total ("sequence")
    lam: float = 0.9
    temperature: float = 1.0
    target_steps: int = 100
    target_lr: float = 1e-3
    clm_baseline: bool = True  # also train the pivot with CLM only on the same blocks and steps
    # merge
    merge_method: str = "sce"  # the method of merged/: see models.merging.MERGE_METHODS
    compare_merge_methods: List[str] = field(default_factory=lambda: ["varm", "task_arithmetic", "ties"])
    sce_select_topk: float = 0.1
    sce_masked_final_sum: bool = True
    ties_density: float = 0.5
    task_arithmetic_lam: float = 1.0
    eval_batch_size: int = 32
    eval_max_blocks: int = 0  # validation blocks per evaluated model; 0 = all


def align_options(fc) -> Dict[str, str]:
    """The resolved alignment choices: {cost, ties, one_to_one, ms_rule}, each the key's value or the preset's."""
    from data.alignment import ALIGN_PRESETS

    preset = ALIGN_PRESETS[fc.align_preset]
    keys = {"cost": "align_cost", "ties": "align_ties", "one_to_one": "one_to_one", "ms_rule": "ms_rule"}
    return {name: fc[key] if fc[key] is not None else preset[name] for name, key in keys.items()}


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(key: str, value: str, allowed) -> None:
    _need(value in allowed, f"fusechat.{key} must be one of {', '.join(allowed)}; got '{value}'.")


def _looks_local(path: str) -> bool:
    """A path rather than a hub name (`org/name`): absolute, relative with ./ ../ ~, or two or more slashes."""
    return path.startswith(("/", ".", "~")) or path.count("/") >= 2 or Path(path).exists()


def _check_model(cfg, m, key: str) -> None:
    where = f"fusechat model '{m.name}' ({key})"
    _need(bool(NAME_PATTERN.match(m.name or "")),
          f"{key}.name must be letters, digits, '_', '.' or '-' (it names directories); got '{m.name}'.")
    _need(m.steps >= 0, f"{where}: steps must be >= 0, got {m.steps}.")
    _need(m.steps > 0 or bool(m.pretrained), f"{where} has steps=0 and no pretrained path: nothing to use.")
    _need(bool(m.tokenizer) or bool(m.pretrained), f"{where} has neither a tokenizer nor a pretrained path.")
    if m.pretrained and _looks_local(m.pretrained):
        path = Path(m.pretrained).expanduser()
        _need((path / "config.json").is_file(), f"{where}: pretrained={m.pretrained} is not a save_pretrained "
                                                "directory (no config.json).")
    if m.tokenizer and m.tokenizer not in EMBEDDED_TOKENIZERS and _looks_local(m.tokenizer):
        _need(Path(m.tokenizer).expanduser().exists(), f"{where}: tokenizer={m.tokenizer} does not exist.")
    for name in ("block_size", "batch_size"):
        value = m[name]
        low = 2 if name == "block_size" else 1
        _need(value is None or value >= low, f"{where}: {name} must be >= {low} or null, got {value}.")
    if m.steps == 0:
        return  # used as it is: the training options below do not apply
    _need(m.lr > 0, f"{where}: lr must be > 0, got {m.lr}.")
    _need(len(m.domains) > 0, f"{where}: domains is empty (it trains for {m.steps} steps on them).")
    if cfg.data.source == "embedded":
        from data.corpus import EMBEDDED_DOMAINS

        unknown = [d for d in m.domains if d not in EMBEDDED_DOMAINS]
        _need(not unknown, f"{where}: unknown embedded domain(s) {unknown}; available: {', '.join(EMBEDDED_DOMAINS)}.")
    if m.tokenizer in EMBEDDED_TOKENIZERS:
        _need(m.vocab_size >= 1, f"{where}: vocab_size must be >= 1, got {m.vocab_size}.")
    if not m.pretrained:  # built from scratch: its architecture and size must exist
        from models.factory import available_archs

        arch, size = m.arch or cfg.model.arch, m.size or cfg.model.size
        archs = available_archs()
        _need(arch in archs, f"{where}: unknown arch '{arch}'; available: {', '.join(sorted(archs))}.")
        _need(size in archs[arch], f"{where}: unknown size '{size}' of arch {arch}; known: {', '.join(archs[arch])}.")


def check(cfg) -> None:
    """Every option of every stage, so that a bad value fails before any training (Recipe.validate)."""
    fc = cfg.fusechat
    _need(len(fc.sources) > 0, "fusechat.sources is empty: fusion needs at least one source model.")
    names = [fc.pivot.name] + [s.name for s in fc.sources]
    _need(len(set(names)) == len(names), f"fusechat model names must be distinct, got {names}.")
    _check_model(cfg, fc.pivot, "fusechat.pivot")
    for i, source in enumerate(fc.sources):
        _check_model(cfg, source, f"fusechat.sources[{i}]")
    # represent
    for key in ("num_blocks", "shard_blocks", "topk", "represent_batch_size"):
        _need(fc[key] >= 1, f"fusechat.{key} must be >= 1, got {fc[key]}.")
    _need(fc.num_blocks >= cfg.data.batch_size,
          f"fusechat.num_blocks ({fc.num_blocks}) must be >= data.batch_size ({cfg.data.batch_size}): the targets "
          "train on batches of the represented blocks.")
    _one_of("logits_dtype", fc.logits_dtype, LOGIT_DTYPE_NAMES)
    _need(fc.represent_dtype is None or fc.represent_dtype in REPRESENT_DTYPES,
          f"fusechat.represent_dtype must be one of {', '.join(REPRESENT_DTYPES)} or null; got '{fc.represent_dtype}'.")
    _need(fc.device_map is None or fc.device_map in DEVICE_MAPS,
          f"fusechat.device_map must be auto or null; got '{fc.device_map}'.")
    if fc.device_map == "auto":
        import importlib.util

        _need(importlib.util.find_spec("accelerate") is not None,
              "fusechat.device_map=auto needs the package accelerate (pip install accelerate), which is not "
              "installed.")
    # align
    _one_of("vocab_map", fc.vocab_map, VOCAB_MAPS)
    _need(fc.ms_min_count >= 1, f"fusechat.ms_min_count must be >= 1, got {fc.ms_min_count}.")
    _need(fc.dtw_band is None or fc.dtw_band >= 0, f"fusechat.dtw_band must be >= 0 or null, got {fc.dtw_band}.")
    from data.alignment import ALIGN_COSTS, ALIGN_PRESETS, MS_RULES, ONE_TO_ONE, TIE_ORDERS

    _one_of("align_preset", fc.align_preset, tuple(ALIGN_PRESETS))
    for key, allowed in (("align_cost", ALIGN_COSTS), ("align_ties", TIE_ORDERS), ("one_to_one", ONE_TO_ONE),
                         ("ms_rule", MS_RULES)):
        _need(fc[key] is None or fc[key] in allowed,
              f"fusechat.{key} must be one of {', '.join(allowed)} or null (the preset's); got '{fc[key]}'.")
    # train
    _one_of("fusion", fc.fusion, FUSIONS)
    _one_of("ce_unit", fc.ce_unit, CE_UNITS)
    _need(0.0 <= fc.lam <= 1.0, f"fusechat.lam must be in [0, 1], got {fc.lam}.")
    _need(fc.temperature > 0 and math.isfinite(fc.temperature),
          f"fusechat.temperature must be a finite number > 0, got {fc.temperature}.")
    _need(fc.target_steps >= 1, f"fusechat.target_steps must be >= 1, got {fc.target_steps}.")
    _need(fc.target_lr > 0, f"fusechat.target_lr must be > 0, got {fc.target_lr}.")
    # merge
    from models.merging import MERGE_METHODS

    for method in [fc.merge_method] + list(fc.compare_merge_methods):
        _need(method in MERGE_METHODS,
              f"fusechat merge method '{method}' is unknown; choose from {', '.join(sorted(MERGE_METHODS))}.")
    _need(0.0 < fc.sce_select_topk <= 1.0, f"fusechat.sce_select_topk must be in (0, 1], got {fc.sce_select_topk}.")
    _need(0.0 < fc.ties_density <= 1.0, f"fusechat.ties_density must be in (0, 1], got {fc.ties_density}.")
    _need(math.isfinite(fc.task_arithmetic_lam),
          f"fusechat.task_arithmetic_lam must be a finite number, got {fc.task_arithmetic_lam}.")
    _need(fc.eval_batch_size >= 1, f"fusechat.eval_batch_size must be >= 1, got {fc.eval_batch_size}.")
    _need(fc.eval_max_blocks >= 0, f"fusechat.eval_max_blocks must be >= 0 (0: all), got {fc.eval_max_blocks}.")
