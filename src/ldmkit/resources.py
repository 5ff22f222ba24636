"""Where ldmkit's own files are: the primary Hydra config folder (packaged in the wheel as
``ldmkit/conf``, or ``conf/`` at the root of a checkout). A foundation module: the plugin
manager, composition and the trainers' defaults all read it, and it imports nothing of
theirs."""

from __future__ import annotations

from pathlib import Path

from ldmkit.errors import ConfigError

__all__ = ["config_dir"]


def config_dir() -> Path:
    """The primary config folder: packaged in the wheel, or ``conf/`` of a checkout."""
    packaged = Path(__file__).parent / "conf"
    if (packaged / "config.yaml").is_file():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    raise ConfigError(f"ldmkit's primary config is missing: looked for {packaged} and {checkout}")
