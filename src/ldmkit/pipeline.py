"""The assembled latent diffusion model: first stage, conditioner, denoiser, sampler and
noise schedule, with sampling and one-folder checkpoints."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ldmkit.diffusion.guidance import ClassifierFreeGuidance
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.interfaces import Conditioner, Denoiser, FirstStage, Sampler
from ldmkit.io import atomic_write, atomic_write_text

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


class Pipeline(nn.Module):
    """A latent diffusion model ready to sample.

    Build it with :func:`ldmkit.compose` or from objects directly::

        pipe = Pipeline(first_stage=fs, denoiser=unet, conditioner=cond,
                        sampler=DDIM(steps=50), schedule=NoiseSchedule())
        images = pipe.sample({"label": [0, 1, 2]}, guidance_scale=3.0, seed=0)
    """

    def __init__(
        self,
        *,
        first_stage: FirstStage,
        denoiser: Denoiser,
        conditioner: Conditioner,
        sampler: Sampler,
        schedule: NoiseSchedule | None = None,
        scale_factor: float = 1.0,
        image_size: int | None = None,
        config: DictConfig | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.first_stage = first_stage
        self.denoiser = denoiser
        self.conditioner = conditioner
        self.sampler = sampler
        self.schedule = schedule if schedule is not None else NoiseSchedule()
        # a buffer so that it travels with the weights (scale_by_std sets it from data)
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self.image_size = image_size
        self.config = OmegaConf.create(config) if config is not None else None

    # -- latents ----------------------------------------------------------------------
    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> scaled latents (what the denoiser sees)."""
        return self.first_stage.encode(images) * self.scale_factor

    def decode(self, latents: Tensor) -> Tensor:
        return self.first_stage.decode(latents / self.scale_factor)

    # -- the model the sampler calls ---------------------------------------------------
    def eps_model(self) -> Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]:
        """``(z_t, t, cond) -> eps`` whatever the denoiser predicts."""
        prediction = self.denoiser.prediction

        def model(z_t: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
            return self.schedule.to_eps(prediction, z_t, t, self.denoiser(z_t, t, cond))

        return model

    def _batch_size(self, batch: Mapping[str, Any], num_samples: int | None) -> int:
        keys = self.conditioner.input_keys
        for key in keys:
            self.conditioner.read(batch, key)  # a missing key names the conditioner and the key
        if not keys:
            return 1 if num_samples is None else num_samples
        sizes = {key: len(batch[key]) for key in keys}
        n = sizes[keys[0]]
        if any(size != n for size in sizes.values()):
            raise ValueError(f"the condition inputs hold different numbers of samples: {sizes}")
        if num_samples is not None and num_samples != n:
            raise ValueError(f"num_samples={num_samples} but the batch holds {n} conditions (key {keys[0]!r})")
        return n

    def _latent_size(self, image_size: int | tuple[int, int] | None, cond: Mapping[str, Tensor]) -> tuple[int, int]:
        """The latent grid: from ``image_size`` (else the pipeline's), or from a ``concat``
        condition's grid when no size is given (a 2x semantic map samples at 2x)."""
        f = self.first_stage.downsample_factor
        concat = cond.get("concat")
        if image_size is None and concat is not None:
            return tuple(concat.shape[-2:])
        size = image_size or self.image_size
        if size is None:
            raise ValueError("image_size is unknown: pass image_size= or set it in the config")
        h, w = (size, size) if isinstance(size, int) else size
        grid = tuple(self.first_stage.latent_shape(h, w)[1:])
        if concat is not None and tuple(concat.shape[-2:]) != grid:
            raise ValueError(
                f"image_size {h}x{w} makes a {grid[0]}x{grid[1]} latent (f={f}), but the conditioner's "
                f"concat condition is {concat.shape[-2]}x{concat.shape[-1]}: give inputs of size "
                f"{h}x{w} or leave image_size out to follow them"
            )
        return grid

    def _known_latents(self, batch: Mapping[str, Any]) -> tuple[Tensor | None, Tensor | None]:
        """The conditioner's region to keep as the sampler's ``(mask, known)`` on the latent
        grid: a latent cell is generated if any of its pixels is. The known latents encode
        the *masked* image, so nothing of what lies under the mask reaches the result."""
        region = self.conditioner.known_region(batch)
        if region is None:
            return None, None
        image, mask = region
        device = self.scale_factor.device
        mask = mask.float().to(device)
        f = self.first_stage.downsample_factor
        latent_mask = torch.nn.functional.max_pool2d(mask, f, f) if f > 1 else mask
        return latent_mask, self.encode(image.to(device) * (1 - mask))

    @torch.no_grad()
    def sample(
        self,
        batch: Mapping[str, Any] | None = None,
        *,
        num_samples: int | None = None,
        steps: int | None = None,
        guidance_scale: float = 1.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        image_size: int | tuple[int, int] | None = None,
        mask: Tensor | None = None,
        known: Tensor | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        return_latents: bool = False,
        keep_known: bool = True,
    ) -> Tensor:
        """Sample images in [-1, 1] (B×C×H×W); ``return_latents`` gives z_0 instead.

        :param batch: the conditioner's inputs, keyed as its ``input_keys`` (e.g.
            ``{"label": [3, 7]}``, ``{"caption": ["a red apple"]}``,
            ``{"segmentation": ids}``); None for an unconditional model.
        :param guidance_scale: classifier-free guidance scale (1 = no guidance).
        :param seed: seeds a fresh CPU generator for the starting noise (and the sampler).
        :param image_size: the output size; by default the pipeline's, or, for spatial
            conditions (``concat``), the size their inputs give.
        :param keep_known: for an inpainting conditioner (``Conditioner.known_region``) and a
            sampler that supports masks: hold the kept region's latents fixed, so it ends as
            the first stage's reconstruction of the input (``mask``/``known`` given here win).
        """
        batch = dict(batch or {})
        n = self._batch_size(batch, num_samples)
        device = self.scale_factor.device
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        cond = self.conditioner(batch) if self.conditioner.input_keys else {}
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        if noise is None:
            shape = (n, self.first_stage.latent_channels, *self._latent_size(image_size, cond))
            noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        if keep_known and mask is None and known is None and self.sampler.supports_mask:
            mask, known = self._known_latents(batch)
        if mask is not None and not self.sampler.supports_mask:
            raise ValueError(f"sampler {type(self.sampler).__name__} does not support inpainting masks")
        if guidance_scale != 1.0 and cond:
            if not self.conditioner.learns_null_condition:
                warnings.warn(
                    f"guidance_scale={guidance_scale} with conditioner {type(self.conditioner).__name__}, "
                    "which was configured without condition dropout (drop_rate=0): its null condition "
                    "was never trained, so guidance extrapolates from an untrained score",
                    stacklevel=2,
                )
            uncond = self.conditioner.unconditional(batch)
            denoise = ClassifierFreeGuidance(self.eps_model(), cond, uncond, guidance_scale)
        else:
            model = self.eps_model()

            def denoise(z_t: Tensor, t: Tensor) -> Tensor:
                return model(z_t, t, cond)

        z0 = self.sampler.sample(
            denoise,
            self.schedule,
            noise,
            steps=steps,
            generator=generator,
            callback=callback,
            mask=mask,
            known=known,
        )
        if return_latents:
            return z0
        return self.decode(z0).clamp(-1, 1)

    # -- checkpoints --------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and the resolved ``config.yaml`` into ``directory``.

        Each file is replaced atomically: a crash leaves the previous checkpoint intact.
        """
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.config is None:
            raise ValueError(
                "this Pipeline was built from objects without a config; saving needs the config "
                "that rebuilds it (build it with ldmkit.compose, or pass config=)"
            )
        atomic_write(directory / WEIGHTS_FILE, lambda p: save_model(self, str(p)))
        atomic_write_text(directory / CONFIG_FILE, OmegaConf.to_yaml(self.config, resolve=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> Pipeline:
        """Rebuild a pipeline saved with :meth:`save` (names resolve through the registry;
        no code named in the checkpoint is executed)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        from ldmkit.config import build_pipeline

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint file missing: {path}")
        cfg = OmegaConf.load(config_path)
        pipeline = build_pipeline(cfg)
        try:
            missing, unexpected = load_model(pipeline, str(weights_path), strict=False, device=str(device))
        except RuntimeError as err:  # shape mismatches
            raise ValueError(
                f"checkpoint {weights_path} does not match the model built from {config_path}: {err}"
            ) from err
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"cannot read checkpoint weights {weights_path}: {err}") from err
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {weights_path} does not match the model built from {config_path}: "
                f"missing keys {sorted(missing)[:10]}, unexpected keys {sorted(unexpected)[:10]}"
            )
        return pipeline.to(device)


def image_grid_rows(n: int) -> int:
    """Images per row for a roughly square grid."""
    return max(1, math.ceil(math.sqrt(n)))
