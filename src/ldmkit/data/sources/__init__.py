"""Dataset sources ``ldmkit data prepare`` can turn into shards, by name."""

from __future__ import annotations

from typing import Any

from ldmkit.data.sources.base import Source, SourceSample
from ldmkit.data.sources.cutouts import Cutouts
from ldmkit.data.sources.emoji import Emoji
from ldmkit.data.sources.fashion_mnist import FashionMNIST
from ldmkit.data.sources.image_folder import ImageFolder
from ldmkit.data.sources.semantic_scenes import SemanticScenes
from ldmkit.data.sources.tuxpaint import TuxPaint

SOURCES: dict[str, type[Source]] = {
    cls.name: cls for cls in (FashionMNIST, ImageFolder, Emoji, TuxPaint, SemanticScenes, Cutouts)
}


def register_source(cls: type[Source]) -> type[Source]:
    """Add a source (usable as a class decorator); a clash names both classes."""
    existing = SOURCES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"data source {cls.name!r} is registered twice: {existing.__module__}.{existing.__qualname__} "
            f"and {cls.__module__}.{cls.__qualname__}"
        )
    SOURCES[cls.name] = cls
    return cls


def create_source(name: str, **options: Any) -> Source:
    try:
        cls = SOURCES[name]
    except KeyError:
        raise ValueError(
            f"unknown data source {name!r}; expected one of {', '.join(sorted(SOURCES))}"
        ) from None
    return cls(**options)


__all__ = ["SOURCES", "Source", "SourceSample", "create_source", "register_source"]
