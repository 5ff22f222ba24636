"""One autoencoder engine with a pluggable regularizer (the design of sgm's
``AutoencodingEngine``): KL-reg and VQ-reg models of Rombach et al. 2022 (Sec. 3.1) share
the encoder, decoder and the 1×1 ``quant_conv`` / ``post_quant_conv`` around the latent,
and differ only in the :class:`Regularizer` that sits between them.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import typing
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ldmkit.interfaces import FirstStage
from ldmkit_autoencoders.modules import ATTN_TYPES, Decoder, Encoder


class Regularizer(nn.Module, abc.ABC):
    """What turns the encoder's moments ``h`` into the latent, and back.

    ``moments_factor`` is how many latent-sized tensors ``h`` holds (2 for a Gaussian's
    mean and log-variance, 1 for a quantizer's input).
    """

    moments_factor: int = 1
    # how the core's autoencoder loss should reduce the reconstruction term so that it is
    # on the scale the regularizer's weight was tuned for ("sum": per image, "mean": per pixel)
    loss_reduction: str = "mean"

    @abc.abstractmethod
    def forward(self, h: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """Training: ``(latent fed to the decoder, weighted regularization loss, logs)``."""

    @abc.abstractmethod
    def latent(self, h: Tensor) -> Tensor:
        """The latent ``encode`` returns for moments ``h``."""

    def prepare_decode(self, z: Tensor) -> Tensor:
        """Map a latent (possibly produced by diffusion) to the decoder's input."""
        return z


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The encoder/decoder shape (the paper's ``ddconfig``), named once: every autoencoder
    class takes these as keyword arguments (``**arch``) and hands them on unchanged.

    ``z_channels`` is the encoder's output width (default: the latent's channels, as in
    every configuration of the paper); ``out_ch`` defaults to ``in_channels``."""

    z_channels: int | None = None
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    in_channels: int = 3
    out_ch: int | None = None
    dropout: float = 0.0
    norm_groups: int = 32
    attn_type: str = "vanilla"  # "none": no attention anywhere (the paper's vq-f4-noattn)

    @classmethod
    def parse(cls, owner: str, arch: dict[str, Any], defaults: dict[str, Any] | None = None) -> Architecture:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(arch) - names)
        if unknown:
            raise TypeError(
                f"{owner}() got unexpected keyword argument(s) {unknown}; the architecture "
                f"takes {sorted(names)}"
            )
        return cls(**{**(defaults or {}), **arch})


def with_architecture_signature(cls: type, defaults: dict[str, Any] | None = None) -> type:
    """Give ``cls`` (whose ``__init__`` takes ``**arch``) a signature that lists the
    :class:`Architecture` keywords with their types and defaults, so that ``help()``, config
    type checks and ``inspect.signature`` see every argument."""
    own = [
        p for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind is not p.VAR_KEYWORD
    ]
    hints = typing.get_type_hints(Architecture)
    defaults = defaults or {}
    arch = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY,
            default=defaults.get(f.name, f.default), annotation=hints[f.name],
        )
        for f in dataclasses.fields(Architecture)
    ]
    cls.__signature__ = inspect.Signature(own + arch)  # type: ignore[attr-defined]
    return cls


class AutoencodingEngine(FirstStage):
    """Encoder -> quant_conv -> regularizer -> post_quant_conv -> decoder.

    ``latent_channels`` is the paper's ``embed_dim`` (channels ``c`` of the latent the
    diffusion model sees); ``z_channels`` is the encoder's output width (defaults to
    ``latent_channels``, as in every configuration of the paper).
    """

    #: architecture defaults of this class that differ from :class:`Architecture`'s
    architecture_defaults: dict[str, Any] = {}

    def __init__(self, *, regularizer: Regularizer, latent_channels: int, **arch: Any) -> None:
        super().__init__()
        a = Architecture.parse(type(self).__name__, arch, self.architecture_defaults)
        z_channels, ch, in_channels, out_ch = a.z_channels, a.ch, a.in_channels, a.out_ch
        ch_mult, num_res_blocks, attn_resolutions = a.ch_mult, a.num_res_blocks, a.attn_resolutions
        resolution, dropout, norm_groups = a.resolution, a.dropout, a.norm_groups
        if a.attn_type not in ATTN_TYPES:
            raise ValueError(f"unknown attn_type {a.attn_type!r}; expected one of {ATTN_TYPES}")
        z_channels = latent_channels if z_channels is None else z_channels
        out_ch = in_channels if out_ch is None else out_ch
        for key, value in (("latent_channels", latent_channels), ("z_channels", z_channels),
                           ("ch", ch), ("in_channels", in_channels), ("out_ch", out_ch)):
            if int(value) < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        ch_mult, attn_resolutions = tuple(int(m) for m in ch_mult), tuple(int(r) for r in attn_resolutions)
        k = regularizer.moments_factor
        common = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                      attn_resolutions=attn_resolutions, z_channels=z_channels,
                      resolution=resolution, dropout=dropout, norm_groups=norm_groups,
                      attn_type=a.attn_type)
        self.encoder = Encoder(in_channels=in_channels, double_z=k == 2, **common)
        self.decoder = Decoder(out_ch=out_ch, **common)
        self.quant_conv = nn.Conv2d(k * z_channels, k * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, z_channels, 1)
        self.regularizer = regularizer
        self.latent_channels = int(latent_channels)
        self.image_channels = int(in_channels)
        self.out_channels = int(out_ch)
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        # the architecture, for exporters (see ldmkit_autoencoders.diffusers_compat)
        self.architecture = dict(common, in_channels=int(in_channels), out_ch=int(out_ch),
                                 latent_channels=int(latent_channels))
        self.loss_reduction = regularizer.loss_reduction

    def moments(self, x: Tensor) -> Tensor:
        """Encoder output after ``quant_conv``: the regularizer's input."""
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise ValueError(
                f"{type(self).__name__} expects images B×{self.image_channels}×H×W, "
                f"got shape {tuple(x.shape)}"
            )
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"image size {x.shape[-2]}x{x.shape[-1]} is not divisible by f={f}"
            )
        return self.quant_conv(self.encoder(x))

    def encode(self, x: Tensor) -> Tensor:
        return self.regularizer.latent(self.moments(x))

    def decode(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"{type(self).__name__} decodes latents B×{self.latent_channels}×h×w, "
                f"got shape {tuple(z.shape)}"
            )
        return self.decoder(self.post_quant_conv(self.regularizer.prepare_decode(z)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        z, reg_loss, logs = self.regularizer(self.moments(x))
        return self.decoder(self.post_quant_conv(z)), reg_loss, logs

    def last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight
