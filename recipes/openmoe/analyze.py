"""`make analyze RUN=<run_dir> | MODEL=<hub id | dir> [ARGS="key=value ..."]`: OpenMoE routing analysis of
every checkpoint of a run, or of one released MoE checkpoint.

    python -m recipes analyze runs/openmoe/<run_id> [max_blocks=0] [batch_size=32] [position_buckets=8]
                              [min_token_count=5] [capacity_factor=2.0] [wandb=true] [top_n=10]
                              [layer=null] [spec_threshold=128]
    python -m recipes analyze --model <hub id | save_pretrained dir> [the same options but wandb]
                              [dtype=auto] [device_map=auto] [trust_remote_code=false] [out=DIR] [data.KEY=VALUE]

The second form (`analyze_model`, `ModelAnalyzeConfig`) loads one released checkpoint (Mixtral, OLMoE,
Qwen2/3-MoE, this repository's MoE exports) once through transformers with its own tokenizer, reads the
validation blocks of `data.*` (default: the embedded corpus) and writes the same report and figures, less
what needs several checkpoints (saturation, early routing learning), to runs/analyze/<model>/analysis/.

For every saved checkpoint (checkpoints/step*.ckpt, last.ckpt; one per global step) the model of the run
(config.yaml: same architecture and recipe `prepare_model`) gets the checkpoint's weights and, in eval
mode, reads the embedded multi-domain VALIDATION blocks (all of them by default; `max_blocks=N` takes
an equal share per domain) with a `models.routing_probe.RoutingProbe` attached.

Capacity convention (stated in report.json under "capacity"): OpenMoE's evaluation factor 2.0. Blocks that
apply a capacity themselves report their real drops in eval mode (the `openmoe` model: its `drop_order`, by
default ColossalAI's over each forward batch). For dropless blocks (Mixtral/Qwen2-MoE/OLMoE, AdaMoE without
capacity) the probe computes the drops factor `capacity_factor` would cause over each forward batch of T
tokens, C = ceil(cf * T * k / E), earlier positions first. Separately, on every checkpoint's recorded routing,
the drops each of the three drop orders (colossalai, slot_major, token_major; `models.routing_probe.capacity`)
would make at `capacity_factor`.

The OpenMoE paper's own quantities (the headline), at the MoE layer `layer` (default: the third MoE layer, or
the last when there are fewer) and over token ids seen more than `spec_threshold` (128) times:
  paper_specialisation (Figures 13-14): mean std of each token id's expert-ratio vector, of each position's,
    and the same for uniform random routing of the same assignments (a perfectly uniform split gives 0);
  early_routing (Figure 11): each frequent token id's expert distribution at every checkpoint against the
    FINAL checkpoint's on the same tokens: mean total variation and Jensen-Shannon distance;
  drop_rate_by_order: drop rate by position bucket under each drop order.

Writes <run_dir>/analysis/report.json: per checkpoint and MoE layer the above plus
  specialisation (an extra, OLMoE's measure): modal-expert share by token id / position / domain (+ the same
    statistic for uniformly random routing of the same tokens), per-group std of expert-ratio vectors vs the
    uniform reference (min_token_count);
  top tokens per expert (decoded); drop rate by position bucket (the model's real drops), per assignment and
  per token; expert co-activation P(b|a); load min/max/std and max/ideal; saturation = top-1 agreement and
  top-k overlap of the checkpoint's routing with the FINAL checkpoint's on the same tokens.
and PNG figures in <run_dir>/analysis/, logged (with the headline scalars) to the run's W&B run (same id,
resumed; offline unless logged in; skipped with a warning when W&B is unavailable).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from data.config import DataConfig
from recipes.engine.errors import ConfigError


@dataclass
class AnalyzeConfig:
    """The options of `make analyze RUN=<run_dir> ARGS="key=value ..."`."""
    max_blocks: int = 0  # 0: every validation block; N: an equal share per domain
    batch_size: int = 32
    position_buckets: int = 8
    min_token_count: int = 5  # token ids seen fewer times are left out of specialisation
    capacity_factor: Optional[float] = 2.0  # dropless models: the drops this factor would cause
    top_n: int = 10  # top tokens listed per expert
    wandb: bool = True
    seed: int = 0
    layer: Optional[int] = None  # MoE layer (0-based among the MoE layers) of the paper quantities; None: 3rd or last
    spec_threshold: int = 128  # paper quantities use token ids seen MORE than this many times


@dataclass
class ModelAnalyzeConfig(AnalyzeConfig):
    """The options of `make analyze MODEL=<hub id | dir> ARGS="key=value ..."`: those of a run directory's analysis
    (no W&B: files only), how to load the model, and the data (`data.*` keys; the tokenizer is the model's)."""
    wandb: bool = False  # this mode writes files only; wandb=true is refused
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | bfloat16 | float16 | float32
    device_map: Optional[str] = "auto"  # auto: accelerate's "auto" when CUDA and accelerate are there; null: one device
    trust_remote_code: bool = False  # run the checkpoint's own modelling / tokenizer code (auto_map)
    out: Optional[str] = None  # default runs/analyze/<model name>/analysis
    data: DataConfig = field(default_factory=DataConfig)  # the validation blocks' source


class AnalysisError(ConfigError):
    """A run directory or model that cannot be analysed (no checkpoints, not an MoE, ...)."""


# ----------------------------------------------------------------------------------------- inputs


def parse_options(args: Sequence[str], cls: type = AnalyzeConfig) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    from recipes.engine.config import load_options

    try:
        opts: Dict[str, Any] = OmegaConf.to_container(load_options(cls, list(args), "the analyze options"))
    except ConfigError as e:
        raise AnalysisError(str(e)) from None
    for key in ("batch_size", "position_buckets", "min_token_count", "top_n"):
        if opts[key] < 1:
            raise AnalysisError(f"option {key} must be >= 1, got {opts[key]}.")
    if opts["max_blocks"] < 0:
        raise AnalysisError(f"option max_blocks must be >= 0, got {opts['max_blocks']}.")
    if opts["spec_threshold"] < 0:
        raise AnalysisError(f"option spec_threshold must be >= 0, got {opts['spec_threshold']}.")
    if opts["layer"] is not None and opts["layer"] < 0:
        raise AnalysisError(f"option layer must be >= 0 or null, got {opts['layer']}.")
    if opts["capacity_factor"] is not None and opts["capacity_factor"] <= 0:
        raise AnalysisError(f"option capacity_factor must be > 0 or null, got {opts['capacity_factor']}.")
    return opts


def run_checkpoints(run_dir: Path) -> List[Tuple[int, Path]]:
    """(global step, path) of every readable checkpoint, one per step (a step file is preferred to
    last.ckpt at the same step), sorted by step."""
    from recipes.engine.checkpointing import checkpoint_kind, checkpoint_step, list_checkpoints

    by_step: Dict[int, Path] = {}
    for path in list_checkpoints(run_dir):
        if checkpoint_kind(path) != "file":
            raise AnalysisError(f"{path} is a sharded ({checkpoint_kind(path)}) checkpoint; analyze reads "
                                "single-file Lightning checkpoints (train with the default strategy, or convert).")
        step = checkpoint_step(path)
        if step is None:
            continue
        if step not in by_step or by_step[step].name == "last.ckpt":
            by_step[step] = path
    return sorted(by_step.items())


def validation_blocks(dm, max_blocks: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [N, S], domain [N]): all validation blocks, or `max_blocks` spread evenly over the domains."""
    import numpy as np

    blocks = np.asarray(dm.val_set.blocks)
    domains = np.asarray(dm.val_set.domains)
    index = np.arange(len(blocks))
    if max_blocks and max_blocks < len(blocks):
        rng = np.random.default_rng(seed)
        per_domain = max(1, max_blocks // max(1, len(np.unique(domains))))
        chosen = []
        for d in np.unique(domains):
            idx = index[domains == d]
            chosen.append(np.sort(rng.choice(idx, size=min(per_domain, len(idx)), replace=False)))
        index = np.concatenate(chosen)
    return torch.from_numpy(blocks[index].astype(np.int64)), torch.from_numpy(domains[index].astype(np.int64))


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """The LightningModule's `model.*` weights of a Lightning checkpoint into `model` (strict)."""
    from recipes.engine.checkpointing import load_checkpoint_file

    state = load_checkpoint_file(ckpt)["state_dict"]
    prefix = "model."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise AnalysisError(f"{ckpt} holds no 'model.*' weights (keys: {list(state)[:5]}...)")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm.lm_head.weight", "lm_head.weight"}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise AnalysisError(f"{ckpt} does not match the run's model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")


# ----------------------------------------------------------------------------------------- analysis


def uniform_reference(token_ids: torch.Tensor, positions: torch.Tensor, domains: Optional[torch.Tensor],
                      num_experts: int, top_k: int, vocab_size: int, num_positions: int, num_domains: int,
                      min_token_count: int, seed: int) -> Dict[str, float]:
    """Modal-expert share of uniformly random routing (k distinct experts per token, uniform) over the SAME
    tokens: the floor that 'specialisation' must be compared with (it is > 1/E for finite groups)."""
    from models import routing_probe as rp

    g = torch.Generator().manual_seed(seed)
    experts = torch.rand(token_ids.numel(), num_experts, generator=g).topk(top_k, dim=-1).indices
    out = {}
    for name, keys, size, min_count in (("token_id", token_ids, vocab_size, min_token_count),
                                        ("position", positions, num_positions, 1),
                                        ("domain", domains, num_domains, 1)):
        if keys is None:
            continue
        counts = torch.zeros(size, num_experts, dtype=torch.float64)
        counts.index_put_((keys[:, None].expand_as(experts).reshape(-1), experts.reshape(-1)),
                          torch.ones(experts.numel(), dtype=torch.float64), accumulate=True)
        out[name] = float(rp.token_id_specialisation(counts, min_count, top_k=top_k))
    return out


def _f(x: Any) -> Any:
    """JSON-friendly: tensors to lists, NaN to None."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _f(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_f(v) for v in x]
    return x


def checkpoint_report(stats, tokenizer, opts: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Per probed layer: `models.routing_probe.analysis_report` (specialisation and std vs uniform by token
    id / position / domain, top tokens per expert (decoded), drop rate by position bucket, co-activation
    P(b|a), load statistics) plus the load (assignments per expert, and shares) overall and per domain."""
    from models import routing_probe as rp

    layers = rp.analysis_report(stats, tokenizer, min_token_count=opts["min_token_count"], top_n=opts["top_n"],
                                spec_more_than=opts["spec_threshold"])["layers"]
    for layer in stats.layers:
        entry = layers[layer.name]
        entry["load_counts"] = _f(layer.load.round().long())  # assignments per expert
        entry["load_share"] = _f(layer.load / layer.load.sum().clamp_min(1))
        if layer.counts_by_domain is not None:
            by_domain = layer.counts_by_domain / layer.counts_by_domain.sum(dim=1, keepdim=True).clamp_min(1)
            entry["load_share_by_domain"] = _f(by_domain)
    return layers


@torch.no_grad()
def probe_checkpoint(model: torch.nn.Module, input_ids: torch.Tensor, domains: torch.Tensor, domain_names,
                     opts: Dict[str, Any], vocab_size: int, device: Optional[torch.device] = None, bar=None,
                     forward_kwargs: Optional[Dict[str, Any]] = None):
    """Run the blocks through `model` with a probe: (stats, layers, experts per layer [N*S, k] int16,
    token ids [N*S], positions [N*S]). `device`: where the input ids go (the model's input embeddings); `bar`: a
    tqdm advanced by the blocks of every batch; `forward_kwargs`: extra keywords of every forward."""
    from models.routing_probe import RoutingProbe

    model.eval()
    probe = RoutingProbe(model, capacity_factor=opts["capacity_factor"], priority="position",
                         position_buckets=opts["position_buckets"], max_positions=int(input_ids.shape[1]),
                         min_token_count=opts["min_token_count"], vocab_size=vocab_size)
    experts: List[List[torch.Tensor]] = []
    tokens, positions = [], []
    with probe:
        for start in range(0, input_ids.shape[0], opts["batch_size"]):
            ids = input_ids[start:start + opts["batch_size"]]
            probe.set_domains(domains[start:start + opts["batch_size"]], list(domain_names))
            model(input_ids=ids if device is None else ids.to(device), **(forward_kwargs or {}))
            if bar is not None:
                bar.update(int(ids.shape[0]))
            if not experts:
                experts = [[] for _ in probe.last]
            for j, rec in enumerate(probe.last):
                experts[j].append(rec.experts.to(torch.int16).cpu())
            tokens.append(probe.last[0].token_ids.cpu())
            positions.append(probe.last[0].positions.cpu())
        layers = list(probe.layers)
    return probe.stats, layers, [torch.cat(e) for e in experts], torch.cat(tokens), torch.cat(positions)


def analyze(run_dir: Path | str, options: Optional[Sequence[str]] = None, progress: bool = True,
            figures: bool = True) -> Dict[str, Any]:
    """Analyse every checkpoint of `run_dir`; returns the report (also written to analysis/report.json)."""
    from tqdm.auto import tqdm

    from models import routing_probe as rp
    from recipes.engine.build import build_datamodule, prepared_model
    from recipes.engine.recipe import get_recipe
    from recipes.engine.runs import load_run

    opts = parse_options(list(options or []))
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalysisError(f"run directory {run_dir} does not exist.")
    try:
        cfg = load_run(run_dir)
    except ConfigError as e:
        raise AnalysisError(str(e)) from None
    recipe = cfg.run.name
    checkpoints = run_checkpoints(run_dir)
    if not checkpoints:
        raise AnalysisError(f"{run_dir} has no readable checkpoint (checkpoints/*.ckpt): nothing to analyse. "
                            "Train with checkpoint.every_n_steps=<n> checkpoint.keep=-1 to keep every one.")
    dm = build_datamodule(cfg)
    model = prepared_model(cfg, dm, get_recipe(recipe))
    probe = rp.RoutingProbe(model)
    try:
        probe.attach().detach()
    except ValueError as e:
        raise AnalysisError(f"{run_dir} (recipe {recipe}, model.arch={cfg.model.arch}) "
                            f"is not an MoE run: {e}") from None
    paper_layer = _paper_layer(probe.layers, opts["layer"])

    input_ids, domains = validation_blocks(dm, opts["max_blocks"], opts["seed"])
    vocab_size = int(model.get_input_embeddings().weight.shape[0])
    out_dir = run_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)

    per_ckpt: List[Dict[str, Any]] = []
    routed: List[List[torch.Tensor]] = []
    token_counts: List[List[torch.Tensor]] = []  # per checkpoint and layer: counts_by_token [V, E]
    t0 = time.perf_counter()
    tokens = positions = None
    layers: List[str] = []
    bar = tqdm(checkpoints, desc="analyze checkpoints", unit="ckpt", disable=not progress, file=sys.stderr)
    for step, path in bar:
        bar.set_postfix(step=step)
        load_weights(model, path)
        stats, layers, experts, tokens, positions = probe_checkpoint(model, input_ids, domains, dm.domain_names,
                                                                    opts, vocab_size)
        routed.append(experts)
        token_counts.append([layer.counts_by_token.clone() for layer in stats.layers])
        occurrences = stats.layers[0].tokens_by_token.clone()  # the same tokens at every checkpoint and layer
        entry = {"step": int(step), "checkpoint": path.name, "layers": checkpoint_report(stats, dm.tokenizer, opts)}
        add_drop_rate_by_order(entry, stats, layers, experts, positions, input_ids.shape, opts)
        per_ckpt.append(entry)
    elapsed = time.perf_counter() - t0
    n_tokens = int(input_ids.numel())

    final = routed[-1]
    for entry, experts, counts in zip(per_ckpt, routed, token_counts):
        for i, name in enumerate(layers):
            entry["layers"][name]["saturation_vs_final"] = _f(rp.router_saturation(experts[i].long(), final[i].long()))
            entry["layers"][name]["early_routing_vs_final"] = _f(rp.distribution_distance(
                counts[i], token_counts[-1][i], occurrences, min_count=opts["spec_threshold"] + 1))

    num_experts = int(per_ckpt[-1]["layers"][layers[0]]["coactivation"].__len__())
    top_k = int(final[0].shape[1])
    uniform = uniform_reference(tokens, positions, domains.repeat_interleave(input_ids.shape[1]), num_experts, top_k,
                                vocab_size, int(input_ids.shape[1]), max(1, len(dm.domain_names)),
                                opts["min_token_count"], opts["seed"])
    report = {
        "run_dir": str(run_dir), "recipe": recipe, "model_arch": cfg.model.arch,
        "capacity": _capacity_statement(model, opts),
        "data": {"split": "validation", "blocks": int(input_ids.shape[0]), "block_size": int(input_ids.shape[1]),
                 "tokens": n_tokens, "domains": list(dm.domain_names),
                 "blocks_per_domain": {n: int((domains == i).sum()) for i, n in enumerate(dm.domain_names)}},
        "options": opts, "layers": layers, "num_experts": num_experts, "top_k": top_k,
        "paper_layer": paper_layer,
        "uniform_routing_specialisation": uniform,
        "saturation_chance": {"top1_agreement": 1.0 / num_experts, "topk_overlap": top_k / num_experts},
        "checkpoints": per_ckpt,
        "summary": _summary(per_ckpt, layers, uniform, paper_layer, opts["spec_threshold"]),
        "throughput": {"checkpoints": len(per_ckpt), "seconds": elapsed,
                       "tokens_per_s": n_tokens * len(per_ckpt) / max(elapsed, 1e-9)},
    }
    _write_json(out_dir / "report.json", report)
    paths = write_figures(report, out_dir) if figures else {}
    report["figures"] = {k: str(v) for k, v in paths.items()}
    _write_json(out_dir / "report.json", report)
    if opts["wandb"]:
        log_to_wandb(run_dir, cfg, report, paths)
    return report


