"""Training stages are plugins (issue 11, item 1): ``ldmkit_register_stages`` gives
``ldmkit train stage=NAME`` / ``ldmkit evaluate stage=NAME`` their stages, ldmkit's own
``autoencoder`` and ``ldm`` included; a pip-installed stage runs through the real CLI."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

import ldmkit
from ldmkit.config import ConfigError, compose_config
from ldmkit.plugins import PluginLoadWarning, get_registry
from ldmkit.registry import RegistryError
from tests.conftest import ldmkit_cli, make_distribution, pip_install_project

BUILTIN = "plugin 'ldmkit.training.stages' (ldmkit 0.1.0)"
BUILTIN_EVALUATORS = "plugin 'ldmkit.evaluation.stages' (ldmkit 0.1.0)"

# A third-party stage whose trainer writes what it was given (the plumbing, not training:
# docs/plugins.md trains a real decoder-only stage), with an evaluator and its own trainer config.
ECHO_PLUGIN = """
import json
from pathlib import Path

from omegaconf import OmegaConf

import ldmkit
from ldmkit.config_checks import Text


def train(cfg, *, data=None):
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "trained.json").write_text(json.dumps({
        "stage": cfg.stage,
        "trainer_choice": cfg.choices.trainer,
        "trainer": OmegaConf.to_container(cfg.trainer, resolve=True),
    }))
    return run


def evaluate(cfg, **kwargs):
    return {"stage": cfg.stage, "greeting": cfg.trainer.get("greeting")}


@ldmkit.hookimpl
def ldmkit_register_stages(register):
    register("echo", train, evaluate=evaluate, trainer_config="echo")


@ldmkit.hookimpl
def ldmkit_register_configs(register):
    register(Path(__file__).parent / "conf")


@ldmkit.hookimpl
def ldmkit_register_config_keys(register):
    register("trainer", {"greeting": Text()})
"""

PYPROJECT = """
[build-system]
requires = ["hatchling>=1.18"]
build-backend = "hatchling.build"

[project]
name = "ldmkit-echo-stage"
version = "0.2.0"
dependencies = ["ldmkit"]

[project.entry-points.ldmkit]
echo_stage = "ldmkit_echo_stage.plugin"

