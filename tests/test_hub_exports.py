"""Export folders are self-contained for transformers (models/hub_export, recipes/engine/export.py, the export stage
of adamoe_finetune).

Tiny runs of every recipe whose export is not a plain transformers model (adamoe, openmoe, tokenformer,
tokenformer_grow, adamoe_finetune with LoRA) and of tiny, tiny_moe and twin_lora_ft are trained for 2 steps and
exported. ONE isolated Python process (`-I`, cwd outside the repository, no PYTHONPATH: `import models` fails
there) loads every export through transformers' Auto classes and writes the logits; they are compared with the
logits of the model the checkpoint holds, built in this process by the recipe. The same process checks that
loading without trust_remote_code raises, and applies the LoRA adapters with peft.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.factory import ModelSpec, build_model
from models.hub_export import ADAPTER_DIR, load_export, save_export
from models.hub_export.bundle import bundle
from models.moe import retrofit
from recipes.engine.build import build_datamodule, build_module, prepared_model
from recipes.engine.checkpointing import newest_checkpoint
from recipes.engine.config import load_config
from recipes.engine.export import export
from recipes.engine.loop import train
from recipes.engine.recipe import get_recipe
from recipes.engine.runs import load_run
from tests.conftest import ROOT

REMOTE = ("adamoe", "openmoe", "tokenformer", "tokenformer_grow", "adamoe_finetune")
RETROFITTED = ("retrofit_qwen2_moe", "retrofit_olmoe")  # the other bases of AdaMoE, retrofitted here, not trained
PLAIN = ("tiny", "tiny_moe", "twin_lora_ft")
LORA = ("adamoe_finetune", "twin_lora_ft")
MODEL_TYPES = {"adamoe": "adamoe_mixtral", "adamoe_finetune": "adamoe_mixtral", "openmoe": "openmoe_llama",
               "tokenformer": "tokenformer_causal_lm", "tokenformer_grow": "tokenformer_causal_lm",
               "retrofit_qwen2_moe": "adamoe_qwen2_moe", "retrofit_olmoe": "adamoe_olmoe"}
TOLERANCE = 1e-6  # float32 logits; the same ops, but transformers' loader may align the tensors differently

ISOLATED = r'''
import json, sys
import torch
torch.set_num_threads(1)
report = {}
try:
    import models  # noqa: F401
    report["repo_importable"] = models.__file__
except ImportError:
    report["repo_importable"] = None
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
spec = json.loads(open(sys.argv[1]).read())
def logits(model, inputs, name):
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.save(out, f"{spec['out']}/{name}.pt")
for name, item in spec["exports"].items():
    entry = report[name] = {}
    path, inputs = item["path"], torch.load(item["inputs"])
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=item["remote"])
    entry["class"] = type(model).__module__ + "." + type(model).__name__
    entry["training"] = model.training
    logits(model, inputs, name)
    entry["tokenizer"] = type(AutoTokenizer.from_pretrained(path)).__name__
    if item["remote"]:
        for trust in (None, False):
            try:
                AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust)
                entry[f"no_trust_{trust}"] = "loaded"
            except Exception as error:
                entry[f"no_trust_{trust}"] = f"{type(error).__name__}: {error}"
        try:
            AutoConfig.from_pretrained(path)
            entry["config_no_trust"] = "loaded"
        except Exception as error:
            entry["config_no_trust"] = f"{type(error).__name__}: {error}"
    if item.get("adapter"):
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained(item["adapter_base"], trust_remote_code=True)
        logits(PeftModel.from_pretrained(base, item["adapter"]).eval(), inputs, name + "_adapter")
json.dump(report, open(f"{spec['out']}/report.json", "w"))
'''


def _overrides(root: Path, data_cache: str, run_id: str):
    return [f"run.root={root}", f"data.cache_dir={data_cache}", "logging.wandb=disabled", "trainer.progress_bar=false",
            "data.max_chars_per_domain=200000", "data.batch_size=2", "data.block_size=32", "trainer.max_steps=2",
            "trainer.val_check_interval=1000", "trainer.limit_val_batches=1", f"run.run_id={run_id}"]


def _train(recipe: str, root: Path, data_cache: str, *extra: str) -> Path:
    return Path(train(load_config(recipe, _overrides(root, data_cache, recipe) + list(extra))))


def _checkpoint_model(run_dir: Path):
    """The model the run's newest checkpoint holds, built by its recipe, its tensors put in by hand (eval mode)."""
    cfg = load_run(run_dir)
    dm = build_datamodule(cfg)
    model = build_module(cfg, dm, get_recipe(cfg.run.name)).model
    state = torch.load(newest_checkpoint(run_dir)[0], map_location="cpu", weights_only=False)["state_dict"]
    result = model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")},
                                   strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert not result.unexpected_keys
    assert all(any(params[k] is p for n, p in params.items() if n != k) for k in result.missing_keys)  # tied only
    return model.eval(), cfg, dm


