"""The spatial conditioners: SpatialRescaler, semantic_map, low_res, inpaint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from torch import nn

from ldmkit.config import compose_config
from ldmkit.interfaces import ConditionValueError, FirstStage, MissingConditionError
from ldmkit.pipeline import build_pipeline
from ldmkit.plugins import get_registry
from ldmkit.testing import ConditionerConformance
from ldmkit_conditioners import (
    InpaintConditioner,
    LowResConditioner,
    SemanticMapConditioner,
    SpatialRescaler,
)
from ldmkit_conditioners.rescaler import METHODS, FirstStageNotBoundError

CONF = Path(__file__).resolve().parents[1] / "src" / "ldmkit_conditioners" / "conf" / "conditioner"


class PoolFirstStage(FirstStage):
    """A stand-in first stage: f×f average pooling and a 1×1 conv to ``latent_channels``."""

    def __init__(self, *, f: int = 4, latent_channels: int = 4, image_channels: int = 3):
        super().__init__()
        self.downsample_factor, self.latent_channels = f, latent_channels
        self.image_channels = image_channels
        self.proj = nn.Conv2d(image_channels, latent_channels, 1)

    def encode(self, x):
        return self.proj(F.avg_pool2d(x, self.downsample_factor))

    def decode(self, z):
        raise NotImplementedError


def bound(conditioner, first_stage):
    conditioner.bind_first_stage(first_stage)
    return conditioner


def class_map(n, h=16, w=16, k=5, seed=0):
    return torch.randint(0, k, (n, h, w), generator=torch.Generator().manual_seed(seed))


def images(n, c=3, h=16, w=16, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- SpatialRescaler --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
@pytest.mark.parametrize("n_stages", [0, 1, 2, 3])
@pytest.mark.parametrize("method", ["bilinear", "nearest", "bicubic", "area"])
def test_rescaler_output_size_is_size_over_2_to_the_n(size, n_stages, method):
    r = SpatialRescaler(n_stages=n_stages, method=method, in_channels=2)
    out = r(torch.randn(1, 2, *size))
    assert out.shape == (1, 2, size[0] // 2**n_stages, size[1] // 2**n_stages)


def test_rescaler_other_methods_and_multiplier():
    assert SpatialRescaler(n_stages=2, method="linear")(torch.randn(1, 2, 40)).shape == (1, 2, 10)
    assert SpatialRescaler(n_stages=1, method="trilinear")(torch.randn(1, 2, 8, 8, 8)).shape[-3:] == (4, 4, 4)
    assert SpatialRescaler(n_stages=2, multiplier=2.0)(torch.randn(1, 3, 5, 6)).shape == (1, 3, 20, 24)


def test_rescaler_channel_mapper_follows_the_paper_names():
    r = SpatialRescaler(n_stages=1, in_channels=182, out_channels=3)
    assert {k: tuple(v.shape) for k, v in r.state_dict().items()} == {"channel_mapper.weight": (3, 182, 1, 1)}
    r = SpatialRescaler(in_channels=4, out_channels=2, bias=True)
    assert {k: tuple(v.shape) for k, v in r.state_dict().items()} == {
        "channel_mapper.weight": (2, 4, 1, 1),
        "channel_mapper.bias": (2,),
    }
    assert r(torch.randn(2, 4, 8, 8)).shape == (2, 2, 4, 4)
    assert not list(SpatialRescaler(in_channels=4).parameters())


def test_rescaler_bad_options_are_named():
    with pytest.raises(ValueError, match=r"unknown interpolation method 'cubic'; expected one of") as e:
        SpatialRescaler(method="cubic")
    assert all(m in str(e.value) for m in METHODS)
    with pytest.raises(ValueError, match="n_stages must be an integer >= 0"):
        SpatialRescaler(n_stages=-1)


# -- semantic_map -----------------------------------------------------------------------------


class TestSemanticMapConformance(ConditionerConformance):
    def make_conditioner(self):
        return bound(SemanticMapConditioner(num_classes=5, n_stages=2), PoolFirstStage(f=4))

    def make_batch(self, n):
        return {"segmentation": class_map(n)}


class TestSemanticMapMapperConformance(ConditionerConformance):
    def make_conditioner(self):
        return SemanticMapConditioner(num_classes=5, n_stages=1, out_channels=3, method="nearest")

    def make_batch(self, n):
        return {"segmentation": class_map(n)[:, None]}  # B×1×H×W works too


class TestSemanticMapUnshuffleConformance(ConditionerConformance):
    def make_conditioner(self):
        return bound(SemanticMapConditioner(num_classes=5, n_stages=2, method="unshuffle"), PoolFirstStage(f=4))

    def make_batch(self, n):
        return {"segmentation": class_map(n)}


def test_unshuffle_keeps_every_pixel_of_the_map_in_its_latent_cell():
    """``method="unshuffle"``: a one-pixel-wide object that bilinear downsampling by 4 blurs to
    a quarter of a cell survives as exact one-hot channels of its cell, and the map is
    recoverable (pixel_shuffle inverts it)."""
    ids = torch.zeros(1, 8, 8, dtype=torch.long)
    ids[0, :, 5] = 2  # a vertical line one pixel wide
    c = bound(SemanticMapConditioner(num_classes=3, n_stages=2, method="unshuffle"), PoolFirstStage(f=4))
    out = c({"segmentation": ids})["concat"]
    assert c.concat_channels == 3 * 16 and out.shape == (1, 48, 2, 2)
    back = torch.nn.functional.pixel_shuffle(out, 4)  # K x H x W one-hot again
    assert torch.equal(back.argmax(1), ids) and torch.equal(back.sum(1), torch.ones(1, 8, 8))
    blurred = SemanticMapConditioner(num_classes=3, n_stages=2)({"segmentation": ids})["concat"]
    assert float(blurred[0, 2].max()) < 0.5  # the paper's interpolation: the line is a faint trace
    mapped = SemanticMapConditioner(num_classes=3, n_stages=2, method="unshuffle", out_channels=6)
    assert mapped.concat_channels == 6 and mapped({"segmentation": ids})["concat"].shape == (1, 6, 2, 2)
    with pytest.raises(ConditionValueError, match=r"10x8 .* not divisible by f=4"):
        c({"segmentation": torch.zeros(1, 10, 8, dtype=torch.long)})


def test_semantic_map_is_the_rescaled_one_hot():
    c = SemanticMapConditioner(num_classes=3, n_stages=0)
    ids = torch.tensor([[[0, 2], [1, 1]]])
    out = c({"segmentation": ids})["concat"]
    assert c.input_kind("segmentation") == "segmentation" and c.concat_channels == 3
    assert out.tolist() == [[[[1, 0], [0, 0]], [[0, 0], [1, 1]], [[0, 1], [0, 0]]]]
    c = SemanticMapConditioner(num_classes=3, n_stages=1, method="area")
    out = c({"segmentation": ids})["concat"]
    assert out.shape == (1, 3, 1, 1) and out.flatten().tolist() == [0.25, 0.5, 0.25]


def test_semantic_map_sees_its_input_and_null_differs():
    c = SemanticMapConditioner(num_classes=5, n_stages=2, out_channels=4)
    a, b = {"segmentation": class_map(2, seed=1)}, {"segmentation": class_map(2, seed=2)}
    assert not torch.allclose(c(a)["concat"], c(b)["concat"])
    assert not torch.allclose(c(a)["concat"], c.unconditional(a)["concat"])


def test_a_twice_larger_map_gives_a_twice_larger_concat():
    c = bound(SemanticMapConditioner(num_classes=5, n_stages=2), PoolFirstStage(f=4))
    assert c({"segmentation": class_map(1, 16, 24)})["concat"].shape == (1, 5, 4, 6)
    assert c({"segmentation": class_map(1, 32, 48)})["concat"].shape == (1, 5, 8, 12)


def test_a_map_the_first_stage_cannot_tile_is_refused_not_cropped():
    """A 15x16 map (f=4) would come out of the halvings as a 3x4 latent, a 12x16 sample with
    the map's last rows dropped: refused, naming the size and f, for either method."""
    for method in ("bilinear", "unshuffle"):
        c = bound(SemanticMapConditioner(num_classes=5, n_stages=2, method=method), PoolFirstStage(f=4))
        with pytest.raises(ConditionValueError, match=r"a 15x16 batch\['segmentation'\] is not divisible by f=4"):
            c({"segmentation": class_map(1, 15, 16)})


