"""Data sources are plugins (issue 11, item 2): ``ldmkit_register_data_sources`` gives
``ldmkit data prepare`` / ``ldmkit data sources`` their sources, ldmkit's own included; a
pip-installed source is listed and prepared through the real CLI."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

import ldmkit
from ldmkit.data import (
    SOURCES,
    Source,
    SourceSample,
    build_dataset,
    create_source,
    prepare,
    read_manifest,
)
from ldmkit.data.cli import main
from ldmkit.plugins import PluginLoadWarning, get_registry
from ldmkit.registry import RegistryError
from tests.conftest import ldmkit_cli, make_distribution, pip_install_project

BUILTIN = "plugin 'ldmkit.data.sources' (ldmkit 0.1.0)"
FIRST_PARTY = ["cutouts", "emoji", "fashion_mnist", "image_folder", "semantic_scenes", "skimage_photos", "tuxpaint"]

CHECKERS_PLUGIN = '''
from PIL import Image

import ldmkit
from ldmkit.data import Source, SourceSample


class Checkers(Source):
    """Checkerboards with 1..4 squares per side; label = squares - 1."""

    name = "checkers"
    description = "checkerboards, label = squares per side - 1"
    options = {"count": 16, "size": 8}

    @property
    def splits(self):
        return ["train", "test"]

    @property
    def classes(self):
        return ["1x1", "2x2", "3x3", "4x4"]

    def items(self, split):
        offset = 0 if split == "train" else 1000
        return [offset + i for i in range(self.config["count"])]

    def load(self, item):
        squares, size = 1 + item % 4, self.config["size"]
        image = Image.new("L", (size, size))
        image.putdata([255 * ((x * squares // size + y * squares // size) % 2)
                       for y in range(size) for x in range(size)])
        return SourceSample(image=image, label=squares - 1)


@ldmkit.hookimpl
def ldmkit_register_data_sources(register):
    register(Checkers)
'''

PYPROJECT = """
[build-system]
requires = ["hatchling>=1.18"]
build-backend = "hatchling.build"

[project]
name = "ldmkit-checkers"
version = "0.3.0"
dependencies = ["ldmkit"]

[project.entry-points.ldmkit]
checkers = "ldmkit_checkers"

