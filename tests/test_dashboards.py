"""Dashboards and reports (recipes/engine/panels.py, dashboard.py, report.py) against real tiny runs.

Every registered recipe is trained for a few steps here (staged recipes at their smallest settings), and every
non-optional panel's keys are checked against what that run actually wrote: the metrics.csv columns and
summary.json entries of the run directory and of its sub-runs, read here with the csv and json modules.
The W&B workspace specs are built with the network switched off; nothing here talks to W&B.
"""
from __future__ import annotations

import csv
import fnmatch
import json
import math
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from recipes.engine.config import load_config
from recipes.engine.dashboard import build_spec, read_spec, to_workspace
from recipes.engine.dashboard import main as dashboard_main
from recipes.engine.panels import Panel, markdown_table, panels_for
from recipes.engine.recipe import get_recipe, recipe_names
from recipes.engine.report import heatmap_matrix, line_series, load_runs, read_run, report
from recipes.engine.report import main as report_main
from recipes.engine.runs import load_run_config
from tests.conftest import ROOT

ARC = ROOT / "tests" / "fixtures" / "arc_tiny.jsonl"
# 4 steps of 2 x 32 tokens, a validation every 2 steps, every step logged.
SMALL = ["data.batch_size=2", "data.block_size=32", "trainer.max_steps=4", "trainer.val_check_interval=2",
         "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=1000",
         "optim.warmup_steps=1"]
FUSECHAT = ["fusechat.pivot={name: pivot, tokenizer: bpe, vocab_size: 400, steps: 2}",
            "fusechat.sources=[{name: uni, tokenizer: unigram, vocab_size: 500, steps: 2, domains: [stdlib], "
            "block_size: 64}, {name: bpe2, tokenizer: bpe, vocab_size: 450, steps: 2, domains: [licenses]}]",
            "fusechat.num_blocks=16", "fusechat.shard_blocks=8", "fusechat.represent_batch_size=4",
            "fusechat.target_steps=2", "fusechat.eval_max_blocks=8", "fusechat.compare_merge_methods=[task_arithmetic]"]
# twin.protocol=custom: the paper protocol's values except the short router schedule set here
TWIN = ["twin.base_steps=3", "twin.finetune_steps=2", "twin.eval_batches=1", "twin.protocol=custom",
        "twin.router_epochs=3", "twin.router_train_blocks=32", "data.domains=[pydoc,stdlib]"]