def test_out_of_range_ids_name_value_k_and_sample():
    c = SemanticMapConditioner(num_classes=5, n_stages=0)
    ids = class_map(3)
    ids[1, 3, 4] = 7
    batch = {"segmentation": ids, "__key__": ["s0", "s1", "s2"], "__source__": {"segmentation": "maps/s1.png"}}
    with pytest.raises(ConditionValueError, match=r"class id 7 .*sample 1 \(key 's1', file 'maps/s1.png'\).*0\.\.4 \(num_classes=5\)"):
        c(batch)
    ids[1, 3, 4] = -1
    with pytest.raises(ValueError, match=r"class id -1 in batch\['segmentation'\] of sample 1 is outside"):
        c({"segmentation": ids})
    with pytest.raises(ConditionValueError, match="must hold integer class ids, got torch.float32"):
        c({"segmentation": ids.float()})


def test_semantic_map_with_n_stages_not_matching_f_says_what_to_set():
    c = bound(SemanticMapConditioner(num_classes=5, n_stages=2), PoolFirstStage(f=8))
    with pytest.raises(ConditionValueError, match=r"f=8; set conditioner.n_stages=3"):
        c({"segmentation": class_map(1)})


# -- low_res ----------------------------------------------------------------------------------


class TestLowResConformance(ConditionerConformance):
    def make_conditioner(self):
        return bound(LowResConditioner(factor=4, channels=3), PoolFirstStage(f=4))

    def make_batch(self, n):
        return {"lowres": images(n, h=8, w=8)}


