"""Noise schedules and the forward process q(z_t | z_0) of DDPM (Ho et al. 2020).

``alpha_bar_t = prod_{s<=t} (1 - beta_s)`` and
``z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps``. Timesteps are integers
in ``[0, T)``; index ``-1`` means "before the first step" (``alpha_bar = 1``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ldmkit.diffusion.timesteps import timestep_pairs

# diffusers' names for the same schedules are accepted as aliases
BETA_SCHEDULE_ALIASES = {
    "linear": "linear",
    "scaled_linear": "linear",  # diffusers: linspace of sqrt, squared == the paper's "linear"
    "sqrt_linear": "sqrt_linear",
    "cosine": "cosine",
    "squaredcos_cap_v2": "cosine",
}


def make_betas(
    kind: str = "linear",
    timesteps: int = 1000,
    *,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
    cosine_s: float = 8e-3,
) -> Tensor:
    """Beta schedule as float64.

    * ``linear`` (the LDM paper's): ``linspace(sqrt(start), sqrt(end), T) ** 2``;
    * ``sqrt_linear``: ``linspace(start, end, T)`` (DDPM's linear);
    * ``cosine``: Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999.
    """
    if kind not in BETA_SCHEDULE_ALIASES:
        raise ValueError(
            f"unknown beta schedule {kind!r}; expected one of {sorted(BETA_SCHEDULE_ALIASES)}"
        )
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    kind = BETA_SCHEDULE_ALIASES[kind]
    if kind != "cosine" and not (0 < linear_start < 1 and 0 < linear_end < 1):
        raise ValueError(
            "linear_start and linear_end must be in (0, 1) (the betas of the first and last steps), "
            f"got linear_start={linear_start}, linear_end={linear_end}"
        )
    if kind == "linear":
        return (
            torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
        )
    if kind == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alphas_cumprod = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=0.999)


class NoiseSchedule(nn.Module):
    """A discrete-time variance-preserving noise schedule.

    :param kind: ``linear`` (default, the paper's), ``sqrt_linear`` or ``cosine``
        (diffusers' ``scaled_linear`` and ``squaredcos_cap_v2`` are aliases).
    :param timesteps: T, the number of diffusion steps.
    """

    def __init__(
        self,
        *,
        kind: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        cosine_s: float = 8e-3,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.timesteps = timesteps
        self.linear_start, self.linear_end, self.cosine_s = linear_start, linear_end, cosine_s
        betas = make_betas(
            kind, timesteps, linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s
        )
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        # sampling divides by its sqrt in float32 (a meta-device build, for sizes only, has no values)
        if not alphas_cumprod.is_meta and not alphas_cumprod[-1] >= torch.finfo(torch.float32).tiny:
            raise ValueError(
                f"alphas_cumprod falls to {alphas_cumprod[-1].item():.3g} by t={timesteps}: no signal is left "
                "(float32 holds nothing below 1.2e-38); lower linear_start, linear_end or timesteps"
            )
        # float64 here, cast on use: sqrt(1 - a) near a = 1 loses digits in float32
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "timesteps": self.timesteps,
            "linear_start": self.linear_start,
            "linear_end": self.linear_end,
            "cosine_s": self.cosine_s,
        }

    # -- lookups --------------------------------------------------------------------
    def _gather(self, values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=values.device).long()
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        out = values[t].to(device=like.device, dtype=like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        """``alpha_bar_t`` broadcastable against ``like``; ``t = -1`` gives 1.

        A floating-point ``t`` (the sigma bridge's fractional timesteps) interpolates
        ``log sigma_t = log sqrt((1 - a_t) / a_t)`` linearly between its neighbours, the
        inverse of :meth:`ldmkit.diffusion.sampling.SigmaDenoiser.sigma_to_t`.
        """
        t = torch.as_tensor(t)
        if t.is_floating_point():
            values = torch.sigmoid(-2 * self.log_sigma(t))  # 1 / (1 + sigma^2)
            if values.ndim == 0:
                values = values.expand(like.shape[0])
            return values.to(device=like.device, dtype=like.dtype).reshape(
                -1, *([1] * (like.ndim - 1))
            )
        padded = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return self._gather(padded, torch.as_tensor(t, device=padded.device).long() + 1, like)

    def log_sigma(self, t: Tensor) -> Tensor:
        """``log sigma_t``, ``sigma_t = sqrt((1 - a_t) / a_t)``, at (fractional) timesteps ``t``
        in ``[0, T - 1]``, in the schedule's dtype and device: linear between the neighbouring
        integer timesteps (k-diffusion's ``DiscreteSchedule.t_to_sigma``)."""
        a = self.alphas_cumprod
        log_sigma = 0.5 * torch.log((1 - a) / a)
        tf = torch.as_tensor(t).to(device=a.device, dtype=a.dtype).clamp(0, self.timesteps - 1)
        low = tf.floor().long()
        w = tf - low
        return (1 - w) * log_sigma[low] + w * log_sigma[tf.ceil().long()]

    def alpha_bar_at(self, t: int, like: Tensor) -> Tensor:
        """Scalar ``alpha_bar_t`` for one integer timestep (``-1`` gives 1)."""
        value = 1.0 if t < 0 else float(self.alphas_cumprod[t])
        return torch.tensor(value, device=like.device, dtype=like.dtype)

    def spaced_timesteps(self, steps: int, spacing: str = "linspace") -> Tensor:
        """The timesteps a ``steps``-step sampler visits, descending (``spacing``: see
        :func:`ldmkit.diffusion.timesteps.timestep_pairs`; ``linspace`` ends at 0)."""
        return torch.tensor(
            [t for t, _ in timestep_pairs(self.timesteps, steps, spacing)], dtype=torch.long
        )

    # -- forward process ------------------------------------------------------------
    def q_sample(self, z0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw ``z_t ~ q(z_t | z_0)`` given the noise."""
        a = self.alpha_bar(t, z0)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    # -- parameterizations ----------------------------------------------------------
    def predict_x0(self, z_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        a = self.alpha_bar(t, z_t)
        return (z_t - (1 - a).sqrt() * eps) / a.sqrt()

    def predict_eps(self, z_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        a = self.alpha_bar(t, z_t)
        return (z_t - a.sqrt() * x0) / (1 - a).sqrt()

    def v_target(self, z0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``v = sqrt(a) eps - sqrt(1 - a) z_0`` (Salimans & Ho 2022)."""
        a = self.alpha_bar(t, z0)
        return a.sqrt() * noise - (1 - a).sqrt() * z0

    def eps_from_v(self, z_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        a = self.alpha_bar(t, z_t)
        return a.sqrt() * v + (1 - a).sqrt() * z_t

    def x0_from_v(self, z_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        a = self.alpha_bar(t, z_t)
        return a.sqrt() * z_t - (1 - a).sqrt() * v

    def to_eps(self, prediction: str, z_t: Tensor, t: Tensor, output: Tensor) -> Tensor:
        """Convert a denoiser output of the given parameterization to ``eps``."""
        if prediction == "eps":
            return output
        if prediction == "x0":
            return self.predict_eps(z_t, t, output)
        if prediction == "v":
            return self.eps_from_v(z_t, t, output)
        raise ValueError(f"unknown prediction {prediction!r}; expected one of eps, x0, v")

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, timesteps={self.timesteps}"
