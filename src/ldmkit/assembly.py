"""Assembly: the checked construction of a pipeline's components from a composed config,
through the registry only (no ``_target_`` is ever imported).

:meth:`ldmkit.pipeline.Pipeline.from_config` calls :func:`pipeline_parts`; this module knows the
config (:mod:`ldmkit.config`) and the plugins' registry, never the Pipeline class, so the
dependency runs one way: pipeline -> assembly -> config.
"""

from __future__ import annotations

import copy
import inspect
import os
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from ldmkit.config import AUTO, ConfigError, experiment_writing
from ldmkit.config_checks import argument_problems
from ldmkit.devices import build_within_memory, check_fits
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.errors import LdmkitError, WeightsError
from ldmkit.interfaces import CONDITION_ROLES, INTERFACES, Conditioner
from ldmkit.nn.attention import set_attention_backend
from ldmkit.plugins import PluginError, get_plugin_manager
from ldmkit.registry import COMPONENT_KINDS, Registry
from ldmkit.weights import load_component_weights


def _choice(cfg: DictConfig, group: str) -> str:
    choices = cfg.get("choices") or {}
    chosen = choices.get(group) if isinstance(choices, Mapping | DictConfig) else None
    return f"{group}={chosen}" if chosen else f"the {group} config"


def component_kwargs(node: Any, group: str) -> tuple[str, dict[str, Any]]:
    """Split a component config into its registered name and constructor kwargs."""
    if node is None:
        raise ConfigError(f"no {group} configured; choose one with `{group}=<option>`")
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if "name" not in data:
        raise ConfigError(
            f"the {group} config has no `name` key naming a registered {group}: {data}"
        )
    name = data.pop("name")
    return name, data


def _shipped_by(label: str | None, kind: str, name: str) -> str:
    """Why the option ``label`` (``sampler=mine``) names an unregistered ``name``, when a
    plugin ships it: that plugin failed to load, or registers no such name; else that only
    some plugins are loaded (LDMKIT_LOAD_PLUGINS, autoload off), or ""."""
    group, _, option = (label or "").partition("=")
    manager = get_plugin_manager()
    info = manager.option_shipper(group, option) if option else None
    if info is None:  # a plugin left out by LDMKIT_LOAD_PLUGINS / autoload off may register it
        note = manager.autoload_note()
        return f" ({note})" if note else ""
    why = f"failed to load: {info.error}" if info.error else f"registers no {kind} {name!r}"
    return f"; option {label} comes from plugin {info.name!r} ({info.label}), which {why}"


def create_component(
    registry: Registry, kind: str, node: Any, label: str | None = None, *, key: str | None = None
) -> Any:
    """Build the registered ``kind`` the config ``node`` names. ``label`` says which config it
    came from in messages (``sampler=ddim``); ``key`` is the node's dotted key (default: ``kind``),
    used to name a value that does not fit the constructor's type hints."""
    name, kwargs = component_kwargs(node, kind)
    # every component config may name weights to load after construction, and every
    # conditioner config its classifier-free-guidance dropout rate
    checkpoint = kwargs.pop("checkpoint", None)
    drop_rate = kwargs.pop("drop_rate", None) if kind == "conditioner" else None
    try:
        factory = registry.get(kind, name).factory
    except LookupError as err:
        raise ConfigError(f"{label or kind}: {err}{_shipped_by(label, kind, name)}") from err
    problems = argument_problems(factory, kwargs, key or kind)
    if problems:
        raise ConfigError(f"{'; '.join(problems)} ({label or f'{kind} {name!r}'})")
    try:  # refused before the allocation that would pass the free memory, naming the config
        obj = build_within_memory(lambda: registry.create(kind, name, **kwargs), label or f"{kind} {name!r}")
    except LookupError as err:
        raise ConfigError(f"{label or kind}: {err}") from err
    except TypeError as err:
        raise ConfigError(f"{label or kind}: {err}") from err
    except ValueError as err:  # a constructor rejecting an option's value
        raise ConfigError(f"{label or kind}: cannot build {kind} {name!r}: {err}") from err
    except LdmkitError:
        raise
    except Exception as err:  # noqa: BLE001 - a bug in the plugin's constructor: name it in one line
        raise ConfigError(
            f"{label or kind}: {kind} {name!r} from {registry.get(kind, name).provider} failed to build: "
            f"{type(err).__name__}: {err}{_raised_at(err, factory)}"
        ) from err
    if not isinstance(obj, INTERFACES[kind]):
        entry = registry.get(kind, name)
        raise ConfigError(
            f"{kind} {name!r} from {entry.provider} built an instance of {type(obj).__name__}, "
            f"which is not an ldmkit.interfaces.{INTERFACES[kind].__name__}"
        )
    problems = obj.declaration_problems()
    if problems:
        raise ConfigError(
            f"{label or kind}: {kind} {name!r} from {registry.get(kind, name).provider}: {'; '.join(problems)}"
        )
    obj.config_key = key or kind  # where its options live (ldmkit.pipeline_files)
    if drop_rate is not None:
        if not isinstance(drop_rate, int | float) or not 0.0 <= drop_rate <= 1.0:
            raise ConfigError(f"{label or kind}: conditioner.drop_rate must be in [0, 1], got {drop_rate!r}")
        obj.drop_rate = float(drop_rate)
    if checkpoint is not None and not _on_meta_device(obj):
        try:
            load_component_weights(obj, checkpoint, kind)
        except WeightsError as err:
            raise ConfigError(f"{label or kind} ({kind}.checkpoint): {err}") from err
    obj.built_from = {"name": name, **component_kwargs(node, kind)[1]}  # what builds it again
    return obj