class TestLowResResizedConformance(ConditionerConformance):
    def make_conditioner(self):
        return bound(LowResConditioner(factor=4, channels=1), PoolFirstStage(f=1, image_channels=1))

    def make_batch(self, n):
        return {"lowres": images(n, c=1, h=8, w=8)}


def test_low_res_concat_is_on_the_latent_grid():
    low = images(2, h=8, w=12)
    same = bound(LowResConditioner(factor=4), PoolFirstStage(f=4))
    assert torch.equal(same({"lowres": low})["concat"], low)  # f == factor: identity
    up = bound(LowResConditioner(factor=4), PoolFirstStage(f=2))
    out = up({"lowres": low})["concat"]
    assert out.shape == (2, 3, 16, 24)
    torch.testing.assert_close(out, F.interpolate(low, size=(16, 24), mode="bicubic"))
    down = bound(LowResConditioner(factor=2, method="bilinear"), PoolFirstStage(f=4))
    assert down({"lowres": low})["concat"].shape == (2, 3, 4, 6)


def test_low_res_sees_its_input_and_null_differs():
    c = bound(LowResConditioner(factor=4), PoolFirstStage(f=2))
    a, b = {"lowres": images(2, h=8, w=8, seed=1)}, {"lowres": images(2, h=8, w=8, seed=2)}
    assert not torch.allclose(c(a)["concat"], c(b)["concat"])
    null = c.unconditional(a)["concat"]
    assert null.abs().sum() == 0 and null.shape == c(a)["concat"].shape


def test_low_res_training_inputs_degrade_the_image():
    c = LowResConditioner(factor=4, channels=1)
    assert c.data_keys == ("image",) and c.input_keys == ("lowres",) and c.input_kind("lowres") == "image"
    x = images(3, c=1, h=32, w=32)
    batch = {"image": x, "label": torch.arange(3)}
    out = c.training_inputs(batch, torch.Generator().manual_seed(0))
    assert set(batch) == {"image", "label"}  # not mutated
    assert out["image"] is x and out["label"] is batch["label"]
    low = out["lowres"]
    assert low.shape == (3, 1, 8, 8) and low.min() >= -1 and low.max() <= 1
    expected = F.interpolate(x, size=(8, 8), mode="bicubic", antialias=True).clamp(-1, 1)
    torch.testing.assert_close(low, expected)
    torch.testing.assert_close(c.training_inputs(batch)["lowres"], low)  # reproducible
    flat = torch.full((1, 1, 32, 32), 0.5)  # antialiasing averages: a flat image stays flat
    torch.testing.assert_close(c.degrade(flat), torch.full((1, 1, 8, 8), 0.5))
    given = {"image": x, "lowres": torch.zeros(3, 1, 8, 8)}
    assert c.training_inputs(given)["lowres"] is given["lowres"]  # sampling users' input is kept


