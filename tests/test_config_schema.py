"""Typed configs at their owners (issue 27, item 3): what a config key takes is declared next
to the code that reads it, and reaches the foundation's checker through
``ldmkit_register_config_keys``, the hook a plugin declares its own keys with."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

import ldmkit
from ldmkit.config import PRIMARY, compose_config, config_dir, config_schema, primary_keys
from ldmkit.config_checks import Integer, Spec, Text
from ldmkit.errors import ConfigError
from ldmkit.plugins import PluginLoadWarning

TRAINING = "plugin 'ldmkit.training.stages' (ldmkit 0.1.0)"
EVALUATION = "plugin 'ldmkit.evaluation.stages' (ldmkit 0.1.0)"
DATA = "plugin 'ldmkit.data.sources' (ldmkit 0.1.0)"
COMPONENTS = ("first_stage", "denoiser", "conditioner", "sampler")  # typed by constructors


def test_each_owner_declares_its_own_keys():
    from ldmkit.data.schema import DATA_KEYS
    from ldmkit.evaluation.schema import EVAL_KEYS
    from ldmkit.training.schema import TRAINER_KEYS

    schema = config_schema()
    owners = [("", primary_keys(), PRIMARY), ("trainer", TRAINER_KEYS, TRAINING),
              ("eval", EVAL_KEYS, EVALUATION), ("data", DATA_KEYS, DATA)]  # fmt: skip
    declared = []
    for node, keys, owner in owners:
        for name, spec in keys.items():
            key = f"{node}.{name}" if node else name
            assert schema.spec(key) is spec and schema.owner(key) == owner, key
            declared.append(key)
    assert schema.keys() == declared  # nobody else declares a key, and in this order


def _leaves(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    return [prefix[:-1]]


def test_every_key_the_shipped_configs_set_is_typed():
    """Every key of conf/config.yaml, each trainer preset and each data option is declared
    (itself or a node above it, such as ``trainer.loss``), component configs aside."""
    schema = set(config_schema().keys())
    overrides = [[f"trainer={p.stem}"] for p in sorted((config_dir() / "trainer").glob("*.yaml"))]
    overrides += [[f"data={p.stem}"] for p in sorted((config_dir() / "data").glob("*.yaml"))]
    untyped = set()
    for chosen in overrides:
        cfg = OmegaConf.to_container(compose_config(chosen))
        for key in _leaves({k: v for k, v in cfg.items() if k not in (*COMPONENTS, "choices")}):
            parts = key.split(".")
            if not any(".".join(parts[:n]) in schema for n in range(1, len(parts) + 1)):
                untyped.add(key)
    assert not untyped, f"keys the shipped configs set that nobody types: {sorted(untyped)}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("schedule.kind=cubic", "schedule.kind='cubic': expected one of linear, scaled_linear"),
        (
            "data.background=[1,2]",
            "data.background=[1, 2]: expected a non-empty string or a number",
        ),
        ("data.stall_timeout=0", "data.stall_timeout=0: expected a number > 0 or null"),
        (
            "eval.fid_features=clip",
            "eval.fid_features='clip': expected one of auto, inception, fashion_mnist, none",
        ),  # fmt: skip
    ],
)
def test_the_keys_typed_now_are_one_line_too(override, message):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert str(err.value).startswith(message), str(err.value)


def test_a_plugin_types_the_keys_of_its_own_trainer_config(ldmkit_plugin):
    class EchoKeys:
        @ldmkit.hookimpl
        def ldmkit_register_config_keys(self, register):
            register("trainer", {"echo_every": Integer(1), "greeting": Text()})

    ldmkit_plugin(EchoKeys(), name="echo_keys")
    assert config_schema().owner("trainer.echo_every") == "plugin 'echo_keys' (echo_keys)"
    with pytest.raises(ConfigError) as err:
        compose_config(["+trainer.echo_every=0", "+trainer.greeting=7", "trainer.lr=-1"])
    assert str(err.value) == (
        "trainer.lr=-1: expected a number > 0; trainer.echo_every=0: expected an integer >= 1; "
        "trainer.greeting=7: expected a non-empty string"
    )
    assert compose_config(["+trainer.echo_every=3"]).trainer.echo_every == 3
    assert compose_config([]).trainer.get("echo_every") is None  # absent: not checked


def test_a_key_declared_twice_names_both_owners(ldmkit_plugin):
    class Retyped:
        @ldmkit.hookimpl
        def ldmkit_register_config_keys(self, register):
            register("", {"trainer.lr": Integer(0)})

    ldmkit_plugin(Retyped(), name="retyped")
    with pytest.raises(ConfigError) as err:
        compose_config([])
    assert str(err.value) == (
        f"config key trainer.lr is declared twice: by {TRAINING} and by plugin 'retyped' (retyped)"
    )


def test_a_declaration_that_is_not_a_spec_reports_the_plugin(ldmkit_plugin):
    class Untyped:
        @ldmkit.hookimpl
        def ldmkit_register_config_keys(self, register):
            register("trainer", {"echo_every": int})

    with pytest.warns(PluginLoadWarning) as caught:
        ldmkit_plugin(Untyped(), name="untyped")
        schema = config_schema()
    message = str(caught[0].message)
    assert (
        "ldmkit plugin 'untyped'" in message and "failed in ldmkit_register_config_keys" in message
    )
    assert (
        "config key trainer.echo_every is declared as <class 'int'>, not an ldmkit.config_checks.Spec"
        in message
    )
    assert "trainer.echo_every" not in schema.keys() and "trainer.max_steps" in schema.keys()
    assert isinstance(schema.spec("trainer.max_steps"), Spec)
