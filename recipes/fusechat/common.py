"""What the FuseChat stages share: the run directory's layout, the sub-runs' configs, models and tokenizers,
shard files, and the rule that discards outputs made with other settings.

Run directory (`<run_dir>` below; every sub-run directory is a direct child, so its W&B id
`<run_dir name>-<sub-run>` differs from one FuseChat run to the next):

    model_<name>/        a model trained by the represent stage (recipe `tiny` sub-run) and its export hf/
    represent/           layout.json (which pivot training blocks, in which shards) and <name>/shard-NNNNN
    align/<source>/      match-NNNNN, vocab_map-<kind>.npy, dist-NNNNN
    fused/<source>/      shard-NNNNN: the fused target of every represented block
    target_<source>/     a target sub-run (pivot + fusion loss) and its export hf/; clm_only/: the baseline
    merged/, merged_<method>/, evaluation.json, evaluation.png    (merge stage)
    stamps/<output>.json the settings fingerprint each group of outputs above was made with
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig

from recipes.engine.errors import ConfigError
from recipes.engine.pipeline import fingerprint, sub_run_config
from recipes.engine.runs import write_json_atomic

LOGIT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# The keys of a sub-run's config that its trained weights depend on (not paths of caches, not logging).
SUB_RUN_KEYS = ("model", "optim", "run.seed", "trainer.max_steps", "data.source", "data.domains", "data.files",
                "data.text_field", "data.hub_name", "data.hub_config", "data.hub_split", "data.max_chars_per_domain",
                "data.tokenizer", "data.vocab_size", "data.block_size", "data.batch_size", "data.val_fraction",
                "data.format", "data.conversations_field", "data.chat_template", "data.loss_on")
# The data keys a sub-run takes from the FuseChat run (sub_run_config's, plus the chat data's).
SUB_RUN_DATA_KEYS = ("source", "files", "text_field", "text_template", "hub_name", "hub_config", "hub_split",
                     "streaming", "num_proc", "max_chars_per_domain", "cache_dir", "block_size", "batch_size",
                     "val_fraction", "num_workers", "format", "conversations_field", "chat_template", "loss_on")
# Schedule of every sub-run: validation once at the end, on a few batches (the merge stage evaluates all models).
_SUB_RUN_SCHEDULE = ("trainer.val_check_interval=1000000", "trainer.limit_val_batches=2")


# ------------------------------------------------------------------------------------------------ files


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}.safetensors"


def rank_world() -> Tuple[int, int]:
    """Shards are split round-robin over RANK / WORLD_SIZE (torchrun's variables) when set."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="block", dynamic_ncols=True)


def discard_stale(run_dir: Path, output: str, settings: str, paths: Sequence[Path]) -> None:
    """Keep the files `paths` (the outputs named `output`) only if they were made with `settings` (a
    fingerprint): a stage resumes its own partial work, but work done with other settings is removed first.
    The stamp `stamps/<output>.json` is written before the work starts, so a cut run resumes with it. Outputs
    without a stamp (a run directory from before stamps) are kept and stamped."""
    stamp = Path(run_dir) / "stamps" / f"{output}.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == settings:
        return
    existing = [Path(p) for p in paths if Path(p).exists()]
    if stamp.exists() and existing:
        if rank_world()[1] > 1:
            raise ConfigError(f"{output} in {run_dir} was made with other settings; remove "
                              f"{', '.join(str(p) for p in existing)} (or use another run directory) first.")
        print(f"[fusechat] {output}: the settings changed; removing what the old ones made: "
              f"{', '.join(p.name for p in existing)}", file=sys.stderr, flush=True)
        for p in existing:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    stamp.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stamp, {"output": output, "fingerprint": settings})


# ----------------------------------------------------------------------------------- models, tokenizers


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


