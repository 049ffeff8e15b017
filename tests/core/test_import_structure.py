"""The import structure of bonekern, autotune and bench, read from the source (ast, nothing executed):

- no cycle among module-level imports (imports inside functions do not count: they run after every module has
  loaded); a failure prints the cycle;
- one direction for choosing a backend: dispatch -> tuning -> autotune; no backend imports dispatch or tuning,
  tuning never imports dispatch, autotune never imports bonekern or bench (anywhere, function bodies included);
- the development tools (the Triton AOT resource checker, the CUDA compile checker, the tuning CLI and its
  provider) are never loaded by ``import bonekern`` plus a forward and backward on every backend that runs here
  (a subprocess, with the Triton interpreter and the CUDA host shim).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import ROOT

PACKAGES = ("bonekern", "autotune", "bench")

DEV_TOOLS = (
    "bonekern.backends.triton.resources",
    "bonekern.backends.cupy.compile",
    "bonekern.autotune_provider",
    "autotune.cli",
    "autotune.provider",
)
"""Modules only a developer's command loads (``python -m ...``), never bonekern's run-time path."""


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``packages`` under ``root``."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.Module, module_level: bool):
    """Import statements of a module: all of them, or only those that run when it is imported (not in function
    bodies, not under ``if TYPE_CHECKING:``)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child
            elif module_level and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            elif module_level and isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def imports(name: str, path: Path, modules: dict[str, Path], module_level: bool = True) -> set[str]:
    """The modules of ``modules`` that module ``name`` imports, relative imports resolved. ``from p import x``
    counts as importing ``p.x`` when that is a module, else ``p``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _import_nodes(tree, module_level):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in modules}
            continue
        if node.level:
            base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            target = f"{base}.{alias.name}"
            if target in modules:
                out.add(target)
            elif base in modules:
                out.add(base)
    return out


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES, module_level: bool = True) -> dict[str, set[str]]:
    modules = module_files(root, packages)
    return {name: imports(name, path, modules, module_level) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module, or of a module
    importing itself (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(component)) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_no_import_cycle_at_module_level():
    graph = import_graph(ROOT)
    assert {"bonekern.dispatch", "bonekern.tuning", "autotune.tuner", "bench.cli"} <= set(graph)
    assert "bonekern.tuning" in graph["bonekern.dispatch"]  # the walker sees real edges
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_walker_finds_a_cycle_and_ignores_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .sub.c import f\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import pkg.a\n\ndef f():\n    from .. import d\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub import c\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.d"] == set()
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert "pkg.d" in import_graph(tmp_path, ("pkg",), module_level=False)["pkg.sub.c"]


def test_selection_has_one_direction():
    graph = import_graph(ROOT, module_level=False)  # imports inside functions count here
    offenders = []
    for module, targets in graph.items():
        if module.startswith("bonekern.backends"):
            offenders += [(module, t) for t in targets if t in ("bonekern.dispatch", "bonekern.tuning")]
        if module == "bonekern.tuning":
            offenders += [(module, t) for t in targets if t in ("bonekern.dispatch", "bonekern.autotune_provider")]
        if module.startswith("autotune"):
            offenders += [(module, t) for t in targets if t.startswith(("bonekern", "bench"))]
        if module.startswith("bonekern") and module not in ("bonekern.dispatch", "bonekern.autotune_provider"):
            offenders += [(module, t) for t in targets if t == "bonekern.tuning"]  # dispatch alone asks the tuner
    assert not offenders, "imports against the direction dispatch -> tuning -> autotune: " + repr(offenders)
    assert {"bonekern.tuning", "autotune"} <= graph["bonekern.dispatch"] | graph["bonekern.tuning"]


RUNTIME_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    import bonekern
    from tests.cupy import cuda_shim

    cuda_shim.install()  # the CUDA host shim: backend="cupy" runs its kernels on CPU tensors
    ran = []
    for backend in ("auto", "torch", "reference", "triton", "cupy"):
        for variant, block_shape, mini_r in (("bone", (4, 8), None), ("mini", (4, 2), 2), ("bat", (2, 4, 4), None)):
            x = torch.randn(5, 16, requires_grad=True)
            block = (0.1 * torch.randn(block_shape)).requires_grad_()
            y = bonekern.bone_linear(x, torch.randn(8, 16), block, variant=variant, mini_r=mini_r, backend=backend)
            y.square().sum().backward()
            assert x.grad is not None and block.grad is not None and block.grad.abs().sum() > 0
            ran.append(f"{backend}/{variant}")
    print(json.dumps({"ran": ran, "modules": sorted(sys.modules)}))
    """
)


def test_runtime_never_loads_the_development_tools():
    missing = set(DEV_TOOLS) - set(module_files(ROOT))
    assert not missing, f"{sorted(missing)} moved: update DEV_TOOLS and the README"
    env = {**os.environ, "TRITON_INTERPRET": "1", "BONEKERN_AUTOTUNE": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", RUNTIME_PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["ran"]) == 15  # 5 backends x 3 variants, forward and backward each
    loaded = set(report["modules"])
    assert {"bonekern.backends.triton.bone", "bonekern.backends.cupy.launcher", "bonekern.dispatch"} <= loaded
    assert not loaded & set(DEV_TOOLS), sorted(loaded & set(DEV_TOOLS))
