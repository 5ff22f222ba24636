"""Meta-tests: every hook is specified, documented and tested; every first-party plugin
imports after install."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from pathlib import Path

import pytest

from ldmkit import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name, obj in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("ldmkit_")]


def test_there_is_one_registration_hook_per_interface_and_configs():
    assert sorted(HOOKS) == sorted([
        "ldmkit_register_first_stages", "ldmkit_register_denoisers",
        "ldmkit_register_conditioners", "ldmkit_register_samplers", "ldmkit_register_configs",
        "ldmkit_register_stages", "ldmkit_register_data_sources", "ldmkit_register_config_keys",
    ])


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_docstring_with_params(hook):
    doc = getattr(hookspecs, hook).__doc__ or ""
    assert ":param register:" in doc


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    assert hook in (ROOT / "docs" / "plugins.md").read_text()


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    sources = [p.read_text() for p in (ROOT / "tests").rglob("*.py") if p.name != "test_meta.py"]
    sources += [p.read_text() for p in (ROOT / "plugins").rglob("tests/*.py")]
    assert any(hook in s for s in sources), f"no test implements {hook}"


def _first_party_distributions() -> list[str]:
    return sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").is_file())


@pytest.mark.parametrize("dist", _first_party_distributions())
def test_first_party_plugin_is_installed_and_imports(dist):
    eps = [ep for ep in importlib.metadata.distribution(dist).entry_points if ep.group == "ldmkit"]
    assert eps, f"{dist} declares no entry point in the 'ldmkit' group"
    for ep in eps:
        module = importlib.import_module(ep.value)
        impls = [n for n in dir(module) if n.startswith("ldmkit_")]
        assert impls and set(impls) <= set(HOOKS), f"{dist}: {impls}"


def test_core_imports_no_plugin():
    import re

    pattern = re.compile(r"^\s*(from|import)\s+ldmkit_\w+", re.MULTILINE)
    offenders = [str(p) for p in (ROOT / "src" / "ldmkit").rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders, f"the core imports plugins in {offenders}"
