"""The plugin author's path, as a new user walks it from docs/plugins.md alone.

* The pyproject.toml, hook module and config option that docs/plugins.md shows make a
  distribution that pip installs and ldmkit loads.
* The ``ldmkit_plugin`` fixture (and ``temporary_plugin`` under it) work in a plugin's own
  tests with the plugin also pip-installed, where the installed copy is already loaded from
  its entry point when the test registers it. This once failed with "plugin name 'mine' is
  already registered", or named the module instead of the plugin that was registered.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ldmkit
from ldmkit.config import ConfigError
from ldmkit.interfaces import Conditioner, FirstStage, Sampler
from ldmkit.plugins import PluginError, get_plugin_manager, get_registry
from ldmkit.testing import temporary_plugin
from tests.conftest import ldmkit_cli, make_distribution, pip_install_project
from tests.test_docs_snippets import fenced_blocks

INSTALLED = """
import ldmkit
from ldmkit.interfaces import Sampler

class Installed(Sampler):
    def sample(self, denoise, schedule, noise, **kw):
        return noise

@ldmkit.hookimpl
def ldmkit_register_samplers(register):
    register("mine", Installed)
"""


@pytest.fixture
def installed(site):
    """``ldmkit-mine`` 0.3 installed, entry point ``mine = mine_fixture_plugin``; returns
    its module (the object the entry point loads)."""
    make_distribution(site, "ldmkit-mine", "0.3", {"mine": "mine_fixture_plugin"},
                      {"mine_fixture_plugin": INSTALLED})  # fmt: skip
    yield importlib.import_module("mine_fixture_plugin")
    sys.modules.pop("mine_fixture_plugin", None)


def provider() -> str:
    return get_registry().get("sampler", "mine").provider


@pytest.mark.parametrize("name", ["mine", None])
def test_the_installed_module_itself(installed, ldmkit_plugin, name):
    """Once failed with "plugin name 'mine' is already registered" (or, unnamed, with the
    module's name, which is not the plugin that was registered)."""
    assert ldmkit_plugin(installed, name=name) == "mine"
    assert provider() == "plugin 'mine' (ldmkit-mine 0.3)"


def test_the_installed_module_stays_loaded_after(installed):
    with temporary_plugin(installed, name="mine"):
        pass
    assert provider() == "plugin 'mine' (ldmkit-mine 0.3)"


class Edited(Sampler):
    def sample(self, denoise, schedule, noise, **kw):
        return -noise


class WorkingCopy:
    """The plugin as the author is editing it, registered under the entry point's name."""

    @ldmkit.hookimpl
    def ldmkit_register_samplers(self, register):
        register("mine", Edited)


def test_a_working_copy_stands_in_for_the_installed_one(installed, ldmkit_plugin):
    assert ldmkit_plugin(WorkingCopy(), name="mine") == "mine"
    assert get_registry().get("sampler", "mine").factory is Edited


def test_the_installed_one_comes_back_after(installed):
    with temporary_plugin(WorkingCopy(), name="mine"):
        assert get_registry().get("sampler", "mine").factory is Edited
    assert get_registry().get("sampler", "mine").factory is installed.Installed
    assert provider() == "plugin 'mine' (ldmkit-mine 0.3)"
    info = get_plugin_manager().infos["mine"]
    assert (info.distribution, info.version, info.module) == (
        "ldmkit-mine",
        "0.3",
        "mine_fixture_plugin",
    )


def test_a_second_name_for_the_same_components_names_both_providers(installed, ldmkit_plugin):
    """Registering the working copy under another name is a clash, said as one."""
    ldmkit_plugin(WorkingCopy(), name="mine_dev")
    with pytest.raises(
        Exception, match=r"'mine' is registered twice.*ldmkit-mine 0\.3.*'mine_dev'"
    ):
        get_registry()


# -- the docs' distribution installs --------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
SAMPLER = """
from ldmkit.diffusion import DiscreteSampler


class MySampler(DiscreteSampler):
    def step(self, s):
        a_prev = s.alpha_bar_prev
        return a_prev.sqrt() * s.x0 + (1 - a_prev).sqrt() * s.eps
"""


def docs_block(lang: str, first_line: str) -> str:
    """The code block of docs/plugins.md in ``lang`` whose first line is ``first_line``."""
    blocks = [
        b for b in fenced_blocks(DOCS) if b.lang == lang and b.code.startswith(first_line + "\n")
    ]
    assert len(blocks) == 1, (
        f"docs/plugins.md has {len(blocks)} {lang} blocks starting {first_line!r}"
    )
    return blocks[0].code


@pytest.fixture(scope="module")
def docs_distribution(tmp_path_factory) -> Path:
    """``ldmkit-my-plugin`` built from the docs' blocks and pip-installed into a target folder."""
    project = tmp_path_factory.mktemp("my-plugin")
    package = project / "src" / "my_plugin"
    (package / "conf" / "sampler").mkdir(parents=True)
    (project / "pyproject.toml").write_text(docs_block("toml", "# pyproject.toml"))
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text(docs_block("python", "# src/my_plugin/plugin.py"))
    (package / "sampler.py").write_text(SAMPLER)
    (package / "conf" / "sampler" / "my_sampler.yaml").write_text(
        docs_block("yaml", "name: my_sampler   # the registered name")
    )
    target = tmp_path_factory.mktemp("target")
    pip_install_project(project, target)
    return target


def test_the_docs_pyproject_installs_and_loads(docs_distribution, fresh_plugins, monkeypatch):
    monkeypatch.syspath_prepend(str(docs_distribution))
    try:
        assert (
            get_registry().get("sampler", "my_sampler").provider
            == "plugin 'my_plugin' (ldmkit-my-plugin 0.1.0)"
        )
        pipe = ldmkit.compose(
            overrides=["sampler=my_sampler", "first_stage=identity", "image_size=8"]
        )
        assert type(pipe.sampler).__name__ == "MySampler" and pipe.sampler.steps == 25
        with temporary_plugin(
            importlib.import_module("my_plugin.plugin"), name="my_plugin"
        ) as name:
            assert name == "my_plugin"  # the installed module: left as it is
    finally:
        for module in [m for m in sys.modules if m == "my_plugin" or m.startswith("my_plugin.")]:
            del sys.modules[module]


# -- a plugin that returns the wrong thing ----------------------------------------------------

WRONG_RETURNS = """
from pathlib import Path

import torch

import ldmkit
from ldmkit.diffusion import DiscreteSampler
from ldmkit.interfaces import Conditioner, Denoiser, FirstStage


class ReturnsNothing(DiscreteSampler):
    def step(self, s):
        return s.z

    def sample(self, denoise, schedule, noise, **kwargs):
        super().sample(denoise, schedule, noise, **kwargs)  # and forgot to return it


class ReturnsATensor(Conditioner):
    input_keys = ("label",)
    input_kinds = {"label": "class"}

    def __init__(self):
        super().__init__()
        self.crossattn_dim = 8
        self.embedding = torch.nn.Embedding(4, 8)

    def forward(self, batch):  # the tokens, not {"crossattn": tokens}
        return self.embedding(torch.as_tensor(self.read(batch, "label")))[:, None]


class ReturnsAnOutputObject(Denoiser):
    def __init__(self, *, in_channels=3, out_channels=3, context_dim=None, vector_dim=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv = torch.nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, z_t, t, cond):  # as diffusers' UNets do: (sample,)
        return (self.conv(z_t) * t.float()[:, None, None, None],)


class DecodesAPair(FirstStage):
    def __init__(self):
        super().__init__()
        self.latent_channels, self.downsample_factor = 3, 1

    def encode(self, x):
        return x

    def decode(self, z):  # (image, None) where the image alone was meant
        return z, None


@ldmkit.hookimpl
def ldmkit_register_samplers(register):
    register("returns_nothing", ReturnsNothing)


@ldmkit.hookimpl
def ldmkit_register_denoisers(register):
    register("returns_an_output_object", ReturnsAnOutputObject)


@ldmkit.hookimpl
def ldmkit_register_first_stages(register):
    register("decodes_a_pair", DecodesAPair)


@ldmkit.hookimpl
def ldmkit_register_conditioners(register):
    register("returns_a_tensor", ReturnsATensor)


@ldmkit.hookimpl
def ldmkit_register_configs(register):
    register(Path(__file__).parent / "wrong_conf")
"""


@pytest.mark.parametrize(
    ("overrides", "culprit"),
    [
        (["sampler=returns_nothing", "--num-samples", "1"],
         "sampler 'returns_nothing' from plugin 'wrong' (ldmkit-wrong 1.0): sample() returned NoneType, not a "
         "tensor of shape (1, 3, 8, 8)"),
        (["conditioner=returns_a_tensor", "--labels", "1"],
         "conditioner 'returns_a_tensor' from plugin 'wrong' (ldmkit-wrong 1.0): forward() returned "
         "Tensor, not a mapping of roles ('crossattn', 'concat', 'vector') to tensors"),
        (["denoiser=returns_an_output_object", "--num-samples", "1"],
         "denoiser 'returns_an_output_object' from plugin 'wrong' (ldmkit-wrong 1.0): forward() returned "
         "tuple, not a tensor of shape (1, 3, 8, 8)"),
        (["first_stage=decodes_a_pair", "--num-samples", "1"],
         "first_stage 'decodes_a_pair' from plugin 'wrong' (ldmkit-wrong 1.0): decode() returned tuple, not a tensor"),
    ],
    ids=["sampler", "conditioner", "denoiser", "first stage"],
)  # fmt: skip
def test_a_plugin_returning_the_wrong_type_is_named_in_one_line(wrong_plugin, overrides, culprit):
    """Once a traceback from deep inside the pipeline (``NoneType / Tensor`` in decode,
    ``'Tensor' object has no attribute 'items'``) that named neither the plugin nor its
    distribution."""
    out = wrong_plugin("sample", "image_size=8", *overrides, "--out", str(wrong_plugin.site / "grid.png"))
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"ldmkit sample: error: {culprit}"), out.stderr


