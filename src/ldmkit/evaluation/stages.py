"""The evaluators of ldmkit's own training stages, registered with their stages through
``ldmkit_register_stages`` (``register(NAME, evaluate=...)``), the way a plugin adds an
evaluator to a stage it did not register. The stages themselves are
:mod:`ldmkit.training.stages`; training never imports evaluation.

The evaluators are imported when they run, not when the stages are listed; what the
``eval`` keys of ``ldmkit evaluate`` take (:mod:`ldmkit.evaluation.schema`) when a config is
checked.
"""

from __future__ import annotations

from typing import Any

from ldmkit.hookspecs import hookimpl


def evaluate_autoencoder(cfg: Any, **kwargs: Any) -> dict[str, Any]:
    """Reconstruction metrics of a trained first stage on ``eval.split``
    (:func:`ldmkit.evaluation.autoencoder.evaluate_autoencoder`)."""
    from ldmkit.evaluation.autoencoder import evaluate_autoencoder

    return evaluate_autoencoder(cfg, **kwargs)


def evaluate_ldm(cfg: Any, **kwargs: Any) -> dict[str, Any]:
    """Sample quality of a trained latent diffusion model on ``eval.split``
    (:func:`ldmkit.evaluation.ldm.evaluate_ldm`)."""
    from ldmkit.evaluation.ldm import evaluate_ldm

    return evaluate_ldm(cfg, **kwargs)


@hookimpl
def ldmkit_register_stages(register):
    register("autoencoder", evaluate=evaluate_autoencoder)
    register("ldm", evaluate=evaluate_ldm)


@hookimpl
def ldmkit_register_config_keys(register):
    from ldmkit.evaluation.schema import EVAL_KEYS

    register("eval", EVAL_KEYS)
