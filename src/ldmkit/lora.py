"""LoRA adapters (Hu et al. 2021) on a pipeline's denoiser and conditioner, through ``peft``.

``trainer.lora.rank > 0`` puts a low-rank update ``W + (alpha / r) B A`` beside the chosen
layers (:func:`add_lora`: ``peft.inject_adapter_in_model``) and freezes everything else, so
only the adapter trains. Targets are glob patterns over the pipeline's module names
(:data:`DEFAULT_TARGETS`: the denoiser's attention projections, self- and cross-attention);
``trainer.lora.conditioner`` adds every linear and embedding layer of the conditioner.

An adapter folder (what a LoRA run exports as ``<run_dir>/pipeline/``) holds

* ``adapter.safetensors``: the adapter's tensors alone, by their names in the pipeline;
* ``adapter.json``: the LoRA settings (rank, alpha, the adapted layers) and the base: the path
  of a pipeline folder (relative to the adapter folder when it lies beside it in the run) and
  the sha256 of its weights (:func:`ldmkit.frozen.weights_digest`);
* ``config.yaml``: the run's pipeline config, as in every pipeline folder.

:meth:`ldmkit.Pipeline.load` of such a folder builds the pipeline from ``config.yaml``, loads
the base's weights (with every check a plain folder gets), then attaches the adapter
(:func:`read_adapter`, :func:`attach`). A base that is gone or whose weights changed is refused
with one line naming ``adapter.json`` and the base: the adapter only fits the weights it was
trained on. A moved base is found again by writing its new path into ``base.path`` (the hash
still guards it). :func:`merge` bakes the adapter in (``ldmkit lora merge``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmkit import frozen, pipeline_files
from ldmkit.errors import LdmkitError
from ldmkit.io import atomic_write, atomic_write_text
from ldmkit.safetensors_io import read_safetensors, read_safetensors_shapes

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILE",
    "DEFAULT_TARGETS",
    "Adapter",
    "LoraError",
    "add_lora",
    "adapter_state",
    "attach",
    "has_adapters",
    "merge",
    "read_adapter",
    "save_adapter",
    "save_base",
    "summary",
    "without_adapters",
]

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
ADAPTER_NAME = "default"  # peft's adapter name: one adapter per pipeline
#: the denoiser's attention projections (q, k, v, out of SpatialTransformer self- and cross-attention)
DEFAULT_TARGETS = ("denoiser.*.attn[12].to_[qkv]", "denoiser.*.attn[12].to_out.0")
CONDITIONER_TARGETS = ("conditioner.*",)
COMPONENTS = ("denoiser", "conditioner")
ADAPTABLE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)  # layers peft's LoRA wraps


class LoraError(LdmkitError, ValueError):
    """Bad LoRA settings, or an adapter folder that cannot be loaded (its base gone or changed)."""


@dataclass
class Adapter:
    """What ``adapter.json`` says: the LoRA settings and the adapted layers per component
    (``{"denoiser": [module names]}``), and where its base lives (``base``, ``base_sha256``)."""

    rank: int
    alpha: float
    dropout: float
    targets: dict[str, list[str]]
    base: Path | None = None
    base_sha256: str | None = None

    def settings(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": self.targets}


# -- adding and removing adapters ------------------------------------------------------------


def resolve_targets(
    pipeline: nn.Module, targets: Sequence[str] | None, conditioner: bool, key: str = "trainer.lora.targets"
) -> dict[str, list[str]]:
    """``{component: [module names in it]}`` of the layers the patterns (globs over names like
    ``denoiser.input_blocks.1.1.transformer_blocks.0.attn2.to_k``) select; a pattern that
    selects no linear, convolution or embedding layer is an error naming it."""
    patterns = [*(targets or DEFAULT_TARGETS), *(CONDITIONER_TARGETS if conditioner else ())]
    layers = [(component, name) for component in COMPONENTS
              for name, module in getattr(pipeline, component).named_modules(prefix=component)
              if isinstance(module, ADAPTABLE)]  # fmt: skip
    chosen: dict[str, list[str]] = {}
    for pattern in patterns:
        found = [(c, n) for c, n in layers if fnmatchcase(n, pattern)]
        if not found and pattern in CONDITIONER_TARGETS:
            raise LoraError("trainer.lora.conditioner: the conditioner has no linear or embedding layer to adapt")
        if not found:
            example = layers[0][1] if layers else "denoiser.<module>"
            raise LoraError(f"{key}: {pattern!r} matches no linear, convolution or embedding layer of the "
                            f"denoiser or conditioner (their layers are named like {example})")  # fmt: skip
        for component, name in found:
            names = chosen.setdefault(component, [])
            if name[len(component) + 1 :] not in names:
                names.append(name[len(component) + 1 :])
    return chosen


def add_lora(pipeline: nn.Module, adapter: Adapter) -> None:
    """Inject ``adapter``'s LoRA layers (initialised as peft does: ``B = 0``, so the pipeline's
    output is unchanged) and freeze everything but them."""
    from peft import LoraConfig, inject_adapter_in_model

    for component, names in adapter.targets.items():
        config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                            target_modules=list(names))  # fmt: skip
        inject_adapter_in_model(config, getattr(pipeline, component), adapter_name=ADAPTER_NAME)
    for name, param in pipeline.named_parameters():
        param.requires_grad_(_is_adapter(name))


def _is_adapter(name: str) -> bool:
    return ".lora_" in name


def _lora_layers(pipeline: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in pipeline.named_modules() if isinstance(m, BaseTunerLayer)]


def has_adapters(pipeline: nn.Module) -> bool:
    return any(_is_adapter(name) for name, _ in pipeline.named_parameters())


def _replace(pipeline: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(pipeline.get_submodule(parent), child, module)


@contextlib.contextmanager
def without_adapters(pipeline: nn.Module) -> Iterator[nn.Module]:
    """The pipeline with each LoRA layer swapped back for the layer it wraps (the same
    tensors: the base as it is), the adapters put back after."""
    layers = _lora_layers(pipeline)
    for name, layer in layers:
        _replace(pipeline, name, layer.get_base_layer())
    try:
        yield pipeline
    finally:
        for name, layer in layers:
            _replace(pipeline, name, layer)


def merge(pipeline: nn.Module) -> list[str]:
    """Bake every LoRA layer into the layer it wraps (``W += (alpha / r) B A``) and remove the
    adapters; returns the merged layers' names."""
    layers = _lora_layers(pipeline)
    for name, layer in layers:
        layer.merge(safe_merge=True)
        _replace(pipeline, name, layer.get_base_layer())
    for component in COMPONENTS:
        with contextlib.suppress(AttributeError):
            del getattr(pipeline, component).peft_config
    return [name for name, _ in layers]


