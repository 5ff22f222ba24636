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


def test_refine_known_fits_the_kept_pixels_without_pasting_them():
    """``refine_known``: Adam steps on z_0 so that its decode matches the kept pixels. With a
    real (KL) decoder the kept region gets much closer to the image than the kept latents
    alone give; the generated box is still generated (not the image), and the conditioner's
    and the any-model (``mask`` + ``init_image``) paths both take it."""
    import ldmkit
    from ldmkit.errors import LdmkitError

    torch.manual_seed(0)
    pipe = ldmkit.compose(overrides=["conditioner=inpaint", "first_stage=kl_tiny", "first_stage.encode_mode=mode",
                                     "image_size=16", "sampler.steps=2"]).eval()
    with torch.no_grad():  # an image this (untrained) decoder can make: the fit has a target to reach
        image = pipe.decode(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2).clamp(-1, 1)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 3:9, 5:13] = 1
    keep = (mask == 0).expand_as(image)

    def kept_error(out):
        return float((out - image)[keep].square().mean())

    batch = {"image": image, "mask": mask}
    plain = pipe.sample(batch, seed=0)
    refined = pipe.sample(batch, seed=0, refine_known=100)
    assert kept_error(refined) < 0.7 * kept_error(plain)
    box = ~keep
    assert (refined - image)[box].abs().mean() > 0.5 * (plain - image)[box].abs().mean()  # not pasted back
    # latent cells whose pixels all lie in the box stay as sampled (Adam would otherwise move
    # them a full step on the faint gradient the decoder's reach gives them); the others move
    z0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    moved = pipe.refine_known(z0, image, mask, 5)
    interior = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    interior[..., 1, 2] = True  # pixels 4:8 x 8:12, inside the box 3:9 x 5:13
    torch.testing.assert_close(moved[interior.expand_as(z0)], z0[interior.expand_as(z0)], atol=0, rtol=0)
    assert bool(((moved - z0).abs() > 1e-3)[~interior.expand_as(z0)].float().mean() > 0.9)
    # with tile= it fits the tiled decode the output is made with (2x2 latent tiles here)
    tiled_out = pipe.sample(batch, seed=0, tile=2, tile_overlap=1)
    tiled_refined = pipe.sample(batch, seed=0, tile=2, tile_overlap=1, refine_known=100)
    assert kept_error(tiled_refined) < 0.7 * kept_error(tiled_out)
    fit_tiled = pipe.refine_known(z0, image, mask, 20, tile=2, tile_overlap=1)
    fit_plain = pipe.refine_known(z0, image, mask, 20)

    def tiled_kept_error(z):
        with torch.no_grad():
            return kept_error(pipe.decode(z, tile=2, tile_overlap=1))

    assert tiled_kept_error(fit_tiled) < tiled_kept_error(fit_plain)
    # any model: mask + init_image
    plain = pipe.sample(batch, init_image=image[:1], mask=mask[:1], seed=0, num_samples=2)
    refined = pipe.sample(batch, init_image=image[:1], mask=mask[:1], seed=0, num_samples=2, refine_known=100)
    first = (mask[:1] == 0).expand_as(image[:1])
    assert float((refined[:1] - image[:1])[first].square().mean()) < 0.7 * float((plain[:1] - image[:1])[first].square().mean())
    with pytest.raises(LdmkitError, match="refine_known must be an int >= 0"):
        pipe.sample(batch, refine_known=-1)
    unconditional = ldmkit.compose(overrides=["first_stage=identity", "image_size=8", "sampler.steps=1"])
    with pytest.raises(LdmkitError, match="refine_known needs a kept region"):
        unconditional.sample(num_samples=1, refine_known=5)


def test_refine_known_moves_each_sample_as_if_it_were_alone():
    """Before: the loss was divided by the kept pixels of the whole batch, so a sample's step
    depended on its batch mates' masks (through Adam's eps): 2.4e-4 apart after 10 steps (3e-4
    after one) where the docs promise batch independence up to kernel round-off; now 4e-6.
    (Over many steps Adam amplifies the round-off itself: the docs say so.)"""
    import ldmkit

    pipe = ldmkit.compose(overrides=["conditioner=inpaint", "first_stage=kl_tiny", "first_stage.encode_mode=mode",
                                     "image_size=16", "sampler.steps=2"]).eval()
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 2:14, 2:14] = 1  # sample 0 keeps a thin frame, sample 1 nearly everything
    mask[1, :, 6:8, 6:8] = 1
    z0 = torch.randn(2, 3, 4, 4, generator=gen)
    both = pipe.refine_known(z0, image, mask, 10)
    for i in range(2):
        alone = pipe.refine_known(z0[i : i + 1], image[i : i + 1], mask[i : i + 1], 10)
        assert float((both[i : i + 1] - alone).abs().max()) <= 2e-5, i


