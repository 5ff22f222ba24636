"""What the parts of the diffusers format share: the version written, the error, and the
checks of the values read from a diffusers ``config.json``."""

from __future__ import annotations

from typing import Any

from ldmkit.config_checks import Integer, Number, Spec, problem
from ldmkit.errors import ConfigError

DIFFUSERS_VERSION = "0.30.0"  # the format written (read by diffusers >= 0.30)


class ConversionError(ConfigError):
    """A model that the diffusers format cannot hold (or a diffusers model ldmkit cannot)."""


class ConversionWarning(UserWarning):
    """What an export writes nearly, not exactly (``ldmkit convert`` prints it as one line)."""


# what the numbers read from a diffusers config.json may be (a tampered 1e12 is no width)
WHOLE, POSITIVE = Integer(1), Number(0, above=True)
_REQUIRED = object()


def _value(c: dict[str, Any], key: str, spec: Spec, where: str, default: Any = _REQUIRED) -> Any:
    """``c[key]`` when ``spec`` accepts it, ``default`` when it is absent or null; a
    :class:`ConversionError` naming the file (``where``) and the key otherwise."""
    value = c.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConversionError(f"{where}: {key} is missing")
        return default
    if not spec.accepts(value):
        raise ConversionError(f"{where}: {problem(key, value, spec.expected)}")
    return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConversionError(message)