def add_drop_rate_by_order(entry: Dict[str, Any], stats, layers: List[str], experts: List[torch.Tensor],
                           positions: torch.Tensor, shape: Tuple[int, int], opts: Dict[str, Any]) -> None:
    """Per layer of a checkpoint's entry: the drops each OpenMoE drop order would make at `capacity_factor` on the
    recorded routing (blocks [N, S] = `shape`, forward batches of `batch_size` blocks)."""
    from models import routing_probe as rp

    if opts["capacity_factor"] is None:
        return
    rows = torch.arange(shape[0]).repeat_interleave(shape[1])
    for i, name in enumerate(layers):
        entry["layers"][name]["drop_rate_by_order"] = _f(rp.drop_order_rates(
            experts[i].long(), positions, rows, stats.layers[i].num_experts, opts["capacity_factor"],
            rows_per_forward=opts["batch_size"], position_buckets=opts["position_buckets"],
            max_positions=int(shape[1])))


def _paper_layer(layers: List[str], layer: Optional[int]) -> str:
    """The MoE layer of the paper quantities: `layer` (0-based among the MoE layers), default the third MoE layer
    (the OpenMoE paper's Figures 13-14) or the last one when the model has fewer."""
    if layer is None:
        return layers[min(2, len(layers) - 1)]
    if layer >= len(layers):
        raise AnalysisError(f"option layer={layer}, but the model has {len(layers)} MoE layers (0..{len(layers) - 1}).")
    return layers[layer]


