"""Plugin discovery and the registry built from the plugins' hooks.

Plugins are modules (or objects) with ``@ldmkit.hookimpl`` functions, found through
the ``ldmkit`` entry-point group. Loading is lazy (on first use) and idempotent.

Environment switches:

* ``LDMKIT_DISABLE_PLUGIN_AUTOLOAD=1`` — load no entry points;
* ``LDMKIT_LOAD_PLUGINS=a,b`` — load only these (entry-point or distribution names);
* ``LDMKIT_STRICT_PLUGINS=1`` — a plugin that fails to load is fatal instead of a warning.
"""

from __future__ import annotations

import difflib
import importlib.metadata as importlib_metadata
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from ldmkit import hookspecs
from ldmkit.errors import LdmkitError
from ldmkit.registry import HOOK_KINDS, Registry

ENTRY_POINT_GROUP = "ldmkit"
_TRUE = {"1", "true", "yes", "on"}


class PluginError(LdmkitError, RuntimeError):
    """A plugin could not be loaded or is invalid."""


class PluginLoadWarning(UserWarning):
    """A plugin failed to load; the others were loaded."""


@dataclass
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    error: str | None = None
    config_roots: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        dist = self.distribution or self.name
        return f"{dist} {self.version}" if self.version else dist


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _hook_names() -> list[str]:
    return [n for n in dir(hookspecs) if n.startswith("ldmkit_")]


