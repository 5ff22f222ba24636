"""Importing the paper's checkpoints (ldmkit.interop.compvis, Pipeline.from_compvis,
``ldmkit convert compvis``) from fixtures written in the paper's exact layout at tiny sizes:
``model.diffusion_model.*``, ``first_stage_model.*`` (with ``loss.*``), ``cond_stage_model.*``,
``model_ema.*`` with the dots of each name removed, the DDPM schedule buffers and the
``scale_factor`` buffer, in a PyTorch-Lightning-style ``{"state_dict": ...}`` pickle; the
inpainting layout (``__is_first_stage__``) also holds the first stage under
``cond_stage_model.*``."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
import yaml

from ldmkit.errors import ConfigError, UnreadableWeightsError, WeightsError
from ldmkit.interop import compvis
from ldmkit.pipeline import Pipeline
from tests.conftest import ldmkit_cli
from tests.test_bad_values import error_line

# the paper's LatentDiffusion layout (cin256-v2's, scaled down): class-conditional,
# cross-attention, a KL first stage with f = 2
LDM_CONFIG = {
    "model": {
        "base_learning_rate": 1e-4,
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.0015,
            "linear_end": 0.0195,
            "timesteps": 1000,
            "first_stage_key": "image",
            "cond_stage_key": "class_label",
            "image_size": 8,
            "channels": 3,
            "cond_stage_trainable": True,
            "conditioning_key": "crossattn",
            "scale_by_std": True,
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {
                    "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32,
                    "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2],
                    "num_heads": 1, "use_spatial_transformer": True, "transformer_depth": 1,
                    "context_dim": 8,
                },
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {
                    "embed_dim": 3,
                    "ddconfig": {
                        "double_z": True, "z_channels": 3, "resolution": 16, "in_channels": 3,
                        "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                        "attn_resolutions": [], "dropout": 0.0,
                    },
                    "lossconfig": {"target": "torch.nn.Identity"},
                },
            },
            "cond_stage_config": {
                "target": "ldm.modules.encoders.modules.ClassEmbedder",
                "params": {"n_classes": 11, "embed_dim": 8, "key": "class_label"},
            },
        },
    }
}  # fmt: skip

PAPER_PREFIX = {"denoiser.": "model.diffusion_model.", "first_stage.": "first_stage_model.",
                "conditioner.": "cond_stage_model."}  # fmt: skip


def paper_betas(start: float, end: float, steps: int) -> np.ndarray:
    """The paper's ``make_beta_schedule("linear")``: linspace of square roots, squared."""
    return np.linspace(start**0.5, end**0.5, steps, dtype=np.float64) ** 2


def paper_schedule_buffers(start: float, end: float, steps: int) -> dict[str, torch.Tensor]:
    """The buffers the paper's ``DDPM.register_schedule`` saves (float32; ``lvlb_weights`` is
    not persistent), computed from its formulas (``v_posterior = 0``)."""
    betas = paper_betas(start, end, steps)
    cumprod = np.cumprod(1 - betas)
    prev = np.append(1.0, cumprod[:-1])
    posterior = betas * (1 - prev) / (1 - cumprod)
    buffers = {
        "betas": betas, "alphas_cumprod": cumprod, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": np.sqrt(cumprod), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - cumprod),
        "log_one_minus_alphas_cumprod": np.log(1 - cumprod), "sqrt_recip_alphas_cumprod": np.sqrt(1 / cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / cumprod - 1), "posterior_variance": posterior,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1 - cumprod),
        "posterior_mean_coef2": (1 - prev) * np.sqrt(1 - betas) / (1 - cumprod),
    }  # fmt: skip
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in buffers.items()}


