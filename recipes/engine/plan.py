"""`make plan RECIPE=<name> NODES=<n> GPUS=<g> [ARGS="--gpu-mem 80 key=value ..."]`: the memory of one GPU when
the recipe trains under its configured strategy, without building the model.

    python -m recipes plan adamoe_finetune_paper --nodes 1 --gpus 8
    python -m recipes plan tokenformer_paper_124m --nodes 2 --gpus 8 --gpu-mem 40 trainer.strategy=fsdp2

The model of `model.*` is built on the meta device (shapes only: no memory, no download; a paper size of
models/paper_sizes.py keeps its published vocabulary and positions), which gives Psi (parameters), the
trainable parameters T, the largest single module (what ZeRO-3 gathers at once, DeepSpeed's "largest layer") and
the largest FSDP2 unit (one decoder layer, or the root's embeddings + head). Per GPU, with N = nodes x GPUs:

  DeepSpeed, 16-bit training (bf16/16 precisions), as DeepSpeed's own estimators count (2 bytes of 16-bit
  parameters; gradients 2 + 4 bytes of 16- and 32-bit partitions under ZeRO-2, the 32-bit partition's 4 under
  ZeRO-3; 4 + 8 bytes of 32-bit master weights and Adam moments):
    ZeRO-2   parameters 2 Psi            gradients 6 T / N            optimizer 12 T / N
    ZeRO-3   parameters 2 Psi / N + 2 L  gradients 4 T / N + 2 L      optimizer 12 T / N       (L: largest module)
    (the gathered 2 L of gradients only when everything is trained: LoRA leaves the large modules frozen)
    offload_optimizer moves gradients and optimizer to the host (ZeRO-2: 2 Psi on the GPU; ZeRO-3: 2 Psi / N + 4 L);
    offload_parameters (ZeRO-3) also the parameters (4 L). With T = Psi these sums are exactly
    `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` (tests/test_paper_configs.py).
  DDP / one device: parameters 4 Psi, gradients 4 T (8 T without gradient_as_bucket_view), optimizer 8 T (AdamW
    moments), fp32 weights under 32-true and the mixed precisions; 2, 2 and 4 bytes under bf16-true / 16-true.
  FSDP2 (fully_shard per decoder layer, fp32 parameters): parameters 4 Psi / N + 4 U, gradients 4 T / N + 4 U
    (the 4 U only when everything is trained), optimizer 8 T / N (U: the largest unit, gathered for its forward
    and backward; all units stay gathered after the forward with reshard_after_forward=false).
  Activations (all strategies; no activation checkpointing): Korthikanti et al. (2022) for one transformer layer
    without the attention-score term (SDPA / flash attention do not keep the s x s scores):
    34 b s h bytes per layer at 16-bit (68 at 32-true), times L layers, plus the logits, 10 b s V bytes (16-bit
    logits, their fp32 copy for the loss, its gradient; 12 at 32-true). b = data.batch_size, s = data.block_size,
    h = hidden size, V = vocabulary. A dense-transformer estimate: MoE experts' and Pattention's own intermediates
    are not modelled.

Trainable parameters: all, and, where a config section declares LoRA (an int `lora_r` / `lora_rank` / `rank` >= 1
next to a list `lora_target_modules` / `lora_targets` / `targets`; a `finetune` key other than `lora` switches it
off), also the LoRA case: r (d_in + d_out) per targeted Linear, plus num_null_experts x d router rows per MoE
layer (AdaMoE's null gates, fully trained) where the section has `num_null_experts`. Both are printed.

The GPU memory is `--gpu-mem` GiB, else the first CUDA device's when there is one, else 80. "fits" compares the
total with it; the CUDA context, allocator fragmentation and communication buffers (about 1-3 GiB) are not in it.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

GIB = 2 ** 30
SIXTEEN_BIT = ("bf16-mixed", "16-mixed", "bf16-true", "16-true", "transformer-engine")
HALF_WEIGHTS = ("bf16-true", "16-true")
LORA_RANK_KEYS = ("lora_r", "lora_rank", "rank")
LORA_TARGET_KEYS = ("lora_target_modules", "lora_targets", "targets")


@dataclass
class ModelFacts:
    """What the plan needs of a model, read off its meta-device build."""

    description: str
    total: int  # Psi: distinct parameters (a tied head once)
    active: int  # per token (MoE: k of E experts)
    largest_module: int  # parameters of the largest single module (its own, not its children's)
    largest_unit: int  # parameters of the largest FSDP2 unit (a decoder layer, or the root's remainder)
    hidden: int
    layers: int
    vocab: int
    linear_shapes: Dict[str, List[List[int]]] = field(default_factory=dict)  # Linear leaf name -> [d_in, d_out]
    moe_layers: int = 0


@dataclass
class Trainable:
    label: str
    count: int
    detail: str = ""


@dataclass
class Row:
    """One per-GPU estimate, bytes."""

    label: str
    trainable: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    @property
    def model_states(self) -> int:
        return self.parameters + self.gradients + self.optimizer


# ------------------------------------------------------------------------------------------------- model


def model_spec(cfg: DictConfig):
    """The ModelSpec of `model.*`: a paper size keeps its published vocabulary and positions; any other size
    takes data.vocab_size and data.block_size, as an embedded tokenizer would give."""
    from models.factory import ModelSpec
    from models.paper_sizes import PAPER_SIZES, paper_spec

    overrides = OmegaConf.to_container(cfg.model.overrides, resolve=True) or {}
    arch, size = cfg.model.arch, cfg.model.size
    if size in PAPER_SIZES.get(arch, {}):
        return paper_spec(arch, size, overrides)
    return ModelSpec(arch=arch, size=size, vocab_size=int(cfg.data.vocab_size), max_seq_len=int(cfg.data.block_size),
                     overrides=dict(overrides))


def model_facts(cfg: DictConfig) -> ModelFacts:
    """Parameters, largest module / FSDP unit, width, depth and vocabulary of `model.*`, built on the meta
    device."""
    import torch

    from models.paper_sizes import build_on_meta, parameter_counts

    spec = model_spec(cfg)
    try:
        model = build_on_meta(spec)
    except Exception as e:  # transformers' config validation raises many types
        raise ConfigError(f"plan: cannot build model.arch={spec.arch} model.size={spec.size} on the meta device: "
                          f"{type(e).__name__}: {e}") from None
    counts = parameter_counts(model)
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    layer_lists = [m for name, m in model.named_modules()
                   if isinstance(m, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")]
    in_layers = {id(p) for lst in layer_lists for p in lst.parameters()}
    units = [sum(p.numel() for p in layer.parameters()) for lst in layer_lists for layer in lst]
    root = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in in_layers)
    cfg_obj = getattr(model, "config", None)
    hidden = int(getattr(cfg_obj, "hidden_size", 0) or 0)
    layers = int(getattr(cfg_obj, "num_hidden_layers", 0) or getattr(cfg_obj, "num_layers", 0) or 0)
    vocab = int(model.get_input_embeddings().weight.shape[0]) if hasattr(model, "get_input_embeddings") else 0
    shapes: Dict[str, List[List[int]]] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            shapes.setdefault(name.split(".")[-1], []).append([m.in_features, m.out_features])
    moe_layers = sum(1 for name, _ in model.named_modules() if name.endswith(".experts"))
    desc = f"{spec.arch}/{spec.size}"
    return ModelFacts(description=desc, total=counts["total"], active=counts["active"],
                      largest_module=int(largest_module), largest_unit=int(max(units + [root])), hidden=hidden,
                      layers=layers, vocab=vocab, linear_shapes=shapes, moe_layers=moe_layers)


def lora_trainable(cfg: DictConfig, facts: ModelFacts) -> Optional[Trainable]:
    """The LoRA case declared by a config section (module docstring), or None."""
    for section in cfg.keys():
        node = cfg[section]
        if not isinstance(node, DictConfig):
            continue
        keys = set(node.keys())
        rank_key = next((k for k in LORA_RANK_KEYS if k in keys and isinstance(node[k], int)
                         and not isinstance(node[k], bool) and node[k] >= 1), None)
        target_key = next((k for k in LORA_TARGET_KEYS if k in keys and OmegaConf.is_list(node[k])), None)
        if rank_key is None or target_key is None:
            continue
        if "finetune" in keys and node["finetune"] != "lora":
            continue
        r, targets = int(node[rank_key]), [str(t) for t in node[target_key]]
        count = sum(r * (d_in + d_out) for t in targets for d_in, d_out in facts.linear_shapes.get(t, []))
        detail = f"LoRA r={r} on {','.join(targets)} ({section}.{rank_key})"
        nulls = node["num_null_experts"] if "num_null_experts" in keys else 0
        if nulls and facts.moe_layers:
            count += int(nulls) * facts.hidden * facts.moe_layers
            detail += f" + {nulls} null-expert gate rows x {facts.moe_layers} MoE layers"
        return Trainable(f"LoRA (r={r})", count, detail)
    return None


# ------------------------------------------------------------------------------------------------- memory


def model_state_bytes(strategy: str, precision: str, total: int, trainable: int, world: int, largest_module: int,
                      largest_unit: int, offload_optimizer: bool = False, offload_parameters: bool = False,
                      gradient_as_bucket_view: bool = True, reshard_after_forward: bool = True) -> Dict[str, int]:
    """Per-GPU bytes of parameters, gradients and optimizer states (module docstring)."""
    n, t = world, trainable
    half = precision in SIXTEEN_BIT
    # A gathered module's gradient exists only when it is trained: with LoRA the large frozen modules have
    # none (the adapters' own are negligible), so that term is 0.
    full = trainable >= total
    if strategy in ("deepspeed_stage_2", "deepspeed_stage_3"):
        p16, g, o = (2, 6, 12) if half else (4, 4, 8)
        if half and strategy == "deepspeed_stage_3":
            g = 4  # DeepSpeed's ZeRO-3 estimate: 18 bytes per parameter over the ranks, 2 + 4 + 12
        if strategy == "deepspeed_stage_2":
            params = p16 * total
            grads, opt = (0, 0) if offload_optimizer else (g * t // n, o * t // n)
        else:
            gathered = p16 * largest_module
            params = gathered if offload_parameters else p16 * total // n + gathered
            grads = (gathered if full else 0) + (0 if offload_optimizer else g * t // n)
            opt = 0 if offload_optimizer else o * t // n
        return {"parameters": params, "gradients": grads, "optimizer": opt}
    w = 2 if precision in HALF_WEIGHTS else 4
    if strategy == "fsdp2":
        gathered = w * (total if not reshard_after_forward else largest_unit)
        return {"parameters": w * total // n + gathered, "gradients": w * t // n + (w * largest_unit if full else 0),
                "optimizer": 2 * w * t // n}
    # ddp, auto (one device, or Lightning's default data parallelism): full replicas
    bucket = 1 if (gradient_as_bucket_view or strategy == "auto") else 2
    return {"parameters": w * total, "gradients": bucket * w * t, "optimizer": 2 * w * t}


def activation_bytes(precision: str, batch: int, seq: int, hidden: int, layers: int, vocab: int) -> int:
    half = precision in SIXTEEN_BIT
    per_layer = (34 if half else 68) * batch * seq * hidden
    return layers * per_layer + (10 if half else 12) * batch * seq * vocab


def effective_precision(setting: str) -> str:
    """`auto` is bf16-mixed on the GPUs a plan is for (recipes.engine.strategies.resolve_precision)."""
    return "bf16-mixed" if setting == "auto" else ("32-true" if setting == "32" else setting)


@dataclass
class Plan:
    recipe: str
    model: str
    strategy: str
    precision: str
    nodes: int
    gpus_per_node: int
    micro_batch: int
    seq_len: int
    accumulate: int
    facts: Dict[str, Any]
    rows: List[Dict[str, Any]]
    gpu_mem_gib: float
    notes: List[str]


def make_plan(cfg: DictConfig, nodes: int, gpus: int, gpu_mem_gib: float,
              facts: Optional[ModelFacts] = None) -> Plan:
    t = cfg.trainer
    facts = facts or model_facts(cfg)
    precision = effective_precision(t.precision)
    world = nodes * gpus
    options = dict(offload_optimizer=bool(t.deepspeed.offload_optimizer),
                   offload_parameters=bool(t.deepspeed.offload_parameters),
                   gradient_as_bucket_view=bool(t.ddp.gradient_as_bucket_view),
                   reshard_after_forward=bool(t.fsdp2.reshard_after_forward))
    acts = activation_bytes(precision, int(cfg.data.batch_size), int(cfg.data.block_size), facts.hidden,
                            facts.layers, facts.vocab)
    cases = [Trainable("all parameters trained", facts.total)]
    lora = lora_trainable(cfg, facts)
    if lora is not None:
        cases.insert(0, lora)
    rows = []
    for case in cases:
        states = model_state_bytes(t.strategy, precision, facts.total, case.count, world, facts.largest_module,
                                   facts.largest_unit, **options)
        row = Row(case.label, case.count, activations=acts, **states)
        rows.append({**asdict(row), "total": row.total, "model_states": row.model_states, "detail": case.detail,
                     "fits": row.total <= gpu_mem_gib * GIB})
    notes = []
    if t.strategy == "auto" and world > 1:
        notes.append("trainer.strategy=auto with several devices: Lightning picks DDP (full replicas).")
    if cfg.model.pretrained:
        notes.append(f"model.pretrained={cfg.model.pretrained}: the plan uses the architecture of model.arch / "
                     f"model.size ({facts.description}); it must be that checkpoint's.")
    return Plan(recipe=cfg.run.name, model=facts.description, strategy=t.strategy, precision=precision, nodes=nodes,
                gpus_per_node=gpus, micro_batch=int(cfg.data.batch_size), seq_len=int(cfg.data.block_size),
                accumulate=int(t.accumulate_grad_batches), facts=asdict(facts) | {"linear_shapes": {}}, rows=rows,
                gpu_mem_gib=gpu_mem_gib, notes=notes)


# ------------------------------------------------------------------------------------------------- output


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_plan(plan: Plan) -> str:
    f = plan.facts
    moe = f" ({_count(f['active'])} active per token)" if f["active"] != f["total"] else ""
    world = plan.nodes * plan.gpus_per_node
    lines = [
        f"recipe {plan.recipe}: {plan.model}, {_count(f['total'])} parameters{moe}; hidden {f['hidden']}, "
        f"{f['layers']} layers, vocabulary {f['vocab']}",
        f"strategy {plan.strategy}, precision {plan.precision}, {plan.nodes} node(s) x {plan.gpus_per_node} GPU(s) = "
        f"{world} rank(s); micro-batch {plan.micro_batch} x {plan.seq_len} tokens, accumulation {plan.accumulate} "
        f"(global batch {plan.micro_batch * plan.accumulate * world} sequences)",
        f"largest module {_count(f['largest_module'])} parameters (ZeRO-3 gathers it whole), largest FSDP2 unit "
        f"{_count(f['largest_unit'])}",
        "",
        f"per GPU, GiB                   {'trainable':>10} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} "
        f"{'total':>8}  fits {plan.gpu_mem_gib:g} GiB",
    ]
    for r in plan.rows:
        share = f"{r['trainable'] / f['total']:.3%}" if r["trainable"] != f["total"] else "100%"
        lines.append(f"  {r['label']:<29}{_count(r['trainable']):>10} "
                     + " ".join(f"{r[k] / GIB:8.2f}" for k in ("parameters", "gradients", "optimizer", "activations",
                                                               "total"))
                     + f"  {'yes' if r['fits'] else 'NO'}")
        if r["detail"]:
            lines.append(f"    {r['detail']}: {share} of the parameters")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append("formulas: recipes/engine/plan.py (model states as DeepSpeed's estimators count them; activations "
                 "34 b s h L + 10 b s V bytes at 16-bit)")
    return "\n".join(lines)


def detected_gpu_mem_gib() -> float:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GIB
    except Exception:  # noqa: BLE001 - a broken CUDA set-up: fall back to the default
        pass
    return 80.0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .config import load_config

    parser = argparse.ArgumentParser(prog="python -m recipes plan",
                                     description="Per-GPU memory of a recipe under its strategy (meta device).")
    parser.add_argument("recipe")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node")
    parser.add_argument("--gpu-mem", type=float, default=None,
                        help="GiB per GPU (default: the first CUDA device's, else 80)")
    parser.add_argument("--json", action="store_true", help="print the plan as one line of JSON")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.nodes < 1 or args.gpus < 1:
            raise ConfigError(f"plan: --nodes and --gpus must be >= 1, got {args.nodes} and {args.gpus}.")
        cfg = load_config(args.recipe, list(args.overrides) + [f"trainer.num_nodes={args.nodes}",
                                                               f"trainer.devices={args.gpus}"])
        gpu_mem = args.gpu_mem if args.gpu_mem is not None else detected_gpu_mem_gib()
        plan = make_plan(cfg, args.nodes, args.gpus, gpu_mem)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(plan)) if args.json else format_plan(plan))  # JSON on one line, the last
    return 0
