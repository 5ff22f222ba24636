"""The registry: registered component names per interface, and who provided them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ldmkit.errors import LdmkitError

KINDS = ("first_stage", "denoiser", "conditioner", "sampler")

# hook name -> component kind
HOOK_KINDS = {
    "ldmkit_register_first_stages": "first_stage",
    "ldmkit_register_denoisers": "denoiser",
    "ldmkit_register_conditioners": "conditioner",
    "ldmkit_register_samplers": "sampler",
}


class RegistryError(LdmkitError, LookupError):
    """A name is unknown, or registered twice."""


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    factory: Callable[..., Any]
    provider: str  # the plugin that registered it, e.g. "ldmkit-samplers 0.1.0"


class Registry:
    """Names -> factories, one namespace per component kind."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, name: str, factory: Callable[..., Any], provider: str) -> None:
        if kind not in self._entries:
            raise ValueError(f"unknown component kind {kind!r}; expected one of {KINDS}")
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{provider} registered a {kind} with an invalid name {name!r}")
        if not callable(factory):
            raise RegistryError(
                f"{provider} registered {kind} {name!r} with a non-callable {factory!r}"
            )
        existing = self._entries[kind].get(name)
        if existing is not None:
            raise RegistryError(
                f"{kind} {name!r} is registered twice: by {existing.provider} and by {provider}"
            )
        self._entries[kind][name] = Entry(kind, name, factory, provider)

    def remove_providers(self, providers: set[str]) -> None:
        for entries in self._entries.values():
            for name in [n for n, e in entries.items() if e.provider in providers]:
                del entries[name]

    def get(self, kind: str, name: str) -> Entry:
        try:
            return self._entries[kind][name]
        except KeyError:
            options = ", ".join(sorted(self._entries.get(kind, {}))) or "(none registered)"
            raise RegistryError(
                f"unknown {kind} {name!r}; registered {kind}s: {options}"
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def by_provider(self, provider: str) -> dict[str, list[str]]:
        return {
            kind: sorted(e.name for e in entries.values() if e.provider == provider)
            for kind, entries in self._entries.items()
        }

    def __iter__(self) -> Iterator[Entry]:
        for entries in self._entries.values():
            yield from entries.values()

    def create(self, kind: str, name: str, **kwargs: Any) -> Any:
        """Instantiate a registered component; bad arguments name the component."""
        entry = self.get(kind, name)
        try:
            return entry.factory(**kwargs)
        except TypeError as err:
            raise TypeError(
                f"cannot build {kind} {name!r} (from {entry.provider}) with arguments "
                f"{sorted(kwargs)}: {err}"
            ) from err
