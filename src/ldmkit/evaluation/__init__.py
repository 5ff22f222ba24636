"""Evaluation: ``evaluate(cfg)`` scores the stage ``cfg.stage`` names with the evaluator that
stage registered (``ldmkit_register_stages``) and writes JSON.

Owns the metrics and evaluators. May import the layers below it, and ``training`` (it
evaluates training runs); never ``cli`` or ``demo``.
"""

from __future__ import annotations

from typing import Any


def evaluate(cfg: Any, **kwargs: Any) -> dict[str, Any]:
    """Evaluate per ``cfg.stage`` (``autoencoder``: reconstruction metrics on the test split);
    ``kwargs`` go to the stage's evaluator. A stage without an evaluator is a ConfigError
    naming the stages that have one."""
    from ldmkit.config import ConfigError
    from ldmkit.plugins import get_registry
    from ldmkit.training import get_stage

    stage = get_stage(cfg.get("stage"))
    if stage.evaluate is None:
        registry = get_registry()
        provider = registry.get("stage", stage.name).provider
        others = [n for n in registry.names("stage") if registry.stage(n).evaluate is not None]
        raise ConfigError(
            f"stage {stage.name!r} (from {provider}) has no evaluator; stages with one: "
            f"{', '.join(others) or '(none)'}"
        )
    return stage.evaluate(cfg, **kwargs)


__all__ = ["evaluate"]
