"""What every component remembers of how it was built, so that a pipeline made of components
can write the config that builds it again (``Pipeline.save`` of a pipeline built from objects).

Two records, on every instance of the four interfaces:

* ``built_from``: the config a component was built from through the registry
  (``{"name": "ddim", "steps": 50, ...}``), set by :func:`ldmkit.assembly.create_component`;
* ``init_arguments``: the keyword arguments its constructor was called with (positional ones
  by their names), recorded for every subclass by :class:`Component` — so that
  ``DDIMSampler(steps=20)`` built by hand is described by its registered name and ``steps=20``
  (:func:`ldmkit.assembly.component_config`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any


class Component:
    """The base of :class:`FirstStage`, :class:`Denoiser`, :class:`Conditioner` and
    :class:`Sampler`: each subclass's ``__init__`` records the arguments it was called with
    in ``init_arguments`` (only the call that built the object, not its ``super().__init__``
    calls); None when a ``*args`` parameter took values a config cannot name."""

    #: the config this component was built from through the registry (name and arguments)
    built_from: dict[str, Any] | None = None
    #: the arguments of the constructor call that built it
    init_arguments: dict[str, Any] | None = None
    #: the dotted key of the config it was built from (``conditioner``,
    #: ``conditioner.parts[0]``), set by :func:`ldmkit.assembly.create_component`
    config_key: str | None = None

    def pipeline_files(self, *, embed_frozen: bool) -> dict[str, Any]:
        """The config options naming files or folders this component read when it was built,
        for a saved pipeline folder to stand alone (:mod:`ldmkit.pipeline_files`):
        ``{option: value}``. A :class:`~pathlib.Path` is copied into the pipeline folder (a
        folder without its weight files) and the saved config names the copy; another value
        is written for the option as it is. ``embed_frozen``: the weights of the parts that
        ``frozen_references()`` declares go into ``model.safetensors`` (so their source's
        config and tokenizer files are to be copied, and the option that loads the source's
        weights turned off). Default: none."""
        return {}

    def declaration_problems(self) -> list[str]:
        """What this component leaves undeclared that ldmkit relies on, one phrase each (empty:
        nothing): the attributes its interface declares without a default (a first stage's
        ``latent_channels``, a denoiser's ``in_channels``, a sampler's ``steps``) that
        ``__init__`` did not set. Composition refuses a component with any, naming its plugin,
        and the conformance mixins fail it."""
        required = {
            name: klass.__name__
            for klass in reversed(type(self).__mro__)
            if klass.__module__.startswith("ldmkit.interfaces.")
            for name in inspect.get_annotations(klass)
            if name not in vars(klass)
        }
        return [
            f"{name} is not set (an ldmkit.interfaces.{interface} sets it in __init__)"
            for name, interface in required.items()
            if not hasattr(self, name)
        ]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if inspect.isfunction(init) and not hasattr(init, "_records_arguments"):
            cls.__init__ = _recording(init)


def _recording(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` that, when it is the constructor of the object's own class, stores the
    arguments it was called with (by parameter name) after it ran."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self).__init__ is not __init__:  # a super().__init__() call of a subclass
            return
        arguments: dict[str, Any] | None = {}
        for name, value in list(signature.bind(self, *args, **kwargs).arguments.items())[1:]:
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    arguments = None
                    break
            else:
                arguments[name] = value
        object.__setattr__(self, "init_arguments", arguments)  # past nn.Module.__setattr__

    __init__._records_arguments = True  # type: ignore[attr-defined]
    return __init__