def _raised_at(err: BaseException, factory: Any) -> str:
    """`` (mine.py:12)``: the last line of the factory's own file that ``err`` passed through
    (its constructor, or a helper beside it), or "" when it passed through none."""
    try:
        source = inspect.getsourcefile(factory)
    except TypeError:
        return ""
    lines = [frame.lineno for frame in traceback.extract_tb(err.__traceback__) if frame.filename == source]
    return f" ({os.path.basename(source)}:{lines[-1]})" if lines else ""


def component_origin(kind: str, component: Any) -> str:
    """``sampler 'mine' from plugin 'x' (ldmkit-x 1.0)``: the registered name a component was
    built under and the plugin and distribution that registered it, for messages about what
    it did (its class's name when no plugin registered it)."""
    registry = get_plugin_manager().registry
    name = (component.built_from or {}).get("name") or registry.name_of(kind, type(component))
    try:
        return f"{kind} {name!r} from {registry.get(kind, name).provider}"
    except LookupError:
        return f"{kind} {type(component).__name__}"


def returned_tensor(kind: str, component: Any, method: str, value: Any, shape: Sequence[int] | None = None) -> Tensor:
    """``value``, when a component returned a tensor (of ``shape``, if given); else a
    :class:`PluginError` naming the component's plugin and what it returned."""
    if isinstance(value, Tensor) and (shape is None or value.shape == shape):
        return value
    got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
    wanted = "a tensor" if shape is None else f"a tensor of shape {tuple(shape)}"
    raise PluginError(f"{component_origin(kind, component)}: {method} returned {got}, not {wanted}")


def checked_condition(conditioner: Conditioner, method: str, cond: Any) -> Mapping[str, Tensor]:
    """``cond``, when it is what a conditioner returns: a mapping of roles to tensors, the
    roles and dims it declares; else a :class:`PluginError` naming the conditioner's plugin and
    what it returned."""
    if isinstance(cond, Mapping) and all(
        role in CONDITION_ROLES and isinstance(value, Tensor) for role, value in cond.items()
    ):
        problems = conditioner.condition_problems(cond)
        if problems:
            raise PluginError(f"{component_origin('conditioner', conditioner)}: {method}: {'; '.join(problems)}")
        return cond
    got = type(cond).__name__
    if isinstance(cond, Mapping):
        got = "{" + ", ".join(f"{role!r}: {type(value).__name__}" for role, value in cond.items()) + "}"
    raise PluginError(
        f"{component_origin('conditioner', conditioner)}: {method} returned {got}, not a mapping "
        f"of roles {CONDITION_ROLES} to tensors"
    )


