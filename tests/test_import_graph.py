"""The import graph of ``src/ldmkit``: no cycle, no upward import.

The graph is read from the source with :mod:`ast` (nothing is imported to build it).
*Module-level* imports run when a module is imported (class bodies, ``if``/``try`` blocks
included); *function-level* ones run when the function is called. Imports under
``if TYPE_CHECKING:`` are not edges, and neither are those inside a module's
``__getattr__`` (PEP 562): that is how a module re-exports a name lazily (``ldmkit.compose``,
the names ``ldmkit.config`` kept after they moved), not something its own code uses.

The rules (docs/architecture.md explains them):

1. The module-level graph has no cycle.
2. The whole graph (module- and function-level edges) has no cycle either, except through
   the edges in ``KNOWN_CYCLE_EDGES``, each with the reason it is still there.
3. Layers, lowest first (``LAYERS``): a module imports only modules of its own layer or a
   lower one, at module or function level.

   0. foundation: ``errors``, ``io``, ``safetensors_io``, ``registry``, ``hookspecs``,
      ``precision``, ``compiling``, ``masks``, ``tiling``, ``visualize``, ``ema``,
      ``config_checks``, ``devices`` and the package root;
   1. building blocks: ``nn``, ``interfaces``, ``diffusion``, ``losses``,
      ``checkpoint_layout``, ``weights``, and the pure metrics ``evaluation.metrics`` and
      ``evaluation.frechet``;
   2. ``plugins`` (the plugin manager), ``config`` (Hydra composition) and ``data`` (its
      sources are plugins);
   3. ``assembly`` (components from a config, through the registry);
   4. ``pipeline``;
   5. ``training``, ``evaluation``, ``testing``;
   6. entry points: ``cli``, ``demo``, ``__main__``.
4. Nothing outside ``ldmkit.training`` imports it except ``evaluation`` (it evaluates
   training runs) and the entry points.
5. The training stages do not import each other (``training.autoencoder``,
   ``training.ldm``): what they share lives in ``training.engine`` and ``training.batches``.
6. The core imports no first-party plugin (``ldmkit_*``).

And every module imports on its own, in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "ldmkit"

LAYERS: dict[str, int] = {
    "ldmkit": 0,  # the package root; every module not named below takes its package's layer
    "ldmkit.errors": 0,
    "ldmkit.resources": 0,
    "ldmkit.io": 0,
    "ldmkit.safetensors_io": 0,
    "ldmkit.registry": 0,
    "ldmkit.hookspecs": 0,
    "ldmkit.precision": 0,
    "ldmkit.compiling": 0,
    "ldmkit.masks": 0,
    "ldmkit.tiling": 0,
    "ldmkit.frozen": 0,
    "ldmkit.visualize": 0,
    "ldmkit.ema": 0,
    "ldmkit.config_checks": 0,
    "ldmkit.devices": 0,
    "ldmkit.nn": 1,
    "ldmkit.interfaces": 1,
    "ldmkit.diffusion": 1,
    "ldmkit.losses": 1,
    "ldmkit.checkpoint_layout": 1,
    "ldmkit.weights": 1,
    "ldmkit.evaluation.metrics": 1,
    "ldmkit.evaluation.frechet": 1,
    "ldmkit.plugins": 2,
    "ldmkit.config": 2,
    "ldmkit.data": 2,  # its sources are looked up through the plugin manager
    "ldmkit.assembly": 3,
    "ldmkit.interop": 3,  # translates foreign configs with ldmkit.config; Pipeline.from_compvis calls it
    "ldmkit.pipeline": 4,
    "ldmkit.training": 5,
    "ldmkit.evaluation": 5,
    "ldmkit.testing": 5,
    "ldmkit.cli": 6,
    "ldmkit.demo": 6,
    "ldmkit.__main__": 6,
}
ENTRY_POINTS = ("ldmkit.cli", "ldmkit.demo", "ldmkit.__main__")
TRAINING_IMPORTERS = ("ldmkit.training", "ldmkit.evaluation", *ENTRY_POINTS)
STAGE_MODULES = ("ldmkit.training.autoencoder", "ldmkit.training.ldm")

# edges that still close a cycle of function-level imports: (importer, imported) -> why
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}


@dataclass
class Module:
    name: str
    path: Path
    top: set[str] = field(default_factory=set)  # imported when the module is imported
    inner: set[str] = field(default_factory=set)  # imported when one of its functions runs
    external: set[str] = field(default_factory=set)  # top-level names of other packages


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def read_graph() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    packages: set[str] = set()
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        name, is_package = _module_name(path)
        modules[name] = Module(name, path)
        if is_package:
            packages.add(name)

    def resolve(importer: str, node: ast.Import | ast.ImportFrom) -> Iterable[str]:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = importer.split(".")
                if importer not in packages:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            # `from pkg import name`: a submodule when one exists, else a name in pkg
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        for target in targets:
            while target and target not in modules and target.startswith(f"{PACKAGE}."):
                target = target.rpartition(".")[0]
            yield target

    for module in modules.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), str(module.path))

        def visit(
            node: ast.AST, in_function: bool, module: Module = module, tree: ast.AST = tree
        ) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for orelse in child.orelse:
                        visit(ast.Module(body=[orelse], type_ignores=[]), in_function)
                    continue
                if (
                    isinstance(child, ast.FunctionDef)
                    and child.name == "__getattr__"
                    and node is tree
                ):
                    continue  # lazy re-exports (PEP 562), see the module docstring
                if isinstance(child, ast.Import | ast.ImportFrom):
                    for target in resolve(module.name, child):
                        if target == PACKAGE or target.startswith(f"{PACKAGE}."):
                            if target != module.name:
                                (module.inner if in_function else module.top).add(target)
                        else:
                            module.external.add(target.split(".")[0])
                nested = in_function or isinstance(
                    child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
                )
                visit(child, nested)

        visit(tree, False)
        module.inner -= module.top
    return modules


GRAPH = read_graph()


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def _describe(component: list[str], edges: dict[str, set[str]]) -> str:
    members = set(component)
    inside = sorted(f"{a} -> {b}" for a in component for b in edges.get(a, ()) if b in members)
    return "{" + ", ".join(component) + "}: " + "; ".join(inside)


def _layer(name: str) -> int:
    prefix = name
    while prefix:
        if prefix in LAYERS:
            return LAYERS[prefix]
        prefix = prefix.rpartition(".")[0]
    raise AssertionError(
        f"module {name} has no layer: add it (or its package) to LAYERS in {__file__}"
    )


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def _all_edges() -> Iterable[tuple[str, str, str]]:
    for module in GRAPH.values():
        for target in sorted(module.top):
            yield module.name, target, "module level"
        for target in sorted(module.inner):
            yield module.name, target, "in a function"


def test_graph_is_read():
    assert {"ldmkit.config", "ldmkit.pipeline", "ldmkit.assembly", "ldmkit.weights"} <= set(GRAPH)
    assert "ldmkit.config" in GRAPH["ldmkit.assembly"].top
    assert "ldmkit.training.engine" in GRAPH["ldmkit.training.ldm"].top


def test_no_cycle_at_module_level():
    edges = {name: module.top for name, module in GRAPH.items()}
    cycles = _cycles(edges)
    assert not cycles, "import cycles at module level: " + " | ".join(
        _describe(c, edges) for c in cycles
    )


def test_no_cycle_with_function_level_imports():
    edges = {name: (module.top | module.inner) for name, module in GRAPH.items()}
    for importer, imported in KNOWN_CYCLE_EDGES:
        edges.get(importer, set()).discard(imported)
    cycles = _cycles(edges)
    assert not cycles, "import cycles (with function-level imports): " + " | ".join(
        _describe(c, edges) for c in cycles
    )


def test_no_upward_import():
    upward = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)}) {where}"
        for a, b, where in _all_edges()
        if _layer(b) > _layer(a)
    ]
    assert not upward, "imports of a higher layer: " + "; ".join(upward)


def test_only_evaluation_and_entry_points_import_training():
    outside = [
        f"{a} imports {b} {where}"
        for a, b, where in _all_edges()
        if _within(b, ["ldmkit.training"]) and not _within(a, TRAINING_IMPORTERS)
    ]
    assert not outside, "; ".join(outside)


def test_training_stages_do_not_import_each_other():
    crossed = [
        f"{a} imports {b} {where}"
        for a, b, where in _all_edges()
        if a in STAGE_MODULES and _within(b, [s for s in STAGE_MODULES if s != a])
    ]
    assert not crossed, "; ".join(crossed)


def test_core_imports_no_first_party_plugin():
    plugins = {
        p.name for p in (SRC.parent / "plugins").glob("*/src/*") if (p / "__init__.py").is_file()
    }
    assert plugins, "no first-party plugin packages found under plugins/*/src"
    found = [
        f"{m.name} imports {sorted(m.external & plugins)}"
        for m in GRAPH.values()
        if m.external & plugins
    ]
    assert not found, "; ".join(found)


def test_known_cycle_edges_exist():
    """An edge listed as closing a cycle must still be there (remove it when it is gone)."""
    gone = [
        (a, b)
        for a, b in KNOWN_CYCLE_EDGES
        if a in GRAPH and b not in GRAPH[a].top | GRAPH[a].inner
    ]
    assert not gone, f"these KNOWN_CYCLE_EDGES are gone, remove them: {gone}"


STANDALONE = r"""
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "ldmkit" or m.startswith(("ldmkit.", "ldmkit_"))]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module is imported with no ldmkit module loaded before it (third-party ones such
    as torch stay loaded between modules: they are not what is tested)."""
    names = sorted(name for name in GRAPH if not name.endswith("__main__"))
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=SRC.parent,
        env={**os.environ, "LDMKIT_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "modules that do not import on their own:\n" + "\n".join(
        f"{name}:\n{trace}" for name, trace in failures.items()
    )


@pytest.mark.parametrize(
    "moved", ["build_pipeline", "compose", "create_component", "component_kwargs"]
)
def test_moved_names_still_import_from_config(moved):
    import ldmkit.config

    assert callable(getattr(ldmkit.config, moved))