def _logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """recipe -> {run, export, reference logits}; trained 2 steps each, exported by the engine (by the export
    stage for adamoe_finetune)."""
    root = tmp_path_factory.mktemp("hub_runs")
    out = {name: {"run": _train(name, root, data_cache)} for name in ("tiny", "tiny_moe", "adamoe", "openmoe",
                                                                       "tokenformer")}
    out["tokenformer_grow"] = {"run": _train("tokenformer_grow", root, data_cache,
                                             f"tokenformer_grow.from_run={out['tokenformer']['run']}",
                                             "tokenformer_grow.eval_batches=1")}
    for name, item in out.items():
        item["export"] = export(item["run"])
    saved = json.loads((out["adamoe"]["export"] / "config.json").read_text())["adamoe"]  # must match: no re-retrofit
    ft = _train("adamoe_finetune", root, data_cache, f"model.pretrained={out['adamoe']['export']}",
                "adamoe_finetune.eval_file=null", "adamoe.lora_r=4",
                f"adamoe.num_null_experts={saved['num_null_experts']}", f"adamoe.top_k={saved['top_k']}")
    out["adamoe_finetune"] = {"run": ft / "train", "export": ft / "export", "base": out["adamoe"]["export"]}
    lora = _train("twin_lora_ft", root, data_cache, f"model.pretrained={out['tiny']['export']}",
                  "twin_lora_ft.rank=4")
    out["twin_lora_ft"] = {"run": lora, "export": export(lora), "base": out["tiny"]["export"]}
    gen = torch.Generator().manual_seed(0)
    for name, item in out.items():
        model, cfg, dm = _checkpoint_model(item["run"])
        vocab = min(dm.vocab_size, model.get_input_embeddings().weight.shape[0])
        ids = torch.randint(0, vocab, (2, 24), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, -5:] = 0  # right padding in the second row
        item.update(inputs={"input_ids": ids, "attention_mask": mask}, cfg=cfg, dm=dm)
        item["reference"] = _logits(model, item["inputs"])
        if name in LORA:  # the merged model of the checkpoint (merging changes the float rounding a little)
            item["reference_unmerged"] = item["reference"]
            item["reference"] = _logits(model.merge_and_unload(), item["inputs"])
    dm = out["tiny"]["dm"]
    for arch in ("qwen2_moe", "olmoe"):  # AdaMoE on the other transformers MoEs (random null gates)
        model = build_model(ModelSpec(arch=arch, size="tiny", vocab_size=dm.vocab_size, max_seq_len=32, overrides={}))
        ids = torch.randint(0, dm.vocab_size, (2, 24), generator=gen)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        base_logits = _logits(model.eval(), inputs)
        retrofit(model, num_null_experts=4, top_k=3, null_gate_init="random", seed=0)
        name = f"retrofit_{arch}"
        export_dir = root / name / "export"
        info = save_export(model, export_dir, dm.tokenizer)
        assert info == {"kind": "adamoe", "model_type": MODEL_TYPES[name], "remote_code": True, "adapter": None}
        out[name] = {"export": export_dir, "inputs": inputs, "reference": _logits(model.eval(), inputs)}
        assert (out[name]["reference"] - base_logits).abs().max().item() > 1e-3  # the null experts matter
    return out


