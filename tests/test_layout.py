"""The layout keeps its promises (docs/development.md): packages by concern, no module importing another that
imports it back, the pipeline never importing the server, no module or folder past about its size limit."""

import ast
import pathlib
from typing import Dict, Set

from pipeline.config import PROJECT_ROOT

PACKAGES = ("pipeline", "serving", "models", "data", "watch")
ENTRY_POINTS = ("babyweight_cli", "runner_local", "runner_dataflow")
MAX_MODULE_LINES = 550  # "about 500": a module past it usually holds two ideas
MAX_FOLDER_MODULES = 13  # "about a dozen": past it, a folder splits by concern


def _modules() -> Dict[str, pathlib.Path]:
    found = {name: PROJECT_ROOT / f"{name}.py" for name in ENTRY_POINTS}
    for package in PACKAGES:
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(modules: Dict[str, pathlib.Path]) -> Dict[str, Set[str]]:
    """Each project module's project imports, at the top or inside functions (`from a import b`: a.b if that is a
    module, else a)."""
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    found.add(target if target in modules else node.module)
        graph[name] = {target for target in found if target in modules and target != name}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> list:
    """The groups of modules that import each other, directly or through others (Tarjan's components)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack, on_stack, found = [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_another_that_imports_it_back():
    graph = imports(_modules())
    assert cycles(graph) == []
    # The check itself finds a circle: serving.clients.client and serving.clients.device once imported each other.
    assert cycles(
        dict(graph, **{"serving.clients.device": graph["serving.clients.device"] | {"serving.clients.client"}})
    ) == [["serving.clients.client", "serving.clients.device"]]


def test_the_pipeline_never_imports_the_server_and_neither_imports_the_watcher():
    wrong = sorted(
        (module, target)
        for module, targets in imports(_modules()).items()
        for target in targets
        if (module.startswith("pipeline") and target.startswith(("serving", "watch")))
        or (module.startswith("serving") and target.startswith("watch"))
    )
    assert wrong == []


def test_modules_and_folders_stay_within_their_size():
    modules = _modules()
    long = {
        name: lines
        for name, path in modules.items()
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
    folders: Dict[pathlib.Path, int] = {}
    for path in modules.values():
        if path.name != "__init__.py":
            folders[path.parent] = folders.get(path.parent, 0) + 1
    assert {str(folder): count for folder, count in folders.items() if count > MAX_FOLDER_MODULES} == {}