def _capacity_statement(model: torch.nn.Module, opts: Dict[str, Any]) -> Dict[str, Any]:
    from models.moe import moe_blocks

    own = [b for b in moe_blocks(model) if getattr(b, "eval_capacity_factor", None) is not None
           or getattr(b, "capacity_factor", None) is not None]
    if own:
        b = own[0]
        cf = getattr(b, "eval_capacity_factor", b.capacity_factor)
        group = getattr(b, "capacity_group", "batch")
        order = getattr(b, "drop_order", "token_major")
        unit = "S tokens of each sequence" if group == "sequence" else "T tokens of each forward batch"
        rule = {"colossalai": f"C = floor(k * {cf} * n / E) rounded up to even, >= 4; every top-1 choice before "
                              "any top-2 (ColossalAI)",
                "slot_major": f"C = ceil({cf} * n * k / E); every top-1 choice before any top-2",
                "token_major": f"C = ceil({cf} * n * k / E); position order (position, then slot)"}[order]
        return {"source": "the model's own capacity in eval mode", "capacity_factor": cf, "group": group,
                "drop_order": order,
                "formula": f"{rule}; per expert, n = the {unit}; a token counts as dropped when all its k "
                           "assignments are"}
    cf = opts["capacity_factor"]
    if cf is None:
        return {"source": "dropless model, no capacity_factor given: no drops", "capacity_factor": None}
    return {"source": "computed by the probe for a dropless model", "capacity_factor": cf, "group": "batch",
            "formula": f"C = ceil({cf} * T * k / E) per expert, T = real tokens of each forward batch "
                       f"(batch_size={opts['batch_size']} blocks); "
                       "position priority (position, then batch row, then slot)"}


