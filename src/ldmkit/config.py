"""Hydra composition: the primary config plus every plugin's config groups, checked and
explained in one-line errors. Building components from the composed config is
:mod:`ldmkit.assembly`'s job; this module imports neither it nor the pipeline.

Composed configs may read facts of the prepared dataset (``data.path``'s ``manifest.json``)
through the ``${manifest:KEY}`` resolver (:data:`MANIFEST_FACTS`); users add config folders of
their own (``--config-dir``, ``LDMKIT_CONFIG_PATH``) to the search path.

Configs read back from files (:func:`load_saved_config`: a pipeline's or a checkpoint's
``config.yaml``, a converted folder's configs) are used as written: ldmkit writes them
resolved, and an interpolation in one (``${oc.env:AWS_SECRET_ACCESS_KEY}``) would read this
machine's environment into labels and re-saved configs, so it is refused. Only configs Hydra
composes from the user's own ``conf/`` and command line may interpolate.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import Container, DictConfig, OmegaConf, open_dict

from ldmkit.config_checks import Choice, Either, Integer, Number, Schema, Spec, Text, show_value
from ldmkit.errors import ConfigError, LdmkitError
from ldmkit.plugins import (
    config_options,
    get_plugin_manager,
    misgrouped_entry_points,
    root_directory,
)
from ldmkit.registry import COMPONENT_KINDS
from ldmkit.resources import config_dir

GROUPS = ("first_stage", "denoiser", "conditioner", "sampler", "data", "trainer", "experiment")
COMPONENT_GROUPS = ("first_stage", "denoiser", "conditioner", "sampler")
AUTO = "auto"


CONFIG_PATH_ENV = "LDMKIT_CONFIG_PATH"


__all__ = ["AUTO", "COMPONENT_GROUPS", "CONFIG_PATH_ENV", "GROUPS", "MANIFEST_FACTS", "ConfigError",
           "check_config", "compose_config", "config_dir", "config_problems", "config_schema", "experiment_writing",
           "load_saved_config", "primary_keys", "refuse_interpolations", "user_config_dirs"]  # fmt: skip


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


def compose_config(
    overrides: Sequence[str] = (), *, config_name: str = "config", config_dirs: Sequence[str | os.PathLike] = ()
) -> DictConfig:
    """Compose the primary config with Hydra command-line style ``overrides``.

    ``config_dirs`` (the CLI's ``--config-dir``) and the folders in ``$LDMKIT_CONFIG_PATH`` join
    the search path after ldmkit's and the plugins' config roots (:func:`user_config_dirs`).
    The options each group had selected are kept under ``choices`` (informational).
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(overrides, (str, bytes)):  # iterating it would read each character as an override
        raise ConfigError(f"overrides are a list of KEY=VALUE strings, e.g. [{overrides!r}]; got one string")
    roots = get_plugin_manager().config_roots()
    users = user_config_dirs(config_dirs)
    _refuse_shadowed_options(users, roots)
    _plugin_roots[:] = [*roots, *(f"file://{d}" for d in users)]
    _register_search_path_plugin()
    overrides = [_ldmkit_key_override(o) for o in overrides]
    _refuse_unnamed_choices(overrides)
    try:
        cfg = _compose_with_stage_trainer(overrides, config_name)
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
    _resolve_dataset_facts(cfg)
    check_config(cfg)
    return cfg


def user_config_dirs(config_dirs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """``config_dirs``, then the folders in ``$LDMKIT_CONFIG_PATH`` (``os.pathsep``-separated),
    as absolute paths: config roots of the user's own (``experiment/mine.yaml``, group options).
    One that is not a directory is a ConfigError naming it."""
    found = []
    named = [(d, "config_dirs") for d in config_dirs]
    named += [(d, CONFIG_PATH_ENV) for d in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if d]
    for directory, where in named:
        path = Path(os.path.expanduser(directory)).absolute()
        if not path.is_dir():
            raise ConfigError(f"{where}: config directory {directory} does not exist")
        found.append(path)
    return found


def _refuse_shadowed_options(users: Sequence[Path], roots: Sequence[str]) -> None:
    """A user's config folder shipping an option ldmkit or a plugin ships too (or another user
    folder does) would be ignored or win by search-path order: refuse it, naming both files."""
    shipped = {option: config_dir() / option for option in config_options(config_dir())}
    for root in roots:
        directory = root_directory(root)
        for option in config_options(directory) if directory is not None else ():
            shipped.setdefault(option, directory / option)
    for directory in users:
        for option in config_options(directory):
            if option in shipped:
                group, _, name = option[: -len(".yaml")].partition("/")
                raise ConfigError(
                    f"config option {group}={name} of {directory / option} is also {shipped[option]}; "
                    f"rename yours (e.g. {group}/my_{Path(name).name}.yaml) and choose it by that name"
                )
            shipped[option] = directory / option


def experiment_writing(run_dir: str) -> str | None:
    """The experiment option whose ``run_dir`` is ``run_dir`` as written (searched in ldmkit's
    conf/ and the config roots of the last composition), None if none is: it names the
    command that trains a stage-1 run a stage-2 config reads."""
    wanted = os.path.normpath(run_dir)
    for root in _config_roots():
        for path in sorted((root / "experiment").glob("*.yaml")):
            try:
                written = OmegaConf.load(path).get("run_dir")
            except Exception:  # noqa: BLE001 - a broken option is reported when it is composed
                continue
            if isinstance(written, str) and "${" not in written and os.path.normpath(written) == wanted:
                return path.stem
    return None


# -- facts of the prepared dataset: ${manifest:KEY} -------------------------------------------
MANIFEST_FACTS = ("num_classes", "class_names", "num_segmentation_classes", "val_split", "channels")


def _manifest_fact(key: str, *, _root_: DictConfig) -> Any:
    """``${manifest:KEY}``: ``KEY`` of the ``manifest.json`` in ``data.path``
    (:meth:`ldmkit.data.Manifest.facts`)."""
    from ldmkit.data.loader import dataset_location
    from ldmkit.data.manifest import MANIFEST

    if key not in MANIFEST_FACTS:
        raise ConfigError(f"${{manifest:{key}}}: unknown dataset fact; one of {', '.join(MANIFEST_FACTS)}")
    data = _root_.get("data")
    path, source, manifest = (
        (data.get("path"), data.get("source"), data.get("manifest")) if isinstance(data, DictConfig) else (None,) * 3
    )
    location = dataset_location({"path": path, "source": source, "manifest": manifest})  # a folder, URL, pipe:...
    directory = location.folder
    if directory is not None and manifest is None and not (directory / MANIFEST).is_file():
        images = "path=YOUR_IMAGES " if source == "image_folder" else ""
        raise ConfigError(
            f"data.path={path}: {directory / MANIFEST} is missing (the config reads {key} from it); "
            f"prepare the folder first: ldmkit data prepare {source or '<source>'} {images}out={path}"
        )
    facts = location.read_manifest().facts()
    if key == "num_classes" and not facts[key]:
        raise ConfigError(
            f"data.path={path}: the dataset has no classes (class = first sub-folder of the images); "
            "sort the images into class folders and prepare again, or train without labels "
            "(experiment=folder_uncond or folder_text)"
        )
    if key == "num_segmentation_classes" and not facts[key]:
        raise ConfigError(
            f"data.path={path}: the dataset has no class maps (segmentation); prepare one that has "
            "them (ldmkit data prepare semantic_scenes) or set conditioner.num_classes"
        )
    return facts[key]


OmegaConf.register_new_resolver("manifest", _manifest_fact, replace=True)


def _resolve_dataset_facts(cfg: DictConfig) -> None:
    """Resolve ``cfg`` once so a dataset fact that cannot be read is one ConfigError now
    (OmegaConf wraps a resolver's error in its own, with the original in the chain)."""
    from omegaconf.errors import InterpolationResolutionError

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, LdmkitError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise ConfigError(str(cause)) from None


def _compose_with_stage_trainer(overrides: Sequence[str], config_name: str) -> DictConfig:
    """Compose; when neither the overrides nor an experiment chose a trainer, with the trainer
    config the stage registered (see :func:`_stage_trainer_override`)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = _hydra_compose(overrides, config_name)
    except (HydraException, OmegaConfBaseException):
        # `trainer.KEY=...` may name a key only the stage's trainer config has: find the
        # stage without those overrides, then compose them onto its trainer config
        probe = [o for o in overrides if not re.match(r"^[~+]*trainer\.", o)]
        extra = None
        if len(probe) < len(overrides):
            try:
                extra = _stage_trainer_override(_hydra_compose(probe, config_name), overrides)
            except (HydraException, OmegaConfBaseException):
                pass
        if extra is None:
            raise
        return _hydra_compose([*overrides, extra], config_name)
    extra = _stage_trainer_override(cfg, overrides)
    return cfg if extra is None else _hydra_compose([*overrides, extra], config_name)


def _stage_trainer_override(cfg: DictConfig, overrides: Sequence[str]) -> str | None:
    """``trainer=<option>`` for the trainer config the stage ``cfg.stage`` registers
    (``ldmkit_register_stages``), when neither the overrides nor an experiment chose a trainer
    (it is still the primary config's ``default``); None when nothing changes."""
    if OmegaConf.select(cfg, "hydra.runtime.choices.trainer") != "default":
        return None
    if any(re.match(r"^[~+]*trainer(=|$)", override) for override in overrides):
        return None
    stage = cfg.get("stage")
    if not isinstance(stage, str):
        return None
    try:
        wanted = get_plugin_manager().registry.stage(stage).trainer_config
    except LdmkitError:
        return None  # an unknown stage or a clash is reported where the stage is used
    return None if wanted == "default" else f"trainer={wanted}"


def _check_optional_choice(group: str, option: str | None) -> None:
    """``optional experiment`` in the defaults list makes Hydra skip an option that does not
    exist: a misspelled ``experiment=NAME`` would train the default config. Say so instead."""
    if option is None:
        return
    if any((root / group / f"{option}.yaml").is_file() for root in _config_roots()):
        return
    raise ConfigError(
        f"unknown option {group}={option} (no {group}/{option}.yaml in ldmkit's conf/, an installed "
        f"plugin's config root or a --config-dir); {group} options: {', '.join(_group_options(group)) or '(none)'}"
    )


def _group_options(group: str) -> list[str]:
    """The options of ``group`` in ldmkit's conf/ and the config roots of this composition."""
    return sorted(
        {p.relative_to(root / group).with_suffix("").as_posix()
         for root in _config_roots() if (root / group).is_dir()
         for p in (root / group).rglob("*.yaml")}
    )


def _config_roots() -> list[Path]:
    """ldmkit's conf/ and the config roots of the last composition that are folders here."""
    roots = [config_dir(), *(root_directory(r) for r in _plugin_roots)]
    return [root for root in roots if root is not None]


def _refuse_bare_word(word: str) -> None:
    """``fmnist_kl_f4`` for ``experiment=fmnist_kl_f4``: name the group with that option."""
    meant = [f"{group}={word}" for group in GROUPS if word in _group_options(group)]
    if meant:
        raise ConfigError(f"{word}: an override is KEY=VALUE (did you mean {' or '.join(meant)}?)")
    raise ConfigError(f"{word}: an override is KEY=VALUE, e.g. trainer.max_steps=100 or experiment=NAME")


def _refuse_unquoted(override: str) -> None:
    """``data.path=~/photos``, ``run_dir=runs/café``: characters Hydra's grammar takes only in
    a quoted value. Say how to quote it instead of Hydra's lexer message."""
    key, _, value = override.partition("=")
    if not re.fullmatch(r"[+~]*[\w.@/-]+", key) or not value or value[0] in "=[{\"'" or '"' in value:
        return
    shell = f"'{key}=\"{value}\"'" if "'" not in value else f'"{key}=\\"{value}\\""'
    raise ConfigError(
        f"{override}: Hydra cannot parse this override; quote the value: {shell} (values with ~, "
        "brackets, quotes, commas or letters beyond ASCII need quotes)"
    )


def _refuse_unnamed_choices(overrides: Sequence[str]) -> None:
    """``sampler=1``, ``experiment=2024``, ``trainer=null``: Hydra reads the value as a number,
    a switch or null and raises a bare ValueError; ``=3`` has no key. Say which override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for override in overrides:
        if "=" not in override and not override.startswith("~"):  # `~KEY` deletes; anything else sets
            _refuse_bare_word(override)
        try:
            (parsed,) = parser.parse_overrides([override])
        except HydraException:
            _refuse_unquoted(override)
            continue  # another syntax error: Hydra's message, when composing
        key, value = parsed.key_or_group, parsed.value()
        if key == "":
            raise ConfigError(f"{override}: an override is KEY=VALUE; the key is missing")
        if key in GROUPS and parsed.package is None and not isinstance(value, str | list):
            raise ConfigError(
                f"{override}: a config group takes the name of an option, not {show_value(value)}; "
                f"{key} options: {', '.join(_group_options(key))} (quote a name that reads as a number: "
                f"{key}='{override.partition('=')[2]}')"
            )


# -- typed keys ---------------------------------------------------------------------
PRIMARY = "ldmkit.config (conf/config.yaml)"  # the owner of the primary config's own keys


@functools.cache
def primary_keys() -> dict[str, Spec]:
    """What the primary config's own keys take (``conf/config.yaml``, its defaults); the
    choices come from the modules that read them. ``trainer``, ``data`` and ``eval`` are
    declared by their owners (:func:`config_schema`)."""
    from ldmkit.compiling import COMPILE_OPTION  # these read torch: imported when checking
    from ldmkit.diffusion.schedule import BETA_SCHEDULE_ALIASES
    from ldmkit.nn.attention import ATTENTION_BACKENDS
    from ldmkit.precision import PRECISIONS

    return {
        "stage": Text(),
        "seed": Integer(-(2**63), 2**64 - 1),  # what torch.manual_seed takes
        "image_size": Integer(1, null=True),
        "scale_factor": Either(Number(0, above=True), Choice("scale_by_std")),
        "run_dir": Text(),
        "schedule.kind": Choice(*BETA_SCHEDULE_ALIASES),
        "schedule.timesteps": Integer(1),
        # betas: 1 or more is no variance-preserving schedule (alpha_bar <= 0)
        "schedule.linear_start": Number(0, 1, above=True, below=True),
        "schedule.linear_end": Number(0, 1, above=True, below=True),
        "schedule.cosine_s": Number(0),
        "attention.backend": Choice(*ATTENTION_BACKENDS),
        "precision": Choice(*PRECISIONS),
        "compile": COMPILE_OPTION,
    }


def config_schema() -> Schema:
    """Every typed key: the primary config's (:func:`primary_keys`), then what the plugins
    declare through ``ldmkit_register_config_keys`` (ldmkit's own ``trainer``, ``eval`` and
    ``data`` keys first: :mod:`ldmkit.training.schema`, :mod:`ldmkit.evaluation.schema`,
    :mod:`ldmkit.data.schema`). A key declared twice is a ConfigError naming both owners."""
    schema = Schema()
    schema.declare("", primary_keys(), PRIMARY)
    for provider, keys in get_plugin_manager().config_keys():
        schema.declare("", keys, provider)
    return schema


def config_problems(cfg: DictConfig) -> list[str]:
    """``key=value: expected ...`` for every typed key of ``cfg`` whose value has the wrong
    type or is out of range (:func:`config_schema`)."""
    return config_schema().problems(cfg)


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming every typed key whose value has the wrong type or is out of
    range (:func:`config_problems`); ``compose_config`` and ``train`` call it."""
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


# Every component config may name weights to load (`checkpoint`), and every conditioner config
# its guidance dropout (`drop_rate`), whether or not its option file lists the key: ldmkit reads
# them, not the constructor, so `first_stage.checkpoint=PATH` works as written for any option.
_LDMKIT_KEY_OVERRIDE = re.compile(r"^(?:(?:first_stage|denoiser|conditioner)\.checkpoint|conditioner\.drop_rate)=")


def _ldmkit_key_override(override: str) -> str:
    return f"++{override}" if _LDMKIT_KEY_OVERRIDE.match(override) else override


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
        manager = get_plugin_manager()
        broken = "".join(
            f"; plugin {info.name!r} ({info.label}), which may ship it, failed to load: {info.error}"
            for info in manager.broken
        )
        note = manager.autoload_note()  # plugins left out on purpose may ship it
        broken += f"; {note}" if note else ""
        broken += "".join(f"; {line}" for line in misgrouped_entry_points())  # never loaded
        broken += _registered_without_option(group, option)
        return (
            f"unknown option {group}={option} (no {group}/{option}.yaml in ldmkit's conf/ or an installed "
            f"plugin's config root); {group} options: {options or '(none)'} "
            f"(`ldmkit plugins` lists which plugin provides which config groups){broken}"
        )
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _registered_without_option(group: str, option: str) -> str:
    """``; 'mine' is the registered name of a sampler from plugin ...``: a plugin registers the
    component but ships no option file naming it (or "")."""
    if group not in COMPONENT_KINDS:
        return ""
    try:
        provider = get_plugin_manager().registry.get(group, option).provider
    except (LookupError, LdmkitError):
        return ""
    return (
        f"; {option!r} is the registered name of a {group} from {provider}, but no config option "
        f"{group}/{option}.yaml ships with it (a plugin's config root holds one file per option, whose `name:` is "
        "the registered name: docs/plugins.md, section 3)"
    )


def _unknown_key(key: str, overrides: Sequence[str], config_name: str) -> str:
    """``trainer.optimizer.lr: no such key (did you mean trainer.lr?) ...``."""
    value = next((o.partition("=")[2] for o in overrides if o.partition("=")[0] == key), "VALUE")
    group = difflib.get_close_matches(key, GROUPS, n=1, cutoff=0.75) if "." not in key else []
    if group:  # `samplr=ddim`: a group's name misspelled
        return f"{key}: no such config group or key (did you mean {group[0]}={value}?)"
    hint = f"to add a new key, write +{key}={value}"
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = _hydra_compose([o for o in overrides if o.partition("=")[0] != key], config_name)
    except (HydraException, OmegaConfBaseException):
        return f"{key}: no such key in the config; {hint}"
    keys = _leaf_keys(OmegaConf.to_container(cfg, resolve=False))
    keys = [k for k in keys if not k.startswith("hydra.")]
    keys += [f"{g}.checkpoint" for g in ("first_stage", "denoiser", "conditioner") if f"{g}.checkpoint" not in keys]
    keys += ["conditioner.drop_rate"] if "conditioner.drop_rate" not in keys else []
    leaf = key.rpartition(".")[2]
    group = key.partition(".")[0]
    close = [k for k in keys if k.partition(".")[0] == group and k.rpartition(".")[2] == leaf]
    if not close:  # a sibling's name misspelled; the whole key only where its parent does not exist
        parent = key.rpartition(".")[0]
        siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
        close = (
            [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=2, cutoff=0.6)]
            if siblings
            else difflib.get_close_matches(key, keys, n=2, cutoff=0.75)
        )
    if close:  # a misspelling: the key added as `+KEY` would be read by nothing
        return f"{key}: no such key in the config (did you mean {' or '.join(close)}?)"
    return f"{key}: no such key in the config; {hint}"


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, Mapping):
        keys = []
        for k, v in node.items():
            keys += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, Mapping) and v else [f"{prefix}{k}"]
        return keys
    return [prefix.rstrip(".")]


