"""Plugin discovery and the registry built from the plugins' hooks.

Plugins are modules (or objects) with ``@ldmkit.hookimpl`` functions, found through
the ``ldmkit`` entry-point group. Loading is lazy (on first use) and idempotent.
ldmkit's own training stages, their evaluators and the data sources are plugins too
(:data:`BUILTIN_PLUGINS`), registered through the same hooks and always loaded.

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
from ldmkit.registry import HOOK_KINDS, REGISTER_SIGNATURES, Registry, entry_kind, kind_label

ENTRY_POINT_GROUP = "ldmkit"
# the core's own plugin modules: loaded before the entry points, whatever the switches say
# (they are part of ldmkit, not installed extras); listed by `ldmkit plugins` like the others
BUILTIN_PLUGINS = ("ldmkit.training.stages", "ldmkit.evaluation.stages", "ldmkit.data.sources")
_TRUE = {"1", "true", "yes", "on"}


class PluginError(LdmkitError, RuntimeError):
    """A plugin could not be loaded or is invalid."""


class PluginLoadWarning(UserWarning):
    """A plugin failed to load (the others were loaded), or LDMKIT_LOAD_PLUGINS names none installed."""


def _warn_unmatched(only: set[str], installed: dict[str, str | None]) -> None:
    """A name in ``LDMKIT_LOAD_PLUGINS`` that is no installed plugin's entry-point or
    distribution name (a typo would otherwise load nothing of it, silently)."""
    names = [*installed, *(d for d in installed.values() if d)]
    for name in sorted(only - set(names)):
        close = difflib.get_close_matches(name, names, n=1)
        listed = ", ".join(f"{ep} ({dist})" if dist else ep for ep, dist in installed.items()) or "none"
        warnings.warn(
            f"LDMKIT_LOAD_PLUGINS names {name!r}, which is no installed plugin"
            + (f" (did you mean {close[0]!r}?)" if close else "") + f"; installed: {listed}",
            PluginLoadWarning,
            stacklevel=4,
        )


def _warn_no_hooks(plugin: Any, info: PluginInfo) -> None:
    """An entry point whose module implements no hook: it names the package instead of its hook
    module, or the hooks lack the decorator (it would load and register nothing, silently)."""
    undecorated = [name for name in _hook_names() if callable(getattr(plugin, name, None))]
    why = (
        f"@ldmkit.hookimpl is missing on its {', '.join(undecorated)}"
        if undecorated
        else "the module the entry point names holds no @ldmkit.hookimpl function (the package instead of its hook module?)"
    )
    warnings.warn(
        f"ldmkit plugin {info.name!r} from distribution {info.label} (entry point {info.module}) implements no "
        f"ldmkit hook, so it provides nothing: {why}",
        PluginLoadWarning,
        stacklevel=4,
    )


def misgrouped_entry_points() -> list[str]:
    """Entry points that installed distributions declare in a group named like ldmkit's but not
    it (``ldmkit.plugins``, ``ldmkit_plugins``): plugins ldmkit never loads, one line each."""
    return [row["note"] for row in misgrouped_entry_point_rows()]


def misgrouped_entry_point_rows() -> list[dict[str, Any]]:
    """:func:`misgrouped_entry_points` as rows of ``ldmkit plugins --json`` (``status``:
    ``ignored``, the line in ``note``, the group in ``group``)."""
    rows: list[dict[str, Any]] = []
    for dist in importlib_metadata.distributions():
        for ep in dist.entry_points:
            group = ep.group.lower()
            if ep.group == ENTRY_POINT_GROUP or not (
                ENTRY_POINT_GROUP in group or difflib.get_close_matches(group, [ENTRY_POINT_GROUP], cutoff=0.8)
            ):
                continue
            line = (
                f"distribution {dist.metadata['Name']} {dist.version} declares the entry point {ep.name} = {ep.value} "
                f"in the group {ep.group!r}, which ldmkit does not read: a plugin's entry point goes in the group "
                f"{ENTRY_POINT_GROUP!r} ([project.entry-points.{ENTRY_POINT_GROUP}] in pyproject.toml)"
            )
            if all(row["note"] != line for row in rows):
                info = PluginInfo(ep.name, dist.metadata["Name"], dist.version, ep.value)
                rows.append({**_row(info, "ignored", note=line), "group": ep.group})
    return rows


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
        self._registered: list[tuple[str, str, str, Any]] | None = None
        self._config_roots: list[str] | None = None
        self._config_keys: list[tuple[str, dict[str, Any]]] | None = None
        self._option_clashes: tuple[list[str], list[str]] | None = None  # (for these roots, clashes)
        self._lock = threading.RLock()

    # -- loading -------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Load the ``ldmkit`` entry points once (honouring the environment switches)."""
        with self._lock:
            if self._autoloaded:
                return
            self._autoloaded = True
            self._load_builtins()
            if _env_flag("LDMKIT_DISABLE_PLUGIN_AUTOLOAD"):
                return
            only = {s.strip() for s in os.environ.get("LDMKIT_LOAD_PLUGINS", "").split(",") if s.strip()}
            seen: set[tuple[str, str]] = set()
            installed: dict[str, str | None] = {}  # entry-point name -> distribution
            for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = getattr(ep, "dist", None)
                dist_name = dist.metadata["Name"] if dist is not None else None
                version = dist.version if dist is not None else None
                if (ep.name, ep.value) in seen:
                    continue  # the same distribution visible twice on sys.path
                seen.add((ep.name, ep.value))
                installed.setdefault(ep.name, dist_name)
                if only and ep.name not in only and dist_name not in only:
                    continue
                info = PluginInfo(ep.name, dist_name, version, ep.value)
                if self.pm.get_plugin(ep.name) is not None or ep.name in self.infos:
                    # another distribution's entry point has this name: loading the second
                    # silently (or not at all) would depend on the order of sys.path
                    holder = self.infos.get(ep.name)
                    by = f" by {holder.label} (entry point {holder.module})" if holder else ""
                    clash = PluginError(f"the plugin name {ep.name!r} is already registered{by}; rename the entry point")
                    self._report_broken(info, clash)
                    continue
                try:
                    plugin = ep.load()
                    self._register(plugin, info)
                except Exception as err:  # noqa: BLE001 - any import error is reported
                    self._report_broken(info, err)
                    continue
                if not self.pm.get_hookcallers(plugin):
                    _warn_no_hooks(plugin, info)
            _warn_unmatched(only, installed)

    def _load_builtins(self) -> None:
        import importlib

        from ldmkit._version import __version__

        for module in BUILTIN_PLUGINS:
            info = PluginInfo(module, "ldmkit", __version__, module)
            self._register(importlib.import_module(module), info)

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
            holder = next((other for other in self.infos.values() if other is not info and other.name == info.name), None)
            by = f" by {holder.label} (entry point {holder.module})" if holder is not None else ""
            raise PluginError(
                f"plugin name {info.name!r} from {info.label} (entry point {info.module}) is already "
                f"registered{by}"
            ) from err
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
        self._registered = None
        self._config_roots = None
        self._config_keys = None

    # -- what the plugins provide --------------------------------------------------
    def _impls(self, hook_name: str):
        return getattr(self.pm.hook, hook_name).get_hookimpls()

    def _provider(self, plugin_name: str) -> str:
        info = self.infos.get(plugin_name, PluginInfo(plugin_name))
        return f"plugin {info.name!r} ({info.label})"

    def _registrations(self) -> list[tuple[str, str, str, Any]]:
        """``(plugin, kind, name, factory)`` from every registration hook, in hook order; a
        plugin whose hook raises is reported as broken and what it registered is dropped."""
        if self._registered is None:
            found: list[tuple[str, str, str, Any]] = []
            failed: set[str] = set()
            for hook_name, kind in HOOK_KINDS.items():
                for impl in self._impls(hook_name):
                    if impl.plugin_name in failed:
                        continue
                    collected: list[tuple[str, Any]] = []
                    signature = REGISTER_SIGNATURES[kind]

                    def register(*args, _c=collected, _signature=signature, **kwargs):
                        _c.append(_signature(*args, **kwargs))

                    try:
                        impl.function(register=register)
                    except Exception as err:  # noqa: BLE001 - reported like an import failure
                        info = self.infos.get(impl.plugin_name, PluginInfo(impl.plugin_name))
                        failed.add(impl.plugin_name)
                        self._forget(impl.plugin_name)
                        self._config_roots = None
                        self._report_broken(info, err, during=hook_name)
                        continue
                    found += [
                        (impl.plugin_name, entry_kind(kind, factory), name, factory)
                        for name, factory in collected
                    ]
            self._registered = [entry for entry in found if entry[0] not in failed]
        return self._registered

    @property
    def registry(self) -> Registry:
        """Every registered name; a name registered by two plugins raises
        :class:`~ldmkit.registry.RegistryError` naming both."""
        with self._lock:
            self.load_entry_points()
            if self._registry is None:
                registry = Registry()
                for plugin, kind, name, factory in self._registrations():
                    registry.add(kind, name, factory, self._provider(plugin))
                self._registry = registry
            return self._registry

    def _plugin_config_roots(self) -> list[str]:
        """Call the config hooks (once): every plugin's roots, in order, without duplicates."""
        if self._config_roots is None:
            roots: list[str] = []
            for info in self.infos.values():
                info.config_roots = []
            for impl in self._impls("ldmkit_register_configs"):
                info = self.infos.get(impl.plugin_name)
                registered: list[str] = []

                def register(path, _registered=registered, _plugin=impl.plugin_name):
                    _registered.append(_search_path_entry(path, _plugin))

                try:
                    impl.function(register=register)
                except Exception as err:  # noqa: BLE001 - reported like an import failure
                    self._forget(impl.plugin_name)
                    self._registry, self._registered, self._config_keys = None, None, None
                    self._report_broken(info or PluginInfo(impl.plugin_name), err, during="ldmkit_register_configs")
                    continue
                roots += [root for root in registered if root not in roots]
                if info is not None:
                    info.config_roots += registered
            self._config_roots = roots
        return self._config_roots

    def config_keys(self) -> list[tuple[str, dict[str, Any]]]:
        """``(provider, {key: Spec})`` from every ``ldmkit_register_config_keys`` hook, in
        plugin order (ldmkit's own training, evaluation and data first). A plugin whose hook
        raises, or declares something that is not a Spec, is reported as broken, like a plugin
        that fails to load, and its declarations are dropped."""
        from ldmkit.config_checks import typed_keys

        with self._lock:
            self.load_entry_points()
            if self._config_keys is None:
                found: list[tuple[str, dict[str, Any]]] = []
                for impl in self._impls("ldmkit_register_config_keys"):
                    declared: list[dict[str, Any]] = []

                    def register(node, keys, _declared=declared):
                        _declared.append(typed_keys(node, keys))

                    try:
                        impl.function(register=register)
                    except Exception as err:  # noqa: BLE001 - reported like an import failure
                        info = self.infos.get(impl.plugin_name, PluginInfo(impl.plugin_name))
                        self._forget(impl.plugin_name)
                        self._invalidate()
                        self._report_broken(info, err, during="ldmkit_register_config_keys")
                        continue
                    found += [(self._provider(impl.plugin_name), keys) for keys in declared]
                self._config_keys = found
            return self._config_keys

    def config_roots(self) -> list[str]:
        """Hydra search-path entries (``file://`` / ``pkg://``) the plugins contribute. Two
        plugins (or a plugin and ldmkit's own conf/) shipping the same config option raise
        :class:`PluginError` naming both: which one Hydra picked would depend on install order."""
        with self._lock:
            self.load_entry_points()
            roots = self._plugin_config_roots()
            clashes = self.config_option_clashes()
            if clashes:
                raise PluginError("; ".join(clashes))
            return roots

    def option_shipper(self, group: str, option: str) -> PluginInfo | None:
        """The plugin, loaded or broken, whose config roots ship ``group/option.yaml``."""
        with self._lock:
            self.load_entry_points()
            self._plugin_config_roots()
            for info in [*self.infos.values(), *self.broken]:
                for root in info.config_roots:
                    directory = root_directory(root)
                    if directory is not None and (directory / group / f"{option}.yaml").is_file():
                        return info
        return None

    def config_option_clashes(self) -> list[str]:
        """One message per config option (``group/option.yaml``) that two sources ship."""
        from ldmkit.resources import config_dir

        with self._lock:
            self.load_entry_points()
            roots = self._plugin_config_roots()
            if self._option_clashes is not None and self._option_clashes[0] is roots:
                return list(self._option_clashes[1])  # composing again: the files did not move
        sources: list[tuple[str, Path]] = [("ldmkit's conf/", Path(config_dir()))]
        for info in self.infos.values():
            for root in info.config_roots:
                directory = root_directory(root)
                if directory is not None:
                    sources.append((f"plugin {info.name!r} ({info.label})", directory))
        shipped: dict[str, list[tuple[str, Path]]] = {}
        for provider, directory in sources:
            for option in config_options(directory):
                path = (directory / option).resolve()
                providers = shipped.setdefault(option, [])
                if all(path != other for _, other in providers):
                    providers.append((provider, path))
        clashes = []
        for option, providers in shipped.items():
            if len(providers) > 1:
                group, _, name = option[: -len(".yaml")].partition("/")
                by = " and by ".join(f"{provider} ({path})" for provider, path in providers)
                clashes.append(
                    f"config option {group}={name} is shipped twice: by {by}; uninstall one of them "
                    f"or rename its option"
                )
        self._option_clashes = (roots, clashes)
        return list(clashes)

    def registration_clashes(self) -> list[str]:
        """One message per name that two plugins register (what :attr:`registry` raises)."""
        with self._lock:
            self.load_entry_points()
            registrations = self._registrations()
        first: dict[tuple[str, str], str] = {}
        clashes = []
        for plugin, kind, name, _ in registrations:
            provider = self._provider(plugin)
            if (kind, name) in first and first[(kind, name)] != provider:
                clashes.append(
                    f"{kind_label(kind)} {name!r} is registered twice: by {first[(kind, name)]} "
                    f"and by {provider}"
                )
            first.setdefault((kind, name), provider)
        return clashes

    def installed(self) -> list[PluginInfo]:
        """The plugins installed as ``ldmkit`` entry points, loaded or not (nothing is imported)."""
        found, seen = [], set()
        for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
            if (ep.name, ep.value) in seen:
                continue
            seen.add((ep.name, ep.value))
            dist = getattr(ep, "dist", None)
            found.append(
                PluginInfo(ep.name, dist.metadata["Name"] if dist is not None else None,
                           dist.version if dist is not None else None, ep.value)
            )
        return found

    def autoload_note(self) -> str | None:
        """Why installed plugins may not be loaded (the environment switches), or None."""
        if _env_flag("LDMKIT_DISABLE_PLUGIN_AUTOLOAD"):
            return "plugin autoload is off (LDMKIT_DISABLE_PLUGIN_AUTOLOAD=1)"
        only = os.environ.get("LDMKIT_LOAD_PLUGINS", "").strip()
        if only:
            return f"only the plugins in LDMKIT_LOAD_PLUGINS={only} are loaded"
        return None

    def plugin_report(self) -> list[dict[str, Any]]:
        """Per installed or registered plugin: distribution, version, registered names per
        kind, config groups, and ``status`` (``loaded``, ``broken`` with ``error``, or ``not
        loaded`` with the reason in ``note``). Clashes between plugins do not stop the report:
        :meth:`problems` lists them."""
        with self._lock:
            self.load_entry_points()
            registrations = self._registrations()
            self._plugin_config_roots()
        rows = []
        for info in self.infos.values():
            registers: dict[str, list[str]] = {}
            for plugin, kind, name, _ in registrations:
                if plugin == info.name:
                    registers.setdefault(kind, []).append(name)
            rows.append(_row(info, "loaded", registers={k: sorted(v) for k, v in registers.items()},
                             config_groups=_config_groups(info.config_roots)))
        for info in self.broken:
            rows.append(_row(info, "broken"))
        listed = {row["name"] for row in rows}
        note = self.autoload_note()
        for info in self.installed():
            if info.name not in listed:
                rows.append(_row(info, "not loaded", note=note or "not loaded"))
        return rows

    def problems(self) -> list[str]:
        """What stops ldmkit from using the installed plugins as they are: names registered
        twice, config options shipped twice."""
        return self.registration_clashes() + self.config_option_clashes()


