"""`make export`: newest checkpoint -> save_pretrained directory that `model.pretrained=` loads back."""
from pathlib import Path

import pytest
import torch

from recipes.engine.build import build_base_model, build_datamodule
from recipes.engine.checkpointing import checkpoint_kind, list_checkpoints, newest_checkpoint
from recipes.engine.config import load_config
from recipes.engine.export import main as export_main
from recipes.engine.export import model_state_dict
from recipes.engine.loop import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("export_runs")
    cfg = load_config("tiny", [f"run.root={root}", f"data.cache_dir={data_cache}", "logging.wandb=disabled",
                               "trainer.progress_bar=false", "data.max_chars_per_domain=200000",
                               "trainer.max_steps=4", "trainer.val_check_interval=1000", "data.batch_size=4",
                               "checkpoint.every_n_steps=2", "run.run_id=exp"])
    return train(cfg)


def test_export_loads_back_with_same_logits(trained_run, data_cache):
    run_dir = Path(trained_run)
    assert export_main([str(run_dir)]) == 0
    out = run_dir / "export"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert (out / "tokenizer.json").exists()

    # independent expectation: the checkpoint's own tensors put into a fresh model by hand
    ckpt, step = newest_checkpoint(run_dir)
    assert step == 4
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    base = load_config("tiny", [f"data.cache_dir={data_cache}", "data.max_chars_per_domain=200000"])
    dm = build_datamodule(base)
    reference = build_base_model(base, dm)
    reference.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")},
                              strict=False)
    reference.eval()

    loaded_cfg = load_config("tiny", [f"data.cache_dir={data_cache}", "data.max_chars_per_domain=200000",
                                      f"model.pretrained={out}"])
    loaded = build_base_model(loaded_cfg, dm).eval()
    ids = torch.as_tensor(dm.val_set[0]["input_ids"][:32]).unsqueeze(0).long()
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.equal(want, got)
    # and the weights really are the trained ones, not a fresh initialisation
    fresh = build_base_model(base, dm).eval()
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - got).abs().max() > 1e-3


def test_export_of_a_missing_run_fails_cleanly(tmp_path, capsys):
    assert export_main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_model_state_dict_strips_prefix_and_drops_aliases():
    t = torch.ones(2)
    out = model_state_dict({"model.a.weight": t, "_forward.a.weight": t, "model.b": t})
    assert sorted(out) == ["a.weight", "b"]
    with pytest.raises(RuntimeError, match="No 'model.\\*' weights"):
        model_state_dict({"encoder.w": t})


def test_checkpoint_kinds_and_interrupted_directory_swap(tmp_path):
    ck = tmp_path / "checkpoints"
    (ck / "last.ckpt" / "checkpoint").mkdir(parents=True)
    (ck / "step0000002.ckpt").mkdir()
    (ck / "step0000002.ckpt" / "meta.pt").write_bytes(b"")
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")
    assert checkpoint_kind(ck / "last.ckpt") == "deepspeed"
    assert checkpoint_kind(ck / "step0000002.ckpt") == "distributed"
    assert checkpoint_kind(tmp_path / "hpc_ckpt_1.ckpt") == "file"
    # a kill between the two renames of a directory swap leaves only `.hpc_ckpt_2.ckpt.old`: still listed
    (tmp_path / ".hpc_ckpt_2.ckpt.old").mkdir()
    (tmp_path / ".hpc_ckpt_3.ckpt.partial").mkdir()  # a half-written one never is
    names = sorted(p.name for p in list_checkpoints(tmp_path))
    assert names == [".hpc_ckpt_2.ckpt.old", "hpc_ckpt_1.ckpt", "last.ckpt", "step0000002.ckpt"]
    (tmp_path / "hpc_ckpt_2.ckpt").mkdir()  # once the swap completed, the set-aside copy is ignored
    assert ".hpc_ckpt_2.ckpt.old" not in [p.name for p in list_checkpoints(tmp_path)]