def _summary(per_ckpt: List[Dict[str, Any]], layers: List[str], uniform: Dict[str, float], paper_layer: str,
             spec_threshold: int) -> Dict[str, Any]:
    def mean(values):
        vals = [v for v in values if v is not None]
        return sum(vals) / len(vals) if vals else None

    final = per_ckpt[-1]["layers"]
    paper = final[paper_layer]["paper_specialisation"]
    if not paper["token_id"]["n_groups"]:
        warnings.warn(f"no token id was seen more than spec_threshold={spec_threshold} times: the paper's "
                      "specialisation by token id is undefined (lower spec_threshold or use more blocks)")
    by_order = final[paper_layer].get("drop_rate_by_order", {})
    spec = {g: mean(final[n]["specialisation"].get(g) for n in layers) for g in ("token_id", "position", "domain")}
    drop = {n: final[n]["drop_rate_by_position"] for n in layers}
    first_bucket = mean(d["per_assignment"][0] for d in drop.values())
    last_bucket = mean(d["per_assignment"][-1] for d in drop.values())
    out = {
        "final_step": per_ckpt[-1]["step"],
        "paper_layer": paper_layer,
        "paper_specialisation": {
            "token_id_std": paper["token_id"]["mean_std"], "token_id_uniform_std": paper["token_id"]["uniform_std"],
            "token_ids": paper["token_id"]["n_groups"], "more_than": spec_threshold,
            "position_std": paper["position"]["mean_std"], "position_uniform_std": paper["position"]["uniform_std"],
            "positions": paper["position"]["n_groups"]},
        "drop_rate_by_order_last_bucket": {o: v["per_assignment"][-1] for o, v in by_order.items()
                                           if isinstance(v, dict)},
        "drop_rate_by_order_overall": {o: v["overall_per_assignment"] for o, v in by_order.items()
                                       if isinstance(v, dict)},
        "specialisation_final": spec,
        "specialisation_uniform": uniform,
        "drop_rate_first_bucket": first_bucket,
        "drop_rate_last_bucket": last_bucket,
        "load_max_over_ideal_final": max(final[n]["load"]["max_over_ideal"] for n in layers),
    }
    if "early_routing_vs_final" not in final[paper_layer]:  # one checkpoint (analyze --model): no curves over steps
        return out
    out.update({
        "early_routing_tv_by_step": {str(c["step"]): c["layers"][paper_layer]["early_routing_vs_final"]["mean_tv"]
                                     for c in per_ckpt},
        "early_routing_js_by_step": {str(c["step"]): c["layers"][paper_layer]["early_routing_vs_final"]["mean_js"]
                                     for c in per_ckpt},
        "early_routing_token_ids": per_ckpt[0]["layers"][paper_layer]["early_routing_vs_final"]["n_groups"],
        "saturation_top1_by_step": {str(c["step"]): mean(c["layers"][n]["saturation_vs_final"]["top1_agreement"]
                                                         for n in layers) for c in per_ckpt},
        "saturation_topk_by_step": {str(c["step"]): mean(c["layers"][n]["saturation_vs_final"]["topk_overlap"]
                                                         for n in layers) for c in per_ckpt},
    })
    return out


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_f(data), indent=1, allow_nan=False))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- released checkpoints