class RealRuns:
    """Tiny real runs of every recipe, trained on first use and shared by the tests of this module."""

    def __init__(self, root: Path, data_cache: str):
        self.root = root
        self.base = [f"run.root={root}", f"data.cache_dir={data_cache}", "logging.wandb=disabled",
                     "trainer.progress_bar=false", "data.max_chars_per_domain=60000"] + SMALL
        self.done = {}

    def train(self, recipe: str, run_id: str, extra=()) -> Path:
        from recipes.engine.loop import train

        if run_id not in self.done:
            self.done[run_id] = train(load_config(recipe, self.base + list(extra) + [f"run.run_id={run_id}"]))
        return self.done[run_id]

    def export(self, recipe: str, run_id: str) -> Path:
        from recipes.engine.export import export

        run_dir = self.train(recipe, run_id)
        return run_dir / "export" if (run_dir / "export").is_dir() else export(run_dir)

    def same_null_experts(self, run_id: str):
        """The adamoe.* overrides that match an adamoe run's retrofit (a fine-tune of its export needs them)."""
        c = load_run_config(self.train("adamoe", run_id)).adamoe
        return [f"adamoe.num_null_experts={c.num_null_experts}", f"adamoe.top_k={c.top_k}"]

    def get(self, recipe: str) -> Path:
        builders = {
            "tiny": lambda: self.train("tiny", "tiny"),
            "tiny_moe": lambda: self.train("tiny_moe", "tiny_moe"),
            "adamoe": lambda: self.train("adamoe", "adamoe"),
            "openmoe": lambda: self.train("openmoe", "openmoe", ["routing_probe.every_n_steps=2"]),
            "tokenformer": lambda: self.train("tokenformer", "tokenformer", ["model.size=tiny"]),
            "tokenformer_grow": lambda: self.train("tokenformer_grow", "tokenformer_grow", [
                f"tokenformer_grow.from_run={self.get('tokenformer')}", "tokenformer_grow.qkv_tokens=64",
                "tokenformer_grow.ffn_tokens=256", "tokenformer_grow.eval_batches=2"]),
            "adamoe_finetune": lambda: self.train("adamoe_finetune", "adamoe_finetune", [
                f"model.pretrained={self.export('adamoe', 'adamoe')}", *self.same_null_experts("adamoe"),
                f"adamoe_finetune.train_file={ARC}",
                f"adamoe_finetune.eval_file={ARC}", "adamoe.lora_r=2", "data.block_size=16",
                "data.val_fraction=0.25"]),
            "twin_lora_ft": lambda: self.train("twin_lora_ft", "twin_lora_ft", [
                f"model.pretrained={self.export('tiny', 'tiny')}"]),
            "twin_merging": lambda: self.train("twin_merging", "twin_merging", TWIN),
            "twin_merging_cls": lambda: self.train("twin_merging_cls", "twin_merging_cls", TWIN[:-1]),
            "fusechat": lambda: self.train("fusechat", "fusechat", FUSECHAT),
        }
        if recipe not in builders:
            raise KeyError(recipe)
        return builders[recipe]()

    BUILT = ("tiny", "tiny_moe", "adamoe", "openmoe", "tokenformer", "tokenformer_grow", "adamoe_finetune",
             "twin_lora_ft", "twin_merging", "twin_merging_cls", "fusechat")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    return RealRuns(tmp_path_factory.mktemp("dashboard_runs"), data_cache)


def _written(run_dir: Path):
    """(metrics.csv columns holding a value, summary.json keys, the run's own summary) of a run directory and
    its sub-runs (direct subdirectories with either file), read with the csv and json modules."""
    columns, summary_keys = set(), set()
    dirs = [run_dir] + [p for p in run_dir.iterdir() if p.is_dir()]
    for d in dirs:
        if (d / "metrics.csv").is_file():
            with open(d / "metrics.csv") as f:
                for row in csv.DictReader(f):
                    columns |= {k for k, v in row.items() if v not in ("", None) and k != "step"}
        if (d / "summary.json").is_file():
            summary_keys |= set(json.loads((d / "summary.json").read_text()))
    own = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    return columns, summary_keys, own


def _dotted(data, path):
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


# What the issue asks each recipe's panels to show (beyond the losses and throughput of every recipe).
REQUIRED_KEYS = {
    "adamoe": {"moe/true_experts_per_token", "val/moe_true_experts_per_token", "moe/share_true_experts_*",
               "val/moe_share_true_experts_*"},
    "openmoe": {"moe/specialisation_token_id", "moe/drop_rate", "moe/drop_rate_last_bucket",
                "moe/load_max_over_ideal", "moe/load/l*_e*", "val/moe_drop_fraction", "analysis/load_heatmap"},
    "tokenformer_grow": {"grow/val_loss_before", "grow/val_loss_after", "grow/total_tokens_seen"},
    "fusechat": {"fusechat/val_loss/pivot/all", "fusechat/val_loss/merged_sce/all", "fusion/clm"},
    "twin_merging": {"twin/normalised_mean/twin_merging", "twin/normalised_mean/ties", "twin/test_loss"},
}
EVERY_RECIPE = {"train/loss", "val/loss", "val/loss_*", "train/lr", "perf/tokens_per_sec", "perf/mfu",
                "perf/gpu_mem_*"}