def _row(info: PluginInfo, status: str, *, registers: dict[str, list[str]] | None = None,
         config_groups: dict[str, list[str]] | None = None, note: str | None = None) -> dict[str, Any]:
    return {
        "name": info.name,
        "distribution": info.distribution,
        "version": info.version,
        "module": info.module,
        "status": status,
        "registers": registers or {},
        "config_groups": config_groups or {},
        "error": info.error,
        "note": note,
    }


def config_options(directory: Path) -> list[str]:
    """``group/option.yaml`` of every option in a config root (nested groups included)."""
    if not directory.is_dir():
        return []
    return sorted(
        p.relative_to(directory).as_posix()
        for group in directory.iterdir() if group.is_dir()
        for p in group.rglob("*.yaml")
    )


def _search_path_entry(path: Any, plugin: str) -> str:
    text = str(path)
    if text.startswith("pkg://"):
        directory = root_directory(text)
        if directory is None or not directory.is_dir():
            raise PluginError(f"plugin {plugin!r} registered config root {text!r}, which is not a package folder")
        return text
    if text.startswith("file://"):
        text = text[len("file://") :]
    directory = Path(text)
    if not directory.is_dir():
        raise PluginError(f"plugin {plugin!r} registered config root {text!r}, which is not a directory")
    return f"file://{directory.resolve()}"


def root_directory(root: str) -> Path | None:
    """The folder a search-path entry (``file://`` or ``pkg://``) points at."""
    if root.startswith("file://"):
        return Path(root[len("file://") :])
    import importlib.util

    try:  # a regular package or a namespace folder (a conf/ without __init__.py)
        spec = importlib.util.find_spec(root[len("pkg://") :].replace("/", "."))
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


_root_directory = root_directory  # the name tests and older callers import


def _config_groups(roots: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for root in roots:
        directory = root_directory(root)
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
