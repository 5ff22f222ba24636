"""Plugin discovery through real entry points of installed distributions."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings

import pytest

import ldmkit
from ldmkit.errors import ConfigError
from ldmkit.plugins import (
    PluginError,
    PluginLoadWarning,
    get_plugin_manager,
    get_registry,
    reset_plugin_manager,
)
from ldmkit.registry import RegistryError
from tests.conftest import make_distribution

GOOD = """
import ldmkit
from ldmkit.interfaces import Sampler

class Noop(Sampler):
    def sample(self, denoise, schedule, noise, **kw):
        return noise

@ldmkit.hookimpl
def ldmkit_register_samplers(register):
    register("{name}", Noop)
"""


def test_first_party_plugins_are_discovered(fresh_plugins):
    registry = get_registry()
    assert {"ddim", "ddpm"} <= set(registry.names("sampler"))
    assert {"none", "class_label"} <= set(registry.names("conditioner"))
    entry = registry.get("sampler", "ddim")
    assert "ldmkit-samplers" in entry.provider


def test_third_party_distribution_registers(site):
    make_distribution(site, "ldmkit-noop", "1.2.3", {"noop": "noop_plugin"},
                      {"noop_plugin": GOOD.format(name="noop")})
    registry = get_registry()
    assert registry.get("sampler", "noop").provider == "plugin 'noop' (ldmkit-noop 1.2.3)"
    assert "ddim" in registry.names("sampler")  # first-party plugins load beside it


def test_plugin_whose_import_raises_is_reported_and_others_load(site):
    make_distribution(site, "ldmkit-broken", "0.9", {"broken": "broken_plugin"},
                      {"broken_plugin": "raise RuntimeError('boom in import')\n"})
    make_distribution(site, "ldmkit-noop", "1.0", {"noop": "noop_plugin"},
                      {"noop_plugin": GOOD.format(name="noop")})
    with pytest.warns(PluginLoadWarning) as caught:
        registry = get_registry()
    message = str(caught[0].message)
    assert "ldmkit-broken 0.9" in message and "RuntimeError: boom in import" in message
    assert "noop" in registry.names("sampler") and "ddim" in registry.names("sampler")
    report = {row["name"]: row for row in get_plugin_manager().plugin_report()}
    assert report["broken"]["error"] == "RuntimeError: boom in import"
    assert report["broken"]["distribution"] == "ldmkit-broken"


def test_strict_mode_makes_a_broken_plugin_fatal(site, monkeypatch):
    make_distribution(site, "ldmkit-broken", "0.9", {"broken": "broken_plugin"},
                      {"broken_plugin": "raise RuntimeError('boom')\n"})
    monkeypatch.setenv("LDMKIT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"'broken' from distribution ldmkit-broken 0.9.*boom"):
        get_registry()


def test_entry_point_to_missing_module_is_reported(site):
    make_distribution(site, "ldmkit-ghost", "2.0", {"ghost": "no_such_module_xyz"}, {})
    with pytest.warns(PluginLoadWarning, match=r"ldmkit-ghost 2.0.*No module named 'no_such_module_xyz'"):
        get_registry()


def test_same_name_from_two_plugins_names_both(site):
    make_distribution(site, "ldmkit-one", "1.0", {"one": "one_plugin"},
                      {"one_plugin": GOOD.format(name="shared")})
    make_distribution(site, "ldmkit-two", "2.0", {"two": "two_plugin"},
                      {"two_plugin": GOOD.format(name="shared")})
    with pytest.raises(RegistryError) as err:
        get_registry()
    assert "sampler 'shared' is registered twice" in str(err.value)
    assert "ldmkit-one 1.0" in str(err.value) and "ldmkit-two 2.0" in str(err.value)


def test_clash_with_a_first_party_name_names_both(site):
    make_distribution(site, "ldmkit-mine", "1.0", {"mine": "mine_plugin"},
                      {"mine_plugin": GOOD.format(name="ddim")})
    with pytest.raises(RegistryError, match=r"ldmkit-samplers.*ldmkit-mine|ldmkit-mine.*ldmkit-samplers"):
        get_registry()


def test_misspelled_hook_is_rejected_with_a_suggestion(site):
    source = """
    import ldmkit

    @ldmkit.hookimpl
    def ldmkit_register_sampler(register):
        register("x", object)
    """
    make_distribution(site, "ldmkit-typo", "1.0", {"typo": "typo_plugin"}, {"typo_plugin": source})
    with pytest.warns(PluginLoadWarning) as caught:
        registry = get_registry()
    message = str(caught[0].message)
    assert "unknown hook(s) 'ldmkit_register_sampler'" in message
    assert "did you mean 'ldmkit_register_samplers'" in message
    assert "x" not in registry.names("sampler")


def test_misspelled_hook_registered_directly_raises(fresh_plugins):
    class Typo:
        @ldmkit.hookimpl
        def ldmkit_register_denoiser(self, register):
            pass

    with pytest.raises(PluginError, match="ldmkit_register_denoiser.*did you mean 'ldmkit_register_denoisers'"):
        get_plugin_manager().register(Typo(), name="typo")
    assert get_plugin_manager().pm.get_plugin("typo") is None


def test_failing_registration_hook_is_reported_like_a_broken_import(site):
    source = """
    import ldmkit

    @ldmkit.hookimpl
    def ldmkit_register_samplers(register):
        raise ImportError("optional dependency missing")
    """
    make_distribution(site, "ldmkit-half", "1.0", {"half": "half_plugin"}, {"half_plugin": source})
    with pytest.warns(PluginLoadWarning, match=r"ldmkit-half 1.0.*ldmkit_register_samplers.*optional dependency"):
        registry = get_registry()
    assert "ddim" in registry.names("sampler")


def test_disable_autoload_loads_nothing(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LDMKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert get_registry().names("sampler") == []


def test_load_only_selected_plugins(site, monkeypatch):
    make_distribution(site, "ldmkit-broken", "0.9", {"broken": "broken_plugin"},
                      {"broken_plugin": "raise RuntimeError('never imported')\n"})
    monkeypatch.setenv("LDMKIT_LOAD_PLUGINS", "samplers")
    registry = get_registry()
    assert registry.names("sampler") == ["ddim", "ddpm", "dpm_2", "dpm_2_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s_ancestral", "dpmpp_3m_sde", "euler", "euler_ancestral", "heun", "lms", "plms", "unipc"]
    assert registry.names("conditioner") == []
    assert get_plugin_manager().broken == []


def test_load_only_accepts_distribution_names(fresh_plugins, monkeypatch):
    monkeypatch.setenv("LDMKIT_LOAD_PLUGINS", "ldmkit-conditioners")
    registry = get_registry()
    assert registry.names("sampler") == [] and "none" in registry.names("conditioner")


def test_a_name_in_load_only_that_no_plugin_has_is_said(fresh_plugins, monkeypatch):
    """Before, LDMKIT_LOAD_PLUGINS=autoencoderz loaded nothing of it silently: the first sign was
    `unknown option first_stage=kl_tiny ... first_stage options: (none)`."""
    from ldmkit.plugins import PluginLoadWarning

    monkeypatch.setenv("LDMKIT_LOAD_PLUGINS", "samplers,autoencoderz")
    with pytest.warns(PluginLoadWarning) as caught:
        assert "ddim" in get_registry().names("sampler")
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(
        "LDMKIT_LOAD_PLUGINS names 'autoencoderz', which is no installed plugin (did you mean 'autoencoders'?); "
        "installed: "
    ), message
    assert "autoencoders (ldmkit-autoencoders)" in message


def test_a_component_of_a_plugin_left_out_says_only_some_are_loaded(fresh_plugins, monkeypatch, tmp_path):
    """A pipeline whose first stage is in a plugin LDMKIT_LOAD_PLUGINS leaves out said only
    "unknown first_stage 'kl'; registered first_stages: (none)"."""
    import ldmkit
    from ldmkit.pipeline import Pipeline

    ldmkit.compose(overrides=["first_stage=kl_tiny", "image_size=8"]).save(tmp_path / "pipe")
    monkeypatch.setenv("LDMKIT_LOAD_PLUGINS", "samplers,unet,conditioners")
    reset_plugin_manager()
    with pytest.raises(ConfigError, match=r"unknown first_stage 'kl'.*\(only the plugins in "
                                          r"LDMKIT_LOAD_PLUGINS=samplers,unet,conditioners are loaded\)$"):
        Pipeline.load(tmp_path / "pipe")
    with pytest.raises(ConfigError, match=r"^unknown option first_stage=kl_tiny .*; only the plugins in LDMKIT_LOAD_PLUGINS"):
        ldmkit.compose(overrides=["first_stage=kl_tiny"])


def test_loading_is_lazy_and_idempotent(fresh_plugins):
    manager = get_plugin_manager()
    assert manager.infos == {}  # nothing loaded until first use
    first = manager.registry
    manager.load_entry_points()
    assert manager.registry is first
    assert sorted(manager.infos) == sorted(set(manager.infos))


def test_temporary_plugin_fixture_unregisters(ldmkit_plugin, fresh_plugins):
    class Plugin:
        @ldmkit.hookimpl
        def ldmkit_register_samplers(self, register):
            from ldmkit_samplers import DDIMSampler

            register("temp_ddim", DDIMSampler)

    ldmkit_plugin(Plugin(), name="temp")
    assert "temp_ddim" in get_registry().names("sampler")


def test_temporary_plugin_context_manager_unregisters(fresh_plugins):
    from ldmkit.testing import temporary_plugin

    class Plugin:
        @ldmkit.hookimpl
        def ldmkit_register_samplers(self, register):
            from ldmkit_samplers import DDIMSampler

            register("temp_ddim", DDIMSampler)

    with temporary_plugin(Plugin(), name="temp"):
        assert "temp_ddim" in get_registry().names("sampler")
    assert "temp_ddim" not in get_registry().names("sampler")


def test_unknown_component_lists_registered_names(fresh_plugins):
    with pytest.raises(RegistryError, match=r"unknown sampler 'dimm'; registered samplers: .*ddim"):
        get_registry().get("sampler", "dimm")


def test_entry_point_name_taken_by_another_distribution_is_reported_and_both_named(site):
    """A third party naming its entry point `samplers` must not silently displace
    ldmkit-samplers (or be silently dropped): it is reported, naming both distributions."""
    make_distribution(site, "ldmkit-mine", "1.0", {"samplers": "namesake_plugin"},
                      {"namesake_plugin": GOOD.format(name="mine")})
    with pytest.warns(PluginLoadWarning) as caught:
        registry = get_registry()
    message = " ".join(str(w.message) for w in caught)
    assert "'samplers'" in message and "ldmkit-mine 1.0" in message and "ldmkit-samplers 0.1.0" in message
    # the first on sys.path keeps the name (here the test's site, prepended); the other is broken
    assert registry.names("sampler") == ["mine"]
    rows = get_plugin_manager().plugin_report()
    assert [row["status"] for row in rows if row["distribution"] == "ldmkit-samplers"] == ["broken"]


def test_entry_point_name_clash_is_fatal_in_strict_mode(site, monkeypatch):
    make_distribution(site, "ldmkit-mine", "1.0", {"samplers": "namesake_plugin"},
                      {"namesake_plugin": GOOD.format(name="mine")})
    monkeypatch.setenv("LDMKIT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"'samplers'.*ldmkit-samplers 0.1.0.*already registered by ldmkit-mine 1.0"):
        get_registry()


CONFIG_ROOT_PLUGIN = """
import ldmkit

