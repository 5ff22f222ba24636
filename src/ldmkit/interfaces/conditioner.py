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

The batch keys a conditioner reads are its own business: ``input_keys`` names them and
``input_kinds`` says what each holds (``class``, ``text``, ``image``, ``segmentation``,
``mask``, ``tokens``: a sequence of token ids per sample, ``number``: one float per
sample), so that the data loader, the
latent cache, ``Pipeline.sample`` and ``ldmkit sample --cond key=value`` pass them through
without a key list in the core.
Read them with ``self.read(batch, key)``: a missing key is a :class:`MissingConditionError`
naming the conditioner and the key. Raise :class:`ConditionValueError` for a value the
conditioner cannot use (a class id out of range, a map of the wrong size): like every
``LdmkitError`` the CLI prints it in one line, without a traceback.

Training adds two things on top of ``forward``:

* ``training_inputs(batch, generator)`` derives inputs that training data lacks but
  sampling users supply (a random inpainting mask, a degraded low-resolution image);
  ``data_keys`` names what it needs from the data (default: ``input_keys``).
* ``condition(batch, generator=)`` is ``forward`` with classifier-free-guidance dropout:
  each sample's condition is replaced by the null one with probability ``drop_rate``
  (every conditioner config may set ``drop_rate``; composition applies it).

A complete minimal plugin (a learned embedding per class, as cross-attention tokens)::

    import torch
    from torch import nn
    import ldmkit
    from ldmkit.interfaces import Conditioner, ConditionValueError

    class ClassTokens(Conditioner):
        input_keys = ("label",)
        input_kinds = {"label": "class"}

        def __init__(self, *, num_classes: int = 10, embed_dim: int = 32):
            super().__init__()
            self.crossattn_dim = embed_dim
            # one extra row is the learned "no class" token for guidance
            self.embedding = nn.Embedding(num_classes + 1, embed_dim)
            self.null_index = num_classes

        def forward(self, batch):
            labels = torch.as_tensor(self.read(batch, "label"), device=self.embedding.weight.device)
            if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < self.null_index:
                # an LdmkitError: `ldmkit sample --labels 12` prints it in one line
                raise ConditionValueError(
                    f"labels must be in [0, {self.null_index}) (num_classes), got {labels.tolist()}"
                )
            return {"crossattn": self.embedding(labels)[:, None, :]}

        def unconditional(self, batch):
            n = len(self.read(batch, "label"))
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

from ldmkit.errors import LdmkitError
from ldmkit.interfaces.component import Component

CONDITION_ROLES = ("crossattn", "concat", "vector")
#: per role: the attribute that declares its dim, and the tensor it is (ndim, the axis of that dim, layout)
ROLE_DIMS = {
    "crossattn": ("crossattn_dim", 3, -1, "B×M×crossattn_dim"),
    "concat": ("concat_channels", 4, 1, "B×concat_channels×h×w"),
    "vector": ("vector_dim", 2, 1, "B×vector_dim"),
}
INPUT_KINDS = ("class", "text", "image", "segmentation", "mask", "tokens", "number")


class MissingConditionError(LdmkitError, KeyError):
    """A batch lacks a key a conditioner reads (the message names both)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class ConditionValueError(LdmkitError, ValueError):
    """A condition's value is unusable (a class id out of range, a mask of the wrong size)."""