def adapter_state(pipeline: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors, by their names in the pipeline."""
    return {name: p.detach().contiguous() for name, p in pipeline.named_parameters() if _is_adapter(name)}


def summary(pipeline: nn.Module) -> str:
    """``LoRA: N trainable parameters (x% of the model's M), adapter S MB``."""
    adapter = sum(p.numel() for name, p in pipeline.named_parameters() if _is_adapter(name))
    size = sum(p.numel() * p.element_size() for name, p in pipeline.named_parameters() if _is_adapter(name))
    total = sum(p.numel() for p in pipeline.parameters())
    return (f"LoRA: {adapter:,} trainable parameters ({100 * adapter / max(total, 1):.2f}% of the model's "
            f"{total:,}), adapter {size / 1e6:.2f} MB")  # fmt: skip


def from_options(pipeline: nn.Module, options: Mapping[str, Any]) -> Adapter | None:
    """The :class:`Adapter` ``trainer.lora`` describes for ``pipeline`` (None when ``rank`` is 0)."""
    rank = int(options.get("rank") or 0)
    if rank <= 0:
        return None
    alpha = options.get("alpha")
    return Adapter(
        rank=rank, alpha=float(rank if alpha is None else alpha), dropout=float(options.get("dropout") or 0.0),
        targets=resolve_targets(pipeline, options.get("targets"), bool(options.get("conditioner"))),
    )


# -- adapter folders -------------------------------------------------------------------------


def _same_weights(folder: Path, state: Mapping[str, Tensor]) -> bool:
    """Whether the pipeline folder ``folder`` holds exactly ``state`` (parts it keeps by
    reference in ``frozen.json`` aside)."""
    weights = folder / "model.safetensors"
    if not (weights.is_file() and (folder / "config.yaml").is_file()) or (folder / ADAPTER_CONFIG).exists():
        return False
    try:
        references = frozen.read_manifest(folder)
        shapes = read_safetensors_shapes(weights)
    except (LdmkitError, OSError):
        return False
    expected = {k for k in state if not frozen.under(k, references)}
    if set(shapes) != expected or any(tuple(state[k].shape) != shapes[k] for k in expected):
        return False
    stored = read_safetensors(weights)
    return all(torch.equal(stored[k], state[k].detach().cpu()) for k in expected)


def save_base(
    pipeline: Any, adapter: Adapter, candidates: Sequence[Path], fallback: Path, *, embed_frozen: bool = False
) -> Path:
    """Set ``adapter.base`` to the pipeline folder that holds ``pipeline``'s base weights: the
    first of ``candidates`` (the ``trainer.init_from`` folder) whose weights are exactly the
    base's, else ``fallback``, written when it does not hold them. Once found, a base whose
    files did not change is taken as it is (the base is frozen while the adapter trains)."""
    if adapter.base is not None and frozen.weights_digest(adapter.base) == adapter.base_sha256:
        return adapter.base
    with without_adapters(pipeline):
        state = pipeline.state_dict()
        base = next((Path(f) for f in [*candidates, fallback] if _same_weights(Path(f), state)), None)
        if base is None:
            base = Path(pipeline.save(fallback, embed_frozen=embed_frozen))
    adapter.base, adapter.base_sha256 = base.resolve(), frozen.weights_digest(base)
    return adapter.base


def save_adapter(pipeline: Any, directory: str | os.PathLike, adapter: Adapter) -> Path:
    """Write ``pipeline``'s adapter as an adapter folder over ``adapter.base`` (a pipeline
    folder; its path stored relative to ``directory`` when they share a parent: a run folder
    moves whole). A ``model.safetensors`` left there by an earlier export goes. The files the
    components read travel with its ``config.yaml`` as with :meth:`ldmkit.Pipeline.save`
    (frozen parts embedded when the base embeds them; :mod:`ldmkit.pipeline_files`)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    if adapter.base is None or adapter.base_sha256 is None:
        raise LoraError("save_adapter: the adapter has no base yet (save_base)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = adapter.base.resolve()
    near = base.parent == directory.resolve().parent
    record = {"format": 1, "lora": adapter.settings(),
              "base": {"path": os.path.relpath(base, directory.resolve()) if near else str(base),
                       "sha256": adapter.base_sha256}}  # fmt: skip
    state = adapter_state(pipeline)
    atomic_write(directory / ADAPTER_FILE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(record, indent=2) + "\n")
    embedded = not frozen.read_manifest(base)  # the base keeps no part by reference
    config = pipeline_files.bundle(pipeline, pipeline.config, directory, embed_frozen=embedded)
    atomic_write_text(directory / "config.yaml", OmegaConf.to_yaml(config, resolve=True))
    for stale in ("model.safetensors", frozen.FROZEN_FILE):
        (directory / stale).unlink(missing_ok=True)
    return directory


def read_adapter(directory: str | os.PathLike) -> Adapter | None:
    """The adapter of an adapter folder (None for a plain pipeline folder), its base checked:
    present, and with the weights the adapter was trained on."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        lora, base = record["lora"], record["base"]
        adapter = Adapter(rank=int(lora["rank"]), alpha=float(lora["alpha"]), dropout=float(lora["dropout"]),
                          targets={str(k): [str(n) for n in v] for k, v in lora["targets"].items()},
                          base=Path(directory) / base["path"], base_sha256=str(base["sha256"]))  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise LoraError(f"{path} is not an adapter description ({type(err).__name__}: {err})") from None
    if not (adapter.base / "model.safetensors").is_file():
        raise LoraError(
            f"{path}: its base pipeline {adapter.base} is missing (moved or deleted?); put it back, or write "
            "its new place into base.path of that file"
        )
    now = frozen.weights_digest(adapter.base)
    if now != adapter.base_sha256:
        raise LoraError(
            f"{path}: the base pipeline {adapter.base} changed since the adapter was trained on it (sha256 "
            f"{now[:12]}... now, {adapter.base_sha256[:12]}... then); the adapter fits only the original weights"
        )
    return adapter


def attach(pipeline: nn.Module, adapter: Adapter, directory: str | os.PathLike) -> nn.Module:
    """Add ``adapter``'s layers to ``pipeline`` (which holds the base weights) and load their
    tensors from ``directory``'s ``adapter.safetensors``: names and shapes must be exactly the
    adapter's, else a :class:`LoraError` naming the file. No dropout: for sampling."""
    weights = Path(directory) / ADAPTER_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {weights}")
    add_lora(pipeline, Adapter(adapter.rank, adapter.alpha, 0.0, adapter.targets))
    own, stored = adapter_state(pipeline), read_safetensors_shapes(weights)
    wrong = sorted(set(own) ^ set(stored)) + [k for k in own if k in stored and stored[k] != tuple(own[k].shape)]
    if wrong:
        raise LoraError(f"{weights} does not fit the adapter {Path(directory) / ADAPTER_CONFIG} describes: {wrong[:5]}")
    pipeline.load_state_dict(read_safetensors(weights), strict=False)
    pipeline.requires_grad_(False)
    return pipeline
