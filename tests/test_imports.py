"""The package's import structure (issue 25): no import cycle, whatever module comes first; no import
statement inside a function (a local import is how a cycle gets hidden); validation never imports
the facade it validates; every exception class in ``acco/errors.py``, and imported from there.

The checks that read the source parse it (``ast``) and look at ``acco/`` in this checkout; the one that
imports runs a fresh interpreter per module, because a cycle bites only the first module imported,
and within one test process that order is long fixed.
"""

from __future__ import annotations

import ast
import concurrent.futures
import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "acco"
IMPORT_TIMEOUT_S = 120  # one fresh interpreter importing torch (and transformers, for acco.integrations.hf)

# The third-party packages an integration imports beyond torch: its check is skipped where one is
# missing (``pip install 'acco[hf]'``). ``test_third_party_imports_are_declared`` keeps this in step.
OPTIONAL_DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "acco.integrations.hf": ("transformers", "accelerate"),
    "acco.integrations.hf_amp": ("accelerate",),
}

# Imports inside a function body, each with the reason it stays; an entry that no longer matches
# an import fails the test, so that the list shrinks with the code.
ALLOWED_FUNCTION_IMPORTS: dict[str, str] = {}

# (importing module, module other than acco.errors it takes exception classes from): the reason it
# stays; a stale entry fails the test, as above.
ALLOWED_ERROR_IMPORTS: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES: dict[str, Path] = {
    _module_name(path): path for path in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in path.parts
}
TREES: dict[str, ast.Module] = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in SOURCES.items()}


def _is_package(name: str) -> bool:
    return SOURCES[name].name == "__init__.py"