SUPPORTED_MOE = ("this repository's MoE exports (models.moe.SparseMoEBlock: openmoe, adamoe, tiny_moe) and "
                 "transformers' sparse-MoE models whose *SparseMoeBlock has a top-k `gate` (mixtral, olmoe, "
                 "qwen2_moe, qwen3_moe)")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def model_output_name(model: str) -> str:
    """The folder name of a model's analysis: 'org--name' for a hub id, the directory's name for a local path;
    characters other than letters, digits, '.', '_' and '-' become '_'."""
    import re

    p = Path(model).expanduser()
    name = p.resolve().name if p.exists() else model.strip("/").replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "model"


def resolve_model(model: str) -> Tuple[str, bool]:
    """(path or hub id, whether local). A local path must be a save_pretrained directory; a hub id must be in the
    local cache when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set. Raises AnalysisError in one line."""
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise AnalysisError(f"--model {model} has no config.json: is it a save_pretrained directory?")
        return str(p), True
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model:
        raise AnalysisError(f"--model {model}: no such local directory (a hub id is 'org/name').")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            raise AnalysisError(f"--model {model} is a hub id that is not in the local Hugging Face cache, and "
                                "HF_HUB_OFFLINE is set: download it first (without HF_HUB_OFFLINE) or pass a "
                                "save_pretrained directory.")
    return model, False


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def _repo_architecture(source: str, local: bool, trust: bool):
    """The repository's own architecture of a local export (its config.json model_type is registered in
    models.factory with a loader), used unless trust_remote_code=true asks for the export's own code."""
    from models.factory import architecture

    if not local or trust:
        return None, None
    model_type = json.loads((Path(source) / "config.json").read_text()).get("model_type")
    arch = architecture(str(model_type)) if model_type else None
    return (arch if arch is not None and arch.load is not None else None), model_type


def _check_moe_on_meta(model: str, source: str, trust: bool) -> str:
    """Build the model of `source`'s config on the meta device (no weights read, no memory) and check that the
    probe finds MoE blocks in it: a dense model fails before any download. Returns the model_type."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.routing_probe import find_moe_blocks

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    except Exception as e:  # unknown model_type, remote code refused, no network, ...
        hint = "" if trust else " (a checkpoint with its own code needs trust_remote_code=true)"
        raise AnalysisError(f"cannot read the config of {model}{hint}: {_one_line(e)}") from None
    model_type = str(getattr(config, "model_type", "?"))
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    except Exception as e:
        raise AnalysisError(f"cannot build {model} (model_type {model_type}) as a causal LM: {_one_line(e)}") from None
    if not find_moe_blocks(meta):
        remote = (" Its MoE layer is the checkpoint's own code, which the probe has no adapter for (as for OpenMoE's "
                  "hub checkpoints).") if trust and getattr(config, "auto_map", None) else ""
        raise AnalysisError(f"{model} (model_type {model_type}, {type(meta).__name__}) has no MoE layer the routing "
                            f"probe recognises; supported: {SUPPORTED_MOE}.{remote}")
    return model_type


def load_analysis_model(model: str, opts: Dict[str, Any]) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Load `model` (hub id or save_pretrained directory) once, in eval mode, for the analysis: (model, how it was
    loaded: source, model_type, dtype, device_map, input device)."""
    source, local = resolve_model(model)
    trust = bool(opts["trust_remote_code"])
    cuda = torch.cuda.is_available()
    name = str(opts["dtype"]).lower()
    if name == "auto":
        dtype = torch.bfloat16 if cuda else torch.float32
    elif name in DTYPES:
        dtype = DTYPES[name]
    else:
        raise AnalysisError(f"option dtype must be auto, bfloat16, float16 or float32, got {opts['dtype']!r}.")
    device_map = opts["device_map"]
    if device_map == "auto":
        import importlib.util

        device_map = "auto" if cuda and importlib.util.find_spec("accelerate") is not None else None
    arch, model_type = _repo_architecture(source, local, trust)
    if arch is not None:  # this repository's export: its own loader, on one device
        from models.factory import ModelSpec, load_pretrained

        device_map = None
        try:
            net = load_pretrained(source, ModelSpec(arch=str(model_type), size="", vocab_size=1, max_seq_len=1,
                                                    overrides={}, dtype=dtype))
        except Exception as e:
            raise AnalysisError(f"cannot load {model} (model_type {model_type}): {_one_line(e)}") from None
    else:
        from transformers import AutoModelForCausalLM

        model_type = _check_moe_on_meta(model, source, trust)
        kwargs: Dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust, "use_safetensors": True}
        if device_map is not None:
            kwargs["device_map"] = device_map
        try:
            net = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except Exception as e:
            raise AnalysisError(f"cannot load the weights of {model} (model_type {model_type}; safetensors "
                                f"only): {_one_line(e)}") from None
    if device_map is None:
        net = net.to("cuda" if cuda else "cpu")
    net.eval()
    device = net.get_input_embeddings().weight.device
    if device.type == "meta":  # embeddings offloaded by accelerate: its hooks move the inputs
        device = torch.device("cpu")
    return net, {"source": source, "local": local, "model_type": model_type, "model_class": type(net).__name__,
                 "dtype": str(dtype).replace("torch.", ""), "device_map": device_map, "input_device": str(device)}


