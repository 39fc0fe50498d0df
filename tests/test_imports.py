"""Import direction: ``import drrik`` is light, public names load on first use, and drrik's
modules import each other without cycles and without function-level imports that hide one.

The graph is read from each module's source (its top-level imports, ``if TYPE_CHECKING``
blocks left out), so a cycle is found whichever module a program happens to import first.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import pkgutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

import drrik

HEAVY = ("torch", "matplotlib", "datasets", "transformers", "transformer_lens", "wandb", "numpy")


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet); its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_drrik_and_its_error_type_load_no_heavy_library() -> None:
    """Tools that only read the version or catch ConfigError start in milliseconds."""
    loaded = run_python(
        f"import sys, drrik; drrik.ConfigError; print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    assert loaded.strip() == "[]"


def test_a_public_name_loads_its_module_on_first_access() -> None:
    out = run_python(
        "import sys, drrik\n"
        "assert 'drrik.config' not in sys.modules\n"
        "cfg = drrik.RunConfig()\n"
        "from drrik.config import RunConfig\n"
        "print(type(cfg) is RunConfig, drrik.RunConfig is RunConfig, 'matplotlib' in sys.modules)"
    )
    assert out.split() == ["True", "True", "False"]


def test_a_submodule_loads_on_first_access() -> None:
    out = run_python("import sys, drrik\nprint('drrik.paths' in sys.modules, drrik.paths.__name__)")
    assert out.split() == ["False", "drrik.paths"]


def test_version_is_the_installed_distributions() -> None:
    assert drrik.__version__ == importlib.metadata.version("drrik")


def test_every_public_name_resolves() -> None:
    """Names whose module is not on this branch yet (other work in progress) are skipped."""
    present = {n: m for n, m in drrik._LAZY.items() if importlib.util.find_spec(m) is not None}
    assert {"RunConfig", "SAE", "Trainer", "ConfigError"} <= set(present)
    for name, module in present.items():
        assert getattr(drrik, name) is getattr(importlib.import_module(module), name)
    assert set(drrik.__all__) == {"__version__", *drrik._LAZY}
    assert set(drrik._LAZY) <= set(dir(drrik))
    with pytest.raises(AttributeError, match="NoSuchName"):
        drrik.NoSuchName  # noqa: B018


# ---- the import graph ------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One import of a drrik module: where it is, what it names, whether a function holds it."""

    module: str
    line: int
    target: str
    in_function: bool


def drrik_modules() -> dict[str, Path]:
    """Every module of the drrik package, found through importlib without importing any."""
    spec = importlib.util.find_spec("drrik")
    assert spec is not None and spec.origin is not None
    found = {"drrik": Path(spec.origin)}
    pending = [("drrik", list(spec.submodule_search_locations or []))]
    while pending:
        package, paths = pending.pop()
        for info in pkgutil.iter_modules(paths, prefix=f"{package}."):
            where = Path(paths[0]) / info.name.rpartition(".")[2]
            if info.ispkg:
                found[info.name] = where / "__init__.py"
                pending.append((info.name, [str(where)]))
            else:
                found[info.name] = where.with_suffix(".py")
    return found


class _ImportFinder(ast.NodeVisitor):
    """Import statements of one module, each with whether a function body holds it; imports
    under ``if TYPE_CHECKING:`` are left out (they never run)."""

    def __init__(self) -> None:
        self.found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        self.depth = 0

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        self.found.append((node, self.depth > 0))

    visit_ImportFrom = visit_Import


def import_statements(path: Path) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    finder = _ImportFinder()
    finder.visit(ast.parse(path.read_text()))
    return finder.found


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The drrik modules ``module`` imports; ``from P import name`` means P.name when that is
    a module, else P."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node, in_function in import_statements(path):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        found += [Import(module, node.lineno, t, in_function) for t in set(targets) & set(modules)]
    return found


@cache
def import_table() -> dict[str, list[Import]]:
    modules = drrik_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def top_level_graph() -> dict[str, set[str]]:
    """Module -> the drrik modules its top level imports by name. A module's parent packages
    also load first, but that edge is no cycle: Python hands a submodule import the parent
    while it is still initializing."""
    return {m: {i.target for i in imps if not i.in_function} for m, imps in import_table().items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph[stack.pop()] - seen:
            seen.add(nxt)
            stack.append(nxt)
    return seen


def test_the_module_walk_finds_the_package() -> None:
    modules = drrik_modules()
    assert {"drrik", "drrik.cli", "drrik.sae", "drrik.sae.registry"} <= set(modules)
    assert all(path.is_file() for path in modules.values())


def test_drrik_modules_import_each_other_without_cycles() -> None:
    graph = top_level_graph()
    cycles = sorted(
        " -> ".join([m, *sorted(n for n in graph[m] if m in reachable(graph, n))])
        for m in graph
        if m in reachable(graph, m)
    )
    assert not cycles, "modules on an import cycle (and the next hops on it):\n" + "\n".join(cycles)


def test_the_sae_registry_is_a_leaf() -> None:
    assert top_level_graph()["drrik.sae.registry"] == set()


def loaded_with(module: str, graph: dict[str, set[str]]) -> set[str]:
    """What importing ``module`` loads: it, everything it imports, and each one's parent
    packages (which Python imports first, running their ``__init__``)."""
    loaded: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for new in {".".join(parts[:n]) for n in range(1, len(parts) + 1)} | graph[name]:
            if new not in loaded:
                loaded.add(new)
                pending.append(new)
    return loaded


def packages_loaded(modules: set[str]) -> set[str]:
    return {package for module in modules for package in third_party(module)}


@cache
def third_party(module: str) -> frozenset[str]:
    """The non-drrik, non-stdlib packages ``module``'s top level imports."""
    names = set()
    for node, in_function in import_statements(drrik_modules()[module]):
        if in_function:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return frozenset(names - set(sys.stdlib_module_names) - {"drrik", "__future__"})


def function_level_problems(module: str) -> list[str]:
    """Function-level imports of drrik modules that the top level could hold: one that would
    close a cycle there (it hides the cycle), and one that loads no third-party package the
    top level does not load already (deferring it saves nothing). Deferring a heavy library
    (``drrik --help`` without torch's start-up) is what a function-level import is for."""
    graph = top_level_graph()
    here = loaded_with(module, graph)
    problems = []
    for imp in import_table()[module]:
        if not imp.in_function:
            continue
        where = f"{module}:{imp.line} imports {imp.target}"
        if module in reachable(graph, imp.target) or imp.target == module:
            problems.append(f"{where} in a function to hide an import cycle")
        elif not packages_loaded(loaded_with(imp.target, graph)) - packages_loaded(here):
            problems.append(f"{where} in a function, deferring nothing: import it at the top")
    return problems


@pytest.mark.parametrize("module", sorted(drrik_modules()))
def test_function_level_imports_defer_a_heavy_library(module: str) -> None:
    problems = function_level_problems(module)
    assert not problems, "\n".join(problems)
