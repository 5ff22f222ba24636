"""Type and range checks of config values, so that a bad value is one line naming its key.

Two sources of truth, one message format (``trainer.max_steps='abc': expected an integer >= 1``):

* the keys each owner declares (:class:`Schema`): a table of :class:`Spec` s per config node,
  next to the code that reads it: the primary config's keys in :mod:`ldmkit.config`,
  ``trainer`` in :mod:`ldmkit.training.schema`, ``data`` in :mod:`ldmkit.data.schema`, ``eval``
  in :mod:`ldmkit.evaluation.schema`. Those above this layer reach the checker through the
  ``ldmkit_register_config_keys`` hook, as a plugin's own keys do; this module names none of
  them;
* the type hints of a constructor, for the nodes that list a constructor's keyword arguments
  (every component config; :class:`Arguments` for ``trainer.loss``, ``trainer.objective``): a
  registered plugin's ``steps: int`` makes ``sampler.steps=abc`` an error without the plugin
  doing anything (:func:`argument_problems`). Ranges of those stay with the constructor (its
  ``ValueError``).
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ldmkit.errors import ConfigError

_MISSING = object()


class Spec:
    """What a key accepts; :attr:`expected` completes "expected ..."."""

    expected: str = "a value"

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def problems(self, key: str, value: Any) -> list[str]:
        """``key=value: expected ...`` when ``value`` does not fit; none when it does."""
        return [] if self.accepts(value) else [problem(key, value, self.expected)]


def _bounds(low: float | None, high: float | None, above: bool, below: bool = False) -> str:
    def show(bound: float) -> str:  # integers in full: 18446744073709551615, not 1.84467e+19
        return str(bound) if isinstance(bound, int) else f"{bound:g}"

    parts = []
    if low is not None:
        parts.append(f"> {show(low)}" if above else f">= {show(low)}")
    if high is not None:
        parts.append(f"< {show(high)}" if below else f"<= {show(high)}")
    return " and ".join(parts)


class Integer(Spec):
    def __init__(
        self, low: int | None = None, high: int | None = None, *, null: bool = False
    ) -> None:
        self.low, self.high, self.null = low, high, null
        bounds = _bounds(low, high, False)
        self.expected = (
            "an integer" + (f" {bounds}" if bounds else "") + (" or null" if null else "")
        )

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.null
        if not isinstance(value, int) or isinstance(value, bool):
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


class Number(Spec):
    """A finite int or float; ``above``: strictly greater than ``low``; ``below``: strictly
    less than ``high``."""

    def __init__(
        self,
        low: float | None = None,
        high: float | None = None,
        *,
        above: bool = False,
        below: bool = False,
        null: bool = False,
    ) -> None:
        self.low, self.high, self.above, self.below, self.null = low, high, above, below, null
        bounds = _bounds(low, high, above, below)
        self.expected = "a number" + (f" {bounds}" if bounds else "") + (" or null" if null else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.null
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            return False
        if self.low is not None and (value <= self.low if self.above else value < self.low):
            return False
        return self.high is None or (value < self.high if self.below else value <= self.high)


class Boolean(Spec):
    def __init__(self, *, null: bool = False) -> None:
        self.null = null
        self.expected = "true or false" + (" or null" if null else "")

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool) or (value is None and self.null)


class Text(Spec):
    def __init__(self, *, null: bool = False) -> None:
        self.null = null
        self.expected = "a non-empty string" + (" or null" if null else "")

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, str) and value != "") or (value is None and self.null)


class Choice(Spec):
    def __init__(self, *options: Any) -> None:
        self.options = options
        self.expected = "one of " + ", ".join(_show(o) for o in options)

    def accepts(self, value: Any) -> bool:
        return any(value == o and type(value) is type(o) for o in self.options)


class Either(Spec):
    def __init__(self, *specs: Spec) -> None:
        self.specs = specs
        self.expected = " or ".join(s.expected for s in specs)

    def accepts(self, value: Any) -> bool:
        return any(s.accepts(value) for s in self.specs)


class Numbers(Spec):
    def __init__(self, item: Spec, length: int) -> None:
        self.item, self.length = item, length
        self.expected = (
            f"a list of {length} numbers, each {item.expected.removeprefix('a number ')}"
        )

    def accepts(self, value: Any) -> bool:
        return (
            isinstance(value, list | tuple)
            and len(value) == self.length
            and all(self.item.accepts(v) for v in value)
        )


class ListOf(Spec):
    """A non-empty list whose every item ``item`` accepts."""

    def __init__(self, item: Spec) -> None:
        self.item = item
        self.expected = f"a non-empty list, each {item.expected}"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, list | tuple) and len(value) > 0 and all(self.item.accepts(v) for v in value)


class Device(Spec):
    expected = "auto or a torch device (cpu, cuda, cuda:1, mps)"

    def accepts(self, value: Any) -> bool:
        if value == "auto":
            return True
        if not isinstance(value, str):
            return False
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            return False
        return True


class Table(Spec):
    expected = "a mapping (key: value)"

    def accepts(self, value: Any) -> bool:
        return value is None or isinstance(value, Mapping)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def show_value(value: Any) -> str:
    """A value as an override would write it: ``'abc'`` (a string), ``-5``, ``null``."""
    if value is None or isinstance(value, bool):
        return _show(value)
    return repr(value)


def problem(key: str, value: Any, expected: str) -> str:
    return f"{key}={show_value(value)}: expected {expected}"


class Arguments(Spec):
    """A node that holds the keyword arguments of ``factory`` (``trainer.loss`` those of
    ``AutoencoderLoss``): each value is checked against its argument's type hint
    (:func:`argument_problems`); a key of ``auto`` whose value is ``auto`` is filled in before
    the factory sees it and is not checked. A node that is not a mapping is the reader's to
    refuse."""

    expected = "a mapping of keyword arguments"

    def __init__(self, factory: Callable[..., Any], *, auto: Iterable[str] = ()) -> None:
        self.factory, self.auto = factory, tuple(auto)

    def accepts(self, value: Any) -> bool:
        return not self.problems("", value)

    def problems(self, key: str, value: Any) -> list[str]:
        if not isinstance(value, Mapping):
            return []
        values = {k: v for k, v in value.items() if not (k in self.auto and v == "auto")}
        return argument_problems(self.factory, values, key)


def typed_keys(node: str, keys: Mapping[str, Spec]) -> dict[str, Spec]:
    """``{"trainer.max_steps": spec, ...}`` for ``keys`` declared under ``node`` (``""``: the
    top level); a declaration that is not a mapping of key names to :class:`Spec` s raises
    ``TypeError`` saying which."""
    where = node or "the top level"
    if not isinstance(node, str):
        raise TypeError(f"config keys are declared under a node name (a string), got {node!r}")
    if not isinstance(keys, Mapping):
        raise TypeError(f"the keys of {where} must be a mapping of names to Specs, got {keys!r}")
    typed = {}
    for name, spec in keys.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"a config key under {where} must be a non-empty string, got {name!r}")
        key = f"{node}.{name}" if node else name
        if not isinstance(spec, Spec):
            raise TypeError(
                f"config key {key} is declared as {spec!r}, not an ldmkit.config_checks.Spec "
                "(Integer, Number, Boolean, Text, Choice, Either, ListOf, Arguments, ...)"
            )
        typed[key] = spec
    return typed


class Schema:
    """The typed keys of a composed config (``key -> Spec``), each declared by one owner.

    A key absent from a config is not checked (its reader's default applies); keys nobody
    declares are not checked either (component configs are checked against their
    constructors when built)."""

    def __init__(self) -> None:
        self._specs: dict[str, Spec] = {}
        self._owners: dict[str, str] = {}

    def declare(self, node: str, keys: Mapping[str, Spec], owner: str) -> None:
        """Add ``keys`` under ``node`` for ``owner`` (what messages call it); a key another
        owner declared already is a :class:`ConfigError` naming both."""
        for key, spec in typed_keys(node, keys).items():
            if key in self._owners:
                raise ConfigError(
                    f"config key {key} is declared twice: by {self._owners[key]} and by {owner}"
                )
            self._specs[key], self._owners[key] = spec, owner

    def keys(self) -> list[str]:
        return list(self._specs)

    def spec(self, key: str) -> Spec:
        return self._specs[key]

    def owner(self, key: str) -> str:
        return self._owners[key]

    def problems(self, cfg: Any) -> list[str]:
        """Every declared key of ``cfg`` (a composed DictConfig) whose value is of the wrong
        type or out of range, as one ``key=value: expected ...`` string each."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        problems, bad = [], set()
        for key, spec in self._specs.items():
            try:
                value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
                if OmegaConf.is_config(value):
                    value = OmegaConf.to_container(value, resolve=True)
            except OmegaConfBaseException as err:
                problems.append(f"{key}: cannot resolve its value: {err}".splitlines()[0])
                continue
            found = [] if value is _MISSING else spec.problems(key, value)
            if not found:
                continue
            bad.add(key)
            # data.image_size: ${image_size} is said once
            if _interpolated_from(cfg, key) not in bad:
                problems += found
        return problems


def _interpolated_from(cfg: Any, key: str) -> str | None:
    """``image_size`` for ``data.image_size: ${image_size}``; None when not a plain reference."""
    from omegaconf import OmegaConf

    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if node is None or not OmegaConf.is_interpolation(node, leaf):
        return None
    raw = node._get_node(leaf)._value()  # the `${...}` text, unresolved
    return (
        raw[2:-1] if isinstance(raw, str) and raw.startswith("${") and raw.endswith("}") else None
    )


# -- constructor type hints -----------------------------------------------------------------
def argument_problems(
    factory: Callable[..., Any], values: Mapping[str, Any], key: str
) -> list[str]:
    """``key.NAME=value: expected ...`` for each value that does not fit the type hint of
    ``factory``'s keyword argument NAME. Arguments without hints, unknown names (the
    constructor reports those) and hints this checker does not understand pass."""
    hints = _argument_hints(factory)
    problems = []
    for name, value in values.items():
        hint = hints.get(name, _MISSING)
        if hint is _MISSING:
            continue
        if _fits(value, hint) is False:
            problems.append(problem(f"{key}.{name}", value, describe(hint)))
    return problems


def _argument_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}
    target = factory.__init__ if inspect.isclass(factory) else factory
    namespace = getattr(inspect.unwrap(target), "__globals__", {})
    hints = {}
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        annotation = parameter.annotation
        if annotation is parameter.empty:
            continue
        if isinstance(annotation, str):  # postponed evaluation (from __future__ import annotations)
            try:
                annotation = eval(annotation, dict(namespace), {})  # noqa: S307 - the plugin's own hint
            except Exception:  # noqa: BLE001 - a hint we cannot evaluate is not checked
                continue
        hints[name] = annotation
    return hints