@ldmkit.hookimpl
def ldmkit_register_configs(register):
    register({root!r})
"""


@pytest.mark.parametrize("root", ["/no/such/conf_dir", "pkg://no_such_package_xyz.conf"])
def test_config_root_that_is_missing_is_reported_and_others_load(site, root):
    """A plugin whose conf/ did not ship (or whose pkg:// names no package) is a broken plugin,
    named with its distribution; composing with the other plugins still works."""
    from ldmkit.config import compose_config

    make_distribution(site, "ldmkit-noconf", "1.0", {"noconf": "noconf_plugin"},
                      {"noconf_plugin": CONFIG_ROOT_PLUGIN.format(root=root)})
    with pytest.warns(PluginLoadWarning, match=r"ldmkit-noconf 1.0.*ldmkit_register_configs.*not a"):
        cfg = compose_config(["sampler=ddim"])
    assert cfg.sampler.name == "ddim"
    rows = get_plugin_manager().plugin_report()
    assert [row["status"] for row in rows if row["distribution"] == "ldmkit-noconf"] == ["broken"]


def test_config_root_that_is_missing_is_fatal_in_strict_mode(site, monkeypatch):
    make_distribution(site, "ldmkit-noconf", "1.0", {"noconf": "noconf_plugin"},
                      {"noconf_plugin": CONFIG_ROOT_PLUGIN.format(root="/no/such/conf_dir")})
    monkeypatch.setenv("LDMKIT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"ldmkit-noconf 1.0.*not a directory"):
        get_plugin_manager().config_roots()


def test_pkg_config_root_of_a_namespace_folder_lists_its_groups(site):
    """`register("pkg://my_plugin.conf")` where conf/ has no __init__.py (as in the docs' layout):
    its groups are listed and its options take part in the clash check."""
    package = site / "nsconf_plugin"
    (package / "conf" / "sampler").mkdir(parents=True)
    (package / "__init__.py").write_text(CONFIG_ROOT_PLUGIN.format(root="pkg://nsconf_plugin.conf"))
    (package / "conf" / "sampler" / "ddim.yaml").write_text("name: ddim\n")
    make_distribution(site, "ldmkit-nsconf", "1.0", {"nsconf": "nsconf_plugin"}, {})
    rows = get_plugin_manager().plugin_report()
    row = next(row for row in rows if row["distribution"] == "ldmkit-nsconf")
    assert row["config_groups"] == {"sampler": ["ddim"]}
    clashes = get_plugin_manager().config_option_clashes()
    assert any("sampler=ddim is shipped twice" in c and "ldmkit-nsconf 1.0" in c for c in clashes)


SHIPS_AN_OPTION = """
from pathlib import Path

import ldmkit

@ldmkit.hookimpl
def ldmkit_register_configs(register):
    register(Path(__file__).parent / "ships_conf")
{samplers_hook}
"""
FAILING_SAMPLERS_HOOK = """
@ldmkit.hookimpl
def ldmkit_register_samplers(register):
    from ships_sampler import Mine  # a module the distribution forgot to ship
"""


@pytest.mark.parametrize(
    ("samplers_hook", "why"),
    [
        ("", "registers no sampler 'mine'"),  # forgot the hook
        (FAILING_SAMPLERS_HOOK, "failed to load: ModuleNotFoundError: No module named 'ships_sampler'"),
    ],
    ids=["no hook", "hook fails"],
)  # fmt: skip
def test_an_option_whose_plugin_registers_nothing_names_the_plugin(site, samplers_hook, why):
    """The plugin's config option composes but names a sampler no plugin registered: the
    error named neither the plugin nor its distribution ("unknown sampler 'mine'; registered
    samplers: ddim, ..."), only a warning printed before it did, and only when a hook failed."""
    sys.modules.pop("ships_plugin", None)  # the other case's module, from another site
    make_distribution(site, "ldmkit-ships", "1.0", {"ships": "ships_plugin"},
                      {"ships_plugin": SHIPS_AN_OPTION.format(samplers_hook=samplers_hook)})  # fmt: skip
    (site / "ships_conf" / "sampler").mkdir(parents=True)
    (site / "ships_conf" / "sampler" / "mine.yaml").write_text("name: mine\n")
    with pytest.warns(PluginLoadWarning) if samplers_hook else contextlib.nullcontext():
        with pytest.raises(ConfigError) as caught:
            ldmkit.compose(overrides=["sampler=mine", "first_stage=identity", "image_size=8"])
    assert str(caught.value).startswith("sampler=mine: unknown sampler 'mine'; registered samplers: ddim")
    assert str(caught.value).endswith(
        f"; option sampler=mine comes from plugin 'ships' (ldmkit-ships 1.0), which {why}"
    )


def test_an_unknown_option_names_the_plugins_that_failed_to_load(site):
    """A plugin that fails to import ships no config options: ``sampler=mine`` was "unknown
    option sampler=mine (no sampler/mine.yaml ...)", with the failure only in a warning above
    it; the error itself now names the plugin, its distribution and why."""
    make_distribution(site, "ldmkit-broken", "0.9", {"broken": "broken_plugin"},
                      {"broken_plugin": "import not_installed_dependency\n"})  # fmt: skip
    with pytest.warns(PluginLoadWarning), pytest.raises(ConfigError) as caught:
        ldmkit.compose(overrides=["sampler=mine", "first_stage=identity", "image_size=8"])
    assert str(caught.value).startswith("unknown option sampler=mine (no sampler/mine.yaml")
    assert str(caught.value).endswith(
        "; plugin 'broken' (ldmkit-broken 0.9), which may ship it, failed to load: "
        "ModuleNotFoundError: No module named 'not_installed_dependency'"
    )


def test_an_entry_point_in_another_group_is_named_where_its_plugin_is_missed(site, capsys, monkeypatch):
    """``[project.entry-points."ldmkit.plugins"]`` instead of ``[project.entry-points.ldmkit]``:
    the plugin was never loaded, and neither the unknown option nor ``ldmkit plugins`` said
    why."""
    make_distribution(site, "ldmkit-misgrouped", "1.0", {"mine": "mine_plugin"},
                      {"mine_plugin": GOOD.format(name="mine")}, group="ldmkit.plugins")  # fmt: skip
    said = (
        "distribution ldmkit-misgrouped 1.0 declares the entry point mine = mine_plugin in the group "
        "'ldmkit.plugins', which ldmkit does not read: a plugin's entry point goes in the group 'ldmkit' "
        "([project.entry-points.ldmkit] in pyproject.toml)"
    )
    with pytest.raises(ConfigError) as caught:
        ldmkit.compose(overrides=["sampler=mine"])
    assert str(caught.value).startswith("unknown option sampler=mine (no sampler/mine.yaml")
    assert str(caught.value).endswith(f"; {said}")
    from ldmkit.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() sets its own
    assert main(["plugins"]) == 0
    assert capsys.readouterr().err == f"ldmkit plugins: warning: {said}\n"
    assert main(["plugins", "--json"]) == 0  # a JSON reader sees it too, not only stderr
    out = capsys.readouterr()
    ignored = [row for row in json.loads(out.out) if row["status"] == "ignored"]
    assert ignored == [{"name": "mine", "distribution": "ldmkit-misgrouped", "version": "1.0", "module": "mine_plugin",
                        "status": "ignored", "registers": {}, "config_groups": {}, "error": None, "note": said,
                        "group": "ldmkit.plugins"}]  # fmt: skip
    assert out.err == f"ldmkit plugins: warning: {said}\n"


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("def ldmkit_register_samplers(register):\n    pass\n", "@ldmkit.hookimpl is missing on its ldmkit_register_samplers"),
        ('"""a package whose hooks live in its plugin module"""\n',
         "the module the entry point names holds no @ldmkit.hookimpl function (the package instead of its hook "
         "module?)"),
    ],
    ids=["undecorated", "package"],
)  # fmt: skip
def test_a_plugin_implementing_no_hook_is_warned_about(site, source, why):
    """It loaded, registered nothing, and the only sign was an empty row in ``ldmkit plugins``."""
    make_distribution(site, "ldmkit-hookless", "1.0", {"hookless": "hookless_plugin"}, {"hookless_plugin": source})
    sys.modules.pop("hookless_plugin", None)
    with pytest.warns(PluginLoadWarning) as caught:
        get_registry()
    assert [str(w.message) for w in caught] == [
        "ldmkit plugin 'hookless' from distribution ldmkit-hookless 1.0 (entry point hookless_plugin) implements "
        f"no ldmkit hook, so it provides nothing: {why}"
    ]
