"""`make sync [RUN=<run_dir>]` (= `python -m recipes sync [<runs root or run dir>]`): upload offline W&B runs.

A training run that was cut and resumed has one offline segment per piece, all under the same W&B run id:
`<run_dir>/wandb/offline-run-<YYYYMMDD_HHMMSS>-<id>/run-<id>.wandb`. Each W&B run found under the given folder
(a training run, a sub-run of a staged recipe, the `<id>-analyze` run of `make analyze`) is uploaded with ONE call
of the pinned wandb CLI (0.31: `wandb sync [PATHS]`, which syncs the files of one run in order of start time)
with all its segments not yet uploaded, oldest first. wandb marks an uploaded segment with the file
`run-<id>.wandb.synced` next to its `.wandb` file; a segment whose marker is older than its `.wandb` file (it grew
after a live sync through wandb-osh) is uploaded again (`--include-synced`; W&B keeps the step numbers of a file
it already saw in `run-<id>.wandb.syncstate`, so this does not duplicate history).

Before any upload: one line and exit 1 when there is no API key (WANDB_API_KEY or a netrc entry) or the server
cannot be reached. The CLI exits 0 even when it uploads nothing, so success is judged by the markers.

The server (wandb_base_url), the key (wandb_api_key_source) and the quick probe (wandb_reachable) are here, free
of Lightning and torch, and also decide `logging.wandb=auto` (recipes.engine.logs.resolve_wandb_mode).
"""
from __future__ import annotations

import argparse
import configparser
import netrc
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

SEGMENT_PATTERN = re.compile(r"^offline-run-(\d{8}_\d{6})-(.+)$")

# What the CLI prints (lower-cased) when it could not talk to the server, when the key was refused, and when it
# did not accept the call at all.
CONNECTION_ERRORS = ("connection refused", "dial tcp", "no such host", "i/o timeout", "network is unreachable",
                     "connection reset", "tls handshake", "timed out", "timeout", "giving up after")
AUTH_ERRORS = ("401", "403", "unauthorized", "not authenticated", "invalid api key", "api key")
USAGE_ERRORS = ("usage:", "no such option", "have been removed", "invalid value", "got unexpected extra")


# ------------------------------------------------------------------------- the server, the key, the network
DEFAULT_BASE_URL = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 2.5  # how long the probe of the W&B server may take (`logging.wandb=auto`, `make sync`)
PROBE_CACHE_S = 300.0  # a probe result is reused this long within one process (sub-runs, analyze)
_PROBES: Dict[Tuple[str, int], Tuple[float, bool, str]] = {}


def wandb_base_url() -> str:
    """The W&B server: WANDB_BASE_URL, else `base_url` of W&B's settings file (`wandb login --host ...`), else
    api.wandb.ai."""
    url = os.environ.get("WANDB_BASE_URL")
    if not url:
        settings = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb") / "settings"
        parser = configparser.ConfigParser()
        try:
            parser.read(settings)
            url = parser.get("default", "base_url", fallback=None)
        except (configparser.Error, OSError, UnicodeDecodeError):
            url = None
    return (url or DEFAULT_BASE_URL).rstrip("/")