def component_config(kind: str, component: Any) -> dict[str, Any]:
    """The config that builds ``component`` again: the one it was built from through the
    registry (:func:`create_component` records it), else its registered name and the
    arguments its constructor was called with (``init_arguments``, recorded by
    :class:`ldmkit.interfaces.Component`), with a conditioner's ``drop_rate``. A
    :class:`ConfigError` says why a component cannot be described: its class is not
    registered, or an argument is not a config value (a tensor, a module)."""
    if component.built_from is not None:
        return copy.deepcopy(dict(component.built_from))
    what = f"the {kind} {type(component).__name__}"
    registry = get_plugin_manager().registry
    name = registry.name_of(kind, type(component))
    if name is None:
        raise ConfigError(
            f"{what} is not a registered {kind} class ({registry.listing(kind)}), so no config can "
            f"name it: register it with ldmkit_register_{kind}s, or build it with ldmkit.assembly.create_component"
        )
    if component.init_arguments is None:
        raise ConfigError(f"{what} was built with positional *args, which a config cannot name")
    node = {"name": name, **component.init_arguments}
    if kind == "conditioner":
        node["drop_rate"] = float(component.drop_rate)
    try:
        OmegaConf.create(node)
    except Exception as err:  # noqa: BLE001 - omegaconf's errors for unsupported values vary
        raise ConfigError(f"{what} ({kind}={name}) was built with an argument a config cannot hold: {err}") from None
    return node


def pipeline_config(parts: Mapping[str, Any]) -> DictConfig:
    """The config of a pipeline built from objects (``parts``: the keyword arguments of
    :class:`~ldmkit.pipeline.Pipeline`): each component's :func:`component_config`, the
    schedule's arguments, ``scale_factor`` and ``image_size`` — what :func:`pipeline_parts`
    builds the same pipeline from."""
    schedule = parts.get("schedule")
    scale = parts.get("scale_factor", 1.0)
    return OmegaConf.create({
        **{kind: component_config(kind, parts[kind]) for kind in COMPONENT_KINDS},
        "schedule": schedule.config() if schedule is not None else NoiseSchedule().config(),
        "scale_factor": float(scale),
        "image_size": parts.get("image_size"),
    })  # fmt: skip


def _on_meta_device(obj: Any) -> bool:
    params = next(iter(obj.parameters()), None) if hasattr(obj, "parameters") else None
    return params is not None and params.is_meta


def resolve_denoiser_dims(cfg: DictConfig, first_stage: Any, conditioner: Any) -> dict[str, Any]:
    """Fill ``auto`` dims of the denoiser config and check explicit ones.

    Raises ConfigError naming the two configs that disagree.
    """
    name, kwargs = component_kwargs(cfg.denoiser, "denoiser")
    checkpoint = kwargs.pop("checkpoint", None)
    concat = conditioner.concat_channels or 0
    expected = {
        "in_channels": (first_stage.latent_channels + concat,
                        f"{_choice(cfg, 'first_stage')} (latent_channels={first_stage.latent_channels})"
                        + (f" + {_choice(cfg, 'conditioner')} (concat_channels={concat})" if concat else "")),
        "out_channels": (first_stage.latent_channels,
                         f"{_choice(cfg, 'first_stage')} (latent_channels={first_stage.latent_channels})"),
        "context_dim": (conditioner.crossattn_dim,
                        f"{_choice(cfg, 'conditioner')} (crossattn_dim={conditioner.crossattn_dim})"),
        "vector_dim": (conditioner.vector_dim,
                       f"{_choice(cfg, 'conditioner')} (vector_dim={conditioner.vector_dim})"),
    }
    for key, (value, source) in expected.items():
        if key not in kwargs:
            continue
        if kwargs[key] == AUTO:
            kwargs[key] = value
        elif kwargs[key] != value:
            raise ConfigError(
                f"{source} and {_choice(cfg, 'denoiser')} ({key}={kwargs[key]}) disagree: "
                f"denoiser.{key} must be {value}; set denoiser.{key}=auto to follow the other part"
            )
    return {"name": name, **kwargs, **({"checkpoint": checkpoint} if checkpoint is not None else {})}