class Conditioner(nn.Module, Component, abc.ABC):
    """tau_theta: batch -> ``{"crossattn": B×M×d, "concat": B×C×h×w, "vector": B×d}``.

    Set the dims of the roles you return in ``__init__``; leave the others None.
    ``input_keys`` names the batch keys the conditioner reads, ``input_kinds`` what
    each one holds (a kind from ``INPUT_KINDS``; keys left out are treated as ``class``).
    """

    input_keys: tuple[str, ...] = ()
    input_kinds: Mapping[str, str] = {}
    crossattn_dim: int | None = None
    concat_channels: int | None = None
    vector_dim: int | None = None
    #: probability, per sample, that training replaces the condition by the null one
    drop_rate: float = 0.0

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

    def declaration_problems(self) -> list[str]:
        """Beyond the interface's attributes: roles declared with no ``input_keys`` to read
        (``Pipeline.sample`` calls only a conditioner that reads some key)."""
        problems = super().declaration_problems()
        if self.output_dims() and not self.input_keys:
            problems.append(
                f"input_keys is empty but it declares the roles {sorted(self.output_dims())} (sampling calls "
                "only a conditioner that reads a batch key: list the keys forward reads)"
            )
        return problems

    def condition_problems(self, cond: Mapping[str, Tensor]) -> list[str]:
        """How ``cond`` (roles to tensors, as ``forward`` returns) departs from what this
        conditioner declares, one phrase each: a role returned whose dim is not declared, a
        declared one not returned, a tensor whose shape is not its role's with the declared dim."""
        declared = self.output_dims()
        problems = []
        for role in CONDITION_ROLES:
            attribute, ndim, axis, layout = ROLE_DIMS[role]
            value = cond.get(role)
            if value is None and role in declared:
                problems.append(f"it declares {attribute}={declared[role]} but returns no {role!r}")
            elif value is not None and role not in declared:
                problems.append(f"it returns {role!r} but {attribute} is not set")
            elif value is not None and (value.ndim != ndim or value.shape[axis] != declared[role]):
                problems.append(
                    f"{role!r} has shape {tuple(value.shape)}, not {layout} ({attribute}={declared[role]})"
                )
        return problems

    def bind_first_stage(self, first_stage: nn.Module) -> None:
        """Called once at composition with the pipeline's first stage.

        Conditioners that encode images into latents (inpainting's masked image)
        keep a reference here; the default ignores it.
        """

    # -- batch keys ----------------------------------------------------------------------
    def input_kind(self, key: str) -> str:
        """What ``batch[key]`` holds: one of ``INPUT_KINDS``."""
        return self.input_kinds.get(key, "class")

    @property
    def data_keys(self) -> tuple[str, ...]:
        """The keys training reads from the data (cached by the latent cache)."""
        return tuple(self.input_keys)

    def read(self, batch: Mapping[str, Any], key: str) -> Any:
        """``batch[key]``, or a :class:`MissingConditionError` naming this conditioner."""
        try:
            return batch[key]
        except KeyError:
            raise MissingConditionError(
                f"conditioner {type(self).__name__} reads batch key {key!r}, but the batch has "
                f"keys {sorted(k for k in batch if not str(k).startswith('__'))}"
            ) from None

    def known_region(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
        """For inpainting conditioners: ``(image, mask)`` in pixel space (B×C×H×W in
        [-1, 1]; B×1×H×W, 1 = generate, 0 = keep) whose kept part ``Pipeline.sample`` holds
        fixed in latent space through the sampler's mask; None (the default) otherwise."""
        return None

    @property
    def learns_null_condition(self) -> bool:
        """Whether training shows the model the null condition (``drop_rate > 0``): without
        it, classifier-free guidance extrapolates from an untrained unconditional score."""
        return self.drop_rate > 0

    # -- training --------------------------------------------------------------------------
    def training_inputs(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> Mapping[str, Any]:
        """Add the inputs training data lacks (e.g. a random mask); default: ``batch``.

        Return a new mapping rather than changing ``batch``; draw randomness from
        ``generator`` (None: the global RNG).
        """
        return batch

    def condition(
        self, batch: Mapping[str, Any], *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """``forward`` with per-sample dropout to ``unconditional`` at ``drop_rate``."""
        return self.drop_conditions(self(batch), batch, generator)

    def drop_conditions(
        self, cond: dict[str, Tensor], batch: Mapping[str, Any], generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        """Each sample of ``cond`` replaced by ``unconditional(batch)`` with probability
        ``drop_rate`` (composites call it on their merged parts). Anything but a mapping comes
        back as it is, for the caller to refuse naming the conditioner's plugin."""
        if self.drop_rate <= 0 or not isinstance(cond, Mapping) or not cond:
            return cond
        n = next(iter(cond.values())).shape[0]
        drop = torch.rand(n, generator=generator) < self.drop_rate
        return substitute(cond, self.unconditional(batch), drop)


def substitute(cond: Mapping[str, Tensor], uncond: Mapping[str, Tensor], drop: Tensor) -> dict[str, Tensor]:
    """Per sample, ``uncond`` where ``drop`` (a B bool tensor) is true, ``cond`` elsewhere."""
    out = {}
    for role, value in cond.items():
        mask = drop.to(value.device).reshape(-1, *([1] * (value.ndim - 1)))
        out[role] = torch.where(mask, uncond[role].to(value.dtype), value)
    return out