def _forward_kwargs(model: torch.nn.Module) -> Dict[str, Any]:
    """No KV cache, and logits of the last position only where the forward takes `logits_to_keep` (the analysis
    reads the routing, not the logits: [B, S, vocab] would dominate the memory)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    out: Dict[str, Any] = {}
    if "use_cache" in params:
        out["use_cache"] = False
    if "logits_to_keep" in params:
        out["logits_to_keep"] = 1
    return out


def analyze_model(model: str, options: Optional[Sequence[str]] = None, progress: bool = True,
                  figures: bool = True) -> Dict[str, Any]:
    """Analyse one released MoE checkpoint (hub id or save_pretrained directory): the report of a run directory's
    analysis for a single checkpoint, written to `out` (default runs/analyze/<model name>/analysis/report.json)."""
    from tqdm.auto import tqdm

    from data.corpus import DataError
    from data.datamodule import LMDataModule

    args = list(options or [])
    opts = parse_options(args, ModelAnalyzeConfig)
    if opts["wandb"]:
        raise AnalysisError("wandb=true applies to run directories; analyze --model writes files only.")
    if any(a.split("=", 1)[0].lstrip("+") == "data.tokenizer" for a in args):
        raise AnalysisError("analyze --model reads the data with the model's own tokenizer: data.tokenizer cannot "
                            "be set.")
    source, _ = resolve_model(model)  # a missing path or an offline hub id fails before any data work
    out_dir = Path(opts["out"]) if opts["out"] else Path("runs") / "analyze" / model_output_name(model) / "analysis"
    net, loaded = load_analysis_model(model, opts)

    data = DataConfig.from_mapping({**opts["data"], "tokenizer": source})
    try:
        dm = LMDataModule(data, seed=opts["seed"], trust_remote_code=bool(opts["trust_remote_code"]),
                          progress=progress)
        dm.prepare()
    except (DataError, ConfigError) as e:
        raise AnalysisError(str(e)) from None
    vocab_size = int(net.get_input_embeddings().weight.shape[0])
    if len(dm.tokenizer) > vocab_size:
        raise AnalysisError(f"the tokenizer of {model} has {len(dm.tokenizer)} tokens but the model only "
                            f"{vocab_size} embedding rows.")
    from models.routing_probe import RoutingProbe

    probe = RoutingProbe(net)
    if not probe.layers:
        raise AnalysisError(f"{model} (model_type {loaded['model_type']}, {loaded['model_class']}) has no MoE layer "
                            f"the routing probe recognises; supported: {SUPPORTED_MOE}.")
    paper_layer = _paper_layer(probe.layers, opts["layer"])
    input_ids, domains = validation_blocks(dm, opts["max_blocks"], opts["seed"])
    if input_ids.shape[0] == 0:
        raise AnalysisError(f"no validation block of {data.block_size} tokens in data.*: lower data.block_size.")
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    bar = tqdm(total=int(input_ids.shape[0]), desc=f"analyze {model_output_name(model)}", unit="block",
               disable=not progress, file=sys.stderr)
    try:
        stats, layers, experts, tokens, positions = probe_checkpoint(
            net, input_ids, domains, dm.domain_names, opts, vocab_size, device=torch.device(loaded["input_device"]),
            bar=bar, forward_kwargs=_forward_kwargs(net))
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    label = Path(source).resolve().name if loaded["local"] else model  # figure titles
    entry = {"step": None, "checkpoint": label, "layers": checkpoint_report(stats, dm.tokenizer, opts)}
    add_drop_rate_by_order(entry, stats, layers, experts, positions, tuple(input_ids.shape), opts)
    num_experts = int(stats.layers[0].num_experts)
    top_k = int(experts[0].shape[1])
    n_tokens = int(input_ids.numel())
    uniform = uniform_reference(tokens, positions, domains.repeat_interleave(input_ids.shape[1]), num_experts, top_k,
                                vocab_size, int(input_ids.shape[1]), max(1, len(dm.domain_names)),
                                opts["min_token_count"], opts["seed"])
    report = {
        "mode": "model", "model": model, **{k: v for k, v in loaded.items() if k != "local"},
        "capacity": _capacity_statement(net, opts),
        "data": {"split": "validation", "source": data.source, "tokenizer": source,
                 "blocks": int(input_ids.shape[0]), "block_size": int(input_ids.shape[1]), "tokens": n_tokens,
                 "domains": list(dm.domain_names),
                 "blocks_per_domain": {n: int((domains == i).sum()) for i, n in enumerate(dm.domain_names)}},
        "options": opts, "layers": layers, "num_experts": num_experts, "top_k": top_k, "paper_layer": paper_layer,
        "uniform_routing_specialisation": uniform,
        "checkpoints": [entry],
        "not_measured": {"early_routing_learning": "one checkpoint: the expert distributions over training "
                                                   "(early_routing_vs_final) and the saturation curve need a run's "
                                                   "checkpoints (make analyze RUN=<run_dir>)"},
        "summary": _summary([entry], layers, uniform, paper_layer, opts["spec_threshold"]),
        "throughput": {"checkpoints": 1, "seconds": elapsed, "tokens_per_s": n_tokens / max(elapsed, 1e-9)},
    }
    _write_json(out_dir / "report.json", report)
    paths = write_figures(report, out_dir) if figures else {}
    report["figures"] = {k: str(v) for k, v in paths.items()}
    report["out_dir"] = str(out_dir)
    _write_json(out_dir / "report.json", report)
    return report


# ----------------------------------------------------------------------------------------- figures


def write_figures(report: Dict[str, Any], out_dir: Path) -> Dict[str, Path]:
    from models.routing_probe import plots

    layers = report["layers"]
    names = [plots.short_layer_name(n) for n in layers]
    final = report["checkpoints"][-1]
    steps = [c["step"] for c in report["checkpoints"]]
    uniform = report["uniform_routing_specialisation"]
    when = _when(final)
    over_steps = "early_routing_vs_final" in final["layers"][layers[0]]  # False for one checkpoint (--model)
    paths: Dict[str, Path] = {}
    load = [final["layers"][n]["load_share"] for n in layers]
    paths["load_heatmap"] = plots.save_png(plots.load_heatmap(load, names, title=f"Expert load, {when}"),
                                           out_dir / "load_heatmap.png")
    curves = {name: final["layers"][n]["drop_rate_by_position"] for name, n in zip(names, layers)}
    cf = report["capacity"].get("capacity_factor")
    paths["drop_rate"] = plots.save_png(
        plots.drop_rate_plot(curves, title=f"Drop rate by position (capacity factor {cf}), {when}"),
        out_dir / "drop_rate.png")
    groups = [g for g in ("token_id", "position", "domain") if g in final["layers"][layers[0]]["specialisation"]]
    values = {g.replace("_", " "): [final["layers"][n]["specialisation"][g] or 0.0 for n in layers] for g in groups}
    ref = {g.replace("_", " "): [uniform.get(g, 0.0)] * len(layers) for g in groups}
    paths["specialisation"] = plots.save_png(
        plots.specialisation_bars(values, names, ref, title=f"Modal-expert share by group, {when}"),
        out_dir / "specialisation.png")
    std_vals = {g.replace("_", " "): [final["layers"][n]["std_vs_uniform"][g]["mean_std"] for n in layers]
                for g in groups}
    std_ref = {g.replace("_", " "): [final["layers"][n]["std_vs_uniform"][g]["uniform_std"] for n in layers]
               for g in groups}
    paths["std_vs_uniform"] = plots.save_png(
        plots.std_vs_uniform_bars(std_vals, std_ref, names, title="Per-group std of expert ratios vs uniform"),
        out_dir / "std_vs_uniform.png")
    paths["coactivation"] = plots.save_png(
        plots.coactivation_heatmap(final["layers"][layers[-1]]["coactivation"],
                                   title=f"Co-activation P(b | a), {plots.short_layer_name(layers[-1])}, {when}"),
        out_dir / "coactivation.png")
    if over_steps:  # saturation and specialisation over checkpoints
        top1 = {name: [c["layers"][n]["saturation_vs_final"]["top1_agreement"] for c in report["checkpoints"]]
                for name, n in zip(names, layers)}
        topk = {name: [c["layers"][n]["saturation_vs_final"]["topk_overlap"] for c in report["checkpoints"]]
                for name, n in zip(names, layers)}
        chance = report["saturation_chance"]
        paths["saturation"] = plots.save_png(
            plots.saturation_plot(steps, top1, topk, chance["top1_agreement"], chance["topk_overlap"]),
            out_dir / "saturation.png")
        series = {}
        for name, n in zip(names, layers):
            series[f"{name} token id"] = [c["layers"][n]["specialisation"]["token_id"] or 0.0
                                          for c in report["checkpoints"]]
            series[f"{name} position"] = [c["layers"][n]["specialisation"]["position"] or 0.0
                                          for c in report["checkpoints"]]
        paths["specialisation_over_steps"] = plots.save_png(
            plots.metric_over_steps(steps, series, "mean share to the modal expert", "Specialisation over checkpoints",
                                    reference={"uniform routing, token id": uniform.get("token_id", 0.0),
                                               "uniform routing, position": uniform.get("position", 0.0)}),
            out_dir / "specialisation_over_steps.png")
    paths.update(_paper_figures(report, out_dir))
    return paths


def _when(entry: Dict[str, Any]) -> str:
    """A figure title's 'step 200' (a run's checkpoint) or the model's name (analyze --model)."""
    return f"step {entry['step']}" if entry["step"] is not None else str(entry["checkpoint"])


