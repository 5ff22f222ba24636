"""The paper's checkpoints (CompVis/latent-diffusion): its ``config.yaml`` translated into an
ldmkit config, its state dict renamed into ldmkit's layout.

The YAML is read as data — ``target:`` strings are looked up in :data:`TARGETS`, never
imported. Where the paper's YAML leaves an argument at its constructor default, the paper's
default is written (they differ from ldmkit's: the paper's UNet has ``num_heads=-1``,
``num_head_channels=-1`` and ``use_spatial_transformer=False``; ldmkit's 16 channels per head
and transformers on).

What maps where (``model_ema.*`` holds the EMA of ``model.*`` with the dots of each name
removed; :func:`convert_state_dict` takes it by default):

=================================== ======================================================
the paper                           ldmkit
=================================== ======================================================
``model.diffusion_model.*``         ``denoiser.*`` (same names)
``first_stage_model.*``             ``first_stage.*`` (``quantize.embedding`` ->
                                    ``regularizer.embedding``)
``cond_stage_model.*``              ``conditioner.*`` (``ClassEmbedder``: ``embedding``;
                                    ``BERTEmbedder``: ``transformer.*``;
                                    ``SpatialRescaler``: ``rescaler.channel_mapper``;
                                    ``__is_first_stage__``: a copy of
                                    ``first_stage_model.*``, checked equal, dropped)
``scale_factor``                    the config's ``scale_factor``
``loss_type`` (the YAML's)          ``CompvisModel.loss_type`` (``trainer.init_from`` names it)
``betas`` ... ``posterior_*``       checked against the translated schedule, then dropped
``loss.*``, ``model_ema.decay``...  dropped
=================================== ======================================================

A standalone first stage (``AutoencoderKL`` / ``VQModel``, with ``loss.*`` keys that are
dropped) translates to the ``first_stage`` group alone (``kind == "first_stage"``):
``ldmkit convert compvis`` writes it as a folder that ``first_stage.checkpoint=`` accepts.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit.errors import ConfigError, WeightsError, first_few
from ldmkit.weights import read_weights

__all__ = [
    "TARGETS",
    "CompvisModel",
    "convert_state_dict",
    "read_compvis",
    "load_preset",
    "preset_names",
    "read_compvis_config",
    "translate_config",
    "translation",
]

LDM = "ldm.models.diffusion.ddpm.LatentDiffusion"
KL = "ldm.models.autoencoder.AutoencoderKL"
VQ = ("ldm.models.autoencoder.VQModel", "ldm.models.autoencoder.VQModelInterface")
UNET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
CLASS = "ldm.modules.encoders.modules.ClassEmbedder"
BERT = "ldm.modules.encoders.modules.BERTEmbedder"
RESCALER = "ldm.modules.encoders.modules.SpatialRescaler"
CLIP = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
IDENTITY = "torch.nn.Identity"
# every target the translation knows, and what it becomes
TARGETS: dict[str, str] = {
    LDM: "a pipeline",
    KL: "first_stage=kl",
    **dict.fromkeys(VQ, "first_stage=vq"),
    UNET: "denoiser=unet",
    CLASS: "conditioner=class_label (the paper's null class: the last of n_classes)",
    BERT: "conditioner=bert",
    RESCALER: "conditioner=semantic_map",
    CLIP: "conditioner=clip_text (Stable Diffusion v1; its config and tokenizer from a local folder: text_encoder=)",
    IDENTITY: "conditioner=low_res (cond_stage_key LR_image, concat); with conditioning_key adm: "
    "class_label role vector (the UNet's num_classes)",
    "__is_unconditional__": "conditioner=none",
    "__is_first_stage__": "conditioner=inpaint style=paper (concat of the masked image's latent and the mask)",
}
# the paper's constructor defaults where ldmkit's differ (openaimodel.UNetModel, ddpm.DDPM)
UNET_DEFAULTS: dict[str, Any] = {
    "dropout": 0.0,
    "channel_mult": [1, 2, 4, 8],
    "conv_resample": True,
    "num_classes": None,
    "num_heads": -1,
    "num_head_channels": -1,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "use_new_attention_order": False,
    "use_spatial_transformer": False,
    "transformer_depth": 1,
    "context_dim": None,
}
DDPM_DEFAULTS: dict[str, Any] = {
    "timesteps": 1000,
    "beta_schedule": "linear",
    "linear_start": 1e-4,
    "linear_end": 2e-2,
    "cosine_s": 8e-3,
    "parameterization": "eps",
    "scale_factor": 1.0,
    "conditioning_key": None,
    "concat_mode": True,
    "cond_stage_key": "image",
    "image_size": 256,
}
# the condition dropout written for the class and text conditioners: the published class and
# text models were trained with a null condition (cin256-v2's class 1000, the empty prompt) and
# are sampled with guidance; a rate > 0 records that the null condition is learned
# (``Conditioner.learns_null_condition``) and is what fine-tuning continues with
GUIDED_DROP_RATE = 0.1
# the DDPM buffers (derived from the schedule) a LatentDiffusion state dict carries
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar",
)  # fmt: skip


@dataclass
class CompvisModel:
    """A translated paper model: ``kind`` is ``"pipeline"`` or ``"first_stage"``; ``groups``
    maps each ldmkit config group (``first_stage``, ``denoiser``, ``conditioner``, ``sampler``,
    ``schedule``) to its node, ``top`` holds top-level keys (``image_size``, ``scale_factor``);
    ``renames`` maps a paper component prefix to an ldmkit one; ``loss_type`` is the loss
    the paper trained a pipeline with (``l2``, its default, or ``l1``; None: not known), which
    no ldmkit group holds (``trainer.objective.loss_type`` is the run's)."""

    kind: str
    groups: dict[str, dict[str, Any]]
    top: dict[str, Any] = field(default_factory=dict)
    renames: dict[str, str] = field(default_factory=dict)
    source: str = "config"
    loss_type: str | None = None


def _params(node: Any, where: str) -> dict[str, Any]:
    if not isinstance(node, dict) or "target" not in node:
        raise ConfigError(f"{where}: expected a mapping with `target:` and `params:`, got {node!r}")
    params = node.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.params: expected a mapping, got {type(params).__name__}")
    return params


def _unsupported(target: str, where: str) -> ConfigError:
    return ConfigError(
        f"{where}: target {target!r} is not supported; supported targets: "
        + "; ".join(f"{t} -> {what}" for t, what in TARGETS.items())
    )


def _first_stage(node: dict[str, Any], where: str) -> dict[str, Any]:
    target = node.get("target")
    params = _params(node, where)
    dd = dict(params.get("ddconfig") or {})
    if not dd:
        raise ConfigError(f"{where}.params.ddconfig is missing (the encoder/decoder shape)")
    if dd.get("attn_type", "vanilla") not in ("vanilla", "none"):
        raise ConfigError(
            f"{where}.params.ddconfig.attn_type={dd['attn_type']!r}: supported are 'vanilla' (the "
            "paper's default) and 'none'"
        )
    embed_dim = params.get("embed_dim")
    if embed_dim is None:
        raise ConfigError(f"{where}.params.embed_dim is missing (the latent channels)")
    arch = {
        "latent_channels": int(embed_dim),
        "z_channels": int(dd["z_channels"]),
        "ch": int(dd["ch"]),
        "ch_mult": [int(m) for m in dd["ch_mult"]],
        "num_res_blocks": int(dd["num_res_blocks"]),
        "attn_resolutions": [int(r) for r in dd.get("attn_resolutions", [])],
        "resolution": int(dd["resolution"]),
        "in_channels": int(dd["in_channels"]),
        "out_ch": int(dd["out_ch"]),
        "dropout": float(dd.get("dropout", 0.0)),
        "norm_groups": 32,
        "attn_type": str(dd.get("attn_type", "vanilla")),
    }
    if target == KL:
        if not dd.get("double_z", True):
            raise ConfigError(f"{where}: an AutoencoderKL needs ddconfig.double_z=true (mean and log-variance)")
        return {"name": "kl", **arch, "kl_weight": 1e-6, "encode_mode": "sample"}
    if target in VQ:
        for key in ("remap", "sane_index_shape"):
            if params.get(key):
                raise ConfigError(f"{where}.params.{key} is not supported (codebook remapping)")
        return {"name": "vq", **arch, "n_embed": int(params["n_embed"]), "beta": 0.25}
    raise _unsupported(str(target), where)


def _unet(node: dict[str, Any], where: str) -> dict[str, Any]:
    if node.get("target") != UNET:
        raise _unsupported(str(node.get("target")), where)
    params = {**UNET_DEFAULTS, **_params(node, where)}
    if int(params.get("dims", 2)) != 2:
        raise ConfigError(f"{where}.params.dims={params['dims']}: only 2-d UNets are supported")
    if params.get("n_embed") is not None:
        raise ConfigError(f"{where}.params.n_embed: codebook-index prediction is not supported")
    upsample = params.get("num_heads_upsample", -1)
    if upsample not in (-1, params["num_heads"]):
        raise ConfigError(f"{where}.params.num_heads_upsample={upsample}: a separate head count for the decoder is not supported")
    keys = ("in_channels", "out_channels", "model_channels", "num_res_blocks", "attention_resolutions",
            *UNET_DEFAULTS)  # fmt: skip
    missing = [k for k in keys if k not in params]
    if missing:
        raise ConfigError(f"{where}.params is missing {missing}")
    out = {"name": "unet", **{k: params[k] for k in keys}}
    out["attention_resolutions"] = [int(r) for r in out["attention_resolutions"]]
    out["channel_mult"] = [int(m) for m in out["channel_mult"]]
    out["vector_dim"] = None
    out["adm_in_channels"] = None
    out["use_checkpoint"] = False
    return out


def _conditioner(
    node: Any, ddpm: dict[str, Any], unet: dict[str, Any], latent: int, null_class: str | int, text_encoder: str | None
) -> tuple[dict[str, Any], str]:
    """(conditioner node, the paper's conditioning key after its defaulting rules)."""
    where = "model.params.cond_stage_config"
    key = ddpm["conditioning_key"]
    if key is None:
        key = "concat" if ddpm["concat_mode"] else "crossattn"
    if node == "__is_unconditional__" or node is None:
        return {"name": "none"}, "none"
    if key == "hybrid":
        raise ConfigError(
            "model.params.conditioning_key='hybrid' is not supported: the paper's LatentDiffusion hands the "
            "UNet one condition, so a hybrid model (concat + crossattn) needs a subclass that builds both "
            "(e.g. Stable Diffusion's LatentInpaintDiffusion), whose target is not translated; compose it "
            "in ldmkit with conditioner=multi (a concat part and a crossattn part)"
        )
    if key == "adm":
        target = node.get("target") if isinstance(node, dict) else node
        classes = unet.get("num_classes")
        if target != IDENTITY or not isinstance(classes, int):
            raise ConfigError(
                f"{where}: conditioning_key='adm' is supported for class labels fed straight to the UNet's "
                f"label_emb (cond_stage_config torch.nn.Identity and an int unet num_classes), got "
                f"{target!r} and num_classes={classes!r}"
            )
        return {"name": "class_label", "num_classes": classes, "embed_dim": 1, "role": "vector",
                "input_key": "label", "drop_rate": 0.0}, key  # fmt: skip
    if node == "__is_first_stage__":
        if key != "concat" or unet["in_channels"] != 2 * latent + 1:
            raise ConfigError(
                f"{where}: __is_first_stage__ is supported as the paper's inpainting layout "
                f"(concat, UNet in_channels = 2 x {latent} + 1), got {key} and {unet['in_channels']}"
            )
        # style paper: the condition scripts/inpaint.py builds (hole black, mask -1/1 resized nearest)
        return {"name": "inpaint", "image_key": "image", "mask_key": "mask", "style": "paper",
                "drop_rate": 0.0}, key  # fmt: skip
    target = node.get("target") if isinstance(node, dict) else None
    params = _params(node, where)
    if target == CLASS:
        n = int(params.get("n_classes", 1000))
        null = null_class_index(n, null_class)
        return {"name": "class_label", "num_classes": n - 1, "null_index": None if null == n - 1 else null,
                "embed_dim": int(params["embed_dim"]),
                "role": key, "input_key": "label", "drop_rate": GUIDED_DROP_RATE}, key  # fmt: skip
    if target == BERT:
        bert = {"name": "bert", "n_embed": int(params["n_embed"]), "n_layer": int(params["n_layer"]),
                "max_seq_len": int(params.get("max_seq_len", 77)), "heads": 8, "dim_head": 64}  # fmt: skip
        if not params.get("use_tokenizer", True):
            # token ids straight from the data (layout2img: the bounding-box builder's tokens);
            # the paper trained these without a null condition
            return {**bert, "use_tokenizer": False, "vocab_size": int(params.get("vocab_size", 30522)),
                    "input_key": str(ddpm["cond_stage_key"]), "drop_rate": 0.0}, key  # fmt: skip
        if int(params.get("vocab_size", 30522)) != 30522:
            raise ConfigError(f"{where}.params.vocab_size={params['vocab_size']}: the bert conditioner uses the 30,522-token bert-base-uncased vocab")
        return {**bert, "vocab": None, "input_key": "caption", "drop_rate": GUIDED_DROP_RATE}, key
    if target == CLIP:
        if text_encoder is None:
            raise ConfigError(
                f"{where}: FrozenCLIPEmbedder ({params.get('version', 'openai/clip-vit-large-patch14')}) needs a "
                "local folder with that CLIP text model's config.json and tokenizer (vocab.json, merges.txt); "
                "pass text_encoder= (ldmkit convert compvis --text-encoder DIR); the weights come from the checkpoint"
            )
        return {"name": "clip_text", "name_or_path": str(text_encoder), "tokenizer_path": None,
                "max_length": int(params.get("max_length", 77)), "pretrained": False, "input_key": "caption",
                "drop_rate": GUIDED_DROP_RATE}, key  # fmt: skip
    if target == RESCALER:
        if float(params.get("multiplier", 0.5)) != 0.5 or params.get("bias", False):
            raise ConfigError(f"{where}: only SpatialRescaler(multiplier=0.5, bias=False) is supported")
        return {"name": "semantic_map", "num_classes": int(params.get("in_channels", 3)),
                "n_stages": int(params.get("n_stages", 1)), "out_channels": params.get("out_channels"),
                "method": str(params.get("method", "bilinear")), "input_key": "segmentation",
                "drop_rate": 0.0}, key  # fmt: skip
    if target == IDENTITY and key == "concat" and ddpm["cond_stage_key"] == "LR_image":
        channels = unet["in_channels"] - latent
        return {"name": "low_res", "factor": 4, "channels": channels, "method": "bicubic",
                "input_key": "lowres", "source_key": "image", "drop_rate": 0.0}, key  # fmt: skip
    raise _unsupported(str(target), where)


def null_class_index(n_classes: int, null_class: str | int) -> int:
    """The null class (the unconditional input of guidance) of a ``ClassEmbedder`` of
    ``n_classes`` rows: ``"last"`` (the paper's cin256-v2 convention, ``n_classes - 1``) or any
    index. ldmkit's ``class_label`` then has ``n_classes - 1`` real classes, and its labels name
    table rows (``null_index``)."""
    index = n_classes - 1 if null_class == "last" else null_class
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_classes:
        raise ConfigError(f"null_class={null_class!r}: expected 'last' or a class index in [0, {n_classes})")
    return index


def translate_config(
    config: dict[str, Any], *, null_class: str | int = "last", text_encoder: str | os.PathLike | None = None
) -> CompvisModel:
    """The ldmkit groups for the paper's ``config.yaml`` (already parsed to a dict)."""
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise ConfigError("the config has no `model:` mapping (is it the paper's config.yaml?)")
    target = model.get("target")
    params = _params(model, "model")
    if target == KL or target in VQ:
        return CompvisModel("first_stage", {"first_stage": _first_stage(model, "model")})
    if target != LDM:
        raise _unsupported(str(target), "model")
    ddpm = {**DDPM_DEFAULTS, **params}  # scale_by_std: read_compvis takes the checkpoint's scale_factor buffer
    first = params.get("first_stage_config")
    if not isinstance(first, dict):
        raise ConfigError("model.params.first_stage_config is missing")
    first_stage = _first_stage(first, "model.params.first_stage_config")
    unet = _unet(params.get("unet_config") or {}, "model.params.unet_config")
    latent = first_stage["latent_channels"]
    conditioner, key = _conditioner(
        params.get("cond_stage_config"), ddpm, unet, latent, null_class, None if text_encoder is None else str(text_encoder)
    )
    if key != "crossattn":
        unet["context_dim"] = None if not unet["use_spatial_transformer"] else unet["context_dim"]
    unet["prediction"] = {"eps": "eps", "x0": "x0", "v": "v"}.get(ddpm["parameterization"])
    if unet["prediction"] is None:
        raise ConfigError(f"model.params.parameterization={ddpm['parameterization']!r}: expected eps, x0 or v")
    kind = {"linear": "linear", "cosine": "cosine", "sqrt_linear": "sqrt_linear"}.get(ddpm["beta_schedule"])
    if kind is None:
        raise ConfigError(f"model.params.beta_schedule={ddpm['beta_schedule']!r} is not supported (linear, cosine, sqrt_linear)")
    schedule = {"kind": kind, "timesteps": int(ddpm["timesteps"]), "linear_start": float(ddpm["linear_start"]),
                "linear_end": float(ddpm["linear_end"]), "cosine_s": float(ddpm["cosine_s"])}  # fmt: skip
    f = 2 ** (len(first_stage["ch_mult"]) - 1)
    top = {"image_size": int(ddpm["image_size"]) * f, "scale_factor": float(ddpm["scale_factor"])}
    groups = {
        "first_stage": first_stage,
        "denoiser": unet,
        "conditioner": conditioner,
        "sampler": {"name": "ddim", "steps": 50, "eta": 0.0, "spacing": "paper"},
        "schedule": schedule,
    }
    return CompvisModel("pipeline", groups, top, loss_type=str(ddpm.get("loss_type", "l2")))


def read_compvis_config(path: str | os.PathLike) -> dict[str, Any]:
    """The paper's YAML as plain data (``target:`` strings are never imported)."""
    import yaml

    from ldmkit.config import refuse_interpolations, yaml_problem

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path} does not exist (the paper's config.yaml of this checkpoint)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not YAML: {yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a mapping")
    refuse_interpolations(data, path)  # its values become the pipeline's config
    return data


PREFIXES = {"model.diffusion_model.": "denoiser.", "first_stage_model.": "first_stage.", "cond_stage_model.": "conditioner."}


def _conditioner_key(name: str, conditioner: str) -> str | None:
    """``cond_stage_model.<name>`` in ldmkit's conditioner; None: not a weight (dropped)."""
    if conditioner == "semantic_map":
        return "rescaler." + name
    if conditioner == "clip_text":
        if name.endswith("embeddings.position_ids"):
            return None  # a constant buffer (0..76) older transformers versions saved
        if name.startswith("transformer.text_model.") and not _clip_has_text_model():
            return "transformer." + name[len("transformer.text_model."):]
    return name


@functools.cache
def _clip_has_text_model() -> bool:
    """Whether the installed transformers' ``CLIPTextModel`` keeps its weights under
    ``text_model.`` (Stable Diffusion's checkpoints do; transformers 5 does not)."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError:
        return True
    tiny = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                          num_attention_heads=1, max_position_embeddings=4, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)  # fmt: skip
    with torch.device("meta"):
        return any(k.startswith("text_model.") for k in CLIPTextModel(tiny).state_dict())


def convert_state_dict(
    state: dict[str, Tensor], model: CompvisModel, *, use_ema: bool = True
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The paper's state dict in ldmkit's names, and facts read from it (``scale_factor``,
    whether EMA weights were used, the schedule buffers). ``use_ema`` takes each denoiser
    weight from ``model_ema.*`` when the checkpoint has it (an error when it has EMA for
    some weights only)."""
    facts: dict[str, Any] = {"ema": False}
    out: dict[str, Tensor] = {}
    if model.kind == "first_stage":
        for name, value in state.items():
            if name.startswith("loss."):
                continue
            out[_first_stage_key(name)] = value
        return out, facts
    conditioner = model.groups["conditioner"]["name"]
    if conditioner == "inpaint":
        state = _without_first_stage_copy(state)
    ema = {k[len("model_ema."):]: v for k, v in state.items()
           if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")}  # fmt: skip
    for name, value in state.items():
        if name in SCHEDULE_BUFFERS:
            facts[name] = value
            continue
        if name == "scale_factor":
            facts["scale_factor"] = float(value)
            continue
        for paper, ours in PREFIXES.items():
            if name.startswith(paper):
                rest = name[len(paper):]
                if ours == "first_stage.":
                    if rest.startswith("loss."):
                        break
                    rest = _first_stage_key(rest)
                elif ours == "conditioner.":
                    rest = _conditioner_key(rest, conditioner)
                    if rest is None:
                        break
                elif use_ema and ema:
                    flat = ("diffusion_model." + rest).replace(".", "")
                    if flat not in ema:
                        raise WeightsError(
                            f"the checkpoint has EMA weights (model_ema.*) but none for {name} "
                            f"(model_ema.{flat}); convert without EMA (--no-ema / use_ema=False)"
                        )
                    value = ema[flat]
                    facts["ema"] = True
                out[ours + rest] = value
                break
    return out, facts


def _without_first_stage_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without ``cond_stage_model.*``: the paper's ``__is_first_stage__`` condition
    stage (ldmkit's ``inpaint``) is its first stage, saved a second time under that prefix.
    Each copy must equal its ``first_stage_model.*`` tensor; the first that does not is an error."""
    copies = [name for name in state if name.startswith("cond_stage_model.")]
    for name in copies:
        twin = "first_stage_model." + name[len("cond_stage_model."):]
        original = state.get(twin)
        if original is None:
            problem = f"there is no {twin}"
        elif original.shape != state[name].shape or not torch.equal(original, state[name]):
            problem = f"it differs from {twin}"
        else:
            continue
        raise WeightsError(
            f"{name}: the paper's inpainting model (cond_stage_config __is_first_stage__) saves its first "
            f"stage a second time under cond_stage_model.*, but {problem}; the checkpoint is not that layout "
            "or was modified"
        )
    return {name: value for name, value in state.items() if not name.startswith("cond_stage_model.")}


def _first_stage_key(name: str) -> str:
    return "regularizer." + name[len("quantize."):] if name.startswith("quantize.") else name


def load_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a paper checkpoint (``.ckpt``: its ``state_dict``; or ``.safetensors``),
    read without running pickled code and memory-mapped where the format allows."""
    if Path(path).is_dir():  # read_weights would take it for an ldmkit folder or run
        raise WeightsError(f"checkpoint {path} is a folder, not the paper's .ckpt (or .safetensors) file")
    return read_weights(path)


PRESETS_DIR = Path(__file__).with_name("presets")


def preset_names() -> list[str]:
    """The paper's published models with a stored translation (docs/interop.md lists them)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> CompvisModel:
    """The stored translation of a published model's config (``cin256-v2``, ``kl-f8``...)."""
    import yaml

    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset {name!r}; the presets are: {', '.join(preset_names())}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    loss_type = data.get("loss_type", "l2") if data["kind"] == "pipeline" else None  # the paper's default: l2
    return CompvisModel(data["kind"], data["groups"], data.get("top") or {}, source=f"preset {name}",
                        loss_type=loss_type)  # fmt: skip


def translation(
    config: str | os.PathLike | None,
    preset: str | None,
    *,
    null_class: str | int = "last",
    text_encoder: str | os.PathLike | None = None,
) -> CompvisModel:
    """The translated model of the paper's ``config.yaml``, or the stored ``preset`` (one of
    them). ``null_class`` picks a class-conditional model's unconditional class (``"last"``
    or an index); ``text_encoder`` is the local CLIP folder (config + tokenizer) of a Stable
    Diffusion v1 model."""
    if (config is None) == (preset is None):
        raise ConfigError("give the paper's config.yaml or a preset name (one of them)")
    if preset is None:
        model = translate_config(read_compvis_config(config), null_class=null_class, text_encoder=text_encoder)
        model.source = str(config)
    else:
        model = load_preset(preset)
    cond = model.groups.get("conditioner", {})
    if null_class != "last" and (cond.get("name") != "class_label" or cond.get("role", "crossattn") != "crossattn"):
        raise ConfigError(f"null_class={null_class!r}: {model.source} has no class embedding with a null class")
    if text_encoder is not None and cond.get("name") != "clip_text":
        raise ConfigError(f"text_encoder applies to Stable Diffusion (FrozenCLIPEmbedder) models, not {model.source}")
    if preset is None:
        return model
    if null_class != "last":
        rows = int(cond["num_classes"]) + 1
        index = null_class_index(rows, null_class)
        cond["null_index"] = None if index == rows - 1 else index
    if cond.get("name") == "clip_text":
        if text_encoder is None:
            raise ConfigError(
                f"preset {preset}: its FrozenCLIPEmbedder needs a local folder with the CLIP text model's "
                "config.json and tokenizer (openai/clip-vit-large-patch14): pass text_encoder= "
                "(ldmkit convert compvis --text-encoder DIR)"
            )
        cond["name_or_path"] = str(text_encoder)
    return model


def read_compvis(
    checkpoint: str | os.PathLike,
    config: str | os.PathLike | None = None,
    *,
    preset: str | None = None,
    use_ema: bool = True,
    null_class: str | int = "last",
    text_encoder: str | os.PathLike | None = None,
) -> tuple[CompvisModel, dict[str, Tensor], dict[str, Any]]:
    """Translate ``config`` (or take the stored ``preset``) and rename the tensors of
    ``checkpoint``: (model, state, facts)."""
    model = translation(config, preset, null_class=null_class, text_encoder=text_encoder)
    state, facts = convert_state_dict(load_checkpoint(checkpoint), model, use_ema=use_ema)
    if "scale_factor" in facts:
        model.top["scale_factor"] = facts["scale_factor"]
    return model, state, facts


def check_schedule(facts: dict[str, Any], alphas_cumprod: Tensor, where: str) -> None:
    """The checkpoint's own ``alphas_cumprod`` must equal the translated schedule's."""
    saved = facts.get("alphas_cumprod")
    if saved is None:
        return
    # to the precision the checkpoint stores it in (a half-precision file's rounding is ~1e-3)
    rtol = max(1e-4, torch.finfo(saved.dtype).eps) if saved.is_floating_point() else 1e-4
    if saved.shape != alphas_cumprod.shape or not torch.allclose(saved.double(), alphas_cumprod.double().cpu(), rtol=rtol, atol=1e-6):
        raise ConfigError(
            f"{where}: the checkpoint's alphas_cumprod does not match the schedule its config "
            "describes (linear_start / linear_end / timesteps / beta_schedule)"
        )


# the config-group option each translated component is composed from (its node then replaces
# the option's node whole, so no ldmkit default leaks in)
GROUP_OPTIONS = {"kl": "kl_f8", "vq": "vq_f4", "unet": "unet", "class_label": "class_label", "bert": "bert",
                 "semantic_map": "semantic_map", "low_res": "low_res", "inpaint": "inpaint", "none": "none",
                 "clip_text": "clip_text",
                 "ddim": "ddim"}  # fmt: skip


def compose(model: CompvisModel, *, weights: str | None = None, source_kind: str = "compvis") -> Any:
    """The full ldmkit config (a ``DictConfig``) of a translated pipeline; ``choices`` records
    the source, which ``weights`` (``ema`` / ``raw``) were taken and the paper's ``loss_type``."""
    from omegaconf import OmegaConf, open_dict

    from ldmkit.config import compose_config

    groups = ("first_stage", "denoiser", "conditioner", "sampler")
    # a component without a row (a diffusers folder's ldmkit.json sampler, its ldmkit_conditioner)
    # is composed from the option of its own name, as ldmkit's samplers and conditioners are
    names = [model.groups[g]["name"] for g in groups]
    cfg = compose_config([f"{g}={GROUP_OPTIONS.get(n, n)}" for g, n in zip(groups, names, strict=True)])
    with open_dict(cfg):
        for group in (*groups, "schedule"):
            cfg[group] = OmegaConf.create(model.groups[group])
        for key, value in model.top.items():
            cfg[key] = value
        cfg.choices = {**cfg.get("choices", {}), "source": f"{source_kind}:{model.source}"}
        if weights is not None:
            cfg.choices.weights = weights
        if model.loss_type is not None:  # what it trained with, for a later trainer.init_from
            cfg.choices.loss_type = model.loss_type
    return cfg


def load_converted(module: torch.nn.Module, state: dict[str, Tensor], where: str) -> None:
    """``module.load_state_dict(state)``, strict; a mismatch lists the first missing and
    unexpected keys under the component they belong to."""
    own = module.state_dict()
    reshaped = [f"{k} is {list(v.shape)} there but {list(own[k].shape)} in the model"
                for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]  # fmt: skip
    if reshaped:  # (torch's message is one line per tensor)
        raise WeightsError(f"{where} does not fit the model its config describes: {first_few(reshaped, sep='; ')}")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        def by_component(keys: list[str]) -> str:
            groups: dict[str, list[str]] = {}
            for key in keys:
                groups.setdefault(key.split(".", 1)[0], []).append(key)
            return "; ".join(f"{c}: {len(k)} ({', '.join(k[:3])}{', ...' if len(k) > 3 else ''})" for c, k in groups.items())

        parts = []
        if missing:
            parts.append(f"missing {by_component(sorted(missing))}")
        if unexpected:
            parts.append(f"unexpected {by_component(sorted(unexpected))}")
        raise WeightsError(f"{where} does not fit the model its config describes: " + "; ".join(parts))