def test_low_res_errors():
    c = LowResConditioner(factor=4, channels=3)
    with pytest.raises(FirstStageNotBoundError, match=r"LowResConditioner.*bind_first_stage"):
        c({"lowres": images(1, h=8, w=8)})
    c.bind_first_stage(PoolFirstStage(f=8))
    with pytest.raises(ConditionValueError, match=r"5x8 batch\['lowres'\] upscaled by factor=4 is not divisible by .*f=8"):
        c({"lowres": images(1, h=5, w=8)})
    with pytest.raises(ConditionValueError, match=r"batch\['lowres'\] must be float images B×3×H×W.*\(1, 1, 8, 8\).*: "
                       r"conditioner\.channels=3 does not match its 1 channels$"):
        c({"lowres": images(1, c=1, h=8, w=8)})
    with pytest.raises(MissingConditionError, match=r"LowResConditioner reads batch key 'lowres'.*\['image'\]"):
        c({"image": images(1)})
    with pytest.raises(MissingConditionError, match=r"LowResConditioner reads batch key 'image'"):
        c.training_inputs({"label": [0]})
    with pytest.raises(ConditionValueError, match=r"image size 30x32 .* not divisible by factor=4"):
        c.training_inputs({"image": images(1, h=30, w=32)})


# -- inpaint ----------------------------------------------------------------------------------


def box_mask(n, h=16, w=16):
    mask = torch.zeros(n, 1, h, w)
    mask[:, :, 4:10, 2:12] = 1
    return mask


class TestInpaintConformance(ConditionerConformance):
    def make_conditioner(self):
        return bound(InpaintConditioner(), PoolFirstStage(f=4, latent_channels=4))

    def make_batch(self, n):
        return {"image": images(n), "mask": box_mask(n)}


def test_inpaint_concat_is_masked_latent_and_latent_mask():
    fs = PoolFirstStage(f=4, latent_channels=4)
    c = bound(InpaintConditioner(), fs)
    assert c.concat_channels == 5 and c.data_keys == ("image",)
    assert c.input_kinds == {"image": "image", "mask": "mask"}
    x, mask = images(2), box_mask(2)
    out = c({"image": x, "mask": mask})["concat"]
    assert out.shape == (2, 5, 4, 4)
    torch.testing.assert_close(out[:, :4], fs.encode(x * (1 - mask)))
    # the box covers rows 4..9, cols 2..11: every 4×4 cell touching it is "fill"
    assert out[0, 4].tolist() == [[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert "first_stage" not in str(list(c.state_dict())) and not list(c.parameters())
    assert not out.requires_grad  # the frozen first stage runs under no_grad


class TestInpaintPaperConformance(TestInpaintConformance):
    def make_conditioner(self):
        return bound(InpaintConditioner(style="paper"), PoolFirstStage(f=4, latent_channels=4))


def test_inpaint_paper_style_is_the_condition_of_the_papers_inpaint_script():
    """``style="paper"`` builds what CompVis/latent-diffusion's scripts/inpaint.py hands its
    model, written out here from that script: image and mask in [0, 1], the masked image
    ``(1 - mask) * image``, all three mapped by ``x * 2 - 1``, the masked image encoded and
    the mask resized to the latent grid with ``F.interpolate`` (nearest), no scale factor."""
    fs = PoolFirstStage(f=4, latent_channels=4)
    c = bound(InpaintConditioner(style="paper"), fs)
    assert c.concat_channels == 5
    image01 = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0)) / 255.0
    mask = box_mask(2)  # rows 4..9, cols 2..11: not aligned with the 4x4 cells
    masked_image = (1 - mask) * image01
    image, mask_pm, masked_image = image01 * 2.0 - 1.0, mask * 2.0 - 1.0, masked_image * 2.0 - 1.0
    with torch.no_grad():
        paper_c = fs.encode(masked_image)
    paper_cc = F.interpolate(mask_pm, size=paper_c.shape[-2:])
    expected = torch.cat((paper_c, paper_cc), dim=1)
    out = c({"image": image, "mask": mask})["concat"]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # nearest takes each cell's top-left pixel (rows 4, 8; cols 4, 8), max-pooling any pixel
    assert out[0, 4].tolist() == [[-1, -1, -1, -1], [-1, 1, 1, -1], [-1, 1, 1, -1], [-1, -1, -1, -1]]
    ldmkit_style = bound(InpaintConditioner(), fs)({"image": image, "mask": mask})["concat"]
    assert not torch.equal(ldmkit_style[:, :4], out[:, :4])  # the hole is black, not mid-gray
    assert c.latent_mask(mask).tolist() == bound(InpaintConditioner(), fs).latent_mask(mask).tolist()


