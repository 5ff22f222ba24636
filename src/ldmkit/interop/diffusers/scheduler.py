"""The noise schedule, the sampler and its spacing as a diffusers scheduler, both ways: each
ldmkit sampler as the diffusers scheduler of the same method (:data:`SAMPLER_TO_SCHEDULER`:
``ddim`` as ``DDIMScheduler``, ``plms`` as ``PNDMScheduler`` with ``skip_prk_steps``,
``dpmpp_2m`` as ``DPMSolverMultistepScheduler``, ...), the spacing in that class's terms (the
paper's DDIM spacing is ``leading`` + ``steps_offset=1`` + ``set_alpha_to_one=False``; a sigma
sampler's ``karras`` is ``use_karras_sigmas``), and back."""

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


# ldmkit's samplers -> the diffusers scheduler of the same method, and the options that make it
# so; the samplers not listed (dpmpp_2s_ancestral, dpmpp_3m_sde: no diffusers class) are written
# as a DDIMScheduler, with a warning
SAMPLER_TO_SCHEDULER: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),  # diffusers' PLMS: no Runge-Kutta warm-up
    "ddpm": ("DDPMScheduler", {"variance_type": "fixed_small", "clip_sample": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# the classes that step over discrete timesteps (alpha_bar), as DDIM does: ldmkit's spacings go to
# (timestep_spacing, steps_offset, set_alpha_to_one); the others step over noise levels (sigmas)
ALPHA_SCHEDULERS = ("DDIMScheduler", "PNDMScheduler", "DDPMScheduler")
# the sigma classes that take use_karras_sigmas / use_exponential_sigmas (diffusers 0.30+)
SIGMA_GRIDS = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
               "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")  # fmt: skip
# a sampler option (at its value) that the scheduler has no counterpart of: written without it
_DIFFUSERS_LACKS = {
    "s_churn": 0.0, "eta": 1.0, "quantize": False, "order": None, "corrector": True,
}  # fmt: skip


def diffusers_scheduler_config(
    schedule: dict[str, Any], sampler: dict[str, Any], prediction: str
) -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` for ``sampler``: the diffusers scheduler of the
    same method (:data:`SAMPLER_TO_SCHEDULER`), the schedule's betas, the spacing in that
    class's terms; one :class:`ConversionWarning` for each thing diffusers will do otherwise."""
    name = str(sampler.get("name", "ddim"))
    class_name, fixed = SAMPLER_TO_SCHEDULER.get(name, ("DDIMScheduler", {}))
    if name not in SAMPLER_TO_SCHEDULER:  # ldmkit's others have other maths
        _warn(f"sampler={name} has no diffusers scheduler: it is written as a DDIMScheduler (scheduler/ holds "
              f"the schedule and the timestep spacing): diffusers samples it with DDIM; ldmkit.json keeps "
              f"sampler={name} for from-diffusers, or set the scheduler you want on the diffusers side")  # fmt: skip
    spacing = str(sampler.get("spacing") or _default_spacing(name))
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
    config: dict[str, Any] = {
        "_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(schedule["timesteps"]), "beta_start": float(schedule["linear_start"]),
        "beta_end": float(schedule["linear_end"]), "beta_schedule": kind, "trained_betas": None,
        "prediction_type": PREDICTION_TO_DIFFUSERS[prediction],
    }  # fmt: skip
    if class_name in ALPHA_SCHEDULERS:
        config.update(_alpha_spacing(class_name, spacing))
        if class_name != "PNDMScheduler":
            config.update(clip_sample=False, thresholding=False, rescale_betas_zero_snr=False)
    else:
        config.update(_sigma_spacing(class_name, spacing))
    config.update(fixed)
    if name == "dpmpp_2m_sde":
        config["solver_type"] = str(sampler.get("solver_type", "midpoint"))
    if name == "unipc":
        config.update(solver_order=int(sampler.get("order", 2)), solver_type=str(sampler.get("variant", "bh2")),
                      lower_order_final=bool(sampler.get("lower_order_final", True)))  # fmt: skip
    if name in SAMPLER_TO_SCHEDULER:
        lacked = [
            f"{key}={sampler[key]}"
            for key, plain in _DIFFUSERS_LACKS.items()
            if key in sampler and sampler[key] is not None and sampler[key] != plain
            and not (key == "order" and (name == "unipc" or (name == "lms" and int(sampler[key]) == 4)))
            and not (key == "eta" and name == "ddim")
        ]
        if lacked:
            _warn(f"sampler={name} is written as a {class_name}, which has no {', '.join(lacked)} in its config: "
                  f"diffusers samples it without (ldmkit.json keeps them for from-diffusers)")  # fmt: skip
    return config


def _default_spacing(name: str) -> str:
    """The spacing of a sampler config without one: its class's ``default_spacing``
    (``DiscreteSampler``/``SigmaSampler``: linspace; ``plms``: paper; the SDE multisteps: karras)."""
    return {"plms": "paper", "dpmpp_2m_sde": "karras", "dpmpp_3m_sde": "karras"}.get(name, "linspace")


def _alpha_spacing(class_name: str, spacing: str) -> dict[str, Any]:
    nearest = NEAREST_DDIM_SPACING.get(spacing, spacing)
    _require(
        nearest in SPACING_TO_DDIM,
        f"sampler.spacing={spacing!r} has no {class_name} counterpart ({sorted(SPACING_TO_DDIM)})",
    )
    if nearest != spacing:  # the weights export whatever the sampling default; say what differs
        _warn(f"sampler.spacing={spacing!r} has no {class_name} counterpart: scheduler/ is written with the "
              f"nearest, {nearest!r}, whose timesteps differ (ldmkit.json keeps {spacing!r} for from-diffusers); "
              f"for a scheduler that samples as ldmkit does, set sampler.spacing to one of {sorted(SPACING_TO_DDIM)} "
              "in the pipeline's config.yaml and export again")  # fmt: skip
    timestep_spacing, offset, alpha_one = SPACING_TO_DDIM[nearest]
    out: dict[str, Any] = {"timestep_spacing": timestep_spacing, "steps_offset": offset}
    if class_name != "DDPMScheduler":
        out["set_alpha_to_one"] = alpha_one
    elif not alpha_one:
        _warn(f"sampler.spacing={spacing!r} ends at alpha_bar_0; DDPMScheduler's last step goes to "
              "alpha_bar = 1 (ldmkit.json keeps the spacing for from-diffusers)")  # fmt: skip
    return out


# ldmkit's spacing of a sigma sampler -> the sigma class's (timestep_spacing, steps_offset, grid)
# (the paper's timesteps, leading + 1, end at sigma_0 in ldmkit, at 0 in diffusers: said in a warning)
SPACING_TO_SIGMAS = {"linspace": ("linspace", 0, None), "karras": ("linspace", 0, "karras"),
                     "exponential": ("linspace", 0, "exponential"), "leading": ("leading", 0, None),
                     "trailing": ("trailing", 0, None), "paper": ("leading", 1, None)}  # fmt: skip


# the multistep classes whose linspace and leading grids take S + 1 points and drop the last
_EXTRA_POINT = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


def _sigma_spacing(class_name: str, spacing: str) -> dict[str, Any]:
    nearest = {"quad": "paper"}.get(spacing, spacing)
    if nearest in ("karras", "exponential") and class_name not in SIGMA_GRIDS:
        nearest = "linspace"
    _require(
        nearest in SPACING_TO_SIGMAS,
        f"sampler.spacing={spacing!r} has no {class_name} counterpart ({sorted(SPACING_TO_SIGMAS)})",
    )
    if nearest != spacing:
        _warn(f"sampler.spacing={spacing!r} has no {class_name} counterpart: scheduler/ is written with the "
              f"nearest, {nearest!r}, whose noise levels differ (ldmkit.json keeps {spacing!r} for "
              "from-diffusers)")  # fmt: skip
    if class_name in _EXTRA_POINT and nearest in ("linspace", "leading", "paper"):
        _warn(f"{class_name}'s timestep_spacing={SPACING_TO_SIGMAS[nearest][0]!r} places S + 1 timesteps and "
              f"drops the last: its noise levels differ from ldmkit's sampler.spacing={nearest!r} (karras, "
              "exponential and trailing give the same levels in both; ldmkit.json keeps the spacing for "
              "from-diffusers)")  # fmt: skip
    elif spacing == "paper":
        _warn(f"sampler.spacing='paper' is written as {class_name}'s leading + steps_offset 1: the same "
              "timesteps, but its last step goes to sigma = 0 where ldmkit's goes to sigma_0 (ldmkit.json keeps "
              "'paper' for from-diffusers)")  # fmt: skip
    timestep_spacing, offset, grid = SPACING_TO_SIGMAS[nearest]
    out: dict[str, Any] = {"timestep_spacing": timestep_spacing, "steps_offset": offset}
    if class_name in SIGMA_GRIDS:
        out.update(use_karras_sigmas=grid == "karras", use_exponential_sigmas=grid == "exponential")
    return out


def _warn(message: str) -> None:
    warnings.warn(message, ConversionWarning, stacklevel=4)


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
    class_name = str(c.get("_class_name") or "DDIMScheduler")
    if class_name in ALPHA_SCHEDULERS or class_name not in SCHEDULER_TO_SAMPLER:  # unknown: read as DDIM
        spacing = _alpha_spacing_from(c, class_name, where)
    else:
        spacing = _sigma_spacing_from(c, class_name, where)
    prediction = {v: k for k, v in PREDICTION_TO_DIFFUSERS.items()}.get(
        c.get("prediction_type", "epsilon")
    )
    _require(prediction is not None, f"{where}: prediction_type={c.get('prediction_type')!r}")
    return schedule, _sampler_from(c, class_name, spacing, where), prediction


# diffusers' scheduler -> ldmkit's sampler of the same method: the first sampler written as that
# class (DPMSolverMultistepScheduler is dpmpp_2m; its sde-dpmsolver++ is dpmpp_2m_sde, below)
SCHEDULER_TO_SAMPLER = {cls: name for name, (cls, _) in reversed(SAMPLER_TO_SCHEDULER.items())}


def _alpha_spacing_from(c: dict[str, Any], class_name: str, where: str) -> str:
    ddim = (
        c.get("timestep_spacing", "leading"),
        _value(c, "steps_offset", Integer(0), where, 0),
        # DDPMScheduler has no set_alpha_to_one: its last step goes to alpha_bar = 1
        bool(c.get("set_alpha_to_one", True)) or class_name == "DDPMScheduler",
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
            stacklevel=5,
        )
    return spacing


def _sigma_spacing_from(c: dict[str, Any], class_name: str, where: str) -> str:
    if c.get("use_karras_sigmas"):
        return "karras"
    if c.get("use_exponential_sigmas"):
        return "exponential"
    timestep_spacing = str(c.get("timestep_spacing", "linspace"))
    offset = _value(c, "steps_offset", Integer(0), where, 0)
    if (timestep_spacing, offset) == ("leading", 1):
        return "paper"
    if timestep_spacing in ("linspace", "leading", "trailing") and offset == 0:
        return timestep_spacing
    warnings.warn(
        f"{where}: timestep_spacing={timestep_spacing!r}, steps_offset={offset} has no ldmkit spacing: read as "
        "sampler.spacing='linspace', whose noise levels differ",
        ConversionWarning,
        stacklevel=5,
    )
    return "linspace"


def _sampler_from(c: dict[str, Any], class_name: str, spacing: str, where: str) -> dict[str, Any]:
    """ldmkit's sampler for a scheduler config: the same method where ldmkit has it."""
    if class_name == "DDIMScheduler":
        return {"name": "ddim", "steps": 50, "eta": 0.0, "spacing": spacing}
    name = SCHEDULER_TO_SAMPLER.get(class_name)
    if name is None:
        warnings.warn(
            f"{where}: ldmkit has no sampler of {class_name}'s method: read as sampler=ddim (the schedule and the "
            "spacing are the scheduler's); set sampler=... to pick another",
            ConversionWarning,
            stacklevel=4,
        )
        return {"name": "ddim", "steps": 50, "eta": 0.0, "spacing": spacing}
    if class_name == "PNDMScheduler" and not c.get("skip_prk_steps", False):
        warnings.warn(
            f"{where}: skip_prk_steps=False (PNDM's Runge-Kutta warm-up) is read as sampler=plms, which warms "
            "up as the latent diffusion paper's PLMS does (one pseudo improved Euler step)",
            ConversionWarning,
            stacklevel=4,
        )
    sampler: dict[str, Any] = {"name": name, "spacing": spacing}
    if class_name == "DPMSolverMultistepScheduler":
        algorithm, order = str(c.get("algorithm_type", "dpmsolver++")), _value(c, "solver_order", WHOLE, where, 2)
        if algorithm == "sde-dpmsolver++":
            sampler.update(name="dpmpp_2m_sde", solver_type=str(c.get("solver_type", "midpoint")))
        if algorithm not in ("dpmsolver++", "sde-dpmsolver++") or order != 2:
            warnings.warn(
                f"{where}: algorithm_type={algorithm!r}, solver_order={order} is read as sampler={sampler['name']} "
                "(DPM-Solver++ of order 2), the nearest ldmkit has",
                ConversionWarning,
                stacklevel=4,
            )
    if class_name == "UniPCMultistepScheduler":
        sampler.update(order=_value(c, "solver_order", WHOLE, where, 2), variant=str(c.get("solver_type", "bh2")),
                       lower_order_final=bool(c.get("lower_order_final", True)))  # fmt: skip
    return sampler
