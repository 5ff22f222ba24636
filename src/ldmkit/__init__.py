"""ldmkit: Latent Diffusion Models, built from plugins."""

from ldmkit._version import __version__
from ldmkit.hookspecs import hookimpl

__all__ = ["Pipeline", "SampleRequest", "__version__", "compose", "hookimpl"]


def __getattr__(name: str):
    # compose/Pipeline/SampleRequest pull in torch and Hydra; keep `import ldmkit` (and
    # plugins' imports of `ldmkit.hookimpl`) cheap
    if name == "compose":
        from ldmkit.pipeline import compose

        return compose
    if name == "Pipeline":
        from ldmkit.pipeline import Pipeline

        return Pipeline
    if name == "SampleRequest":
        from ldmkit.sampling_request import SampleRequest

        return SampleRequest
    raise AttributeError(f"module 'ldmkit' has no attribute {name!r}")
