"""FuseChat under several tasks (srun's or torchrun's): which task computes which represent shard, the
file barrier every task waits at, and its signals.

The multi-process tests start real `python -m recipes fuse --stage represent` processes on one run directory
with the environment srun gives its tasks (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_ID;
no srun needed), on the tiny steps=0 models of tests/test_fusechat_recipe.py.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import recipes.fusechat as fusechat
from recipes.engine.config import load_config
from recipes.engine.errors import ConfigError
from recipes.engine.loop import RunInterrupted
from recipes.engine.runs import load_safetensors
from recipes.fusechat.common import Ranks, check_signals, my_shards, ranks, wait_for_files
from tests.conftest import ROOT
from tests.test_fusechat_recipe import fc_overrides, save_tiny_models

TASK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "TORCHELASTIC_RUN_ID")


def _clean_env(monkeypatch):
    for key in list(os.environ):
        if key in TASK_ENV or key.startswith("SLURM_"):
            monkeypatch.delenv(key)


def _srun_env(rank: int, world: int, local: int, node: int, nodes: int = 1):
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_STEP_NUM_TASKS": str(world),
            "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node), "SLURM_NNODES": str(nodes),
            "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_ID": "0", "SLURM_JOB_NAME": "lm-recipes"}


# ------------------------------------------------------------------------------------------- unit tests


def test_ranks_read_torchrun_then_srun_and_nothing_else(monkeypatch):
    _clean_env(monkeypatch)
    assert ranks() == Ranks(0, 1, 0, 0, 1)
    # torchrun, 2 nodes x 4: global rank 6 is local rank 2 of node 1
    torchrun = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    for k, v in torchrun.items():
        monkeypatch.setenv(k, v)
    # without TORCHELASTIC_RUN_ID these come from Lightning's own launcher or its DeepSpeed strategy: one task
    assert ranks() == Ranks()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert ranks() == Ranks(6, 8, 2, 1, 2)
    _clean_env(monkeypatch)
    # an srun task: task 5 of 8 on 2 nodes is local 1 of node 1
    for k, v in _srun_env(5, 8, 1, 1, nodes=2).items():
        monkeypatch.setenv(k, v)
    assert ranks() == Ranks(5, 8, 1, 1, 2)
    # the batch script itself (no job step) is one task, whatever the allocation's task count
    monkeypatch.delenv("SLURM_STEP_ID")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert ranks() == Ranks()
    # job names Lightning treats as interactive: not a SLURM-launched training, one task each
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    assert ranks() == Ranks()
    monkeypatch.setenv("SLURM_JOB_NAME", "lm-recipes")
    monkeypatch.setenv("SLURM_PROCID", "x")
    with pytest.raises(ConfigError, match="SLURM_PROCID='x' is not an integer"):
        ranks()


def test_shares_per_task_and_per_node(monkeypatch):
    _clean_env(monkeypatch)
    assert my_shards(5) == my_shards(5, per_node=True) == [0, 1, 2, 3, 4]
    per_task, per_node = {}, {}
    for rank in range(8):  # 2 nodes x 4 tasks, 11 shards
        for k, v in _srun_env(rank, 8, rank % 4, rank // 4, nodes=2).items():
            monkeypatch.setenv(k, v)
        per_task[rank], per_node[rank] = my_shards(11), my_shards(11, per_node=True)
    assert per_task[3] == [3] and per_task[2] == [2, 10]
    assert sorted(s for v in per_task.values() for s in v) == list(range(11))  # each shard exactly once
    # device_map=auto: a node is the unit, its local rank 0 computes with all its GPUs
    assert per_node[0] == [0, 2, 4, 6, 8, 10] and per_node[4] == [1, 3, 5, 7, 9]
    assert all(per_node[r] == [] for r in (1, 2, 3, 5, 6, 7))


def test_each_task_takes_the_gpu_of_its_local_rank(monkeypatch):
    """device_map null: every task of a node on its own GPU (the node's GPUs as the task sees them: one when SLURM
    binds a GPU per task). The device count is set here; no GPU on this machine."""
    from recipes.fusechat.common import device

    _clean_env(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert device() == torch.device("cuda", 0)
    for k, v in _srun_env(6, 8, 2, 1, nodes=2).items():
        monkeypatch.setenv(k, v)
    assert device() == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device() == torch.device("cuda", 0)


def test_wait_for_files_returns_when_the_files_come_and_names_the_missing_ones(monkeypatch, tmp_path, capsys):
    _clean_env(monkeypatch)
    monkeypatch.setenv("FUSECHAT_WAIT_TIMEOUT", "0.6")
    files = [tmp_path / "a" / f"shard-{i:05d}.safetensors" for i in range(3)]
    files[0].parent.mkdir()
    files[0].write_bytes(b"x")

    def write_later():  # each new file restarts the timeout: 3 x 0.3 s is longer than 0.6 s in all
        for f in files[1:]:
            time.sleep(0.3)
            f.write_bytes(b"x")

    writer = threading.Thread(target=write_later)
    t0 = time.monotonic()
    writer.start()
    wait_for_files(files, "the test shards", poll_s=0.05, report_s=0.2)
    writer.join()
    assert 0.5 < time.monotonic() - t0 < 5
    assert "waiting for the test shards, 1 of 3 there" in capsys.readouterr().out
    missing = [tmp_path / "a" / "shard-00007.safetensors"]
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"saw no new file for 0.6 s .*missing 1 of 2: a/shard-00007.safetensors"):
        wait_for_files([files[0], *missing], "the test shards", poll_s=0.05)
    assert time.monotonic() - t0 < 5
    monkeypatch.setenv("FUSECHAT_WAIT_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="FUSECHAT_WAIT_TIMEOUT must be a positive number of seconds; got 'soon'"):
        wait_for_files(missing, "the test shards")


def test_a_recorded_sigterm_ends_the_wait(monkeypatch, tmp_path):
    from recipes.engine.early_signals import EARLY_SIGNALS

    _clean_env(monkeypatch)
    check_signals("nothing")  # no signal: nothing happens
    EARLY_SIGNALS.append(("SIGTERM", time.time()))
    with pytest.raises(RunInterrupted, match="SIGTERM during the wait for the test shards: finished shards") as e:
        wait_for_files([tmp_path / "never"], "the test shards", poll_s=0.05)
    assert e.value.exit_code == 143 and not EARLY_SIGNALS


# ----------------------------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("fusechat_rank_models"))


def _start(run_dir: Path, overrides, env_extra, log: Path, stage: str = "represent"):
    env = {k: v for k, v in os.environ.items() if k not in TASK_ENV and not k.startswith("SLURM_")}
    env.update(env_extra, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "recipes", "fuse", "--stage", stage, "--run-dir", str(run_dir), *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _finish(procs, logs, timeout=240):
    """Each process's log once all ended with 0, and when each ended (time.time())."""
    ended = [None] * len(procs)
    deadline = time.monotonic() + timeout
    while None in ended:
        for i, p in enumerate(procs):
            if ended[i] is None and p.poll() is not None:
                ended[i] = time.time()
                assert p.returncode == 0, logs[i].read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return [log.read_text() for log in logs], ended


def _wait_for_line(proc, log: Path, line: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while line not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def _computed(out: str):
    """model -> the shards this task logged it computed."""
    found = re.findall(r"represent (\w+): computing shards \[([\d, ]*)\] of (\d+)", out)
    return {name: [int(s) for s in shards.split(",") if s.strip()] for name, shards, _ in found}


def _shards(run_dir: Path):
    return {p.relative_to(run_dir): p for p in sorted((run_dir / "represent").glob("*/shard-*.safetensors"))}


def _task_stamp(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["task"]


@pytest.mark.slow
def test_two_srun_tasks_split_the_shards_and_both_finish_with_a_single_process_result(tiny_overrides, models,
                                                                                        tmp_path):
    overrides = fc_overrides(tiny_overrides, models)  # 20 blocks, 8 per shard: 3 shards per model
    ref_dir = tmp_path / "single"
    fusechat.run_stages(load_config("fusechat", overrides), ref_dir, ["represent"])
    run_dir = tmp_path / "two"
    logs = [tmp_path / f"task{r}.log" for r in range(2)]
    # task 1 starts once task 0 is at its last model: task 0 is done with its share well before task 1's is
    # there, and must wait for it instead of ending
    procs = [_start(run_dir, overrides, _srun_env(0, 2, 0, 0), logs[0])]
    _wait_for_line(procs[0], logs[0], "represent legal: computing shards [0, 2] of 3")
    procs.append(_start(run_dir, overrides, _srun_env(1, 2, 1, 0), logs[1]))
    outs, ended = _finish(procs, logs)
    computed = [_computed(out) for out in outs]
    for name in ("pivot", "code", "legal"):
        a, b = computed[0][name], computed[1][name]
        assert (a, b) == ([0, 2], [1])  # round-robin by SLURM_PROCID: every shard once, by one task
        for task, shards in enumerate((a, b)):
            assert all(_task_stamp(run_dir / "represent" / name / f"shard-{s:05d}.safetensors") == str(task)
                       for s in shards)
    for task, out in enumerate(outs):  # neither ended before the other's shards were there
        assert f"task {task} of 2: represent finished, all 9 shards there" in out
    assert ended[0] > max(p.stat().st_mtime for p in _shards(run_dir).values())
    assert (run_dir / "stages" / "represent.json").exists()
    ref, got = _shards(ref_dir), _shards(run_dir)
    assert list(ref) == list(got) and len(ref) == 9
    for rel in ref:
        want, have = load_safetensors(ref[rel]), load_safetensors(got[rel])
        assert set(want) == set(have) and all(torch.equal(want[k], have[k]) for k in want), rel
    assert (run_dir / "represent" / "layout.json").read_text() == (ref_dir / "represent" / "layout.json").read_text()
    assert not list(run_dir.rglob("*.tmp*"))


@pytest.mark.slow
def test_device_map_auto_one_task_per_node_computes_and_a_waiting_task_obeys_sigterm(tiny_overrides, models,
                                                                                    tmp_path):
    overrides = fc_overrides(tiny_overrides, models, ["fusechat.device_map=auto"])
    # a waiting task (local rank 1: computes nothing) alone: SIGTERM ends it at once, nothing written
    lone = tmp_path / "lone"
    log = tmp_path / "lone.log"
    proc = _start(lone, overrides, _srun_env(1, 2, 1, 0), log)
    _wait_for_line(proc, log, "represent legal: computing shards [] of 3")
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.terminate()
    assert proc.wait(timeout=30) == 143
    assert time.monotonic() - t0 < 10
    assert "SIGTERM during the wait for the represent shards: finished shards are kept" in log.read_text()
    assert not list((lone / "represent").glob("*/shard-*"))
    # two tasks on one node: local rank 0 computes every shard, local rank 1 waits for them and goes on too
    run_dir = tmp_path / "node"
    logs = [tmp_path / f"node{r}.log" for r in range(2)]
    procs = [_start(run_dir, overrides, _srun_env(r, 2, r, 0), logs[r]) for r in range(2)]
    outs, ended = _finish(procs, logs)
    computed = [_computed(out) for out in outs]
    assert all(computed[0][n] == [0, 1, 2] and computed[1][n] == [] for n in ("pivot", "code", "legal"))
    assert {_task_stamp(p) for p in _shards(run_dir).values()} == {"0"} and len(_shards(run_dir)) == 9
    assert "task 1 of 2: represent finished, all 9 shards there" in outs[1]
    assert ended[1] > max(p.stat().st_mtime for p in _shards(run_dir).values())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_tasks_fuse_and_train_every_target_together(tiny_overrides, models, tmp_path):
    """The train stage under 2 tasks with torchrun's variables (DDP on CPU): the fused shards split between
    them, then all three trainings (2 targets + clm_only) with both tasks: a task that stopped after the first
    export would leave the second training waiting for it forever."""
    overrides = fc_overrides(tiny_overrides, models)
    run_dir = tmp_path / "run"
    fusechat.run_stages(load_config("fusechat", overrides), run_dir, ["represent", "align"])
    ddp = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    port = str(_free_port())
    logs = [tmp_path / f"train{r}.log" for r in range(2)]
    procs = []
    for r in range(2):
        env = {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "TORCHELASTIC_RUN_ID": "none"}
        procs.append(_start(run_dir, overrides + ddp, env, logs[r], stage="train"))
    outs, _ = _finish(procs, logs, timeout=420)
    for name in ("target_code", "target_legal", "clm_only"):
        assert (run_dir / name / "hf" / "model.safetensors").exists()
        assert json.loads((run_dir / name / "summary.json").read_text())["step"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["train"]) >= {"code", "legal", "clm_only"}
    assert len(list((run_dir / "fused" / "code").glob("shard-*.safetensors"))) == 3