MODEL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_model(path: Path, dtype: Optional[str] = None, device_map: Optional[str] = None):
    """A save_pretrained directory or hub name in eval mode. dtype (bf16 | fp16 | fp32; None: float32 for a
    local directory, transformers' default for a hub name) is the weights' dtype as loaded, never a float32
    copy first; device_map None: the whole model on `device()`; "auto": accelerate spreads it over the visible
    GPUs (then CPU memory), for a model larger than one GPU (read its inputs' device with input_device)."""
    from models.factory import load_pretrained

    torch_dtype = MODEL_DTYPES[dtype] if dtype else None
    if device_map is None:
        if torch_dtype is None:
            return load_pretrained(str(path)).to(device()).eval()
        from models.factory import ModelSpec

        spec = ModelSpec(arch="", size="", vocab_size=0, max_seq_len=0, overrides={}, dtype=torch_dtype)
        return load_pretrained(str(path), spec).to(device()).eval()
    if device_map != "auto":
        raise ConfigError(f"fusechat.device_map must be auto or null; got '{device_map}'.")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise ConfigError("fusechat.device_map=auto needs the package accelerate (pip install accelerate), which is "
                          "not installed.")
    local = Path(path).expanduser()
    if local.exists():
        from models.factory import architecture

        model_type = json.loads((local / "config.json").read_text()).get("model_type")
        arch = architecture(model_type) if model_type else None
        if arch is not None and arch.load is not None:
            raise ConfigError(f"fusechat.device_map=auto loads transformers architectures; {local} is a "
                              f"'{model_type}' model of this repository: set fusechat.device_map=null.")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, trust_remote_code=False,
                                                dtype=torch_dtype or torch.float32, device_map="auto").eval()


def input_device(model) -> torch.device:
    """Where a model's input ids go: its input embedding's device (the first of a device_map=auto model)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.device if emb is not None else next(model.parameters()).device


def load_fusion_model(cfg, path: Path):
    """load_model with the run's fusechat.represent_dtype and fusechat.device_map."""
    fc = cfg.fusechat
    return load_model(path, fc.get("represent_dtype"), fc.get("device_map"))


def model_dir(cfg: DictConfig, run_dir: Path, entry) -> Path:
    """The save_pretrained directory of the pivot or a source: its own `pretrained` when used as it is
    (steps = 0), else the export of its sub-run."""
    if entry.steps == 0:
        return Path(entry.pretrained)
    return Path(run_dir) / f"model_{entry.name}" / "hf"


def tokenizer_path(entry, model_path: Path) -> str:
    """Where a model's tokenizer loads from: an explicit path/hub name given with a pretrained model used
    as is, else the model directory (exports carry their tokenizer)."""
    if entry.steps == 0 and entry.tokenizer and entry.tokenizer not in ("bpe", "unigram"):
        return str(entry.tokenizer)
    return str(model_path)


def load_tokenizer(entry, model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path(entry, model_path), trust_remote_code=False)