_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable, Sequence, Iterable)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping, Mapping)


def _fits(value: Any, hint: Any) -> bool | None:
    """True/False when ``value`` does or does not fit ``hint``; None when the hint is not
    one this checker knows (the constructor decides)."""
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        verdicts = [_fits(value, a) for a in args]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (Path, os.PathLike):
        return isinstance(value, str)
    if (origin or hint) in _SEQUENCES:
        if not isinstance(value, list | tuple):
            return False
        item = args[0] if args and (len(args) == 1 or args[-1] is Ellipsis) else None
        if item is None:
            return True
        verdicts = [_fits(v, item) for v in value]
        return False if any(v is False for v in verdicts) else True
    if (origin or hint) in _MAPPINGS:
        return isinstance(value, Mapping)
    return None


def describe(hint: Any) -> str:
    """``int | None`` -> "an integer or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is None or hint is type(None):
        return "null"
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        Path: "a path",
    }
    if hint in names:
        return names[hint]
    if (origin or hint) in _SEQUENCES:
        item = args[0] if args and (len(args) == 1 or args[-1] is Ellipsis) else None
        inner = describe(item) if item is not None else ""
        plural = {"an integer": "integers", "a number": "numbers", "a string": "strings"}.get(inner)
        return f"a list of {plural}" if plural else "a list"
    if (origin or hint) in _MAPPINGS:
        return "a mapping (key: value)"
    return getattr(hint, "__name__", str(hint))