def check_parts_fit(cfg: DictConfig, first_stage: Any, denoiser: Any, conditioner: Any) -> None:
    """Check the built parts against each other (catches plugins that ignore their config)."""
    concat = conditioner.concat_channels or 0
    pairs = [
        ("in_channels", denoiser.in_channels, first_stage.latent_channels + concat, "first_stage"),
        ("out_channels", denoiser.out_channels, first_stage.latent_channels, "first_stage"),
        ("context_dim", denoiser.context_dim, conditioner.crossattn_dim, "conditioner"),
        ("vector_dim", denoiser.vector_dim, conditioner.vector_dim, "conditioner"),
    ]
    for attr, have, want, other in pairs:
        if have != want:
            raise ConfigError(
                f"{_choice(cfg, other)} and {_choice(cfg, 'denoiser')} disagree: the denoiser's "
                f"{attr} is {have} but must be {want}"
            )


def _check_stage_one_run(cfg: DictConfig) -> None:
    """A ``first_stage.checkpoint`` that is missing but is the ``run_dir`` of an experiment (a
    stage-2 preset reading its stage-1 run): say which command trains it."""
    checkpoint = OmegaConf.select(cfg, "first_stage.checkpoint", default=None)
    if not isinstance(checkpoint, str) or os.path.exists(os.path.expanduser(checkpoint)):
        return
    experiment = experiment_writing(checkpoint)
    if experiment is None:
        return  # the weights loader names the missing path
    data_path = OmegaConf.select(cfg, "data.path", default=None)
    command = f"ldmkit train experiment={experiment}" + (f" data.path={data_path}" if data_path else "")
    raise ConfigError(
        f"first_stage.checkpoint={checkpoint} does not exist: it is the stage-1 run of "
        f"experiment={experiment}; train that first: {command}"
    )


def pipeline_parts(cfg: DictConfig) -> dict[str, Any]:
    """The keyword arguments of :class:`~ldmkit.pipeline.Pipeline` that the composed config
    ``cfg`` describes: every component built through the registry and checked against the
    others. The denoiser's ``auto`` dims are written back into ``cfg`` (a checkpoint records
    the resolved numbers)."""
    registry = get_plugin_manager().registry
    backend = OmegaConf.select(cfg, "attention.backend", default=None)
    if backend is not None:
        set_attention_backend(backend)

    _check_stage_one_run(cfg)
    first_stage = create_component(registry, "first_stage", cfg.first_stage, _choice(cfg, "first_stage"))
    conditioner = create_component(registry, "conditioner", cfg.conditioner, _choice(cfg, "conditioner"))
    conditioner.bind_first_stage(first_stage)
    denoiser_node = resolve_denoiser_dims(cfg, first_stage, conditioner)
    with open_dict(cfg):
        cfg.denoiser = denoiser_node  # the resolved numbers are what a checkpoint records
    denoiser = create_component(registry, "denoiser", denoiser_node, _choice(cfg, "denoiser"))
    check_parts_fit(cfg, first_stage, denoiser, conditioner)
    sampler = create_component(registry, "sampler", cfg.sampler, _choice(cfg, "sampler"))
    schedule_args = OmegaConf.to_container(cfg.schedule, resolve=True) if cfg.get("schedule") else {}
    timesteps = schedule_args.get("timesteps", 1000)
    if isinstance(timesteps, int):  # its float64 tables, before they are made
        check_fits(32 * timesteps, "cpu", f"schedule.timesteps={timesteps}", "; lower schedule.timesteps")
    try:
        schedule = NoiseSchedule(**schedule_args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"schedule config: {err}") from err
    scale = cfg.get("scale_factor", 1.0)
    return {
        "first_stage": first_stage,
        "denoiser": denoiser,
        "conditioner": conditioner,
        "sampler": sampler,
        "schedule": schedule,
        # "scale_by_std" starts at 1 and is set from the first training batch
        "scale_factor": float(scale) if isinstance(scale, int | float) else 1.0,
        "image_size": cfg.get("image_size"),
        "config": cfg,
    }
