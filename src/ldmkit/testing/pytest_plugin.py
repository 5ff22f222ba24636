"""pytest fixtures shipped with ldmkit (loaded through the ``pytest11`` entry point)."""

from __future__ import annotations

import contextlib

import pytest

from ldmkit.testing.plugins import temporary_plugin


@pytest.fixture
def ldmkit_plugin():
    """Register temporary plugins: ``ldmkit_plugin(obj, name=None) -> name``.

    Everything registered through it is unregistered when the test ends. With the plugin
    also pip-installed (a plugin's own tests), registering the installed module is a no-op
    that returns the entry point's name, and another object registered under that name
    stands in for the installed copy until the test ends::

        def test_mine(ldmkit_plugin):
            class Plugin:
                @ldmkit.hookimpl
                def ldmkit_register_samplers(self, register):
                    register("mine", MySampler)
            ldmkit_plugin(Plugin())
            assert "mine" in ldmkit.plugins.get_registry().names("sampler")
    """
    with contextlib.ExitStack() as stack:

        def register(plugin, name=None):
            return stack.enter_context(temporary_plugin(plugin, name))

        yield register
