"""Interop: reading other codebases' checkpoints and configs into ldmkit configs and state
dicts (:mod:`ldmkit.interop.compvis`: the paper's ``.ckpt`` + ``config.yaml``), and ldmkit
pipelines as diffusers folders and back (:mod:`ldmkit.interop.diffusers`).

Owns the translation of foreign configs and parameter names. May import the foundation,
``ldmkit.weights``, ``ldmkit.checkpoint_layout`` and ``ldmkit.config`` (to compose the
translated config); never ``pipeline`` (which calls it: ``Pipeline.from_compvis``),
``training``, ``cli`` or a plugin.
"""