def _resolve(name: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` statement of module ``name`` reads from."""
    if node.level == 0:
        return node.module or ""
    package = name if _is_package(name) else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not inside a function or class, not under
    ``if TYPE_CHECKING:``; those inside module-level ``try`` / ``if`` blocks count."""

    def visit(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from visit(ast.Module(body=child.orelse, type_ignores=[]))  # only the else branch runs
            else:
                yield from visit(child)

    yield from visit(tree)


def _imported_modules(name: str) -> set[str]:
    """The package's modules that module ``name`` imports when it is imported. ``from . import sub``
    reads the submodule, not the package's ``__init__``; ``from pkg import Name`` reads ``pkg``."""
    found = set()
    for node in _module_level_imports(TREES[name]):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = _resolve(name, node)
        submodules = {f"{base}.{alias.name}" for alias in node.names} & SOURCES.keys()
        found |= submodules
        if len(submodules) < len(node.names):
            found.add(base)
    return {module for module in found if module in SOURCES and module != name}


GRAPH: dict[str, set[str]] = {name: _imported_modules(name) for name in SOURCES}


def _importable(name: str) -> Optional[str]:
    """None, or why module ``name`` cannot be imported here (a missing optional dependency)."""
    missing = [dep for dep in OPTIONAL_DEPENDENCIES.get(name, ()) if importlib.util.find_spec(dep) is None]
    return f"{name} needs {', '.join(missing)} (pip install 'acco[hf]')" if missing else None


# First the module alone with its package's __init__ not run (a stand-in package object points at the
# same files): the module is then really imported first, as it would be if the __init__ imported it
# first, and a cycle through it fails here. Then, the package forgotten, the module as a user imports it.
FRESH_IMPORT = """
import importlib, sys, types
root, name = sys.argv[1], sys.argv[2]
if name != "acco":
    stand_in = types.ModuleType("acco")
    stand_in.__path__ = [root + "/acco"]
    sys.modules["acco"] = stand_in
    print("importing", name, "first, before acco/__init__.py", flush=True)
    importlib.import_module(name)
    for loaded in [m for m in sys.modules if m == "acco" or m.startswith("acco.")]:
        del sys.modules[loaded]
print("importing", name, "as a user does", flush=True)
print("file:", importlib.import_module(name).__file__)
"""


def _fresh_import(name: str) -> Optional[str]:
    """None, or why ``import name`` failed in a fresh interpreter (or imported another copy)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        done = subprocess.run(
            [sys.executable, "-c", FRESH_IMPORT, str(ROOT), name],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=IMPORT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return f"still importing after {IMPORT_TIMEOUT_S} s"
    if done.returncode != 0:
        return f"failed:\n{done.stdout}{done.stderr[-4000:]}"
    if f"file: {SOURCES[name]}" not in done.stdout:
        return f"imported another copy:\n{done.stdout}"
    return None


def _check_fresh_imports(names: list[str]) -> None:
    """Each module in an interpreter of its own, a few at a time: each one spends a second or two
    importing torch, so on a few cores they run side by side."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        failures = {name: error for name, error in zip(names, pool.map(_fresh_import, names)) if error is not None}
    assert not failures, "\n\n".join(f"import {name} in a fresh interpreter {error}" for name, error in failures.items())


def test_each_module_imports_alone_in_a_fresh_interpreter():
    _check_fresh_imports(sorted(name for name in SOURCES if name not in OPTIONAL_DEPENDENCIES))


def test_each_integration_imports_alone_in_a_fresh_interpreter():
    missing = [reason for name in OPTIONAL_DEPENDENCIES if (reason := _importable(name)) is not None]
    if missing:
        pytest.skip("; ".join(missing))
    _check_fresh_imports(sorted(OPTIONAL_DEPENDENCIES))


def test_no_import_inside_a_function():
    """A function-level import hides a cycle (or defers a failure to the first call): imports belong at
    the top of the module; an optional dependency goes in a module-level ``try`` block."""
    found: dict[str, list[str]] = {}

    def visit(node: ast.AST, scope: list[str], module: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and scope:
                found.setdefault(".".join([module, *scope]), []).append(f"line {child.lineno}: {ast.unparse(child)}")
            inner = [*scope, child.name] if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else scope
            visit(child, inner, module)

    for module, tree in TREES.items():
        visit(tree, [], module)
    unexpected = {where: lines for where, lines in found.items() if where not in ALLOWED_FUNCTION_IMPORTS}
    assert not unexpected, f"imports inside functions (move them to the top of the module): {unexpected}"
    stale = sorted(set(ALLOWED_FUNCTION_IMPORTS) - set(found))
    assert not stale, f"ALLOWED_FUNCTION_IMPORTS lists functions without an import any more; delete {stale}"


def _cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One import cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> Optional[list[str]]:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)) is not None:
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)) is not None:
            return found
    return None


def test_the_package_import_graph_has_no_cycle():
    """With no cycle among the module-level imports, any module can be imported first."""
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_validation_never_imports_the_optimizer():
    """The facade imports validation; validation recognises the facade by ``FACADE_MARKER``."""
    assert "acco.optimizer" not in _reachable("acco.validation")
    from acco import AccoOptimizer, validation

    assert validation.is_facade_class(AccoOptimizer)
    assert not validation.is_facade_class(torch.optim.AdamW)


def test_shard_does_not_import_checkpoint():
    """``ViewSpan`` lives in ``layout``, below both."""
    assert "acco.checkpoint" not in _reachable("acco.shard")


ERROR_CLASSES = {node.name for node in TREES["acco.errors"].body if isinstance(node, ast.ClassDef)}


def test_every_exception_class_lives_in_errors():
    elsewhere = []
    for name in sorted(SOURCES):
        if _importable(name) is not None:
            continue
        module = importlib.import_module(name)
        assert Path(module.__file__) == SOURCES[name], f"imported another copy of {name}: {module.__file__}"
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, BaseException) and name != "acco.errors":
                elsewhere.append(f"{name}.{cls_name}")
    assert not elsewhere, f"exception classes outside acco/errors.py: {elsewhere}"
    assert ERROR_CLASSES, "acco/errors.py defines no class"


def test_exception_classes_are_imported_from_errors():
    """No module imports another for an error type: exception classes come from ``acco.errors``
    (or, in the package's ``__init__``, are re-exported from there)."""
    found: dict[tuple[str, str], list[str]] = {}
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _resolve(name, node)
            names = [alias.name for alias in node.names if alias.name in ERROR_CLASSES]
            if names and source != "acco.errors":
                found.setdefault((name, source), []).extend(names)
    unexpected = {key: value for key, value in found.items() if key not in ALLOWED_ERROR_IMPORTS}
    assert not unexpected, f"exception classes imported from a module other than acco.errors: {unexpected}"
    stale = sorted(set(ALLOWED_ERROR_IMPORTS) - set(found))
    assert not stale, f"ALLOWED_ERROR_IMPORTS lists imports that are gone; delete {stale}"


def test_third_party_imports_are_declared():
    """A module imports the standard library, torch and acco; anything else is an optional dependency
    named in OPTIONAL_DEPENDENCIES (so that its fresh-import check is skipped, not failed, without it)."""
    allowed_everywhere = set(sys.stdlib_module_names) | {"torch", "acco", "__future__"}
    undeclared = {}
    for name, tree in TREES.items():
        roots = set()
        for node in _module_level_imports(tree):
            if isinstance(node, ast.Import):
                roots.update(alias.name.partition(".")[0] for alias in node.names)
            elif node.level == 0:
                roots.add((node.module or "").partition(".")[0])
        extra = roots - allowed_everywhere - set(OPTIONAL_DEPENDENCIES.get(name, ()))
        if extra:
            undeclared[name] = sorted(extra)
    assert not undeclared, f"third-party imports missing from OPTIONAL_DEPENDENCIES: {undeclared}"
