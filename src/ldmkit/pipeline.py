"""The assembled latent diffusion model: first stage, conditioner, denoiser, sampler and
noise schedule, with sampling and one-folder checkpoints."""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from ldmkit import devices, frozen, masks
from ldmkit import precision as _precision
from ldmkit.assembly import pipeline_parts
from ldmkit.compiling import compile_module
from ldmkit.config import compose_config, load_saved_config
from ldmkit.diffusion.guidance import ClassifierFreeGuidance
from ldmkit.diffusion.sampling import GeneratorArg, randn_like, sample_generators, split_generator
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.errors import ConfigError, LdmkitError
from ldmkit.interfaces import Conditioner, Denoiser, FirstStage, Sampler
from ldmkit.interop import compvis
from ldmkit.io import atomic_write, atomic_write_text
from ldmkit.safetensors_io import read_safetensors, read_safetensors_shapes
from ldmkit.tiling import check_tiling, tiled_decode, tiled_encode

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
    def encode(self, images: Tensor, *, tile: int | None = None, tile_overlap: int | None = None) -> Tensor:
        """Images in [-1, 1] -> scaled latents (what the denoiser sees). ``tile``: encode in
        overlapping tiles of that many *latent* pixels (:mod:`ldmkit.tiling`)."""
        if tile is None:
            return self.first_stage.encode(images) * self.scale_factor
        z = tiled_encode(
            self.first_stage.encode, images, factor=self.first_stage.downsample_factor, tile=tile, overlap=tile_overlap
        )
        return z * self.scale_factor

    def decode(self, latents: Tensor, *, tile: int | None = None, tile_overlap: int | None = None) -> Tensor:
        """Scaled latents -> images. ``tile``: decode overlapping ``tile``x``tile`` latent
        tiles one at a time and blend them (:mod:`ldmkit.tiling`): the memory of one tile,
        whatever the image size."""
        z = latents / self.scale_factor
        if tile is None:
            return self.first_stage.decode(z)
        return tiled_decode(
            self.first_stage.decode, z, factor=self.first_stage.downsample_factor, tile=tile, overlap=tile_overlap
        )

    # -- the model the sampler calls ---------------------------------------------------
    def eps_model(self, precision: str = "fp32") -> Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]:
        """``(z_t, t, cond) -> eps`` whatever the denoiser predicts; the denoiser runs in
        ``precision`` (a resolved one: fp32, bf16 or fp16), its output comes back float32."""
        prediction = self.denoiser.prediction
        device = self.scale_factor.device

        def model(z_t: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
            with _precision.autocast(precision, device):
                out = self.denoiser(z_t, t, cond)
            return self.schedule.to_eps(prediction, z_t, t, out.float())

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

    def _image_size(
        self, size: int | Sequence[int] | None, image_size: int | Sequence[int] | None
    ) -> tuple[int, int] | None:
        """``size`` (or its alias ``image_size``) as ``(h, w)``, checked against f."""
        if size is not None and image_size is not None and _pair(size) != _pair(image_size):
            raise SampleArgumentError(f"size={size} and image_size={image_size} disagree: give one of them")
        given = size if size is not None else image_size
        if given is None:
            return None
        h, w = _pair(given)
        f = self.first_stage.downsample_factor
        if h < 1 or w < 1 or h % f or w % f:
            raise SampleArgumentError(
                f"size {h}x{w} is not divisible by the first stage's downsample factor f={f}: "
                f"height and width must be positive multiples of {f}"
            )
        return h, w

    def _latent_size(self, image_size: int | tuple[int, int] | None, cond: Mapping[str, Tensor]) -> tuple[int, int]:
        """The latent grid: from ``image_size`` (else the pipeline's), or from a ``concat``
        condition's grid when no size is given (a 2x semantic map samples at 2x)."""
        f = self.first_stage.downsample_factor
        concat = cond.get("concat")
        if image_size is None and concat is not None:
            return tuple(concat.shape[-2:])
        size = image_size or self.image_size
        if size is None:
            raise ValueError("image_size is unknown: pass size= or set image_size in the config")
        h, w = _pair(size)
        grid = tuple(self.first_stage.latent_shape(h, w)[1:])
        if concat is not None and tuple(concat.shape[-2:]) != grid:
            raise ValueError(
                f"image_size {h}x{w} makes a {grid[0]}x{grid[1]} latent (f={f}), but the conditioner's "
                f"concat condition is {concat.shape[-2]}x{concat.shape[-1]}: give inputs of size "
                f"{h}x{w} or leave image_size out to follow them"
            )
        return grid

    def _check_memory(
        self,
        shape: tuple[int, ...],
        batch_size: int,
        cond: Mapping[str, Tensor],
        uncond: Mapping[str, Tensor] | None,
        images: Tensor | None,
        tiling: Mapping[str, Any],
        precision: str,
    ) -> None:
        """Refuse a call whose tensors cannot fit the device's free memory, before any is made
        (:class:`ldmkit.devices.InsufficientMemoryError`, naming the numbers): the latents and
        images of all ``shape[0]`` samples, plus the largest of one chunk's denoiser step (both
        halves under guidance), its decode and the init image's encode, counted by running
        them on the meta device. Calls whose images take less than 1/1024 of the free memory
        are let through unestimated (a first meta run costs a second, and activations of
        1024x the images are beyond the first stages and denoisers we know)."""
        device = self.scale_factor.device
        room = devices.available_memory(device)
        if room is None:
            return
        n, channels, h, w = shape
        f = self.first_stage.downsample_factor
        size = f"{h * f}x{w * f}"
        fixed = 4 * n * channels * h * w + 4 * n * self.first_stage.image_channels * h * w * f * f  # float32
        if fixed * 1024 <= room[0]:
            return
        rows = min(batch_size, n)
        largest, name = 0, ""
        if fixed <= room[0]:  # the rest of the estimate matters

            def meta(*dims: int, like: Tensor | None = None) -> Tensor:
                dtype = like.dtype if like is not None else torch.float32
                return torch.empty(dims, dtype=dtype, device="meta")

            def chunk(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
                return {k: meta(rows if v.shape[0] == n else v.shape[0], *v.shape[1:], like=v) for k, v in values.items()}

            context = chunk(cond)
            if uncond is not None:  # ClassifierFreeGuidance runs both halves as one batch
                context = {k: torch.cat([chunk(uncond)[k], v]) for k, v in context.items()}
            steps = 2 * rows if uncond is not None else rows
            tile = tiling.get("tile")
            th, tw = (h, w) if tile is None else (min(tile, h), min(tile, w))
            runs = {
                f"the denoiser's step on {steps} latent{'s' * (steps > 1)} of {channels}x{h}x{w}": lambda: self.denoiser(
                    meta(steps, channels, h, w), torch.zeros(steps, dtype=torch.long, device="meta"), context
                ),
                f"decoding {rows} latent{'s' * (rows > 1)} of {channels}x{th}x{tw}": lambda: self.first_stage.decode(
                    meta(rows, channels, th, tw)
                ),
            }
            if images is not None:
                b, c = images.shape[:2]
                runs[f"encoding the init image{'s' * (b > 1)}"] = lambda: self.first_stage.encode(
                    meta(b, c, th * f, tw * f)
                )
            for what, run in runs.items():
                peak = devices.meta_peak_bytes(self, run) or 0
                if what.startswith("the denoiser's") and precision in ("bf16", "fp16"):
                    peak //= 2  # activations in half precision
                if peak > largest:
                    largest, name = peak, what
        detail = f"the latents and images {devices.format_bytes(fixed)}" + (
            f", {name} {devices.format_bytes(largest)}" if name else ""
        )
        devices.check_fits(
            fixed + largest,
            device,
            f"sampling {n} image{'s' * (n != 1)} of {size}" + (f", {rows} at a time," if rows < n else ""),
            f" (estimated: {detail}); sample fewer images at once (batch_size), decode in tiles (tile) "
            "or choose a smaller size",
        )

    def _check_init_image(self, init_image: Tensor) -> Tensor:
        """``init_image`` as B×C×H×W float32 on the pipeline's device, in [-1, 1]."""
        x = torch.as_tensor(init_image)
        given = tuple(x.shape)
        if x.ndim == 3:
            x = x[None]
        channels = self.first_stage.image_channels
        if x.ndim != 4 or x.shape[1] != channels or not x.is_floating_point():
            raise SampleArgumentError(
                f"init_image must be float images B×{channels}×H×W (or {channels}×H×W) in [-1, 1] "
                f"for this first stage ({channels} channels), got shape {given} ({x.dtype})"
            )
        lo, hi = float(x.min()), float(x.max())
        if lo < -1 - 1e-4 or hi > 1 + 1e-4:
            raise SampleArgumentError(
                f"init_image values must be in [-1, 1], got [{lo:g}, {hi:g}] "
                f"(images in [0, 1] map to [-1, 1] as x * 2 - 1)"
            )
        return x.to(device=self.scale_factor.device, dtype=torch.float32)

    def _encode_init(self, images: Tensor, n: int, generator: GeneratorArg, tiling: Mapping[str, Any]) -> Tensor:
        """Latents of ``images`` (B = 1 or n) for n samples. A first stage that samples its
        posterior (KL, ``encode_mode=sample``) draws from the samples' generator(s): sample i's
        latent depends on its own generator only, whatever the batch."""
        if generator is None:
            z = self.encode(images, **tiling)
        elif isinstance(generator, torch.Generator):
            with _seeded_global_rng(_draw_seed(generator), images.device):
                z = self.encode(images, **tiling)
        else:
            parts = []
            for i, g in enumerate(generator):
                with _seeded_global_rng(_draw_seed(g), images.device):
                    parts.append(self.encode(images[i : i + 1] if images.shape[0] > 1 else images, **tiling))
            return torch.cat(parts)
        return z.expand(n, *z.shape[1:]) if z.shape[0] == 1 and n > 1 else z

    def _known_latents(
        self, batch: Mapping[str, Any], generator: GeneratorArg, tiling: Mapping[str, Any]
    ) -> tuple[Tensor | None, Tensor | None, tuple[Tensor, Tensor] | None]:
        """The conditioner's region to keep as the sampler's ``(mask, known)`` on the latent
        grid (:func:`ldmkit.masks.latent_mask`), and the pixels behind it ``(image, mask)``.
        The known latents encode the *masked* image, so nothing of what lies under the mask
        reaches the result."""
        region = self.conditioner.known_region(batch)
        if region is None:
            return None, None, None
        image, mask = region
        device = self.scale_factor.device
        mask = mask.float().to(device)
        masked = image.to(device) * (1 - mask)
        known = self._encode_init(masked, masked.shape[0], generator, tiling)
        return masks.latent_mask(mask, self.first_stage.downsample_factor), known, (masked, mask)

    def refine_known(
        self,
        z0: Tensor,
        image: Tensor,
        mask: Tensor,
        steps: int,
        *,
        lr: float = 0.1,
        tile: int | None = None,
        tile_overlap: int | None = None,
    ) -> Tensor:
        """``z0`` moved by ``steps`` Adam steps so that its decode matches ``image`` where
        ``mask`` is 0 (the kept pixels; mask 1 = generated): latent-space background
        preservation (as in Blended Latent Diffusion, Avrahami et al. 2023). The output stays
        a decode of one latent (no pasted pixels, no seam); cells whose pixels all lie in the
        generated region stay as sampled: only cells with at least one kept pixel move. (Adam
        scales every coordinate's step to about ``lr``, so the faint gradient an interior cell
        gets through the decoder's reach into kept pixels would otherwise move it as far as a
        cell on the kept side, and draw blotches inside the generated region.) ``tile``/
        ``tile_overlap``: fit the tiled decode (:meth:`decode`), the one the output is made
        with; the backward pass still holds every tile's activations, so tiling here bounds
        the forward's memory only."""
        f = self.first_stage.downsample_factor
        with torch.inference_mode(False), torch.enable_grad():
            # clones: tensors made under inference mode cannot take part in autograd
            z = z0.clone().requires_grad_(True)
            image, keep = image.clone(), (1 - mask).expand_as(image).clone()
            # a cell moves if one of its f x f pixels is kept (any kept weight > 0 in the block)
            movable = (masks.latent_mask(1 - mask.float(), f) > 0).to(z.dtype)
            count = float(keep.sum().clamp_min(1))
            optimizer = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                loss = ((self.decode(z, tile=tile, tile_overlap=tile_overlap) - image).square() * keep).sum() / count
                (grad,) = torch.autograd.grad(loss, z)  # no gradients into the first stage's weights
                z.grad = grad * movable
                optimizer.step()
            return z.detach().clone()

    @torch.inference_mode()
    def sample(
        self,
        batch: Mapping[str, Any] | None = None,
        *,
        num_samples: int | None = None,
        steps: int | None = None,
        guidance_scale: float = 1.0,
        seed: int | None = None,
        generator: GeneratorArg = None,
        noise: Tensor | None = None,
        size: int | Sequence[int] | None = None,
        image_size: int | Sequence[int] | None = None,
        init_image: Tensor | None = None,
        strength: float | None = None,
        mask: Tensor | None = None,
        latent_mask: Tensor | None = None,
        known: Tensor | None = None,
        batch_size: int | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        return_latents: bool = False,
        keep_known: bool = True,
        refine_known: int = 0,
        precision: str = "auto",
        tile: int | None = None,
        tile_overlap: int | None = None,
        compile: bool | str = False,
    ) -> Tensor:
        """Sample images in [-1, 1] (B×C×H×W); ``return_latents`` gives z_0 instead.

        :param batch: the conditioner's inputs, keyed as its ``input_keys`` (e.g.
            ``{"label": [3, 7]}``, ``{"caption": ["a red apple"]}``,
            ``{"segmentation": ids}``); None for an unconditional model.
        :param num_samples: how many images (unconditional models; with conditions it must
            match the batch). Default 1, or the number of ``init_image`` images.
        :param guidance_scale: classifier-free guidance scale (1 = no guidance).
        :param seed: sample ``i`` draws all of its noise (the start, every ancestral step, a
            KL first stage's posterior sample of ``init_image``) from its own generator
            seeded ``seed + i`` (:func:`ldmkit.diffusion.sample_generators`), so
            ``seed=s + 2`` reproduces sample 2 of ``seed=s`` and no result depends on the
            batch it was drawn in.
        :param generator: instead of ``seed``: one ``torch.Generator`` for the whole call (the
            result then depends on the batch) or a list of one per sample.
        :param noise: the starting noise z_T (B×c×h×w) instead of drawing it.
        :param size: the output size, ``(height, width)`` or an int for a square; any
            multiple of the first stage's factor f, larger than trained included (the
            paper's convolutional sampling, Sec. 4.3.2). By default the pipeline's, the
            ``init_image``'s, or, for spatial conditions (``concat``), the size their inputs
            give. ``image_size`` is an alias.
        :param init_image: img2img / SDEdit (Meng et al. 2022): images B×C×H×W in [-1, 1]
            (B = 1 is used for every sample), encoded by the first stage (times the scale
            factor, as in training), noised to the level where ``strength`` starts and
            denoised from there.
        :param strength: in (0, 1], default 1: the share of the sampler's steps run from the
            noised ``init_image``; ``int(steps * strength)`` steps run, so a strength that
            rounds to no step returns the first stage's reconstruction of ``init_image``.
        :param mask: inpainting with any model: a pixel mask over ``init_image`` (H×W,
            B×H×W or B×1×H×W, values in [0, 1]), **1 = repaint, 0 = keep** (white = repaint
            in a PNG). It goes to the latent grid by :func:`ldmkit.masks.latent_mask`; the
            kept region's latents are the init image's, re-noised and blended after every
            step and exact at the end. With ``strength`` < 1 the repainted region starts
            from the noised init image too; with 1 (the default) from pure noise.
        :param latent_mask: with ``known``: a mask already on the latent grid and the known
            clean latents, handed to the sampler as they are.
        :param batch_size: sample in chunks of at most this many (memory), with the same
            results as one batch when seeded with ``seed`` (up to float round-off).
        :param callback: called after every step with the sampler's dict (``i``, ``t``,
            ``z``, ``x0``) plus ``chunk`` and ``num_chunks``.
        :param keep_known: for an inpainting conditioner (``Conditioner.known_region``) and a
            sampler that supports masks: hold the kept region's latents fixed, so it ends as
            the first stage's reconstruction of the input (``mask``/``latent_mask`` win).
        :param refine_known: with a kept region (``mask`` + ``init_image``, or an inpainting
            conditioner's): after sampling, this many Adam steps on z_0 so that its decode
            matches the kept pixels (:meth:`refine_known`). Kept latents alone decode the kept
            region only approximately where it borders generated cells; this closes the gap
            without pasting pixels. 0 (default): off; 20-50 steps are typical.
        :param precision: ``auto`` (default: bf16 on CUDA and on CPUs with AVX512-BF16 or AMX,
            else fp32), ``fp32``, ``bf16`` or ``fp16`` for the conditioner and the denoiser
            (:mod:`ldmkit.precision`); the sampler's updates, the encode of ``init_image`` and
            the decode stay float32. Seeded results are independent of the batch size up to
            the round-off of the chosen precision (docs/performance.md).
        :param tile: decode (and encode ``init_image``/known regions) in overlapping tiles of
            this many latent pixels, blended over ``tile_overlap`` (default ``tile // 4``):
            the first stage's memory is then that of one tile, for outputs far larger than
            the training size (:mod:`ldmkit.tiling`; the denoiser still sees the whole latent).
        :param compile: ``True`` or an inductor mode: ``torch.compile`` the denoiser in place
            before sampling (:mod:`ldmkit.compiling`; it stays compiled for later calls). It
            pays on CUDA; the first call includes the compile time.
        """
        if not isinstance(refine_known, int) or isinstance(refine_known, bool) or refine_known < 0:
            raise SampleArgumentError(f"refine_known must be an int >= 0 (Adam steps), got {refine_known!r}")
        try:
            compile_module(self.denoiser, compile, device=self.scale_factor.device, what="the denoiser")
        except LdmkitError as err:
            raise SampleArgumentError(str(err)) from None
        if tile is not None:
            try:
                tile, tile_overlap = check_tiling(tile, tile_overlap)
            except ValueError as err:
                raise SampleArgumentError(str(err)) from None
        tiling = {"tile": tile, "tile_overlap": tile_overlap}  # tile None: encode/decode whole
        batch = dict(batch or {})
        device = self.scale_factor.device
        images = self._check_init_image(init_image) if init_image is not None else None
        if images is not None and num_samples is None and not self.conditioner.input_keys:
            num_samples = images.shape[0]
        n = self._batch_size(batch, num_samples)
        if images is not None and images.shape[0] not in (1, n):
            raise SampleArgumentError(
                f"init_image holds {images.shape[0]} images for {n} samples: give 1 or {n}"
            )
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise SampleArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
        hw = self._image_size(size, image_size)
        if images is not None:
            h, w = images.shape[-2:]
            if hw is not None and hw != (h, w):
                raise SampleArgumentError(
                    f"size {hw[0]}x{hw[1]} differs from init_image's {h}x{w}: "
                    "leave size out to sample at the image's size"
                )
            f = self.first_stage.downsample_factor
            if h % f or w % f:
                raise SampleArgumentError(
                    f"init_image is {h}x{w}, which is not divisible by the first stage's downsample "
                    f"factor f={f}: crop or resize it to multiples of {f}"
                )
            hw = (h, w)
        if strength is not None:
            if images is None:
                raise SampleArgumentError("strength needs init_image (the image to start from)")
            if not 0.0 < strength <= 1.0:
                raise SampleArgumentError(
                    f"strength must be in (0, 1], got {strength}: the share of the steps run from "
                    "the noised init_image (1 = all of them)"
                )
        strength = 1.0 if strength is None else float(strength)
        if (mask is not None or latent_mask is not None) and not self.sampler.supports_mask:
            raise ValueError(f"sampler {type(self.sampler).__name__} does not support inpainting masks")
        if mask is not None and images is None:
            raise SampleArgumentError(
                "mask is a pixel mask over init_image (1 = repaint, 0 = keep): give init_image= too "
                "(a mask on the latent grid goes with known= as latent_mask=)"
            )
        if mask is not None and latent_mask is not None:
            raise SampleArgumentError("give mask= (pixels, with init_image) or latent_mask= (with known), not both")
        if seed is not None and generator is not None:
            raise SampleArgumentError("give seed= or generator=, not both")
        generators = sample_generators(seed, n) if seed is not None else generator

        try:
            resolved = _precision.resolve(precision, device)
        except _precision.PrecisionError as err:
            raise SampleArgumentError(str(err)) from err
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        with _precision.autocast(resolved, device):
            cond = self.conditioner(batch) if self.conditioner.input_keys else {}
        cond = _float32(cond)
        guided = guidance_scale != 1.0 and bool(cond)
        uncond: Mapping[str, Tensor] = {}
        if guided:
            if not self.conditioner.learns_null_condition:
                warnings.warn(
                    f"guidance_scale={guidance_scale} with conditioner {type(self.conditioner).__name__}, "
                    "which was configured without condition dropout (drop_rate=0): its null condition "
                    "was never trained, so guidance extrapolates from an untrained score",
                    stacklevel=2,
                )
            with _precision.autocast(resolved, device):
                uncond = _float32(self.conditioner.unconditional(batch))  # once per call, sliced per chunk
        if noise is not None and noise.shape[0] != n:
            raise SampleArgumentError(f"noise holds {noise.shape[0]} samples for {n}")
        shape = tuple(noise.shape) if noise is not None else (n, self.first_stage.latent_channels, *self._latent_size(hw, cond))
        self._check_memory(shape, batch_size or n, cond, uncond if guided else None, images, tiling, resolved)
        if noise is None:
            noise = randn_like(torch.empty(shape), generators).to(device)

        init = self._encode_init(images, n, generators, tiling) if images is not None else None
        if init is not None and init.shape != noise.shape:
            raise SampleArgumentError(
                f"init_image encodes to latents {tuple(init.shape)}, but the noise is {tuple(noise.shape)}"
            )
        pixels = None  # (image, mask) of a kept region, for refine_known
        if mask is not None:
            pixel_mask = masks.pixel_mask(mask, images, num_samples=n, name="mask", image_name="init_image")
            latent_mask = masks.latent_mask(pixel_mask, self.first_stage.downsample_factor)
            known = init
            pixels = (images.expand(n, *images.shape[1:]), pixel_mask.expand(n, *pixel_mask.shape[1:]))
        elif latent_mask is None and known is None and keep_known and self.sampler.supports_mask:
            latent_mask, known, pixels = self._known_latents(batch, generators, tiling)
        elif (latent_mask is None) != (known is None):
            raise SampleArgumentError("latent_mask= and known= go together (the latent region and its latents)")
        sampler_init = init
        if latent_mask is not None and strength == 1.0:
            sampler_init = None  # inpainting starts the repainted region from pure noise
        if refine_known and pixels is None:
            raise SampleArgumentError(
                "refine_known needs a kept region: mask= with init_image=, or an inpainting conditioner's "
                "image and mask in the batch"
            )
        if sampler_init is not None and "init" not in inspect.signature(self.sampler.sample).parameters:
            raise SampleArgumentError(
                f"sampler {type(self.sampler).__name__} does not support img2img (its sample() takes no init=)"
            )

        step_model = self.eps_model(resolved)
        bs = n if batch_size is None else min(batch_size, n)
        starts = range(0, n, bs)
        outputs = []
        for k, start in enumerate(starts):
            rows = slice(start, min(start + bs, n))
            part_cond = _rows(cond, rows, n)
            if guided:
                denoise = ClassifierFreeGuidance(step_model, part_cond, _rows(uncond, rows, n), guidance_scale)
            else:
                denoise = _Conditioned(step_model, part_cond)
            extra = {}
            if sampler_init is not None:
                extra = {"init": sampler_init[rows], "strength": strength}
            z0 = self.sampler.sample(
                denoise,
                self.schedule,
                noise[rows],
                steps=steps,
                generator=split_generator(generators, rows.start, rows.stop),
                callback=_chunk_callback(callback, k, len(starts)),
                mask=_rows(latent_mask, rows, n),
                known=_rows(known, rows, n),
                **extra,
            )
            if refine_known:
                image_rows, mask_rows = (_rows(v.to(z0.device), rows, n) for v in pixels)
                z0 = self.refine_known(z0, image_rows, mask_rows, refine_known, **tiling)
            outputs.append(z0 if return_latents else self.decode(z0, **tiling).clamp(-1, 1))
        return torch.cat(outputs)

    # -- checkpoints --------------------------------------------------------------------
    def save(self, directory: str | Path, *, embed_frozen: bool = False) -> Path:
        """Write ``model.safetensors`` and the resolved ``config.yaml`` into ``directory``.

        Frozen pretrained parts that declare where they come from (``frozen_references()``,
        e.g. ``frozen_text``'s encoder) are stored as references in ``frozen.json`` (source
        and content hash) instead of being copied, unless ``embed_frozen`` (:mod:`ldmkit.frozen`).
        Each file is replaced atomically: a crash leaves the previous checkpoint loadable.
        """
        from safetensors.torch import save_file, save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.config is None:
            raise ValueError(
                "this Pipeline was built from objects without a config; saving needs the config "
                "that rebuilds it (build it with ldmkit.compose, or pass config=)"
            )
        parts = {} if embed_frozen else frozen.frozen_parts(self)
        manifest = directory / frozen.FROZEN_FILE
        if parts:
            # the manifest first: a crash before the weights leaves old (embedded) weights
            # beside it, which still load
            atomic_write_text(manifest, frozen.write_manifest(parts))
            state = _without_shared({k: v for k, v in self.state_dict().items() if not frozen.under(k, parts)})
            atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p)))
        else:
            atomic_write(directory / WEIGHTS_FILE, lambda p: save_model(self, str(p)))
            manifest.unlink(missing_ok=True)
        atomic_write_text(directory / CONFIG_FILE, OmegaConf.to_yaml(self.config, resolve=True))
        return directory

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Pipeline:
        """Build the pipeline a composed config describes: every component through the
        registry only, checked against the others (:func:`ldmkit.assembly.pipeline_parts`)."""
        return cls(**pipeline_parts(cfg))

    @classmethod
    def from_compvis(
        cls,
        checkpoint: str | Path,
        config: str | Path | None = None,
        *,
        preset: str | None = None,
        use_ema: bool = True,
        null_class: str | int = "last",
        text_encoder: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> Pipeline:
        """A pipeline from the paper's ``.ckpt`` and its ``config.yaml`` — or, for a published
        model, the name of its stored translation (``preset="cin256-v2"``; docs/interop.md)
        — (:mod:`ldmkit.interop.compvis`): the EMA weights by default, the paper's DDIM
        spacing, and for a class-conditional model the last of ``n_classes`` as the null class
        (``null_class`` another index). A Stable Diffusion v1 checkpoint (``FrozenCLIPEmbedder``)
        needs ``text_encoder``, a local folder with the CLIP text model's config and tokenizer."""
        model, state, facts = compvis.read_compvis(
            checkpoint, config, preset=preset, use_ema=use_ema, null_class=null_class, text_encoder=text_encoder
        )
        if model.kind != "pipeline":
            raise ConfigError(
                f"{model.source} describes a first stage ({model.groups['first_stage']['name']}), not a latent "
                "diffusion model: `ldmkit convert compvis` writes it as a folder for first_stage.checkpoint="
            )
        pipeline = cls.from_config(compvis.compose(model, weights="ema" if facts.get("ema") else "raw"))
        compvis.check_schedule(facts, pipeline.schedule.alphas_cumprod, str(checkpoint))
        own = pipeline.state_dict()
        if "scale_factor" in own:  # the checkpoint's buffer (scale_by_std) or the YAML's value
            state["scale_factor"] = torch.full_like(own["scale_factor"], model.top["scale_factor"])
        compvis.load_converted(pipeline, state, str(checkpoint))
        return pipeline.to(device)

    @classmethod
    def from_diffusers(
        cls,
        directory: str | Path,
        *,
        text_encoder_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> Pipeline:
        """A pipeline from a diffusers folder (UNet, KL / VQ autoencoder, scheduler, CLIP text
        encoder; :mod:`ldmkit.interop.diffusers_format`). ``text_encoder_dir`` holds the CLIP
        config and tokenizer (``text_encoder/``, ``tokenizer/``) when not ``directory``."""
        from ldmkit.interop import diffusers_format

        cfg, state, scale = diffusers_format.read_diffusers(directory, text_encoder_dir=text_encoder_dir)
        pipeline = cls.from_config(cfg)
        state = diffusers_format.fit_state(state, pipeline.state_dict(), scale)
        compvis.load_converted(pipeline, state, str(directory))
        return pipeline.to(device)

    def to_diffusers(self, directory: str | Path) -> Path:
        """Write this pipeline as a diffusers folder (:mod:`ldmkit.interop.diffusers_format`)."""
        from ldmkit.interop import diffusers_format

        return diffusers_format.to_diffusers(self, directory)

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> Pipeline:
        """Rebuild a pipeline saved with :meth:`save` (names resolve through the registry;
        no code named in the checkpoint is executed, and no interpolation in its config is
        resolved: :func:`ldmkit.config.load_saved_config`)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint file missing: {path}")
        cfg = read_pipeline_config(config_path)
        references = frozen.read_manifest(directory)
        try:
            pipeline = cls.from_config(cfg)
        except (LdmkitError, OSError) as err:
            if not references:
                raise
            where = "; ".join(f"{prefix} from {ref['source']}" for prefix, ref in references.items())
            raise frozen.FrozenReferenceError(
                f"{directory} keeps frozen weights by reference ({where}) and cannot rebuild them: "
                f"{err}. Restore the source, or re-save the pipeline with embed_frozen=True on a "
                "machine where it loads"
            ) from err
        frozen.check_restored(directory, references, frozen.frozen_parts(pipeline) if references else {})
        # names and shapes from the file's header first: nothing is read from a file that
        # does not fit (UnreadableWeightsError names the file)
        stored, own = read_safetensors_shapes(weights_path), pipeline.state_dict()
        unexpected = sorted(set(stored) - set(own))
        missing = [k for k in _not_tied(pipeline, [k for k in own if k not in stored], stored)
                   if not frozen.under(k, references)]  # fmt: skip
        reshaped = [f"{k} {list(stored[k])} (the model's: {list(own[k].shape)})"
                    for k in own if k in stored and stored[k] != tuple(own[k].shape)]  # fmt: skip
        if missing or unexpected or reshaped:
            problems = [f"{what} {keys[:10]}" for what, keys in (
                ("missing keys", sorted(missing)), ("unexpected keys", unexpected)) if keys]  # fmt: skip
            problems += [f"wrong shapes {', '.join(reshaped[:10])}"] if reshaped else []
            raise ValueError(
                f"checkpoint {weights_path} does not match the model built from {config_path}: "
                + "; ".join(problems)
            )
        pipeline.load_state_dict(read_safetensors(weights_path), strict=False)
        return pipeline.to(device)


def build_pipeline(cfg: DictConfig) -> Pipeline:
    """:meth:`Pipeline.from_config` under the name it had in :mod:`ldmkit.config`."""
    return Pipeline.from_config(cfg)


def compose(overrides: Sequence[str] = ()) -> Pipeline:
    """Compose a config from Hydra ``overrides`` and build the :class:`Pipeline` it
    describes (``ldmkit.compose``)."""
    return Pipeline.from_config(compose_config(overrides))


PIPELINE_GROUPS = ("first_stage", "denoiser", "conditioner", "sampler")


def read_pipeline_config(path: str | Path) -> DictConfig:
    """The ``config.yaml`` of a pipeline folder, or a :class:`ConfigError` naming the file and
    what is wrong: not YAML, not a mapping, a component missing (or without a ``name``), a
    typed key of the wrong type (:func:`ldmkit.config.config_problems`)."""
    import yaml

    from ldmkit.config import config_problems

    where = f"the checkpoint config {path}"
    try:
        cfg = load_saved_config(path)  # an interpolation in it is refused, not resolved
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where} is not YAML: {getattr(err, 'problem', None) or err}{at}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not YAML: it is not UTF-8 text") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{where} holds a list, not a mapping of config groups ({', '.join(PIPELINE_GROUPS)})")
    missing = [g for g in PIPELINE_GROUPS if g not in cfg]
    if missing:
        raise ConfigError(f"{where} has no {', '.join(missing)}: it does not describe a pipeline")
    nameless = [g for g in PIPELINE_GROUPS if not OmegaConf.is_dict(cfg[g]) or not isinstance(cfg[g].get("name"), str)]
    if nameless:
        raise ConfigError(
            f"{where}: {', '.join(nameless)} must be a mapping whose `name` is a registered component"
        )
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}")
    return cfg


def _without_shared(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with each storage once (tied weights under their first name), contiguous,
    as ``safetensors.torch.save_model`` writes a module; :func:`_not_tied` restores them."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def _not_tied(module: nn.Module, missing: Sequence[str], loaded: Iterable[str]) -> list[str]:
    """``missing`` less the names whose tensor is that of a ``loaded`` name (tied weights),
    which ``safetensors.torch.save_model`` writes once, under one of the names."""
    state = module.state_dict()

    def where(name: str) -> tuple[int, int, tuple[int, ...]]:
        tensor = state[name]
        return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)

    loaded_at = {where(name) for name in loaded if name in state}
    return [name for name in missing if where(name) not in loaded_at]


class SampleArgumentError(LdmkitError, ValueError):
    """An argument of :meth:`Pipeline.sample` that cannot be used (the message names it)."""


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(v) for v in size)
    return h, w


def _rows(value: Any, rows: slice, n: int) -> Any:
    """Rows ``rows`` of a per-sample tensor (or dict of them); batch-1 values broadcast."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {k: _rows(v, rows, n) for k, v in value.items()}
    return value[rows] if value.shape[0] == n else value


def _float32(cond: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Condition tensors computed under autocast, back to float32 (integers kept)."""
    return {k: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in cond.items()}


def _draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run with the global RNG seeded ``seed`` (for modules that draw from it, like a KL
    first stage's posterior sample), restoring its state after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class _Conditioned:
    """``(z_t, t) -> eps`` of an unguided model with a fixed condition."""

    def __init__(self, model: Callable[..., Tensor], cond: Mapping[str, Tensor]) -> None:
        self.model, self.cond = model, cond

    def __call__(self, z_t: Tensor, t: Tensor) -> Tensor:
        return self.model(z_t, t, self.cond)


def _chunk_callback(callback: Callable[[dict[str, Any]], None] | None, chunk: int, num_chunks: int):
    if callback is None:
        return None
    return lambda info: callback({**info, "chunk": chunk, "num_chunks": num_chunks})


def image_grid_rows(n: int) -> int:
    """Images per row for a roughly square grid."""
    return max(1, math.ceil(math.sqrt(n)))
