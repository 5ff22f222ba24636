"""The ``Conditioner`` interface: tau_theta(y), the condition encoder.

A conditioner turns a batch (a mapping of its input keys to values: labels, captions,
segmentation maps, ...) into a dict keyed by *role*:

* ``"crossattn"``: B×M×d tokens the UNet attends to (K, V of cross-attention);
* ``"concat"``: B×C×h×w maps concatenated to the latent ``z_t`` (h×w = latent size);
* ``"vector"``: B×d vectors added to the timestep embedding (class / adm style).

It declares the dims of what it returns (``crossattn_dim``, ``concat_channels``,
``vector_dim``; None where absent) so composition can check them against the
Denoiser before anything runs. ``unconditional(batch)`` returns the null condition
with the same shapes, used by classifier-free guidance.

A complete minimal plugin (a learned embedding per class, as cross-attention tokens)::

    import torch
    from torch import nn
    import ldmkit
    from ldmkit.interfaces import Conditioner

    class ClassTokens(Conditioner):
        input_keys = ("label",)

        def __init__(self, *, num_classes: int = 10, embed_dim: int = 32):
            super().__init__()
            self.crossattn_dim = embed_dim
            # one extra row is the learned "no class" token for guidance
            self.embedding = nn.Embedding(num_classes + 1, embed_dim)
            self.null_index = num_classes

        def forward(self, batch):
            labels = torch.as_tensor(batch["label"], device=self.embedding.weight.device)
            return {"crossattn": self.embedding(labels)[:, None, :]}

        def unconditional(self, batch):
            n = len(batch["label"])
            idx = torch.full((n,), self.null_index, device=self.embedding.weight.device)
            return {"crossattn": self.embedding(idx)[:, None, :]}

    @ldmkit.hookimpl
    def ldmkit_register_conditioners(register):
        register("class_tokens", ClassTokens)
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

CONDITION_ROLES = ("crossattn", "concat", "vector")


class Conditioner(nn.Module, abc.ABC):
    """tau_theta: batch -> ``{"crossattn": B×M×d, "concat": B×C×h×w, "vector": B×d}``.

    Set the dims of the roles you return in ``__init__``; leave the others None.
    ``input_keys`` names the batch keys the conditioner reads.
    """

    input_keys: tuple[str, ...] = ()
    crossattn_dim: int | None = None
    concat_channels: int | None = None
    vector_dim: int | None = None

    @abc.abstractmethod
    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Encode the condition of a batch; keys are roles from ``CONDITION_ROLES``."""

    def unconditional(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The null condition (same keys and shapes as ``forward``).

        The default is all zeros; learned null tokens are better, override where
        you have them.
        """
        return {k: torch.zeros_like(v) for k, v in self.forward(batch).items()}

    def output_dims(self) -> dict[str, int]:
        """The declared dims of the roles this conditioner returns."""
        dims = {
            "crossattn": self.crossattn_dim,
            "concat": self.concat_channels,
            "vector": self.vector_dim,
        }
        return {k: v for k, v in dims.items() if v is not None}

    def bind_first_stage(self, first_stage: nn.Module) -> None:
        """Called once at composition with the pipeline's first stage.

        Conditioners that encode images into latents (inpainting's masked image)
        keep a reference here; the default ignores it.
        """
