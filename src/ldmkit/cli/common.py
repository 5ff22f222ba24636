"""What every ``ldmkit`` subcommand shares: the one-line errors (:class:`CLIError`, argparse's in
one line), the overrides parser, config composition and ``--print-config``, optional modules."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path

from ldmkit.errors import LdmkitError


class CLIError(RuntimeError):
    """An error the CLI reports in one line (no traceback)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (``ldmkit sample: error: argument --seed: invalid
    int value: 'abc'``) instead of the usage text first; exit code 2 as argparse's."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _OverridesParser(_Parser):
    """Flags and Hydra overrides in any order (``ldmkit sample --labels 3 sampler.steps=20``):
    argparse alone takes the positionals in one run, and refused overrides after a flag."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        return self.parse_intermixed_args(args, namespace)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = _OverridesParser(prog=prog, description=description)
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. first_stage=kl_f8 trainer.max_steps=2000"
    )
    p.add_argument(
        "--config-dir", action="append", default=[], metavar="DIR", type=_config_dir,
        help="a folder of your own config options (experiment/NAME.yaml, group options), searched after "
             "ldmkit's and the plugins'; repeatable; also $LDMKIT_CONFIG_PATH (os.pathsep-separated)",
    )
    p.add_argument(
        "--print-config", action="store_true",
        help="print the composed config as it runs (interpolations and the denoiser dims written auto "
             "resolved, each marked with what it was: '# ${image_size}', '# auto') and exit",
    )
    return p


def _config_dir(value: str) -> str:
    if not Path(value).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {value}")
    return value


def _compose(overrides: Sequence[str], print_config: bool, config_dirs: Sequence[str] = ()):
    from ldmkit.training.init_from import compose_training_config

    try:
        cfg = compose_training_config(overrides, config_dirs=config_dirs)
    except LdmkitError as err:
        raise CLIError(str(err)) from err
    if print_config:
        print(_config_with_resolved_auto(cfg) if "denoiser" in cfg else _annotated_yaml(cfg, {}))
    return cfg


def _annotated_yaml(cfg, notes: dict[str, str]) -> str:
    """``cfg`` as YAML with every interpolation resolved, as a run's ``config.yaml`` holds it;
    each key whose value was an interpolation (``${data.channels}``) or is in ``notes`` (key
    path -> note) ends with that as a comment."""
    from omegaconf import DictConfig, OmegaConf

    notes = dict(notes)

    def collect(node: DictConfig, prefix: str) -> None:
        for key in node:
            path = f"{prefix}{key}"
            if OmegaConf.is_interpolation(node, key):
                notes.setdefault(path, str(node._get_node(key)._value()))
            elif isinstance(node.get(key), DictConfig):
                collect(node[key], f"{path}.")

    collect(cfg, "")
    lines, stack = [], []  # stack: (indent, key) of the mappings the line is inside
    for line in OmegaConf.to_yaml(cfg, resolve=True).splitlines():
        stripped = line.lstrip(" ")
        indent = len(line) - len(stripped)
        if stripped.startswith("- ") or ":" not in stripped:  # a list item: no key of its own
            lines.append(line)
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = stripped.split(":")[0]
        path = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        lines.append(f"{line}  # {notes[path]}" if path in notes and not stripped.endswith(":") else line)
    return "\n".join(lines) + "\n"


def _config_with_resolved_auto(cfg) -> str:
    """The config as YAML with the denoiser's ``auto`` dims replaced by the numbers composition
    fills in (what a saved checkpoint records), each marked ``# auto``. The first stage and
    conditioner are built only to read their dims: on the meta device (no memory, no
    weights) where they allow it, for real otherwise."""
    import torch
    from omegaconf import open_dict

    from ldmkit.assembly import create_component, resolve_denoiser_dims
    from ldmkit.config import AUTO
    from ldmkit.plugins import get_registry

    auto = [key for key, value in cfg.denoiser.items() if value == AUTO]
    if not auto:
        return _annotated_yaml(cfg, {})

    def build(kind: str):
        try:
            with torch.device("meta"):
                return create_component(get_registry(), kind, cfg[kind])
        except Exception:  # noqa: BLE001 - some loaders refuse meta tensors: build for real
            return create_component(get_registry(), kind, cfg[kind])

    try:
        first_stage, conditioner = build("first_stage"), build("conditioner")
        conditioner.bind_first_stage(first_stage)
        resolved = resolve_denoiser_dims(cfg, first_stage, conditioner)
    except LdmkitError as err:
        raise CLIError(str(err)) from err
    shown = cfg.copy()
    with open_dict(shown):
        for key in auto:
            shown.denoiser[key] = resolved[key]
    return _annotated_yaml(shown, {f"denoiser.{key}": AUTO for key in auto})


def _optional_module(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        raise CLIError(f"{what} is not available in this ldmkit version ({module} is missing)") from err
