"""Hydra composition: the primary config plus every plugin's config groups, and the
checked assembly of a :class:`~ldmkit.pipeline.Pipeline` through the registry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ldmkit.errors import LdmkitError
from ldmkit.plugins import get_plugin_manager
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
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _plugin_roots[:] = get_plugin_manager().config_roots()
    _register_search_path_plugin()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_explain_compose_error(err)) from err
    finally:
        GlobalHydra.instance().clear()
    choices = {
        k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
        if not k.startswith("hydra/")
    }
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.choices = choices
    return cfg


def _explain_compose_error(err: Exception) -> str:
    message = str(err)
    # Hydra's message for an unknown option already lists the group's options (plugin ones
    # included, since they are on the search path); add where options come from
    if "Could not find" in message or "Could not load" in message:
        message += (
            "\n(options come from ldmkit's conf/ and from installed plugins; "
            "`ldmkit plugins` lists which plugin provides which config groups)"
        )
    return message


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


def create_component(registry: Registry, kind: str, node: Any, label: str | None = None) -> Any:
    from ldmkit.interfaces import INTERFACES

    name, kwargs = component_kwargs(node, kind)
    # every component config may name weights to load after construction, and every
    # conditioner config its classifier-free-guidance dropout rate
    checkpoint = kwargs.pop("checkpoint", None)
    drop_rate = kwargs.pop("drop_rate", None) if kind == "conditioner" else None
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
