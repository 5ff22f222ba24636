"""One sampling request: the arguments of ``Pipeline.sample``, checked in one place.

The Python API, ``ldmkit sample`` and ``ldmkit demo`` all build a :class:`SampleRequest` and
hand it to ``Pipeline.sample``. Its checks run in two steps:

* the values on their own, when the request is made (``__post_init__``): numbers and their
  ranges, which arguments need or exclude which, tiling, precision and compile names;
* against a pipeline (:meth:`SampleRequest.validate`): steps against the schedule, sizes
  against the first stage's factor, the init image against its channels, the number of
  samples against the conditions, what the sampler supports (masks, img2img), and the
  precision for the pipeline's device; then, once the conditions are encoded, whether the
  call fits the device's free memory (:meth:`SampleRequest.check_memory`).

A refused argument raises :class:`SampleArgumentError`. Its message names arguments in
Python's words (``guidance_scale``); a front end shows it in its own
(:func:`message`: ``--guidance-scale`` on the command line, ``guidance scale`` on the demo
page), so that one mistake reads the same, but for the name, wherever it is made.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch
from torch import Tensor

from ldmkit import devices, masks
from ldmkit import precision as _precision
from ldmkit.compiling import CompileSettingError, check_compile
from ldmkit.diffusion.sampling import GeneratorArg
from ldmkit.errors import LdmkitError
from ldmkit.tiling import check_tiling

SEED_LIMIT = 2**32  # seeds are whole numbers in [0, SEED_LIMIT) (the demo draws them there)


class SampleArgumentError(LdmkitError, ValueError):
    """A sampling argument that cannot be used.

    The message is a ``template`` whose fields are the arguments it names, the culprit first
    (``argument``; all of them: ``names``), and ``values`` (``"{strength} must be in (0, 1],
    got {got}"``, ``got=1.5``): ``str(err)`` names the arguments in Python's words,
    :meth:`named` as a front end spells them."""

    def __init__(self, template: str, **values: Any) -> None:
        self.template, self.values = template, values
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field]
        self.names = tuple(dict.fromkeys(f for f in fields if f not in values))
        self.argument = self.names[0] if self.names else None
        super().__init__(self.named({}))

    def named(self, labels: Mapping[str, str]) -> str:
        """The message with each argument written as ``labels`` spell it (else its name)."""
        return self.template.format(**{n: labels.get(n, n) for n in self.names}, **self.values)

    def __reduce__(self):
        return functools.partial(type(self), **self.values), (self.template,)


def message(err: BaseException, labels: Mapping[str, str]) -> str:
    """``err``'s message in one line, the sampling arguments it names written as ``labels``
    spell them (``{"guidance_scale": "--guidance-scale"}``): a :class:`SampleArgumentError`'s,
    or the parenthesized ones of a memory refusal (:meth:`SampleRequest.check_memory`)."""
    if isinstance(err, SampleArgumentError):
        return err.named(labels).replace("\n", " ")
    text = str(err).replace("\n", " ")
    for name in getattr(err, "names", ()):
        text = text.replace(f"({name})", f"({labels.get(name, name)})")
    return text


def whole_number(value: Any, name: str, low: int, high: int | None = None, *, hint: str = "") -> int:
    """``value`` (an int, or a float or string holding one) as an int in [low, high], or a
    :class:`SampleArgumentError` naming ``name``."""
    span = f"from {low} to {high}" if high is not None else f">= {low}"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SampleArgumentError(f"{{{name}}} is empty: give a whole number {{span}}", span=span + hint)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    fits = math.isfinite(number) and number.is_integer() and low <= number <= (math.inf if high is None else high)
    if isinstance(value, bool) or not fits:
        whole = math.isfinite(number) and number.is_integer() and abs(number) < 1e15  # 1e308: not 309 digits
        shown = int(number) if whole and not isinstance(value, bool) else value
        raise SampleArgumentError(f"{{{name}}} must be a whole number {{span}}, got {{got}}", span=span + hint, got=shown)
    return int(number)


@dataclass(eq=False)
class SampleRequest:
    """What to sample: the arguments of ``Pipeline.sample``, checked when made.

    :param batch: the conditioner's inputs, keyed as its ``input_keys`` (e.g.
        ``{"label": [3, 7]}``, ``{"caption": ["a red apple"]}``, ``{"segmentation": ids}``);
        None for an unconditional model.
    :param num_samples: how many images (unconditional models; with conditions it must match
        the batch). Default 1, or the number of ``init_image`` images.
    :param steps: the sampler's steps (default: its own ``steps``), 1 to the schedule's T.
    :param guidance_scale: classifier-free guidance scale, >= 0 (1 = no guidance,
        0 = unconditional).
    :param negative: a negative condition: inputs keyed as ``batch``'s (e.g.
        ``{"caption": ["blurry, washed out"]}``, ``{"label": [5]}``) that guidance steers away
        from, in place of the null condition (diffusers' ``negative_prompt``): the guided
        prediction is ``eps(negative) + s (eps(cond) - eps(negative))``. One value for every
        sample or one per sample; keys it leaves out keep the batch's own values. Needs a
        ``guidance_scale`` other than 1 (at 0 it samples the negative condition itself).
    :param seed: sample ``i`` draws all of its noise (the start, every ancestral step, a KL
        first stage's posterior sample of ``init_image``) from its own generator seeded
        ``seed + i`` (:func:`ldmkit.diffusion.sample_generators`), so ``seed=s + 2``
        reproduces sample 2 of ``seed=s`` and no result depends on the batch it was drawn
        in. A whole number from 0 to 4294967295 (``SEED_LIMIT - 1``), and so is ``seed + i``.
    :param generator: instead of ``seed``: one ``torch.Generator`` for the whole call (the
        result then depends on the batch) or a list of one per sample.
    :param noise: the starting noise z_T (B×c×h×w) instead of drawing it.
    :param size: the output size, ``(height, width)`` or an int for a square; any multiple
        of the first stage's factor f, larger than trained included (the paper's
        convolutional sampling, Sec. 4.3.2). By default the pipeline's, the ``init_image``'s,
        or, for spatial conditions (``concat``), the size their inputs give. ``image_size``
        is an alias.
    :param init_image: img2img / SDEdit (Meng et al. 2022): images B×C×H×W in [-1, 1] (B = 1
        is used for every sample), encoded by the first stage (times the scale factor, as in
        training), noised to the level where ``strength`` starts and denoised from there.
    :param strength: in (0, 1], default 1: the share of the sampler's steps run from the
        noised ``init_image``; ``int(steps * strength)`` steps run, so a strength that rounds
        to no step returns the first stage's reconstruction of ``init_image``.
    :param mask: inpainting with any model: a pixel mask over ``init_image`` (H×W, B×H×W or
        B×1×H×W, values in [0, 1]), **1 = repaint, 0 = keep** (white = repaint in a PNG). It
        goes to the latent grid by :func:`ldmkit.masks.latent_mask`; the kept region's
        latents are the init image's, re-noised and blended after every step and exact at
        the end. With ``strength`` < 1 the repainted region starts from the noised init image
        too; with 1 (the default) from pure noise.
    :param latent_mask: with ``known``: a mask already on the latent grid and the known clean
        latents, handed to the sampler as they are.
    :param batch_size: sample in chunks of at most this many (memory), with the same results
        as one batch when seeded with ``seed`` (up to float round-off).
    :param keep_known: for an inpainting conditioner (``Conditioner.known_region``) and a
        sampler that supports masks: hold the kept region's latents fixed, so it ends as the
        first stage's reconstruction of the input (``mask``/``latent_mask`` win).
    :param refine_known: with a kept region (``mask`` + ``init_image``, or an inpainting
        conditioner's): after sampling, this many Adam steps on z_0 so that its decode
        matches the kept pixels (``Pipeline.refine_known``). Kept latents alone decode the
        kept region only approximately where it borders generated cells; this closes the gap
        without pasting pixels. 0 (default): off; 20-50 steps are typical.
    :param precision: ``auto`` (default: bf16 on CUDA and on CPUs with AVX512-BF16 or AMX,
        else fp32), ``fp32``, ``bf16`` or ``fp16`` for the conditioner and the denoiser
        (:mod:`ldmkit.precision`); the sampler's updates, the encode of ``init_image`` and
        the decode stay float32. Seeded results are independent of the batch size up to the
        round-off of the chosen precision (docs/performance.md).
    :param tile: decode (and encode ``init_image``/known regions) in overlapping tiles of
        this many latent pixels, blended over ``tile_overlap`` (default ``tile // 4``): the
        first stage's memory is then that of one tile, for outputs far larger than the
        training size (:mod:`ldmkit.tiling`; the denoiser still sees the whole latent).
    :param compile: ``True``, ``"auto"`` or an inductor mode: ``torch.compile`` the denoiser
        (in bf16/fp16: its low-precision weight copy) before sampling (:mod:`ldmkit.compiling`;
        it stays compiled for later calls); the first call includes the compile time.
        ``"auto"`` compiles where it was measured to pay back for this call's denoiser calls
        on this kind of host (:data:`ldmkit.compiling.AUTO_RULES`); on a CPU it also runs an
        ``"aot"`` package already in the cache for these inputs. ``"aot"`` (CPU): compiled
        ahead of time into a package kept on disk (one per input shapes, any batch size),
        loaded by later calls and processes (:mod:`ldmkit.aot`).
    :param callback: called after every step with the sampler's dict (``i``, ``t``, ``z``,
        ``x0``) plus ``chunk`` and ``num_chunks``.
    :param return_latents: return z_0 instead of the decoded images.
    """

    batch: Mapping[str, Any] | None = None
    _: KW_ONLY
    num_samples: int | None = None
    steps: int | None = None
    guidance_scale: float = 1.0
    negative: Mapping[str, Any] | None = None
    seed: int | None = None
    generator: GeneratorArg = None
    noise: Tensor | None = None
    size: int | Sequence[int] | None = None
    image_size: int | Sequence[int] | None = None
    init_image: Tensor | None = None
    strength: float | None = None
    mask: Tensor | None = None
    latent_mask: Tensor | None = None
    known: Tensor | None = None
    batch_size: int | None = None
    keep_known: bool = True
    refine_known: int = 0
    precision: str = "auto"
    tile: int | None = None
    tile_overlap: int | None = None
    compile: bool | str = False
    callback: Callable[[dict[str, Any]], None] | None = None
    return_latents: bool = False

    def __post_init__(self) -> None:
        """The checks that need no pipeline; numbers come out as ints and floats, ``size``
        as ``(height, width)`` (``image_size`` folded into it)."""
        for name in ("batch", "negative"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise SampleArgumentError(
                    f"{{{name}}} maps each condition key to its values, e.g. {{{{'label': [1, 2]}}}} or "
                    "{{'caption': ['a cat']}}; got a {got}",
                    got=type(value).__name__,
                )
        self.batch = dict(self.batch or {})
        self.guidance_scale = _guidance(self.guidance_scale)
        if self.negative is not None:
            self.negative = dict(self.negative)
            if not self.negative:
                raise SampleArgumentError("{negative} is empty: give the inputs to steer away from, or None")
            if self.guidance_scale == 1.0:
                raise SampleArgumentError(
                    "{negative} needs a {guidance_scale} other than 1: it replaces the null condition of "
                    "classifier-free guidance, which a scale of 1 does not evaluate"
                )
        if self.seed is not None:
            self.seed = whole_number(self.seed, "seed", 0, SEED_LIMIT - 1)
        if self.seed is not None and self.generator is not None:
            raise SampleArgumentError("give {seed}= or {generator}=, not both")
        for name, low in (("num_samples", 1), ("batch_size", 1)):
            if getattr(self, name) is not None:
                setattr(self, name, whole_number(getattr(self, name), name, low))
        if isinstance(self.refine_known, bool) or not isinstance(self.refine_known, int) or self.refine_known < 0:
            raise SampleArgumentError("{refine_known} must be an int >= 0 (Adam steps), got {got!r}", got=self.refine_known)
        self.size, self.image_size = _size(self.size, self.image_size), None
        if self.strength is not None:
            if self.init_image is None:
                raise SampleArgumentError("{strength} needs {init_image} (the image to start from)")
            self.strength = _strength(self.strength)
        if self.tile_overlap is not None and self.tile is None:
            raise SampleArgumentError("{tile_overlap} needs {tile} (the tile size in latent pixels)")
        if self.tile is not None:
            try:
                self.tile, self.tile_overlap = check_tiling(self.tile, self.tile_overlap)
            except ValueError as err:  # its message starts with the argument's name
                name, _, rest = str(err).partition(" ")
                raise SampleArgumentError(f"{{{name}}} {{rest}}", rest=rest) from None
        try:
            self.precision = _precision.check(self.precision)
        except _precision.PrecisionError as err:  # "precision='fp8' is not a precision: ..."
            raise SampleArgumentError("{precision}{rest}", rest=str(err).removeprefix("precision")) from None
        try:
            check_compile(self.compile)
        except CompileSettingError as err:  # "compile='fast': expected ..."
            raise SampleArgumentError("{compile}{rest}", rest=str(err).removeprefix("compile")) from None

    # -- against a pipeline ------------------------------------------------------------------
    def validate(self, pipeline: Any, *, max_samples: int | None = None, max_side: int | None = None) -> SampleRequest:
        """This request checked against ``pipeline``, as a copy ready to run: ``num_samples``
        counted, ``size`` final (the init image's when given), ``init_image`` float32 on the
        pipeline's device, ``mask`` a B×1×H×W pixel mask, ``strength`` 1 with an init image
        when not given, ``precision`` resolved for the device. ``max_samples`` and
        ``max_side`` are a front end's limits (the demo page's)."""
        sampler, first_stage = pipeline.sampler, pipeline.first_stage
        f = int(first_stage.downsample_factor)
        self._check_masks(sampler)
        steps, timesteps = self.steps, int(pipeline.schedule.timesteps)
        if steps is not None:
            steps = whole_number(steps, "steps", 1, timesteps)
        elif int(getattr(sampler, "steps", 1)) > timesteps:  # the sampler's own, from its config
            raise SampleArgumentError(
                f"sampler.steps={sampler.steps} is more than the schedule's {timesteps} timesteps "
                f"(schedule.timesteps): give at most {timesteps}"
            )
        if max_samples is not None and self.num_samples is not None:
            whole_number(self.num_samples, "num_samples", 1, max_samples)
        size = self.size
        if size is not None:
            _check_size(size, f, max_side)
        images = _init_images(self.init_image, first_stage, _device(pipeline)) if self.init_image is not None else None
        num_samples = self.num_samples
        if images is not None and num_samples is None and not pipeline.conditioner.input_keys:
            num_samples = images.shape[0]
        n = _count(pipeline.conditioner, self.batch, num_samples)
        if self.negative is not None:
            _check_negative(pipeline.conditioner, self.negative, n)
        if self.seed is not None and self.seed + n > SEED_LIMIT:  # sample i could not be redrawn alone
            raise SampleArgumentError(
                "{seed}={seed_value} for {n} samples: sample i uses seed + i, which must stay at "
                "most {top}; use a seed of at most {highest}",
                seed_value=self.seed, n=n, top=SEED_LIMIT - 1, highest=SEED_LIMIT - n,
            )
        if images is not None:
            h, w = images.shape[-2:]
            if images.shape[0] not in (1, n):
                raise SampleArgumentError(f"{{init_image}} holds {images.shape[0]} images for {n} samples: give 1 or {n}")
            if size is not None and size != (h, w):
                raise SampleArgumentError(
                    f"{{size}} {size[0]}x{size[1]} differs from {{init_image}}'s {h}x{w}: leave {{size}} out to "
                    "sample at the image's size"
                )
            if h % f or w % f:
                raise SampleArgumentError(
                    f"{{init_image}} is {h}x{w}, which is not divisible by the first stage's downsample factor "
                    f"f={f}: crop or resize it to multiples of {f}"
                )
            size = (h, w)
        if self.noise is not None:
            expected = (n, *first_stage.latent_shape(*size)) if size is not None else None
            if self.noise.shape[0] != n or (expected is not None and tuple(self.noise.shape) != expected):
                need = f" of {size[0]}x{size[1]} need {expected}" if expected else ""
                raise SampleArgumentError(f"{{noise}} has shape {tuple(self.noise.shape)}; {n} samples{need}")
        masked = self.mask is not None or self.latent_mask is not None
        mask = self.mask
        if mask is not None:
            # a masks.MaskError names them in Python's words, as ldmkit sample has always shown it
            mask = masks.pixel_mask(mask, images, num_samples=n, name="mask", image_name="init_image")
        region = None
        if not masked and self.keep_known and sampler.supports_mask:
            region = pipeline.conditioner.known_region(self.batch)  # an inpainting conditioner's
        if self.refine_known and mask is None and region is None:
            raise SampleArgumentError(
                "{refine_known} needs a kept region: {mask} with {init_image}, or an inpainting conditioner's "
                "image and mask in the batch"
            )
        strength = 1.0 if images is not None and self.strength is None else self.strength
        checked = dataclasses.replace(
            self, steps=steps, num_samples=n, size=size, init_image=images, mask=mask, strength=strength,
            precision=_precision.resolve(self.precision, _device(pipeline)),
        )  # fmt: skip
        for part in ("denoiser", "first_stage"):  # float32 masters; bf16/fp16 sampling runs a copy
            module = getattr(pipeline, part, None)  # a front end's stand-in pipeline may have neither
            parameters = module.parameters() if isinstance(module, torch.nn.Module) else ()
            cast = next((p.dtype for p in parameters if p.is_floating_point() and p.dtype != torch.float32), None)
            if cast is not None:
                raise SampleArgumentError(
                    f"the pipeline's {part} has {{dtype}} weights: ldmkit samples from float32 weights, in bf16 "
                    "or fp16 through a copy ({precision}='auto', 'bf16', 'fp16'); cast it back with .float()",
                    dtype=str(cast).removeprefix("torch."),
                )
        if checked.starts_from_init(inpainting=masked or region is not None) and not sampler.supports_init:
            raise SampleArgumentError(
                "sampler {sampler} does not support img2img ({init_image} with {strength})",
                sampler=type(sampler).__name__,
            )
        return checked

    def _check_masks(self, sampler: Any) -> None:
        """A mask given to a sampler that supports masks, with what it goes with."""
        if self.mask is None and self.latent_mask is None and self.known is None:
            return
        if not sampler.supports_mask:
            raise SampleArgumentError("sampler {sampler} does not support inpainting masks ({mask})",
                                      sampler=type(sampler).__name__)  # fmt: skip
        if self.mask is not None and self.init_image is None:
            raise SampleArgumentError("{mask} is a pixel mask over {init_image} (1 = repaint, 0 = keep): give {init_image} too")
        if self.mask is not None and self.latent_mask is not None:
            raise SampleArgumentError("give {mask}= (pixels, with {init_image}) or {latent_mask}= (with {known}), not both")
        if (self.latent_mask is None) != (self.known is None):
            raise SampleArgumentError("{latent_mask}= and {known}= go together (the latent region and its latents)")

    def latent_shape(self, pipeline: Any, cond: Mapping[str, Tensor]) -> tuple[int, ...]:
        """The shape of z_T for a validated request: the noise's, else the grid of ``size``
        (or the pipeline's ``image_size``), else that of a spatial (``concat``) condition,
        whose inputs then set the size (a 2x semantic map samples at 2x)."""
        if self.noise is not None:
            return tuple(self.noise.shape)
        first_stage = pipeline.first_stage
        concat = cond.get("concat")
        if self.size is None and concat is not None:
            return (self.num_samples, first_stage.latent_channels, *concat.shape[-2:])
        size = self.size or pipeline.image_size
        if size is None:
            raise SampleArgumentError("the image size is unknown: give {size}, or set image_size in the config")
        h, w = size if isinstance(size, tuple) else (size, size)
        shape = (self.num_samples, *first_stage.latent_shape(h, w))
        if concat is not None and tuple(concat.shape[-2:]) != shape[-2:]:
            f = first_stage.downsample_factor
            raise SampleArgumentError(
                f"{{size}} {h}x{w} makes a {shape[-2]}x{shape[-1]} latent (f={f}), but the conditioner's concat "
                f"condition is {concat.shape[-2]}x{concat.shape[-1]}: give inputs for a {h}x{w} image (a map, mask "
                "or image of that size; a low-res image its factor times smaller) or leave {size} out to follow them"
            )
        return shape

    def starts_from_init(self, *, inpainting: bool) -> bool:
        """Whether the sampler starts from ``init_image``'s latents: img2img, and inpainting
        below strength 1 (at 1 the repainted region starts from pure noise)."""
        return self.init_image is not None and not (inpainting and self.strength == 1.0)

    def check_memory(
        self,
        pipeline: Any,
        shape: tuple[int, ...],
        cond: Mapping[str, Tensor],
        uncond: Mapping[str, Tensor] | None,
    ) -> None:
        """Refuse a validated request whose tensors cannot fit the free memory of the
        pipeline's device, before any is made (:class:`ldmkit.devices.InsufficientMemoryError`,
        naming the numbers): the latents (``shape``) and images of all samples, plus the
        largest of one chunk's denoiser step (both halves under guidance, ``uncond``), its
        decode and the init image's encode, counted by running them on the meta device.
        Calls whose images take less than 1/1024 of the free memory are let through
        unestimated (a first meta run costs a second, and activations of 1024x the images
        are beyond the first stages and denoisers we know)."""
        n, channels, h, w = shape
        if self.seed is not None:  # one seeded generator per sample, in the CPU's memory
            devices.check_fits(
                GENERATOR_BYTES * n, "cpu", f"drawing the noise of {n} samples (a seeded generator each)",
                "; sample fewer images",
            )
        device = _device(pipeline)
        room = devices.available_memory(device)
        if room is None:
            return
        first_stage, denoiser = pipeline.first_stage, pipeline.denoiser
        f = first_stage.downsample_factor
        fixed = 4 * n * channels * h * w + 4 * n * first_stage.image_channels * h * w * f * f  # float32
        if fixed * 1024 <= room[0]:
            return
        rows = min(self.batch_size or n, n)
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
            th, tw = (h, w) if self.tile is None else (min(self.tile, h), min(self.tile, w))
            runs = {
                f"the denoiser's step on {steps} latent{'s' * (steps > 1)} of {channels}x{h}x{w}": lambda: denoiser(
                    meta(steps, channels, h, w), torch.zeros(steps, dtype=torch.long, device="meta"), context
                ),
                f"decoding {rows} latent{'s' * (rows > 1)} of {channels}x{th}x{tw}": lambda: first_stage.decode(
                    meta(rows, channels, th, tw)
                ),
            }
            if self.init_image is not None:
                b, c = self.init_image.shape[:2]
                runs[f"encoding the init image{'s' * (b > 1)}"] = lambda: first_stage.encode(meta(b, c, th * f, tw * f))
            for what, run in runs.items():
                peak = devices.meta_peak_bytes(pipeline, run) or 0
                if what.startswith("the denoiser's") and self.precision in ("bf16", "fp16"):
                    peak //= 2  # activations in half precision
                if peak > largest:
                    largest, name = peak, what
        detail = f"the latents and images {devices.format_bytes(fixed)}" + (
            f", {name} {devices.format_bytes(largest)}" if name else ""
        )
        try:
            devices.check_fits(
                fixed + largest,
                device,
                f"sampling {n} image{'s' * (n != 1)} of {h * f}x{w * f}" + (f", {rows} at a time," if rows < n else ""),
                f" (estimated: {detail}); sample fewer images at once (batch_size), decode in tiles (tile) "
                "or choose a smaller size",
            )
        except devices.InsufficientMemoryError as err:
            err.names = ("batch_size", "tile")  # for message()
            raise


GENERATOR_BYTES = 2_700  # a CPU torch.Generator: its Mersenne Twister state and the object (measured)


# -- the checks -----------------------------------------------------------------------------------
def _device(pipeline: Any) -> torch.device:
    return pipeline.scale_factor.device


def _guidance(value: Any) -> float:
    try:
        scale = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        scale = math.nan
    if not math.isfinite(scale) or scale < 0:
        shown = value if math.isnan(scale) and not isinstance(value, float) else scale  # -2 and -2.0 alike
        raise SampleArgumentError(
            "{guidance_scale} must be a number >= 0 (1: no guidance, 0: unconditional), got {got!r}", got=shown
        )
    return scale


def _strength(value: Any) -> float:
    try:
        strength = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        strength = math.nan
    if not 0.0 < strength <= 1.0:
        shown = value if math.isnan(strength) else strength  # 0 and 0.0 alike
        raise SampleArgumentError(
            "{strength} must be in (0, 1], got {got!r}: the share of the steps run from {init_image}, noised "
            "(1 = all of them)",
            got=shown,
        )
    return strength


def _size(size: Any, alias: Any) -> tuple[int, int] | None:
    """``size`` (or its alias ``image_size``) as ``(height, width)`` of positive ints."""
    pairs = [_pair(v) for v in (size, alias) if v is not None]
    if len(pairs) == 2 and pairs[0] != pairs[1]:
        raise SampleArgumentError("{size}={given} and {image_size}={alias} disagree: give one of them", given=size, alias=alias)
    return pairs[0] if pairs else None


def _pair(size: Any) -> tuple[int, int]:
    listed = isinstance(size, Sequence) and not isinstance(size, str)
    sides = list(size) if listed else [size, size]
    try:
        if len(sides) == 2:
            return whole_number(sides[0], "size", 1), whole_number(sides[1], "size", 1)
    except SampleArgumentError:
        pass
    shown = tuple(size) if listed else size
    raise SampleArgumentError("{size} must be a whole number >= 1 or (height, width) of them, got {got!r}", got=shown)


def _check_size(size: tuple[int, int], f: int, max_side: int | None) -> None:
    h, w = size
    if h % f or w % f:
        raise SampleArgumentError(
            f"{{size}} {h}x{w} is not divisible by the first stage's downsample factor f={f}: "
            f"height and width must be positive multiples of {f}"
        )
    if max_side is not None and max(h, w) > max_side:
        raise SampleArgumentError(f"{{size}} {h}x{w} is over the largest allowed here, {max_side}x{max_side}")


def _init_images(init_image: Any, first_stage: Any, device: torch.device) -> Tensor:
    """``init_image`` as B×C×H×W float32 on ``device``, in [-1, 1]."""
    channels = first_stage.image_channels
    try:
        x = torch.as_tensor(init_image)
    except (TypeError, ValueError, RuntimeError):
        x = None
    given = tuple(x.shape) if x is not None else type(init_image).__name__
    if x is not None and x.ndim == 3:
        x = x[None]
    if x is None or x.ndim != 4 or x.shape[1] != channels or not x.is_floating_point():
        got = f"shape {given} ({x.dtype})" if x is not None else f"a {given}"
        raise SampleArgumentError(
            f"{{init_image}} must be float images B×{channels}×H×W (or {channels}×H×W) in [-1, 1] for this first "
            f"stage ({channels} channels), got {{got}}",
            got=got,
        )
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= -1 - 1e-4 and hi <= 1 + 1e-4):  # NaN fails both
        raise SampleArgumentError(
            f"{{init_image}} values must be in [-1, 1], got [{lo:g}, {hi:g}] (images in [0, 1] map to [-1, 1] as "
            "x * 2 - 1)"
        )
    return x.to(device=device, dtype=torch.float32)


def _count(conditioner: Any, batch: Mapping[str, Any], num_samples: int | None) -> int:
    """The number of samples: the conditions', which ``num_samples`` must match; else
    ``num_samples`` (default 1)."""
    keys = conditioner.input_keys
    for key in keys:
        conditioner.read(batch, key)  # a missing key names the conditioner and the key
    if not keys:
        return 1 if num_samples is None else num_samples
    sizes = {key: len(batch[key]) for key in keys}
    n = sizes[keys[0]]
    if any(size != n for size in sizes.values()):
        raise SampleArgumentError("the condition inputs ({batch}) hold different numbers of samples: {sizes}", sizes=sizes)
    if num_samples is not None and num_samples != n:
        raise SampleArgumentError(
            f"{{num_samples}}={num_samples} but the {{batch}} holds {n} conditions (key {{key!r}})", key=keys[0]
        )
    return n


def _check_negative(conditioner: Any, negative: Mapping[str, Any], n: int) -> None:
    """The negative condition's keys are the conditioner's inputs, each with 1 or ``n`` values."""
    keys = list(conditioner.input_keys)
    if not keys:
        raise SampleArgumentError(
            "{negative} given, but conditioner {name} reads no inputs: there is nothing to steer away from",
            name=type(conditioner).__name__,
        )
    unknown = sorted(str(k) for k in negative if k not in keys)
    if unknown:
        raise SampleArgumentError(
            "{negative} has key(s) {unknown} that conditioner {name} does not read (its inputs: {keys})",
            unknown=", ".join(map(repr, unknown)), name=type(conditioner).__name__, keys=", ".join(keys),
        )
    for key, value in negative.items():
        if not hasattr(value, "__len__") or isinstance(value, str) or (isinstance(value, Tensor) and value.ndim == 0):
            raise SampleArgumentError(
                "{negative}[{key!r}] is {got!r}, not a list: give [value] for every sample, or one per sample",
                key=key, got=value,
            )
        if len(value) not in (1, n):
            raise SampleArgumentError(
                "{negative}[{key!r}] holds {size} values for {n} samples: give 1 (for all) or {n}",
                key=key, size=len(value), n=n,
            )


def negative_batch(batch: Mapping[str, Any], negative: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The conditioner inputs of the guidance's negative branch: ``negative``'s values, one per
    sample (a single value repeated), and ``batch``'s for the keys it leaves out."""
    return {**batch, **{key: _repeat(value, n) for key, value in negative.items()}}


def _repeat(value: Any, n: int) -> Any:
    if len(value) == n:
        return value
    if isinstance(value, Tensor):
        return value.expand(n, *value.shape[1:])
    return list(value) * n