def _same_panels(name: str, built: str) -> bool:
    """`name` shows what `built` shows: the same panel list or function, and for a recipe without panels of
    its own the same training code (stages, module, model preparation), so the same keys are logged."""
    a, b = get_recipe(name), get_recipe(built)
    if a.panels:
        return a.panels is b.panels
    return not b.panels and (a.stages, a.module_cls, a.prepare_model) == (b.stages, b.module_cls, b.prepare_model)


def test_every_registered_recipe_is_covered_by_a_real_run():
    """A recipe trained here, or one that shows the same panels as such a recipe (e.g. the paper-scale settings
    of a method, whose panels are those of the method's small recipe)."""
    assert set(RealRuns.BUILT) <= set(recipe_names())
    uncovered = [name for name in recipe_names() if name not in RealRuns.BUILT
                 and not any(_same_panels(name, built) for built in RealRuns.BUILT)]
    assert not uncovered, (f"recipes {uncovered}: give them panels (Recipe.panels) and a tiny real run in "
                           "tests/test_dashboards.py RealRuns")


# FuseChat's smallest real run trains three tokenizers and six models (30 s on an idle 2-core machine, 90 s and
# more on a busy one): slow. The fast suite still builds its workspace spec (test_workspace_spec_builds_*).
SLOW = ("fusechat",)


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW else r
                                    for r in RealRuns.BUILT])
def test_panel_keys_are_what_a_real_run_writes(runs, recipe):
    run_dir = runs.get(recipe)
    cfg = load_run_config(run_dir)
    panels = panels_for(recipe, cfg)
    keys = {k for p in panels for k in p.keys}
    assert EVERY_RECIPE | REQUIRED_KEYS.get(recipe, set()) <= keys
    if recipe.startswith("adamoe"):  # the share of tokens using each number of true experts, 0..top_k
        assert {f"moe/share_true_experts_{i}" for i in range(cfg.adamoe.top_k + 1)} <= keys
    gpu_only = [p for p in panels if set(p.keys) & {"perf/mfu", "perf/gpu_mem_*"}]
    assert len(gpu_only) == 2 and all(p.optional for p in gpu_only)  # absent from these CPU runs

    columns, summary_keys, own = _written(run_dir)
    wrong = []
    for p in panels:
        if p.optional:
            continue
        if p.kind in ("line", "heatmap"):
            wrong += [f"{p.title}: {k} (history)" for k in p.keys + (p.x,)
                      if not fnmatch.filter(sorted(columns), k)]
        elif p.kind in ("bar", "scalar"):
            wrong += [f"{p.title}: {k} (summary)" for k in p.keys if k not in summary_keys]
        elif p.kind == "table":
            table = _dotted(own, p.table) if p.table else None
            if not (isinstance(table, dict) and table and all(isinstance(v, dict) for v in table.values())):
                wrong.append(f"{p.title}: summary.json {p.table}")
        else:
            wrong += [f"{p.title}: {f}" for f in p.files if not list(run_dir.glob(f))]
    assert not wrong, f"{recipe}: panel keys no real run wrote: {wrong}"


def test_openmoe_analysis_panel_names_the_files_analyze_writes(runs):
    from recipes.openmoe.analyze import analyze

    run_dir = runs.get("openmoe")
    analyze(run_dir, ["max_blocks=6", "wandb=false", "batch_size=6"], progress=False)
    panel = next(p for p in panels_for("openmoe", load_run_config(run_dir)) if p.section == "analysis"
                 and p.kind == "image")
    written = {p.stem for p in (run_dir / "analysis").glob("*.png")}
    assert written and {p.stem for f in panel.files for p in run_dir.glob(f)} == written
    assert set(panel.keys) == {f"analysis/{name}" for name in written}  # the W&B images analyze logs


