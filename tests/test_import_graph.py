"""The import graph of ``src/ldmkit``: no cycle, no upward import.

The graph is read from the source with :mod:`ast` (nothing is imported to build it). Every
import is an edge, wherever it is written:

* at *module level* (class bodies, ``if``/``try`` blocks included): it runs when the module
  is imported;
* *in a function*: it runs when the function is called;
* *in a module's* ``__getattr__`` (PEP 562): it runs when someone asks the module for a name
  it re-exports lazily (``ldmkit.compose``);
* *under* ``if TYPE_CHECKING:``: it never runs, but the module's types still depend on it.

The rules (docs/architecture.md explains them):

1. No cycle between modules: neither in the module-level graph nor in the whole graph.
2. No cycle between the *rooms* of ``LAYERS`` (a package, or a module named there on its
   own): ``training`` and ``evaluation`` may share a layer, but not import each other.
3. Layers, lowest first (``LAYERS``): a module imports only modules of its own layer or a
   lower one.

   0. foundation: ``errors``, ``io``, ``safetensors_io``, ``registry``, ``hookspecs``,
      ``precision``, ``compiling``, ``masks``, ``tiling``, ``visualize``, ``ema``,
      ``config_checks``, ``devices``, ``_version``, ...;
   1. building blocks: the noise process (``diffusion.timesteps``, ``diffusion.schedule``),
      then ``interfaces`` (the ``Sampler`` is written against a ``NoiseSchedule``), the rest
      of ``diffusion``, ``nn``, ``losses``, ``checkpoint_layout``, ``weights``, and the pure
      metrics ``evaluation.metrics`` and ``evaluation.frechet``;
   2. ``plugins`` (the plugin manager), ``config`` (Hydra composition) and ``data`` (its
      sources are plugins);
   3. ``assembly`` (components from a config, through the registry), ``interop``;
   4. ``pipeline`` and ``sampling_request`` (what ``Pipeline.sample`` runs), and the package
      root ``ldmkit`` (it re-exports ``compose`` and ``Pipeline``; nothing in ldmkit imports
      it: ``__version__`` lives in ``_version``);
   5. ``training``, ``evaluation``, ``testing``, ``sample_io`` (what ``ldmkit sample`` and
      ``ldmkit demo`` both read and write);
   6. entry points: ``cli``, ``demo``, ``__main__``.
4. Nothing outside ``ldmkit.training`` imports it except ``evaluation`` (it evaluates
   training runs) and the entry points.
5. The training stages do not import each other (``training.autoencoder``,
   ``training.ldm``): what they share lives in ``training.engine`` and ``training.batches``.
6. The core imports no first-party plugin (``ldmkit_*``).

Two lists name the edges these rules let through, each with its reason, and a test fails
when one of them is gone: ``DEPRECATED_ALIASES`` (a ``__getattr__`` that answers an old import
path for users, with a ``DeprecationWarning``; nothing in the project may use one) and
``KNOWN_CYCLE_EDGES`` (a cycle still to be removed).

And every module imports on its own, in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "ldmkit"

LAYERS: dict[str, int] = {
    "ldmkit.errors": 0,
    "ldmkit._version": 0,
    "ldmkit.resources": 0,
    "ldmkit.io": 0,
    "ldmkit.safetensors_io": 0,
    "ldmkit.registry": 0,
    "ldmkit.hookspecs": 0,
    "ldmkit.precision": 0,
    "ldmkit.compiling": 0,
    "ldmkit.aot": 0,
    "ldmkit.masks": 0,
    "ldmkit.tiling": 0,
    "ldmkit.frozen": 0,
    "ldmkit.pipeline_files": 0,
    "ldmkit.visualize": 0,
    "ldmkit.ema": 0,
    "ldmkit.config_checks": 0,
    "ldmkit.devices": 0,
    "ldmkit.diffusion.timesteps": 1,
    "ldmkit.diffusion.schedule": 1,
    "ldmkit.interfaces": 1,  # the Sampler's signature names a NoiseSchedule
    "ldmkit.diffusion": 1,  # the samplers' bases subclass interfaces.Sampler
    "ldmkit.nn": 1,
    "ldmkit.losses": 1,
    "ldmkit.checkpoint_layout": 1,
    "ldmkit.weights": 1,
    "ldmkit.lora": 1,  # LoRA adapters through peft, on any module (Pipeline.load attaches them)
    "ldmkit.evaluation.metrics": 1,
    "ldmkit.evaluation.frechet": 1,
    "ldmkit.plugins": 2,
    "ldmkit.config": 2,
    "ldmkit.data": 2,  # its sources are looked up through the plugin manager
    "ldmkit.assembly": 3,
    "ldmkit.interop": 3,  # translates foreign configs with ldmkit.config; Pipeline.from_compvis calls it
    "ldmkit.pipeline": 4,
    "ldmkit.sampling_request": 4,  # what Pipeline.sample runs, checked against a pipeline it never imports
    "ldmkit": 4,  # the package root: ldmkit.compose, ldmkit.Pipeline and ldmkit.SampleRequest, lazily
    "ldmkit.training": 5,
    "ldmkit.evaluation": 5,
    "ldmkit.testing": 5,
    "ldmkit.sample_io": 5,
    "ldmkit.cli": 6,
    "ldmkit.demo": 6,
    "ldmkit.__main__": 6,
}
ENTRY_POINTS = ("ldmkit.cli", "ldmkit.demo", "ldmkit.__main__")
TRAINING_IMPORTERS = ("ldmkit.training", "ldmkit.evaluation", *ENTRY_POINTS)
STAGE_MODULES = ("ldmkit.training.autoencoder", "ldmkit.training.ldm")

# a module's __getattr__ that answers an old import path for users (and warns): (importer,
# imported) -> why. Exempt from the layer and cycle rules; nothing in the project uses them
# (test_nothing_uses_a_deprecated_alias).
DEPRECATED_ALIASES: dict[tuple[str, str], str] = {
    ("ldmkit.config", "ldmkit.assembly"): "ldmkit.config.create_component & co. moved to "
    "ldmkit.assembly (issue 11)",
    ("ldmkit.config", "ldmkit.pipeline"): "ldmkit.config.compose and build_pipeline moved to "
    "ldmkit.pipeline (issue 11)",
}
# edges that still close a cycle: (importer, imported) -> why, and who removes them
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}  # none left

MODULE_LEVEL = "module level"
IN_FUNCTION = "in a function"
IN_GETATTR = "in __getattr__"
TYPE_CHECKING_ONLY = "under TYPE_CHECKING"


@dataclass
class Module:
    name: str
    path: Path
    edges: dict[str, str] = field(default_factory=dict)  # imported module -> where (above)
    external: set[str] = field(default_factory=set)  # top-level names of other packages

    @property
    def top(self) -> set[str]:
        """What importing this module imports."""
        return {target for target, where in self.edges.items() if where == MODULE_LEVEL}


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

    # the strongest kind wins when a module imports another in several places
    rank = [MODULE_LEVEL, IN_FUNCTION, IN_GETATTR, TYPE_CHECKING_ONLY]

    for module in modules.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), str(module.path))

        def visit(node: ast.AST, where: str, module: Module = module, tree: ast.AST = tree) -> None:
            for child in ast.iter_child_nodes(node):
                inner = where
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for stmt in child.body:
                        visit(ast.Module(body=[stmt], type_ignores=[]), TYPE_CHECKING_ONLY)
                    for stmt in child.orelse:
                        visit(ast.Module(body=[stmt], type_ignores=[]), where)
                    continue
                if (
                    isinstance(child, ast.FunctionDef)
                    and child.name == "__getattr__"
                    and node is tree
                ):
                    inner = IN_GETATTR
                elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                    inner = IN_FUNCTION if where == MODULE_LEVEL else where
                if isinstance(child, ast.Import | ast.ImportFrom):
                    for target in resolve(module.name, child):
                        if target == PACKAGE or target.startswith(f"{PACKAGE}."):
                            known = module.edges.get(target, TYPE_CHECKING_ONLY)
                            if target != module.name and rank.index(where) <= rank.index(known):
                                module.edges[target] = where
                        else:
                            module.external.add(target.split(".")[0])
                visit(child, inner)

        visit(tree, MODULE_LEVEL)
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


def _room(name: str) -> str:
    """The entry of ``LAYERS`` a module belongs to: itself, or the closest package named
    there (the package root holds only itself)."""
    prefix = name
    while prefix != PACKAGE:
        if prefix in LAYERS:
            return prefix
        prefix = prefix.rpartition(".")[0]
    if name == PACKAGE:
        return PACKAGE
    raise AssertionError(
        f"module {name} has no layer: add it (or its package) to LAYERS in {__file__}"
    )


def _layer(name: str) -> int:
    return LAYERS[_room(name)]


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def _all_edges() -> Iterable[tuple[str, str, str]]:
    for module in GRAPH.values():
        for target, where in sorted(module.edges.items()):
            yield module.name, target, where


def _module_edges(exempt: Iterable[tuple[str, str]] = ()) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set(module.edges) for name, module in GRAPH.items()}
    for importer, imported in exempt:
        edges.get(importer, set()).discard(imported)
    return edges


def test_graph_is_read():
    assert {"ldmkit.config", "ldmkit.pipeline", "ldmkit.assembly", "ldmkit.weights"} <= set(GRAPH)
    assert "ldmkit.config" in GRAPH["ldmkit.assembly"].top
    assert "ldmkit.training.engine" in GRAPH["ldmkit.training.ldm"].top
    # the kinds of edge that do not run at import time are edges too
    assert GRAPH["ldmkit.config"].edges["ldmkit.assembly"] == IN_GETATTR
    assert GRAPH["ldmkit"].edges["ldmkit.pipeline"] == IN_GETATTR
    assert GRAPH["ldmkit.interfaces.sampler"].edges["ldmkit.diffusion.schedule"] == (
        TYPE_CHECKING_ONLY
    )


def test_every_module_has_a_layer():
    for name in GRAPH:
        _layer(name)


def test_no_cycle_at_module_level():
    edges = {name: module.top for name, module in GRAPH.items()}
    cycles = _cycles(edges)
    assert not cycles, "import cycles at module level: " + " | ".join(
        _describe(c, edges) for c in cycles
    )


def test_no_cycle_between_modules():
    edges = _module_edges([*DEPRECATED_ALIASES, *KNOWN_CYCLE_EDGES])
    cycles = _cycles(edges)
    assert not cycles, "import cycles: " + " | ".join(_describe(c, edges) for c in cycles)


def test_no_cycle_between_rooms():
    """Two packages (rooms of ``LAYERS``) never import each other, not even through
    different modules: ``training -> evaluation`` and ``evaluation -> training`` is a cycle."""
    rooms: dict[str, set[str]] = {}
    for importer, imported in _module_edges([*DEPRECATED_ALIASES, *KNOWN_CYCLE_EDGES]).items():
        for target in imported:
            if _room(target) != _room(importer):
                rooms.setdefault(_room(importer), set()).add(_room(target))
    cycles = _cycles(rooms)
    assert not cycles, "packages that import each other: " + " | ".join(
        _describe(c, rooms) for c in cycles
    )


def test_no_upward_import():
    upward = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)}) {where}"
        for a, b, where in _all_edges()
        if _layer(b) > _layer(a) and (a, b) not in DEPRECATED_ALIASES
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
    plugins = {p.name for p in (ROOT / "plugins").glob("*/src/*") if (p / "__init__.py").is_file()}
    assert plugins, "no first-party plugin packages found under plugins/*/src"
    found = [
        f"{m.name} imports {sorted(m.external & plugins)}"
        for m in GRAPH.values()
        if m.external & plugins
    ]
    assert not found, "; ".join(found)


def test_config_checks_looks_nothing_up_by_name():
    """The import graph cannot see ``importlib.import_module("ldmkit.x")``: the foundation's
    config checker holds no module names. The owners declare their keys (training, data,
    evaluation through ``ldmkit_register_config_keys``, the primary config in ``config``)."""
    source = (SRC / PACKAGE / "config_checks.py").read_text(encoding="utf-8")
    assert "importlib" not in source and "import_module" not in source
    strings = [
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
    named = [s for s in strings if s.startswith((f"{PACKAGE}.", f"{PACKAGE}:"))]
    assert not named, f"config_checks.py names ldmkit modules in strings: {named}"


def test_listed_edges_exist():
    """An edge listed as an exception must still be there (remove it when it is gone), and a
    deprecated alias lives in a ``__getattr__``."""
    gone = [(a, b) for a, b in [*KNOWN_CYCLE_EDGES, *DEPRECATED_ALIASES] if b not in GRAPH[a].edges]
    assert not gone, f"these listed edges are gone, remove them from the lists: {gone}"
    not_lazy = [(a, b) for a, b in DEPRECATED_ALIASES if GRAPH[a].edges[b] != IN_GETATTR]
    assert not not_lazy, f"deprecated aliases outside a module __getattr__: {not_lazy}"


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


# -- the deprecated aliases of ldmkit.config --------------------------------------------------
MOVED_FROM_CONFIG = {
    "component_kwargs": "ldmkit.assembly",
    "create_component": "ldmkit.assembly",
    "resolve_denoiser_dims": "ldmkit.assembly",
    "check_parts_fit": "ldmkit.assembly",
    "build_pipeline": "ldmkit.pipeline",
    "compose": "ldmkit.pipeline",
}


@pytest.mark.parametrize("moved", sorted(MOVED_FROM_CONFIG))
def test_moved_names_still_import_from_config_with_a_warning(moved):
    import importlib

    import ldmkit.config

    owner = MOVED_FROM_CONFIG[moved]
    with pytest.warns(DeprecationWarning) as caught:
        value = getattr(ldmkit.config, moved)
    assert value is getattr(importlib.import_module(owner), moved)
    message = str(caught[0].message)
    assert f"ldmkit.config.{moved}" in message and f"from {owner} import {moved}" in message
    assert caught[0].filename == __file__  # the warning points at the caller's line


def test_config_names_that_did_not_move_do_not_warn():
    import ldmkit.config

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert callable(ldmkit.config.compose_config)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        ldmkit.config.nonexistent  # noqa: B018


def _uses_of_moved_names(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "ldmkit.config":
            found += [a.name for a in node.names if a.name in MOVED_FROM_CONFIG]
        elif isinstance(node, ast.Attribute) and node.attr in MOVED_FROM_CONFIG:
            if ast.unparse(node.value) in ("ldmkit.config", "config"):
                found.append(ast.unparse(node))
    return [f"{path.relative_to(ROOT)}:{name}" for name in found]


def test_nothing_uses_a_deprecated_alias():
    """The project's own code, tests and benchmarks import the moved names from their
    owners; ``ldmkit.config`` answers them only for users' older code."""
    roots = ["src", "plugins", "tests", "benchmarks"]
    files = [p for r in roots for p in sorted((ROOT / r).rglob("*.py"))]
    uses = [use for path in files for use in _uses_of_moved_names(path)]
    assert not uses, "imports through ldmkit.config's deprecated aliases: " + ", ".join(uses)
