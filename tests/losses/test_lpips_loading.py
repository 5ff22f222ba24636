"""LPIPS loads the VGG16 trunk from torch hub's checkpoint folder, never downloads, and
names the missing file; the linear heads come from the lpips package."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from ldmkit.losses import LPIPS, AutoencoderLoss, MissingWeightsError
from ldmkit.losses.perceptual import VGG16_FILE


@pytest.fixture
def hub_dir(tmp_path):
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(before)


def test_missing_vgg_weights_name_file_and_folder(hub_dir):
    with pytest.raises(MissingWeightsError) as err:
        LPIPS()
    message = str(err.value)
    assert VGG16_FILE in message and str(hub_dir / "checkpoints") in message
    assert "perceptual_weight=0" in message
    with pytest.raises(MissingWeightsError):
        AutoencoderLoss(perceptual_weight=1.0)
    AutoencoderLoss(perceptual_weight=0.0)  # no perceptual term: no weights needed


def test_pretrained_trunk_and_heads_are_loaded(hub_dir):
    import lpips

    with pytest.warns(UserWarning, match="tests only"):
        random_model = LPIPS(trunk="random")
    # a stand-in for torchvision's file: same keys and shapes, known values
    gen = torch.Generator().manual_seed(0)
    fake = {}
    for name, p in random_model.model.net.named_parameters():
        index, kind = name.split(".")[1:]
        fake[f"features.{index}.{kind}"] = torch.randn(p.shape, generator=gen)
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(fake, hub_dir / "checkpoints" / VGG16_FILE)

    model = LPIPS()
    for name, p in model.model.net.named_parameters():
        index, kind = name.split(".")[1:]
        assert torch.equal(p, fake[f"features.{index}.{kind}"]), name
    heads = torch.load(Path(inspect.getfile(lpips)).parent / "weights/v0.1/vgg.pth", map_location="cpu",
                       weights_only=True)
    for key, value in heads.items():
        assert torch.equal(model.model.state_dict()[key], value), key
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.allclose(model(x, x), torch.zeros(2, 1, 1, 1), atol=1e-6)
    assert float(model(x, -x).mean()) > 0
    assert model.state_dict() == {} and list(model.parameters()) == []  # loaded from disk, not checkpoints


def test_unknown_trunk():
    with pytest.raises(ValueError, match="unknown LPIPS trunk 'imagenet'"):
        LPIPS(trunk="imagenet")