# -- configs read back from files ------------------------------------------------------------
def yaml_problem(err: Exception) -> str:
    """Why a YAML file did not parse, in one line: PyYAML's problem and where it is (its own
    message spans several lines, quoting the file)."""
    if isinstance(err, UnicodeDecodeError):
        return "it is not UTF-8 text"
    mark = getattr(err, "problem_mark", None)
    at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or err}{at}"


def load_saved_config(path: str | os.PathLike) -> Any:
    """The config in the YAML file ``path`` (``OmegaConf.load``), refused with a
    :class:`ConfigError` naming the file and the key when a value is an interpolation."""
    cfg = OmegaConf.load(path)
    refuse_interpolations(cfg, path)
    return cfg


def refuse_interpolations(data: Any, where: str | os.PathLike) -> None:
    """Raise :class:`ConfigError` naming ``where`` and the key of the first value holding an
    interpolation (``${...}``); ``data`` is an OmegaConf node or plain data read from YAML or
    JSON (which becomes an interpolation once put in a config)."""
    if isinstance(data, Container):
        data = OmegaConf.to_container(data, resolve=False)  # interpolations as written
    found = _first_interpolation(data, "")
    if found is not None:
        key, value = found
        raise ConfigError(
            f"{where}: {key} holds the interpolation {value!r}; configs read from files are "
            "used as written, never resolved (an interpolation can read environment variables): "
            "write the value itself"
        )