def tokenizer_kind(tokenizer) -> str:
    """normalize_token's kind for a HF fast tokenizer: byte-level BPE ('Ġ') or SentencePiece-like ('▁')."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    text = json.dumps({k: spec.get(k) for k in ("pre_tokenizer", "decoder", "normalizer")})
    if "ByteLevel" in text:
        return "byte_level"
    if "Metaspace" in text or "\u2581" in text or spec.get("model", {}).get("byte_fallback"):
        return "sentencepiece"
    return "auto"


# ------------------------------------------------------------------------------------------- sub-runs


def _list_override(key: str, values: Sequence[str]) -> str:
    return f"{key}=[{','.join(values)}]"


def model_config(cfg: DictConfig, entry, run_dir: Path) -> DictConfig:
    """The `tiny` sub-run that trains the pivot or a source (directory <run_dir>/model_<name>)."""
    extra = [f"trainer.max_steps={max(entry.steps, 1)}", f"optim.lr={entry.lr}",
             f"optim.warmup_steps={cfg.optim.warmup_steps}", f"data.vocab_size={entry.vocab_size}",
             _list_override("data.domains", list(entry.domains)),
             f"data.tokenizer={entry.tokenizer or entry.pretrained}"]
    for key, value in (("model.arch", entry.arch), ("model.size", entry.size), ("model.pretrained", entry.pretrained),
                       ("data.block_size", entry.block_size), ("data.batch_size", entry.batch_size)):
        if value:
            extra.append(f"{key}={value}")
    return sub_run_config(cfg, "tiny", root=Path(run_dir), run_id=f"model_{entry.name}",
                          job_type="pretrain", data_keys=SUB_RUN_DATA_KEYS,
                          overrides=[*_SUB_RUN_SCHEDULE, *extra])


def target_config(cfg: DictConfig, run_dir: Path, pivot_path: Path, run_id: str) -> DictConfig:
    """A `tiny` sub-run initialised from the pivot, on the pivot's tokens of all the run's domains: the
    targets (<run_dir>/target_<source>) and the CLM-only baseline (<run_dir>/clm_only)."""
    fc = cfg.fusechat
    job_type = "finetune" if run_id == "clm_only" else "fuse"
    return sub_run_config(cfg, "tiny", root=Path(run_dir), run_id=run_id, job_type=job_type,
                          data_keys=SUB_RUN_DATA_KEYS, overrides=[
        *_SUB_RUN_SCHEDULE, f"trainer.max_steps={fc.target_steps}", f"optim.lr={fc.target_lr}",
        f"optim.warmup_steps={cfg.optim.warmup_steps}", f"model.pretrained={pivot_path}",
        f"data.tokenizer={tokenizer_path(fc.pivot, pivot_path)}",
        _list_override("data.domains", list(cfg.data.domains))])


def fusion_datamodule(cfg: DictConfig, run_dir: Path, pivot_path: Path):
    """The pivot's view of the fusion data: all recipe domains, tokenised by the pivot's own tokenizer (the
    data of the target sub-runs)."""
    from recipes.engine.build import build_datamodule

    return build_datamodule(target_config(cfg, run_dir, pivot_path, "data"))


def sub_run_settings(sub_cfg: DictConfig) -> str:
    return fingerprint(sub_cfg, SUB_RUN_KEYS)


def _global_rank() -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _finish_wandb_run() -> None:
    """End the W&B run a sub-run started, if any: Lightning's WandbLogger reuses a run still active in the
    process, so without this the next sub-run would log into this one's W&B run (under its id)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def train_and_export(sub_cfg: DictConfig, stage_dir: Path, **train_kwargs) -> Optional[Path]:
    """Train (or resume, or skip) the sub-run `sub_cfg` in stage_dir and export it to stage_dir/hf; returns
    that directory, or None on a process other than global rank 0 of a multi-process training (rank 0 alone
    exports and goes on). `train_kwargs` go to recipes.engine.loop.train (module_cls, module_kwargs, train_set)."""
    from recipes.engine.checkpointing import newest_checkpoint
    from recipes.engine.export import export
    from recipes.engine.loop import train

    stage_dir = Path(stage_dir)
    hf = stage_dir / "hf"
    if (hf / "config.json").exists():
        return hf
    stage_dir.mkdir(parents=True, exist_ok=True)
    try:
        train(sub_cfg, run_dir=stage_dir, resume=newest_checkpoint(stage_dir) is not None, **train_kwargs)
    finally:
        _finish_wandb_run()
    if _global_rank() != 0:
        return None
    summary = stage_dir / "summary.json"
    if not summary.exists() or json.loads(summary.read_text()).get("step", -1) < sub_cfg.trainer.max_steps:
        raise RuntimeError(f"the sub-run in {stage_dir} did not finish (e.g. preempted); run again to resume it.")
    tmp = stage_dir / f"hf.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    export(stage_dir, out_dir=tmp)
    os.replace(tmp, hf)
    return hf


# ------------------------------------------------------------------------------------- represent layout


@dataclass
class RepresentLayout:
    """Which pivot training blocks are represented and how they are cut into shards."""

    block_indices: List[int]
    shard_blocks: int
    topk: int
    domain_names: List[str]

    @property
    def num_shards(self) -> int:
        return -(-len(self.block_indices) // self.shard_blocks)

    def shard_range(self, shard: int) -> Tuple[int, int]:
        start = shard * self.shard_blocks
        return start, min(start + self.shard_blocks, len(self.block_indices))


def layout_path(run_dir: Path) -> Path:
    return Path(run_dir) / "represent" / "layout.json"


def read_layout(run_dir: Path) -> RepresentLayout:
    path = layout_path(run_dir)
    if not path.exists():
        raise ConfigError(f"{path} does not exist: run the represent stage first.")
    saved = json.loads(path.read_text())
    return RepresentLayout(saved["block_indices"], saved["shard_blocks"], saved["topk"], saved["domain_names"])


def represent_shards(run_dir: Path, name: str, layout: RepresentLayout) -> List[Path]:
    paths = [Path(run_dir) / "represent" / name / shard_name("shard", s) for s in range(layout.num_shards)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise ConfigError(f"{len(missing)} representation shard(s) missing (e.g. {missing[0]}): run the represent "
                          "stage first.")
    return paths

