"""Evaluation: ``evaluate(cfg)`` scores the stage ``cfg.stage`` names and writes JSON."""

from __future__ import annotations

from typing import Any


def evaluate(cfg: Any, **kwargs: Any) -> dict[str, Any]:
    """Evaluate per ``cfg.stage`` (``autoencoder``: reconstruction metrics on the test split)."""
    stage = cfg.get("stage")
    if stage == "autoencoder":
        from ldmkit.evaluation.autoencoder import evaluate_autoencoder

        return evaluate_autoencoder(cfg, **kwargs)
    if stage == "ldm":
        raise NotImplementedError("evaluating stage=ldm is not implemented yet; stage=autoencoder is")
    from ldmkit.config import ConfigError

    raise ConfigError(f"unknown stage {stage!r}; expected one of ('autoencoder', 'ldm')")


__all__ = ["evaluate"]