def _first_interpolation(node: Any, key: str) -> tuple[str, str] | None:
    if isinstance(node, str):
        return (key, node) if "${" in node else None
    if isinstance(node, Mapping):
        children = ((f"{key}.{k}" if key else str(k), v) for k, v in node.items())
    elif isinstance(node, list):
        children = ((f"{key}[{i}]", v) for i, v in enumerate(node))
    else:
        return None
    for child_key, child in children:
        found = _first_interpolation(child, child_key)
        if found is not None:
            return found
    return None


# -- names that moved (deprecated aliases) --------------------------------------------------
# Building components from a config moved to ldmkit.assembly and building the Pipeline to
# ldmkit.pipeline, so that this module depends on neither (pipeline -> assembly -> config).
# Users' code written before still finds them here, with a DeprecationWarning that names the
# new import; nothing in ldmkit imports them from here (tests/test_import_graph.py).
_MOVED_TO_ASSEMBLY = ("component_kwargs", "create_component", "resolve_denoiser_dims", "check_parts_fit")
_MOVED_TO_PIPELINE = ("build_pipeline", "compose")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_ASSEMBLY:
        from ldmkit import assembly as owner
    elif name in _MOVED_TO_PIPELINE:
        from ldmkit import pipeline as owner
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"{__name__}.{name} is deprecated: use `from {owner.__name__} import {name}`",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(owner, name)