[tool.hatch.build.targets.wheel]
packages = ["src/ldmkit_echo_stage"]
"""



@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """ldmkit-echo-stage built and pip-installed (non-editable) into a target folder; the
    environment that puts it on the path."""
    project = tmp_path_factory.mktemp("echo_stage")
    package = project / "src" / "ldmkit_echo_stage"
    (package / "conf" / "trainer").mkdir(parents=True)
    (project / "pyproject.toml").write_text(PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text(ECHO_PLUGIN)
    (package / "conf" / "trainer" / "echo.yaml").write_text("greeting: hello\nmax_steps: 3\n")
    target = tmp_path_factory.mktemp("target")
    pip_install_project(project, target)
    assert (target / "ldmkit_echo_stage" / "conf" / "trainer" / "echo.yaml").is_file()
    assert (target / "ldmkit_echo_stage-0.2.0.dist-info" / "entry_points.txt").is_file()
    # ahead of the caller's PYTHONPATH (a checkout's src/ on it stays the ldmkit under test)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}


# -- an installed stage through the CLI --------------------------------------------------------
def test_installed_stage_trains_through_the_cli(installed, tmp_path):
    run = tmp_path / "echo_run"
    out = ldmkit_cli("train", "stage=echo", f"run_dir={run}", env=installed)
    assert out.returncode == 0, out.stderr
    assert f"run directory: {run}" in out.stdout
    trained = json.loads((run / "trained.json").read_text())
    # no trainer= given: the stage's own trainer config (shipped by the plugin) is used
    assert trained["stage"] == "echo" and trained["trainer_choice"] == "echo"
    assert trained["trainer"]["greeting"] == "hello" and trained["trainer"]["max_steps"] == 3


def test_a_trainer_chosen_on_the_command_line_wins(installed, tmp_path):
    out = ldmkit_cli("train", "stage=echo", "trainer=default", f"run_dir={tmp_path}", env=installed)
    assert out.returncode == 0, out.stderr
    trained = json.loads((tmp_path / "trained.json").read_text())
    assert trained["trainer_choice"] == "default" and "greeting" not in trained["trainer"]


def test_overrides_apply_to_the_stages_trainer_config(installed, tmp_path):
    # trainer.greeting exists only in the stage's trainer config, not in the primary default
    out = ldmkit_cli("train", "stage=echo", "trainer.greeting=bye", f"run_dir={tmp_path}",
                     env=installed)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "trained.json").read_text())["trainer"]["greeting"] == "bye"


def test_a_bad_value_of_the_stages_own_key_is_one_line(installed, tmp_path):
    """The plugin declares what ``trainer.greeting`` takes; ldmkit checks it like its own keys."""
    out = ldmkit_cli("train", "stage=echo", "trainer.greeting=42", f"run_dir={tmp_path / 'run'}",
                     env=installed)  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        "ldmkit train: error: trainer.greeting=42: expected a non-empty string"
    )
    assert not (tmp_path / "run").exists()


def test_installed_stage_evaluates_through_the_cli(installed):
    out = ldmkit_cli("evaluate", "stage=echo", env=installed)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"stage": "echo", "greeting": "hello"}


def test_installed_stage_is_listed_by_ldmkit_plugins(installed):
    out = ldmkit_cli("plugins", "--json", env=installed)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    row = next(r for r in rows if r["distribution"] == "ldmkit-echo-stage")
    assert row["version"] == "0.2.0" and row["error"] is None
    assert row["registers"] == {"stage": ["echo"]} and row["config_groups"] == {"trainer": ["echo"]}
    builtin = next(r for r in rows if r["name"] == "ldmkit.training.stages")
    assert builtin["distribution"] == "ldmkit" and builtin["registers"] == {
        "stage": ["autoencoder", "ldm"]
    }
    evaluators = next(r for r in rows if r["name"] == "ldmkit.evaluation.stages")
    assert evaluators["registers"] == {"evaluator": ["autoencoder", "ldm"]}
    table = ldmkit_cli("plugins", env=installed).stdout
    assert "stage: echo" in next(line for line in table.splitlines() if "ldmkit-echo-stage" in line)


def test_unknown_stage_lists_the_stages_and_their_plugins(installed):
    out = ldmkit_cli("train", "stage=ehco", env=installed)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        f"ldmkit train: error: unknown stage 'ehco'; registered stages: autoencoder, ldm (from {BUILTIN}); "
        "echo (from plugin 'echo_stage' (ldmkit-echo-stage 0.2.0))"
    )


def test_the_stage_is_gone_without_the_install():
    out = ldmkit_cli("train", "stage=echo")
    assert (
        out.returncode == 1
        and "unknown stage 'echo'; registered stages: autoencoder, ldm" in out.stderr
    )


# -- ldmkit's own stages come through the hook ---------------------------------------------------
def test_first_party_stages_are_registered_by_the_builtin_plugin(fresh_plugins):
    registry = get_registry()
    assert registry.names("stage") == ["autoencoder", "ldm"]
    assert {registry.get("stage", n).provider for n in ("autoencoder", "ldm")} == {BUILTIN}
    autoencoder, ldm = registry.stage("autoencoder"), registry.stage("ldm")
    assert autoencoder.evaluate.__name__ == "evaluate_autoencoder" and ldm.evaluate.__name__ == "evaluate_ldm"
    assert autoencoder.trainer_config == ldm.trainer_config == "default"  # what both always used


def test_evaluation_registers_its_evaluator_with_the_stage(fresh_plugins):
    """Training does not name its evaluators: ldmkit's evaluation gives the autoencoder stage
    its evaluator through the same hook (``register(NAME, evaluate=...)``)."""
    registry = get_registry()
    evaluator = registry.get("evaluator", "autoencoder")
    assert evaluator.provider == BUILTIN_EVALUATORS
    assert registry.stage("autoencoder").evaluate is evaluator.factory.evaluate
    assert registry.get("stage", "autoencoder").provider == BUILTIN  # the stage stays training's


def test_a_plugin_gives_a_stage_registered_elsewhere_its_evaluator(ldmkit_plugin, fresh_plugins, tmp_path):
    from ldmkit.evaluation import evaluate

    calls = []

    def score(cfg, **kwargs):
        calls.append((cfg.stage, kwargs))
        return {"fid": 1.5}

    class Plugin:
        @ldmkit.hookimpl
        def ldmkit_register_stages(self, register):
            register("mine", evaluate=score)

    ldmkit_plugin(_stage_plugin(tmp_path, []), name="mine")
    ldmkit_plugin(Plugin(), name="mine_fid")
    assert evaluate(compose_config(["stage=mine"]), write=False) == {"fid": 1.5}
    assert calls == [("mine", {"write": False})]
    assert get_registry().get("stage", "mine").provider == "plugin 'mine' (mine)"


def test_a_second_evaluator_for_a_stage_names_both(ldmkit_plugin, fresh_plugins):
    class Plugin:
        @ldmkit.hookimpl
        def ldmkit_register_stages(self, register):
            register("autoencoder", evaluate=lambda cfg, **kwargs: {})

    ldmkit_plugin(Plugin(), name="other_eval")
    with pytest.raises(RegistryError) as err:
        get_registry()
    assert str(err.value) == (
        f"evaluator of stage 'autoencoder' is registered twice: by {BUILTIN_EVALUATORS} and "
        f"by plugin 'other_eval' (other_eval)"
    )


def test_first_party_stages_load_with_autoload_off(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LDMKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert get_registry().names("stage") == ["autoencoder", "ldm"]
    assert get_registry().names("sampler") == []  # installed plugins stay unloaded


def test_first_party_stages_keep_the_primary_trainer_config(fresh_plugins):
    for stage in ("autoencoder", "ldm"):
        assert compose_config([f"stage={stage}"]).choices.trainer == "default"


def test_stage_without_an_evaluator_says_which_have_one(ldmkit_plugin, fresh_plugins, tmp_path):
    from ldmkit.evaluation import evaluate

    ldmkit_plugin(_stage_plugin(tmp_path, []), name="mine")
    with pytest.raises(ConfigError) as err:
        evaluate(compose_config(["stage=mine"]))
    assert str(err.value) == "stage 'mine' (from plugin 'mine' (mine)) has no evaluator; stages with one: autoencoder, ldm"


# -- in-process registration (the ldmkit_plugin fixture) -----------------------------------------
def _stage_plugin(tmp_path: Path, calls: list, *, trainer_config: str = "mine"):
    conf = tmp_path / "conf" / "trainer"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "mine.yaml").write_text("defaults:\n  - default\n  - _self_\nmax_steps: 7\n")

    def train(cfg, *, data=None):
        calls.append((cfg.stage, cfg.trainer.max_steps, data))
        return Path(cfg.run_dir)

    class Plugin:
        @ldmkit.hookimpl
        def ldmkit_register_stages(self, register):
            register("mine", train, trainer_config=trainer_config)

        @ldmkit.hookimpl
        def ldmkit_register_configs(self, register):
            register(tmp_path / "conf")

    return Plugin()


def test_train_calls_the_registered_trainer_with_the_data(ldmkit_plugin, fresh_plugins, tmp_path):
    from ldmkit.training import train

    calls: list = []
    ldmkit_plugin(_stage_plugin(tmp_path, calls), name="mine")
    cfg = compose_config(["stage=mine", f"run_dir={tmp_path / 'run'}"])
    assert cfg.choices.trainer == "mine"

    def data(split, epoch):
        return []

    assert train(cfg, data=data) == tmp_path / "run"
    assert calls == [("mine", 7, data)]


def test_an_experiments_trainer_wins_over_the_stages(ldmkit_plugin, fresh_plugins, tmp_path):
    ldmkit_plugin(_stage_plugin(tmp_path, []), name="mine")
    cfg = compose_config(["experiment=fmnist_kl_f4", "stage=mine"])
    assert cfg.stage == "mine" and cfg.choices.trainer == "autoencoder"  # the experiment's


def test_unknown_stage_in_python_is_a_config_error(fresh_plugins):
    from ldmkit.training import train

    with pytest.raises(ConfigError) as err:
        train(compose_config(["stage=gan"]))
    assert (
        str(err.value)
        == f"unknown stage 'gan'; registered stages: autoencoder, ldm (from {BUILTIN})"
    )


# -- bad registrations, clashes --------------------------------------------------------------------
STAGE_SOURCE = """
import ldmkit

