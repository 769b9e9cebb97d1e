"""The import rules of the layout (DESIGN.md), read statically from the source.

Every import counts, at module level or inside a function (a lazy import runs all the same),
except those under `if TYPE_CHECKING:`; importing `a.b.c` also runs `a` and `a.b`. A rule holds
for what a module reaches through any chain of repository modules, and a failure names that chain
with the file and line of each link.

    1. reptok_core never imports ray, mlflow or pipelines.
    2. Only pipelines/demo.py imports another entry point (a pipelines/*.py with `main()`).
    3. Serving never imports training code.
    4. Experiments and benchmarks run the core's training, never the pipelines' Ray side of it.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reptok_core", "pipelines")
SCRIPT_DIRS = ("experiments", "benchmarks")  # run as scripts: siblings import each other by name

# Where a stage trains: the core's loop and tasks, and the pipelines' stages and Ray side of them.
TRAINING_CORE = ("reptok_core.training", "reptok_core.stages")
TRAINING_PIPELINES = (
    "pipelines.pretrain_encoder",
    "pipelines.train_tokenizer",
    "pipelines.train_generator",
    "pipelines.stage",
    "pipelines.ray_loop",
)
SERVING = ("reptok_core.serving", "pipelines.serving", "pipelines.serve")

Graph = dict[str, dict[str, str]]  # module -> {imported module: "path:line" of the import}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _module_files() -> dict[str, Path]:
    files = {}
    for top in PACKAGES + SCRIPT_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST) -> list[tuple[str, int]]:
    """(dotted name, line) of every import that runs; `from a import b` gives `a.b` (a module or
    a name in `a`: the caller keeps whichever exists)."""
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.module, node.lineno))
            out.extend((f"{node.module}.{alias.name}", node.lineno) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _resolve(name: str, importer: str, modules: dict[str, Path]) -> list[str]:
    """The modules that importing `name` from `importer` runs: repository modules (with their
    parent packages) or the external name itself."""
    candidates = [name]
    if importer.split(".")[0] in SCRIPT_DIRS:
        own = importer.split(".")[0]
        candidates += [f"{d}.{name}" for d in (own, *[s for s in SCRIPT_DIRS if s != own])]
    for candidate in candidates:
        parts = candidate.split(".")
        found = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        found = [m for m in found if m in modules]
        if found:
            return found
    return [] if name.split(".")[0] in PACKAGES + SCRIPT_DIRS else [name]


@functools.cache
def import_graph() -> Graph:
    modules = _module_files()
    graph: Graph = {}
    for module, path in modules.items():
        edges: dict[str, str] = {}
        where = path.relative_to(ROOT)
        for name, line in _imported_names(ast.parse(path.read_text(), str(path))):
            for target in _resolve(name, module, modules):
                if target != module:
                    edges.setdefault(target, f"{where}:{line}")
        graph[module] = edges
    return graph


def chains_to(graph: Graph, start: str, bad: Callable[[str], bool]) -> list[str]:
    """The shortest import chain from `start` to each module `bad` accepts, through repository
    modules, as "a (path:line) -> b (path:line) -> c". A package whose module is reported as
    well (`c` beside `c.d`) is left out: the module says more."""
    parent: dict[str, str | None] = {start: None}
    queue, found = deque([start]), []
    while queue:
        module = queue.popleft()
        for target in graph.get(module, {}):
            if target in parent:
                continue
            parent[target] = module
            if bad(target):
                found.append(target)
            elif target in graph:
                queue.append(target)
    chains = []
    for target in found:
        if any(other.startswith(target + ".") for other in found):
            continue
        links = [target]
        while parent[links[-1]] is not None:
            links.append(parent[links[-1]])
        links.reverse()
        hops = [f"{a} ({graph[a][b]})" for a, b in zip(links, links[1:], strict=False)]
        chains.append(" -> ".join([*hops, target]))
    return chains


def _violations(starts: list[str], bad: Callable[[str], bool]) -> list[str]:
    return [c for m in starts for c in chains_to(import_graph(), m, bad)]


def _modules(prefixes: tuple[str, ...]) -> list[str]:
    return [m for m in import_graph() if _within(m, prefixes)]


def entry_points() -> list[str]:
    """pipelines/*.py that run as a command: they define `main()`."""
    out = []
    for module in _modules(("pipelines",)):
        path = ROOT / (module.replace(".", "/") + ".py")
        if module.count(".") == 1 and path.exists():
            tree = ast.parse(path.read_text())
            if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
                out.append(module)
    return out


def _fail(rule: str, chains: list[str]) -> None:
    assert not chains, f"{rule}:\n  " + "\n  ".join(chains)


def test_graph_sees_the_repository():
    # A rule over an empty or unresolved graph would pass vacuously.
    graph = import_graph()
    assert "reptok_core.serving.inference" in graph["pipelines.serving.loading"]
    assert "ray" in graph["pipelines.common"]  # imported inside a function
    assert "reptok_core.evaluation.gfid" not in graph["reptok_core.stages.generator"]  # typing only
    assert "experiments._fashion32" in graph["experiments._ablation_arm"]  # a sibling script
    assert {"pipelines.demo", "pipelines.serve", "pipelines.train_generator"} <= set(entry_points())


def test_a_failure_names_the_import_chain():
    graph = {
        "a": {"b": "a.py:3", "x": "a.py:4"},
        "b": {"c": "b.py:7", "c.d": "b.py:7"},
        "c": {},
        "c.d": {},
        "x": {},
    }
    assert chains_to(graph, "a", lambda m: m.startswith("c")) == ["a (a.py:3) -> b (b.py:7) -> c.d"]
    assert chains_to(graph, "a", lambda m: m == "nothing") == []


def test_core_never_imports_ray_mlflow_or_pipelines():
    def bad(m: str) -> bool:
        return m.split(".")[0] in ("ray", "mlflow", "pipelines")

    _fail(
        "reptok_core imports ray, mlflow or pipelines", _violations(_modules(("reptok_core",)), bad)
    )


def test_core_modules_import_without_ray_or_mlflow():
    # The static rule follows repository modules only; this catches a dependency pulling them in.
    code = (
        "import importlib, pkgutil, sys, reptok_core\n"
        "for m in pkgutil.walk_packages(reptok_core.__path__, 'reptok_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 'pipelines'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_only_the_demo_imports_another_entry_point():
    points = set(entry_points())
    starts = [m for m in _modules(("pipelines",)) if m != "pipelines.demo"]
    graph = import_graph()
    chains = [c for m in starts for c in chains_to(graph, m, lambda t, m=m: t in points and t != m)]
    _fail("a pipelines module other than demo.py imports an entry point", chains)


def test_serving_never_imports_training_code():
    def bad(m: str) -> bool:
        return _within(m, TRAINING_CORE + TRAINING_PIPELINES)

    _fail("serving imports training code", _violations(_modules(SERVING), bad))


@pytest.mark.parametrize("folder", SCRIPT_DIRS)
def test_experiments_and_benchmarks_never_import_the_pipelines_training(folder):
    def bad(m: str) -> bool:
        return _within(m, TRAINING_PIPELINES)

    _fail(f"{folder}/ imports the pipelines' training", _violations(_modules((folder,)), bad))
