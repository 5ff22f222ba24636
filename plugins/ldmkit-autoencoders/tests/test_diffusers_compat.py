"""Our models and diffusers' AutoencoderKL / VQModel compute the same function with the
same weights: an independent implementation of the paper's architecture."""

from __future__ import annotations

import pytest
import torch

from ldmkit.testing import perturb_parameters
from ldmkit_autoencoders.kl import KLAutoencoder
from ldmkit_autoencoders.vq import VQAutoencoder

pytest.importorskip("diffusers")

from ldmkit_autoencoders.diffusers_compat import to_diffusers  # noqa: E402

ARCH = dict(latent_channels=3, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
            resolution=32, norm_groups=8)


def _perturbed(model):
    perturb_parameters(model, std=0.05, seed=1)
    return model.eval()


def test_kl_matches_diffusers_autoencoder_kl():
    ours = _perturbed(KLAutoencoder(encode_mode="mode", **ARCH))
    theirs = to_diffusers(ours)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z_ours, z_theirs = ours.encode(x), theirs.encode(x).latent_dist.mode()
        torch.testing.assert_close(z_ours, z_theirs, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.decode(z_ours), theirs.decode(z_theirs).sample, atol=1e-4, rtol=0)


def test_vq_matches_diffusers_vqmodel():
    ours = _perturbed(VQAutoencoder(n_embed=32, **ARCH))
    theirs = to_diffusers(ours)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        h = ours.encode(x)
        torch.testing.assert_close(h, theirs.encode(x).latents, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.decode(h), theirs.decode(h).sample, atol=1e-4, rtol=0)