def paper_state(
    pipe: Pipeline, *, ema_shift: float = 1.0, linear: tuple[float, float] = (0.0015, 0.0195),
    scale_factor: float | None = 0.7,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """``pipe``'s weights renamed into the paper's layout, with an EMA copy of the denoiser
    (raw + ``ema_shift``), autoencoder loss weights, the schedule buffers of ``linear``
    (start, end) and, when not None, the ``scale_factor`` buffer (``scale_by_std``). An
    ``inpaint`` pipeline is the paper's ``__is_first_stage__`` layout: its condition stage is
    its first stage, so every ``first_stage_model.*`` tensor is saved a second time under
    ``cond_stage_model.*``."""
    state: dict[str, torch.Tensor] = {}
    for key, value in pipe.state_dict().items():
        for ours, theirs in PAPER_PREFIX.items():
            if key.startswith(ours):
                rest = key[len(ours):]
                if ours == "first_stage." and rest.startswith("regularizer."):
                    rest = "quantize." + rest[len("regularizer."):]
                state[theirs + rest] = value.clone()
                if ours == "denoiser.":
                    flat = ("diffusion_model." + rest).replace(".", "")
                    state["model_ema." + flat] = value.clone() + ema_shift
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(123)
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    state["first_stage_model.loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    if pipe.config.conditioner.name == "inpaint":  # the same tensors, as the paper's state_dict() holds them
        for key in [k for k in state if k.startswith("first_stage_model.")]:
            state["cond_stage_model." + key[len("first_stage_model."):]] = state[key]
    state.update(paper_schedule_buffers(*linear, 1000))
    if scale_factor is not None:
        state["scale_factor"] = torch.tensor(scale_factor)
    return state


@pytest.fixture(scope="module")
def paper_files(tmp_path_factory):
    """A tiny LDM checkpoint and its config.yaml in the paper's layout."""
    root = tmp_path_factory.mktemp("paper")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(LDM_CONFIG))
    torch.manual_seed(0)
    pipe = Pipeline.from_config(compvis.compose(compvis.translate_config(LDM_CONFIG)))
    torch.save({"state_dict": paper_state(pipe), "global_step": 5, "epoch": 1}, root / "model.ckpt")
    return root / "model.ckpt", config, pipe


def test_config_translation_writes_the_papers_defaults():
    model = compvis.translate_config(LDM_CONFIG)
    unet = model.groups["denoiser"]
    assert unet["num_heads"] == 1 and unet["num_head_channels"] == -1  # the paper's, not ldmkit's 16
    assert unet["attention_resolutions"] == [2] and unet["prediction"] == "eps"
    assert model.groups["conditioner"] == {"name": "class_label", "num_classes": 10, "embed_dim": 8,
                                           "role": "crossattn", "input_key": "label", "drop_rate": 0.1,
                                           "null_index": None}
    assert model.groups["schedule"]["linear_start"] == 0.0015 and model.groups["schedule"]["kind"] == "linear"
    assert model.groups["sampler"]["spacing"] == "paper"
    assert model.top["image_size"] == 16  # latent 8 x f 2
    bare = copy.deepcopy(LDM_CONFIG)
    params = bare["model"]["params"]["unet_config"]["params"]
    for key in ("num_heads", "use_spatial_transformer", "context_dim"):
        del params[key]
    bare["model"]["params"]["cond_stage_config"] = "__is_unconditional__"
    unet = compvis.translate_config(bare).groups["denoiser"]
    assert (unet["num_heads"], unet["num_head_channels"], unet["use_spatial_transformer"]) == (-1, -1, False)


def test_import_takes_ema_weights_by_default_and_raw_on_request(paper_files):
    ckpt, config, original = paper_files
    pipe = Pipeline.from_compvis(ckpt, config)
    raw = Pipeline.from_compvis(ckpt, config, use_ema=False)
    key = "out.2.weight"
    torch.testing.assert_close(raw.denoiser.state_dict()[key], original.denoiser.state_dict()[key])
    torch.testing.assert_close(pipe.denoiser.state_dict()[key], original.denoiser.state_dict()[key] + 1.0)
    torch.testing.assert_close(pipe.conditioner.embedding.weight, original.conditioner.embedding.weight)
    torch.testing.assert_close(pipe.first_stage.state_dict(), original.first_stage.state_dict())
    assert float(pipe.scale_factor) == pytest.approx(0.7)  # the checkpoint's buffer, not the YAML
    torch.testing.assert_close(
        pipe.schedule.alphas_cumprod.double(),
        torch.from_numpy(np.cumprod(1 - paper_betas(0.0015, 0.0195, 1000))), rtol=1e-6, atol=1e-9)
    images = raw.sample({"label": [1, 2]}, seed=0, steps=3, guidance_scale=2.0, precision="fp32")
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    # the null class is the last of the paper's n_classes (11 rows: classes 0..9 and the null)
    assert pipe.conditioner.embedding.weight.shape[0] == 11


def test_cli_writes_a_pipeline_folder_that_samples_the_same(paper_files, tmp_path):
    ckpt, config, _ = paper_files
    out = tmp_path / "imported"
    result = ldmkit_cli("convert", "compvis", str(ckpt), "--config", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "EMA weights" in result.stdout
    direct = Pipeline.from_compvis(ckpt, config)
    loaded = Pipeline.load(out)
    kwargs = {"seed": 0, "steps": 3, "guidance_scale": 2.0, "precision": "fp32"}
    torch.testing.assert_close(loaded.sample({"label": [3]}, **kwargs), direct.sample({"label": [3]}, **kwargs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_checkpoint_imports(paper_files, tmp_path, dtype):
    """The pruned half-precision files shared of the paper's models store the schedule buffers
    in half precision too: they still match the schedule their config describes."""
    ckpt, config, _ = paper_files
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    torch.save({"state_dict": {k: v.to(dtype) for k, v in state.items()}}, tmp_path / "half.ckpt")
    pipe = Pipeline.from_compvis(tmp_path / "half.ckpt", config)
    key = "model_ema." + "diffusion_model.out.2.weight".replace(".", "")
    assert torch.equal(pipe.denoiser.state_dict()["out.2.weight"], state[key].to(dtype).float())
    # a schedule of another linear_end stays refused at this precision
    other = yaml.safe_load(config.read_text())
    other["model"]["params"]["linear_end"] = 0.012
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ConfigError, match="alphas_cumprod does not match"):
        Pipeline.from_compvis(tmp_path / "half.ckpt", tmp_path / "other.yaml")


def test_a_config_that_is_not_yaml_is_one_line(paper_files, tmp_path):
    ckpt, _, _ = paper_files
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    result = ldmkit_cli("convert", "compvis", str(ckpt), "--config", str(tmp_path / "bad.yaml"), "--out",
                        str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 1
    assert error_line(result.stderr, "convert").endswith("bad.yaml is not YAML: expected ',' or ']', but got '<stream end>' (line 2, column 1)")


def test_a_folder_given_as_the_papers_checkpoint_is_one_line(paper_files, tmp_path):
    """(an ldmkit pipeline folder or run is read as one otherwise, and fails on its names)"""
    _, config, pipe = paper_files
    pipe.save(tmp_path / "pipeline")
    result = ldmkit_cli("convert", "compvis", str(tmp_path / "pipeline"), "--config", str(config), "--out",
                        str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 1
    assert error_line(result.stderr, "convert") == (f"checkpoint {tmp_path / 'pipeline'} is a folder, not the paper's "
                                                    ".ckpt (or .safetensors) file")  # fmt: skip


def test_mismatched_keys_name_their_component(paper_files, tmp_path):
    ckpt, config, _ = paper_files
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    del state["model.diffusion_model.out.2.bias"]
    state["cond_stage_model.extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state}, broken)
    with pytest.raises(WeightsError, match=r"missing denoiser: 1 \(denoiser\.out\.2\.bias\).*unexpected conditioner: 1"):
        Pipeline.from_compvis(broken, config, use_ema=False)


def test_a_config_of_another_size_is_one_line_naming_a_tensor_and_both_shapes(paper_files, tmp_path):
    """(torch's own message is one line per tensor: hundreds for the wrong preset)"""
    ckpt, _, _ = paper_files
    wider = copy.deepcopy(LDM_CONFIG)
    wider["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    config = tmp_path / "wider.yaml"
    config.write_text(yaml.safe_dump(wider))
    with pytest.raises(WeightsError) as err:
        Pipeline.from_compvis(ckpt, config)
    message = str(err.value)
    assert "\n" not in message, message[:500]
    assert re.search(r"denoiser\.time_embed\.0\.weight is \[128, 32\] there but \[256, 64\] in the model", message), message


def test_a_schedule_that_does_not_match_the_config_is_refused(paper_files, tmp_path):
    ckpt, config, _ = paper_files
    other = copy.deepcopy(LDM_CONFIG)
    other["model"]["params"]["linear_end"] = 0.012
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(other))
    with pytest.raises(ConfigError, match="alphas_cumprod does not match"):
        Pipeline.from_compvis(ckpt, path)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_not_executed(paper_files, tmp_path):
    _, config, _ = paper_files
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as handle:
        pickle.dump({"state_dict": exploit}, handle)
    with pytest.raises(UnreadableWeightsError, match="evil.ckpt.*pickled code is never run"):
        Pipeline.from_compvis(evil, config)
    assert not marker.exists()


@pytest.mark.parametrize(("content", "said"), [
    (b"hello world\n", r"it is not a PyTorch checkpoint \(neither a zip archive nor a pickle: it begins with b'hello world\\n'\)"),
    (b"", r"it is empty \(0 bytes\)"),
])
def test_a_file_that_is_no_checkpoint_at_all_says_what_it_is(paper_files, tmp_path, content, said):
    """A text file named .ckpt said "...not a weights-only checkpoint (pickled code is never
    run): 101" (the byte the unpickler stopped at)."""
    _, config, _ = paper_files
    (tmp_path / "model.ckpt").write_bytes(content)
    with pytest.raises(UnreadableWeightsError, match=said):
        Pipeline.from_compvis(tmp_path / "model.ckpt", config)


def test_unsupported_targets_name_themselves_and_the_supported_list(tmp_path):
    other = copy.deepcopy(LDM_CONFIG)
    other["model"]["params"]["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenClipImageEmbedder", "params": {}}
    with pytest.raises(ConfigError, match=r"FrozenClipImageEmbedder' is not supported; supported targets: .*ClassEmbedder"):
        compvis.translate_config(other)
    with pytest.raises(ConfigError, match="no `model:` mapping"):
        compvis.translate_config({"data": {}})


def test_a_standalone_vq_first_stage_converts_for_first_stage_checkpoint(tmp_path):
    """The paper's VQModel file (``quantize.embedding``, ``loss.*``) -> a folder whose weights
    load through ``first_stage.checkpoint=`` into ldmkit's vq first stage."""
    from ldmkit.plugins import get_registry
    from ldmkit.weights import load_component_weights

    config = {"model": {"target": "ldm.models.autoencoder.VQModel", "params": {
        "embed_dim": 3, "n_embed": 16,
        "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3,
                     "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    node = compvis.translate_config(config).groups["first_stage"]
    torch.manual_seed(1)
    vq = get_registry().create("first_stage", "vq", **{k: v for k, v in node.items() if k != "name"})
    state = {("quantize." + k[len("regularizer."):] if k.startswith("regularizer.") else k): v
             for k, v in vq.state_dict().items()}  # fmt: skip
    state["loss.discriminator.main.0.weight"] = torch.randn(2, 2)
    torch.save({"state_dict": state}, tmp_path / "vq.ckpt")
    out = tmp_path / "vq"
    result = ldmkit_cli("convert", "compvis", str(tmp_path / "vq.ckpt"), "--config", str(tmp_path / "config.yaml"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((out / "first_stage.yaml").read_text())
    assert saved == node
    fresh = get_registry().create("first_stage", saved.pop("name"), **saved)
    load_component_weights(fresh, out, "first_stage")
    torch.testing.assert_close(fresh.regularizer.embedding.weight, vq.regularizer.embedding.weight)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(fresh.decode(fresh.encode(x)), vq.decode(vq.encode(x)))
    # a pipeline folder as --out keeps its weights: a first stage's would replace them
    pipeline = tmp_path / "pipeline"
    Pipeline.from_config(compvis.compose(compvis.translate_config(LDM_CONFIG))).save(pipeline)
    before = (pipeline / "model.safetensors").read_bytes()
    result = ldmkit_cli("convert", "compvis", str(tmp_path / "vq.ckpt"), "--config", str(tmp_path / "config.yaml"), "--out", str(pipeline))
    assert result.returncode == 1
    assert error_line(result.stderr, "convert").endswith(f"--out {pipeline} holds a pipeline (config.yaml), whose "
                                                         "weights the first stage's model.safetensors would replace; "
                                                         "write it to another folder")  # fmt: skip
    assert (pipeline / "model.safetensors").read_bytes() == before


# the paper's published parameter counts (Rombach et al. 2022, Tab. 13-18 and the model zoo):
# preset -> (components counted, millions)
PAPER_PARAMETERS = {
    "celebahq-vq4": (("denoiser",), 274),
    "lsun-churches-kl8": (("denoiser",), 295),
    "cin256-v2": (("denoiser",), 401),
    "inpainting-big": (("denoiser",), 387),
    "bsr-sr": (("denoiser", "first_stage"), 169),
    "txt2img-1p4B": (("denoiser", "conditioner"), 1454),
    # Stable Diffusion v1: the 860M UNet and CLIP ViT-L/14's 123M text encoder
    "sd-v1": (("denoiser", "conditioner"), 983),
}


def test_every_preset_builds_and_the_papers_models_have_the_papers_sizes(tmp_path):
    """Each stored translation of a published model composes and builds (on the meta device:
    shapes only), and the sizes match the parameter counts the paper publishes."""
    from ldmkit.plugins import get_registry
    from ldmkit_text.testing import write_tiny_clip

    # CLIP ViT-L/14's text model config (no weights) for the Stable Diffusion preset
    clip = write_tiny_clip(tmp_path / "clip", hidden=768, layers=12, heads=12, intermediate=3072,
                           vocab_size=49408, weights=False)  # fmt: skip
    names = compvis.preset_names()
    assert {"cin256-v2", "txt2img-1p4B", "kl-f8", "vq-f4", "bsr-sr", "semantic-synthesis512",
            "layout2img", "sd-v1"} <= set(names)  # fmt: skip
    for name in names:
        text = compvis.load_preset(name).groups.get("conditioner", {}).get("name") == "clip_text"
        model = compvis.translation(None, name, text_encoder=clip if text else None)
        with torch.device("meta"):
            if model.kind == "pipeline":
                pipe = Pipeline.from_config(compvis.compose(model))
                assert pipe.sampler.spacing == "paper", name
            else:
                node = dict(model.groups["first_stage"])
                get_registry().create("first_stage", node.pop("name"), **node)
        if name in PAPER_PARAMETERS:
            parts, millions = PAPER_PARAMETERS[name]
            count = sum(p.numel() for part in parts for p in getattr(pipe, part).parameters())
            assert count / 1e6 == pytest.approx(millions, abs=1.0), name
    with pytest.raises(ConfigError, match="no preset 'cin512'; the presets are: .*cin256-v2"):
        compvis.load_preset("cin512")


def test_a_first_stage_preset_is_not_a_pipeline(paper_files):
    ckpt, _, _ = paper_files
    with pytest.raises(ConfigError, match=r"preset kl-f8 describes a first stage \(kl\)"):
        Pipeline.from_compvis(ckpt, preset="kl-f8")
    with pytest.raises(ConfigError, match="one of them"):
        Pipeline.from_compvis(ckpt)


def test_layout_to_image_takes_token_ids_through_import_and_the_sample_cli(tmp_path):
    """The paper's layout2img model: ``BERTEmbedder(use_tokenizer=False)`` over the bounding-box
    builder's token ids (``cond_stage_key: coordinates_bbox``). It imports as ``bert`` with
    ``use_tokenizer: false``, its ``cond_stage_model.transformer.*`` weights load by name, and
    ``ldmkit sample --cond coordinates_bbox=ID,ID,...`` feeds one id sequence per sample."""
    config = copy.deepcopy(LDM_CONFIG)
    params = config["model"]["params"]
    params["cond_stage_key"] = "coordinates_bbox"
    params["cond_stage_config"] = {
        "target": "ldm.modules.encoders.modules.BERTEmbedder",
        "params": {"n_embed": 8, "n_layer": 1, "vocab_size": 64, "max_seq_len": 6, "use_tokenizer": False},
    }
    model = compvis.translate_config(config)
    cond = model.groups["conditioner"]
    assert (cond["name"], cond["use_tokenizer"], cond["vocab_size"], cond["input_key"]) == (
        "bert", False, 64, "coordinates_bbox")  # fmt: skip
    assert cond["drop_rate"] == 0.0  # the paper trained it without a null condition
    torch.manual_seed(0)
    original = Pipeline.from_config(compvis.compose(model))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save({"state_dict": paper_state(original)}, tmp_path / "model.ckpt")
    assert "cond_stage_model.transformer.attn_layers.layers.0.1.to_q.weight" in paper_state(original)

    out = tmp_path / "imported"
    result = ldmkit_cli("convert", "compvis", str(tmp_path / "model.ckpt"), "--config",
                        str(tmp_path / "config.yaml"), "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded = Pipeline.load(out)
    torch.testing.assert_close(loaded.conditioner.state_dict(), original.conditioner.state_dict())
    a, b = [5, 9, 17, 33, 63, 63], [1, 2, 3, 4, 63, 63]
    kwargs = {"seed": 0, "steps": 2, "precision": "fp32"}
    direct = loaded.sample({"coordinates_bbox": torch.tensor([a, b])}, **kwargs)
    assert not torch.allclose(direct[0], direct[1])  # the layout reaches the sample

    grid = tmp_path / "layout.png"
    result = ldmkit_cli("sample", "--checkpoint", str(out), "--cond", "coordinates_bbox=" + ",".join(map(str, a)),
                        "--cond", "coordinates_bbox=" + ",".join(map(str, b)), "sampler.steps=2", "precision=fp32",
                        "--seed", "0", "--no-progress", "--out", str(grid))  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads(grid.with_suffix(".json").read_text())
    assert [image["coordinates_bbox"] for image in record["images"]] == [a, b]
    bad = ldmkit_cli("sample", "--checkpoint", str(out), "--cond", "coordinates_bbox=1,2", "--cond",
                     "coordinates_bbox=1,2,3", "--out", str(tmp_path / "bad.png"))  # fmt: skip
    assert bad.returncode != 0 and "different lengths [2, 3]" in bad.stderr


def test_a_bert_text_to_image_checkpoint_imports_its_text_model(tmp_path):
    """The paper's txt2img layout (``BERTEmbedder``: bert-base-uncased WordPiece + a transformer
    trained with the LDM): ``cond_stage_model.transformer.*`` loads by name, the prompts reach
    the sample, and the raw weights give the original model's samples exactly."""
    config = copy.deepcopy(LDM_CONFIG)
    params = config["model"]["params"]
    params["cond_stage_key"] = "caption"
    params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.BERTEmbedder",
                                   "params": {"n_embed": 8, "n_layer": 2}}  # fmt: skip
    torch.manual_seed(0)
    original = Pipeline.from_config(compvis.compose(compvis.translate_config(config)))
    with torch.no_grad():  # nothing at its initial value (zero-initialised projections ignore the prompt)
        for p in original.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = paper_state(original)
    assert "cond_stage_model.transformer.attn_layers.layers.3.1.net.0.0.weight" in state  # the x-transformers names
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save({"state_dict": state}, tmp_path / "txt2img.ckpt")
    pipe = Pipeline.from_compvis(tmp_path / "txt2img.ckpt", tmp_path / "config.yaml", use_ema=False)
    assert pipe.config.conditioner.name == "bert" and pipe.config.conditioner.max_seq_len == 77
    original.scale_factor.fill_(0.7)  # the checkpoint's buffer (scale_by_std), which the import takes
    torch.testing.assert_close(pipe.state_dict(), original.state_dict())
    kwargs = {"seed": 0, "steps": 3, "guidance_scale": 2.0, "precision": "fp32"}
    prompts = {"caption": ["a red apple", "a frog"]}
    images = pipe.sample(prompts, **kwargs)
    torch.testing.assert_close(images, original.sample(prompts, **kwargs), rtol=0, atol=0)
    swapped = pipe.sample({"caption": ["a frog", "a red apple"]}, **kwargs)
    assert (swapped - images).abs().max() > 1e-3


# the paper's models/ldm/inpainting_big/config.yaml (what the translation reads of it)
INPAINTING_BIG = {
    "model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.0015, "linear_end": 0.0205, "timesteps": 1000, "loss_type": "l1", "first_stage_key": "image",
            "cond_stage_key": "masked_image", "image_size": 64, "channels": 3, "concat_mode": True,
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {
                    "image_size": 64, "in_channels": 7, "out_channels": 3, "model_channels": 256,
                    "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4],
                    "num_heads": 8, "resblock_updown": True,
                },
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.VQModelInterface",
                "params": {
                    "embed_dim": 3, "n_embed": 8192,
                    "ddconfig": {
                        "attn_type": "none", "double_z": False, "z_channels": 3, "resolution": 256,
                        "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2,
                        "attn_resolutions": [], "dropout": 0.0,
                    },
                    "lossconfig": {"target": "ldm.modules.losses.contperceptual.DummyLoss"},
                },
            },
            "cond_stage_config": "__is_first_stage__",
        },
    }
}  # fmt: skip


def tiny_inpainting_config() -> dict:
    """INPAINTING_BIG at tiny sizes: the same targets, keys and schedule, f = 2."""
    config = copy.deepcopy(INPAINTING_BIG)
    params = config["model"]["params"]
    params["image_size"] = 8
    params["unet_config"]["params"].update(image_size=8, model_channels=32, attention_resolutions=[2],
                                           num_res_blocks=1, channel_mult=[1, 2], num_heads=1)  # fmt: skip
    first = params["first_stage_config"]["params"]
    first["n_embed"] = 16
    first["ddconfig"].update(resolution=16, ch=32, ch_mult=[1, 2], num_res_blocks=1)
    return config


@pytest.fixture(scope="module")
def inpainting_files(tmp_path_factory):
    """A tiny inpainting checkpoint saved the way the paper's LatentDiffusion saves it:
    ``cond_stage_model.*`` a copy of ``first_stage_model.*`` (``quantize.embedding`` too), the
    EMA, the schedule buffers, no ``scale_factor`` buffer (``scale_by_std`` is off)."""
    root = tmp_path_factory.mktemp("inpainting")
    config = tiny_inpainting_config()
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    original = Pipeline.from_config(compvis.compose(compvis.translate_config(config)))
    state = paper_state(original, linear=(0.0015, 0.0205), scale_factor=None)
    torch.save({"state_dict": state, "global_step": 5, "epoch": 1}, root / "last.ckpt")
    return root / "last.ckpt", root / "config.yaml", original, state


def test_the_inpainting_preset_is_the_translation_of_the_papers_config():
    model = compvis.translate_config(INPAINTING_BIG)
    preset = compvis.load_preset("inpainting-big")
    assert (preset.kind, preset.groups, preset.top, preset.loss_type) == (model.kind, model.groups, model.top, "l1")
    assert preset.groups["conditioner"]["name"] == "inpaint"
    assert preset.groups["conditioner"]["style"] == "paper"


def test_the_papers_inpainting_checkpoint_imports_and_inpaints(inpainting_files, tmp_path):
    """The ``cond_stage_model.*`` copy of the first stage is checked and dropped: the CLI
    writes a pipeline whose first stage holds the checkpoint's weights, and it inpaints."""
    ckpt, config, original, state = inpainting_files
    assert "cond_stage_model.quantize.embedding.weight" in state and "scale_factor" not in state
    out = tmp_path / "imported"
    result = ldmkit_cli("convert", "compvis", str(ckpt), "--config", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr
    loaded = Pipeline.load(out)
    assert loaded.config.conditioner.name == "inpaint"
    torch.testing.assert_close(loaded.first_stage.state_dict(), original.first_stage.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(loaded.first_stage.regularizer.embedding.weight,
                               state["first_stage_model.quantize.embedding.weight"], rtol=0, atol=0)  # fmt: skip
    raw = Pipeline.from_compvis(ckpt, config, use_ema=False)
    torch.testing.assert_close(raw.state_dict(), original.state_dict(), rtol=0, atol=0)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    images = loaded.sample({"image": image, "mask": mask}, seed=0, steps=3, precision="fp32")
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_the_imported_inpainting_model_gets_the_condition_of_the_papers_inpaint_script(inpainting_files, tmp_path):
    """The paper's scripts/inpaint.py, written out: image and mask in [0, 1], the masked image
    ``(1 - mask) * image``, all mapped by ``x * 2 - 1``, ``cond_stage_model.encode`` of the
    masked image (VQModelInterface: ``quant_conv(encoder(x))``, before quantization, not scaled)
    and the mask resized nearest to the latent grid. The imported pipeline's condition is that
    tensor, whatever its ``scale_factor``."""
    ckpt, config, _, _ = inpainting_files
    out = tmp_path / "imported"
    result = ldmkit_cli("convert", "compvis", str(ckpt), "--config", str(config), "--out", str(out))
    assert result.returncode == 0, result.stderr
    loaded = Pipeline.load(out)
    assert loaded.config.conditioner.style == "paper"
    image01 = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(1)) / 255.0
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 3:9, 5:14] = 1
    mask[1, :, 8:16, 0:7] = 1
    masked_image = ((1 - mask) * image01) * 2.0 - 1.0
    first = loaded.first_stage
    with torch.no_grad():
        c = first.quant_conv(first.encoder(masked_image))
    cc = torch.nn.functional.interpolate(mask * 2.0 - 1.0, size=c.shape[-2:])
    expected = torch.cat((c, cc), dim=1)
    loaded.scale_factor.fill_(0.5)
    condition = loaded.conditioner({"image": image01 * 2.0 - 1.0, "mask": mask})["concat"]
    torch.testing.assert_close(condition, expected, rtol=0, atol=0)


def test_an_inpainting_checkpoint_whose_condition_stage_differs_is_refused(inpainting_files, tmp_path):
    """A ``cond_stage_model.*`` tensor that is not the first stage's is not dropped silently:
    one line naming the first tensor that differs (and one with no first-stage twin)."""
    ckpt, config, _, state = inpainting_files
    changed = dict(state)
    name = "cond_stage_model.decoder.conv_out.weight"
    changed[name] = state[name] + 1e-3
    torch.save({"state_dict": changed}, tmp_path / "differs.ckpt")
    result = ldmkit_cli("convert", "compvis", str(tmp_path / "differs.ckpt"), "--config", str(config),
                        "--out", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr, "convert")
    assert name in line and "first_stage_model.decoder.conv_out.weight" in line, line
    assert not (tmp_path / "out").exists()
    extra = dict(state)
    extra["cond_stage_model.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": extra}, tmp_path / "extra.ckpt")
    with pytest.raises(WeightsError, match=r"cond_stage_model\.extra\.weight.*no first_stage_model\.extra\.weight"):
        Pipeline.from_compvis(tmp_path / "extra.ckpt", config)
