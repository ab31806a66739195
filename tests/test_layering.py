"""The layering rules of the repository, checked from the imports of every first-party file (module-level and
function-level imports alike):

- recipes/engine never imports a method folder; method folders never import each other;
- models/ never imports lightning or recipes; data/ never imports recipes, and only its datamodule imports
  lightning;
- no `_private` name is imported from another first-party module (bench and tests included);
- no import cycles among first-party modules.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

from recipes import METHODS
from tests.conftest import ROOT

PACKAGES = ("recipes", "models", "data", "bench", "tests")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _sources() -> Dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "tmp" not in path.relative_to(ROOT).parts:
                out[_module_name(path)] = path
    return out


def _imports(module: str, path: Path) -> List[Tuple[str, List[str], int]]:
    """(imported module, names imported from it, line) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    type_only = set()  # imports under `if TYPE_CHECKING:` never run
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            type_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if _is_module(f"{target}.{n}")]
            found += [(s, [], node.lineno) for s in submodules]
            found.append((target, [n for n in names if f"{target}.{n}" not in submodules], node.lineno))
    return found


SOURCES = _sources()
IMPORTS = {m: _imports(m, p) for m, p in SOURCES.items()}


def _first_party(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _method_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "recipes" and len(parts) > 1 and parts[1] in METHODS else None


def _violations(rule) -> List[str]:
    bad = []
    for module, imports in IMPORTS.items():
        for target, names, line in imports:
            why = rule(module, target, names)
            if why:
                bad.append(f"{SOURCES[module].relative_to(ROOT)}:{line}: {target} ({why})")
    return bad


def test_the_sources_were_found():
    assert "recipes.engine.loop" in SOURCES and "models.factory" in SOURCES and "data.datamodule" in SOURCES
    assert set(METHODS) <= {m.split(".")[1] for m in SOURCES if m.startswith("recipes.") and m.count(".") >= 1}


def test_engine_never_imports_a_method():
    assert not _violations(
        lambda m, t, n: m.startswith("recipes.engine") and _method_of(t) and "engine imports a method"
    )


def test_methods_never_import_each_other():
    def rule(m, t, n):
        a, b = _method_of(m), _method_of(t)
        return a and b and a != b and f"method {a} imports method {b}"

    assert not _violations(rule)


def test_models_are_plain_pytorch():
    assert not _violations(lambda m, t, n: m.startswith("models") and t.split(".")[0] in ("lightning", "recipes")
                           and "models/ imports lightning or recipes")


def test_data_never_imports_recipes_and_only_the_datamodule_uses_lightning():
    assert not _violations(lambda m, t, n: m.startswith("data") and t.split(".")[0] == "recipes" and "data -> recipes")
    assert not _violations(lambda m, t, n: m.startswith("data") and m != "data.datamodule"
                           and t.split(".")[0] == "lightning" and "lightning outside data.datamodule")


def test_no_private_name_is_imported_across_modules():
    def rule(m, t, names):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        return _first_party(t) and t != m and private and f"imports private {', '.join(private)}"

    assert not _violations(rule)


def test_no_import_cycles():
    graph: Dict[str, Set[str]] = {m: set() for m in SOURCES}
    for module, imports in IMPORTS.items():
        for target, _, _ in imports:
            # importing a.b.c also runs a/__init__ and a/b/__init__; the edge that matters is to the module itself
            if target in SOURCES and target != module:
                graph[module].add(target)
    cycles = []
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_a_planted_violation_is_caught(tmp_path):
    """The checker itself: a file that breaks each rule is reported (so the rules above cannot pass vacuously)."""
    src = ("from recipes.adamoe.module import check_config\nimport lightning\nfrom models.moe import _hidden\n")
    path = tmp_path / "x.py"
    path.write_text(src)
    found = _imports("recipes.engine.x", path)
    targets = {t for t, _, _ in found}
    assert "recipes.adamoe.module" in targets and "lightning" in targets
    assert any("_hidden" in names for _, names, _ in found)
    assert _method_of("recipes.adamoe.module") == "adamoe"
