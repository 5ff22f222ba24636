"""Issue 11 item 4: every trainer default lives once, in conf/trainer/*.yaml; the Python side
reads it, variants extend a base through `defaults:`, and the autoencoders take the
architecture once."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml
from omegaconf import OmegaConf

from ldmkit.config import compose_config, config_dir
from ldmkit.training.defaults import stage_only_keys, trainer_preset
from ldmkit.training.engine import TRAINER_DEFAULTS, trainer_options


@pytest.mark.parametrize(
    "preset", ["default", "autoencoder", "autoencoder_vq", "autoencoder_tiny", "ldm", "ldm_tiny"]
)
def test_python_reads_what_hydra_composes(preset):
    composed = OmegaConf.to_container(compose_config([f"trainer={preset}"]).trainer)
    assert trainer_preset(preset) == composed


def test_shared_keys_and_stage_keys_come_from_the_yaml():
    assert TRAINER_DEFAULTS == trainer_preset("default")
    ldm = stage_only_keys("ldm")
    assert ldm["warmup_steps"] == 1000  # the value the YAML always had (Python said 0)
    assert set(stage_only_keys("autoencoder")) == {"betas", "disc_lr", "loss"}


def test_a_config_without_trainer_keys_gets_its_stages_preset():
    cfg = OmegaConf.create({"stage": "ldm"})
    assert trainer_options(cfg, "ldm") == trainer_preset("ldm")
    cfg = OmegaConf.create({"stage": "ldm", "trainer": {"lr": 0.5}})
    options = trainer_options(cfg, "ldm")
    assert options["lr"] == 0.5 and options["warmup_steps"] == 1000


def test_variants_extend_instead_of_copying():
    """autoencoder_vq.yaml holds only what differs from autoencoder.yaml; the stage presets
    extend default.yaml; no key of default.yaml is repeated with the same value."""
    folder = config_dir() / "trainer"
    vq = yaml.safe_load((folder / "autoencoder_vq.yaml").read_text())
    assert vq["defaults"] == ["autoencoder", "_self_"]
    assert set(vq) == {"defaults", "loss"} and set(vq["loss"]) == {"disc_start", "disc_weight"}
    shared = trainer_preset("default")
    for stage in ("autoencoder", "ldm"):
        own = yaml.safe_load((folder / f"{stage}.yaml").read_text())
        assert own["defaults"] == ["default", "_self_"]
        repeated = [k for k, v in own.items() if k in shared and shared[k] == v]
        assert not repeated, f"{stage}.yaml repeats default.yaml's {repeated}"


def test_autoencoders_take_the_architecture_once():
    from ldmkit_autoencoders.engine import Architecture
    from ldmkit_autoencoders.kl import KLAutoencoder
    from ldmkit_autoencoders.vq import VQAutoencoder

    arch = {f.name for f in dataclasses.fields(Architecture)}
    for cls in (KLAutoencoder, VQAutoencoder):
        assert arch <= set(inspect.signature(cls).parameters)  # visible to help() and config checks
        source = inspect.getsource(cls.__init__)
        assert "num_res_blocks" not in source and "**arch" in source
    assert inspect.signature(VQAutoencoder).parameters["ch_mult"].default == (1, 2, 4)
    assert VQAutoencoder(ch=8, norm_groups=4, n_embed=8).downsample_factor == 4
    assert KLAutoencoder(ch=8, norm_groups=4).downsample_factor == 8
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['chanels'\]"):
        KLAutoencoder(chanels=8)


def test_a_wrong_architecture_type_is_named_before_building():
    """The architecture keys keep their type hints through ``**arch`` (the class signature
    lists them), so a bad value is one line naming the key, not a traceback from torch."""
    import ldmkit
    from ldmkit.config import ConfigError

    with pytest.raises(ConfigError, match=r"first_stage\.ch='abc': expected an integer"):
        ldmkit.compose(["first_stage=kl_tiny", "first_stage.ch=abc"])
