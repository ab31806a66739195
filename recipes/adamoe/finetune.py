"""AdaMoE fine-tuning: retrofit a pretrained MoE with null experts, fine-tune it
(optionally with LoRA), and score it on a multiple-choice benchmark in ARC format.

    make train RECIPE=adamoe_finetune ARGS="model.pretrained=<save_pretrained dir> \
        adamoe_finetune.train_file=arc_train.jsonl adamoe_finetune.eval_file=arc_test.jsonl"

Stages, each skipped when its output is complete (so a rerun of the same run directory resumes):
1. data   `train_file` (ARC-format jsonl) -> <run>/data/<name>.jsonl with one text per question:
          the prompt followed by the correct answer. Without `train_file` the `data.*` section is used as is.
2. train  recipe `adamoe` (retrofit + AdaMoE losses + routing metrics, LoRA when adamoe.lora_r > 0) on
          that data, in <run>/train (a standard run directory: checkpoints, metrics.csv, summary.json).
3. eval   multiple-choice log-likelihood on `eval_file` (or a hub dataset, with network) of the fine-tuned
          model and, with `eval_base`, of the pretrained model as loaded: accuracy, length-normalised
          accuracy and the true experts per token over the scored tokens -> <run>/eval.json.
4. export the fine-tuned model, LoRA merged, as a save_pretrained directory <run>/export (with its
          tokenizer); it loads back, null gates included, with `model.pretrained=<run>/export`.

ARC format: one JSON object per line, either the Hugging Face `allenai/ai2_arc` layout
{"question": str, "choices": {"text": [...], "label": ["A", ...]}, "answerKey": "B"} or the original
AI2 layout {"question": {"stem": str, "choices": [{"text", "label"}, ...]}, "answerKey": "B"}.
The score of a choice is the summed log-probability of " <choice text>" after the prompt (lm-eval-harness
"acc"); "acc_norm" divides it by the choice's length in characters.

Multi-process training (DDP, DeepSpeed ZeRO-2/3, FSDP2): every rank trains; global rank 0 alone then runs
the eval and export stages, each from the consolidated checkpoint in ONE process (fp32, on the CPU). That is
fine up to a few billion parameters; for Mixtral-8x7B set `adamoe_finetune.eval_file=null` and score the
export with the standalone scorer, which can spread a bf16 model over the GPUs:

    python -m recipes score_arc --model <run>/export --arc arc_challenge_test.jsonl \
        --dtype bfloat16 --device-map auto

The tokenizer: when `data.tokenizer` is an embedded kind (bpe / unigram) and the pretrained directory has
its own tokenizer, that one is used (a model only understands the tokenizer it was trained with).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from models.moe import CONFIG_KEY, moe_blocks, restore_retrofit
from recipes.adamoe.module import true_experts_used
from recipes.engine.config import load_config
from recipes.engine.errors import ConfigError
from recipes.engine.pipeline import Stage


@dataclass
class AdaMoEFinetuneConfig:
    train_file: Optional[str] = None  # ARC-format jsonl to fine-tune on; None: train on data.* as configured
    eval_file: Optional[str] = None  # ARC-format jsonl to score
    eval_hub_name: Optional[str] = None  # instead of eval_file, e.g. allenai/ai2_arc (needs network)
    eval_hub_config: Optional[str] = "ARC-Challenge"
    eval_hub_split: str = "test"
    eval_limit: Optional[int] = None  # score only the first N questions
    eval_base: bool = True  # also score the pretrained model as loaded (before retrofit / fine-tuning)
    prompt: str = "Question: {question}\nAnswer:"
    export: bool = True  # write <run>/export (LoRA merged)


# ------------------------------------------------------------------------------------------ ARC data


@dataclass
class MCQuestion:
    question: str
    choices: List[str]
    answer: int  # index into choices


def parse_arc_row(row: Dict[str, Any], where: str = "row") -> MCQuestion:
    """One ARC record (HF ai2_arc or original AI2 layout) -> MCQuestion."""
    question = row.get("question")
    if isinstance(question, dict):  # original AI2 layout
        stem = question.get("stem")
        choices = question.get("choices") or []
        texts = [c.get("text") for c in choices]
        labels = [str(c.get("label")) for c in choices]
    else:
        stem = question
        choices = row.get("choices") or {}
        texts = list(choices.get("text") or []) if isinstance(choices, dict) else []
        labels = [str(x) for x in (choices.get("label") or [])] if isinstance(choices, dict) else []
    key = row.get("answerKey")
    if not isinstance(stem, str) or not stem.strip():
        raise ValueError(f"{where}: no question text (expected 'question' or 'question.stem')")
    if len(texts) < 2 or len(texts) != len(labels) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{where}: expected >= 2 choices with one label each, got texts={texts} labels={labels}")
    if str(key) not in labels:
        raise ValueError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    return MCQuestion(stem.strip(), [t.strip() for t in texts], labels.index(str(key)))


def read_arc_jsonl(path: str, limit: Optional[int] = None) -> List[MCQuestion]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"ARC file {p} does not exist.")
    questions = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            questions.append(parse_arc_row(json.loads(line), f"{p} line {n}"))
        except (json.JSONDecodeError, ValueError) as e:
            raise ConfigError(f"{p} line {n} is not an ARC record: {e}") from None
        if limit is not None and len(questions) >= limit:
            break
    if not questions:
        raise ConfigError(f"ARC file {p} holds no questions.")
    return questions


def read_arc_hub(name: str, config: Optional[str], split: str, limit: Optional[int] = None) -> List[MCQuestion]:
    """ARC from the Hugging Face hub (network only)."""
    import os

    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"adamoe_finetune.eval_hub_name={name} needs the network, but HF offline mode is set; "
                          "use adamoe_finetune.eval_file=<local ARC jsonl>.")
    import datasets

    rows = datasets.load_dataset(name, config, split=split)
    out = [parse_arc_row(dict(row), f"{name}[{i}]") for i, row in enumerate(rows)]
    return out[:limit] if limit is not None else out


# ------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def choice_logprobs(model: torch.nn.Module, tokenizer, context: str, continuations: Sequence[str]):
    """Summed log-probabilities [C] of each continuation's tokens after `context`, plus the number of
    (token, layer) true-expert assignments and scored (token, layer) pairs when the model has MoE blocks.

    Context and continuation are tokenised separately and concatenated, so every choice is scored on
    the same context tokens; the choices are one right-padded batch."""
    context_ids = tokenizer(context)["input_ids"]
    cont_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    if not context_ids or any(len(c) == 0 for c in cont_ids):
        raise ValueError(f"empty tokenisation of the context or a choice: {context!r} / {continuations!r}")
    lengths = [len(context_ids) + len(c) for c in cont_ids]
    width = max(lengths)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    input_ids = torch.full((len(cont_ids), width), pad, dtype=torch.long, device=device)
    attention = torch.zeros_like(input_ids)
    for i, c in enumerate(cont_ids):
        input_ids[i, :lengths[i]] = torch.tensor(context_ids + c, device=device)
        attention[i, :lengths[i]] = 1
    logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
    logp = F.log_softmax(logits, dim=-1)
    scores = []
    for i, c in enumerate(cont_ids):
        # token at position p is predicted by the logits at p - 1
        positions = torch.arange(len(context_ids) - 1, lengths[i] - 1, device=device)
        targets = input_ids[i, len(context_ids):lengths[i]]
        scores.append(logp[i, positions, targets].sum())
    used = pairs = 0
    if moe_blocks(model):
        per_pair = true_experts_used(model, attention)
        used, pairs = int(per_pair.sum()), int(per_pair.numel())
    return torch.stack(scores), used, pairs


def evaluate_multiple_choice(model: torch.nn.Module, tokenizer, questions: Sequence[MCQuestion],
                             prompt: str = "Question: {question}\nAnswer:") -> Dict[str, float]:
    """acc (argmax of summed log-probability), acc_norm (per character) and, for models with MoE blocks,
    the mean true experts per token over the scored sequences."""
    was_training = model.training
    model.eval()
    correct = correct_norm = used = pairs = 0
    try:
        for q in questions:
            continuations = [" " + c for c in q.choices]
            scores, u, p = choice_logprobs(model, tokenizer, prompt.format(question=q.question), continuations)
            chars = torch.tensor([len(c) for c in continuations], dtype=scores.dtype, device=scores.device)
            correct += int(int(scores.argmax()) == q.answer)
            correct_norm += int(int((scores / chars).argmax()) == q.answer)
            used, pairs = used + u, pairs + p
    finally:
        model.train(was_training)
    out = {"accuracy": correct / len(questions), "accuracy_norm": correct_norm / len(questions),
           "n_questions": len(questions)}
    if pairs:
        out["true_experts_per_token"] = used / pairs
    return out


# ------------------------------------------------------------------------------------- pipeline


def _pretrained_dir(cfg) -> Path:
    if not cfg.model.pretrained:
        raise ConfigError("adamoe_finetune needs model.pretrained=<save_pretrained directory of a Mixtral / "
                          "Qwen2-MoE / OLMoE model> (e.g. the export of an `adamoe` or `tiny_moe` run).")
    return Path(cfg.model.pretrained).expanduser()


def _data_overrides(cfg, run_dir: Path) -> List[str]:
    c = cfg.adamoe_finetune
    out = []
    pretrained = _pretrained_dir(cfg)
    if cfg.data.tokenizer in ("bpe", "unigram") and (pretrained / "tokenizer.json").exists():
        out.append(f"data.tokenizer={pretrained}")
    if c.train_file:
        questions = read_arc_jsonl(c.train_file)
        target = run_dir / "data" / (Path(c.train_file).stem + ".jsonl")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                for q in questions:
                    text = c.prompt.format(question=q.question) + " " + q.choices[q.answer]
                    f.write(json.dumps({"text": text}) + "\n")
            tmp.replace(target)
        out += ["data.source=files", f"data.files=[{target}]", "data.text_field=text"]
    return out


def stage_config(cfg, run_dir: Path):
    """The `adamoe` training config of this fine-tuning run (its data + tokenizer overrides applied)."""
    from omegaconf import OmegaConf

    base = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "adamoe_finetune"])
    return load_config("adamoe", _data_overrides(cfg, run_dir) + ["run.run_id=train"], base=base)


def _load_trained(sub_cfg, train_dir: Path):
    from recipes.engine.build import build_datamodule, build_module
    from recipes.engine.checkpointing import newest_checkpoint
    from recipes.engine.export import consolidated_state_dict, is_tied, model_state_dict
    from recipes.engine.recipe import get_recipe

    found = newest_checkpoint(train_dir)
    if found is None:
        raise ConfigError(f"no checkpoint in {train_dir}: the train stage did not finish.")
    dm = build_datamodule(sub_cfg)
    model = build_module(sub_cfg, dm, get_recipe("adamoe")).model
    result = model.load_state_dict(model_state_dict(consolidated_state_dict(found[0])), strict=False)
    missing = [k for k in result.missing_keys if not is_tied(model, k)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{found[0]} does not match the fine-tuned model: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    return model, dm


def _eval_questions(cfg) -> Optional[List[MCQuestion]]:
    c = cfg.adamoe_finetune
    if c.eval_file:
        return read_arc_jsonl(c.eval_file, c.eval_limit)
    if c.eval_hub_name:
        return read_arc_hub(c.eval_hub_name, c.eval_hub_config, c.eval_hub_split, c.eval_limit)
    return None


def _global_rank() -> int:
    """This process's global rank as Lightning set it up (0 in a single-process run)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def train_stage(cfg, run_dir: Path, results: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Fine-tune (recipe `adamoe`) in <run>/train; resumes a cut run from its checkpoint."""
    from recipes.engine.checkpointing import newest_checkpoint
    from recipes.engine.loop import train

    _pretrained_dir(cfg)
    sub_cfg = stage_config(cfg, run_dir)
    train_dir = run_dir / "train"
    summary_file = train_dir / "summary.json"
    done = summary_file.exists() and json.loads(summary_file.read_text()).get("step", -1) >= sub_cfg.trainer.max_steps
    if not done:
        train(sub_cfg, run_dir=train_dir, resume=newest_checkpoint(train_dir) is not None)
    if _global_rank() != 0:
        # Multi-process training (DDP / ZeRO): the other ranks' share ends with the training; global rank 0
        # alone scores, exports and writes the summary (each from the consolidated checkpoint).
        return None
    if not summary_file.exists():  # e.g. preempted: the next run of this directory resumes the training
        raise RuntimeError(f"the train stage in {train_dir} did not finish (no summary.json); run again to resume.")
    summary: Dict[str, Any] = {"recipe": cfg.run.name, "run_dir": str(run_dir)}
    summary.update({k: v for k, v in json.loads(summary_file.read_text()).items()
                    if k.startswith(("moe/", "val/", "train/", "step", "tokens_seen"))})
    return summary


