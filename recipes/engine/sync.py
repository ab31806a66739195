"""`make sync`: upload offline W&B runs found under the runs root."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def sync_offline_runs(root: str = "runs") -> int:
    dirs = sorted(Path(root).glob("**/wandb/offline-run-*"))
    if not dirs:
        print(f"No offline W&B runs under {root}/.")
        return 0
    failed = 0
    for d in dirs:
        print(f"syncing {d}")
        rc = subprocess.call([sys.executable, "-m", "wandb", "sync", "--include-offline", str(d)])
        failed += rc != 0
    if failed:
        print(f"{failed} run(s) failed to sync (are you logged in? `wandb login`).", file=sys.stderr)
    return 1 if failed else 0
