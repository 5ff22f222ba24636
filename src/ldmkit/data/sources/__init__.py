"""Dataset sources ``ldmkit data prepare`` can turn into shards, by name.

Sources are plugins: a package adds one with the ``ldmkit_register_data_sources`` hook, and
ldmkit's own (below) register through the same hook (the plugin manager loads this module as
a built-in plugin, which also declares what the ``data`` config keys take:
:mod:`ldmkit.data.schema`). Look them up with :func:`source_class` / :func:`create_source`;
:data:`SOURCES` is a read-only, always-current ``name -> class`` view of the registry.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ldmkit.data.sources.base import Source, SourceSample
from ldmkit.data.sources.cutouts import Cutouts
from ldmkit.data.sources.emoji import Emoji
from ldmkit.data.sources.fashion_mnist import FashionMNIST
from ldmkit.data.sources.image_folder import ImageFolder
from ldmkit.data.sources.semantic_scenes import SemanticScenes
from ldmkit.data.sources.skimage_photos import SkimagePhotos
from ldmkit.data.sources.tuxpaint import TuxPaint
from ldmkit.hookspecs import hookimpl

BUILTIN_SOURCES: tuple[type[Source], ...] = (
    FashionMNIST, ImageFolder, Emoji, TuxPaint, SemanticScenes, Cutouts, SkimagePhotos,
)  # fmt: skip


@hookimpl
def ldmkit_register_data_sources(register):
    for source in BUILTIN_SOURCES:
        register(source)


@hookimpl
def ldmkit_register_config_keys(register):
    from ldmkit.data.schema import DATA_KEYS

    register("data", DATA_KEYS)


def source_class(name: str) -> type[Source]:
    """The source registered as ``name``; an unknown name raises ``ValueError`` listing the
    registered sources and the plugin providing each."""
    from ldmkit.plugins import get_registry
    from ldmkit.registry import RegistryError

    registry = get_registry()
    try:
        return registry.data_source(name)
    except RegistryError as err:
        raise ValueError(str(err)) from None


def create_source(name: str, **options: Any) -> Source:
    return source_class(name)(**options)


class RegisteredSources(Mapping[str, type[Source]]):
    """``name -> Source subclass`` for every registered source, read from the plugin
    registry on each access (plugins registered later show up; nothing here can go stale)."""

    def _classes(self) -> dict[str, type[Source]]:
        from ldmkit.plugins import get_registry

        registry = get_registry()
        return {name: registry.data_source(name) for name in registry.names("data_source")}

    def __getitem__(self, name: str) -> type[Source]:
        return self._classes()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes())

    def __len__(self) -> int:
        return len(self._classes())

    def __repr__(self) -> str:
        return f"SOURCES({', '.join(self._classes())})"


SOURCES: Mapping[str, type[Source]] = RegisteredSources()

__all__ = [
    "BUILTIN_SOURCES",
    "SOURCES",
    "RegisteredSources",
    "Source",
    "SourceSample",
    "create_source",
    "source_class",
]
