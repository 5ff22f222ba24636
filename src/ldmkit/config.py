"""Hydra composition: the primary config plus every plugin's config groups, and the
checked assembly of a :class:`~ldmkit.pipeline.Pipeline` through the registry."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ldmkit.errors import LdmkitError
from ldmkit.plugins import get_plugin_manager, root_directory
from ldmkit.registry import Registry

GROUPS = ("first_stage", "denoiser", "conditioner", "sampler", "data", "trainer", "experiment")
COMPONENT_GROUPS = ("first_stage", "denoiser", "conditioner", "sampler")
AUTO = "auto"


class ConfigError(LdmkitError, ValueError):
    """A config does not compose, names something unknown, or its parts do not fit."""


def config_dir() -> Path:
    """The primary config folder: packaged in the wheel, or ``conf/`` of a checkout."""
    packaged = Path(__file__).parent / "conf"
    if (packaged / "config.yaml").is_file():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    raise ConfigError(f"ldmkit's primary config is missing: looked for {packaged} and {checkout}")


# -- Hydra search path ----------------------------------------------------------------
_plugin_roots: list[str] = []
_search_path_plugin_registered = False


def _register_search_path_plugin() -> None:
    """Hydra discovers search-path plugins by scanning ``hydra_plugins``; ldmkit's plugins
    arrive through pluggy instead, so we register one search-path plugin by hand that
    appends whatever roots the plugin manager currently reports."""
    global _search_path_plugin_registered
    if _search_path_plugin_registered:
        return
    from hydra.core.config_search_path import ConfigSearchPath
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class LdmkitPluginsSearchPath(SearchPathPlugin):
        def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
            for root in _plugin_roots:
                search_path.append(provider="ldmkit-plugin", path=root)

    Plugins.instance().register(LdmkitPluginsSearchPath)
    _search_path_plugin_registered = True


def compose_config(overrides: Sequence[str] = (), *, config_name: str = "config") -> DictConfig:
    """Compose the primary config with Hydra command-line style ``overrides``.

    The options each group had selected are kept under ``choices`` (informational).
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _plugin_roots[:] = get_plugin_manager().config_roots()
    _register_search_path_plugin()
    overrides = [_weights_override(o) for o in overrides]
    try:
        cfg = _hydra_compose(overrides, config_name)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain_compose_error(err, overrides, config_name)) from err
    choices = {
        k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
        if not k.startswith("hydra/")
    }
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.choices = choices
    _check_optional_choice("experiment", choices.get("experiment"))
    check_config(cfg)
    return cfg


def _check_optional_choice(group: str, option: str | None) -> None:
    """``optional experiment`` in the defaults list makes Hydra skip an option that does not
    exist: a misspelled ``experiment=NAME`` would train the default config. Say so instead."""
    if option is None:
        return
    roots = [config_dir(), *(root_directory(r) for r in _plugin_roots)]
    if any(root is not None and (root / group / f"{option}.yaml").is_file() for root in roots):
        return
    found = sorted(
        {p.relative_to(root / group).with_suffix("").as_posix()
         for root in roots if root is not None and (root / group).is_dir()
         for p in (root / group).rglob("*.yaml")}
    )
    raise ConfigError(
        f"unknown option {group}={option} (no {group}/{option}.yaml in ldmkit's conf/ or an installed "
        f"plugin's config root); {group} options: {', '.join(found) or '(none)'}"
    )


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming every core key whose value has the wrong type or is out of
    range (see :mod:`ldmkit.config_checks`); ``compose_config`` and ``train`` call it."""
    from ldmkit.config_checks import config_problems

    problems = config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))


def _hydra_compose(overrides: Sequence[str], config_name: str) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


# Every component config may name weights to load (`checkpoint`), whether or not its option
# file lists the key: `first_stage.checkpoint=PATH` works as written for any option.
_WEIGHTS_OVERRIDE = re.compile(r"^(?P<group>first_stage|denoiser|conditioner)\.checkpoint=")


def _weights_override(override: str) -> str:
    return f"++{override}" if _WEIGHTS_OVERRIDE.match(override) else override


def _explain_compose_error(err: Exception, overrides: Sequence[str], config_name: str) -> str:
    """Hydra's (multi-line) message as one line naming the key or option."""
    message = str(err)
    unknown_key = re.match(r"Could not override '(?P<key>[^']+)'", message)
    if unknown_key:
        return _unknown_key(unknown_key["key"], overrides, config_name)
    missing = re.search(r"Could not (?:find|load) '(?P<group>[\w/.-]+)/(?P<option>[^'/]+)'", message)
    if missing:
        listed = re.search(r"Available options in '[^']+':\n(?P<options>(?:\t.*\n?)*)", message)
        options = ", ".join(o.strip() for o in listed["options"].splitlines() if o.strip()) if listed else ""
        group, option = missing["group"], missing["option"]
        return (
            f"unknown option {group}={option} (no {group}/{option}.yaml in ldmkit's conf/ or an installed "
            f"plugin's config root); {group} options: {options or '(none)'} "
            "(`ldmkit plugins` lists which plugin provides which config groups)"
        )
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _unknown_key(key: str, overrides: Sequence[str], config_name: str) -> str:
    """``trainer.optimizer.lr: no such key (did you mean trainer.lr?) ...``."""
    value = next((o.partition("=")[2] for o in overrides if o.partition("=")[0] == key), "VALUE")
    hint = f"to add a new key, write +{key}={value}"
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = _hydra_compose([o for o in overrides if o.partition("=")[0] != key], config_name)
    except (HydraException, OmegaConfBaseException):
        return f"{key}: no such key in the config; {hint}"
    keys = _leaf_keys(OmegaConf.to_container(cfg, resolve=False))
    keys = [k for k in keys if not k.startswith("hydra.")]
    leaf = key.rpartition(".")[2]
    group = key.partition(".")[0]
    close = [k for k in keys if k.partition(".")[0] == group and k.rpartition(".")[2] == leaf]
    close = close or difflib.get_close_matches(key, keys, n=2, cutoff=0.75)
    suggestion = f" (did you mean {' or '.join(close)}?)" if close else ""
    return f"{key}: no such key in the config{suggestion}; {hint}"


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, Mapping):
        keys = []
        for k, v in node.items():
            keys += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, Mapping) and v else [f"{prefix}{k}"]
        return keys
    return [prefix.rstrip(".")]


