"""Type and range checks of config values, so that a bad value is one line naming its key.

Two sources of truth, one message format (``trainer.max_steps='abc': expected an integer >= 1``):

* :data:`CORE_KEYS` — the keys the core itself reads (top level, ``schedule``, ``attention``,
  ``trainer``, ``data``, ``eval``), checked by :func:`config_problems` right after composition;
* the type hints of a constructor — for the nodes that list a constructor's keyword
  arguments (every component config, ``trainer.loss``, ``trainer.objective``): a registered
  plugin's ``steps: int`` makes ``sampler.steps=abc`` an error without the plugin doing anything
  (:func:`argument_problems`). Ranges of those stay with the constructor (its ``ValueError``).
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_MISSING = object()


class Spec:
    """What a key accepts; :attr:`expected` completes "expected ..."."""

    expected: str = "a value"

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError


def _bounds(low: float | None, high: float | None, above: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"> {low:g}" if above else f">= {low:g}")
    if high is not None:
        parts.append(f"<= {high:g}")
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
    """A finite int or float; ``above``: strictly greater than ``low``."""

    def __init__(
        self,
        low: float | None = None,
        high: float | None = None,
        *,
        above: bool = False,
        null: bool = False,
    ) -> None:
        self.low, self.high, self.above, self.null = low, high, above, null
        bounds = _bounds(low, high, above)
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
        return self.high is None or value <= self.high


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


EVERY = Integer(0, null=True)  # 0 or null: never
SWITCH = Boolean()
# ldmkit.compiling.check_compile: false, true or an inductor mode
_COMPILE = Either(Boolean(), Choice("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))

# The keys the core reads. A key absent from a config is not checked (the reader's default
# applies); keys of plugin-provided nodes are checked through constructor type hints instead.
CORE_KEYS: dict[str, Spec] = {
    "stage": Text(),
    "seed": Integer(),
    "image_size": Integer(1, null=True),
    "scale_factor": Either(Number(0, above=True), Choice("scale_by_std")),
    "run_dir": Text(),
    "schedule.timesteps": Integer(1),
    "schedule.linear_start": Number(0, above=True),
    "schedule.linear_end": Number(0, above=True),
    "schedule.cosine_s": Number(0),
    "attention.backend": Choice("auto", "sdpa", "xformers", "math", "chunked"),
    "precision": Choice("auto", "fp32", "bf16", "fp16"),
    "compile": _COMPILE,
    # both stages (ldmkit.training.engine.TRAINER_DEFAULTS)
    "trainer.max_steps": Integer(1),
    "trainer.max_minutes": Number(0, above=True, null=True),
    "trainer.batch_size": Integer(1),
    "trainer.num_workers": Integer(0),
    "trainer.lr": Number(0, above=True),
    "trainer.log_every": EVERY,
    "trainer.sample_every": EVERY,
    "trainer.checkpoint_every": EVERY,
    "trainer.val_every": EVERY,
    "trainer.keep_checkpoints": Integer(1),
    "trainer.embed_frozen": SWITCH,
    "trainer.val_batches": Integer(0),
    "trainer.val_split": Text(),
    "trainer.device": Device(),
    "trainer.resume": SWITCH,
    "trainer.progress": SWITCH,
    "trainer.tensorboard": SWITCH,
    "trainer.save_on_signal": SWITCH,
    "trainer.grad_clip": Number(0, above=True, null=True),
    "trainer.num_threads": Either(Integer(1, null=True), Choice("auto")),
    "trainer.precision": Choice("auto", "fp32", "bf16", "fp16"),
    "trainer.compile": _COMPILE,
    "trainer.compile_backend": Text(),
    # stage 1
    "trainer.disc_lr": Number(0, above=True, null=True),
    "trainer.betas": Numbers(Number(0, 1), 2),
    # stage 2
    "trainer.weight_decay": Number(0),
    "trainer.warmup_steps": Integer(0),
    "trainer.latent_cache": SWITCH,
    "trainer.sample_steps": Integer(1),
    "trainer.sample_count": Integer(1),
    "trainer.guidance_scale": Number(0),
    "trainer.ddp_find_unused_parameters": SWITCH,
    "trainer.ema.enabled": SWITCH,
    "trainer.ema.decay": Number(0, 1),
    "trainer.ema.warmup": SWITCH,
    "trainer.ema.use_for_sampling": SWITCH,
    # ldmkit.data (CONFIG_DEFAULTS)
    "data.source": Text(null=True),
    "data.path": Text(null=True),
    "data.image_size": Integer(1),
    "data.channels": Choice(1, 3),
    "data.crop": Choice("center", "random"),
    "data.flip": SWITCH,
    "data.shuffle_buffer": Integer(0),
    "data.resampled": Boolean(null=True),
    "data.prepare": Table(),
    # ldmkit evaluate
    "eval.checkpoint": Text(null=True),
    "eval.split": Text(),
    "eval.batch_size": Integer(1),
    "eval.max_images": Integer(1, null=True),
    "eval.lpips": Either(Boolean(), Choice("auto")),
    "eval.fid_features": Choice("auto", "inception", "fashion_mnist", "none"),
    "eval.feature_checkpoint": Text(null=True),
    "eval.output": Text(null=True),
    "eval.device": Device(),
    "eval.num_workers": Integer(0),
}

# nodes that hold a core constructor's keyword arguments: (key, constructor, keys whose
# value `auto` is filled in before the constructor sees it)
CORE_ARGUMENTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("trainer.loss", "ldmkit.losses:AutoencoderLoss", ("disc_in_channels", "reduction")),
    ("trainer.objective", "ldmkit.diffusion.objective:DiffusionObjective", ()),
)


def show_value(value: Any) -> str:
    """A value as an override would write it: ``'abc'`` (a string), ``-5``, ``null``."""
    if value is None or isinstance(value, bool):
        return _show(value)
    return repr(value)


def problem(key: str, value: Any, expected: str) -> str:
    return f"{key}={show_value(value)}: expected {expected}"


def config_problems(cfg: Any) -> list[str]:
    """Every core key of ``cfg`` (a composed DictConfig) whose value is of the wrong type or
    out of range, as one ``key=value: expected ...`` string each."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    problems, bad = [], set()
    for key, spec in CORE_KEYS.items():
        try:
            node = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
            value = (
                OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
            )
        except OmegaConfBaseException as err:
            problems.append(f"{key}: cannot resolve its value: {err}".splitlines()[0])
            continue
        if value is _MISSING or spec.accepts(value):
            continue
        bad.add(key)
        if _interpolated_from(cfg, key) not in bad:  # data.image_size: ${image_size} is said once
            problems.append(problem(key, value, spec.expected))
    for key, target, auto in CORE_ARGUMENTS:
        node = OmegaConf.select(cfg, key, default=None)
        if node is None or not OmegaConf.is_dict(node):
            continue
        module, _, name = target.partition(":")
        factory = getattr(importlib.import_module(module), name)
        values = OmegaConf.to_container(node, resolve=True)
        values = {k: v for k, v in values.items() if not (k in auto and v == "auto")}
        problems += argument_problems(factory, values, key)
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
