"""What the FuseChat stages share: the run directory's layout, the sub-runs' configs, models and tokenizers,
shard files, the rule that discards outputs made with other settings, and the tasks of a run started by srun or
torchrun (`ranks`): which shards a task computes (`my_shards`) and how it waits for the others' (`wait_for_files`).

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
import time
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


# --------------------------------------------------------------------------------------------- tasks

# Seconds a task waits for other tasks' files without any new one appearing before it gives up (default 4 h:
# one shard of a large source, plus loading it, takes far less).
WAIT_TIMEOUT_ENV = "FUSECHAT_WAIT_TIMEOUT"
DEFAULT_WAIT_TIMEOUT = 4 * 3600.0


@dataclass(frozen=True)
class Ranks:
    """This process's place among the tasks that run the pipeline together: every task runs every stage,
    the sharded work is split between them and each waits for the others' files (`wait_for_files`)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    node: int = 0
    nodes: int = 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value != "" else default
    except ValueError:
        raise ConfigError(f"environment variable {name}='{value}' is not an integer.") from None


def ranks() -> Ranks:
    """The tasks of this run, as Lightning's training sees them: torchrun's RANK / WORLD_SIZE / LOCAL_RANK /
    LOCAL_WORLD_SIZE / GROUP_RANK when torchrun started the process (TORCHELASTIC_RUN_ID set; Lightning's own
    launcher and its DeepSpeed strategy set RANK / WORLD_SIZE in processes that stay one task), else srun's
    SLURM_PROCID / SLURM_STEP_NUM_TASKS (or SLURM_NTASKS) / SLURM_LOCALID / SLURM_NODEID / SLURM_STEP_NUM_NODES
    (or SLURM_NNODES) inside a job step (SLURM_STEP_ID set: not the batch script itself), except under the job
    names Lightning treats as interactive (bash, interactive); else one task."""
    env = os.environ
    if all(k in env for k in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE")):
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
        local_world = max(1, _env_int("LOCAL_WORLD_SIZE", world))
        return Ranks(rank, world, _env_int("LOCAL_RANK", 0), _env_int("GROUP_RANK", rank // local_world),
                     max(1, -(-world // local_world)))
    in_step = ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env) and "SLURM_PROCID" in env
    if in_step and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        world = _env_int("SLURM_STEP_NUM_TASKS", _env_int("SLURM_NTASKS", 1))
        if world > 1:
            nodes = _env_int("SLURM_STEP_NUM_NODES", _env_int("SLURM_NNODES", _env_int("SLURM_JOB_NUM_NODES", 1)))
            return Ranks(_env_int("SLURM_PROCID", 0), world, _env_int("SLURM_LOCALID", 0),
                         _env_int("SLURM_NODEID", 0), max(1, nodes))
    return Ranks()


def rank_world() -> Tuple[int, int]:
    """(rank, world) of `ranks()`."""
    r = ranks()
    return r.rank, r.world


def my_shards(num_shards: int, per_node: bool = False) -> List[int]:
    """The shards this task computes, round-robin. per_node (models spread over all of a node's GPUs,
    fusechat.device_map=auto): the unit is a node, and only its local rank 0 computes (the node's other
    tasks get none); else every task is a unit."""
    r = ranks()
    if per_node:
        return [s for s in range(num_shards) if s % r.nodes == r.node] if r.local_rank == 0 else []
    return [s for s in range(num_shards) if s % r.world == r.rank]


def wait_timeout() -> float:
    value = os.environ.get(WAIT_TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_WAIT_TIMEOUT
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{WAIT_TIMEOUT_ENV} must be a positive number of seconds; got '{value}'.")
    return seconds


def check_signals(where: str) -> None:
    """End this process when SLURM's SIGUSR1 or SIGTERM has arrived (the command line records them instead of
    dying, recipes.engine.early_signals): outside a training nothing needs saving, finished shards are whole
    files. Global rank 0 asks SLURM to requeue the job, as a training would; raises RunInterrupted."""
    from recipes.engine.early_signals import EARLY_SIGNALS

    if not EARLY_SIGNALS:
        return
    import signal

    from recipes.engine.loop import RunInterrupted

    name, at = EARLY_SIGNALS[0]
    EARLY_SIGNALS.clear()
    requeued = False
    if name in ("SIGUSR1", "SIGTERM") and ranks().rank == 0:
        from recipes.engine.callbacks import requeue_slurm_job

        requeued = requeue_slurm_job()
    how = "SLURM requeued the job: it resumes by itself" if requeued else "run it again (make resume RUN=<run_dir>)"
    code = 0 if requeued else 128 + int(getattr(signal, name))
    raise RunInterrupted(f"{name} during {where}: finished shards are kept; {how}.", code,
                         {"signal": name, "received_at": at, "requeued": requeued, "where": where})


def wait_for_files(paths: Sequence[Path], what: str, poll_s: float = 0.5, report_s: float = 30.0) -> None:
    """Block until every file in `paths` exists: the outputs other tasks of this run write (each under its
    final name only when whole). A line every `report_s` says how many are missing; SIGUSR1 / SIGTERM end the
    wait at once (check_signals); no new file for FUSECHAT_WAIT_TIMEOUT seconds is an error naming the
    missing files."""
    missing = [Path(p) for p in paths if not Path(p).exists()]
    if not missing:
        return
    r, timeout = ranks(), wait_timeout()
    start = last_new = last_report = time.monotonic()
    while missing:
        check_signals(f"the wait for {what}")
        now = time.monotonic()
        if now - last_new > timeout:
            raise ConfigError(f"{what}: task {r.rank} of {r.world} saw no new file for {timeout:g} s "
                              f"({WAIT_TIMEOUT_ENV}); missing {len(missing)} of {len(paths)}: "
                              f"{_names(missing)}. Another task failed or hangs; finished files are kept.")
        if now - last_report >= report_s:
            print(f"[fusechat] task {r.rank} of {r.world}: waiting for {what}, {len(paths) - len(missing)} of "
                  f"{len(paths)} there after {now - start:.0f} s; missing {_names(missing)}", flush=True)
            last_report = now
        time.sleep(poll_s)
        still = [p for p in missing if not p.exists()]
        if len(still) < len(missing):
            last_new = time.monotonic()
        missing = still


def _names(paths: Sequence[Path], limit: int = 6) -> str:
    shown = [f"{p.parent.name}/{p.name}" for p in paths[:limit]]
    return ", ".join(shown) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


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
    """This task's device: the GPU of its local rank on the node (`ranks`; modulo the GPUs it sees, one when
    SLURM binds a GPU per task), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", ranks().local_rank % torch.cuda.device_count())


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
    that directory. Global rank 0 exports; the other tasks of the run (`ranks`: srun, torchrun) wait for the
    export and go on, while a process that Lightning's launcher started for this training (trainer.devices > 1
    without srun or torchrun) gets None and ends. `train_kwargs` go to recipes.engine.loop.train (module_cls,
    module_kwargs, train_set)."""
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
    if ranks().world > 1 and ranks().rank != 0:  # every task goes on with the model global rank 0 exports
        wait_for_files([hf / "config.json"], f"the export of {stage_dir.name}")
        return hf
    if _global_rank() != 0:  # a process Lightning started for this training only: it ends here
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

