"""A real one-node SLURM cluster (Debian's slurm-wlm + munge, started here as root without systemd):
launch.sh is submitted with a short time limit, gets SIGUSR1 before it, checkpoints, requeues itself, resumes,
and ends with the same final loss as an uninterrupted run.

.ci/run installs the packages (`apt-get install -y slurm-wlm munge`); without them, or not as root, the
test skips with the reason.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


def _which(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _skip_reason():
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root to start slurmctld/slurmd/munged"
    missing = [d for d in DAEMONS if _which(d) is None]
    if missing:
        return f"slurm-wlm/munge not installed (missing {', '.join(missing)}): apt-get install -y slurm-wlm munge"
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """munged + slurmctld + slurmd in the foreground of child processes, all files under `base`."""

    def __init__(self, base: Path, cpus: int):
        self.base = base
        self.procs = []
        self.munge_socket = base / "munge" / "munge.socket"
        self.conf = base / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for k in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[k]  # a test run inside a SLURM job must not leak its own job's variables
        self.cpus = cpus

    def start(self):
        b = self.base
        for d in ("munge", "state", "spool", "log"):
            (b / d).mkdir(mode=0o700, parents=True, exist_ok=True)
        key = b / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text("\n".join([
            "ClusterName=recipes-test", "SlurmctldHost=localhost", "SlurmUser=root", "SlurmdUser=root",
            # cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket},cred_expire=30",
            "SchedulerParameters=sched_interval=5",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={b / 'state'}", f"SlurmdSpoolDir={b / 'spool'}",
            f"SlurmctldPidFile={b / 'slurmctld.pid'}", f"SlurmdPidFile={b / 'slurmd.pid'}",
            f"SlurmctldLogFile={b / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={b / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "SchedulerType=sched/builtin", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", "JobRequeue=1", "KillWait=10",
            "SlurmctldTimeout=30", "SlurmdTimeout=60", "InactiveLimit=0", "MinJobAge=600",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP", ""]))
        self._spawn([_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={key}", f"--pid-file={b / 'munge' / 'munged.pid'}",
                     f"--log-file={b / 'log' / 'munged.log'}", f"--seed-file={b / 'munge' / 'seed'}"], "munged")
        self._wait(lambda: self.munge_socket.exists(), "munged socket")
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._wait(lambda: self._run("scontrol", "ping").returncode == 0, "slurmctld to answer")
        self._spawn([_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)], "slurmd")
        self._wait(lambda: "idle" in self._run("sinfo", "-h", "-o", "%t").stdout, "the node to be idle")

    def _spawn(self, cmd, name):
        log = open(self.base / "log" / f"{name}.stdout", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _run(self, *cmd):
        return subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env, capture_output=True,
                              text=True, timeout=60)

    def _wait(self, cond, what, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a daemon exited while waiting for {what}: {p.args[0]}\n{self.logs()}")
            if cond():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}\n{self.logs()}")

    def logs(self):
        out = []
        for f in sorted((self.base / "log").glob("*")):
            out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def stop(self):
        if shutil.which("scancel") or _which("scancel"):
            self._run("scancel", "--user=root")
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture
def cluster(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # slurmd and the job run as root; keep everything in a directory root owns and can enter
    c = Cluster(tmp_path / "slurm", cpus=max(1, os.cpu_count() or 1))
    try:
        c.start()
    except Exception as e:  # e.g. a container that forbids what slurmd needs
        c.stop()
        pytest.skip(f"could not start a local SLURM cluster: {e}"[:2000])
    yield c
    c.stop()


def _overrides(tmp_path, data_cache, steps):
    return [f"data.cache_dir={data_cache}", "data.max_chars_per_domain=200000", "trainer.progress_bar=false",
            "logging.wandb=disabled", f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=1000", "optim.warmup_steps=2", "checkpoint.every_n_steps=10",
            "data.batch_size=16"]


def test_launch_sh_is_signalled_requeued_and_resumes_to_the_same_loss(tmp_path, data_cache, cluster):
    steps = 150  # about a minute of training on 2 cores: longer than one segment, so it is cut at least once
    args = _overrides(tmp_path, data_cache, steps)
    straight = subprocess.run([sys.executable, "-m", "recipes", "train", "tiny", *args,
                               f"run.root={tmp_path / 'plain'}", "run.run_id=straight"], cwd=ROOT,
                              env=dict(cluster.env, WANDB_MODE="disabled"), capture_output=True, text=True,
                              timeout=1800)
    assert straight.returncode == 0, straight.stderr[-3000:]
    want = json.loads((tmp_path / "plain" / "tiny" / "straight" / "summary.json").read_text())

    runs = tmp_path / "runs"
    out = tmp_path / "job-%j.out"
    # --time=1 (minute) with SIGUSR1 40 s before the limit: each segment is cut ~20 s in (SLURM's signal
    # timer has up to a minute of slack, hence a short limit). launch.sh's own #SBATCH defaults are overridden.
    sub = cluster._run("sbatch", "--parsable", "--time=1", "--signal=USR1@40", "--ntasks-per-node=1",
                       f"--cpus-per-task={cluster.cpus}", f"--chdir={ROOT}", f"--output={out}",
                       f"--export=ALL,PY={sys.executable},RUN_ROOT={runs},WANDB_MODE=disabled",
                       str(ROOT / "launch.sh"), "tiny", *args)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    run_dir = runs / "tiny" / f"slurm-{job}"
    deadline = time.time() + 1800
    state = ""
    while time.time() < deadline:
        q = cluster._run("scontrol", "show", "job", job)
        state = next((w.split("=", 1)[1] for w in q.stdout.split() if w.startswith("JobState=")), "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(3)
    log = Path(str(out).replace("%j", job))
    text = log.read_text(errors="replace") if log.exists() else "(no job output)"
    assert state == "COMPLETED", f"job {job} ended {state!r}\n{text[-4000:]}\n{cluster.logs()}"
    assert text.count("[preemption] checkpoint at step") >= 1, text[-4000:]
    assert "scontrol requeue" in text and "resuming" in text, text[-4000:]
    got = json.loads((run_dir / "summary.json").read_text())
    assert got["step"] == want["step"] == steps
    assert abs(got["train/loss"] - want["train/loss"]) < 1e-5, (got["train/loss"], want["train/loss"])
