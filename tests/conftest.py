"""Shared test set-up: ROOT (the repository root), W&B forced offline, no hub access, small thread count. \
(The repository root is on
sys.path through pyproject.toml's pytest `pythonpath`.)"""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One data/tokenizer cache for the whole session (tokenizers train once)."""
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture
def tiny_overrides(tmp_path, data_cache):
    """Overrides that make a recipe run small, quiet and inside tmp_path."""
    return [f"run.root={tmp_path / 'runs'}", f"data.cache_dir={data_cache}", "logging.wandb=disabled",
            "trainer.progress_bar=false", "data.max_chars_per_domain=200000"]
