"""The three first stages against the FirstStage contract, shapes for every f, and the
shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ldmkit.interfaces import FirstStage
from ldmkit.plugins import get_plugin_manager, get_registry
from ldmkit.testing import FirstStageConformance
from ldmkit_autoencoders.identity import IdentityFirstStage
from ldmkit_autoencoders.kl import KLAutoencoder
from ldmkit_autoencoders.vq import VQAutoencoder

CONF = Path(__file__).resolve().parents[1] / "src" / "ldmkit_autoencoders" / "conf" / "first_stage"
TINY = dict(ch=8, num_res_blocks=1, norm_groups=4, resolution=32)


class TestIdentityConformance(FirstStageConformance):
    def make_first_stage(self):
        return IdentityFirstStage(channels=3)


class TestKLConformance(FirstStageConformance):
    def make_first_stage(self):
        return KLAutoencoder(latent_channels=3, ch_mult=(1, 2), **TINY)


class TestVQConformance(FirstStageConformance):
    def make_first_stage(self):
        return VQAutoencoder(latent_channels=3, n_embed=16, ch_mult=(1, 2), **TINY)


@pytest.mark.parametrize("cls", [KLAutoencoder, VQAutoencoder])
@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5, 6])
def test_shapes_for_every_f(cls, levels):
    f = 2 ** (levels - 1)
    model = cls(latent_channels=4, ch_mult=(1,) * levels, ch=8, num_res_blocks=1, norm_groups=4,
                resolution=64, in_channels=1, out_ch=1).eval()
    assert model.downsample_factor == f
    x = torch.rand(2, 1, 64, 32) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (2, 4, 64 // f, 32 // f)
        assert model.decode(z).shape == x.shape
        rec, reg, _ = model(x)
    assert rec.shape == x.shape and reg.ndim == 0


def test_grayscale_in_rgb_out():
    model = KLAutoencoder(latent_channels=3, ch_mult=(1, 2), in_channels=1, out_ch=3, **TINY)
    assert model.image_channels == 1 and model.out_channels == 3
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 16, 16))[0].shape == (1, 3, 16, 16)


def test_bad_inputs_name_the_problem():
    model = KLAutoencoder(latent_channels=3, ch_mult=(1, 2), **TINY)
    with pytest.raises(ValueError, match="B×3×H×W"):
        model.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="not divisible by f=2"):
        model.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="B×3×h×w"):
        model.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="norm_groups"):
        KLAutoencoder(latent_channels=3, ch=8, norm_groups=32)
    with pytest.raises(ValueError, match="unknown encode_mode 'mean'"):
        KLAutoencoder(latent_channels=3, encode_mode="mean", **TINY)
    with pytest.raises(ValueError, match="latent_channels=4 must equal channels=3"):
        IdentityFirstStage(channels=3, latent_channels=4)


def test_attention_resolutions_follow_the_paper_convention():
    # attn_resolutions name feature-map sizes for an input of `resolution` pixels
    model = KLAutoencoder(latent_channels=3, ch=8, ch_mult=(1, 2, 2), num_res_blocks=2,
                          attn_resolutions=(16,), resolution=32, norm_groups=4)
    assert [len(level.attn) for level in model.encoder.down] == [0, 2, 0]
    assert [len(level.attn) for level in model.decoder.up] == [0, 3, 0]
    # a size no level has would add attention nowhere: refused, not ignored
    with pytest.raises(ValueError, match=r"attn_resolutions=\[16, 5\]: 5 is not a feature-map size; for "
                                         r"resolution=32 and ch_mult=\(1, 2, 2\) they are 32, 16, 8"):
        KLAutoencoder(latent_channels=3, ch=8, ch_mult=(1, 2, 2), attn_resolutions=(16, 5), resolution=32,
                      norm_groups=4)


def test_parameter_names_follow_the_original_ldm_checkpoints():
    keys = set(KLAutoencoder(latent_channels=3, ch_mult=(1, 2), **TINY).state_dict())
    for key in ("encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.attn_1.q.weight",
                "decoder.up.1.block.1.conv2.weight", "decoder.up.1.upsample.conv.weight",
                "decoder.norm_out.weight", "quant_conv.weight", "post_quant_conv.weight"):
        assert key in keys, key


def test_plugin_registers_first_stages_and_config_group():
    registry = get_registry()
    for name, cls in (("identity", IdentityFirstStage), ("kl", KLAutoencoder), ("vq", VQAutoencoder)):
        assert registry.get("first_stage", name).factory is cls
    roots = get_plugin_manager().config_roots()
    assert any(root.endswith("ldmkit_autoencoders/conf") for root in roots), roots


def _configs():
    return sorted(CONF.glob("*.yaml"))


@pytest.mark.parametrize("path", _configs(), ids=lambda p: p.stem)
def test_every_config_builds_with_latent_channels(path):
    config = yaml.safe_load(path.read_text())
    assert "latent_channels" in config
    name = config.pop("name")
    model = get_registry().create("first_stage", name, **config)
    assert isinstance(model, FirstStage)
    assert model.latent_channels == config["latent_channels"]
    if name != "identity":
        assert model.downsample_factor == 2 ** (len(config["ch_mult"]) - 1)
        assert f"f={model.downsample_factor}" in path.read_text() or path.stem.endswith(f"f{model.downsample_factor}") \
            or "tiny" in path.stem or "small" in path.stem


def test_paper_configs_have_the_papers_shapes():
    # the f and c of Tab. 8 of Rombach et al. 2022
    expected = {"kl_f4": (4, 3), "kl_f8": (8, 4), "kl_f16": (16, 16), "kl_f32": (32, 64),
                "vq_f4": (4, 3), "vq_f8": (8, 4), "vq_f16": (16, 8)}
    for stem, (f, c) in expected.items():
        config = yaml.safe_load((CONF / f"{stem}.yaml").read_text())
        assert 2 ** (len(config["ch_mult"]) - 1) == f and config["latent_channels"] == c, stem
        assert config["ch"] == 128 and config["num_res_blocks"] == 2


def test_kl_f8_has_the_parameter_count_of_the_released_model():
    # 83,653,863: the parameter count of the released kl-f8 autoencoder (Stable Diffusion's VAE)
    config = yaml.safe_load((CONF / "kl_f8.yaml").read_text())
    config.pop("name")
    model = KLAutoencoder(**config)
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
