"""A whole pipeline as a diffusers folder (``to_diffusers``) and a diffusers folder as an
ldmkit config and state dict (``read_diffusers``): ``model_index.json``, each component's
folder (written and read by :mod:`.unet`, :mod:`.autoencoder`, :mod:`.scheduler`,
:mod:`.text`), ``ldmkit_conditioner/`` and ``ldmkit.json``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from ldmkit import pipeline_files
from ldmkit.config import refuse_interpolations
from ldmkit.config_checks import Number, Text
from ldmkit.interop import compvis
from ldmkit.interop.diffusers.autoencoder import (
    _vae_from_config,
    diffusers_vae_config,
    vae_from_diffusers,
    vae_to_diffusers,
)
from ldmkit.interop.diffusers.common import (
    DIFFUSERS_VERSION,
    WHOLE,
    ConversionError,
    _require,
    _value,
)
from ldmkit.interop.diffusers.scheduler import _schedule_from_config, diffusers_scheduler_config
from ldmkit.interop.diffusers.text import (
    _bert_config,
    _bert_from_config,
    _bert_names,
    _bert_vocab,
    _fit_text_encoder,
    bert_maps_to_diffusers,
)
from ldmkit.interop.diffusers.unet import (
    _unet_classes,
    _unet_from_config,
    diffusers_unet_config,
    unet_from_diffusers,
    unet_to_diffusers,
)

CONDITIONER_DIR = "ldmkit_conditioner"
# a text conditioner's options that diffusers has no place for (ldmkit.json keeps them), with
# what a folder without them means: the paper's (the batch key of prompts, condition dropout)
TEXT_OPTIONS = {"input_key": (Text(), "caption"), "drop_rate": (Number(0, 1), compvis.GUIDED_DROP_RATE)}


# -- writing -------------------------------------------------------------------------------
def _write_json(path: Path, data: dict[str, Any]) -> None:
    from ldmkit.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _write_tensors(path: Path, state: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    from ldmkit.io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda p: save_file(state, str(p)))


def _sub(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def to_diffusers(
    pipeline: Any, out: str | os.PathLike, *, progress: Callable[[str], None] | None = None
) -> Path:
    """Write ``pipeline`` (an ldmkit :class:`~ldmkit.pipeline.Pipeline` with its config) as a
    diffusers folder; returns ``out``. ``progress`` is called with each component's name."""
    if pipeline.config is None:
        raise ConversionError(
            "this Pipeline has no config (build it with ldmkit.compose or Pipeline.load)"
        )
    if any(".lora_" in name for name, _ in pipeline.named_parameters()):
        raise ConversionError(
            "this pipeline carries a LoRA adapter: export its base and the adapter apart (ldmkit lora "
            "export-diffusers), or bake it in first (ldmkit lora merge)"
        )
    cfg = OmegaConf.to_container(pipeline.config, resolve=True)
    out = Path(out)
    step = progress or (lambda _name: None)
    state = {k: v for k, v in pipeline.state_dict().items()}
    first, unet_cfg = cfg["first_stage"], cfg["denoiser"]
    if first.get("name") not in ("kl", "vq"):
        raise ConversionError(
            f"the first stage {first.get('name')!r} cannot be exported to diffusers, which has a "
            "counterpart for kl (AutoencoderKL) and vq (VQModel) first stages only"
        )
    # `auto` values are resolved on the built modules
    for key in ("in_channels", "out_channels", "context_dim"):
        if unet_cfg.get(key) == "auto":
            unet_cfg[key] = getattr(pipeline.denoiser, key, None)
    if unet_cfg.get("in_channels") in (None, "auto"):
        unet_cfg["in_channels"] = pipeline.denoiser.input_blocks[0][0].in_channels
    if unet_cfg.get("out_channels") in (None, "auto"):
        unet_cfg["out_channels"] = pipeline.denoiser.out[-1].out_channels
    if unet_cfg.get("context_dim") == "auto":
        unet_cfg["context_dim"] = pipeline.denoiser.context_dim
    unet_cfg["num_classes"] = _unet_classes(pipeline.denoiser, unet_cfg)
    factor = 2 ** (len(first["ch_mult"]) - 1)
    scale = float(pipeline.scale_factor)
    unet_config = diffusers_unet_config(unet_cfg, int(cfg["image_size"]) // factor)
    vae_config = diffusers_vae_config(first, scale)
    scheduler = diffusers_scheduler_config(
        cfg["schedule"], cfg["sampler"], unet_cfg.get("prediction", "eps")
    )
    unet_state = unet_to_diffusers(_sub(state, "denoiser."), unet_cfg)
    vae_state = vae_to_diffusers(_sub(state, "first_stage."), first)
    conditioner = cfg["conditioner"]
    name = conditioner.get("name")
    ldm_bert = bert_maps_to_diffusers(conditioner) and unet_config["_class_name"] == "UNet2DConditionModel"
    # LDMTextToImagePipeline calls its first stage `vqvae`, a KL one included
    vae_dir = "vae" if first["name"] == "kl" and not ldm_bert else "vqvae"
    components: dict[str, list[Any]] = {
        "unet": ["diffusers", unet_config["_class_name"]],
        vae_dir: ["diffusers", vae_config["_class_name"]],
        "scheduler": ["diffusers", scheduler["_class_name"]],
    }
    # a failed export leaves no new files behind: a fresh --out is removed, an existing one
    # loses only the entries this export added
    with _removed_on_failure(out):
        # model_index.json is the export's last file, an older one gone first: an export cut short
        # is no diffusers folder (to diffusers and to ldmkit), never one half old, half new
        (out / "model_index.json").unlink(missing_ok=True)
        step("unet")
        _write_json(out / "unet" / "config.json", unet_config)
        _write_tensors(out / "unet" / "diffusion_pytorch_model.safetensors", unet_state)
        step(vae_dir)
        _write_json(out / vae_dir / "config.json", vae_config)
        _write_tensors(out / vae_dir / "diffusion_pytorch_model.safetensors", vae_state)
        _write_json(out / "scheduler" / "scheduler_config.json", scheduler)
        step("conditioner")
        if name == "clip_text":
            module = pipeline.conditioner
            module.transformer.save_pretrained(out / "text_encoder", safe_serialization=True)
            module.tokenizer.save_pretrained(out / "tokenizer")
            # the length StableDiffusionPipeline pads prompts to (read back as clip_text's max_length)
            tokenizer_config = out / "tokenizer" / "tokenizer_config.json"
            _write_json(tokenizer_config, {**_read_json(tokenizer_config), "model_max_length": int(conditioner["max_length"])})
            components.update(text_encoder=["transformers", type(module.transformer).__name__],
                              tokenizer=["transformers", type(module.tokenizer).__name__])  # fmt: skip
        elif ldm_bert:
            module = pipeline.conditioner
            names = _bert_names(int(conditioner["n_layer"]))
            _write_json(out / "bert" / "config.json", _bert_config(conditioner, module.transformer.num_tokens))
            _write_tensors(out / "bert" / "model.safetensors",
                           {names[k]: v for k, v in _sub(state, "conditioner.transformer.").items()})  # fmt: skip
            (out / "tokenizer").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(module.tokenizer.path, out / "tokenizer" / "vocab.txt")
            _write_json(out / "tokenizer" / "tokenizer_config.json",
                        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "strip_accents": None,
                         "model_max_length": 77, "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                         "cls_token": "[CLS]", "mask_token": "[MASK]"})  # fmt: skip
            components.update(bert=["latent_diffusion", "LDMBertModel"], tokenizer=["transformers", "BertTokenizer"])
        elif name != "none":
            cond_state = {k: v for k, v in _sub(state, "conditioner.").items()}
            # the files it reads when built (a vocab of its own) go with it, named relative to it
            carried = pipeline_files.bundle(torch.nn.ModuleDict({"conditioner": pipeline.conditioner}),
                                            OmegaConf.create({"conditioner": conditioner}), out / CONDITIONER_DIR,
                                            embed_frozen=True)  # fmt: skip
            conditioner = OmegaConf.to_container(carried.conditioner)
            _write_json(
                out / CONDITIONER_DIR / "config.json", {"conditioner": conditioner, "ldmkit_format": 1}
            )
            _write_tensors(out / CONDITIONER_DIR / "model.safetensors", cond_state)
        text_component = name == "clip_text" or ldm_bert  # text_encoder/ or bert/: diffusers' own class
        if name in ("none", "clip_text") or ldm_bert:  # an older export's conditioner would be read back
            shutil.rmtree(out / CONDITIONER_DIR, ignore_errors=True)
        if name == "clip_text" and unet_config["_class_name"] == "UNet2DConditionModel":
            index = {"_class_name": "StableDiffusionPipeline", **components, "safety_checker": [None, None],
                     "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}  # fmt: skip
        elif ldm_bert:
            index = {"_class_name": "LDMTextToImagePipeline", **components}
        elif (
            name == "low_res"
            and vae_dir == "vqvae"
            and unet_config["_class_name"] == "UNet2DModel"
            and int(conditioner.get("factor", 4)) == factor
            and scale == 1.0
        ):  # the paper's SR layout: the low-res image has the latents' size, concatenated after them
            index = {"_class_name": "LDMSuperResolutionPipeline", **components}
        elif name == "none" and vae_dir == "vqvae" and unet_config["_class_name"] == "UNet2DModel":
            index = {"_class_name": "LDMPipeline", **components}
        else:  # no diffusers pipeline class runs this combination: load the components one by one
            index = {"_class_name": "DiffusionPipeline", **components}
        # what diffusers does not record and ldmkit reads back (the qkv order only changes the layout
        # of equal weights; keeping it makes the round trip bit-identical)
        _write_json(out / "ldmkit.json", {"image_size": int(cfg["image_size"]), "sampler": cfg["sampler"],
                                           "use_new_attention_order": bool(unet_cfg.get("use_new_attention_order")),
                                           "bert_default_vocab": ldm_bert and conditioner.get("vocab") is None,
                                           "conditioner_options": {k: conditioner.get(k, default) for k, (_, default)
                                                                   in TEXT_OPTIONS.items()} if text_component else None,
                                           "source": "ldmkit convert to-diffusers"})  # fmt: skip
        _write_json(out / "model_index.json", {"_diffusers_version": DIFFUSERS_VERSION, **index})
    return out


@contextlib.contextmanager
def _removed_on_failure(out: Path) -> Iterator[None]:
    """Remove what the block adds to ``out`` when it raises: all of ``out`` if it did not exist,
    else the entries that were not there before (a replaced file stays replaced)."""
    existed = out.is_dir()
    before = set(os.listdir(out)) if existed else set()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for name in set(os.listdir(out)) - before:
                path = out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


def describe(directory: str | os.PathLike) -> str:
    """One line naming a diffusers folder's pipeline class and components."""
    index = _read_json(Path(directory) / "model_index.json")
    parts = [
        f"{k} {v[1]}" for k, v in index.items() if isinstance(v, list) and v and v[0] is not None
    ]
    return f"{index.get('_class_name')}: " + ", ".join(parts)


# -- reading -------------------------------------------------------------------------------
def _read_json(path: Path, folder: Path | None = None) -> dict[str, Any]:
    """The JSON object in ``path`` (a file of the diffusers folder ``folder``, by default the
    folder above the component's)."""
    if not path.is_file():
        folder = folder if folder is not None else path.parent.parent
        raise ConversionError(f"{path} is missing (is {folder} a diffusers folder?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path} is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object, but a {type(data).__name__}")
    refuse_interpolations(data, path)  # its values become the pipeline's config
    return data


def _index_class(index: dict[str, Any], key: str, directory: Path) -> str | None:
    """The class model_index.json names for the component ``key`` (``[library, class]``); None
    when it names none (absent, or ``[null, null]``)."""
    entry = index.get(key)
    if entry is None or (isinstance(entry, list) and len(entry) == 2 and entry[0] is None):
        return None
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
        raise ConversionError(f"{directory}/model_index.json: {key}={entry!r}: expected [library, class]")
    return entry[1]


def _component(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """``data[key]``: a component's config (a mapping with a ``name``), or an error naming it."""
    node = data.get(key)
    if not isinstance(node, dict) or not isinstance(node.get("name"), str):
        raise ConversionError(f"{where}: {key}={node!r}: expected a mapping with the component's name")
    return node


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    from ldmkit.safetensors_io import read_safetensors

    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return dict(read_safetensors(folder / name))
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):  # diffusers' and transformers' older names
        if (folder / name).is_file():
            from ldmkit.weights import read_weights

            return read_weights(folder / name)
    others = sorted(p.name for p in folder.glob("*.safetensors*")) if folder.is_dir() else []
    found = (f"; it has {', '.join(others[:3])} (a variant? rename it to the name above; sharded weights are "
             "not read)") if others else ""  # fmt: skip
    raise ConversionError(f"{folder} holds no weights (diffusion_pytorch_model.safetensors){found}")


def _text_options(extra: dict[str, Any]) -> dict[str, Any]:
    """A text conditioner's :data:`TEXT_OPTIONS` from ``ldmkit.json`` (the paper's without it)."""
    options = extra.get("conditioner_options") or {}
    _require(isinstance(options, dict), f"ldmkit.json: conditioner_options={options!r}: expected a mapping")
    named = {f"conditioner_options.{k}": v for k, v in options.items()}
    return {k: _value(named, f"conditioner_options.{k}", spec, "ldmkit.json", default)
            for k, (spec, default) in TEXT_OPTIONS.items()}  # fmt: skip


def _clip_max_length(base: Path) -> int:
    """The prompt length of a diffusers CLIP tokenizer (``model_max_length``, what
    StableDiffusionPipeline pads to); 77, CLIP's, where it says none that the text encoder's
    positions hold (transformers writes a huge number for "unset")."""
    path = base / "tokenizer" / "tokenizer_config.json"
    length = _read_json(path).get("model_max_length") if path.is_file() else None
    positions = _read_json(base / "text_encoder" / "config.json").get("max_position_embeddings", 77)
    fits = isinstance(length, int) and not isinstance(length, bool) and 0 < length <= positions
    return length if fits else 77


def read_diffusers(
    directory: str | os.PathLike, *, text_encoder_dir: str | os.PathLike | None = None
) -> tuple[Any, dict[str, Tensor], float]:
    """A diffusers folder (a UNet, a KL or VQ autoencoder, a scheduler, and a CLIP text encoder
    or an ``ldmkit_conditioner``) as (the ldmkit config, the state dict in ldmkit's names, the
    scale factor); :meth:`ldmkit.pipeline.Pipeline.from_diffusers` builds and loads it.

    ``text_encoder_dir``: where the CLIP text encoder's config and tokenizer are read from by
    the pipeline's ``clip_text`` (default: the folder's own ``text_encoder/`` and
    ``tokenizer/``, which ``Pipeline.save`` carries under the pipeline's ``files/``)."""
    directory = Path(directory)
    index = _read_json(directory / "model_index.json", directory)
    unet_cfg = _unet_from_config(_read_json(directory / "unet" / "config.json"))
    vae_dir = "vae" if "vae" in index else "vqvae" if "vqvae" in index else None
    _require(vae_dir is not None, f"{directory}/model_index.json names no `vae` or `vqvae`")
    first, scale = _vae_from_config(_read_json(directory / vae_dir / "config.json"))
    scheduler_path = directory / "scheduler" / "scheduler_config.json"
    schedule, sampler, prediction = _schedule_from_config(_read_json(scheduler_path))
    unet_cfg["prediction"] = prediction
    unet_raw = _read_json(directory / "unet" / "config.json")
    factor = 2 ** (len(first["ch_mult"]) - 1)
    extra = _read_json(directory / "ldmkit.json") if (directory / "ldmkit.json").is_file() else {}
    if extra.get("sampler") is not None:
        sampler = _component(extra, "sampler", "ldmkit.json")
    unet_cfg["use_new_attention_order"] = bool(extra.get("use_new_attention_order", False))
    image_size = _value(extra, "image_size", WHOLE, "ldmkit.json", None) or factor * _value(
        unet_raw, "sample_size", WHOLE, f"unet/config.json ({unet_raw.get('_class_name')})", 32
    )
    cond_state: dict[str, Tensor] = {}
    text_kind, bert_kind = (_index_class(index, key, directory) for key in ("text_encoder", "bert"))
    if text_kind is not None:
        kind = text_kind
        _require(
            kind == "CLIPTextModel",
            f"{directory}: text_encoder {kind} has no ldmkit conditioner (CLIPTextModel does: clip_text)",
        )
        base = Path(text_encoder_dir) if text_encoder_dir is not None else directory
        conditioner: dict[str, Any] = {
            "name": "clip_text", "name_or_path": str((base / "text_encoder").resolve()),
            "tokenizer_path": str((base / "tokenizer").resolve()), "max_length": _clip_max_length(base), "pretrained": False,
            **_text_options(extra),
        }  # fmt: skip
        cond_state = {
            "transformer." + k: v for k, v in _read_tensors(directory / "text_encoder").items()
        }
    elif bert_kind is not None:
        kind = bert_kind
        _require(kind == "LDMBertModel", f"{directory}: bert {kind} has no ldmkit conditioner (LDMBertModel does: bert)")
        conditioner = _bert_from_config(_read_json(directory / "bert" / "config.json"), f"{directory}/bert/config.json")
        base = Path(text_encoder_dir) if text_encoder_dir is not None else directory
        conditioner.update(vocab=_bert_vocab(base / "tokenizer", bool(extra.get("bert_default_vocab"))), **_text_options(extra))
        names = {theirs: ours for ours, theirs in _bert_names(conditioner["n_layer"]).items()}
        bert_state = _read_tensors(directory / "bert")
        unknown = sorted(set(bert_state) - set(names))
        _require(not unknown, f"{directory}/bert: weights ldmkit's bert does not have: {unknown[:5]}")
        cond_state = {"transformer." + names[k]: v for k, v in bert_state.items()}
    elif (directory / CONDITIONER_DIR / "config.json").is_file():
        conditioner = _component(
            _read_json(directory / CONDITIONER_DIR / "config.json"), "conditioner", f"{CONDITIONER_DIR}/config.json"
        )
        carried = pipeline_files.resolve(OmegaConf.create({"conditioner": conditioner}), directory / CONDITIONER_DIR)
        conditioner = OmegaConf.to_container(carried.conditioner)
        if (directory / CONDITIONER_DIR / "model.safetensors").is_file():
            cond_state = _read_tensors(directory / CONDITIONER_DIR)
    elif unet_cfg["num_classes"] not in (None, "sequential"):
        conditioner = {"name": "class_label", "num_classes": unet_cfg["num_classes"], "embed_dim": 1, "role": "vector",
                       "input_key": "label", "drop_rate": 0.0}  # fmt: skip
    else:
        _require(
            unet_cfg.get("context_dim") is None,
            f"{directory}: its UNet attends to a condition (cross_attention_dim="
            f"{unet_cfg.get('context_dim')}) but the folder has nothing that makes one: no "
            f"text_encoder, no bert and no {CONDITIONER_DIR}/ (what `ldmkit convert to-diffusers` "
            f"writes for a conditioner diffusers has no class for); put back the one it was "
            f"trained with",
        )
        conditioner = {"name": "none"}
    groups = {"first_stage": first, "denoiser": unet_cfg, "conditioner": conditioner, "sampler": sampler,
              "schedule": schedule}  # fmt: skip
    model = compvis.CompvisModel("pipeline", groups, {"image_size": image_size, "scale_factor": scale},
                                 source=str(directory))  # fmt: skip
    cfg = compvis.compose(model, source_kind="diffusers")
    state = {
        "denoiser." + k: v
        for k, v in unet_from_diffusers(_read_tensors(directory / "unet"), unet_cfg).items()
    }
    first_state = vae_from_diffusers(_read_tensors(directory / vae_dir), first)
    state.update({"first_stage." + k: v for k, v in first_state.items()})
    state.update({"conditioner." + k: v for k, v in cond_state.items()})
    return cfg, state, scale


def fit_state(state: dict[str, Tensor], own: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """``state`` completed for a pipeline whose own state dict is ``own``: the scale factor,
    the schedule buffers diffusers does not store, the text encoder's names."""
    state = _fit_text_encoder(state, own)
    if "scale_factor" in own:
        state["scale_factor"] = torch.full_like(own["scale_factor"], scale)
    for name, value in own.items():
        if name not in state and not name.startswith(("denoiser.", "first_stage.", "conditioner.")):
            state[name] = value
    return state
