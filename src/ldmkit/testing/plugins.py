"""Registering plugins for the duration of a test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ldmkit.plugins import PluginInfo, get_plugin_manager


@contextlib.contextmanager
def temporary_plugin(plugin: Any, name: str | None = None) -> Iterator[str]:
    """Register ``plugin`` (a module, class or object with ``@ldmkit.hookimpl``
    functions) and unregister it on exit. Yields the name it was registered under.

    Works when the plugin is also pip-installed, as a plugin's own tests have it:

    * ``plugin`` already loaded from its entry point (the same module object): it stays
      registered under the entry point's name, which is yielded, and is left as it was;
    * another plugin holds ``name`` (the installed copy of the one under test, say): that one
      steps aside for the duration and is registered again, with its distribution and
      version, on exit.
    """
    manager = get_plugin_manager()
    manager.load_entry_points()  # so that an installed copy is found now, not on first use
    with manager._lock:
        current = manager.pm.get_name(plugin)
        if current is None:
            name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin)}"
            holder, holder_info = manager.pm.get_plugin(name), manager.infos.get(name)
            if holder is not None:
                manager.unregister(name)
            try:
                manager.register(plugin, name=name)
            except BaseException:
                _restore(manager, holder, holder_info, name)
                raise
    if current is not None:
        yield current
        return
    try:
        yield name
    finally:
        manager.unregister(name)
        _restore(manager, holder, holder_info, name)


def _restore(manager: Any, plugin: Any, info: PluginInfo | None, name: str) -> None:
    """Register again a plugin that stepped aside (nothing to do when none did)."""
    if plugin is not None:
        with manager._lock:
            manager._register(plugin, info or PluginInfo(name))
