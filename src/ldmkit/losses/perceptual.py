"""LPIPS (Zhang et al. 2018) with the VGG16 trunk, loaded without touching the network.

The ``lpips`` package builds its trunk with ``torchvision.models.vgg16(pretrained=True)``,
which downloads ``vgg16-397923af.pth`` into torch hub's checkpoint folder when it is
missing. ldmkit never downloads at run time: it looks for that file itself, raises
:class:`MissingWeightsError` naming the file and the folder when it is absent, and
otherwise builds LPIPS with a randomly initialized trunk and copies the ImageNet weights
in. The learned linear heads ship inside the ``lpips`` package (``weights/v0.1/vgg.pth``)
and are always loaded for real.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ldmkit.errors import LdmkitError

VGG16_FILE = "vgg16-397923af.pth"
TRUNKS = ("pretrained", "random")


class MissingWeightsError(LdmkitError, FileNotFoundError):
    """Pretrained weights that ldmkit needs are not on disk (it never downloads them)."""


def torch_hub_checkpoints_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def vgg16_weights_path() -> Path:
    return torch_hub_checkpoints_dir() / VGG16_FILE


def require_vgg16_weights(
    purpose: str = "LPIPS", hint: str = "train without the perceptual term (trainer.loss.perceptual_weight=0)"
) -> Path:
    path = vgg16_weights_path()
    if not path.is_file():
        raise MissingWeightsError(
            f"{purpose} needs torchvision's ImageNet VGG16 weights, file {VGG16_FILE!r}, "
            f"which is looked for in the torch hub checkpoints folder {path.parent} "
            f"(torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it) and is not there. "
            f"ldmkit does not download weights: copy {VGG16_FILE} into that folder, or {hint}."
        )
    return path


class LPIPS(nn.Module):
    """Frozen LPIPS distance for images in [-1, 1]; grayscale inputs are repeated to RGB.

    The network is held outside the module tree: its weights come from disk, never from
    a checkpoint, so they are not in ``state_dict()`` (a checkpoint of a loss that uses
    LPIPS stays small) nor in ``parameters()``; ``.to()`` still moves them.

    ``trunk="random"`` keeps the VGG16 trunk at its random initialization: a test-only
    option (the distance is then not LPIPS), so it warns.
    """

    def __init__(self, *, trunk: str = "pretrained") -> None:
        super().__init__()
        if trunk not in TRUNKS:
            raise ValueError(f"unknown LPIPS trunk {trunk!r}; expected one of {TRUNKS}")
        import lpips

        weights = require_vgg16_weights() if trunk == "pretrained" else None
        if weights is None:
            warnings.warn(
                "LPIPS with a random VGG16 trunk (trunk='random') is for tests only: the "
                "distance it computes is not LPIPS",
                stacklevel=2,
            )
        with warnings.catch_warnings():
            # lpips passes torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            # pnet_rand=True: no download; pretrained=True: the linear heads from the package
            model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if weights is not None:
            load_vgg16_trunk(model.net, weights)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self._frozen = [model]

    @property
    def model(self) -> nn.Module:
        return self._frozen[0]

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        self._frozen[0]._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image distance, B×1×1×1."""
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"LPIPS compares RGB or grayscale images, got {x.shape[1]} channels")
        return self.model(x, y)


def load_vgg16_trunk(trunk: nn.Module, path: str | Path) -> None:
    """Copy torchvision VGG16 ``features.{i}`` weights into lpips' ``slice{k}.{i}`` layers."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapped = {}
    for name, _ in trunk.named_parameters():
        _slice, index, kind = name.split(".")
        key = f"features.{index}.{kind}"
        if key not in state:
            raise ValueError(f"{path} is not a torchvision VGG16 checkpoint: it lacks {key!r}")
        mapped[name] = state[key]
    trunk.load_state_dict(mapped, strict=True)
