"""W&B as researchers read it: the mode (offline-first), `make sync`, one run with one x-axis across segments,
console capture, checkpoint artifacts, wandb-osh, the analysis' own run, FLOPs/MFU, summary timing, and the
end-of-run block. Everything offline: the W&B files are read back with a small reader of the `.wandb` format."""
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from models.factory import ModelSpec, build_model, count_parameters, flops_per_token
from recipes.engine import logs
from recipes.engine.callbacks import PRECISION_DTYPES, peak_flops
from recipes.engine.config import load_config
from recipes.engine.errors import ConfigError
from recipes.engine.loop import check_logging_config, train
from recipes.engine.runs import segment_times, wandb_id_for
from recipes.engine.sync import find_offline_runs, run_sync_job, sync_command, sync_offline_runs
from tests.conftest import ROOT

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # the format W&B accepts (40 characters); no server knows it


# ------------------------------------------------------------------------------ reading offline W&B files
def wandb_records(path, timeout: float = 60.0):
    """The protobuf records of a finished run's .wandb file (waiting for its exit record: wandb-core may still
    be writing the file after `finish()` returned)."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_file(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def read_wandb_file(path):
    """The protobuf records of a .wandb file: a 7-byte W&B header, then LevelDB-log chunks (7-byte header: crc,
    little-endian length, type 1 full / 2 first / 3 middle / 4 last) packed in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < 7:
        return []
    assert data[:4] == b":W&B"
    out, pos, buf, block = [], 7, b"", 32 * 1024
    while pos + 7 <= len(data):
        end = (pos // block + 1) * block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 > end or (length == 0 and kind == 0):
            pos = end  # block padding
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def of_type(records, kind):
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(records):
    """One dict per logged row; a media item (its fields come as nested keys) becomes a dict of its fields."""
    rows = []
    for h in of_type(records, "history"):
        row = {}
        for i in h.item:
            if i.key or len(i.nested_key) == 1:
                row[i.key or i.nested_key[0]] = json.loads(i.value_json)
            else:
                row.setdefault(i.nested_key[0], {})["/".join(i.nested_key[1:])] = json.loads(i.value_json)
        rows.append(row)
    return rows


def console(records):
    return "".join(o.line for o in of_type(records, "output_raw"))


def segment_files(run_dir):
    return sorted(Path(run_dir).glob("wandb/offline-run-*/*.wandb"))


# ------------------------------------------------------------------------------------------ the mode
@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "SLURM_JOB_ID", "HTTPS_PROXY", "https_proxy",
                "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no entry: not logged in
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    logs.forget_probes()
    yield monkeypatch
    logs.forget_probes()


@pytest.fixture
def listening():
    """A local TCP server that accepts connections: a reachable 'W&B server' for the probe."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv.getsockname()[1]
    srv.close()


def test_auto_under_slurm_is_offline_without_touching_the_network(clean_env):
    clean_env.setenv("SLURM_JOB_ID", "4242")
    clean_env.setenv("WANDB_API_KEY", FAKE_KEY)
    clean_env.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    t0 = time.monotonic()
    mode, why = logs.resolve_wandb_mode("auto")
    assert mode == "offline" and "SLURM" in why and time.monotonic() - t0 < 0.5


def test_auto_with_unreachable_server_is_offline_within_5_s(clean_env, listening):
    clean_env.setenv("WANDB_API_KEY", FAKE_KEY)
    # refused; a name that never resolves; a server that accepts the connection but never answers TLS (timeout)
    for url in ("http://127.0.0.1:9", "https://wandb.invalid", f"https://127.0.0.1:{listening}"):
        clean_env.setenv("WANDB_BASE_URL", url)
        t0 = time.monotonic()
        mode, why = logs.resolve_wandb_mode("auto")
        assert time.monotonic() - t0 < 5.0
        assert mode == "offline" and "not reachable" in why, why


def test_auto_is_online_only_when_logged_in_and_reachable(clean_env, listening, tmp_path):
    clean_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listening}")
    assert logs.resolve_wandb_mode("auto")[0] == "offline"  # reachable, but no key
    (tmp_path / "netrc").write_text(f"machine 127.0.0.1:{listening}\n  login user\n  password {FAKE_KEY}\n")
    assert logs.wandb_api_key_source() == str(tmp_path / "netrc")
    assert logs.resolve_wandb_mode("auto")[0] == "online"  # `wandb login` wrote a netrc entry for this host
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    assert logs.wandb_api_key_source() is None  # an entry for another host does not count
    clean_env.setenv("WANDB_API_KEY", FAKE_KEY)
    assert logs.resolve_wandb_mode("auto")[0] == "online"
    # behind a proxy, the probe goes to the proxy
    clean_env.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    clean_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listening}")
    assert logs.probe_address(logs.wandb_base_url())[:2] == ("127.0.0.1", listening)
    assert logs.resolve_wandb_mode("auto")[0] == "online"


def test_explicit_choices_win(clean_env):
    clean_env.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    assert logs.resolve_wandb_mode("offline")[0] == "offline"
    assert logs.resolve_wandb_mode("disabled")[0] is None
    clean_env.setenv("WANDB_API_KEY", FAKE_KEY)
    clean_env.setenv("WANDB_MODE", "offline")
    assert logs.resolve_wandb_mode("online")[0] == "offline"
    assert logs.resolve_wandb_mode("auto")[0] == "offline"
    assert logs.resolve_wandb_mode("disabled")[0] is None
    clean_env.setenv("WANDB_MODE", "disabled")
    assert logs.wandb_mode("online") is None


def test_peak_flops_setting_is_checked():
    cfg = load_config("tiny", ["logging.peak_flops=989e12"])
    assert cfg.logging.peak_flops == 989e12
    check_logging_config(cfg)
    with pytest.raises(ConfigError, match="logging.peak_flops"):
        check_logging_config(load_config("tiny", ["logging.peak_flops=0"]))


# ------------------------------------------------------------------------------ FLOPs, peak FLOP/s
def _spec(arch, **overrides):
    return ModelSpec(arch=arch, size="tiny", vocab_size=4096, max_seq_len=128, overrides=overrides)


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_counts_the_lm_head(tied):
    model = build_model(_spec("llama", tie_word_embeddings=tied))
    c = model.config
    d, i, n_layers, v, s = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size, 128
    # per layer: q, k, v, o (d x d each, as many kv heads as heads) and the SwiGLU MLP (3 d x i); the head d x V
    hand = 6 * (n_layers * (4 * d * d + 3 * d * i) + d * v) + 12 * n_layers * d * s
    assert flops_per_token(model, s) == hand == 8675328
    assert count_parameters(model) - count_parameters(build_model(_spec("llama"))) == (0 if tied else d * v)


def test_flops_per_token_equals_lightning_measure_flops():
    from lightning.fabric.utilities.throughput import measure_flops

    model = build_model(_spec("llama", attn_implementation="eager"))  # SDPA on CPU is not counted by torch
    x = torch.randint(0, 4096, (1, 128))
    measured = measure_flops(model, lambda: model(input_ids=x, labels=x).loss, lambda loss: loss)
    assert measured / x.numel() == flops_per_token(model, 128)


def test_flops_per_token_of_an_moe_counts_k_of_e_experts():
    model = build_model(_spec("mixtral"))
    c = model.config
    d, i, e, k, n_layers, v = (c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok,
                               c.num_hidden_layers, c.vocab_size)
    hand = 6 * (n_layers * (4 * d * d + e * d + k * 3 * d * i) + d * v) + 12 * n_layers * d * 128
    assert flops_per_token(model, 128) == hand


def test_peak_flops_comes_from_lightning(monkeypatch):
    from lightning.fabric.utilities.throughput import get_available_flops

    assert peak_flops(torch.device("cpu"), "bf16-mixed") is None
    cuda = torch.device("cuda", 0)
    for name, precision, want in (("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4e12),  # dense datasheet figures
                                  ("NVIDIA A100-SXM4-80GB", "bf16-mixed", 312e12),
                                  ("NVIDIA A100-SXM4-80GB", "16-mixed", 312e12),
                                  ("NVIDIA H200", "bf16-mixed", None)):  # Lightning 2.6.6 knows only SXM1/NVL1
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops(cuda, precision) == want, name
    monkeypatch.undo()
    assert PRECISION_DTYPES["bf16-mixed"] is torch.bfloat16 and PRECISION_DTYPES["32-true"] is torch.float32
    if torch.cuda.is_available():
        dev = torch.device("cuda", 0)
        want = get_available_flops(dev, torch.bfloat16)
        assert peak_flops(dev, "bf16-mixed") == (float(want) if want else None)


# ------------------------------------------------------------------------------ per-expert loads
def test_expert_load_scalars_small_and_tables_large(tmp_path):
    small = torch.rand(4, 8)
    scalars = logs.expert_load_scalars_or_none(small)
    assert len(scalars) == 32 and scalars["moe/load/l3_e7"] == pytest.approx(float(small[3, 7]))
    assert logs.expert_load_scalars_or_none([row for row in small], max_scalars=31) is None
    large = torch.softmax(torch.randn(8, 16), dim=1)
    assert logs.expert_load_scalars_or_none(large) is None

    from lightning.pytorch.loggers import WandbLogger

    lg = WandbLogger(project="t", id="loads", save_dir=str(tmp_path), mode="offline",
                     settings=logs.wandb_settings("offline"))
    lg.experiment
    assert not logs.log_expert_load([lg], large, step=101, every_n_steps=50)
    assert logs.log_expert_load([lg], large, step=100, every_n_steps=50, tokens_seen=1234.0)
    import wandb

    wandb.finish()
    (seg,) = list(tmp_path.glob("wandb/offline-run-*"))
    rows = [h for h in history(wandb_records(next(seg.glob("*.wandb")))) if "moe/load_heatmap" in h]
    assert len(rows) == 1, [sorted(h) for h in history(wandb_records(next(seg.glob("*.wandb"))))]
    row = rows[0]
    assert {f"moe/load_table/l{i}" for i in range(8)} <= set(row)
    assert row["trainer/global_step"] == 100 and row["train/tokens_seen"] == 1234.0
    table = json.loads((seg / "files" / row["moe/load_table/l3"]["path"]).read_text())
    assert table["columns"] == ["expert", "share"]
    assert [r[1] for r in table["data"]] == pytest.approx(large[3].tolist())


def test_add_expert_load_scalars_for_small_moes_only():
    """What the MoE modules call each step: scalar columns up to 64 (layer, expert) pairs; beyond, none (tables go
    to W&B instead, and without a W&B logger nothing is logged and nothing raises)."""
    metrics: dict = {}
    logs.add_expert_load(metrics, [], torch.full((4, 16), 1 / 16), step=50)
    assert len(metrics) == 64 and metrics["moe/load/l3_e15"] == pytest.approx(1 / 16)
    metrics = {"train/loss": 1.0}
    logs.add_expert_load(metrics, [], torch.full((16, 64), 1 / 64), step=50)  # OLMoE-sized: 1,024 pairs
    assert metrics == {"train/loss": 1.0}


# ------------------------------------------------------------------------------ a run cut and resumed
@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, data_cache):
    """tiny, 4 steps, cut at step 2 (trainer.stop_at_step), then resumed with `python -m recipes resume`: two
    offline W&B segments of one run."""
    base = tmp_path_factory.mktemp("wandb_run")
    osh_dir = base / "osh"
    args = [f"run.root={base / 'runs'}", f"data.cache_dir={data_cache}", "data.max_chars_per_domain=200000",
            "logging.wandb=offline", "trainer.progress_bar=false", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
            "data.batch_size=2", "run.run_id=cut",
            "logging.log_checkpoints=true", "logging.wandb_osh=true", f"logging.wandb_osh_dir={osh_dir}",
            "logging.peak_flops=1e12", "checkpoint.every_n_steps=100"]
    out = [io.StringIO(), io.StringIO()]
    took = []
    t0 = time.monotonic()
    with redirect_stdout(out[0]):
        run_dir = train(load_config("tiny", args + ["trainer.stop_at_step=2"]))
    took.append(time.monotonic() - t0)
    time.sleep(1.1)  # segment folders are named by the second they start in
    t0 = time.monotonic()  # the second segment through the command line, as `make resume` runs it
    r = subprocess.run([sys.executable, "-m", "recipes", "resume", str(run_dir)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, WANDB_MODE="offline"))
    took.append(time.monotonic() - t0)
    assert r.returncode == 0, r.stderr[-3000:]
    out[1].write(r.stdout)
    # another W&B run in the same runs root, which must not join this run's sync
    other = base / "runs" / "tiny" / "other"
    import wandb

    other.mkdir(parents=True)
    run = wandb.init(project="t", id="tiny-other", dir=str(other), mode="offline",
                     settings=logs.wandb_settings("offline"))
    run.log({"x": 1})
    run.finish()
    return {"run_dir": run_dir, "root": base / "runs", "osh": osh_dir, "stdout": [o.getvalue() for o in out],
            "took": took}


def test_two_segments_of_one_wandb_run(offline_run):
    files = segment_files(offline_run["run_dir"])
    assert len(files) == 2
    runs = [of_type(wandb_records(f), "run")[0] for f in files]
    assert {r.run_id for r in runs} == {wandb_id_for(offline_run["run_dir"])} == {"tiny-cut"}
    assert all(r.job_type == "train" for r in runs)


def test_resumed_segment_continues_the_x_axis(offline_run):
    files = segment_files(offline_run["run_dir"])
    recs = [wandb_records(f) for f in files]
    for r in recs:  # every family is plotted against tokens seen, in both segments
        globs = {m.glob_name: m.step_metric for m in of_type(r, "metric") if m.glob_name}
        for family in logs.SECTIONS:
            assert globs[f"{family}/*"] == logs.STEP_METRIC
    rows = [h for r in recs for h in history(r)]
    steps = [h["trainer/global_step"] for h in rows]
    tokens = [h[logs.STEP_METRIC] for h in rows if logs.STEP_METRIC in h]
    assert steps == sorted(steps) and tokens == sorted(tokens)
    seg1, seg2 = (history(r) for r in recs)
    assert max(h["trainer/global_step"] for h in seg1 if "train/loss" in h) == 1
    assert min(h["trainer/global_step"] for h in seg2 if "train/loss" in h) == 2  # not 0 again
    assert all(logs.STEP_METRIC in h for h in rows if any(k.startswith(("train/", "val/", "perf/")) for k in h))


def test_console_is_captured(offline_run):
    seg1, seg2 = (console(wandb_records(f)) for f in segment_files(offline_run["run_dir"]))
    assert "`Trainer.fit` stopped" in seg1
    assert "Restored all states from the checkpoint" in seg2 and "== tiny cut: finished at step 4" in seg2


def test_final_checkpoint_is_an_artifact(offline_run):
    run_dir = offline_run["run_dir"]
    seg1, seg2 = (of_type(wandb_records(f), "artifact") for f in segment_files(run_dir))
    assert seg1 == []  # the cut segment did not finish
    (art,) = seg2
    assert art.type == "model" and art.name == "model-tiny-cut" and set(art.aliases) == {"latest", "step4"}
    (entry,) = art.manifest.contents
    assert entry.path == "last.ckpt"
    linked = Path(entry.local_path)
    assert linked.parent == run_dir / "artifacts"
    assert os.path.samefile(linked, run_dir / "checkpoints" / "last.ckpt")  # a hard link, no copy


def test_wandb_osh_requests_a_sync_of_each_segment(offline_run):
    targets = {Path(p.read_text()) for p in offline_run["osh"].glob("*.command")}
    assert targets == {f.parent.resolve() for f in segment_files(offline_run["run_dir"])}


def test_summary_wall_time_is_the_sum_of_the_segments(offline_run):
    run_dir = offline_run["run_dir"]
    times = segment_times(run_dir)
    assert [t["state"] for t in times] == ["stopped", "finished"]
    assert [(t["start_step"], t["end_step"]) for t in times] == [(0, 2), (2, 4)]
    summary = json.loads((run_dir / "summary.json").read_text())
    walls = [t["wall_time_s"] for t in times]
    assert summary["segments"] == 2 and all(w > 0 for w in walls)
    assert summary["wall_time_s"] == pytest.approx(sum(walls), rel=1e-12)
    assert sum(walls) <= sum(offline_run["took"])  # measured inside each call, so within the calls' own time
    assert summary["wall_time_s"] > max(walls)
    assert summary["flops_per_token"] == 8675328
    # logging.peak_flops=1e12 on CPU: mfu = achieved FLOP/s / 1e12
    assert summary["perf/mfu_mean"] == pytest.approx(summary["perf/tflops_mean"])
    assert not [k for k in summary if k.startswith("perf/gpu_mem")] or torch.cuda.is_available()
    from recipes.engine.logs import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.csv") if r.get("perf/mfu") is not None]
    assert len(rows) == 4 and all(r["perf/mfu"] == pytest.approx(r["perf/tflops"]) for r in rows)


def test_end_of_run_block_is_printed(offline_run):
    run_dir = offline_run["run_dir"]
    cut, resumed = offline_run["stdout"]
    assert "== tiny cut: stopped (trainer.stop_at_step) at step 2 ==" in cut
    text = resumed[resumed.index("== tiny cut: finished at step 4 =="):]
    assert text.strip().splitlines()[-1] == f"run_dir: {run_dir}"  # the block comes just before run_dir:
    assert "over 2 segments" in text
    assert "tokens 1,024" in text and "train/loss" in text and "val/loss" in text  # 4 steps x 2 x 128 tokens
    assert f"checkpoints {run_dir / 'checkpoints'}/ (last.ckpt)" in text
    assert f"make export RUN={run_dir}" in text and f"make sync RUN={run_dir}" in text


def test_summary_blocks_format_gpu_figures_and_stages(tmp_path):
    from recipes.engine.loop import format_run_summary, format_stages_summary

    run_dir = tmp_path / "runs" / "adamoe" / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run_dir / "export").mkdir()
    summary = {"recipe": "adamoe", "step": 300, "tokens_seen": 1_228_800, "train/loss": 3.5, "val/loss": 3.75,
               "wall_time_s": 3725.0, "segments": 3, "perf/tokens_per_sec_mean": 51234.4, "perf/tflops_mean": 412.0,
               "perf/mfu_mean": 0.4166, "perf/gpu_mem_alloc_gb_peak": 61.25, "perf/gpu_mem_reserved_gb_peak": 70.5}
    text = format_run_summary(summary, run_dir, "https://wandb.ai/me/lm-recipes/runs/adamoe-r")
    assert "== adamoe r: finished at step 300 ==" in text
    assert "tokens 1,228,800  wall time 1h02m05s over 3 segments" in text
    assert "51,234 tokens/s  412 TFLOP/s per device  MFU 41.7%" in text
    assert "peak GPU memory 61.25 GiB allocated, 70.50 GiB reserved" in text
    assert f"export      {run_dir / 'export'}" in text and "make sync" not in text  # online: nothing to sync
    stages = format_stages_summary("twin_merging", {"test_loss": 2.5, "routes": 4, "name": "x"}, run_dir)
    assert stages.splitlines()[0] == "== twin_merging r: stages finished =="
    assert "test_loss" in stages and "routes" in stages and "name" not in stages


# ------------------------------------------------------------------------------ make sync
def test_sync_passes_exactly_that_runs_segments_in_order(offline_run):
    jobs = {j.run_id: j for j in find_offline_runs(offline_run["root"])}
    assert set(jobs) == {"tiny-cut", "tiny-other"}
    job = jobs["tiny-cut"]
    want = [f.parent for f in segment_files(offline_run["run_dir"])]
    starts = [of_type(wandb_records(f), "run")[0].start_time.ToNanoseconds()
              for f in segment_files(offline_run["run_dir"])]
    assert starts == sorted(starts)  # the folders' order is the order the segments ran in
    assert [s.dir for s in job.segments] == [s.dir for s in job.pending] == want
    cmd = sync_command(job.pending)
    assert cmd[1:4] == ["-m", "wandb", "sync"] and "--include-offline" not in cmd
    assert cmd[-2:] == [str(d) for d in want]
    assert [j.run_id for j in find_offline_runs(offline_run["run_dir"])] == ["tiny-cut"]  # RUN=<run_dir>


def _copy_run(offline_run, tmp_path):
    dst = tmp_path / "runs" / "tiny" / "cut"
    shutil.copytree(offline_run["run_dir"] / "wandb", dst / "wandb", symlinks=True)
    return dst


def test_the_pinned_cli_accepts_the_call_and_fails_on_the_connection(offline_run, tmp_path):
    run_dir = _copy_run(offline_run, tmp_path)
    (job,) = find_offline_runs(run_dir)
    env = dict(os.environ, WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY=FAKE_KEY,
               WANDB__GRAPHQL_RETRY_MAX="1", WANDB__GRAPHQL_RETRY_WAIT_MIN_SECONDS="0.1",
               WANDB__GRAPHQL_RETRY_WAIT_MAX_SECONDS="0.2", WANDB__FILE_STREAM_RETRY_MAX="1",
               WANDB__FILE_TRANSFER_RETRY_MAX="1")
    echoed = []
    result = run_sync_job(job, env=env, echo=echoed.append, timeout=240)
    assert not result.ok and result.uploaded == []
    assert result.failure == "connection", result.output
    assert "127.0.0.1:9" in result.output and "Syncing 2 run(s)" in result.output
    assert "usage" not in result.output.lower() and "removed" not in result.output.lower()
    assert not list(run_dir.glob("wandb/*/*.synced")) and len(echoed) >= 3


def test_no_key_or_no_network_is_one_line(offline_run, tmp_path, clean_env, capsys):
    run_dir = _copy_run(offline_run, tmp_path)
    assert sync_offline_runs(str(run_dir)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no W&B API key" in err[0] and "WANDB_API_KEY" in err[0]
    clean_env.setenv("WANDB_API_KEY", FAKE_KEY)
    clean_env.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    t0 = time.monotonic()
    assert sync_offline_runs(str(run_dir)) == 1
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the W&B server" in err[0] and "127.0.0.1:9" in err[0]


def test_synced_segments_are_skipped(offline_run, tmp_path, clean_env, capsys):
    from wandb.cli import beta_sync

    run_dir = _copy_run(offline_run, tmp_path)
    (job,) = find_offline_runs(run_dir)
    first, second = job.segments
    first.marker.touch()  # what wandb writes after uploading a .wandb file
    (job,) = find_offline_runs(run_dir)
    assert [s.dir for s in job.pending] == [second.dir]
    # the pinned CLI would skip the same file
    theirs = beta_sync._find_wandb_files([first.dir, second.dir], skip_synced=True, skip_online=True, verbose=False)
    assert {p.resolve() for p in theirs} == {second.wandb_file.resolve()}
    # a segment that grew after its upload (a live sync by wandb-osh) goes again
    stamp = first.wandb_file.stat().st_mtime
    os.utime(first.marker, (stamp - 10, stamp - 10))
    assert [s.dir for s in find_offline_runs(run_dir)[0].pending] == [first.dir, second.dir]
    for s in (first, second):
        s.marker.touch()
    assert find_offline_runs(run_dir)[0].pending == []
    # nothing to upload: no key, no network needed
    assert sync_offline_runs(str(run_dir)) == 0
    assert "tiny-cut: already synced (2 segment(s)" in capsys.readouterr().out


# ------------------------------------------------------------------------------ make analyze
def test_analysis_is_its_own_wandb_run(tmp_path):
    from recipes.openmoe.analyze import analysis_wandb_run, analyze_wandb_id

    run_dir = tmp_path / "runs" / "openmoe" / "r1"
    run_dir.mkdir(parents=True)
    for group, want_group in ((None, "openmoe-r1"), ("sweep-7", "sweep-7")):
        over = ["logging.wandb=offline"] + ([f"logging.group={group}"] if group else [])
        run = analysis_wandb_run(run_dir, load_config("openmoe", over), {"recipe": "openmoe"}, "offline")
        assert run.id == analyze_wandb_id(run_dir) == "openmoe-r1-analyze" != wandb_id_for(run_dir)
        run.log({"analysis/x": 1.0})
        run.finish()
        newest = sorted(run_dir.glob("analysis/wandb/offline-run-*/*.wandb"))[-1]
        (rec,) = of_type(wandb_records(newest), "run")
        assert rec.run_id == "openmoe-r1-analyze" and rec.job_type == "analyze" and rec.run_group == want_group
        time.sleep(1.1)
    assert not (run_dir / "wandb").exists()  # nothing written as a segment of the training run
    (job,) = find_offline_runs(run_dir)
    assert job.run_id == "openmoe-r1-analyze" and len(job.segments) == 2


# ------------------------------------------------------------------------------ tokenizer training
def test_tokenizer_training_says_what_it_does(tmp_path, capsys):
    from data.corpus import Document
    from data.tokenizers import load_or_train_tokenizer

    docs = [Document("d", str(i), f"def f{i}(x):\n    return x * {i} + sum(range({i}))\n" * 20) for i in range(40)]
    load_or_train_tokenizer("bpe", 400, docs, str(tmp_path))
    err = capsys.readouterr().err
    assert "[data] training the bpe tokenizer (vocabulary 400) on 40 documents" in err
    assert "[data] tokenizer trained in " in err
    load_or_train_tokenizer("bpe", 400, docs, str(tmp_path))
    assert "[data]" not in capsys.readouterr().err  # cached: silent
