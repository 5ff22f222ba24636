"""Pipeline.sample with spatial conditions: guidance needs a learned null condition, and an
inpainting conditioner's kept region is held fixed through the sampler's mask."""

import pytest
import torch


def test_guidance_without_a_learned_null_condition_warns():
    import ldmkit

    pipe = ldmkit.compose(overrides=["conditioner=semantic_map", "conditioner.n_stages=0", "first_stage=identity",
                                     "image_size=8", "sampler.steps=1"])
    ids = torch.zeros(1, 8, 8, dtype=torch.long)
    with pytest.warns(UserWarning, match=r"drop_rate=0\): its null condition was never trained"):
        pipe.sample({"segmentation": ids}, guidance_scale=2.0, seed=0)
    assert ldmkit.compose(overrides=["conditioner=class_label"]).conditioner.learns_null_condition


def test_inpainting_keeps_the_known_region_through_the_sampler_mask():
    """With an identity first stage the kept region comes back exactly; without keep_known the
    model regenerates it."""
    import ldmkit

    pipe = ldmkit.compose(overrides=["conditioner=inpaint", "first_stage=identity", "image_size=8",
                                     "sampler.steps=3"]).eval()
    image = torch.rand(2, 3, 8, 8) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 3:7] = 1
    batch = {"image": image, "mask": mask}
    out = pipe.sample(batch, seed=0)
    keep = (mask == 0).expand_as(image)
    torch.testing.assert_close(out[keep], image[keep].clamp(-1, 1), atol=1e-5, rtol=0)
    free = pipe.sample(batch, seed=0, keep_known=False)
    assert not torch.allclose(free[keep], image[keep], atol=1e-2)


def test_what_lies_under_the_mask_never_reaches_the_result():
    import ldmkit

    pipe = ldmkit.compose(overrides=["conditioner=inpaint", "first_stage=kl_tiny", "first_stage.encode_mode=mode", "image_size=16",
                                     "sampler.steps=2"]).eval()
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    other = torch.where(mask.bool(), torch.rand_like(image), image)  # differs only under the mask
    a = pipe.sample({"image": image, "mask": mask}, seed=0)
    b = pipe.sample({"image": other, "mask": mask}, seed=0)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
