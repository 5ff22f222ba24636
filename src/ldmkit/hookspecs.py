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


@hookspec
def ldmkit_register_config_keys(register):
    """Declare what config keys take, so that composing a config with a bad value is one line
    naming the key (``trainer.max_steps='abc': expected an integer >= 1``) before anything
    runs. ldmkit's training, data and evaluation declare theirs (``trainer.*``, ``data.*``,
    ``eval.*``) through this hook too; component configs need none (their constructor's type
    hints are checked).

    :param register: ``register(node, keys)``: ``keys`` maps key names under ``node``
        (``"trainer"``; ``""`` for the top level; dotted names for nested keys) to
        :class:`ldmkit.config_checks.Spec` s: ``Integer(1)``, ``Number(0, above=True)``,
        ``Boolean()``, ``Choice(...)``, ``Either(...)``, ``Arguments(factory)`` for a node
        of a constructor's keyword arguments, ... A key declared by two owners names both.
    """


# -- what users run ------------------------------------------------------------------


@hookspec
def ldmkit_register_stages(register):
    """Register training stages: what ``ldmkit train stage=NAME`` runs and
    ``ldmkit evaluate stage=NAME`` scores (ldmkit's own ``autoencoder`` and ``ldm`` too).

    :param register: ``register(name, train, *, evaluate=None, trainer_config="default")``.
        ``train(cfg, *, data=None)`` trains in ``cfg.run_dir`` and returns the run folder
        (``data(split, epoch)``, when given, replaces the configured dataset);
        ``evaluate(cfg, **kwargs)`` returns a metrics dict (None: the stage has no evaluator);
        ``trainer_config`` is the ``trainer`` config option composition selects for this stage
        when neither the command line nor an experiment picks one (``default``: the primary
        config's own choice). ``register(name, evaluate=...)`` without ``train`` gives a
        stage registered elsewhere its evaluator (ldmkit's evaluation does this for
        ``autoencoder``); a stage has at most one.
    """


@hookspec
def ldmkit_register_data_sources(register):
    """Register dataset sources: what ``ldmkit data prepare NAME`` reads and
    ``ldmkit data sources`` lists.

    :param register: ``register(source)`` with a :class:`ldmkit.data.Source` subclass; it is
        registered under its ``name``.
    """
