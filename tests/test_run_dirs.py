"""Run directories that cannot be clobbered, resumes that validate before they touch anything, config errors at
load time, a full disk, and checkpoints that cannot run code."""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.engine.checkpointing import UnsafeCheckpointError, load_checkpoint_file
from recipes.engine.config import ConfigError, load_config
from recipes.engine.runs import RunLock
from tests.conftest import ROOT


def _cli(*args, timeout=600):
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "recipes", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def _small(root, data_cache, *extra):
    return [f"run.root={root}", f"data.cache_dir={data_cache}", "data.max_chars_per_domain=100000",
            "trainer.progress_bar=false", "logging.wandb=disabled", "trainer.max_steps=3", "data.batch_size=4",
            "data.block_size=32", "checkpoint.every_n_steps=2", *extra]


def _tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _one_error_line(r) -> str:
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("runs")
    r = _cli("train", "tiny", *_small(root, data_cache, "run.run_id=done"))
    assert r.returncode == 0, r.stderr[-3000:]
    return root, root / "tiny" / "done"


@pytest.mark.parametrize("bad", ["../../x", "/abs/path", "a/b", "..", ".hidden", "x" * 200])
def test_run_ids_are_one_path_component(bad):
    with pytest.raises(ConfigError, match="not a valid run id"):
        load_config("tiny", [f"run.run_id={bad}"])