def wandb_api_key_source(base_url: Optional[str] = None) -> Optional[str]:
    """Where W&B finds an API key for the server: "WANDB_API_KEY", the netrc file with an entry for its host
    (`wandb login` writes ~/.netrc; NETRC names another file), or None: not logged in."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    host = urlsplit(base_url or wandb_base_url()).netloc
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        found = netrc.netrc(path).authenticators(host) if host else None
    except (OSError, netrc.NetrcParseError):
        return None
    return path if found and found[2] else None


def wandb_logged_in() -> bool:
    return wandb_api_key_source() is not None


def probe_address(base_url: str) -> Tuple[str, int, bool, str]:
    """(host, port, tls, description) of the first hop to the W&B server: the HTTP(S) proxy from the environment
    when one applies to its host, else the server itself (tls: an https server reached directly)."""
    from urllib.request import getproxies_environment, proxy_bypass_environment

    parts = urlsplit(base_url if "://" in base_url else f"https://{base_url}")
    host = parts.hostname or "api.wandb.ai"
    port = parts.port or (80 if parts.scheme == "http" else 443)
    proxy = getproxies_environment().get(parts.scheme or "https")
    if proxy and not proxy_bypass_environment(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if p.hostname:
            pport = p.port or (443 if p.scheme == "https" else 80)
            return p.hostname, pport, False, f"proxy {p.hostname}:{pport} (for {host})"
    return host, port, parts.scheme != "http", f"{host}:{port}"


def wandb_reachable(base_url: Optional[str] = None, timeout: float = PROBE_TIMEOUT_S) -> Tuple[bool, str]:
    """Whether the W&B server (or the proxy in front of it) answers within `timeout` seconds in all, name
    resolution included: a TCP connection, plus a TLS handshake for an https server (a middlebox that only accepts
    connections does not pass that). Returns (reachable, what was tried and, if not, why); the result is reused
    for PROBE_CACHE_S within the process."""
    host, port, tls, what = probe_address(base_url or wandb_base_url())
    hit = _PROBES.get((host, port))
    if hit is not None and time.monotonic() - hit[0] < PROBE_CACHE_S:
        return hit[1], hit[2]
    outcome: Dict[str, Any] = {}

    def connect() -> None:  # in a thread: getaddrinfo has no timeout of its own
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                if tls:
                    import ssl

                    context = ssl.create_default_context()
                    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # liveness only
                    context.wrap_socket(sock, server_hostname=host).close()
            outcome["ok"] = True
        except (OSError, ValueError) as e:
            outcome["error"] = getattr(e, "strerror", None) or str(e) or type(e).__name__

    worker = threading.Thread(target=connect, daemon=True, name="wandb-probe")
    worker.start()
    worker.join(timeout + 0.1)
    ok = bool(outcome.get("ok"))
    detail = what if ok else f"{what}: {outcome.get('error', f'no answer within {timeout:g} s')}"
    _PROBES[(host, port)] = (time.monotonic(), ok, detail)
    return ok, detail


def forget_probes() -> None:
    """Drop the cached probe results (the next wandb_reachable connects again)."""
    _PROBES.clear()


@dataclass
class Segment:
    """One offline segment: the folder wandb wrote for one `wandb.init` of the run."""

    dir: Path
    started: str  # YYYYMMDD_HHMMSS, from the folder name
    run_id: str

    @property
    def wandb_file(self) -> Optional[Path]:
        files = sorted(self.dir.glob("*.wandb"))
        return files[0] if files else None

    @property
    def marker(self) -> Optional[Path]:
        f = self.wandb_file
        return f.with_name(f.name + ".synced") if f is not None else None

    @property
    def synced(self) -> bool:
        """Uploaded, and not written to since (the marker is at least as new as the .wandb file)."""
        f, m = self.wandb_file, self.marker
        if f is None or m is None or not m.exists():
            return False
        return m.stat().st_mtime >= f.stat().st_mtime

    def sort_key(self) -> Tuple[str, float, str]:
        f = self.wandb_file
        return self.started, (f.stat().st_mtime if f is not None else 0.0), self.dir.name


@dataclass
class SyncJob:
    """The offline segments of one W&B run in one wandb folder, oldest first."""

    wandb_dir: Path
    run_id: str
    segments: List[Segment] = field(default_factory=list)

    @property
    def pending(self) -> List[Segment]:
        """The segments to upload: those with a .wandb file and no up-to-date marker, oldest first."""
        return [s for s in self.segments if s.wandb_file is not None and not s.synced]

    @property
    def empty(self) -> List[Segment]:
        """Segments without a .wandb file (the process died before W&B started): nothing to upload."""
        return [s for s in self.segments if s.wandb_file is None]


def find_offline_runs(path: Path) -> List[SyncJob]:
    """Every W&B run with offline segments under `path` (a runs root or a run directory), one SyncJob each, in
    path order; a job's segments are in chronological order (start time in the folder name, then the .wandb
    file's modification time)."""
    jobs: Dict[Tuple[Path, str], SyncJob] = {}
    for d in sorted(Path(path).glob("**/wandb/offline-run-*")):
        m = SEGMENT_PATTERN.match(d.name)
        if not d.is_dir() or d.is_symlink() or m is None:
            continue
        key = (d.parent, m.group(2))
        jobs.setdefault(key, SyncJob(d.parent, m.group(2))).segments.append(Segment(d, m.group(1), m.group(2)))
    for job in jobs.values():
        job.segments.sort(key=Segment.sort_key)
    return [jobs[k] for k in sorted(jobs, key=lambda k: (str(k[0]), k[1]))]


def sync_command(segments: Sequence[Segment]) -> List[str]:
    """The pinned CLI, once, with the segment folders in the given (chronological) order. `--include-synced`: the
    caller already left out what is up to date, and a segment that grew after its last upload must go again."""
    return [sys.executable, "-m", "wandb", "sync", "--include-synced", *[str(s.dir) for s in segments]]