def _paper_figures(report: Dict[str, Any], out_dir: Path) -> Dict[str, Path]:
    """The OpenMoE paper's quantities: std of expert ratios by token id / position vs uniform at the paper layer
    (Figures 13-14), each frequent id's expert distribution vs the final checkpoint (Figure 11), and the drop rate
    by position under each drop order."""
    from models.routing_probe import plots

    layers, layer = report["layers"], report["paper_layer"]
    name = plots.short_layer_name(layer)
    final = report["checkpoints"][-1]
    steps = [c["step"] for c in report["checkpoints"]]
    more = report["options"]["spec_threshold"]
    paper = final["layers"][layer]["paper_specialisation"]
    when = _when(final)
    paths: Dict[str, Path] = {}
    values = {f"token id (> {more} occurrences, {paper['token_id']['n_groups']} ids)": [paper["token_id"]["mean_std"]],
              f"position ({paper['position']['n_groups']})": [paper["position"]["mean_std"]]}
    ref = {k: [v] for k, v in zip(values, (paper["token_id"]["uniform_std"], paper["position"]["uniform_std"]))}
    clean = {k: [x if x is not None else 0.0 for x in v] for k, v in values.items()}
    clean_ref = {k: [x if x is not None else 0.0 for x in v] for k, v in ref.items()}
    paths["paper_specialisation"] = plots.save_png(
        plots.std_vs_uniform_bars(clean, clean_ref, [name], title=f"Expert-ratio std, {name}, {when}"),
        out_dir / "paper_specialisation.png")
    if "early_routing_vs_final" in final["layers"][layer]:  # several checkpoints
        tv = {plots.short_layer_name(n): [c["layers"][n]["early_routing_vs_final"]["mean_tv"] or 0.0
                                          for c in report["checkpoints"]] for n in layers}
        js = {f"{plots.short_layer_name(n)} JS": [c["layers"][n]["early_routing_vs_final"]["mean_js"] or 0.0
                                                  for c in report["checkpoints"]] for n in layers}
        paths["early_routing"] = plots.save_png(
            plots.metric_over_steps(steps, {**{f"{k} TV": v for k, v in tv.items()}, **js},
                                    "distance to the final checkpoint", f"Token ids seen > {more} times: expert "
                                    "distribution vs final"),
            out_dir / "early_routing.png")
    by_order = final["layers"][layer].get("drop_rate_by_order")
    if by_order:
        curves = {order: {**v, "bucket_edges": by_order["bucket_edges"]} for order, v in by_order.items()
                  if isinstance(v, dict)}
        cf = report["options"]["capacity_factor"]
        paths["drop_rate_by_order"] = plots.save_png(
            plots.drop_rate_plot(curves, title=f"Drop rate by position under each drop order (cf {cf}), {name}, "
                                               f"{when}"),
            out_dir / "drop_rate_by_order.png")
    return paths