[tool.hatch.build.targets.wheel]
packages = ["src/ldmkit_checkers"]
"""



@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """ldmkit-checkers built and pip-installed (non-editable) into a target folder; the
    environment that puts it on the path."""
    project = tmp_path_factory.mktemp("checkers")
    package = project / "src" / "ldmkit_checkers"
    package.mkdir(parents=True)
    (project / "pyproject.toml").write_text(PYPROJECT)
    (package / "__init__.py").write_text(CHECKERS_PLUGIN)
    target = tmp_path_factory.mktemp("target")
    pip_install_project(project, target)
    assert (target / "ldmkit_checkers-0.3.0.dist-info" / "entry_points.txt").is_file()
    return {"PYTHONPATH": str(target)}


# -- an installed source through the CLI ------------------------------------------------------------
def test_ldmkit_data_sources_lists_the_installed_source(installed):
    out = ldmkit_cli("data", "sources", env=installed)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("checkers "))
    assert "checkerboards, label = squares per side - 1" in lines[at]
    assert lines[at + 1].split() == ["options:", "count=16,", "size=8"]
    assert lines[at + 2].split(maxsplit=1) == ["from:", "plugin 'checkers' (ldmkit-checkers 0.3.0)"]
    for name in FIRST_PARTY:  # ldmkit's own, listed the same way
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{name} "))
        assert lines[at + 2].split(maxsplit=1) == ["from:", BUILTIN]


def test_ldmkit_data_prepare_writes_the_installed_sources_shards(installed, tmp_path):
    out_dir = tmp_path / "checkers"
    out = ldmkit_cli("data", "prepare", "checkers", f"out={out_dir}", "count=10", "shard_size=4",
                     "progress=false", env=installed)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "split train: 10 samples in 3 shards" in out.stdout
    manifest = read_manifest(out_dir)
    assert manifest.source == "checkers" and manifest.classes == ["1x1", "2x2", "3x3", "4x4"]
    assert manifest.splits["test"].num_samples == 10 and manifest.image_size == [8, 8]
    assert sorted(p.name for p in out_dir.glob("train-*.tar")) == [
        f"train-00000{i}.tar" for i in range(3)
    ]
    dataset = build_dataset({"path": str(out_dir), "image_size": 8, "channels": 1})
    assert sorted(int(dataset[i]["label"]) for i in range(len(dataset))) == [
        0,
        0,
        0,
        1,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    assert ldmkit_cli("data", "verify", str(out_dir), env=installed).returncode == 0


def test_ldmkit_plugins_lists_the_installed_source(installed):
    out = ldmkit_cli("plugins", "--json", env=installed)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    row = next(r for r in rows if r["distribution"] == "ldmkit-checkers")
    assert row["version"] == "0.3.0" and row["registers"] == {"data_source": ["checkers"]}
    builtin = next(r for r in rows if r["name"] == "ldmkit.data.sources")
    assert builtin["distribution"] == "ldmkit" and builtin["registers"] == {
        "data_source": FIRST_PARTY
    }


def test_unknown_source_lists_the_sources_and_their_plugins(installed, tmp_path):
    out = ldmkit_cli("data", "prepare", "chekers", f"out={tmp_path}", env=installed)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        "ldmkit data prepare: unknown data source 'chekers'; registered data sources: "
        "checkers (from plugin 'checkers' (ldmkit-checkers 0.3.0)); "
        f"{', '.join(FIRST_PARTY)} (from {BUILTIN})"
    )
    without = ldmkit_cli("data", "prepare", "checkers", f"out={tmp_path}")
    assert without.returncode == 2 and "unknown data source 'checkers'" in without.stderr


# -- ldmkit's own sources come through the hook ---------------------------------------------------
def test_first_party_sources_are_registered_by_the_builtin_plugin(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LDMKIT_DISABLE_PLUGIN_AUTOLOAD", "1")  # the core's, whatever is installed
    registry = get_registry()
    assert registry.names("data_source") == FIRST_PARTY
    assert {registry.get("data_source", n).provider for n in FIRST_PARTY} == {BUILTIN}
    assert sorted(SOURCES) == FIRST_PARTY and SOURCES["image_folder"].name == "image_folder"


# -- in-process registration ------------------------------------------------------------------------
class Solid(Source):
    name = "solid"
    description = "one colour per label"
    options = {"count": 6}

    def items(self, split):
        return range(self.config["count"])

    def load(self, item):
        return SourceSample(
            image=Image.new("RGB", (4, 4), ("red", "green")[item % 2]), label=item % 2
        )


class SolidPlugin:
    @ldmkit.hookimpl
    def ldmkit_register_data_sources(self, register):
        register(Solid)


def test_a_registered_source_is_prepared_and_unregistered_after(
    ldmkit_plugin, fresh_plugins, tmp_path
):
    ldmkit_plugin(SolidPlugin(), name="solid")
    assert "solid" in SOURCES and isinstance(create_source("solid", count=2), Solid)
    manifest = prepare("solid", tmp_path / "solid", progress=False)
    assert manifest.splits["train"].num_samples == 6
    assert main(["prepare", "solid", f"out={tmp_path / 'cli'}", "count=3", "progress=false"]) == 0
    assert read_manifest(tmp_path / "cli").splits["train"].num_samples == 3


def test_a_source_is_gone_with_its_plugin(fresh_plugins):
    from ldmkit.testing import temporary_plugin

    with temporary_plugin(SolidPlugin(), name="solid"):
        assert SOURCES["solid"] is Solid
    assert "solid" not in SOURCES
    with pytest.raises(ValueError, match="unknown data source 'solid'; registered data sources: "):
        create_source("solid")


# -- bad registrations, clashes --------------------------------------------------------------------
SOURCE_MODULE = """
import ldmkit
from ldmkit.data.sources.image_folder import ImageFolder

class Mine(ImageFolder):
    name = {name!r}

@ldmkit.hookimpl
def ldmkit_register_data_sources(register):
    register({what})
"""


def _install_source(site: Path, dist: str, module: str, name: str, what: str = "Mine") -> None:
    sys.modules.pop(module, None)
    make_distribution(site, dist, "1.0", {module: module},
                      {module: textwrap.dedent(SOURCE_MODULE.format(name=name, what=what))})  # fmt: skip


def test_two_plugins_registering_one_source_name_both(site):
    _install_source(site, "ldmkit-one", "one_source", "shared")
    _install_source(site, "ldmkit-two", "two_source", "shared")
    with pytest.raises(RegistryError) as err:
        get_registry()
    message = str(err.value)
    assert message.startswith("data source 'shared' is registered twice: by plugin '")
    assert "(ldmkit-one 1.0)" in message and "(ldmkit-two 1.0)" in message


def test_a_source_clashing_with_a_first_party_one_names_both_in_the_cli(site):
    _install_source(site, "ldmkit-mine", "mine_source", "emoji")
    out = ldmkit_cli("data", "sources", env={"PYTHONPATH": str(site)})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(
        "ldmkit data sources: data source 'emoji' is registered twice: by "
    )
    assert BUILTIN in out.stderr and "plugin 'mine_source' (ldmkit-mine 1.0)" in out.stderr


def test_a_bad_source_registration_is_reported_like_a_broken_plugin(site):
    _install_source(site, "ldmkit-bad", "bad_source", "bad", what="'not a class'")
    with pytest.warns(
        PluginLoadWarning, match=r"ldmkit-bad 1.0.*ldmkit_register_data_sources.*Source subclass"
    ):
        registry = get_registry()
    assert registry.names("data_source") == FIRST_PARTY