def test_inpaint_style_is_checked():
    assert InpaintConditioner().style == "ldmkit"  # saved configs without the key keep today's condition
    with pytest.raises(ValueError, match=r"unknown inpaint style 'compvis'; expected one of \('ldmkit', 'paper'\)"):
        InpaintConditioner(style="compvis")


def test_latent_mask_never_lets_fill_pixels_into_a_keep_cell():
    c = bound(InpaintConditioner(), PoolFirstStage(f=4))
    masks = c.random_masks(8, 32, 32, torch.Generator().manual_seed(3))
    masks[0, 0, 5, 7] = 1  # a single fill pixel marks its whole cell
    latent = c.latent_mask(masks)
    assert latent[0, 0, 1, 1] == 1
    upsampled = latent.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)
    assert (upsampled >= masks).all()  # keep (0) cells hold no fill pixel
    assert ((upsampled == 1) & (masks == 0)).any()  # and fill is the superset, not equality


def test_inpaint_sees_its_input_and_null_differs():
    c = bound(InpaintConditioner(), PoolFirstStage())
    a = {"image": images(2, seed=1), "mask": box_mask(2)}
    b = {"image": images(2, seed=2), "mask": box_mask(2)}
    assert not torch.allclose(c(a)["concat"], c(b)["concat"])
    shifted = {"image": a["image"], "mask": box_mask(2).roll(6, dims=-1)}
    assert not torch.allclose(c(a)["concat"], c(shifted)["concat"])
    null = c.unconditional(a)["concat"]
    assert null.abs().sum() == 0 and null.shape == c(a)["concat"].shape


def test_inpaint_fill_pixels_do_not_reach_the_condition():
    c = bound(InpaintConditioner(), PoolFirstStage())
    x, mask = images(1), box_mask(1)
    other = torch.where(mask.bool(), images(1, seed=9), x)  # differs only inside the fill box
    torch.testing.assert_close(c({"image": x, "mask": mask})["concat"], c({"image": other, "mask": mask})["concat"])


def test_inpaint_training_masks_are_random_boxes():
    c = InpaintConditioner(min_box=0.25, max_box=0.5)
    x = images(16, h=32, w=24)
    batch = {"image": x}
    out = c.training_inputs(batch, torch.Generator().manual_seed(0))
    assert set(batch) == {"image"} and out["image"] is x
    mask = out["mask"]
    assert mask.shape == (16, 1, 32, 24) and mask.dtype == x.dtype
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    rows, cols = mask.amax(dim=-1)[:, 0], mask.amax(dim=-2)[:, 0]  # B×H, B×W: the box's extent
    heights, widths = rows.sum(-1), cols.sum(-1)
    assert ((heights >= 8) & (heights <= 16)).all() and ((widths >= 6) & (widths <= 12)).all()
    assert (mask.sum((1, 2, 3)) == heights * widths).all()  # one solid rectangle
    assert len({tuple(m.nonzero()[0].tolist()) for m in mask}) > 1  # boxes vary per sample
    again = c.training_inputs(batch, torch.Generator().manual_seed(0))["mask"]
    assert torch.equal(again, mask)
    assert not torch.equal(c.training_inputs(batch, torch.Generator().manual_seed(1))["mask"], mask)
    given = {"image": x, "mask": box_mask(16, 32, 24)}
    assert c.training_inputs(given)["mask"] is given["mask"]


def test_inpaint_errors():
    c = InpaintConditioner()
    batch = {"image": images(2), "mask": box_mask(2)}
    with pytest.raises(FirstStageNotBoundError, match=r"InpaintConditioner.*bind_first_stage"):
        c(batch)
    c.bind_first_stage(PoolFirstStage())
    with pytest.raises(ConditionValueError, match=r"batch\['mask'\] has shape \(2, 1, 8, 8\), but batch\['image'\] has shape \(2, 3, 16, 16\)"):
        c({"image": images(2), "mask": box_mask(2, 8, 8)})
    with pytest.raises(ConditionValueError, match=r"batch\['mask'\] \(shape \(2, 1, 16, 16\)\) must hold only 0 .*and 1"):
        c({"image": images(2), "mask": box_mask(2) * 0.5})
    with pytest.raises(MissingConditionError, match=r"InpaintConditioner reads batch key 'mask'"):
        c({"image": images(2)})
    assert c({"image": images(2), "mask": box_mask(2)[:, 0].bool()})["concat"].shape == (2, 5, 4, 4)
    with pytest.raises(ValueError, match="min_box <= max_box"):
        InpaintConditioner(min_box=0.7, max_box=0.6)


