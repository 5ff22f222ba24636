"""The assembled latent diffusion model: first stage, conditioner, denoiser, sampler and
noise schedule, with sampling and one-folder checkpoints."""

from __future__ import annotations

import contextlib
import math
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn

from ldmkit import frozen, lora, masks, pipeline_files
from ldmkit import precision as _precision
from ldmkit.assembly import (
    checked_condition,
    component_config,
    create_component,
    pipeline_config,
    pipeline_parts,
    returned_tensor,
)
from ldmkit.checkpoint_layout import META_FILE, STEP_DIR
from ldmkit.compiling import auto_compile, check_compile, compile_module, is_compiled
from ldmkit.config import compose_config, load_saved_config
from ldmkit.diffusion.guidance import ClassifierFreeGuidance
from ldmkit.diffusion.sampling import GeneratorArg, randn_like, sample_generators, split_generator
from ldmkit.diffusion.schedule import NoiseSchedule
from ldmkit.errors import ConfigError, LdmkitError, first_line
from ldmkit.interfaces import Conditioner, Denoiser, FirstStage, Sampler
from ldmkit.interop import pipelines
from ldmkit.io import atomic_write, atomic_write_text, check_folder
from ldmkit.plugins import get_registry
from ldmkit.safetensors_io import read_safetensors, read_safetensors_shapes
from ldmkit.sampling_request import SampleArgumentError, SampleRequest, negative_batch  # noqa: F401 - SampleArgumentError: its old home
from ldmkit.tiling import tiled_decode, tiled_encode

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
# present while Pipeline.save replaces a folder's files: a crash between them leaves it, and
# Pipeline.load refuses the folder rather than pair one save's weights with another's config
SAVING_MARKER = ".save-incomplete"


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
        # what composition checks of each registered component (create_component), for
        # objects handed in from Python too: an unset interface attribute fails here, in one
        # line naming the component, not later in sampling with an AttributeError
        given = {"first_stage": first_stage, "denoiser": denoiser, "conditioner": conditioner, "sampler": sampler}
        problems = [
            f"{kind} {type(part).__name__}: {problem}"
            for kind, part in given.items()
            for problem in (part.declaration_problems() if hasattr(part, "declaration_problems") else ())
        ]
        if problems:
            raise ConfigError(f"Pipeline(...): {'; '.join(problems)}")
        self.first_stage = first_stage
        self.denoiser = denoiser
        self.conditioner = conditioner
        self.sampler = sampler
        self.schedule = schedule if schedule is not None else NoiseSchedule()
        # a buffer so that it travels with the weights (scale_by_std sets it from data)
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self.image_size = image_size
        if config is None:  # built from objects: each component's own config (None if one has none)
            with contextlib.suppress(LdmkitError):
                config = pipeline_config(self._parts())
        self.config = OmegaConf.create(config) if config is not None else None

    def _parts(self) -> dict[str, Any]:
        kinds = ("first_stage", "denoiser", "conditioner", "sampler", "schedule", "image_size")
        return {kind: getattr(self, kind) for kind in kinds} | {"scale_factor": float(self.scale_factor)}

    # -- latents ----------------------------------------------------------------------
    def encode(self, images: Tensor, *, tile: int | None = None, tile_overlap: int | None = None) -> Tensor:
        """Images in [-1, 1] -> scaled latents (what the denoiser sees). ``tile``: encode in
        overlapping tiles of that many *latent* pixels (:mod:`ldmkit.tiling`)."""
        if tile is None:
            return self._encode(images) * self.scale_factor
        z = tiled_encode(
            self._encode, images, factor=self.first_stage.downsample_factor, tile=tile, overlap=tile_overlap
        )
        return z * self.scale_factor

    def _encode(self, images: Tensor) -> Tensor:
        return returned_tensor("first_stage", self.first_stage, "encode()", self.first_stage.encode(images))

    def _decode(self, z: Tensor) -> Tensor:
        return returned_tensor("first_stage", self.first_stage, "decode()", self.first_stage.decode(z))

    def decode(self, latents: Tensor, *, tile: int | None = None, tile_overlap: int | None = None) -> Tensor:
        """Scaled latents -> images. ``tile``: decode overlapping ``tile``x``tile`` latent
        tiles one at a time and blend them (:mod:`ldmkit.tiling`): the memory of one tile,
        whatever the image size."""
        z = latents / self.scale_factor
        if tile is None:
            return self._decode(z)
        return tiled_decode(
            self._decode, z, factor=self.first_stage.downsample_factor, tile=tile, overlap=tile_overlap
        )

    # -- the model the sampler calls ---------------------------------------------------
    def eps_model(
        self, precision: str = "fp32", denoiser: nn.Module | None = None
    ) -> Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]:
        """``(z_t, t, cond) -> eps`` whatever the denoiser predicts; the denoiser runs in
        ``precision`` (a resolved one: fp32, bf16 or fp16), its output comes back float32.
        ``denoiser``: the module to call (default: :meth:`sampling_denoiser` of ``precision``,
        i.e. the low-precision weight copy for bf16/fp16)."""
        prediction = self.denoiser.prediction
        device = self.scale_factor.device
        net = self.sampling_denoiser(precision) if denoiser is None else denoiser
        # compile="reduce-overhead" on CUDA replays CUDA graphs whose outputs the next replay
        # overwrites: each call starts a new step and its output is copied out (multistep
        # samplers keep earlier eps)
        graphs = device.type == "cuda" and is_compiled(net)
        # a third-party denoiser that cannot run on low-precision weights (a dtype clash in its
        # forward) falls back, at its first call, to autocast over the float32 weights
        state = {"net": net, "checked": net is self.denoiser or is_compiled(net)}

        def model(z_t: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            # the weight copy is already in the low precision (autocast's casts of it are
            # no-ops); autocast still casts the float32 inputs and what the network makes
            # in float32 on the way (timestep embeddings), as for the float32 weights
            with _precision.autocast(precision, device):
                if state["checked"]:
                    out = state["net"](z_t, t, cond)
                else:
                    out = self._first_low_precision_call(state, precision, z_t, t, cond)
            out = returned_tensor("denoiser", self.denoiser, "forward()", out, z_t.shape)
            out = out.clone() if graphs else out
            return self.schedule.to_eps(prediction, z_t, t, out.float())

        return model

    def _first_low_precision_call(self, state: dict[str, Any], precision: str, *args: Any) -> Tensor:
        try:
            out = state["net"](*args)
        except (RuntimeError, TypeError) as err:
            if not _DTYPE_CLASH.search(str(err)):  # another error: the denoiser's own, as it is
                raise
            name = type(self.denoiser).__name__
            first = first_line(err) or type(err).__name__
            warnings.warn(
                f"sampling in {precision}: denoiser {name} does not run on {precision} weights ({first}); "
                f"it runs under autocast over its float32 weights instead (set "
                f"{name}.supports_low_precision_weights = False to skip the attempt)",
                stacklevel=4,
            )
            self.release_low_precision_copy()
            self.__dict__["_low_precision_refused"] = type(self.denoiser)
            state["net"] = self.denoiser
            out = self.denoiser(*args)
        state["checked"] = True
        return out

    # sampling in bf16/fp16 runs on a copy of the denoiser's weights in that precision, made
    # once and kept while the weights stay the same (False: autocast over the float32 weights,
    # which casts every weight at every step)
    low_precision_weights: bool = True
    # a bf16 copy on a CPU also keeps its convolution weights in oneDNN's blocked layout
    # (precision.pack_cpu_convolutions: no weight reorder at each call; False: plain
    # F.conv2d on the copy)
    pack_cpu_weights: bool = True

    def sampling_denoiser(self, precision: str) -> nn.Module:
        """The module sampling calls in ``precision`` (a resolved one): the denoiser itself for
        fp32, else a copy of it with bf16/fp16 weights (:func:`ldmkit.precision.low_precision_copy`;
        on a CPU its bf16 convolutions keep their weights packed for oneDNN,
        :func:`ldmkit.precision.pack_cpu_convolutions`).
        The copy is kept on the pipeline (outside its modules: not in ``state_dict()``) and
        made again when a weight of the denoiser changes (in place, moved or replaced), so
        repeated calls pay the cast once and a compiled copy stays compiled."""
        dtype = _precision.DTYPES[_precision.check(precision)] if precision != "auto" else None
        if (
            dtype in (None, torch.float32)
            or not self.low_precision_weights
            or not getattr(self.denoiser, "supports_low_precision_weights", True)
            or self.__dict__.get("_low_precision_refused") is type(self.denoiser)
            or _is_sharded(self.denoiser)  # FSDP: its own mixed-precision policy casts the shards
        ):
            return self.denoiser
        key = (dtype, self.denoiser.training, self.pack_cpu_weights, _weights_signature(self.denoiser))
        cached = self.__dict__.get("_low_precision_denoiser")
        if cached is None or cached[0] != key:
            self.release_low_precision_copy()  # free the old copy before making one
            # made outside inference mode (sample() runs in it): inference tensors track no
            # version counter, which the repack check of packed convolutions reads, and they
            # cannot be used by a later call outside inference mode
            with torch.inference_mode(False):
                copy = _precision.low_precision_copy(self.denoiser, dtype)
                if dtype == torch.bfloat16 and self.pack_cpu_weights:
                    _precision.pack_cpu_convolutions(copy)
            cached = (key, copy)
            self.__dict__["_low_precision_denoiser"] = cached
        return cached[1]

    def _packaged(self, denoiser: nn.Module, *, compile_missing: bool = True, note: str | None = None) -> nn.Module:
        """``compile=aot``: ``denoiser`` as ahead-of-time compiled packages
        (:class:`ldmkit.aot.PackagedDenoiser`), one wrapper per sampling module, kept while it
        is the one sampling calls. ``compile=auto`` on a CPU (``compile_missing=False``): only
        packages already in the cache; ``note``: auto's choice, printed at the first denoiser
        call unless that call runs a package found in the cache."""
        from ldmkit.aot import PackagedDenoiser

        # the float32 denoiser is the same module when its weights change in place (the bf16
        # copy is made again): its weights' signature keys the wrapper too
        signature = _weights_signature(denoiser)
        cached = self.__dict__.get("_aot_denoiser")
        if cached is None or cached[0] is not denoiser or cached[2] != signature or cached[3] != compile_missing:
            cached = (denoiser, PackagedDenoiser(denoiser, compile_missing=compile_missing), signature, compile_missing)
            self.__dict__["_aot_denoiser"] = cached
        cached[1].note = note  # this call's line (auto prints its choice once per call)
        return cached[1]

    def release_low_precision_copy(self) -> None:
        """Drop the bf16/fp16 copy of the denoiser's weights that sampling keeps (half the
        float32 size of the denoiser in memory while the pipeline lives); the next sampling
        call in low precision makes it again."""
        self.__dict__["_low_precision_denoiser"] = None
        self.__dict__["_aot_denoiser"] = None  # compile=aot's wrapper of that copy

    def _encode_init(
        self, images: Tensor, n: int, generator: GeneratorArg, tiling: Mapping[str, Any], unused: Tensor | None = None
    ) -> Tensor:
        """Latents of ``images`` (B = 1 or n) for n samples. A first stage that samples its
        posterior (KL, ``encode_mode=sample``) draws from the samples' generator(s): sample i's
        latent depends on its own generator only, whatever the batch. Samples marked in
        ``unused`` (n bools: their latent is never read) get zeros and draw nothing, so their
        generators stay where plain sampling has them; with one generator (or none) that
        holds only when all of them are unused, as the encode of the others draws from it."""
        if unused is not None and bool(unused.all()):
            return images.new_zeros(n, *self.first_stage.latent_shape(*images.shape[-2:]))
        if unused is not None and isinstance(generator, Sequence):
            zeros = images.new_zeros(1, *self.first_stage.latent_shape(*images.shape[-2:]))
            return torch.cat([
                zeros if skip else self._encode_init(images[i : i + 1] if images.shape[0] > 1 else images, 1, [g], tiling)
                for i, (g, skip) in enumerate(zip(generator, unused.tolist(), strict=True))
            ])  # fmt: skip
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
            # each sample's squared error over its own kept pixels: a sample moves as it would alone
            count = keep.flatten(1).sum(1).clamp_min(1)
            optimizer = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                error = ((self.decode(z, tile=tile, tile_overlap=tile_overlap) - image).square() * keep).flatten(1)
                loss = (error.sum(1) / count).sum()
                (grad,) = torch.autograd.grad(loss, z)  # no gradients into the first stage's weights
                z.grad = grad * movable
                optimizer.step()
            return z.detach().clone()

    @torch.inference_mode()
    def sample(self, batch: Mapping[str, Any] | SampleRequest | None = None, **options: Any) -> Tensor:
        """Sample images in [-1, 1] (B×C×H×W), or z_0 with ``return_latents``.

        ``pipe.sample(request)`` runs a :class:`~ldmkit.sampling_request.SampleRequest`;
        ``pipe.sample(batch, guidance_scale=3.0, seed=0, ...)`` builds one from ``batch`` and
        the keywords (its fields: ``num_samples``, ``steps``, ``guidance_scale``, ``negative``, ``seed``,
        ``size``, ``init_image``, ``strength``, ``mask``, ``batch_size``, ``tile``,
        ``precision``, ...). The request is checked against this pipeline before anything
        runs (:meth:`SampleRequest.validate`): a refused argument raises
        :class:`SampleArgumentError` naming it.
        """
        if isinstance(batch, SampleRequest):
            if options:
                raise TypeError(f"sample(request) takes no other arguments, got {', '.join(sorted(options))}")
            request = batch
        else:
            request = SampleRequest(batch, **options)
        return self._sample(request.validate(self))

    def _sample(self, request: SampleRequest) -> Tensor:
        """Run a validated request: condition, draw the noise, encode what is kept, sample
        chunk by chunk, decode."""
        r = request
        device = self.scale_factor.device
        tiling = {"tile": r.tile, "tile_overlap": r.tile_overlap}  # tile None: encode/decode whole
        n, images = r.num_samples, r.init_image
        bs = n if r.batch_size is None else min(r.batch_size, n)
        denoiser = self.sampling_denoiser(r.precision)
        steps = r.steps if r.steps is not None else getattr(self.sampler, "steps", None)
        calls = None if steps is None else int(steps) * math.ceil(n / bs)  # for compile=auto
        setting = check_compile(r.compile)
        if setting == "auto" and device.type == "cpu":
            # auto on a CPU: an aot package already in the cache runs whatever the rule says;
            # the rule decides the rest (an aot package, torch.compile in place, or eager)
            mode, why = auto_compile(device, "sample", work=calls)
            if mode not in (None, "aot"):
                compile_module(denoiser, mode, device=device, what="the denoiser", purpose="sample", work=calls)
            note = f"compile: {mode or 'off'} (auto: {why})"
            denoiser = self._packaged(denoiser, compile_missing=mode == "aot", note=note)
        else:
            compile_module(denoiser, r.compile, device=device, what="the denoiser", purpose="sample", work=calls)
            if setting == "aot":
                denoiser = self._packaged(denoiser)
        def on_device(values: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in values.items()}

        batch = on_device(r.batch)
        negative = None if r.negative is None else negative_batch(batch, on_device(r.negative), n)
        cond, uncond = self._conditions(batch, r.guidance_scale, r.precision, negative)
        shape = r.latent_shape(self, cond)
        r.check_memory(self, shape, cond, uncond)
        generators = sample_generators(r.seed, n) if r.seed is not None else r.generator
        noise = randn_like(torch.empty(shape), generators).to(device) if r.noise is None else r.noise.to(device)
        init = None
        if images is not None:
            # inpainting at strength 1 reads the init latent only where the mask keeps something
            unused = None
            if r.mask is not None and r.strength == 1.0:
                unused = (r.mask >= 1).flatten(1).all(1).expand(n)
            init = self._encode_init(images, n, generators, tiling, unused)
        latent_mask, known, pixels = r.latent_mask, r.known, None  # pixels: (image, mask) kept, for refine_known
        if r.mask is not None:
            latent_mask, known = masks.latent_mask(r.mask, self.first_stage.downsample_factor), init
            pixels = (images.expand(n, *images.shape[1:]), r.mask.expand(n, *r.mask.shape[1:]))
        elif latent_mask is None and r.keep_known and self.sampler.supports_mask:
            latent_mask, known, pixels = self._known_latents(batch, generators, tiling)
        sampler_init = init if r.starts_from_init(inpainting=latent_mask is not None) else None

        step_model = self.eps_model(r.precision, denoiser)
        starts = range(0, n, bs)
        outputs = []
        for k, start in enumerate(starts):
            rows = slice(start, min(start + bs, n))
            part_cond = _rows(cond, rows, n)
            if uncond is not None:
                denoise = ClassifierFreeGuidance(step_model, part_cond, _rows(uncond, rows, n), r.guidance_scale)
            else:
                denoise = _Conditioned(step_model, part_cond)
            extra = {"init": sampler_init[rows], "strength": r.strength} if sampler_init is not None else {}
            z0 = self.sampler.sample(
                denoise,
                self.schedule,
                noise[rows],
                steps=r.steps,
                generator=split_generator(generators, rows.start, rows.stop),
                callback=_chunk_callback(r.callback, k, len(starts)),
                mask=_rows(latent_mask, rows, n),
                known=_rows(known, rows, n),
                **extra,
            )
            z0 = returned_tensor("sampler", self.sampler, "sample()", z0, noise[rows].shape)
            if r.refine_known:
                image_rows, mask_rows = (_rows(v.to(z0.device), rows, n) for v in pixels)
                z0 = self.refine_known(z0, image_rows, mask_rows, r.refine_known, **tiling)
            outputs.append(z0 if r.return_latents else self.decode(z0, **tiling).clamp(-1, 1))
        return torch.cat(outputs)

    def _conditions(
        self, batch: Mapping[str, Any], guidance_scale: float, precision: str,
        negative: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """``(cond, uncond)`` of ``batch`` in float32; ``uncond`` (computed once per call,
        sliced per chunk) only under guidance: the conditioner's null condition, or its
        condition of the ``negative`` inputs."""
        device = self.scale_factor.device
        with _precision.autocast(precision, device):
            cond = self.conditioner(batch) if self.conditioner.input_keys else {}
        cond = _float32(checked_condition(self.conditioner, "forward()", cond))
        if guidance_scale == 1.0 or not cond:
            return cond, None
        if negative is not None:  # a real condition: no null to have been trained
            try:
                with _precision.autocast(precision, device):
                    uncond = self.conditioner(negative)
            except (LdmkitError, ValueError) as err:  # a bad value: say it was the negative's
                raise SampleArgumentError("{negative}: {problem}", problem=str(err)) from err
            return cond, _float32(checked_condition(self.conditioner, "forward() of the negative condition", uncond))
        if not self.conditioner.learns_null_condition:
            where = " in a part, and none jointly" if hasattr(self.conditioner, "parts") else ""  # conditioner=multi
            warnings.warn(
                f"guidance_scale={guidance_scale} with conditioner {type(self.conditioner).__name__}, "
                f"which was configured without condition dropout (drop_rate=0{where}): its null condition "
                "was never trained, so guidance extrapolates from an untrained score",
                stacklevel=5,  # the caller of sample()
            )
        with _precision.autocast(precision, device):
            uncond = self.conditioner.unconditional(batch)
        return cond, _float32(checked_condition(self.conditioner, "unconditional()", uncond))

    def with_sampler(self, sampler: str | Mapping[str, Any] | Sampler, /, **overrides: Any) -> Pipeline:
        """Sample with another sampler from now on, ``config.sampler`` changed with it (what
        :meth:`save` writes and what ``ldmkit sample`` records). ``sampler`` is a registered
        name (``"dpmpp_2m"``, built with ``overrides`` as its arguments), a sampler config (a
        mapping with ``name``; ``overrides`` on top) or a :class:`Sampler` (its own config;
        with ``overrides``, rebuilt with those arguments changed). A name or config goes
        through the registry (:func:`ldmkit.assembly.create_component`). Returns the pipeline."""
        if isinstance(sampler, Sampler):
            node = component_config("sampler", sampler)
        elif isinstance(sampler, str):
            node = {"name": sampler}
        else:
            node = OmegaConf.to_container(sampler, resolve=True) if OmegaConf.is_config(sampler) else dict(sampler)
        if overrides or not isinstance(sampler, Sampler):
            node = {**node, **overrides}
            sampler = create_component(get_registry(), "sampler", node, f"sampler={node.get('name')}")
        self.sampler = sampler
        if self.config is not None:
            with open_dict(self.config):
                self.config.sampler = node
        return self

    # -- checkpoints --------------------------------------------------------------------
    def save(
        self, directory: str | Path, *, embed_frozen: bool = False, state: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write ``model.safetensors`` and the resolved ``config.yaml`` into ``directory``.
        ``state``: the weights to write instead of the pipeline's own state dict (a sharded
        model's, gathered).

        Frozen pretrained parts that declare where they come from (``frozen_references()``,
        e.g. ``frozen_text``'s encoder) are stored as references in ``frozen.json`` (source
        and content hash) instead of being copied, unless ``embed_frozen`` (:mod:`ldmkit.frozen`).
        Files and folders the components read when built (``Component.pipeline_files``: a
        custom tokenizer vocab; with ``embed_frozen`` a frozen encoder's config and tokenizer)
        are copied under ``files/`` and ``config.yaml`` names them relative to ``directory``
        (:mod:`ldmkit.pipeline_files`): the folder loads from any working directory.
        Each file is replaced atomically, and the folder is marked while they are: a crash
        midway leaves a folder that :meth:`load` refuses, naming the interrupted save, never
        one save's weights beside another's config.
        """
        from safetensors.torch import save_file

        if lora.has_adapters(self):
            raise ConfigError(
                "cannot save this pipeline: it carries a LoRA adapter, which config.yaml does not describe; "
                "bake it in first (ldmkit.lora.merge, `ldmkit lora merge`)"
            )
        if self.config is None:  # a component that cannot be described: say which, and why
            try:
                self.config = pipeline_config(self._parts())
            except ConfigError as err:
                raise ConfigError(f"cannot save this pipeline, no config rebuilds it: {err}") from None
        directory = Path(directory)
        check_folder(directory, "Pipeline.save")  # a file where the folder (or one above it) goes
        directory.mkdir(parents=True, exist_ok=True)
        marker = directory / SAVING_MARKER
        atomic_write_text(marker, "Pipeline.save was replacing this folder's files and did not finish\n")
        parts = {} if embed_frozen else frozen.frozen_parts(self)
        manifest = directory / frozen.FROZEN_FILE
        kept = self.state_dict() if state is None else state
        if parts:
            # the manifest first: a crash before the weights leaves old (embedded) weights
            # beside it, which still load
            atomic_write_text(manifest, frozen.write_manifest(parts))
            kept = {k: v for k, v in kept.items() if not frozen.under(k, parts)}
        # save_file, not safetensors' save_model: that refuses parameters that are views of a
        # larger buffer (the bf16 working weights' flat masters, ldmkit.training.working_weights)
        kept = _without_shared(kept)
        atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(kept, str(p)))
        if not parts:  # everything is in the weights now: an older save's manifest must not stay
            manifest.unlink(missing_ok=True)
        # the files components read when built travel with it (ldmkit.pipeline_files)
        config = pipeline_files.bundle(self, self.config, directory, embed_frozen=embed_frozen)
        atomic_write_text(directory / CONFIG_FILE, OmegaConf.to_yaml(config, resolve=True))
        marker.unlink()
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
        — (:func:`ldmkit.interop.pipelines.from_compvis`): the EMA weights by default, the
        paper's DDIM spacing, and for a class-conditional model the last of ``n_classes`` as
        the null class (``null_class`` another index). A Stable Diffusion v1 checkpoint
        (``FrozenCLIPEmbedder``) needs ``text_encoder``, a local folder with the CLIP text
        model's config and tokenizer."""
        pipeline = pipelines.from_compvis(
            cls.from_config, checkpoint, config, preset=preset, use_ema=use_ema, null_class=null_class,
            text_encoder=text_encoder,
        )  # fmt: skip
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
        encoder; :func:`ldmkit.interop.pipelines.from_diffusers`). ``text_encoder_dir`` holds
        the CLIP config and tokenizer (``text_encoder/``, ``tokenizer/``) when not
        ``directory``."""
        return pipelines.from_diffusers(cls.from_config, directory, text_encoder_dir=text_encoder_dir).to(device)

    def to_diffusers(self, directory: str | Path) -> Path:
        """Write this pipeline as a diffusers folder (:mod:`ldmkit.interop.diffusers_format`)."""
        from ldmkit.interop import diffusers_format

        return diffusers_format.to_diffusers(self, directory)

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> Pipeline:
        """Rebuild a pipeline saved with :meth:`save` (names resolve through the registry;
        no code named in the checkpoint is executed, and no interpolation in its config is
        resolved: :func:`ldmkit.config.load_saved_config`). The adapter folder a LoRA run
        exports loads as its base pipeline with the adapter attached (:mod:`ldmkit.lora`)."""
        directory = Path(directory)
        if STEP_DIR.match(directory.name) and (directory / META_FILE).is_file():
            run = directory.parent.parent
            raise ConfigError(
                f"{directory} is a training checkpoint, not a pipeline folder: a stage-2 run's pipeline is "
                f"{run / 'pipeline'} (its newest checkpoint's EMA weights), and trainer.init_from={directory} "
                "starts a run from this one (a stage-1 checkpoint: ldmkit evaluate stage=autoencoder)"
            )
        # an adapter folder (ldmkit.lora): the weights are its base's, then the adapter on top
        adapter = lora.read_adapter(directory)
        weights_dir = adapter.base if adapter is not None else directory
        config_path, weights_path = directory / CONFIG_FILE, weights_dir / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint file missing: {path}{not_a_pipeline_folder(directory)}")
        for folder in dict.fromkeys((directory, weights_dir)):
            if (folder / SAVING_MARKER).exists():
                raise ConfigError(
                    f"{folder} holds an interrupted save (it has {SAVING_MARKER}): its weights and "
                    "config may come from two different pipelines. Save the pipeline there again"
                )
        cfg = read_pipeline_config(config_path)
        references = frozen.read_manifest(weights_dir)
        # names and shapes from the file's header first: nothing is read from a file that
        # does not fit (UnreadableWeightsError names the file)
        stored = read_safetensors_shapes(weights_path)
        with open_dict(cfg):  # the folder's weights win: a component's checkpoint: key (a stage-1 run
            for group in ("first_stage", "denoiser", "conditioner"):  # elsewhere, maybe gone) is not read
                node = cfg.get(group)
                if isinstance(node, DictConfig) and node.get("checkpoint") is not None and any(
                        k.startswith(f"{group}.") for k in stored):
                    node.checkpoint = None
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
        frozen.check_restored(weights_dir, references, frozen.frozen_parts(pipeline) if references else {})
        own = pipeline.state_dict()
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
        if adapter is not None:
            lora.attach(pipeline, adapter, directory)
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
    typed key of the wrong type (:func:`ldmkit.config.config_problems`). The files the folder
    carries (``files.json``) are named by their paths inside it (:mod:`ldmkit.pipeline_files`)."""
    import yaml

    from ldmkit.config import config_problems, yaml_problem

    where = f"the checkpoint config {path}"
    try:
        cfg = load_saved_config(path)  # an interpolation in it is refused, not resolved
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where} is not YAML: {yaml_problem(err)}") from None
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
    return pipeline_files.resolve(cfg, Path(path).parent)


def not_a_pipeline_folder(directory: Path) -> str:
    """What ``directory``, which lacks a pipeline's files, is instead, and how to convert it."""
    if directory.is_file():
        return f"; {directory} is a file, not a pipeline folder (the paper's .ckpt: ldmkit convert compvis)"
    if (directory / "model_index.json").is_file():
        return f"; {directory} is a diffusers folder: convert it with ldmkit convert from-diffusers"
    if (directory / "pipeline" / WEIGHTS_FILE).is_file() or (directory / "pipeline" / CONFIG_FILE).is_file():
        return f"; {directory} is a training run: its pipeline is {directory / 'pipeline'}"
    if (directory / "checkpoints").is_dir():
        return f"; {directory} is a training run without a pipeline/ (a stage-1 run: ldmkit evaluate stage=autoencoder)"
    return ""


def _without_shared(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with each tensor once (tied weights under their first name), contiguous, as
    ``safetensors.torch.save_model`` writes a module (which also refuses views of a larger
    buffer, this does not); :func:`_not_tied` restores them."""
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


def _rows(value: Any, rows: slice, n: int) -> Any:
    """Rows ``rows`` of a per-sample tensor (or dict of them); batch-1 values broadcast."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {k: _rows(v, rows, n) for k, v in value.items()}
    return value[rows] if value.shape[0] == n else value


# what PyTorch's dtype-mismatch errors say ("expected scalar type Float but found BFloat16",
# "mat1 and mat2 must have the same dtype", "Input type (c10::BFloat16) and bias type (float)
# should be the same", "mixed dtype (CPU): expect parameter to have scalar type of Float")
_DTYPE_CLASH = re.compile(r"dtype|scalar type|should be the same|BFloat16|Half", re.IGNORECASE)


def _is_sharded(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are DTensors (FSDP2 shards): they are not copied."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists
    return dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in module.parameters())


def _weights_signature(module: nn.Module) -> tuple:
    """What changes when a weight of ``module`` changes: each parameter's and buffer's
    :func:`ldmkit.precision.tensor_signature`."""
    return tuple(_precision.tensor_signature(t) for t in (*module.parameters(), *module.buffers()))


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
