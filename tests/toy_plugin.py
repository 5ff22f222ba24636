"""A tiny, complete plugin used by the core tests (independent of first-party plugins)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ldmkit
from ldmkit.interfaces import Conditioner, Denoiser, FirstStage, Sampler

CONF = Path(__file__).parent / "toy_conf"


class ToyFirstStage(FirstStage):
    def __init__(self, *, latent_channels: int = 3, factor: int = 2):
        super().__init__()
        self.latent_channels, self.downsample_factor, self.image_channels = latent_channels, factor, 3
        self.proj = nn.Conv2d(3, latent_channels, 1)
        self.back = nn.Conv2d(latent_channels, 3, 1)

    def encode(self, x):
        return self.proj(F.avg_pool2d(x, self.downsample_factor))

    def decode(self, z):
        return self.back(F.interpolate(z, scale_factor=self.downsample_factor))


class ToyDenoiser(Denoiser):
    def __init__(self, *, in_channels: int = 3, out_channels: int = 3, context_dim: int | None = None,
                 vector_dim: int | None = None, prediction: str = "eps"):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.context_dim, self.vector_dim, self.prediction = context_dim, vector_dim, prediction
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(1, out_channels)
        self.ctx = nn.Linear(context_dim, out_channels) if context_dim else None
        self.vec = nn.Linear(vector_dim, out_channels) if vector_dim else None

    def forward(self, z_t, t, cond):
        h = self.conv(self.concat_condition(z_t, cond))
        h = h + self.time(t.float()[:, None] / 1000)[:, :, None, None]
        if self.ctx is not None and "crossattn" in cond:
            h = h + self.ctx(cond["crossattn"].mean(1))[:, :, None, None]
        if self.vec is not None and "vector" in cond:
            h = h + self.vec(cond["vector"])[:, :, None, None]
        return h


class ToyConditioner(Conditioner):
    input_keys = ("label",)

    def __init__(self, *, num_classes: int = 4, dim: int = 8, concat_channels: int = 0):
        super().__init__()
        self.crossattn_dim = dim
        self.concat_channels = concat_channels or None
        self.embedding = nn.Embedding(num_classes + 1, dim)
        self.null = num_classes

    def forward(self, batch):
        labels = torch.as_tensor(batch["label"])
        out = {"crossattn": self.embedding(labels)[:, None]}
        if self.concat_channels:
            out["concat"] = torch.ones(len(labels), self.concat_channels, 4, 4)
        return out

    def unconditional(self, batch):
        labels = torch.full((len(batch["label"]),), self.null)
        out = {"crossattn": self.embedding(labels)[:, None]}
        if self.concat_channels:
            out["concat"] = torch.zeros(len(labels), self.concat_channels, 4, 4)
        return out


class ToySampler(Sampler):
    """One deterministic DDIM step per timestep (enough for plumbing tests)."""

    def sample(self, denoise, schedule, noise, *, steps=None, generator=None, callback=None,
               mask=None, known=None):
        z = noise
        timesteps = schedule.spaced_timesteps(steps or self.steps).tolist()
        for i, t in enumerate(timesteps):
            tt = torch.full((z.shape[0],), t, dtype=torch.long)
            eps = denoise(z, tt)
            x0 = schedule.predict_x0(z, tt, eps)
            prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            a = schedule.alpha_bar_at(prev, z)
            z = a.sqrt() * x0 + (1 - a).sqrt() * eps
            if callback:
                callback({"i": i, "t": t, "z": z, "x0": x0})
        return z


@ldmkit.hookimpl
def ldmkit_register_first_stages(register):
    register("toy_fs", ToyFirstStage)


@ldmkit.hookimpl
def ldmkit_register_denoisers(register):
    register("toy_denoiser", ToyDenoiser)


@ldmkit.hookimpl
def ldmkit_register_conditioners(register):
    register("toy_cond", ToyConditioner)


@ldmkit.hookimpl
def ldmkit_register_samplers(register):
    register("toy_sampler", ToySampler)


@ldmkit.hookimpl
def ldmkit_register_configs(register):
    register(CONF)
