"""The command line: python -m recipes <command> ...  (the Makefile calls only this)

  list                               the recipes, one line each
  show <recipe> [key=value ...]      print the resolved config
  train <recipe> [key=value ...]     train a recipe (also: python -m recipes <recipe> [key=value ...])
  resume <run_dir> [key=value ...]   continue a run from its newest checkpoint
  export <run_dir> [--out DIR]       the newest checkpoint as a save_pretrained directory
  sync [runs_root]                   upload offline W&B runs
  sweep <recipe> <sweep.yaml> [...]  a grid / list of override sets, one run per point (--index I: one point)
  convert-checkpoint <path> --trust  rewrite a trusted checkpoint of another format as plain data
plus the commands the recipes contribute (e.g. analyze, fuse); `python -m recipes <command> --help`.
"""
from __future__ import annotations

import os
import sys

BUILTIN = ("list", "show", "train", "resume", "export", "sync", "convert-checkpoint", "sweep")
# Engine commands implemented in a module of their own: name -> module with main(argv) -> exit code.
ENGINE_COMMANDS = {"dashboard": "recipes.engine.dashboard", "report": "recipes.engine.report",
                   "data": "recipes.engine.data_prep", "plan": "recipes.engine.plan"}


def _die(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _record_cluster_signals_early() -> None:
    """SLURM's SIGUSR1 / SIGTERM may arrive while imports and data set-up still run (their default action
    kills the process): record them from the first instant; the run checkpoints at its first step boundary."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        from .engine.early_signals import record_early_signal

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, record_early_signal)


def _list() -> int:
    from .engine.recipe import REGISTRY, load_all

    load_all()
    width = max(len(n) for n in REGISTRY)
    for name in sorted(REGISTRY):
        r = REGISTRY[name]
        print(f"{name:<{width}}  [{r.method}] {r.description}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _record_cluster_signals_early()
    if argv and argv[0] == "sync":  # no recipe needs importing for it (login nodes: fast)
        from .engine.sync import main as sync_main

        return int(sync_main(argv[1:]) or 0)
    from .engine.errors import ConfigError
    from .engine.recipe import all_commands, recipe_names

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        print("recipes:", ", ".join(recipe_names()))
        print("recipe commands:", ", ".join(sorted(all_commands())))
        return 0
    cmd, rest = argv[0], argv[1:]
    extra = all_commands()
    if cmd not in BUILTIN and cmd not in extra and cmd not in ENGINE_COMMANDS:
        cmd, rest = "train", argv
    try:
        if cmd == "list":
            return _list()
        if cmd in extra:
            return int(extra[cmd](rest) or 0)
        if cmd in ENGINE_COMMANDS:
            import importlib

            return int(importlib.import_module(ENGINE_COMMANDS[cmd]).main(rest) or 0)
        if cmd == "export":
            from .engine.export import main as export_main

            return export_main(rest)
        if cmd == "sweep":
            from .engine.sweep import main as sweep_main

            return sweep_main(rest)
        if cmd == "convert-checkpoint":
            from .engine.convert import main as convert_main

            return convert_main(rest)
        if not rest:
            return _die(f"'{cmd}' needs a {'run directory' if cmd == 'resume' else 'recipe'}; recipes: "
                        + ", ".join(recipe_names()))
        from data.corpus import DataError

        from .engine.config import load_config

        if cmd == "show":
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(load_config(rest[0], rest[1:])))
            return 0
        from .engine.loop import RunInterrupted, check_resume, resume_run, train
        from .engine.module import NonFiniteLossError
        from .engine.runs import is_launching_process, lock_run_dir, make_run_dir, record_segment

        run_dir = None
        lock = None
        try:
            if cmd == "resume":
                run_dir = rest[0]
                check_resume(run_dir, rest[1:])  # a bad override or checkpoint stops here, nothing touched
                lock = lock_run_dir(run_dir)
                resume_run(run_dir, rest[1:])
            else:
                cfg = load_config(rest[0], rest[1:])
                run_dir = make_run_dir(cfg, overwrite=bool(cfg.run.overwrite))
                lock = lock_run_dir(run_dir)
                if is_launching_process():
                    record_segment(run_dir, rest[1:], None, 0)
                train(cfg, run_dir=run_dir)
        except RunInterrupted as e:
            if is_launching_process():
                print(f"interrupted: {e}", file=sys.stderr)
            return e.exit_code
        except NonFiniteLossError as e:
            return _die(str(e), code=3)
        except DataError as e:
            return _die(str(e))
        finally:
            if lock is not None:
                lock.release()
        print(f"run_dir: {run_dir}")
        return 0
    except ConfigError as e:
        return _die(str(e))
    except KeyboardInterrupt:
        return _die("interrupted before the first training step (nothing to checkpoint yet); start it again, or "
                    "`make resume RUN=<run_dir>` once it has a checkpoint.", code=130)


if __name__ == "__main__":
    code = main()
    from recipes.engine.early_signals import ignore_late_signals

    ignore_late_signals()  # the command is over: a SLURM warning during interpreter shutdown must not kill it
    sys.exit(code)