def train(cfg, *, data=None):
    return cfg.run_dir

@ldmkit.hookimpl
def ldmkit_register_stages(register):
    register({name!r}, {train})
"""


def _install_stage(site: Path, dist: str, module: str, name: str, train: str = "train") -> None:
    sys.modules.pop(module, None)
    make_distribution(site, dist, "1.0", {module: module},
                      {module: textwrap.dedent(STAGE_SOURCE.format(name=name, train=train))})  # fmt: skip


def test_two_plugins_registering_one_stage_name_both(site):
    _install_stage(site, "ldmkit-one", "one_stage", "shared")
    _install_stage(site, "ldmkit-two", "two_stage", "shared")
    with pytest.raises(RegistryError) as err:
        get_registry()
    message = str(err.value)
    assert message.startswith("stage 'shared' is registered twice: by plugin '")
    assert (
        "plugin 'one_stage' (ldmkit-one 1.0)" in message
        and "plugin 'two_stage' (ldmkit-two 1.0)" in message
    )


def test_a_stage_clashing_with_a_first_party_one_names_both(site):
    _install_stage(site, "ldmkit-mine", "mine_stage", "ldm")
    with pytest.raises(RegistryError, match=r"stage 'ldm' is registered twice") as err:
        get_registry()
    assert BUILTIN in str(err.value) and "plugin 'mine_stage' (ldmkit-mine 1.0)" in str(err.value)


def test_the_cli_reports_a_stage_clash_in_one_line(site):
    _install_stage(site, "ldmkit-mine", "mine_stage", "autoencoder")
    out = ldmkit_cli("train", "stage=autoencoder", env={"PYTHONPATH": str(site)})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert (
        "stage 'autoencoder' is registered twice" in out.stderr and "ldmkit-mine 1.0" in out.stderr
    )
    listing = ldmkit_cli("plugins", env={"PYTHONPATH": str(site)})
    assert listing.returncode == 1 and "stage 'autoencoder' is registered twice" in listing.stderr


def test_a_bad_stage_registration_is_reported_like_a_broken_plugin(site):
    _install_stage(site, "ldmkit-bad", "bad_stage", "bad", train="'not callable'")
    with pytest.warns(
        PluginLoadWarning, match=r"ldmkit-bad 1.0.*ldmkit_register_stages.*train must be callable"
    ):
        registry = get_registry()
    assert registry.names("stage") == ["autoencoder", "ldm"]
