"""The modules' import graph has no cycle, every module imports alone (no hidden order between them), and methods
use only the harness's public names."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "harness"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, at module level or inside a function (both are edges: a
    function-level import is a cycle put off, not removed); imports under `if TYPE_CHECKING` are not."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            if _type_checking_only(node, parents):
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    edges.add(target)
                    break  # `from a.b import c`: c is the module if it is one, else a.b is
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in graph:
        if node not in index:
            visit(node)
    return out


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["harness.runner.run"]  # the walk found the package and its imports
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    """Negative control: the same check on a graph with a back-arrow added (store -> executors, as it once was)."""
    graph = import_graph()
    graph["harness.runner.store"] = graph["harness.runner.store"] | {"harness.runner.executors"}
    assert ["harness.runner.executors", "harness.runner.store"] in cycles(graph)


PRELOADED = ("numpy", "torch", "pandas", "yaml", "PIL.Image", "scipy.ndimage", "tabulate", "tqdm.auto")
CHILD = r"""
import importlib, os, sys
for name in sys.argv[2:]:
    importlib.import_module(name)  # the third-party libraries, once: each child then imports only our modules
failed = []
for module in sys.argv[1].split(","):
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
        except BaseException as err:
            print(f"{module}: {type(err).__name__}: {err}", flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(module)
print("FAILED", ",".join(failed))
"""


def test_every_module_imports_alone():
    """Each module is imported in a fresh process of its own (forked after the third-party libraries loaded), so no
    module works only because another was imported first."""
    modules = [m for m in _modules() if not m.endswith("__main__") and m != "harness.runner.worker"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", CHILD, ",".join(modules), *PRELOADED], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "FAILED", result.stdout[-3000:]


def private_uses(source: str) -> list[str]:
    """Where code reaches a private name of the harness: `from harness.x import _y`, `module._y` on a harness module
    it imported, or `super()._y` in a class built on a harness class."""
    tree = ast.parse(source)
    modules, classes, found = set(), set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE:
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"from {node.module} import {alias.name}")
                (modules if alias.name.islower() else classes).add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update(a.asname or a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            if owner in modules or owner.split(".")[0] in modules or owner in classes:
                found.append(f"{owner}.{node.attr}")
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b).split(".")[0] in modules | classes
                                                  for b in node.bases):
            found += [ast.unparse(n) for n in ast.walk(node) if isinstance(n, ast.Attribute)
                      and n.attr.startswith("_") and not n.attr.startswith("__")
                      and ast.unparse(n.value) == "super()"]
    return found


def test_methods_use_only_public_names_of_the_harness():
    uses = {str(path.relative_to(ROOT)): private_uses(path.read_text())
            for path in sorted((ROOT / "methods").rglob("*.py")) if "tests" not in path.parts}
    assert uses and not {path: found for path, found in uses.items() if found}


def test_the_private_name_check_finds_a_toolkit_override():
    old = """
from harness.diffusion.processors import ToolkitAttnProcessor, _reweighted
from harness.diffusion import processors

class Masked(ToolkitAttnProcessor):
    def _attend(self, attn, query, source):
        return super()._attend(attn, query, source) + processors._probabilities(attn)
"""
    assert sorted(private_uses(old)) == ["from harness.diffusion.processors import _reweighted",
                                         "processors._probabilities", "super()._attend"]
