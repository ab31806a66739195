"""Copy model source files of this repository into an export folder so that transformers can import them there.

transformers' remote code (`trust_remote_code=True`) imports the module named in config.json's `auto_map` from
the checkpoint folder and, with it, every file it imports relatively (`from .name import ...`), all in ONE flat
folder (on the Hub too: `from .a.b import` is not supported). So each first-party module a wrapper needs is
copied under a flat name and its imports of other first-party modules are rewritten to relative ones:

    models/moe/block.py              -> moe_block.py   `from models.moe.block import X` -> `from .moe_block import X`
    models/moe/__init__.py           -> moe.py
    models/factory.py                -> factory.py
    models/hub_export/modeling_x.py  -> modeling_x.py  (the wrappers keep their own names)

The set of files is the closure of the entry modules over their first-party imports (module level and inside
functions, as transformers copies and checks both), read from the sources as they are at export time, so an
export always carries the code its weights were trained with. Nothing else in a file changes.

Refused (a ValueError naming the file and line), because the copy could not import it: `import models.x`,
`from models import x`, `from . import x` (no module name to rewrite to a file), and any import of another
first-party package (recipes, data, ...): models/ must stay self-contained for this.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

MODELS_PACKAGE = "models"
WRAPPER_PACKAGE = "models.hub_export"
REPO_ROOT = Path(__file__).resolve().parents[2]  # the directory holding models/
# The first-party top-level packages of the repository that models/ must not reach into.
OTHER_FIRST_PARTY = ("recipes", "data", "bench", "tests")
HEADER = ("# Copied from {source} of the lm-recipes repository when this model was exported; its imports of the\n"
          "# repository's modules were made relative (models/hub_export/bundle.py). Nothing else differs.\n")


@dataclass(frozen=True)
class BundledFile:
    module: str  # dotted name in the repository, e.g. models.moe.block
    source: Path  # the repository file
    name: str  # the flat file name in the export, e.g. moe_block.py
    text: str  # the rewritten source


def module_path(module: str, root: Path = REPO_ROOT) -> Path:
    """The source file of a module of models/ under the repository root `root` (a package's __init__.py)."""
    if module != MODELS_PACKAGE and not module.startswith(MODELS_PACKAGE + "."):
        raise ValueError(f"{module} is not a module of the {MODELS_PACKAGE} package")
    base = Path(root).joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    raise ValueError(f"no source file for module {module} (looked for {base}.py and {base}/__init__.py)")


def is_module(module: str, root: Path = REPO_ROOT) -> bool:
    try:
        module_path(module, root)
    except ValueError:
        return False
    return True


def flat_name(module: str) -> str:
    """The export file name (without .py) of a module: the wrappers keep their base name, every other module
    of models/ is its dotted path below `models` joined by underscores."""
    if module.startswith(WRAPPER_PACKAGE + "."):
        return module[len(WRAPPER_PACKAGE) + 1:].replace(".", "_")
    if module == MODELS_PACKAGE or module == WRAPPER_PACKAGE:
        raise ValueError(f"the package {module} itself is never bundled")
    return module[len(MODELS_PACKAGE) + 1:].replace(".", "_")


def _package_of(module: str, source: Path) -> str:
    return module if source.name == "__init__.py" else module.rpartition(".")[0]


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    if node.level > 1:
        parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _first_party_imports(module: str, source: Path, text: str, root: Path) -> List[Tuple[ast.stmt, str]]:
    """(import node, imported module) for every import of a first-party module; refuses the forms that a
    flat copy cannot import."""
    tree = ast.parse(text, str(source))
    package = _package_of(module, source)
    found = []
    for node in ast.walk(tree):
        where = f"{source}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == MODELS_PACKAGE:
                    raise ValueError(f"{where}: `import {alias.name}` cannot be bundled; write "
                                     f"`from {alias.name.rpartition('.')[0] or alias.name} import ...`")
                if top in OTHER_FIRST_PARTY:
                    raise ValueError(f"{where}: a model module imports {alias.name}; models/ must not import "
                                     f"{top}/ (an export could not carry it)")
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, package)
            top = target.split(".")[0]
            if top in OTHER_FIRST_PARTY:
                raise ValueError(f"{where}: a model module imports {target}; models/ must not import {top}/ "
                                 "(an export could not carry it)")
            if top != MODELS_PACKAGE:
                continue
            submodules = [a.name for a in node.names if is_module(f"{target}.{a.name}", root)]
            if node.module is None or target in (MODELS_PACKAGE, WRAPPER_PACKAGE) or submodules:
                raise ValueError(f"{where}: `from {'.' * node.level}{node.module or ''} import "
                                 f"{', '.join(a.name for a in node.names)}` imports a module by name; write "
                                 "`from <package>.<module> import <names>` so that the export can rewrite it")
            found.append((node, target))
    return found


_FROM_MODULE = re.compile(r"from\s+(\.*[\w.]*)\s+import")


def _rewrite(text: str, imports: Iterable[Tuple[ast.stmt, str]], source: Path) -> str:
    lines = text.splitlines(keepends=True)
    for node, target in sorted(imports, key=lambda item: (item[0].lineno, item[0].col_offset), reverse=True):
        index, col = node.lineno - 1, node.col_offset
        line = lines[index]
        match = _FROM_MODULE.match(line, col)
        if match is None:
            raise ValueError(f"{source}:{node.lineno}: cannot find the module name of this import to rewrite it")
        lines[index] = line[:match.start(1)] + "." + flat_name(target) + line[match.end(1):]
    return "".join(lines)


def bundle(entries: Iterable[str], root: Path = REPO_ROOT) -> List[BundledFile]:
    """The rewritten sources of the entry modules and every first-party module they import, transitively
    (`root`: the repository root holding models/)."""
    pending = list(entries)
    done: Dict[str, BundledFile] = {}
    while pending:
        module = pending.pop()
        if module in done:
            continue
        source = module_path(module, root)
        text = source.read_text(encoding="utf-8")
        imports = _first_party_imports(module, source, text, root)
        relative_source = source.relative_to(root).as_posix()
        rewritten = HEADER.format(source=relative_source) + _rewrite(text, imports, source)
        done[module] = BundledFile(module, source, flat_name(module) + ".py", rewritten)
        pending.extend(target for _, target in imports if target not in done)
    names: Dict[str, str] = {}
    for item in done.values():
        if item.name in names:
            raise ValueError(f"{item.module} and {names[item.name]} would both be bundled as {item.name}")
        names[item.name] = item.module
    return sorted(done.values(), key=lambda item: item.name)


def write_bundle(entries: Iterable[str], out_dir: Path, root: Path = REPO_ROOT) -> List[str]:
    """Write `bundle(entries, root)` into out_dir; returns the file names written."""
    out_dir = Path(out_dir)
    written = []
    for item in bundle(entries, root):
        (out_dir / item.name).write_text(item.text, encoding="utf-8")
        written.append(item.name)
    return written
