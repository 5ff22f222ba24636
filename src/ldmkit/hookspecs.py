"""The hooks an ldmkit plugin can implement.

Each registration hook receives a ``register`` callback owned by the host: the
host does the naming, duplicate detection and bookkeeping of who provided what.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("ldmkit")
hookimpl = pluggy.HookimplMarker("ldmkit")


# -- components ----------------------------------------------------------------------


@hookspec
def ldmkit_register_first_stages(register):
    """Register FirstStage implementations (autoencoders).

    :param register: ``register(name, factory)``; ``factory(**config)`` returns a
        :class:`ldmkit.interfaces.FirstStage`. Usually the class itself.
    """


@hookspec
def ldmkit_register_denoisers(register):
    """Register Denoiser implementations (eps_theta networks).

    :param register: ``register(name, factory)``; ``factory(**config)`` returns a
        :class:`ldmkit.interfaces.Denoiser`.
    """


@hookspec
def ldmkit_register_conditioners(register):
    """Register Conditioner implementations (tau_theta).

    :param register: ``register(name, factory)``; ``factory(**config)`` returns a
        :class:`ldmkit.interfaces.Conditioner`.
    """


@hookspec
def ldmkit_register_samplers(register):
    """Register Sampler implementations (reverse-process algorithms).

    :param register: ``register(name, factory)``; ``factory(**config)`` returns a
        :class:`ldmkit.interfaces.Sampler`.
    """


# -- configuration -------------------------------------------------------------------


@hookspec
def ldmkit_register_configs(register):
    """Register Hydra config roots this plugin contributes.

    A root is a directory (or ``pkg://package.sub`` path) whose sub-folders are
    config groups, e.g. ``<root>/first_stage/my_ae.yaml`` adds the option
    ``first_stage=my_ae``.

    :param register: ``register(path)`` with a ``pathlib.Path``, a directory string
        or a ``pkg://`` path.
    """
