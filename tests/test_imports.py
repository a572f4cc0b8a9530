"""The package's modules form layers: no module imports one that imports it back, directly or
through others (function-level imports count too), and only training code imports ``train``."""
import ast
from pathlib import Path

import minidiff

PACKAGE = Path(minidiff.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports anywhere in its source}."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node.level, node.module)
                # `from . import checkpoint` names a module; `from .train import train` a member
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_module_imports_one_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "minidiff.checkpoint" in graph["minidiff.modelfile"]   # from . import checkpoint as ckpt
    assert "minidiff.models.unet" in graph["minidiff.modelfile"]  # from .models.unet import ...
    assert "minidiff.train" in graph["minidiff.cli"]              # inside cmd_train


def test_only_training_code_imports_train():
    importers = {m for m, deps in import_graph().items() if "minidiff.train" in deps}
    assert importers <= {"minidiff.cli", "minidiff.study"}, importers


def test_models_hold_networks_and_load_no_data():
    graph = import_graph()
    for m in (m for m in graph if m.startswith("minidiff.models")):
        assert not graph[m] & {"minidiff.data", "minidiff.checkpoint", "minidiff.files", "minidiff.shipped"}, m