def eval_stage(cfg, run_dir: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    """Multiple-choice scores of the fine-tuned (and, with eval_base, the pretrained) model -> eval.json."""
    from recipes.engine.build import build_base_model
    from recipes.engine.runs import write_json_atomic

    c = cfg.adamoe_finetune
    eval_file = run_dir / "eval.json"
    questions = None if eval_file.exists() else _eval_questions(cfg)
    if questions is not None:
        sub_cfg = stage_config(cfg, run_dir)
        model, dm = _load_trained(sub_cfg, run_dir / "train")
        out: Dict[str, Any] = {"finetuned": evaluate_multiple_choice(model, dm.tokenizer, questions, c.prompt)}
        if c.eval_base:
            base = build_base_model(sub_cfg, dm)
            if getattr(base.config, CONFIG_KEY, None):  # a retrofitted checkpoint: score it as saved
                base = restore_retrofit(base, _pretrained_dir(cfg))
            out["base"] = evaluate_multiple_choice(base, dm.tokenizer, questions, c.prompt)
            base_k = getattr(base.config, "num_experts_per_tok", None)
            out["base"].setdefault("true_experts_per_token", float(base_k) if base_k else None)
            del base
        write_json_atomic(eval_file, out)
    summary: Dict[str, Any] = {}
    if eval_file.exists():
        for which, values in json.loads(eval_file.read_text()).items():
            summary.update({f"eval/{which}_{k}": v for k, v in values.items() if v is not None})
    return summary


def export_stage(cfg, run_dir: Path, results: Dict[str, Any]) -> Dict[str, Any]:
    """The fine-tuned model as the export folder <run>/export (models.hub_export.save_export, with its tokenizer):
    LoRA merged; a retrofitted model under its own model_type with its code (AutoModelForCausalLM loads it with
    trust_remote_code=True); with adamoe.lora_r > 0 the peft adapter in <run>/export/adapter."""
    from models.hub_export import save_export

    c = cfg.adamoe_finetune
    export_dir = run_dir / "export"
    if not c.export:
        return {}
    if not (export_dir / "config.json").exists():
        model, dm = _load_trained(stage_config(cfg, run_dir), run_dir / "train")
        save_export(model, export_dir, dm.tokenizer)  # written aside and swapped in: always complete
    return {"export_dir": str(export_dir)}


def stages(cfg) -> List[Stage]:
    return [Stage("train", train_stage, keys=("adamoe", "model", "optim", "data", "adamoe_finetune.train_file")),
            Stage("eval", eval_stage, keys=("adamoe_finetune.eval_file", "adamoe_finetune.eval_hub_name",
                                            "adamoe_finetune.eval_limit", "adamoe_finetune.eval_base",
                                            "adamoe_finetune.prompt")),
            Stage("export", export_stage, keys=("adamoe_finetune.export",))]


def check_config(cfg) -> None:
    from recipes.adamoe.module import check_config as check_adamoe

    check_adamoe(cfg.adamoe)
    c = cfg.adamoe_finetune
    if c.eval_limit is not None and c.eval_limit < 1:
        raise ConfigError(f"adamoe_finetune.eval_limit must be >= 1 or null, got {c.eval_limit}.")
    for key in ("train_file", "eval_file"):
        path = c[key]
        if path and not Path(path).expanduser().is_file():
            raise ConfigError(f"adamoe_finetune.{key}={path}: no such file.")


# ------------------------------------------------------------------------------------- scoring CLI


def score_main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m recipes score_arc --model DIR (--arc FILE.jsonl | --hub allenai/ai2_arc) ...

    Scores a save_pretrained directory (retrofitted or not) on ARC-format questions and prints one JSON
    line: accuracy, acc_norm, true experts per token. For models too large for the pipeline's single-process
    eval stage (Mixtral-8x7B): `--dtype bfloat16 --device-map auto` spreads the weights over the visible
    GPUs (accelerate)."""
    import argparse

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.hub_export import read_config
    from models.moe import load_retrofitted

    p = argparse.ArgumentParser(prog="python -m recipes score_arc", description=score_main.__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="save_pretrained directory (e.g. <run>/export)")
    p.add_argument("--arc", help="ARC-format jsonl file")
    p.add_argument("--hub", help="hub dataset name instead of --arc (needs network), e.g. allenai/ai2_arc")
    p.add_argument("--hub-config", default="ARC-Challenge")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--prompt", default=AdaMoEFinetuneConfig.prompt)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device-map", default=None, help="e.g. auto (accelerate) or cuda:0; default: CPU")
    a = p.parse_args(argv)
    if bool(a.arc) == bool(a.hub):
        p.error("give exactly one of --arc or --hub")
    try:
        questions = read_arc_jsonl(a.arc, a.limit) if a.arc else read_arc_hub(a.hub, a.hub_config, a.split, a.limit)
        path = Path(a.model).expanduser()
        if not (path / "config.json").exists():
            raise ConfigError(f"--model {path} is not a save_pretrained directory (no config.json).")
        kwargs: Dict[str, Any] = {"dtype": getattr(torch, a.dtype)}
        if a.device_map:
            kwargs["device_map"] = a.device_map
        if read_config(path).get(CONFIG_KEY):
            model = load_retrofitted(path, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = evaluate_multiple_choice(model, tokenizer, questions, a.prompt)
    print(json.dumps(dict(result, model=str(path))))
    return 0