def cli_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of the CLI: as ours, minus what would silence it or switch W&B off (WANDB_SILENT,
    WANDB_MODE; `make` sets the first, tests the second)."""
    env = dict(os.environ if base is None else base)
    for key in ("WANDB_SILENT", "WANDB_MODE"):
        env.pop(key, None)
    return env


def classify_failure(output: str) -> str:
    """'connection', 'auth', 'usage' or 'unknown', from what the CLI printed."""
    low = output.lower()
    for kind, needles in (("usage", USAGE_ERRORS), ("connection", CONNECTION_ERRORS), ("auth", AUTH_ERRORS)):
        if any(n in low for n in needles):
            return kind
    return "unknown"


@dataclass
class SyncResult:
    job: SyncJob
    segments: List[Segment]
    returncode: int
    output: str
    uploaded: List[Segment]

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and len(self.uploaded) == len(self.segments)

    @property
    def failure(self) -> Optional[str]:
        return None if self.ok else classify_failure(self.output)


def run_sync_job(job: SyncJob, env: Optional[Dict[str, str]] = None, echo: Callable[[str], None] = print,
                 timeout: Optional[float] = None) -> SyncResult:
    """Run the CLI once for the job's pending segments, echoing its output; the result says which segments now
    carry an up-to-date marker."""
    segments = job.pending
    cmd = sync_command(segments)
    lines: List[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=cli_env(env))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            echo(f"  | {lines[-1]}")
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        lines.append(f"wandb sync timed out after {timeout:g} s")
        code = 124
    return SyncResult(job, segments, code, "\n".join(lines), [s for s in segments if s.synced])


def sync_offline_runs(root: str = "runs", check_network: bool = True, env: Optional[Dict[str, str]] = None,
                      echo: Callable[[str], None] = print) -> int:
    """Upload every offline W&B run under `root` (a runs root or one run directory). 0: all uploaded or already
    up to date; 1: no key, no network, or some run failed (each says why, in one line); 2: no such folder.
    The key and the server are those of this process's environment (WANDB_API_KEY, NETRC, WANDB_BASE_URL);
    `env` replaces the CLI's environment only."""
    root_path = Path(root)
    if not root_path.exists():
        print(f"make sync: {root} does not exist.", file=sys.stderr)
        return 2
    jobs = find_offline_runs(root_path)
    if not jobs:
        echo(f"No offline W&B runs under {root}.")
        return 0
    todo = []
    for job in jobs:
        for s in job.empty:
            echo(f"{s.dir}: no .wandb file (the process ended before W&B started), skipped.")
        if job.pending:
            todo.append(job)
        elif any(s.wandb_file is not None for s in job.segments):
            n = sum(s.wandb_file is not None for s in job.segments)
            echo(f"{job.run_id}: already synced ({n} segment(s) in {job.wandb_dir}).")
    if not todo:
        return 0
    url = wandb_base_url()
    source = wandb_api_key_source(url)
    reachable, detail = wandb_reachable(url) if check_network else (True, "")
    if source is None:
        print(f"make sync: no W&B API key for {url}: set WANDB_API_KEY, or run `wandb login` once (it writes "
              "~/.netrc). Nothing was uploaded.", file=sys.stderr)
        return 1
    if not reachable:
        print(f"make sync: cannot reach the W&B server ({detail}): no network here. Run `make sync` where there "
              "is (e.g. the login node); nothing was uploaded.", file=sys.stderr)
        return 1
    failed = 0
    for job in todo:
        echo(f"syncing {job.run_id}: {len(job.pending)} segment(s) from {job.wandb_dir}")
        result = run_sync_job(job, env=env, echo=echo)
        if result.ok:
            echo(f"synced {job.run_id} ({len(result.segments)} segment(s)).")
            continue
        failed += 1
        why = {"connection": "connection error (network or server down)",
               "auth": "the server refused the API key (`wandb login --relogin`)",
               "usage": "the wandb CLI refused the call (wandb version?)"}.get(result.failure or "", "see above")
        print(f"make sync: {job.run_id} not synced ({len(result.uploaded)}/{len(result.segments)} segment(s) "
              f"uploaded): {why}.", file=sys.stderr)
    if failed:
        print(f"make sync: {failed} of {len(todo)} W&B run(s) failed; run it again to retry them.", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes sync", description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", default="runs", help="a runs root or one run directory (default: runs)")
    args = parser.parse_args(argv)
    return sync_offline_runs(args.path)
