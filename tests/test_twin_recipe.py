import json
import math

from recipes.config import load_config
from recipes.train import train


def test_twin_merging_pipeline_end_to_end_and_resumes(tiny_overrides):
    overrides = tiny_overrides + ["twin.base_steps=6", "twin.finetune_steps=3", "twin.eval_batches=1",
                                  "twin.router_epochs=5", "run.run_id=e2e"]
    run_dir = train(load_config("twin_merging", overrides))
    s = json.loads((run_dir / "summary.json").read_text())
    doms = ["pydoc", "stdlib", "licenses"]
    methods = {"base", "task_arithmetic", "ties", "twin_merging"} | {f"finetuned_{d}" for d in doms}
    assert set(s["test_loss"]) == methods
    for m in methods:
        assert set(s["test_loss"][m]) == set(doms)
        assert all(math.isfinite(v) for v in s["test_loss"][m].values())
    # normalised score definition: base -> 0, each specialist on its own domain -> 1
    for d in doms:
        assert s["normalised_score"]["base"][d] == 0.0
        assert abs(s["normalised_score"][f"finetuned_{d}"][d] - 1.0) < 1e-12
    assert s["expert_storage_bytes"] < s["dense_task_vector_bytes"]
    # second call skips every completed stage: trained weights and experts are untouched
    stamps = {p: p.stat().st_mtime_ns for p in [run_dir / "base/hf/model.safetensors",
                                                 run_dir / "ft_pydoc/hf/model.safetensors",
                                                 run_dir / "experts/experts.safetensors", run_dir / "router.pt"]}
    train(load_config("twin_merging", overrides))
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
