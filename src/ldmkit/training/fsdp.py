"""``trainer.strategy=fsdp``: stage 2's trainable part sharded across the ranks by PyTorch's
FSDP2 (:func:`torch.distributed.fsdp.fully_shard`), its checkpoints written and read by
:mod:`torch.distributed.checkpoint` (DCP).

* **Sharding.** Each input, middle and output block of the denoiser is one FSDP unit, then the
  denoiser's root (its embeddings and output layers); a conditioner that trains likewise (each
  layer of a text transformer, then the rest; a frozen one stays whole on every rank), and the
  objective when it learns a log-variance. Every parameter, its gradient and its AdamW moments live on one rank only
  (a 1/N shard, fp32); a unit's full parameters exist only while it computes.
* **Precision.** ``trainer.precision`` gives the :class:`MixedPrecisionPolicy`: ``bf16`` /
  ``fp16`` all-gather the parameters in that type for compute, gradients are reduced in
  fp32 into the fp32 shards (the master weights); the units hand fp32 outputs to the loss.
  ``fp32`` computes in fp32. Autocast stays on around the forward as without FSDP.
* **Checkpoints.** :func:`checkpoint_state` is the state DCP writes and reads in place: the
  model (sharded tensors keyed by their names, so a different world size reshards them), the
  optimizer (keyed by parameter name), and the stage's other modules (the EMA shadow is
  sharded like the parameters it follows). :func:`full_state` gathers the full weights on
  rank 0 for ``pipeline/``.

Nothing here runs without a process group: FSDP runs under ``torchrun`` only (one process
included).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldmkit.training.errors import TrainingError

STRATEGIES = ("ddp", "fsdp")

_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_strategy(value: Any, *, lora: bool) -> str:
    """``trainer.strategy`` (``ddp`` | ``fsdp``); ``fsdp`` needs ``torchrun``'s process group."""
    import torch.distributed as dist

    strategy = str(value or "ddp")
    if strategy not in STRATEGIES:
        raise TrainingError(f"trainer.strategy={value!r}: use one of {', '.join(STRATEGIES)}")
    if strategy == "fsdp":
        if not (dist.is_available() and dist.is_initialized()):
            raise TrainingError(
                "trainer.strategy=fsdp shards the model across the processes torchrun starts: launch "
                "with `torchrun --nproc_per_node=N -m ldmkit.cli train ...` (N=1 included)"
            )
        if lora:
            raise TrainingError(
                "trainer.strategy=fsdp does not take trainer.lora (an adapter is small: use trainer.strategy=ddp)"
            )
    return strategy


def mixed_precision(precision: str, *, fp32_outputs: bool = True):
    """The :class:`MixedPrecisionPolicy` of a resolved ``trainer.precision``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(
        param_dtype=_COMPUTE_DTYPES.get(precision),
        reduce_dtype=torch.float32,
        output_dtype=torch.float32 if fp32_outputs and precision in _COMPUTE_DTYPES else None,
    )


def blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks of ``module`` that are each an FSDP unit: the entries of its outermost module
    lists, and a UNet's ``middle_block`` (for the UNet: each of ``input_blocks``,
    ``middle_block``, ``output_blocks``; for a transformer text encoder: each layer)."""
    found: list[nn.Module] = []
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList):  # an entry that is a list has no forward: its entries
            found.extend(e for entry in child for e in (entry if isinstance(entry, nn.ModuleList) else [entry]))
        elif name == "middle_block":
            found.append(child)
        else:
            found.extend(blocks(child))
    return found


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def shard(denoiser: nn.Module, conditioner: nn.Module, objective: nn.Module, precision: str) -> list[nn.Module]:
    """``fully_shard`` the denoiser's :func:`blocks`, then the denoiser; the same for the
    conditioner and the objective where they train (in place: their parameters become sharded DTensors, so build
    the optimizer and the EMA after this). Returns the sharded units."""
    from torch.distributed.fsdp import fully_shard

    inner, outer = mixed_precision(precision, fp32_outputs=False), mixed_precision(precision)
    units = []
    for module in (denoiser, conditioner, objective):
        if module is not denoiser and not _trains(module):
            continue  # a frozen conditioner stays whole on every rank
        for block in blocks(module):
            if any(True for _ in block.parameters()):
                units.append(fully_shard(block, mp_policy=inner))
        units.append(fully_shard(module, mp_policy=outer))
    return units


def reshard(units: list[nn.Module]) -> None:
    """Put the sharded parameters back in ``units`` (a forward without backward, as in
    validation and sampling, leaves the root unit's full parameters in place)."""
    for unit in units:
        unit.reshard()


def is_sharded(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def replicated(value: torch.Tensor) -> torch.Tensor:
    """A value computed from shards (a gradient norm) as a plain tensor."""
    return value.full_tensor() if is_sharded(value) else value


def checkpoint_state(
    step: nn.Module, optimizer: torch.optim.Optimizer, modules: Mapping[str, nn.Module]
) -> dict[str, Any]:
    """What a sharded checkpoint holds, as tensors DCP writes from and loads into in place:
    ``model`` and ``optimizer`` (:func:`~torch.distributed.checkpoint.state_dict.get_state_dict`
    of the trainable ``step`` module and its optimizer) and each of ``modules``' state dict."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(step, optimizer)
    return {"model": model, "optimizer": optim, **{k: m.state_dict() for k, m in modules.items()}}


def load_checkpoint_state(
    step: nn.Module, optimizer: torch.optim.Optimizer, modules: Mapping[str, nn.Module], state: Mapping[str, Any]
) -> None:
    """Apply a :func:`checkpoint_state` that DCP filled."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(step, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    for key, module in modules.items():
        module.load_state_dict(state[key], strict=True)


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s full state dict on rank 0 (CPU, fp32 as trained), gathered from the
    shards; empty on the other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


__all__ = [
    "STRATEGIES",
    "blocks",
    "check_strategy",
    "checkpoint_state",
    "full_state",
    "load_checkpoint_state",
    "mixed_precision",
    "replicated",
    "reshard",
    "shard",
]
