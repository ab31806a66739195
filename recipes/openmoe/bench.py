"""OpenMoE routing-analysis benchmarks on the `openmoe` tiny model (random weights: speed does not depend on
training): the routing-probe callback's step-time overhead at its default interval, and `make analyze`
throughput (tokens/s through the model with the probe attached, plus the per-checkpoint report)."""
from __future__ import annotations

import statistics
import time

import torch

from bench import register

VOCAB, BATCH, SEQ = 4096, 16, 128


class _OneThread:
    """torch on one thread while timing: process CPU time is then the work done, without the OpenMP worker
    spin-waits that multi-threaded CPU time attributes to whichever call comes next."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def _model():
    from models.openmoe import OPENMOE_SIZES, OpenMoEConfig, OpenMoEForCausalLM

    torch.manual_seed(0)
    return OpenMoEForCausalLM(OpenMoEConfig(vocab_size=VOCAB, max_position_embeddings=SEQ, **OPENMOE_SIZES["tiny"]))


@register("openmoe_probe_overhead", "OpenMoE tiny (16x128 tokens/step, CPU): training step time with and without "
          "the routing-probe callback's work (hooks on the step's forward + scalars, and + the two W&B figures), "
          "process CPU time, interleaved; overhead at the default interval every_n_steps=50 (target < 5%).")
def openmoe_probe_overhead() -> dict:
    with _OneThread():
        return _probe_overhead()


def _probe_overhead() -> dict:
    from models.moe import collect_moe_aux_losses
    from models.routing_probe import RoutingProbe, plots
    from recipes.engine.routing_callback import RoutingProbeConfig, probe_metrics

    interval = RoutingProbeConfig().every_n_steps
    model = _model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    domains = torch.randint(0, 3, (BATCH,))

    def step() -> None:
        out = model(input_ids=ids, labels=ids)
        aux = collect_moe_aux_losses(model)
        (out.loss + 0.01 * aux["lb"] + 1e-3 * aux["z"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def probed_step(figures: bool) -> None:
        probe = RoutingProbe(model, position_buckets=8, max_positions=SEQ, min_token_count=5,
                             vocab_size=VOCAB).attach()
        probe.set_domains(domains, ["a", "b", "c"])
        step()
        probe.detach()
        result = probe_metrics(probe.stats, probe.layers, 5)
        if figures:
            import tempfile
            from pathlib import Path

            d = Path(tempfile.mkdtemp())
            names = [f"layer {n}" for n in probe.layers]
            plots.save_png(plots.load_heatmap(result["load"], names), d / "a.png")
            plots.save_png(plots.drop_rate_plot(dict(zip(names, result["curves"].values()))), d / "b.png")

    def timed(fn, *args) -> float:
        # Process CPU time (all threads): far less sensitive than wall time to other jobs on shared cores.
        t = time.process_time()
        fn(*args)
        return time.process_time() - t

    step()
    probed_step(True)  # warm-up (first matplotlib figure is slow)
    plain, probed, with_figs = [], [], []
    for _ in range(6):  # interleaved so background load hits all three alike
        plain.append(timed(step))
        probed.append(timed(probed_step, False))
        with_figs.append(timed(probed_step, True))
    # Median CPU time over the interleaved repetitions.
    t_plain, t_probe, t_figs = (statistics.median(x) for x in (plain, probed, with_figs))
    over = max(t_probe - t_plain, 0.0) / (interval * t_plain)
    over_figs = max(t_figs - t_plain, 0.0) / (interval * t_plain)
    return {"step_s": round(t_plain, 4), "probed_step_s": round(t_probe, 4),
            "probed_step_with_figures_s": round(t_figs, 4), "every_n_steps": interval,
            "timer": "process CPU seconds on 1 torch thread, median of 6 interleaved repetitions",
            "overhead_pct_at_default_interval": round(100 * over, 3),
            "overhead_pct_with_figures": round(100 * over_figs, 3),
            "target_pct": 5.0, "meets_target": bool(over_figs < 0.05)}


@register("openmoe_analysis_throughput", "make analyze on the OpenMoE tiny model: tokens per CPU second of eval "
          "forwards with the routing probe attached (+ per-checkpoint report) vs plain eval forwards, 64 x 128 tokens.")
def openmoe_analysis_throughput() -> dict:
    with _OneThread():
        return _analysis_throughput()


def _analysis_throughput() -> dict:
    from recipes.openmoe.analyze import checkpoint_report, parse_options, probe_checkpoint

    model = _model().eval()
    n_blocks = 64
    ids = torch.randint(0, VOCAB, (n_blocks, SEQ))
    domains = torch.arange(n_blocks) % 3
    opts = parse_options([])

    def plain() -> float:
        t = time.process_time()
        with torch.no_grad():
            for s in range(0, n_blocks, opts["batch_size"]):
                model(input_ids=ids[s:s + opts["batch_size"]])
        return time.process_time() - t

    def analysed() -> float:
        t = time.process_time()
        stats, layers, *_ = probe_checkpoint(model, ids, domains, ["a", "b", "c"], opts, VOCAB)
        checkpoint_report(stats, None, opts)
        return time.process_time() - t

    plain(), analysed()  # warm-up
    p, a = [], []
    for _ in range(3):
        p.append(plain())
        a.append(analysed())
    tp, ta = statistics.median(p), statistics.median(a)  # process CPU seconds (shared machine)
    tokens = n_blocks * SEQ
    return {"plain_eval_tokens_per_cpu_s": round(tokens / tp, 1), "analysis_tokens_per_cpu_s": round(tokens / ta, 1),
            "analysis_vs_plain": round(tp / ta, 3), "timer": "process CPU seconds on 1 torch thread, median of 3"}
