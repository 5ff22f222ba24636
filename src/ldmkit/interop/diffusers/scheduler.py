"""The noise schedule and the sampler's spacing as diffusers' ``DDIMScheduler``, both ways
(the paper's DDIM spacing is ``leading`` + ``steps_offset=1`` + ``set_alpha_to_one=False``)."""

from __future__ import annotations

import warnings
from typing import Any

from ldmkit.config_checks import Integer
from ldmkit.diffusion.timesteps import SPACINGS
from ldmkit.interop.diffusers.common import (
    DIFFUSERS_VERSION,
    POSITIVE,
    WHOLE,
    ConversionWarning,
    _require,
    _value,
)

# the sampler's spacing <-> DDIMScheduler (timestep_spacing, steps_offset, set_alpha_to_one)
SPACING_TO_DDIM = {"paper": ("leading", 1, False), "leading": ("leading", 0, True),
                   "trailing": ("trailing", 0, True), "linspace": ("linspace", 0, True)}  # fmt: skip
# the spacings DDIMScheduler has no counterpart of, and the nearest it has: the paper's other
# DDIM grid (quad) ends at alpha_bar_0 as `paper` does; the sigma grids run from sigma_max to
# sigma_min as `linspace` does (the sigma samplers' default)
NEAREST_DDIM_SPACING = {"quad": "paper", "karras": "linspace", "exponential": "linspace"}
SCHEDULE_TO_DIFFUSERS = {
    "linear": "scaled_linear",
    "sqrt_linear": "linear",
    "cosine": "squaredcos_cap_v2",
}
COSINE_S = 8e-3  # the offset s of diffusers' squaredcos_cap_v2 (Nichol & Dhariwal's)
PREDICTION_TO_DIFFUSERS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def diffusers_scheduler_config(
    schedule: dict[str, Any], sampler: dict[str, Any], prediction: str
) -> dict[str, Any]:
    spacing = str(sampler.get("spacing", "paper"))
    nearest = NEAREST_DDIM_SPACING.get(spacing, spacing)
    _require(
        nearest in SPACING_TO_DDIM,
        f"sampler.spacing={spacing!r} has no DDIMScheduler counterpart ({sorted(SPACING_TO_DDIM)})",
    )
    if nearest != spacing:  # the weights export whatever the sampling default; say what differs
        warnings.warn(
            f"sampler.spacing={spacing!r} has no DDIMScheduler counterpart: scheduler/ is written with "
            f"the nearest, {nearest!r}, whose timesteps differ (ldmkit.json keeps {spacing!r} for "
            f"from-diffusers); for a scheduler that samples as ldmkit does, set sampler.spacing to one "
            f"of {sorted(SPACING_TO_DDIM)} in the pipeline's config.yaml and export again",
            ConversionWarning,
            stacklevel=3,
        )
    name = str(sampler.get("name", "ddim"))
    if name != "ddim":  # diffusers' folder names one scheduler class; ldmkit's others have other maths
        warnings.warn(
            f"sampler={name} is written as a DDIMScheduler (scheduler/ holds the schedule and the "
            f"timestep spacing): diffusers samples it with DDIM; ldmkit.json keeps sampler={name} "
            "for from-diffusers, or set the scheduler you want on the diffusers side",
            ConversionWarning,
            stacklevel=3,
        )
    kind = SCHEDULE_TO_DIFFUSERS.get(str(schedule["kind"]), str(schedule["kind"]))
    _require(
        kind in SCHEDULE_TO_DIFFUSERS.values(),
        f"schedule.kind={schedule['kind']!r} has no diffusers beta_schedule",
    )
    _require(
        kind != "squaredcos_cap_v2" or float(schedule.get("cosine_s", COSINE_S)) == COSINE_S,
        f"schedule.cosine_s={schedule.get('cosine_s')}: diffusers' squaredcos_cap_v2 has the offset "
        f"{COSINE_S} built in",
    )
    timestep_spacing, offset, alpha_one = SPACING_TO_DDIM[nearest]
    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(schedule["timesteps"]), "beta_start": float(schedule["linear_start"]),
        "beta_end": float(schedule["linear_end"]), "beta_schedule": kind, "trained_betas": None,
        "clip_sample": False, "set_alpha_to_one": alpha_one, "steps_offset": offset,
        "prediction_type": PREDICTION_TO_DIFFUSERS[prediction], "timestep_spacing": timestep_spacing,
        "thresholding": False, "rescale_betas_zero_snr": False,
    }  # fmt: skip


def _schedule_from_config(c: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str]:
    where = f"scheduler/scheduler_config.json ({c.get('_class_name')})"
    inverse = {v: k for k, v in SCHEDULE_TO_DIFFUSERS.items()}
    kind = inverse.get(c.get("beta_schedule", "linear"))
    _require(
        kind is not None,
        f"{where}: beta_schedule={c.get('beta_schedule')!r} (supported: {sorted(inverse)})",
    )
    _require(c.get("trained_betas") is None, f"{where}: trained_betas are not supported")
    _require(  # a schedule ldmkit's kinds do not make (the sampling options are the sampler's own)
        not c.get("rescale_betas_zero_snr"),
        f"{where}: rescale_betas_zero_snr={c.get('rescale_betas_zero_snr')!r} is not supported "
        "(ldmkit's schedules do not rescale their betas to a zero terminal SNR)",
    )
    schedule = {"kind": kind, "timesteps": _value(c, "num_train_timesteps", WHOLE, where, 1000),
                "linear_start": float(_value(c, "beta_start", POSITIVE, where, 1e-4)),
                "linear_end": float(_value(c, "beta_end", POSITIVE, where, 2e-2)), "cosine_s": COSINE_S}  # fmt: skip
    ddim = (
        c.get("timestep_spacing", "leading"),
        _value(c, "steps_offset", Integer(0), where, 0),
        bool(c.get("set_alpha_to_one", True)),
    )
    spacing = next((s for s, v in SPACING_TO_DDIM.items() if v == ddim), None)
    if spacing is None:  # the nearest ldmkit spacing of the scheduler's timestep_spacing
        spacing = (
            "paper"
            if ddim[:2] == ("leading", 1)
            else str(ddim[0])
            if ddim[0] in SPACING_TO_DDIM
            else "linspace"
        )
        difference = (  # leading + 1 with set_alpha_to_one=True: paper's timesteps, another end
            "the same timesteps, but its last step goes to alpha_bar_0, where set_alpha_to_one=True goes to alpha_bar = 1"
            if ddim[:2] == ("leading", 1)
            else f"whose timesteps differ ({SPACINGS[spacing]})"
        )
        warnings.warn(
            f"{where}: timestep_spacing={ddim[0]!r}, steps_offset={ddim[1]}, set_alpha_to_one={ddim[2]} has "
            f"no ldmkit spacing: read as sampler.spacing={spacing!r}, {difference}",
            ConversionWarning,
            stacklevel=4,
        )
    prediction = {v: k for k, v in PREDICTION_TO_DIFFUSERS.items()}.get(
        c.get("prediction_type", "epsilon")
    )
    _require(prediction is not None, f"{where}: prediction_type={c.get('prediction_type')!r}")
    return schedule, {"name": "ddim", "steps": 50, "eta": 0.0, "spacing": spacing}, prediction