def test_inpaint_with_the_real_kl_first_stage():
    from ldmkit_autoencoders.kl import KLAutoencoder

    fs = KLAutoencoder(latent_channels=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4,
                       resolution=32, encode_mode="mode").eval()
    c = bound(InpaintConditioner(), fs)
    assert c.concat_channels == fs.latent_channels + 1 == 5
    x = images(2, h=32, w=32)
    batch = c.training_inputs({"image": x}, torch.Generator().manual_seed(0))
    out = c(batch)["concat"]
    assert out.shape == (2, 5, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(out[:, :4], fs.encode(x * (1 - batch["mask"])))
    assert not any(k.startswith("_first_stage") for k in c.state_dict())


# -- registration and configs -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "cls"), [("semantic_map", SemanticMapConditioner),
                                           ("low_res", LowResConditioner),
                                           ("inpaint", InpaintConditioner)])
def test_registered_and_config_builds(name, cls):
    assert get_registry().get("conditioner", name).factory is cls
    assert yaml.safe_load((CONF / f"{name}.yaml").read_text())["name"] == name
    cfg = OmegaConf.to_container(compose_config([f"conditioner={name}"]).conditioner, resolve=True)
    assert cfg.pop("name") == name and cfg.pop("drop_rate") == 0.0
    assert isinstance(cls(**cfg), cls)


def test_a_low_res_channel_count_the_first_stage_does_not_take_is_one_line():
    """conditioner.channels=1 beside a 3-channel first stage composed, and every sample then
    failed; the default follows data.channels."""
    from ldmkit.errors import ConfigError

    assert build_pipeline(compose_config(["conditioner=low_res", "first_stage=kl_tiny"])).conditioner.channels == 3
    with pytest.raises(ConfigError, match=r"^conditioner.channels=1, but the first stage takes 3-channel images: .*"
                                          r"set conditioner.channels=3$"):
        build_pipeline(compose_config(["conditioner=low_res", "first_stage=kl_tiny", "conditioner.channels=1"]))


@pytest.mark.parametrize(("name", "concat"), [("semantic_map", 8), ("inpaint", 3 + 1)])
def test_composes_with_a_tiny_first_stage(name, concat):
    pipe = build_pipeline(compose_config([f"conditioner={name}", "first_stage=kl_tiny"]))
    assert pipe.conditioner.concat_channels == concat
    assert pipe.denoiser.in_channels == pipe.first_stage.latent_channels + concat


def test_inpaint_encodes_where_the_first_stage_lives_and_returns_its_own_dtype():
    fs = PoolFirstStage()  # float32, stays put: the conditioner does not own it
    c = bound(InpaintConditioner(), fs).double()
    assert fs.proj.weight.dtype == torch.float32
    out = c({"image": images(1), "mask": box_mask(1)})["concat"]
    assert out.dtype == torch.float64


@pytest.mark.parametrize("scale", [255.0, float("nan")], ids=["0..255", "nan"])
def test_images_outside_minus_one_to_one_are_refused_not_conditioned_on(scale):
    """An image given in 0..255 (or holding NaN) would be concatenated as it is, the model
    conditioned on nothing like what it trained on: refused, naming the key and the range, as
    ``init_image`` is."""
    x = (images(1, h=8, w=8) + 1) * scale
    low = bound(LowResConditioner(factor=4, channels=3), PoolFirstStage(f=4))
    with pytest.raises(ConditionValueError, match=r"batch\['lowres'\] values must be in \[-1, 1\], got .*x \* 2 - 1"):
        low({"lowres": x})
    inpaint = bound(InpaintConditioner(), PoolFirstStage(f=4))
    with pytest.raises(ConditionValueError, match=r"batch\['image'\] values must be in \[-1, 1\], got "):
        inpaint({"image": x, "mask": box_mask(1, 8, 8)})