# ----------------------------------------------------------------------------------------- W&B


def analyze_wandb_id(run_dir: Path) -> str:
    """The W&B run id of a run's analysis: `<training run's id>-analyze` (a run of its own, not a segment of the
    training run, so the training run's history stays one monotonic curve)."""
    from recipes.engine.runs import wandb_id_for

    return f"{wandb_id_for(run_dir)[:56]}-analyze"


def analysis_wandb_run(run_dir: Path, cfg, report: Dict[str, Any], mode: str):
    """Start (or resume) the analysis' OWN W&B run: id `<training run id>-analyze`, group = the training run's
    group or its id, job_type analyze, files under <run_dir>/analysis/wandb. Returns the wandb Run."""
    import wandb

    from recipes.engine.logs import wandb_settings
    from recipes.engine.runs import wandb_id_for

    train_id = wandb_id_for(run_dir)
    out_dir = Path(run_dir) / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=cfg.logging.project, entity=cfg.logging.entity, id=analyze_wandb_id(run_dir),
                      name=f"{Path(run_dir).parent.name}/{Path(run_dir).name}/analyze",
                      group=cfg.logging.group or train_id, job_type="analyze",
                      tags=list(cfg.logging.tags) + ["analyze"],
                      config={"analyze": report.get("options", {}), "train_run_id": train_id,
                              "recipe": report.get("recipe")},
                      resume="allow", dir=str(out_dir), mode=mode, reinit="finish_previous",
                      settings=wandb_settings(mode))


def log_to_wandb(run_dir: Path, cfg, report: Dict[str, Any], paths: Dict[str, Path]) -> bool:
    """Log figures and headline scalars to the analysis' own W&B run (analysis_wandb_run: not a segment of the
    training run; a second `make analyze` resumes it). Never raises."""
    from recipes.engine.logs import wandb_mode

    mode = wandb_mode(cfg.logging.wandb)
    if mode is None:
        return False
    try:
        import wandb

        run = analysis_wandb_run(run_dir, cfg, report, mode)
        try:
            summary = report["summary"]
            payload: Dict[str, Any] = {f"analysis/{k}": wandb.Image(str(v)) for k, v in paths.items()}
            for g, v in summary["specialisation_final"].items():
                if v is not None:
                    payload[f"analysis/specialisation_{g}"] = v
            paper = summary["paper_specialisation"]
            for key in ("token_id_std", "token_id_uniform_std", "position_std"):
                if paper[key] is not None:
                    payload[f"analysis/paper_{key}"] = paper[key]
            first_tv = next(iter(summary["early_routing_tv_by_step"].values()), None)
            if first_tv is not None:
                payload["analysis/early_routing_tv_first_checkpoint"] = first_tv
            for order, value in summary["drop_rate_by_order_last_bucket"].items():
                if value is not None:
                    payload[f"analysis/drop_rate_last_bucket_{order}"] = value
            payload["analysis/drop_rate_first_bucket"] = summary["drop_rate_first_bucket"]
            payload["analysis/drop_rate_last_bucket"] = summary["drop_rate_last_bucket"]
            rows = [[int(s), summary["saturation_top1_by_step"][s], summary["saturation_topk_by_step"][s]]
                    for s in summary["saturation_top1_by_step"]]
            payload["analysis/saturation_table"] = wandb.Table(columns=["step", "top1_agreement", "topk_overlap"],
                                                               data=rows)
            run.log(payload)
            run.summary.update({k: v for k, v in payload.items() if isinstance(v, (int, float))})
        finally:
            run.finish()
        return True
    except Exception as e:  # W&B must never make the analysis fail
        warnings.warn(f"analysis not logged to W&B ({type(e).__name__}: {e}); files are in {run_dir}/analysis")
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes analyze", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a released MoE checkpoint: hub id or save_pretrained directory")
    parser.add_argument("args", nargs="*", metavar="run_dir | key=value",
                        help=f"the run directory (without --model), then key=value options; keys: "
                             f"{', '.join(f.name for f in fields(AnalyzeConfig))}; with --model also "
                             f"{', '.join(f.name for f in fields(ModelAnalyzeConfig)[len(fields(AnalyzeConfig)):])} "
                             "(data.KEY=VALUE)")
    args = parser.parse_intermixed_args(argv)
    run_dir, options = None, list(args.args)
    if args.model is None:
        if not options or "=" in options[0]:
            print("error: analyze needs a run directory (make analyze RUN=<run_dir>) or --model <hub id | dir> "
                  "(make analyze MODEL=<hub id>).", file=sys.stderr)
            return 2
        run_dir = options.pop(0)
    elif options and "=" not in options[0]:
        print(f"error: give a run directory or --model, not both (got {options[0]} and --model {args.model}).",
              file=sys.stderr)
        return 2
    try:
        if args.model is not None:
            report = analyze_model(args.model, options)
        else:
            report = analyze(run_dir, options)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = report["summary"]
    keys = ("paper_layer", "paper_specialisation", "early_routing_tv_by_step", "drop_rate_by_order_last_bucket",
            "specialisation_final", "specialisation_uniform", "saturation_top1_by_step", "drop_rate_first_bucket",
            "drop_rate_last_bucket", "load_max_over_ideal_final")
    print(json.dumps(_f({**{k: s[k] for k in keys if k in s},
                         "tokens_per_s": report["throughput"]["tokens_per_s"]}), indent=1))
    if args.model is not None:
        print(f"not measured: {report['not_measured']['early_routing_learning']}")
        print(f"report: {Path(report['out_dir']) / 'report.json'}")
    else:
        print(f"report: {Path(run_dir) / 'analysis' / 'report.json'}")
    return 0
