"""Command line: python -m recipes <command> ...

  python -m recipes list                         the recipes
  python -m recipes train <recipe> [key=value]   train (also: python -m recipes <recipe> [key=value])
  python -m recipes resume <run_dir> [key=value] continue a run from its newest checkpoint
  python -m recipes show <recipe> [key=value]    print the resolved config
  python -m recipes sync [runs_root]             upload offline W&B runs
"""
from __future__ import annotations

import os
import sys


def _die(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .config import ConfigError, available_recipes, load_config

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        print("recipes:", ", ".join(available_recipes()))
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in ("list", "train", "resume", "show", "sync"):
        cmd, rest = "train", argv
    try:
        if cmd == "list":
            for r in available_recipes():
                print(r)
            return 0
        if cmd == "sync":
            from .sync import sync_offline_runs

            return sync_offline_runs(rest[0] if rest else "runs")
        if not rest:
            _die(f"'{cmd}' needs a {'run directory' if cmd == 'resume' else 'recipe'}; recipes: "
                 + ", ".join(available_recipes()))
        from data.corpus import DataError

        if cmd == "show":
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(load_config(rest[0], rest[1:])))
            return 0
        from .lm_module import NonFiniteLossError
        from .train import resume_run, train

        try:
            if cmd == "resume":
                run_dir = resume_run(rest[0], rest[1:])
            else:
                cfg = load_config(rest[0], rest[1:])
                run_dir = train(cfg)
        except NonFiniteLossError as e:
            _die(str(e), code=3)
        except DataError as e:
            _die(str(e))
        print(f"run_dir: {run_dir}")
        return 0
    except ConfigError as e:
        _die(str(e))
    except KeyboardInterrupt:
        _die("interrupted; `make resume RUN=<run_dir>` continues from the last checkpoint.", code=130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
