"""Registering plugins for the duration of a test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ldmkit.plugins import get_plugin_manager


@contextlib.contextmanager
def temporary_plugin(plugin: Any, name: str | None = None) -> Iterator[str]:
    """Register ``plugin`` (a module, class or object with ``@ldmkit.hookimpl``
    functions) and unregister it on exit. Yields the name it was registered under."""
    manager = get_plugin_manager()
    registered = manager.register(plugin, name=name)
    try:
        yield registered
    finally:
        manager.unregister(registered)