def test_an_existing_run_id_is_refused_unless_overwritten(tmp_path, data_cache, finished_run):
    root, run_dir = finished_run
    before = _tree_digest(run_dir)
    line = _one_error_line(_cli("train", "tiny", *_small(root, data_cache, "run.run_id=done")))
    assert f"make resume RUN={run_dir}" in line and "run.overwrite=true" in line
    assert _tree_digest(run_dir) == before
    # an explicit overwrite starts over in a copy
    copy = root / "tiny" / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "stale.txt").write_text("from the old run")
    r = _cli("train", "tiny", *_small(root, data_cache, "run.run_id=copy", "run.overwrite=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (copy / "stale.txt").exists() and (copy / "summary.json").exists()


def test_a_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, data_cache, finished_run):
    root, run_dir = finished_run
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom recipes.engine.runs import RunLock\n"
                               f"RunLock({str(run_dir)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    try:
        line = _one_error_line(_cli("resume", str(run_dir)))
        assert "is in use by another process" in line and f"pid {holder.pid}" in line
        with pytest.raises(ConfigError, match="in use"):
            RunLock(run_dir).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without any cleanup: the kernel drops its lock
        holder.wait()
    with RunLock(run_dir):  # the stale lock is taken over
        pass
    r = _cli("resume", str(run_dir))  # a finished run resumes as a no-op segment
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("override,key", [("model.size=small", "model"), ("data.vocab_size=8192", "data.vocab_size"),
                                          ("trainer.strategy=ddp", "trainer.strategy")])
def test_an_incompatible_resume_override_changes_nothing(finished_run, override, key):
    _, run_dir = finished_run
    before = _tree_digest(run_dir)
    line = _one_error_line(_cli("resume", str(run_dir), override))
    assert key in line and "cannot change when resuming" in line
    assert _tree_digest(run_dir) == before


def test_a_mistyped_resume_override_changes_nothing(finished_run):
    _, run_dir = finished_run
    before = _tree_digest(run_dir)
    line = _one_error_line(_cli("resume", str(run_dir), "trainer.max_stepz=9"))
    assert "Did you mean: trainer.max_steps" in line
    assert _tree_digest(run_dir) == before


def test_no_readable_checkpoint_is_an_error_not_a_restart(tmp_path, finished_run):
    _, run_dir = finished_run
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    for p in (broken / "checkpoints").iterdir():
        p.write_bytes(b"PK\x03\x04 truncated")
    before = _tree_digest(broken)
    line = _one_error_line(_cli("resume", str(broken)))
    assert "None of the checkpoints" in line and "last.ckpt" in line
    assert _tree_digest(broken) == before


@pytest.mark.parametrize("override,message", [
    ("trainer.precision=foo", "trainer.precision must be one of"),
    ("trainer.devices=0", "trainer.devices must be"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
    ("checkpoint.every_n_steps=0", "checkpoint.every_n_steps must be >= 1"),
    ("trainer.strategy=zero9", "trainer.strategy must be one of"),
    ("trainer.accumulate_grad_batches=0", "accumulate_grad_batches must be >= 1"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("trainer.limit_val_batches=2.5", "limit_val_batches must be"),
])
def test_values_that_would_fail_later_fail_at_load_time(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config("tiny", [override])


def test_a_full_disk_names_the_path_and_the_last_good_checkpoint(tmp_path, data_cache):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        # one checkpoint of `tiny` is ~16 MB: the first fits, the second does not
        r = _cli("train", "tiny", *_small(mnt, data_cache, "run.run_id=full", "trainer.max_steps=4",
                                          "checkpoint.every_n_steps=1"))
        line = _one_error_line(r)
        assert "No space left on the device writing checkpoint" in line and "The last good checkpoint is" in line
        named_step = int(line.split("(step ")[1].split(")")[0])
        last = mnt / "tiny" / "full" / "checkpoints" / "last.ckpt"
        assert f"{last} (step {named_step})" in line
        assert load_checkpoint_file(last)["global_step"] == named_step >= 1  # whole, and the one named
    finally:
        subprocess.run(["umount", str(mnt)])


# ------------------------------------------------------------------------------------------ safe checkpoints
class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    good = torch.load(path, weights_only=True) if path.exists() else {"global_step": 99, "state_dict": {}}
    good["global_step"] = 10_000  # the newest, so it would be the one loaded
    good["evil"] = _Payload(marker)
    with open(path, "wb") as f:
        torch.save(good, f, pickle_protocol=pickle.DEFAULT_PROTOCOL)


def test_the_payload_would_run_if_unpickled(tmp_path):
    """The negative control: the planted file really executes code under a full unpickle."""
    marker = tmp_path / "pwned"
    _plant(tmp_path / "x.ckpt", marker)
    torch.load(tmp_path / "x.ckpt", weights_only=False)
    assert marker.exists()


def test_a_planted_payload_is_refused_everywhere_and_never_runs(tmp_path, data_cache, finished_run):
    _, run_dir = finished_run
    victim = tmp_path / "victim"
    shutil.copytree(run_dir, victim)
    marker = tmp_path / "pwned"
    _plant(victim / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match="Refusing to load"):
        load_checkpoint_file(victim / "checkpoints" / "last.ckpt")
    for args in (("resume", str(victim)),
                 ("export", str(victim), "--checkpoint", str(victim / "checkpoints" / "last.ckpt")),
                 ("export", str(victim))):
        r = _cli(*args)
        assert r.returncode == 2 and "Refusing to load" in r.stderr, (args, r.stderr[-2000:])
    # analyze (its own MoE run) and tokenformer_grow.from_run read checkpoints through the same loader
    from recipes.openmoe.analyze import load_weights
    from recipes.tokenformer.grow import read_checkpoint

    with pytest.raises(UnsafeCheckpointError):
        load_weights(torch.nn.Linear(1, 1), victim / "checkpoints" / "last.ckpt")
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(victim / "checkpoints" / "last.ckpt")
    assert not marker.exists()


def test_convert_checkpoint_needs_trust_and_yields_plain_data(tmp_path):
    import numpy as np

    path = tmp_path / "old.ckpt"
    torch.save({"global_step": np.int64(7), "w": np.ones(3, dtype=np.float32), "state_dict": {"a": torch.ones(2)}},
               path)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_file(path)
    r = _cli("convert-checkpoint", str(path))
    assert r.returncode == 2 and "--trust" in r.stderr
    r = _cli("convert-checkpoint", str(path), "--trust")
    assert r.returncode == 0, r.stderr
    plain = load_checkpoint_file(path)
    assert (plain["global_step"] == 7 and torch.equal(plain["w"], torch.ones(3))
            and (tmp_path / "old.ckpt.orig").exists())
    # even with --trust, a file holding anything but plain data and numpy is refused, never unpickled
    marker = tmp_path / "pwned"
    _plant(tmp_path / "evil.ckpt", marker)
    r = _cli("convert-checkpoint", str(tmp_path / "evil.ckpt"), "--trust")
    assert r.returncode == 2 and "cannot be converted" in r.stderr and not marker.exists(), r.stderr[-2000:]
