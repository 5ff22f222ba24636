"""Exponential moving average of model weights (used for sampling by default)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA(nn.Module):
    """``shadow <- shadow - (1 - d) (shadow - param)`` after each optimizer step.

    With ``warmup=True`` the n-th update (counting from 1) uses the decay
    ``min(decay, (1 + n) / (10 + n))``, as CompVis ``LitEma`` does (its first: 2/11), so early
    averages are not dominated by the random init.
    Only floating-point parameters that require grad are tracked.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
        self.shadow = nn.ParameterDict(
            {self._key(n): nn.Parameter(p.detach().clone(), requires_grad=False)
             for n, p in model.named_parameters() if n in set(self.names)}
        )
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")  # ParameterDict keys cannot contain dots

    def current_decay(self) -> float:
        """The decay of the next update."""
        n = int(self.num_updates) + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        params = dict(model.named_parameters())
        shadows = [self.shadow[self._key(n)] for n in self.names]
        currents = [params[n].detach() for n in self.names]
        torch._foreach_lerp_(shadows, currents, 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for n in self.names:
            params[n].copy_(self.shadow[self._key(n)])

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily swap the EMA weights into ``model`` (e.g. to sample)."""
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.names}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n in self.names:
                    params[n].copy_(backup[n])
