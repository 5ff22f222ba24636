"""Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1).

In the variables ``x = z_t / sqrt(a_t)`` and ``sigma_t = sqrt((1 - a_t) / a_t)`` the ODE is
``dx / dsigma = eps(z_t, t)``; a Heun step averages the slope at both ends of the step.
"""

from __future__ import annotations

import torch

from ldmkit.interfaces import Sampler


class HeunSampler(Sampler):
    """Deterministic Heun sampler; ``steps`` steps cost ``2 * steps - 1`` denoiser calls."""

    def sample(self, denoise, schedule, noise, *, steps=None, generator=None, callback=None,
               mask=None, known=None):
        if mask is not None:
            raise ValueError("HeunSampler does not support inpainting masks")
        timesteps = schedule.spaced_timesteps(steps or self.steps).tolist()
        alpha_bar = schedule.alphas_cumprod.to(noise.device, noise.dtype)
        sigmas = ((1 - alpha_bar[timesteps]) / alpha_bar[timesteps]).sqrt().tolist() + [0.0]
        batch = noise.shape[0]

        def slope(x, i):
            # eps at the discrete step i, evaluated on z_t = x * sqrt(a_t)
            a = alpha_bar[timesteps[i]]
            t = torch.full((batch,), timesteps[i], device=x.device, dtype=torch.long)
            return denoise(x * a.sqrt(), t)

        x = noise / alpha_bar[timesteps[0]].sqrt()
        for i in range(len(timesteps)):
            d = slope(x, i)
            x_next = x + (sigmas[i + 1] - sigmas[i]) * d
            if sigmas[i + 1] > 0:  # the corrector; the last step to sigma 0 is plain Euler
                x_next = x + (sigmas[i + 1] - sigmas[i]) * (d + slope(x_next, i + 1)) / 2
            x = x_next
            if callback is not None:
                a_next = alpha_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else alpha_bar.new_ones(())
                callback({"i": i, "t": timesteps[i], "z": x * a_next.sqrt(), "x0": x - sigmas[i + 1] * d})
        return x
