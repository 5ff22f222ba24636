"""ldmkit's first-party first stages (Rombach et al. 2022, Sec. 3.1).

One encoder/decoder engine (:class:`~ldmkit_autoencoders.engine.AutoencodingEngine`) with a
pluggable regularizer: ``kl`` (diagonal Gaussian posterior, KL penalty) and ``vq`` (vector
quantizer absorbed into the decoder), plus ``identity`` (f = 1).
"""

__all__ = ["AutoencodingEngine", "IdentityFirstStage", "KLAutoencoder", "VQAutoencoder"]


def __getattr__(name: str):
    if name == "IdentityFirstStage":
        from ldmkit_autoencoders.identity import IdentityFirstStage

        return IdentityFirstStage
    if name == "KLAutoencoder":
        from ldmkit_autoencoders.kl import KLAutoencoder

        return KLAutoencoder
    if name == "VQAutoencoder":
        from ldmkit_autoencoders.vq import VQAutoencoder

        return VQAutoencoder
    if name == "AutoencodingEngine":
        from ldmkit_autoencoders.engine import AutoencodingEngine

        return AutoencodingEngine
    raise AttributeError(f"module 'ldmkit_autoencoders' has no attribute {name!r}")