@pytest.fixture(scope="module")
def isolated(runs, tmp_path_factory):
    """Run ISOLATED once over every export; returns (report, directory of the logits files)."""
    work = tmp_path_factory.mktemp("isolated")
    spec = {"out": str(work), "exports": {}}
    for name, item in runs.items():
        torch.save(item["inputs"], work / f"{name}_inputs.pt")
        entry = {"path": str(item["export"]), "remote": name not in PLAIN, "inputs": str(work / f"{name}_inputs.pt")}
        if name in LORA:
            entry.update(adapter=str(item["export"] / ADAPTER_DIR), adapter_base=str(item["base"]))
        spec["exports"][name] = entry
    script = work / "load_exports.py"
    script.write_text(ISOLATED)
    (work / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(HF_MODULES_CACHE=str(work / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-I", "-s", str(script), str(work / "spec.json")], cwd=str(work), env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not str(work).startswith(str(ROOT))
    return json.loads((work / "report.json").read_text()), work


def test_the_isolated_process_cannot_import_the_repository(isolated):
    report, _ = isolated
    assert report["repo_importable"] is None


@pytest.mark.parametrize("name", REMOTE + RETROFITTED)
def test_export_carries_its_model_type_auto_map_and_code(runs, name):
    export_dir = runs[name]["export"]
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPES[name]
    module_of = {key: value.split(".")[0] for key, value in config["auto_map"].items()}
    assert set(module_of) == {"AutoConfig", "AutoModelForCausalLM"}
    for module in module_of.values():
        assert (export_dir / f"{module}.py").is_file()
    assert (export_dir / "model.safetensors").is_file() and not list(export_dir.glob("*.bin"))
    for code in export_dir.glob("*.py"):  # no import of the repository is left in the copied code
        for node in ast.walk(ast.parse(code.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 or node.module.split(".")[0] not in ("models", "recipes", "data"), code.name
                if node.level:  # a relative import names a file of the folder
                    assert (export_dir / f"{node.module}.py").is_file(), (code.name, node.module)
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "models" for a in node.names), code.name


@pytest.mark.parametrize("name", REMOTE + RETROFITTED)
def test_trust_remote_code_load_gives_the_checkpoint_logits(runs, isolated, name):
    report, work = isolated
    entry = report[name]
    assert entry["class"].startswith("transformers_modules.") and entry["training"] is False
    remote = torch.load(work / f"{name}.pt")
    reference = runs[name]["reference"]
    assert remote.shape == reference.shape and remote.dtype == torch.float32
    assert (remote - reference).abs().max().item() <= TOLERANCE
    assert entry["tokenizer"]  # AutoTokenizer reads the folder without trust_remote_code


@pytest.mark.parametrize("name", REMOTE + RETROFITTED)
def test_load_without_trust_remote_code_fails(isolated, name):
    report, _ = isolated
    entry = report[name]
    for key in ("no_trust_None", "no_trust_False", "config_no_trust"):
        assert entry[key] != "loaded", key
        assert "trust_remote_code" in entry[key], entry[key]


@pytest.mark.parametrize("name", PLAIN)
def test_plain_exports_have_no_auto_map_and_load_plainly(runs, isolated, name):
    report, work = isolated
    config = json.loads((runs[name]["export"] / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] in ("llama", "mixtral")
    assert not list(runs[name]["export"].glob("*.py"))
    assert report[name]["class"].startswith("transformers.models.")
    remote = torch.load(work / f"{name}.pt")
    assert (remote - runs[name]["reference"]).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", LORA)
def test_lora_adapter_in_peft_format_reproduces_the_merged_model(runs, isolated, name):
    _, work = isolated
    adapter = runs[name]["export"] / ADAPTER_DIR
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (runs[name]["export"] / "adapter_config.json").exists()  # would make transformers load the adapter
    merged = torch.load(work / f"{name}.pt")
    with_adapter = torch.load(work / f"{name}_adapter.pt")  # peft: the base export + the adapter, unmerged
    assert (with_adapter - runs[name]["reference_unmerged"]).abs().max().item() <= TOLERANCE
    assert (with_adapter - merged).abs().max().item() <= 1e-5  # merging only changes the rounding


def test_repository_loading_of_the_new_exports(runs):
    """model.pretrained=<export> (models.factory.load_pretrained) and load_export read every export with this
    repository's classes; an AdaMoE export trains on with its null gates (the adamoe recipe restores them)."""
    from models.factory import load_pretrained
    from models.moe import moe_blocks
    from models.openmoe import OpenMoEForCausalLM
    from models.tokenformer import TokenFormerForCausalLM

    for name, cls in (("tokenformer", TokenFormerForCausalLM), ("tokenformer_grow", TokenFormerForCausalLM),
                      ("openmoe", OpenMoEForCausalLM)):
        item = runs[name]
        model = load_pretrained(str(item["export"]))
        assert type(model) is cls
        assert torch.equal(_logits(model.eval(), item["inputs"]), item["reference"]), name
    for name in ("adamoe", "adamoe_finetune", *RETROFITTED):
        item = runs[name]
        base = load_pretrained(str(item["export"]))  # the base model with config.adamoe, as prepare_model wants
        assert base.config.model_type == MODEL_TYPES[name][len("adamoe_"):] and base.config.adamoe
        assert not moe_blocks(base)
        # ... which on its own is another model: what plain transformers built from these exports before
        assert (_logits(base.eval(), item["inputs"]) - item["reference"]).abs().max().item() > 1e-3, name
        full = load_export(str(item["export"]))
        diff = (_logits(full, item["inputs"]) - item["reference"]).abs().max().item()
        assert moe_blocks(full) and diff <= 1e-5, (name, diff)  # float rounding of the expert kernel at most
    item = runs["adamoe"]
    cfg = load_config("adamoe", [*_overrides(Path(item["cfg"].run.root), item["cfg"].data.cache_dir, "x"),
                                 f"model.pretrained={item['export']}"])
    model = prepared_model(cfg, item["dm"], get_recipe("adamoe")).eval()
    diff = (_logits(model, item["inputs"]) - item["reference"]).abs().max().item()
    assert diff <= 1e-5, diff  # the recipe's path (may pick another expert kernel): equal up to float rounding
    for name in ("tiny", "tiny_moe", "twin_lora_ft"):
        model = load_pretrained(str(runs[name]["export"])).eval()
        assert (_logits(model, runs[name]["inputs"]) - runs[name]["reference"]).abs().max().item() <= TOLERANCE


def test_repository_loading_of_exports_written_before_model_types(runs, tmp_path):
    """Older exports: TokenFormer / OpenMoE in their own save_pretrained format, AdaMoE saved as its base type."""
    from models.factory import load_pretrained

    for name in ("tokenformer", "openmoe", "adamoe"):
        model, _, _ = _checkpoint_model(runs[name]["run"])
        old = tmp_path / name
        model.save_pretrained(str(old))
        assert "auto_map" not in json.loads((old / "config.json").read_text())
        loaded = load_export(str(old))
        assert torch.equal(_logits(loaded, runs[name]["inputs"]), runs[name]["reference"]), name
        if name != "adamoe":
            assert type(load_pretrained(str(old))) is type(model)


def test_bundle_rewrites_imports_and_refuses_what_a_flat_copy_cannot_import(tmp_path):
    files = {f.module: f for f in bundle(["models.hub_export.modeling_adamoe"])}
    assert files["models.moe.block"].name == "moe_block.py" and files["models.moe"].name == "moe.py"
    assert files["models.hub_export.modeling_adamoe"].name == "modeling_adamoe.py"
    assert "from .moe import retrofit" in files["models.hub_export.modeling_adamoe"].text.replace(
        "from .moe import retrofit, saved_retrofit_settings", "from .moe import retrofit")
    assert "from .moe_config import" in files["models.moe.block"].text
    # a source tree of its own: models/a.py imports models/b/c.py
    (tmp_path / "models" / "b").mkdir(parents=True)
    (tmp_path / "models" / "__init__.py").write_text("")
    (tmp_path / "models" / "b" / "__init__.py").write_text("")
    (tmp_path / "models" / "b" / "c.py").write_text("X = 1\n")
    source = "def f():\n    from models.b.c import (\n        X,\n    )\n    return X\n"
    (tmp_path / "models" / "a.py").write_text(source)
    out = {f.name: f.text for f in bundle(["models.a"], root=tmp_path)}
    assert sorted(out) == ["a.py", "b_c.py"] and "    from .b_c import (\n        X,\n    )\n" in out["a.py"]
    for bad, why in (("import models.b.c\n", "cannot be bundled"), ("from models.b import c\n", "imports a module"),
                     ("from recipes.engine import loop\n", "must not import recipes")):
        (tmp_path / "models" / "a.py").write_text(bad)
        with pytest.raises(ValueError, match=why):
            bundle(["models.a"], root=tmp_path)


def test_save_export_replaces_an_export_but_not_another_directory(runs, tmp_path):
    model, _, _ = _checkpoint_model(runs["tokenformer"]["run"])
    target = tmp_path / "out"
    save_export(model, target)
    (target / "stale.safetensors").write_text("x")
    info = save_export(model, target)
    assert info["kind"] == "tokenformer" and info["remote_code"] and not (target / "stale.safetensors").exists()
    other = tmp_path / "not_an_export"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no export"):
        save_export(model, other)
    assert (other / "notes.txt").read_text() == "keep me"