def _network_off(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the dashboard spec tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("recipe", recipe_names())
def test_workspace_spec_builds_without_network(monkeypatch, recipe):
    _network_off(monkeypatch)
    spec = json.loads(json.dumps(build_spec(recipe, project="proj")))  # JSON-ready
    panels = panels_for(recipe, load_config(recipe, []))
    titles = [e["args"].get("title") or e["args"].get("table_name") for s in spec["sections"] for e in s["panels"]]
    for p in panels:
        shown = (p.title in titles) or (p.kind == "table" and bool(p.keys) and all(k in titles for k in p.keys))
        assert shown == (not p.local_only and bool(p.keys)), p.title
    assert set(spec["report_only"]) == {p.title for p in panels if p.local_only or not p.keys}
    lines = [e["args"] for s in spec["sections"] for e in s["panels"] if e["type"] == "LinePlot"]
    assert lines and all(a["x"] == "train/tokens_seen" for a in lines)
    assert spec["tags"] == RUN_TAGS.get(recipe, [get_recipe(recipe).method])
    model = to_workspace(spec, "someone")._to_model()  # wandb_workspaces accepts every panel, offline
    dumped = json.dumps(model.model_dump(by_alias=True, exclude_none=True))
    assert '"proj"' in dumped and "train/tokens_seen" in dumped
    regex = next((a["metric_regex"] for a in lines if a["title"] == "validation loss per domain"), None)
    assert re.fullmatch(regex, "val/loss_pydoc") and not re.fullmatch(regex, "val/loss")


# The runs a workspace shows: those tagged with the method (all its recipes and their sub-runs), the engine's
# own recipes by name (every sub-run of `tiny` carries the method tag "engine").
# `make analyze` logs to a W&B run of its own, tagged "analyze".
RUN_TAGS = {"tiny": ["tiny"], "tiny_moe": ["tiny_moe"], "adamoe": ["adamoe"], "adamoe_finetune": ["adamoe"],
            "openmoe": ["openmoe", "analyze"], "tokenformer": ["tokenformer"], "tokenformer_grow": ["tokenformer"],
            "fusechat": ["fusechat"], "twin_merging": ["twin_merging"], "twin_lora_ft": ["twin_merging"],
            "twin_merging_cls": ["twin_merging"]}


def test_dashboard_command_offline_writes_the_spec_and_says_how_to_push(tmp_path, monkeypatch, capsys):
    _network_off(monkeypatch)
    out = tmp_path / "adamoe.json"
    assert dashboard_main(["adamoe", "--project", "myproj", "--out", str(out)]) == 0  # WANDB_MODE=offline
    printed = capsys.readouterr().out
    assert "WANDB_MODE=offline" in printed and "make dashboard RECIPE=adamoe PROJECT=myproj" in printed
    spec = read_spec(out)
    assert spec["recipe"] == "adamoe" and spec["project"] == "myproj"
    # overrides change the config the panels follow from: top-2 -> shares of 0..2 true experts
    assert dashboard_main(["adamoe", "adamoe.top_k=2", "--out", str(tmp_path / "k2.json")]) == 0
    bars = [e["args"]["metrics"] for s in read_spec(tmp_path / "k2.json")["sections"] for e in s["panels"]
            if e["type"] == "BarPlot"]
    assert ["moe/share_true_experts_0", "moe/share_true_experts_1", "moe/share_true_experts_2"] in bars
    # a saved spec is pushed by passing its path; offline it is written again
    assert dashboard_main([str(out), "--out", str(tmp_path / "again.json")]) == 0
    assert read_spec(tmp_path / "again.json")["sections"] == spec["sections"]
    capsys.readouterr()
    assert dashboard_main(["adamo", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Did you mean 'adamoe'" in err
    assert dashboard_main([str(tmp_path / "missing.json")]) == 2


def test_dashboard_with_a_key_but_no_server_falls_back_quickly(tmp_path, monkeypatch, capsys):
    """Logged in (an API key) but the server does not answer: detected at once, the spec is written."""
    with socket.socket() as s:  # a local port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    assert dashboard_main(["tiny", "--out", str(tmp_path / "tiny.json")]) == 0
    assert time.monotonic() - start < 10
    assert f"127.0.0.1:{port} is not reachable" in capsys.readouterr().out
    assert (tmp_path / "tiny.json").is_file()
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert dashboard_main(["tiny", "--out", str(tmp_path / "t2.json")]) == 0
    assert "not logged in" in capsys.readouterr().out


def _csv_rows(path: Path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_of_a_real_adamoe_run(runs, tmp_path, capsys):
    run_dir = runs.get("adamoe")
    assert report_main([str(run_dir)]) == 0
    out = run_dir / "report"
    page = (out / "report.html").read_text()
    panels = panels_for("adamoe", load_run_config(run_dir))
    for i, p in enumerate(panels, 1):
        png = next(out.glob(f"{i:02d}_*.png"), None)
        if p.kind in ("line", "heatmap", "bar") and not p.optional:
            assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p.title
            assert f"src='{png.name}'" in page
        if p.optional and p.keys[0].startswith(("moe/spec", "moe/drop_rate", "perf/mfu", "perf/gpu_mem")):
            assert png is None  # a CPU run without the routing probe: no such keys
    printed = capsys.readouterr().out
    assert "skipped: model FLOPs utilisation: no perf/mfu in metrics.csv (optional" in printed
    assert "no perf/mfu in metrics.csv" in page
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{summary['val/loss']:.4g}" in page and f"{summary['moe/flops_vs_topk']:.4g}" in page

    # the heatmap is the last logged row of moe/load/l<layer>_e<expert>, layers x experts
    rows = [r for r in _csv_rows(run_dir / "metrics.csv") if r.get("moe/load/l0_e0")]
    last = rows[-1]
    cells = [re.fullmatch(r"moe/load/l(\d+)_e(\d+)", k) for k in last]
    cells = [(int(m.group(1)), int(m.group(2))) for m in cells if m]
    own, _ = load_runs(run_dir)
    step, layers, experts, matrix = heatmap_matrix("moe/load/l*_e*", own)
    assert step == int(last["step"]) and len(cells) == len(layers) * len(experts) > 1
    assert layers == list(range(max(c[0] for c in cells) + 1)) and experts == list(range(max(c[1] for c in cells) + 1))
    for layer in layers:
        assert matrix[layer] == [float(last[f"moe/load/l{layer}_e{e}"]) for e in experts]
        assert math.isclose(sum(matrix[layer]), 1.0, rel_tol=1e-4)  # shares of the layer's selections


def test_report_of_a_grown_tokenformer_counts_the_source_run_tokens(runs, tmp_path):
    run_dir = runs.get("tokenformer_grow")
    source = runs.get("tokenformer")
    scratch = runs.get("tiny")  # any other run stands in for a from-scratch baseline
    page, rendered = report(run_dir, out_dir=tmp_path / "rep", compare=[scratch])
    growth = next(r for r in rendered if r.panel.x_offset)
    assert growth.png is not None and growth.png.is_file() and not growth.skipped
    source_tokens = json.loads((source / "summary.json").read_text())["tokens_seen"]
    assert source_tokens == 4 * 2 * 32
    own, series = load_runs(run_dir, [scratch])
    curves, missing = line_series(growth.panel, series + [read_run(source, dashed=True)])
    assert not missing
    by_run = {run.path: xs for _, run, xs, _ in curves}
    grown_val = [float(r["train/tokens_seen"]) for r in _csv_rows(run_dir / "metrics.csv") if r["val/loss"]]
    assert by_run[run_dir] == [source_tokens + t for t in grown_val]  # shifted by the source run's tokens
    assert by_run[source] == [float(r["train/tokens_seen"]) for r in _csv_rows(source / "metrics.csv")
                              if r["val/loss"]]
    assert by_run[scratch][0] < source_tokens  # the compared run is not shifted
    assert "compare: tiny" in page.read_text()
    bars = next(r for r in rendered if r.panel.title == "validation loss just before and after growth")
    assert bars.png is not None and not bars.missing


def test_missing_keys_are_reported_not_crashed(runs, tmp_path):
    run_dir = runs.get("tiny")
    panels = [Panel("nothing like it", "line", ("nope/x",)),
              Panel("half there", "line", ("train/loss", "nope/y")),
              Panel("no bar", "bar", ("nope/z",)),
              Panel("no table", "table", table="nope.path"),
              Panel("no images", "image", files=("nope*.png",)),
              Panel("no heatmap", "heatmap", ("moe/load/l*_e*",), optional=True, note="MoE only")]
    page, rendered = report(run_dir, out_dir=tmp_path / "rep", panels=panels)
    skipped = {r.panel.title: r.skipped for r in rendered}
    assert skipped["nothing like it"] == "no nope/x in metrics.csv"
    assert skipped["half there"] == "" and next(r for r in rendered if r.panel.title == "half there").missing \
        == ["nope/y"]
    assert skipped["no bar"] == "no nope/z in summary.json"
    assert skipped["no table"] == "no summary.json entry `nope.path`"
    assert skipped["no images"] == "no nope*.png in the run directory"
    assert skipped["no heatmap"] == "no moe/load/l*_e* in metrics.csv (optional: MoE only)"
    html = page.read_text()
    assert "skipped: no nope/x in metrics.csv" in html and "not in this run: nope/y" in html

    # a run cut before its end (no summary.json yet): the panels come from metrics.csv
    cut = tmp_path / "tiny" / "cut"
    cut.mkdir(parents=True)
    for name in ("metrics.csv", "config.yaml"):
        shutil.copy(run_dir / name, cut / name)
    assert report_main([str(cut)]) == 0
    html = (cut / "report" / "report.html").read_text()
    assert "no summary.json" in html and "01_training_loss.png" in html
    assert report_main([str(tmp_path / "nowhere")]) == 2


def test_report_of_staged_runs_reads_their_sub_runs_and_tables(runs, tmp_path):
    run_dir = runs.get("twin_merging")
    page, rendered = report(run_dir, out_dir=tmp_path / "twin")
    done = {r.panel.title: r for r in rendered}
    assert not done["training loss"].skipped  # from base/ and ft_<domain>/
    summary = json.loads((run_dir / "summary.json").read_text())
    table = done["test loss per method and domain"].html
    for method, losses in summary["test_loss"].items():
        assert method in table and all(f"{v:.4g}" in table for v in losses.values())
    assert done["normalised scores chart"].images and done["normalised scores chart"].images[0].is_file()
    html = page.read_text()
    assert "series: base, ft_pydoc, ft_stdlib" in html


def test_panels_are_checked_when_declared():
    with pytest.raises(ValueError, match="kind must be one of"):
        Panel("x", "pie", ("a",))
    with pytest.raises(ValueError, match="must be concrete"):
        Panel("x", "bar", ("fusechat/val_loss/*/all",))
    with pytest.raises(ValueError, match="two"):
        Panel("x", "heatmap", ("moe/load/l*",))
    with pytest.raises(ValueError, match="exactly one key"):
        Panel("x", "scalar", ("a", "b"))


def test_docs_list_the_panels_of_every_recipe():
    docs = (ROOT / "docs" / "dashboards.md").read_text()
    assert markdown_table("tiny", own_only=False) in docs, "docs/dashboards.md: the common panels are out of date"
    for recipe in RealRuns.BUILT:
        assert markdown_table(recipe) in docs, f"docs/dashboards.md: the panel table of {recipe} is out of date"
    for recipe in recipe_names():
        assert f"`{recipe}`" in docs, f"docs/dashboards.md does not name {recipe}"
