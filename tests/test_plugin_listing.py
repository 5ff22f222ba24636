"""`ldmkit plugins` tells the truth (issue 10, item 6): what is installed but not loaded, and
clashes between plugins (the same name, the same config option) named with both providers,
after the full listing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ldmkit.config import compose_config
from ldmkit.plugins import BUILTIN_PLUGINS, PluginError, get_plugin_manager, get_registry
from tests.conftest import ldmkit_cli, make_distribution

FIRST_PARTY = [
    "ldmkit-autoencoders",
    "ldmkit-conditioners",
    "ldmkit-samplers",
    "ldmkit-text",
    "ldmkit-unet",
]
# ldmkit's own plugins (training stages, their evaluators, data sources): always loaded, listed as distribution
# "ldmkit" beside the installed ones
BUILTIN_REGISTERS = {
    "ldmkit.training.stages": {"stage": ["autoencoder", "ldm"]},
    "ldmkit.evaluation.stages": {"evaluator": ["autoencoder", "ldm"]},
    "ldmkit.data.sources": {
        "data_source": [
            "cutouts",
            "emoji",
            "fashion_mnist",
            "image_folder",
            "semantic_scenes",
            "skimage_photos",
            "tuxpaint",
        ]
    },
}


def installed_rows(rows: list[dict]) -> dict[str, dict]:
    """The report's rows of installed distributions (not ldmkit's own), by distribution."""
    return {row["distribution"]: row for row in rows if row["distribution"] != "ldmkit"}


SAMPLER_PLUGIN = """
from pathlib import Path

import ldmkit
from ldmkit.interfaces import Sampler

class Noop(Sampler):
    def sample(self, denoise, schedule, noise, **kw):
        return noise

@ldmkit.hookimpl
def ldmkit_register_samplers(register):
    register("{name}", Noop)

@ldmkit.hookimpl
def ldmkit_register_configs(register):
    register(Path(__file__).parent / "{module}_conf")
