"""PatchGAN discriminator (Isola et al. 2017, pix2pix) as used by Esser et al. 2021 and
Rombach et al. 2022 for the first stage's adversarial term: it classifies overlapping
patches, so it judges local realism (texture) while L1 + LPIPS handle the rest."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

DISC_LOSSES = ("hinge", "vanilla")


class PatchDiscriminator(nn.Module):
    """``num_layers`` stride-2 4×4 convs (BatchNorm + LeakyReLU(0.2) after all but the
    first), then two stride-1 convs down to one logit per patch."""

    def __init__(self, *, in_channels: int = 3, ndf: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        for name, value in (("disc_in_channels", in_channels), ("disc_ndf", ndf), ("disc_num_layers", num_layers)):
            if value < 1:  # named as trainer.loss calls them
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_layers = num_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**num_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, 1, 1),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)

    @property
    def min_image_size(self) -> int:
        """The smallest square image every conv of it can read (24 px at ``num_layers=3``):
        each stride-2 conv halves the size and the two 4×4 stride-1 convs need 3 px left."""
        convs = [m for m in self.main if isinstance(m, nn.Conv2d)]

        def fits(size: int) -> bool:
            for conv in convs:
                (k, _), (s, _), (p, _) = conv.kernel_size, conv.stride, conv.padding
                if size + 2 * p < k:
                    return False
                size = (size + 2 * p - k) // s + 1
            return True

        return next(size for size in range(1, 1 << 20) if fits(size))


def _init_weights(module: nn.Module) -> None:
    # DCGAN initialization, as in pix2pix and taming
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def discriminator_loss_fn(name: str):
    if name == "hinge":
        return hinge_d_loss
    if name == "vanilla":
        return vanilla_d_loss
    raise ValueError(f"unknown disc_loss {name!r}; expected one of {DISC_LOSSES}")