@pytest.mark.parametrize(
    ("overrides", "culprit"),
    [
        (["conditioner=returns_a_tensor", "conditioner.drop_rate=0.5"],
         "conditioner 'returns_a_tensor' from plugin 'wrong' (ldmkit-wrong 1.0): forward() returned Tensor"),
        (["denoiser=returns_an_output_object"],
         "denoiser 'returns_an_output_object' from plugin 'wrong' (ldmkit-wrong 1.0): forward() returned tuple"),
    ],
    ids=["conditioner", "denoiser"],
)  # fmt: skip
def test_training_names_a_plugin_returning_the_wrong_type_in_one_line(wrong_plugin, tmp_path, overrides, culprit):
    """``ldmkit train`` too (the conditioner's dropout once failed first, on ``not tensor``)."""
    from tests.training.faults import make_shards

    shards = make_shards(tmp_path / "data")
    out = wrong_plugin(
        "train", "stage=ldm", "trainer=ldm_tiny", "image_size=16", "data=image_folder", f"data.path={shards}",
        "trainer.max_steps=1", "trainer.num_workers=0", "trainer.progress=false", "trainer.tensorboard=false",
        f"run_dir={tmp_path / 'run'}", *overrides,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"ldmkit train: error: {culprit}"), out.stderr


@pytest.fixture
def wrong_plugin(site):
    """``ldmkit-wrong`` installed (WRONG_RETURNS and its options); calls the ``ldmkit`` CLI with
    it on the path and a tiny identity + unet_tiny model unless the arguments choose others."""
    make_distribution(site, "ldmkit-wrong", "1.0", {"wrong": "wrong_plugin"}, {"wrong_plugin": WRONG_RETURNS})
    options = {"sampler/returns_nothing.yaml": "steps: 1\n", "conditioner/returns_a_tensor.yaml": "",
               "denoiser/returns_an_output_object.yaml": "in_channels: auto\nout_channels: auto\n",
               "first_stage/decodes_a_pair.yaml": ""}  # fmt: skip
    for option, text in options.items():
        (site / "wrong_conf" / option).parent.mkdir(parents=True, exist_ok=True)
        (site / "wrong_conf" / option).write_text(f"name: {Path(option).stem}\n{text}")

    def run(command, *args):
        chosen = {a.partition("=")[0] for a in args}
        tiny = [o for o in ("first_stage=identity", "denoiser=unet_tiny", "sampler.steps=1")
                if o.partition("=")[0] not in chosen]  # fmt: skip
        return ldmkit_cli(
            command, *tiny, *args,
            env={"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])},
        )  # fmt: skip

    run.site = site
    return run


# -- what a newcomer forgets to declare ---------------------------------------------------------


class NoLatentChannels(FirstStage):
    def __init__(self, *, channels: int = 3):
        super().__init__()
        self.downsample_factor = 1  # and forgot self.latent_channels = channels

    def encode(self, x):
        return x

    def decode(self, z):
        return z


class NoSteps(Sampler):
    def __init__(self, *, steps: int = 2):
        self.started = True  # forgot super().__init__(steps=steps)

    def sample(self, denoise, schedule, noise, **kwargs):
        return noise


class NoInputKeys(Conditioner):
    """Reads ``label`` but forgot ``input_keys = ("label",)``."""

    def __init__(self):
        super().__init__()
        self.crossattn_dim = 4
        self.embedding = nn.Embedding(3, 4)

    def forward(self, batch):
        return {"crossattn": self.embedding(torch.as_tensor(self.read(batch, "label")))[:, None]}


class NoSuperInit(Conditioner):
    input_keys = ("label",)

    def __init__(self):
        self.embedding = nn.Embedding(3, 4)  # before super().__init__(): torch refuses

    def forward(self, batch):
        return {}


class UndeclaredVector(NoInputKeys):
    """Returns a ``vector`` besides its tokens, but declares no ``vector_dim``."""

    input_keys = ("label",)

    def forward(self, batch):
        tokens = super().forward(batch)["crossattn"]
        return {"crossattn": tokens, "vector": tokens[:, 0]}


NEWCOMER = {
    "first_stage": {"no_latent_channels": NoLatentChannels},
    "sampler": {"no_steps": NoSteps},
    "conditioner": {"no_input_keys": NoInputKeys, "undeclared_vector": UndeclaredVector, "no_super_init": NoSuperInit},
}


@pytest.fixture
def newcomer(tmp_path, ldmkit_plugin):
    """NEWCOMER's components registered, each with its config option."""

    class Plugin:
        @ldmkit.hookimpl
        def ldmkit_register_first_stages(self, register):
            for name, factory in NEWCOMER["first_stage"].items():
                register(name, factory)

        @ldmkit.hookimpl
        def ldmkit_register_samplers(self, register):
            for name, factory in NEWCOMER["sampler"].items():
                register(name, factory)
            register("unshipped", NoSteps)  # no config option names it

        @ldmkit.hookimpl
        def ldmkit_register_conditioners(self, register):
            for name, factory in NEWCOMER["conditioner"].items():
                register(name, factory)

        @ldmkit.hookimpl
        def ldmkit_register_configs(self, register):
            register(tmp_path)

    for group, options in NEWCOMER.items():
        (tmp_path / group).mkdir()
        for name in options:
            (tmp_path / group / f"{name}.yaml").write_text(f"name: {name}\n")
    ldmkit_plugin(Plugin(), name="newcomer")


@pytest.mark.parametrize(
    ("option", "culprit"),
    [
        ("first_stage=no_latent_channels",
         "first_stage=no_latent_channels: first_stage 'no_latent_channels' from plugin 'newcomer' (newcomer): "
         "latent_channels is not set (an ldmkit.interfaces.FirstStage sets it in __init__)"),
        ("sampler=no_steps",
         "sampler=no_steps: sampler 'no_steps' from plugin 'newcomer' (newcomer): steps is not set (an "
         "ldmkit.interfaces.Sampler sets it in __init__)"),
        ("conditioner=no_input_keys",
         "conditioner=no_input_keys: conditioner 'no_input_keys' from plugin 'newcomer' (newcomer): input_keys is "
         "empty but it declares the roles ['crossattn'] (sampling calls only a conditioner that reads a batch "
         "key: list the keys forward reads)"),
    ],
    ids=["first stage", "sampler", "conditioner"],
)  # fmt: skip
def test_an_interface_attribute_left_unset_is_one_line_naming_the_plugin(newcomer, option, culprit):
    """Once an AttributeError traceback from composition (the first stage), or nothing until
    sampling (a sampler without ``steps``), or never (a conditioner without ``input_keys``:
    ``Pipeline.sample`` does not call it, and the denoiser then lacks its condition)."""
    with pytest.raises(ConfigError) as err:
        ldmkit.compose(overrides=[option])
    assert str(err.value) == culprit


def test_a_role_returned_but_not_declared_is_one_line_naming_the_plugin(newcomer):
    """Once ``ValueError: cond['vector'] was given but this UNet takes no vector condition``
    from inside the UNet, naming neither the conditioner nor its plugin."""
    pipe = ldmkit.compose(overrides=["conditioner=undeclared_vector", "first_stage=identity", "image_size=8",
                                     "sampler.steps=1"])  # fmt: skip
    with pytest.raises(PluginError) as err:
        pipe.sample({"label": [1]}, seed=0)
    assert str(err.value) == (
        "conditioner 'undeclared_vector' from plugin 'newcomer' (newcomer): forward(): it returns 'vector' but "
        "vector_dim is not set"
    )


def test_a_constructor_that_raises_is_one_line_naming_the_plugin_and_the_line(newcomer):
    """Once a traceback ending in torch's ``cannot assign module before Module.__init__() call``."""
    with pytest.raises(ConfigError) as err:
        ldmkit.compose(overrides=["conditioner=no_super_init"])
    line = inspect.unwrap(NoSuperInit.__init__).__code__.co_firstlineno + 1
    assert str(err.value) == (
        "conditioner=no_super_init: conditioner 'no_super_init' from plugin 'newcomer' (newcomer) failed to build: "
        f"AttributeError: cannot assign module before Module.__init__() call (test_plugin_author_path.py:{line})"
    )


def test_a_registered_name_without_its_option_file_says_so(newcomer):
    """``sampler=unshipped`` once said only that no ``sampler/unshipped.yaml`` exists, not that
    the plugin registers the name and forgot the file."""
    with pytest.raises(ConfigError) as err:
        ldmkit.compose(overrides=["sampler=unshipped"])
    assert str(err.value).endswith(
        "; 'unshipped' is the registered name of a sampler from plugin 'newcomer' (newcomer), but no config "
        "option sampler/unshipped.yaml ships with it (a plugin's config root holds one file per option, whose "
        "`name:` is the registered name: docs/plugins.md, section 3)"
    )