class PluginManager:
    """pluggy's manager plus bookkeeping: provenance, broken plugins, the registry."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("ldmkit")
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.broken: list[PluginInfo] = []
        self._autoloaded = False
        self._registry: Registry | None = None
        self._config_roots: list[str] | None = None
        self._lock = threading.RLock()

    # -- loading -------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Load the ``ldmkit`` entry points once (honouring the environment switches)."""
        with self._lock:
            if self._autoloaded:
                return
            self._autoloaded = True
            if _env_flag("LDMKIT_DISABLE_PLUGIN_AUTOLOAD"):
                return
            only = {s.strip() for s in os.environ.get("LDMKIT_LOAD_PLUGINS", "").split(",") if s.strip()}
            seen: set[tuple[str, str]] = set()
            for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = getattr(ep, "dist", None)
                dist_name = dist.metadata["Name"] if dist is not None else None
                version = dist.version if dist is not None else None
                if (ep.name, ep.value) in seen:
                    continue  # the same distribution visible twice on sys.path
                seen.add((ep.name, ep.value))
                if only and ep.name not in only and dist_name not in only:
                    continue
                if self.pm.get_plugin(ep.name) is not None or ep.name in self.infos:
                    continue
                info = PluginInfo(ep.name, dist_name, version, ep.value)
                try:
                    plugin = ep.load()
                    self._register(plugin, info)
                except Exception as err:  # noqa: BLE001 - any import error is reported
                    self._report_broken(info, err)

    def _report_broken(self, info: PluginInfo, err: BaseException, during: str | None = None) -> None:
        info.error = f"{type(err).__name__}: {err}"
        self.broken.append(info)
        what = f"failed in {during}" if during else "failed to load"
        message = (
            f"ldmkit plugin {info.name!r} from distribution {info.label} "
            f"(entry point {info.module}) {what}: {info.error}"
        )
        if _env_flag("LDMKIT_STRICT_PLUGINS"):
            raise PluginError(message + " (LDMKIT_STRICT_PLUGINS=1)") from err
        warnings.warn(message, PluginLoadWarning, stacklevel=3)

    def _register(self, plugin: Any, info: PluginInfo) -> None:
        try:
            self.pm.register(plugin, name=info.name)
        except ValueError as err:
            raise PluginError(f"plugin name {info.name!r} is already registered") from err
        except pluggy.PluginValidationError as err:
            raise PluginError(f"plugin {info.name!r} has an invalid hook implementation: {err}") from err
        unknown = [hc.name for hc in self.pm.get_hookcallers(plugin) or [] if hc.spec is None]
        if unknown:
            self.pm.unregister(plugin)
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, _hook_names(), n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise PluginError(
                f"plugin {info.name!r} implements unknown hook(s) {', '.join(hints)}; "
                f"known hooks: {', '.join(_hook_names())}"
            )
        self.infos[info.name] = info
        self._invalidate()

    def register(
        self,
        plugin: Any,
        name: str | None = None,
        *,
        distribution: str | None = None,
        version: str | None = None,
    ) -> str:
        """Register a plugin object directly (tests, notebooks). Returns its name."""
        with self._lock:
            self.load_entry_points()
            name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin)}"
            module = getattr(plugin, "__name__", type(plugin).__name__)
            self._register(plugin, PluginInfo(name, distribution, version, module))
            return name

    def unregister(self, name: str) -> None:
        with self._lock:
            self._forget(name)
            self.broken = [b for b in self.broken if b.name != name]
            self._invalidate()

    def _forget(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.infos.pop(name, None)

    def _invalidate(self) -> None:
        self._registry = None
        self._config_roots = None

    # -- what the plugins provide --------------------------------------------------
    def _impls(self, hook_name: str):
        return getattr(self.pm.hook, hook_name).get_hookimpls()

    @property
    def registry(self) -> Registry:
        with self._lock:
            self.load_entry_points()
            if self._registry is None:
                registry = Registry()
                failed: set[str] = set()
                for hook_name, kind in HOOK_KINDS.items():
                    for impl in self._impls(hook_name):
                        if impl.plugin_name in failed:
                            continue
                        info = self.infos.get(impl.plugin_name, PluginInfo(impl.plugin_name))
                        provider = f"plugin {info.name!r} ({info.label})"
                        collected: list[tuple[str, Any]] = []
                        try:
                            impl.function(register=lambda name, factory, _c=collected: _c.append((name, factory)))
                        except Exception as err:  # noqa: BLE001 - reported like an import failure
                            failed.add(impl.plugin_name)
                            self._forget(impl.plugin_name)
                            self._report_broken(info, err, during=hook_name)
                            continue
                        for name, factory in collected:
                            registry.add(kind, name, factory, provider)
                if failed:  # drop what the broken plugins registered in earlier hooks
                    self._config_roots = None
                    registry.remove_providers(
                        {f"plugin {n!r} ({b.label})" for b in self.broken for n in [b.name] if n in failed}
                    )
                self._registry = registry
            return self._registry

    def config_roots(self) -> list[str]:
        """Hydra search-path entries (``file://`` / ``pkg://``) the plugins contribute."""
        with self._lock:
            self.load_entry_points()
            if self._config_roots is None:
                roots: list[str] = []
                for info in self.infos.values():
                    info.config_roots = []
                for impl in self._impls("ldmkit_register_configs"):
                    info = self.infos.get(impl.plugin_name)

                    def register(path, _info=info, _plugin=impl.plugin_name):
                        root = _search_path_entry(path, _plugin)
                        if root not in roots:
                            roots.append(root)
                        if _info is not None:
                            _info.config_roots.append(root)

                    impl.function(register=register)
                self._config_roots = roots
            return self._config_roots

    def plugin_report(self) -> list[dict[str, Any]]:
        """Per plugin: distribution, version, registered names per kind, config groups."""
        registry = self.registry
        self.config_roots()
        rows = []
        for info in self.infos.values():
            provider = f"plugin {info.name!r} ({info.label})"
            rows.append(
                {
                    "name": info.name,
                    "distribution": info.distribution,
                    "version": info.version,
                    "module": info.module,
                    "registers": {k: v for k, v in registry.by_provider(provider).items() if v},
                    "config_groups": _config_groups(info.config_roots),
                    "error": None,
                }
            )
        for info in self.broken:
            rows.append(
                {
                    "name": info.name,
                    "distribution": info.distribution,
                    "version": info.version,
                    "module": info.module,
                    "registers": {},
                    "config_groups": {},
                    "error": info.error,
                }
            )
        return rows


def _search_path_entry(path: Any, plugin: str) -> str:
    text = str(path)
    if text.startswith("pkg://"):
        return text
    if text.startswith("file://"):
        text = text[len("file://") :]
    directory = Path(text)
    if not directory.is_dir():
        raise PluginError(f"plugin {plugin!r} registered config root {text!r}, which is not a directory")
    return f"file://{directory.resolve()}"


def _root_directory(root: str) -> Path | None:
    if root.startswith("file://"):
        return Path(root[len("file://") :])
    import importlib.resources

    try:
        return Path(str(importlib.resources.files(root[len("pkg://") :].replace("/", "."))))
    except (ModuleNotFoundError, TypeError):
        return None


def _config_groups(roots: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for root in roots:
        directory = _root_directory(root)
        if directory is None or not directory.is_dir():
            continue
        for group in sorted(p for p in directory.iterdir() if p.is_dir()):
            options = sorted(p.stem for p in group.glob("*.yaml"))
            if options:
                groups.setdefault(group.name, []).extend(options)
    return groups


_manager: PluginManager | None = None
_manager_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager (created on first use)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = PluginManager()
        return _manager


def reset_plugin_manager() -> None:
    """Forget all plugins; the next use loads the entry points again."""
    global _manager
    with _manager_lock:
        _manager = None


def get_registry() -> Registry:
    return get_plugin_manager().registry