# -- building components ----------------------------------------------------------------


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


def create_component(
    registry: Registry, kind: str, node: Any, label: str | None = None, *, key: str | None = None
) -> Any:
    """Build the registered ``kind`` the config ``node`` names. ``label`` says which config it
    came from in messages (``sampler=ddim``); ``key`` is the node's dotted key (default: ``kind``),
    used to name a value that does not fit the constructor's type hints."""
    from ldmkit.config_checks import argument_problems
    from ldmkit.interfaces import INTERFACES

    name, kwargs = component_kwargs(node, kind)
    # every component config may name weights to load after construction, and every
    # conditioner config its classifier-free-guidance dropout rate
    checkpoint = kwargs.pop("checkpoint", None)
    drop_rate = kwargs.pop("drop_rate", None) if kind == "conditioner" else None
    try:
        factory = registry.get(kind, name).factory
    except LookupError as err:
        raise ConfigError(f"{label or kind}: {err}") from err
    problems = argument_problems(factory, kwargs, key or kind)
    if problems:
        raise ConfigError(f"{'; '.join(problems)} ({label or f'{kind} {name!r}'})")
    try:
        obj = registry.create(kind, name, **kwargs)
    except LookupError as err:
        raise ConfigError(f"{label or kind}: {err}") from err
    except TypeError as err:
        raise ConfigError(f"{label or kind}: {err}") from err
    except ValueError as err:  # a constructor rejecting an option's value
        raise ConfigError(f"{label or kind}: cannot build {kind} {name!r}: {err}") from err
    if not isinstance(obj, INTERFACES[kind]):
        entry = registry.get(kind, name)
        raise ConfigError(
            f"{kind} {name!r} from {entry.provider} built a {type(obj).__name__}, "
            f"which is not an ldmkit.interfaces.{INTERFACES[kind].__name__}"
        )
    if drop_rate is not None:
        if not isinstance(drop_rate, int | float) or not 0.0 <= drop_rate <= 1.0:
            raise ConfigError(f"{label or kind}: conditioner.drop_rate must be in [0, 1], got {drop_rate!r}")
        obj.drop_rate = float(drop_rate)
    if checkpoint is not None and not _on_meta_device(obj):
        from ldmkit.weights import WeightsError, load_component_weights

        try:
            load_component_weights(obj, checkpoint, kind)
        except WeightsError as err:
            raise ConfigError(f"{label or kind} ({kind}.checkpoint): {err}") from err
    return obj


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


def build_pipeline(cfg: DictConfig):
    """Build a :class:`Pipeline` from a composed config, through the registry only."""
    from ldmkit.diffusion.schedule import NoiseSchedule
    from ldmkit.pipeline import Pipeline

    registry = get_plugin_manager().registry
    backend = OmegaConf.select(cfg, "attention.backend", default=None)
    if backend is not None:
        from ldmkit.nn.attention import set_attention_backend

        set_attention_backend(backend)

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
    try:
        schedule = NoiseSchedule(**schedule_args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"schedule config: {err}") from err
    scale = cfg.get("scale_factor", 1.0)
    return Pipeline(
        first_stage=first_stage,
        denoiser=denoiser,
        conditioner=conditioner,
        sampler=sampler,
        schedule=schedule,
        # "scale_by_std" starts at 1 and is set from the first training batch
        scale_factor=float(scale) if isinstance(scale, int | float) else 1.0,
        image_size=cfg.get("image_size"),
        config=cfg,
    )


def compose(overrides: Sequence[str] = ()) -> Any:
    """Compose a config from ``overrides`` and build the :class:`Pipeline` it describes."""
    return build_pipeline(compose_config(overrides))