"""


def install(
    site: Path, dist: str, module: str, *, registers: str, ships: dict[str, str] | None = None
) -> None:
    """A distribution ``dist`` whose plugin registers the sampler ``registers`` and ships the
    config options ``ships`` (``"sampler/ddim.yaml": text``)."""
    sys.modules.pop(module, None)  # another test's module of that name lives in another site
    make_distribution(
        site,
        dist,
        "1.0",
        {module: module},
        {module: SAMPLER_PLUGIN.format(name=registers, module=module)},
    )
    conf = site / f"{module}_conf"
    conf.mkdir()
    for option, text in (ships or {}).items():
        (conf / option).parent.mkdir(parents=True, exist_ok=True)
        (conf / option).write_text(text)


def ldmkit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return ldmkit_cli(*args, env=env, timeout=120)


# -- installed but not loaded ---------------------------------------------------------------------
def test_disabled_autoload_lists_the_installed_plugins_as_not_loaded(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LDMKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    manager = get_plugin_manager()
    report = manager.plugin_report()
    rows = installed_rows(report)
    assert sorted(rows) == FIRST_PARTY
    for row in rows.values():
        assert row["status"] == "not loaded" and row["registers"] == {}
        assert row["note"] == "plugin autoload is off (LDMKIT_DISABLE_PLUGIN_AUTOLOAD=1)"
    assert get_registry().names("sampler") == []  # still nothing loaded
    builtin = {row["name"]: row for row in report if row["distribution"] == "ldmkit"}
    assert {name: row["registers"] for name, row in builtin.items()} == BUILTIN_REGISTERS
    assert {row["status"] for row in builtin.values()} == {"loaded"}  # the core, not an install


def test_load_only_marks_the_others_not_loaded(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LDMKIT_LOAD_PLUGINS", "samplers")
    rows = {row["distribution"]: row for row in get_plugin_manager().plugin_report()}
    assert (
        rows["ldmkit-samplers"]["status"] == "loaded"
        and rows["ldmkit-samplers"]["registers"]["sampler"]
    )
    assert {d for d, row in rows.items() if row["status"] == "not loaded"} == set(FIRST_PARTY) - {
        "ldmkit-samplers"
    }
    assert (
        rows["ldmkit-unet"]["note"] == "only the plugins in LDMKIT_LOAD_PLUGINS=samplers are loaded"
    )


def test_cli_says_autoload_is_off_and_lists_what_is_installed():
    out = ldmkit("plugins", env={"LDMKIT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("plugin autoload is off (LDMKIT_DISABLE_PLUGIN_AUTOLOAD=1)")
    for dist in FIRST_PARTY:
        row = next(line for line in lines if f" {dist} " in line)
        assert "not loaded" in row
    assert "no ldmkit plugins installed" not in out.stdout
    rows = json.loads(
        ldmkit("plugins", "--json", env={"LDMKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}).stdout
    )
    assert sorted(installed_rows(rows)) == FIRST_PARTY
    assert {r["status"] for r in installed_rows(rows).values()} == {"not loaded"}
    assert {r["name"] for r in rows if r["distribution"] == "ldmkit"} == set(BUILTIN_PLUGINS)


# -- the same config option from two plugins ----------------------------------------------------
def test_a_config_option_shipped_twice_names_both_distributions(site):
    install(
        site,
        "ldmkit-mine",
        "mine_plugin",
        registers="mine_ddim",
        ships={"sampler/ddim.yaml": "name: mine_ddim\n"},
    )
    with pytest.raises(PluginError) as err:
        compose_config(["sampler=ddim"])
    message = str(err.value)
    assert message.startswith("config option sampler=ddim is shipped twice: by ")
    assert (
        "plugin 'mine_plugin' (ldmkit-mine 1.0)" in message
        and "plugin 'samplers' (ldmkit-samplers 0.1.0)" in message
    )
    assert str(site / "mine_plugin_conf" / "sampler" / "ddim.yaml") in message
    assert "\n" not in message


def test_two_third_party_plugins_shipping_one_option_clash_whatever_their_order(site):
    install(
        site,
        "ldmkit-zeta",
        "zeta_plugin",
        registers="zeta",
        ships={"sampler/fancy.yaml": "name: zeta\n"},
    )
    install(
        site,
        "ldmkit-alpha",
        "alpha_plugin",
        registers="alpha",
        ships={"sampler/fancy.yaml": "name: alpha\n"},
    )
    clashes = get_plugin_manager().config_option_clashes()
    assert len(clashes) == 1
    assert (
        "sampler=fancy" in clashes[0]
        and "ldmkit-zeta 1.0" in clashes[0]
        and "ldmkit-alpha 1.0" in clashes[0]
    )
    with pytest.raises(PluginError, match="sampler=fancy is shipped twice"):
        get_plugin_manager().config_roots()


def test_a_plugin_option_that_shadows_ldmkits_own_conf_is_named(site):
    install(
        site,
        "ldmkit-trainers",
        "trainers_plugin",
        registers="t",
        ships={"trainer/ldm.yaml": "max_steps: 1\n"},
    )
    with pytest.raises(
        PluginError,
        match=r"trainer=ldm is shipped twice: by ldmkit's conf/ .* and by plugin "
        r"'trainers_plugin' \(ldmkit-trainers 1.0\)",
    ):
        compose_config(["trainer=ldm"])


def test_distinct_options_in_one_group_do_not_clash(site):
    install(
        site,
        "ldmkit-mine",
        "mine_plugin",
        registers="mine_ddim",
        ships={"sampler/mine_ddim.yaml": "name: mine_ddim\n"},
    )
    assert get_plugin_manager().problems() == []
    assert compose_config(["sampler=mine_ddim"]).sampler.name == "mine_ddim"


# -- a clash does not hide what is installed ------------------------------------------------------
def test_report_lists_every_plugin_despite_a_name_clash(site):
    install(site, "ldmkit-mine", "mine_plugin", registers="ddim")
    manager = get_plugin_manager()
    rows = installed_rows(manager.plugin_report())
    assert sorted(rows) == sorted([*FIRST_PARTY, "ldmkit-mine"])
    assert rows["ldmkit-mine"]["registers"] == {"sampler": ["ddim"]}
    assert "ddim" in rows["ldmkit-samplers"]["registers"]["sampler"]  # both say what they register
    problems = manager.problems()
    assert len(problems) == 1 and "sampler 'ddim' is registered twice" in problems[0]
    assert "ldmkit-mine 1.0" in problems[0] and "ldmkit-samplers 0.1.0" in problems[0]


def test_cli_lists_everything_then_reports_the_clashes(site):
    install(
        site,
        "ldmkit-mine",
        "mine_plugin",
        registers="ddim",
        ships={"sampler/ddim.yaml": "name: ddim\n"},
    )
    env = {"PYTHONPATH": str(site)}
    out = ldmkit("plugins", env=env)
    assert out.returncode == 1
    for dist in [*FIRST_PARTY, "ldmkit-mine"]:
        assert dist in out.stdout
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("ldmkit plugins: error: ") for e in errors), (
        out.stderr
    )
    assert "sampler 'ddim' is registered twice" in errors[0] and "ldmkit-mine 1.0" in errors[0]
    assert (
        "config option sampler=ddim is shipped twice" in errors[1]
        and "ldmkit-samplers 0.1.0" in errors[1]
    )
    rows = json.loads(
        ldmkit("plugins", "--json", env=env).stdout
    )  # JSON on stdout, errors on stderr
    assert "ldmkit-mine" in {r["distribution"] for r in rows}


# -- training stages and data sources, per plugin -------------------------------------------------
STAGE_AND_SOURCE_PLUGIN = """
import ldmkit
from ldmkit.data.sources.image_folder import ImageFolder


class Dots(ImageFolder):
    name = "dots"


def train(cfg, *, data=None):
    return cfg.run_dir


@ldmkit.hookimpl
def ldmkit_register_stages(register):
    register("dots_stage", train)


@ldmkit.hookimpl
def ldmkit_register_data_sources(register):
    register(Dots)
"""


def test_stages_and_data_sources_are_listed_per_plugin(site):
    sys.modules.pop("dots_plugin", None)
    make_distribution(
        site,
        "ldmkit-dots",
        "0.3",
        {"dots": "dots_plugin"},
        {"dots_plugin": STAGE_AND_SOURCE_PLUGIN},
    )
    report = get_plugin_manager().plugin_report()
    assert installed_rows(report)["ldmkit-dots"]["registers"] == {
        "stage": ["dots_stage"],
        "data_source": ["dots"],
    }
    assert {
        r["name"]: r["registers"] for r in report if r["distribution"] == "ldmkit"
    } == BUILTIN_REGISTERS
    out = ldmkit("plugins", env={"PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    dots = next(line for line in lines if " ldmkit-dots " in line)
    assert dots.split()[:3] == ["dots", "ldmkit-dots", "0.3"]
    assert "stage: dots_stage; data_source: dots" in dots
    stages = next(line for line in lines if line.startswith("ldmkit.training.stages "))
    assert stages.split()[1:5] == ["ldmkit", "0.1.0", "stage:", "autoencoder,"]
    sources = next(line for line in lines if line.startswith("ldmkit.data.sources "))
    assert (
        "data_source: cutouts, emoji, fashion_mnist, image_folder, semantic_scenes, skimage_photos, tuxpaint"
        in sources
    )
