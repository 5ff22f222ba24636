"""The registry: what the plugins registered, per kind, and who provided it.

Components (``first_stage``, ``denoiser``, ``conditioner``, ``sampler``) are factories;
a ``stage`` is a :class:`Stage` (what ``ldmkit train`` and ``ldmkit evaluate`` run), and an
``evaluator`` the :class:`Evaluator` a plugin adds to a stage registered elsewhere; a
``data_source`` is a :class:`ldmkit.data.Source` subclass (what ``ldmkit data prepare`` reads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ldmkit.errors import LdmkitError

COMPONENT_KINDS = ("first_stage", "denoiser", "conditioner", "sampler")
KINDS = (*COMPONENT_KINDS, "stage", "evaluator", "data_source")

# hook name -> kind
HOOK_KINDS = {
    "ldmkit_register_first_stages": "first_stage",
    "ldmkit_register_denoisers": "denoiser",
    "ldmkit_register_conditioners": "conditioner",
    "ldmkit_register_samplers": "sampler",
    "ldmkit_register_stages": "stage",
    "ldmkit_register_data_sources": "data_source",
}

def kind_label(kind: str) -> str:
    """How messages name a kind: ``data source`` for ``data_source``, ``evaluator of stage``
    for ``evaluator`` (registered under the stage's name), the others as they are
    (``first_stage`` is also the config group users type)."""
    return {"data_source": "data source", "evaluator": "evaluator of stage"}.get(kind, kind)


# kinds whose "unknown name" error also says which plugin provides each registered name: few
# names, and a user who typed one wrong often lacks the package that provides it
_LISTED_WITH_PROVIDERS = ("stage", "data_source")


class RegistryError(LdmkitError, LookupError):
    """A name is unknown, or registered twice."""


@dataclass(frozen=True)
class Stage:
    """A training stage: what ``ldmkit train stage=NAME`` runs and ``ldmkit evaluate
    stage=NAME`` scores.

    ``train(cfg, *, data=None) -> run folder``; ``evaluate(cfg, **kwargs) -> metrics dict``
    (None: the stage has no evaluator); ``trainer_config``: the ``trainer`` config option
    composition selects for this stage when neither the command line nor an experiment picks
    one (``default`` is the primary config's own choice).
    """

    name: str
    train: Callable[..., Path]
    evaluate: Callable[..., dict[str, Any]] | None = None
    trainer_config: str = "default"


@dataclass(frozen=True)
class Evaluator:
    """``evaluate(cfg, **kwargs) -> metrics dict`` for the stage ``stage``, registered apart
    from it (``register(NAME, evaluate=...)`` in ``ldmkit_register_stages``): how ldmkit's
    evaluation gives the ``autoencoder`` stage its evaluator, without training importing
    evaluation."""

    stage: str
    evaluate: Callable[..., dict[str, Any]]


def entry_kind(kind: str, registered: Any) -> str:
    """The registry kind of what a hook of ``kind`` registered (``ldmkit_register_stages``
    registers stages and evaluators)."""
    return "evaluator" if kind == "stage" and isinstance(registered, Evaluator) else kind


# What the ``register`` callback of each hook accepts, returning ``(name, what is registered)``.
# They run inside the plugin's hook, so a wrong call is reported against that plugin.


def register_stage(
    name: str,
    train: Callable[..., Path] | None = None,
    *,
    evaluate: Callable[..., dict[str, Any]] | None = None,
    trainer_config: str = "default",
) -> tuple[str, Stage | Evaluator]:
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"stage {name!r}: evaluate must be callable or None, got {evaluate!r}")
    if train is None and evaluate is not None:
        return name, Evaluator(name, evaluate)
    if not callable(train):
        raise TypeError(f"stage {name!r}: train must be callable, got {train!r}")
    if not isinstance(trainer_config, str) or not trainer_config:
        raise TypeError(
            f"stage {name!r}: trainer_config must name a trainer config option, "
            f"got {trainer_config!r}"
        )
    return name, Stage(name, train, evaluate, trainer_config)


def register_data_source(source: Any) -> tuple[str, Any]:
    """A :class:`ldmkit.data.Source` subclass, registered under its ``name``."""
    name = getattr(source, "name", None)
    if not isinstance(source, type) or not isinstance(name, str):
        raise TypeError(f"a data source must be a Source subclass with a `name`, got {source!r}")
    return name, source


def register_component(name: str, factory: Callable[..., Any]) -> tuple[str, Callable[..., Any]]:
    return name, factory


REGISTER_SIGNATURES: dict[str, Callable[..., tuple[str, Any]]] = {
    **{kind: register_component for kind in COMPONENT_KINDS},
    "stage": register_stage,
    "data_source": register_data_source,
}


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    factory: Any  # a factory (components), a Stage, a Source subclass
    provider: str  # the plugin that registered it, e.g. "plugin 'samplers' (ldmkit-samplers 0.1.0)"


class Registry:
    """Names -> what was registered under them, one namespace per kind."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, name: str, factory: Any, provider: str) -> None:
        if kind not in self._entries:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        what = kind_label(kind)
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{provider} registered a {what} with an invalid name {name!r}")
        expected = {"stage": Stage, "evaluator": Evaluator}.get(kind)
        if expected is not None and not isinstance(factory, expected):
            raise RegistryError(
                f"{provider} registered {what} {name!r} as {factory!r}, not a {expected.__name__}"
            )
        if expected is None and not callable(factory):
            raise RegistryError(
                f"{provider} registered {what} {name!r} with a non-callable {factory!r}"
            )
        existing = self._entries[kind].get(name)
        if existing is None and kind in ("stage", "evaluator"):
            existing, what = self._second_evaluator(kind, name, factory), kind_label("evaluator")
        if existing is not None:
            raise RegistryError(
                f"{what} {name!r} is registered twice: by {existing.provider} and by {provider}"
            )
        self._entries[kind][name] = Entry(kind, name, factory, provider)

    def _second_evaluator(self, kind: str, name: str, factory: Any) -> Entry | None:
        """The entry that already gives stage ``name`` an evaluator, when ``factory`` gives
        it one too (a stage registered with ``evaluate=`` and an evaluator for it)."""
        if kind == "evaluator":
            stage = self._entries["stage"].get(name)
            return stage if stage is not None and stage.factory.evaluate is not None else None
        return self._entries["evaluator"].get(name) if factory.evaluate is not None else None

    def remove_providers(self, providers: set[str]) -> None:
        for entries in self._entries.values():
            for name in [n for n, e in entries.items() if e.provider in providers]:
                del entries[name]

    def get(self, kind: str, name: str) -> Entry:
        try:
            return self._entries[kind][name]
        except KeyError:
            listing = self.listing(kind)
            raise RegistryError(f"unknown {kind_label(kind)} {name!r}; {listing}") from None

    def listing(self, kind: str) -> str:
        """``registered samplers: ddim, ddpm`` (for stages and data sources: grouped by the
        plugin that provides them)."""
        entries = self._entries.get(kind, {})
        what = f"registered {kind_label(kind)}s"
        if not entries:
            return f"{what}: (none)"
        if kind not in _LISTED_WITH_PROVIDERS:
            return f"{what}: {', '.join(sorted(entries))}"
        by_provider: dict[str, list[str]] = {}
        for entry in sorted(entries.values(), key=lambda e: e.name):
            by_provider.setdefault(entry.provider, []).append(entry.name)
        return f"{what}: " + "; ".join(
            f"{', '.join(names)} (from {provider})" for provider, names in by_provider.items()
        )

    def name_of(self, kind: str, factory: Any) -> str | None:
        """The name ``factory`` is registered under as a ``kind`` (the first, sorted, of
        several), or None."""
        return next((n for n, e in sorted(self._entries[kind].items()) if e.factory is factory), None)

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def stage(self, name: str) -> Stage:
        """The training stage ``name`` (with the evaluator registered for it, if any); an
        unknown name lists the stages and their plugins."""
        stage = self.get("stage", name).factory
        evaluator = self._entries["evaluator"].get(name)
        return replace(stage, evaluate=evaluator.factory.evaluate) if evaluator is not None else stage

    def data_source(self, name: str) -> type:
        """The :class:`~ldmkit.data.Source` subclass registered as ``name``."""
        return self.get("data_source", name).factory

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
