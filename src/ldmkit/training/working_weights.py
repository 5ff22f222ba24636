"""bf16 working weights: the matrix layers train on a bf16 copy that the optimizer step writes.

Under ``trainer.precision=bf16`` autocast casts every float32 convolution and linear weight
to bf16 at every forward, and the backward casts every bf16 weight gradient back to float32
for the optimizer. Each of these casts is one pass over the weights with a fresh allocation;
on a CPU, where memory bandwidth bounds them, the two cost as much as the AdamW step itself
(issue 30: about 42 ms of a 300 ms step of a 24M-parameter UNet at batch 4, one thread).

:class:`WorkingWeights` removes both. The float32 weights of the trained matrix layers (the
*masters*, still the modules' own parameters, saved and averaged as before) and their AdamW
moments are laid out in one flat buffer each; a bf16 copy of the masters (the *working*
weights) is another. The forward runs on the working weights (:meth:`WorkingWeights.forward`,
through :func:`torch.func.functional_call`), so autocast has nothing to cast, and their
gradients stay bf16. The step then runs one fused kernel (:mod:`torch.compile`'d, one loop)
that reads the bf16 gradients, updates the masters and moments exactly as
:class:`torch.optim.AdamW` does, and writes the new working copy.

The numbers are autocast's, to the bit: the working weights are the masters rounded to bf16,
which is what autocast's cast gives; the gradients are the same bf16 values autocast's
backward casts to float32; the kernel's arithmetic is the fused AdamW's, and
:meth:`WorkingWeights.clip` takes ``clip_grad_norm_``'s norms (tests/training/
test_working_weights.py: a stage-2 run ends with the same weights either way). The
optimizer's state keeps :class:`torch.optim.AdamW`'s layout (``step``, ``exp_avg``,
``exp_avg_sq`` per parameter), so checkpoints resume either way. Frozen matrix layers (a
LoRA's base, a frozen encoder) run on a bf16 copy made once; everything else (norms,
embeddings) stays on the plain path, AdamW's own step included.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ldmkit.compiling import quiet_cpp_extension_log
from ldmkit.errors import first_line

__all__ = ["MATRIX_LAYERS", "WorkingWeights", "check_kernel", "unsupported_reason"]

#: the layers whose weights autocast casts to bf16 (and whose weights :class:`WorkingWeights` keeps)
MATRIX_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _adamw(master: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, working: Tensor,
           scalars: Tensor) -> None:
    """One AdamW step over flat buffers, written as the CPU kernel of
    ``torch.optim.AdamW(fused=True)`` computes it (its two fused multiply-adds included, so the
    float32 results are the same bits), which also writes the working copy. ``scalars`` =
    (grad scale, 1 - lr*wd, 1 - beta1, beta2, 1 - beta2, -lr/bias_correction1,
    sqrt(bias_correction2), eps), computed once per step in double precision as torch does."""
    from torch._inductor.inductor_prims import fma

    scale, decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps = scalars.unbind()
    g = grad.float() * scale
    m = fma(one_minus_beta1, g - exp_avg, exp_avg)  # exp_avg.lerp_(g, 1 - beta1)
    v = fma(one_minus_beta2 * g, g, exp_avg_sq * beta2)
    p = master * decay + neg_step_size * m / (v.sqrt() / bias_correction2_sqrt + eps)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    master.copy_(p)
    working.copy_(p)


_compiled: Any = None


def _kernel():
    global _compiled
    if _compiled is None:
        # dynamic: one compile for every model size (and both gradient dtypes: 2 graphs)
        _compiled = torch.compile(_adamw, dynamic=True, fullgraph=True)
    return _compiled


def _matrix_parameters(module: nn.Module, trained: set[int], *, frozen: bool = False) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the float32 weights and biases of ``module``'s matrix layers that
    are ``trained`` (or, with ``frozen``, that are not and take no gradient), named as
    :meth:`nn.Module.named_parameters` names them (the first name of a tied one)."""
    names = {id(p): name for name, p in module.named_parameters()}
    found: dict[int, tuple[str, nn.Parameter]] = {}
    for layer in module.modules():
        if isinstance(layer, MATRIX_LAYERS):
            for p in layer.parameters(recurse=False):
                wanted = (id(p) not in trained and not p.requires_grad) if frozen else id(p) in trained
                if wanted and p.dtype == torch.float32 and id(p) not in found:
                    found[id(p)] = (names[id(p)], p)
    return sorted(found.values(), key=lambda item: item[0])