@pytest.mark.parametrize("sampler", [["sampler=euler_ancestral"], ["sampler=ddim", "sampler.eta=1.0"], ["sampler=ddpm"]],
                         ids=["euler_ancestral", "ddim_eta1", "ddpm"])
def test_a_mask_that_keeps_nothing_samples_what_plain_sampling_samples(sampler):
    """Before: the kept region's re-noising drew from each sample's generator at every step
    even where the mask kept nothing, so an ancestral sampler's later noise moved: an all-white
    mask (regenerate everything) at strength 1 did not give the plain sample of its seed. Now a
    sample that keeps nothing draws nothing extra, in a batch with one that keeps something too."""
    import ldmkit

    pipe = ldmkit.compose(overrides=["first_stage=identity", "image_size=8", "sampler.steps=4", *sampler]).eval()
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    mask = torch.ones(2, 1, 8, 8)
    mask[1, :, :, :4] = 0  # sample 1 keeps its left half
    plain = pipe.sample(num_samples=2, seed=0)
    masked = pipe.sample(init_image=image, mask=mask, num_samples=2, seed=0)
    torch.testing.assert_close(masked[0], plain[0], atol=1e-6, rtol=0)
    assert not torch.allclose(masked[1], plain[1], atol=1e-2)  # the kept half is kept
    torch.testing.assert_close(masked[1, :, :, :4], image[0, :, :, :4].clamp(-1, 1), atol=1e-5, rtol=0)


def test_an_inpainting_sample_is_its_seeds_alone_with_a_kl_first_stage_that_samples():
    """The masked image the inpainting conditioner encodes is the KL posterior's mean (the
    paper's ``get_learned_conditioning`` takes ``c.mode()``), not a draw from the global RNG:
    the same seed gives the same images, and sample i of seed s is sample 0 of seed s + i."""
    import ldmkit
    from ldmkit.testing import perturb_parameters

    pipe = ldmkit.compose(overrides=["conditioner=inpaint", "first_stage=kl_tiny", "image_size=16",
                                     "sampler.steps=2"]).eval()
    assert pipe.first_stage.regularizer.encode_mode == "sample"
    perturb_parameters(pipe.denoiser)  # an untrained UNet's zeroed output would ignore the condition
    image = torch.rand(3, 3, 16, 16) * 2 - 1
    mask = torch.zeros(3, 1, 16, 16)
    mask[:, :, 4:12, 2:10] = 1
    batch = {"image": image, "mask": mask}
    first = pipe.sample(batch, seed=5)
    torch.testing.assert_close(pipe.sample(batch, seed=5), first, atol=1e-5, rtol=0)
    alone = pipe.sample({"image": image[2:], "mask": mask[2:]}, seed=7)
    torch.testing.assert_close(alone, first[2:], atol=1e-4, rtol=0)


def test_a_size_the_spatial_condition_does_not_make_says_what_input_would():
    """A 4x4 low-res image (factor 4) samples 16x16; asking for 32x32 names the inputs a
    32x32 image needs, a low-res one included (not "inputs of size 32x32", which for
    super-resolution is wrong by the factor)."""
    import ldmkit
    from ldmkit.sampling_request import SampleArgumentError

    pipe = ldmkit.compose(overrides=["conditioner=low_res", "conditioner.channels=3", "first_stage=kl_tiny",
                                     "image_size=16", "sampler.steps=1"]).eval()
    low = torch.zeros(1, 3, 4, 4)
    assert pipe.sample({"lowres": low}, seed=0).shape == (1, 3, 16, 16)
    with pytest.raises(SampleArgumentError, match=r"size 32x32 makes a 8x8 latent .* concat condition is 4x4: give "
                       r"inputs for a 32x32 image \(a map, mask or image of that size; a low-res image its factor "
                       r"times smaller\) or leave size out"):
        pipe.sample({"lowres": low}, seed=0, size=32)