def unsupported_reason(module: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """Why :class:`WorkingWeights` cannot serve ``module`` and ``optimizer``; None if it can."""
    if type(optimizer) is not torch.optim.AdamW:
        return f"the optimizer is {type(optimizer).__name__}, not torch.optim.AdamW"
    trained = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    chosen = _matrix_parameters(module, set(trained))
    if not chosen:
        return "no trained convolution or linear layer"
    groups = {id(trained[id(p)]) for _, p in chosen}
    if len(groups) > 1:
        return "the matrix layers' weights are in more than one parameter group"
    group = trained[id(chosen[0][1])]
    for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
        if group.get(flag):
            return f"the optimizer has {flag}=True"
    if len({p.device for _, p in chosen}) > 1:
        return "the weights are on more than one device"
    return None


class WorkingWeights:
    """The bf16 working copy of ``module``'s trained matrix-layer weights and the fused AdamW
    step that keeps it (module docstring). ``optimizer`` is the :class:`torch.optim.AdamW`
    over ``module``'s trained parameters; build after its state is loaded (a resume)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.AdamW, dtype: torch.dtype = torch.bfloat16) -> None:
        reason = unsupported_reason(module, optimizer)
        if reason is not None:
            raise ValueError(f"bf16 working weights cannot serve this model: {reason}")
        self.module, self.optimizer, self.dtype = module, optimizer, dtype
        trained = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        chosen = _matrix_parameters(module, set(trained))
        self.names = [name for name, _ in chosen]
        self.masters = [p for _, p in chosen]
        self.group = trained[id(self.masters[0])]
        device = self.masters[0].device
        self.offsets = [0, *itertools.accumulate(p.numel() for p in self.masters)]
        total = self.numel = self.offsets[-1]
        self.master = torch.empty(total, device=device)
        self.exp_avg = torch.zeros(total, device=device)
        self.exp_avg_sq = torch.zeros(total, device=device)
        self.working = torch.empty(total, dtype=dtype, device=device)
        self.grad = torch.empty(total, dtype=dtype, device=device)
        self.grad32: Tensor | None = None  # accumulated over micro-batches, in float32
        # AdamW(fused)'s own kind of step counter, one per parameter (a weight without a gradient
        # in a step is not stepped, as AdamW skips it), and its value here, read without a sync
        self.steps = [optimizer.state.get(p, {}).get("step", torch.zeros((), dtype=torch.float32, device=device))
                      .to(dtype=torch.float32, device=device).clone() for p in self.masters]
        self._counts = [int(step) for step in self.steps]
        with torch.no_grad():
            for p, a, b in zip(self.masters, self.offsets[:-1], self.offsets[1:], strict=True):
                self.master[a:b].copy_(p.detach().reshape(-1))
                p.data = self.master[a:b].view_as(p)  # the module's parameter, now a view
                state = optimizer.state.get(p, {})
                for key, flat in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                    if key in state:
                        flat[a:b].copy_(state[key].reshape(-1))
            for p, step, a, b in zip(self.masters, self.steps, self.offsets[:-1], self.offsets[1:], strict=True):
                optimizer.state[p] = {"step": step, "exp_avg": self.exp_avg[a:b].view_as(p),
                                      "exp_avg_sq": self.exp_avg_sq[a:b].view_as(p)}
            self.working.copy_(self.master)
        self.shadows = {
            name: self.working[a:b].view_as(p).detach().requires_grad_(True)
            for name, p, a, b in zip(self.names, self.masters, self.offsets[:-1], self.offsets[1:], strict=True)
        }
        self._shadow_list = list(self.shadows.values())
        # frozen matrix layers (a LoRA's base, a frozen encoder): a bf16 copy made once, made
        # again for a weight written since (its version counter) or replaced (its storage)
        frozen = [(n, p) for n, p in _matrix_parameters(module, set(trained), frozen=True) if p.device == device]
        self.frozen_names = [name for name, _ in frozen]
        self._frozen = [p for _, p in frozen]
        frozen_offsets = [0, *itertools.accumulate(p.numel() for p in self._frozen)]
        self.frozen_numel = frozen_offsets[-1]
        self.frozen_working = torch.empty(self.frozen_numel, dtype=dtype, device=device)
        self._frozen_copies = [self.frozen_working[a:b].view_as(p)
                               for p, a, b in zip(self._frozen, frozen_offsets[:-1], frozen_offsets[1:], strict=True)]
        self._frozen_seen: list[tuple[int, int] | None] = [None] * len(self._frozen)
        self._refresh_frozen()
        self.shadows.update(zip(self.frozen_names, self._frozen_copies, strict=True))
        self._index = {id(p): i for i, p in enumerate(self.masters)}
        self._has_grad = [False] * len(self.masters)
        self._accumulated = 0

    def __len__(self) -> int:
        return len(self.masters)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)`` on the working weights."""
        self._refresh_frozen()
        return torch.func.functional_call(self.module, self.shadows, args, kwargs, strict=False)

    @torch.no_grad()
    def _refresh_frozen(self) -> None:
        for i, (p, copy) in enumerate(zip(self._frozen, self._frozen_copies, strict=True)):
            seen = (p.data_ptr(), p._version)
            if self._frozen_seen[i] != seen:
                copy.copy_(p)
                self._frozen_seen[i] = seen

    @torch.no_grad()
    def gather(self) -> None:
        """After a micro-batch's backward: its working-weight gradients into the flat buffer
        (over several micro-batches, summed in float32, as autocast's float32 gradients add)."""
        grads = []
        for i, (shadow, a, b) in enumerate(zip(self._shadow_list, self.offsets[:-1], self.offsets[1:], strict=True)):
            grad = shadow.grad
            if grad is None:  # not used by this forward: no gradient, as a parameter would have none
                grad = torch.zeros(b - a, dtype=self.dtype, device=self.working.device)
            else:
                self._has_grad[i] = True
            grads.append(grad.reshape(-1))
            shadow.grad = None
        if self._accumulated == 1:  # a second micro-batch: the first one's moves to float32 first
            if self.grad32 is None:
                self.grad32 = torch.empty(self.numel, device=self.working.device)
            self.grad32.copy_(self.grad)
        torch.cat(grads, out=self.grad)
        if self._accumulated >= 1:
            self.grad32.add_(self.grad)
        self._accumulated += 1

    def _gradient(self) -> Tensor:
        if self._accumulated == 0:
            raise RuntimeError("WorkingWeights.step() before any gather(): no gradient to apply")
        return self.grad if self._accumulated == 1 else self.grad32

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """The 2-norm of the gathered gradients, in float32."""
        return torch.linalg.vector_norm(self._gradient(), dtype=torch.float32)

    def gradients(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The gradient of each of ``params`` that has one, in their order: a master's is its
        part of the gathered flat gradient (bf16 values, or their float32 sum), another
        parameter's its ``.grad``."""
        flat, out = self._gradient(), []
        for p in params:
            i = self._index.get(id(p))
            if i is None:
                if p.grad is not None:
                    out.append(p.grad)
            elif self._has_grad[i]:
                out.append(flat[self.offsets[i]:self.offsets[i + 1]])
        return out

    @torch.no_grad()
    def clip(self, params: Sequence[Tensor], max_norm: float) -> tuple[Tensor, Tensor]:
        """``torch.nn.utils.clip_grad_norm_(params, max_norm)`` as it would run on the float32
        gradients autocast gives: the same per-tensor norms (taken in float32 from the bf16
        values, which equals the norm of their float32 cast), the same total and factor. The
        other parameters' gradients are scaled in place; returns the total norm and the factor
        to hand to :meth:`step` for the working weights'."""
        grads = self.gradients(params)
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack(list(norms)), 2)
        factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        rest = [p.grad for p in params if id(p) not in self._index and p.grad is not None]
        if rest:
            torch._foreach_mul_(rest, factor)
        return total, factor

    @torch.no_grad()
    def step(self, grad_scale: float | Tensor = 1.0) -> None:
        """AdamW's step on the masters from the gathered gradients (times ``grad_scale``: a
        clipping factor), with the group's current ``lr``; then the new working copy. A master
        whose working weight got no gradient is not stepped (AdamW skips a parameter without
        one): the kernel then runs over the runs of neighbours that did and share a step count."""
        self.check()
        group = self.group
        lr, (beta1, beta2), grad = float(group["lr"]), group["betas"], self._gradient()
        constants = [float(grad_scale), 1.0 - lr * float(group["weight_decay"]), 1.0 - beta1, beta2, 1.0 - beta2]
        runs: list[tuple[int, int, int]] = []  # (first, last + 1, step count) of masters stepped together
        for i, (has, count) in enumerate(zip(self._has_grad, self._counts, strict=True)):
            if not has:
                continue
            if runs and runs[-1][1] == i and runs[-1][2] == count:
                runs[-1] = (runs[-1][0], i + 1, count)
            else:
                runs.append((i, i + 1, count))
        for first, end, count in runs:
            n = count + 1
            scalars = torch.tensor(
                [*constants, -(lr / (1.0 - beta1**n)), math.sqrt(1.0 - beta2**n), float(group["eps"])],
                dtype=torch.float32, device=self.master.device,
            )
            a, b = self.offsets[first], self.offsets[end]
            _kernel()(self.master[a:b], self.exp_avg[a:b], self.exp_avg_sq[a:b], grad[a:b], self.working[a:b], scalars)
        stepped = [i for i, has in enumerate(self._has_grad) if has]
        torch._foreach_add_([self.steps[i] for i in stepped], 1.0)
        for i in stepped:
            self._counts[i] += 1
        self._accumulated = 0
        self._has_grad = [False] * len(self.masters)

    def check(self) -> None:
        """Raise if a master or an optimizer state no longer lives in the flat buffers (something
        replaced a parameter's ``.data`` or loaded the optimizer's state since): the step would
        update copies nobody reads."""
        size = self.master.element_size()
        base = self.master.data_ptr()
        for name, p, a in zip(self.names, self.masters, self.offsets[:-1], strict=True):
            state = self.optimizer.state.get(p, {})
            if (p.data_ptr() != base + a * size or state.get("exp_avg") is None
                    or state["exp_avg"].data_ptr() != self.exp_avg.data_ptr() + a * size):
                raise RuntimeError(
                    f"bf16 working weights: {name} or its optimizer state was replaced after they were set "
                    "up (a load_state_dict?); build WorkingWeights again after loading"
                )
            if p.grad is not None:
                raise RuntimeError(
                    f"bf16 working weights: {name}'s float32 weight has a gradient of its own (a backward "
                    "through the module itself, not through WorkingWeights.forward): the optimizer would "
                    "step it twice"
                )

    def describe(self) -> str:
        """One line: what trains on the bf16 copy."""
        frozen = (f"; {len(self._frozen)} frozen ones ({self.frozen_numel / 1e6:.2f}M) run on a bf16 copy made once"
                  if self._frozen else "")
        return (f"bf16 working weights: {len(self)} convolution/linear tensors ({self.numel / 1e6:.2f}M values) "
                f"train on a bf16 copy that one fused AdamW step writes{frozen} (trainer.bf16_weights)")



def check_kernel(device: torch.device | str, *, accumulate: bool = True) -> str | None:
    """Compile the fused step's kernel once for ``device`` on a few values, for bf16 gradients
    and, with ``accumulate`` (micro-batches summed in float32), float32 ones; None if it runs,
    else why not (inductor needs a C++ compiler on a CPU and triton on CUDA)."""
    quiet_cpp_extension_log()
    try:
        n = 17  # not 0 or 1: the compiled kernel stays dynamic in the size
        for grad_dtype in (torch.bfloat16, torch.float32)[: 2 if accumulate else 1]:
            buffers = [torch.zeros(n, device=device) for _ in range(3)]
            _kernel()(*buffers, torch.zeros(n, dtype=grad_dtype, device=device),
                      torch.empty(n, dtype=torch.bfloat16, device=device),
                      torch.tensor([1.0, 1.0, 0.1, 0.999, 0.001, -1e-4, 0.03, 1e-8], device=device))
    except Exception as err:  # noqa: BLE001 - any failure to build the kernel means: not here
        return f"its fused kernel does not compile here ({type(err).__name__}: {first_line(err)[:200]})"
    return None
