"""diffusers both ways and Stable Diffusion v1 through ``clip_text``
(ldmkit.interop.diffusers_format, ``ldmkit convert to-diffusers|from-diffusers``,
``Pipeline.from_compvis(..., text_encoder=)``).

The second implementation is diffusers itself: a Stable-Diffusion-v1-layout checkpoint is
converted once by ldmkit and once by diffusers' own single-file converters
(``diffusers.loaders.single_file_utils``), and both sample the same latents from the same
noise; the folders ldmkit writes load in diffusers' own classes, whose forward passes are
compared with ldmkit's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from ldmkit.errors import ConfigError
from ldmkit.interop import compvis, diffusers_format
from ldmkit.pipeline import Pipeline
from tests.conftest import ldmkit_cli

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from ldmkit_text.testing import write_tiny_clip  # noqa: E402

# Stable Diffusion's v1-inference.yaml, scaled down (KL-f2, a 2-level UNet, a 32-wide CLIP)
SD_CONFIG = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "first_stage_key": "jpg",
    "cond_stage_key": "txt", "image_size": 8, "channels": 4, "cond_stage_trainable": False,
    "conditioning_key": "crossattn", "scale_factor": 0.18215, "use_ema": False,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "attention_resolutions": [2, 1], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 32, "use_checkpoint": True,
        "legacy": False}},
    "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}}  # fmt: skip
PROMPTS = ["the cat and the dog", "a red apple"]
SD_PREFIX = {
    "denoiser.": "model.diffusion_model.",
    "first_stage.": "first_stage_model.",
    "conditioner.": "cond_stage_model.",
}


def sd_state(pipe: Pipeline) -> dict[str, torch.Tensor]:
    """``pipe``'s weights (perturbed, so nothing is at its initial value) in a Stable Diffusion
    v1 checkpoint's layout: ``cond_stage_model.transformer.text_model.*`` with the
    ``position_ids`` buffer, the schedule buffers."""
    gen = torch.Generator().manual_seed(3)
    state: dict[str, torch.Tensor] = {}
    for key, value in pipe.state_dict().items():
        for ours, theirs in SD_PREFIX.items():
            if key.startswith(ours):
                rest = key[len(ours) :]
                if ours == "conditioner." and not rest.startswith("transformer.text_model."):
                    rest = "transformer.text_model." + rest[len("transformer.") :]
                noise = (
                    0.02 * torch.randn(value.shape, generator=gen)
                    if value.is_floating_point()
                    else 0
                )
                state[theirs + rest] = value.clone() + noise
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[
        None
    ]
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    state["betas"] = torch.from_numpy(betas)
    state["alphas_cumprod"] = torch.from_numpy(np.cumprod(1 - betas))
    return state


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    clip = write_tiny_clip(root / "clip")
    (root / "v1-inference.yaml").write_text(yaml.safe_dump(SD_CONFIG))
    torch.manual_seed(0)
    pipe = Pipeline.from_config(
        compvis.compose(compvis.translate_config(SD_CONFIG, text_encoder=clip))
    )
    state = sd_state(pipe)
    torch.save({"state_dict": state, "global_step": 470000}, root / "sd-v1.ckpt")
    return root, clip, state


def diffusers_own_conversion(state, clip):
    """The checkpoint converted by diffusers' own single-file code: a StableDiffusionPipeline."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_config = sfu.create_unet_diffusers_config_from_ldm(SD_CONFIG, state, image_size=8)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, unet_config))
    vae_config = sfu.create_vae_diffusers_config_from_ldm(SD_CONFIG, state, image_size=16)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vae_config))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(clip))
    inner = any(k.startswith("text_model.") for k in text.state_dict())
    text.load_state_dict({(k if inner else k.removeprefix("text_model.")): v
                          for k, v in sfu.convert_ldm_clip_checkpoint(state).items() if "position_ids" not in k})  # fmt: skip
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(clip), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip


def sd_latents(sd, noise):
    return sd(
        PROMPTS,
        num_inference_steps=50,
        guidance_scale=3.0,
        latents=noise.clone(),
        output_type="latent",
    ).images


@pytest.fixture(scope="module")
def sd_imported(sd_files):
    root, clip, _ = sd_files
    return Pipeline.from_compvis(root / "sd-v1.ckpt", root / "v1-inference.yaml", text_encoder=clip)


def test_stable_diffusion_v1_import_samples_what_diffusers_own_conversion_samples(
    sd_files, sd_imported
):
    _, clip, state = sd_files
    assert (
        sd_imported.config.conditioner.name == "clip_text"
        and sd_imported.config.sampler.spacing == "paper"
    )
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = sd_imported.sample({"caption": PROMPTS}, noise=noise, guidance_scale=3.0, steps=50, return_latents=True,
                              precision="fp32")  # fmt: skip
    theirs = sd_latents(diffusers_own_conversion(state, clip), noise)
    scale = theirs.abs().max()
    assert scale > 1.0  # a real result, not collapsed
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * float(scale))
    # the prompt matters: swapping the prompts changes the result
    swapped = sd_imported.sample({"caption": PROMPTS[::-1]}, noise=noise, guidance_scale=3.0, steps=50,
                                 return_latents=True, precision="fp32")  # fmt: skip
    assert (swapped - ours).abs().max() > 1e-2 * scale


def test_to_diffusers_writes_what_diffusers_converters_write_and_loads_as_stable_diffusion(
    sd_files, sd_imported, tmp_path
):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    _, clip, state = sd_files
    out = sd_imported.to_diffusers(tmp_path / "sd")
    reference = diffusers_own_conversion(state, clip)
    for folder, module in (("unet", reference.unet), ("vae", reference.vae)):
        written = load_file(out / folder / "diffusion_pytorch_model.safetensors")
        expected = module.state_dict()
        assert set(written) == set(expected), folder
        for key, value in expected.items():
            assert torch.equal(written[key], value.reshape(written[key].shape)), (folder, key)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (
        scheduler["beta_schedule"],
        scheduler["steps_offset"],
        scheduler["set_alpha_to_one"],
    ) == ("scaled_linear", 1, False)
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(
        0.18215
    )
    loaded = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        sd_latents(loaded, noise), sd_latents(reference, noise), rtol=0, atol=0
    )


def test_ldmkit_to_diffusers_to_ldmkit_is_bit_identical(sd_imported, tmp_path):
    out = sd_imported.to_diffusers(tmp_path / "sd")
    back = Pipeline.from_diffusers(out)
    a, b = sd_imported.state_dict(), back.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (
        back.config.sampler.spacing == "paper"
        and back.config.schedule.linear_end == pytest.approx(0.012)
    )
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    kwargs = dict(noise=noise, guidance_scale=2.0, steps=10, return_latents=True, precision="fp32")
    assert torch.equal(
        sd_imported.sample({"caption": ["a cat"]}, **kwargs),
        back.sample({"caption": ["a cat"]}, **kwargs),
    )


def test_a_cross_attention_unet_without_its_text_encoder_is_one_line(sd_imported, tmp_path):
    """Before: read as conditioner=none, then refused by the config check with advice that
    does not apply (``set denoiser.context_dim=auto``)."""
    import json
    import shutil

    from ldmkit.interop.diffusers_format import ConversionError

    out = sd_imported.to_diffusers(tmp_path / "sd")
    index = json.loads((out / "model_index.json").read_text())
    index.pop("text_encoder"), index.pop("tokenizer", None)
    (out / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(out / "text_encoder")
    with pytest.raises(ConversionError) as caught:
        Pipeline.from_diffusers(out)
    assert str(caught.value) == (
        f"{out}: its UNet attends to a condition (cross_attention_dim=32) but the folder has "
        "nothing that makes one: no text_encoder, no bert and no ldmkit_conditioner/ (what "
        "`ldmkit convert to-diffusers` writes for a conditioner diffusers has no class for); "
        "put back the one it was trained with"
    )


def unconditional_vq_pipeline(*, new_order: bool, head_channels: int, heads: int) -> Pipeline:
    """An AttentionBlock UNet (the paper's unconditional / LSUN / CelebA layout) over a VQ
    first stage, at a tiny size."""
    groups = {
        "first_stage": {"name": "vq", "latent_channels": 3, "z_channels": 3, "ch": 32, "ch_mult": [1, 2],
                        "num_res_blocks": 1, "attn_resolutions": [], "resolution": 16, "in_channels": 3,
                        "out_ch": 3, "dropout": 0.0, "norm_groups": 32, "attn_type": "vanilla", "n_embed": 16,
                        "beta": 0.25},
        "denoiser": {"name": "unet", "in_channels": 3, "out_channels": 3, "model_channels": 32,
                     "num_res_blocks": 1, "attention_resolutions": [1, 2], "dropout": 0.0, "channel_mult": [1, 2],
                     "conv_resample": True, "num_classes": None, "num_heads": heads,
                     "num_head_channels": head_channels, "use_scale_shift_norm": True, "resblock_updown": False,
                     "use_new_attention_order": new_order, "use_spatial_transformer": False,
                     "transformer_depth": 1, "context_dim": None, "vector_dim": None, "adm_in_channels": None,
                     "use_checkpoint": False, "prediction": "eps"},
        "conditioner": {"name": "none"},
        "sampler": {"name": "ddim", "steps": 50, "eta": 0.0, "spacing": "paper"},
        "schedule": {"kind": "linear", "timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195, "cosine_s": 8e-3},
    }  # fmt: skip
    torch.manual_seed(0)
    pipe = Pipeline.from_config(
        compvis.compose(
            compvis.CompvisModel("pipeline", groups, {"image_size": 16, "scale_factor": 1.0})
        )
    )
    with torch.no_grad():  # no zero-initialised output projections: every weight must matter
        for p in pipe.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return pipe


@pytest.mark.parametrize(
    ("new_order", "head_channels", "heads"), [(False, 16, -1), (True, 16, -1), (False, -1, 1)]
)
def test_attention_block_unet_and_vq_convert_to_diffusers_own_classes(
    tmp_path, new_order, head_channels, heads
):
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    pipe = unconditional_vq_pipeline(new_order=new_order, head_channels=head_channels, heads=heads)
    out = pipe.to_diffusers(tmp_path / "ldm")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "LDMPipeline"
    unet = UNet2DModel.from_pretrained(out / "unet")
    vq = VQModel.from_pretrained(out / "vqvae")
    assert vq.config.scaling_factor == 1.0
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ours = pipe.denoiser(z, t, {})
        theirs = unet(z, t).sample
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
        assert ours.abs().mean() > 0.1
        torch.testing.assert_close(
            vq.decode(z).sample, pipe.first_stage.decode(z), rtol=1e-4, atol=1e-4
        )
    # a DDIM loop through diffusers' scheduler and UNet lands where ldmkit's sampler does
    scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
    scheduler.set_timesteps(20)
    x = z.clone()
    with torch.no_grad():
        for step in scheduler.timesteps:
            x = scheduler.step(unet(x, step).sample, step, x).prev_sample
    ldm = pipe.sample(noise=z, num_samples=2, steps=20, return_latents=True, precision="fp32")
    torch.testing.assert_close(ldm, x, rtol=1e-3, atol=1e-3)
    assert isinstance(LDMPipeline.from_pretrained(out), LDMPipeline)
    back = Pipeline.from_diffusers(out)
    for key, value in pipe.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    # a folder diffusers wrote has no ldmkit.json: the legacy qkv order, the same function
    (out / "ldmkit.json").unlink()
    plain = Pipeline.from_diffusers(out)
    assert plain.config.denoiser.use_new_attention_order is False
    with torch.no_grad():
        torch.testing.assert_close(plain.denoiser(z, t, {}), ours, rtol=1e-5, atol=1e-5)


def test_a_class_conditional_model_keeps_its_conditioner_beside_the_diffusers_components(tmp_path):
    from diffusers import UNet2DConditionModel

    config = yaml.safe_load(yaml.safe_dump(SD_CONFIG))
    config["model"]["params"]["cond_stage_config"] = {
        "target": "ldm.modules.encoders.modules.ClassEmbedder",
        "params": {"n_classes": 11, "embed_dim": 32},
    }
    torch.manual_seed(0)
    pipe = Pipeline.from_config(compvis.compose(compvis.translate_config(config)))
    out = pipe.to_diffusers(tmp_path / "cin")
    assert (out / "ldmkit_conditioner" / "model.safetensors").is_file()
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    z = torch.randn(2, 4, 8, 8)
    cond = pipe.conditioner({"label": [3, 7]})
    with torch.no_grad():
        torch.testing.assert_close(unet(z, torch.tensor([5, 900]), cond["crossattn"]).sample,
                                   pipe.denoiser(z, torch.tensor([5, 900]), cond), rtol=1e-4, atol=1e-4)  # fmt: skip
    back = Pipeline.from_diffusers(out)
    assert (
        back.config.conditioner.name == "class_label" and back.config.conditioner.num_classes == 10
    )
    for key, value in pipe.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_what_diffusers_cannot_hold_is_named():
    pipe = unconditional_vq_pipeline(
        new_order=False, head_channels=-1, heads=4
    )  # 4 heads over widths 32 and 64
    with pytest.raises(
        diffusers_format.ConversionError,
        match=r"denoiser: num_heads=4 over attention widths \[32, 64\]",
    ):
        diffusers_format.diffusers_unet_config(dict(pipe.config.denoiser), 8)
    first = dict(pipe.config.first_stage, name="identity")
    with pytest.raises(diffusers_format.ConversionError, match=r"only ldmkit's `kl` and `vq` convert to diffusers"):
        diffusers_format.diffusers_vae_config(first, 1.0)


def test_a_diffusers_folder_that_does_not_fit_names_the_key(tmp_path, sd_imported):
    out = sd_imported.to_diffusers(tmp_path / "sd")
    config = json.loads((out / "unet" / "config.json").read_text())
    config["use_linear_projection"] = True
    (out / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        diffusers_format.ConversionError, match="use_linear_projection=True is not supported"
    ):
        Pipeline.from_diffusers(out)
    with pytest.raises(diffusers_format.ConversionError, match="model_index.json is missing"):
        Pipeline.from_diffusers(tmp_path)


def test_stable_diffusion_needs_a_local_clip_folder(sd_files):
    root, _, _ = sd_files
    with pytest.raises(ConfigError, match=r"FrozenCLIPEmbedder .* pass text_encoder="):
        Pipeline.from_compvis(root / "sd-v1.ckpt", root / "v1-inference.yaml")
    with pytest.raises(ConfigError, match="text_encoder applies to Stable Diffusion"):
        compvis.translation(None, "cin256-v2", text_encoder=root / "clip")


def test_convert_cli_both_ways(sd_files, tmp_path):
    root, clip, _ = sd_files
    ldm = tmp_path / "ldm"
    runs = [("compvis", str(root / "sd-v1.ckpt"), "--config", str(root / "v1-inference.yaml"), "--text-encoder",
             str(clip), "--out", str(ldm)), ("to-diffusers", str(ldm), "--out", str(tmp_path / "d")),
            ("from-diffusers", str(tmp_path / "d"), "--out", str(tmp_path / "back"))]  # fmt: skip
    results = [ldmkit_cli("convert", *args) for args in runs]
    for result in results:
        assert result.returncode == 0, result.stderr
    assert "StableDiffusionPipeline" in results[1].stdout
    assert "100%" in results[1].stderr  # the progress bar ran to the end
    # the text encoder's config and tokenizer are carried under files/, no weights
    assert list((tmp_path / "back" / "files").rglob("tokenizer_config.json"))
    assert not list((tmp_path / "back" / "files").rglob("*.safetensors"))
    a, b = Pipeline.load(ldm).state_dict(), Pipeline.load(tmp_path / "back").state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_clip_text_is_frozen_reads_its_input_and_names_what_is_missing(tmp_path):
    from ldmkit_text.clip_text import ClipTextConditioner
    from ldmkit_text.tokenizer import ModelNotFoundError

    clip = write_tiny_clip(tmp_path / "clip")
    cond = ClipTextConditioner(name_or_path=clip, max_length=8)
    assert not any(p.requires_grad for p in cond.parameters())
    with pytest.warns(UserWarning, match="1 prompt"):  # "a red apple" is 10 tokens here
        out = cond({"caption": ["the cat", "a red apple"]})["crossattn"]
    assert cond.truncated_prompts == 1
    assert out.shape == (2, 8, 32)
    assert (out[0] - out[1]).abs().max() > 1e-3  # the prompt matters
    torch.testing.assert_close(
        cond.unconditional({"caption": ["x"]})["crossattn"], cond.encode([""])["crossattn"]
    )
    assert set(cond.frozen_references()) == {"transformer"}
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        ClipTextConditioner(name_or_path=tmp_path / "nowhere")
    bare = write_tiny_clip(tmp_path / "bare", weights=False)
    with pytest.raises(ModelNotFoundError, match=r"holds no weights .*pretrained=false"):
        ClipTextConditioner(name_or_path=bare)
    assert ClipTextConditioner(name_or_path=bare, pretrained=False).frozen_references() == {}


def test_null_class_index_and_adm_translate(tmp_path):
    config = yaml.safe_load(yaml.safe_dump(SD_CONFIG))
    config["model"]["params"]["cond_stage_config"] = {
        "target": "ldm.modules.encoders.modules.ClassEmbedder",
        "params": {"n_classes": 11, "embed_dim": 32},
    }
    node = compvis.translate_config(config, null_class=0).groups["conditioner"]
    assert (node["num_classes"], node["null_index"]) == (10, 0)
    pipe = Pipeline.from_config(compvis.compose(compvis.translate_config(config, null_class=0)))
    null = pipe.conditioner.unconditional({"label": [1]})["crossattn"][0, 0]
    torch.testing.assert_close(null, pipe.conditioner.embedding.weight[0])
    with pytest.raises(ValueError, match="without the null class 0"):
        pipe.conditioner({"label": [0]})
    assert pipe.conditioner({"label": [10]})["crossattn"].shape == (
        1,
        1,
        32,
    )  # labels name rows 1..10
    with pytest.raises(
        ConfigError, match=r"null_class=11: expected 'last' or a class index in \[0, 11\)"
    ):
        compvis.translate_config(config, null_class=11)
    assert (
        compvis.translation(None, "cin256-v2", null_class=0).groups["conditioner"]["null_index"]
        == 0
    )
    unconditional = yaml.safe_load(yaml.safe_dump(SD_CONFIG))
    unconditional["model"]["params"]["cond_stage_config"] = "__is_unconditional__"
    (tmp_path / "uncond.yaml").write_text(yaml.safe_dump(unconditional))
    with pytest.raises(ConfigError, match=r"null_class=3: .*uncond.yaml has no class embedding with a null class"):
        compvis.translation(tmp_path / "uncond.yaml", None, null_class=3)  # as a preset's: not ignored
    with pytest.raises(ConfigError, match=r"text_encoder applies to Stable Diffusion .*, not .*uncond.yaml"):
        compvis.translation(tmp_path / "uncond.yaml", None, text_encoder=tmp_path)
    adm = yaml.safe_load(yaml.safe_dump(SD_CONFIG))
    params = adm["model"]["params"]
    params["conditioning_key"] = "adm"
    params["cond_stage_config"] = {"target": "torch.nn.Identity"}
    params["unet_config"]["params"].update(
        num_classes=5, use_spatial_transformer=False, context_dim=None
    )
    node = compvis.translate_config(adm).groups["conditioner"]
    assert (node["name"], node["role"], node["num_classes"]) == ("class_label", "vector", 5)
    params["conditioning_key"] = "hybrid"
    with pytest.raises(
        ConfigError, match="conditioning_key='hybrid' is not supported: .*conditioner=multi"
    ):
        compvis.translate_config(adm)


def test_the_papers_text_to_image_model_runs_in_diffusers_ldm_text_to_image_pipeline(tmp_path):
    """The paper's txt2img layout (``BERTEmbedder``: WordPiece + transformer, 77 tokens) goes
    out as ``LDMTextToImagePipeline`` (``bert/`` an ``LDMBertModel``, ``tokenizer/`` a
    ``BertTokenizer``, the KL first stage under ``vqvae/`` as that pipeline names it); diffusers
    samples the same images from the same noise, and the folder reads back bit-identically."""
    from diffusers import LDMTextToImagePipeline
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
        LDMBertConfig,
        LDMBertModel,
    )
    from safetensors.torch import load_file

    config = yaml.safe_load(yaml.safe_dump(SD_CONFIG))
    config["model"]["params"]["cond_stage_config"] = {
        "target": "ldm.modules.encoders.modules.BERTEmbedder", "params": {"n_embed": 32, "n_layer": 2}}
    config["model"]["params"]["cond_stage_trainable"] = True
    torch.manual_seed(0)
    pipe = Pipeline.from_config(compvis.compose(compvis.translate_config(config)))
    with torch.no_grad():  # nothing at its initial value (LayerNorms of ones, zero biases)
        gen = torch.Generator().manual_seed(5)
        for p in pipe.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = pipe.to_diffusers(tmp_path / "txt2img")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "LDMTextToImagePipeline"
    assert index["bert"] == ["latent_diffusion", "LDMBertModel"] and index["vqvae"] == ["diffusers", "AutoencoderKL"]
    bert = LDMBertModel(LDMBertConfig.from_pretrained(out / "bert"))
    assert set(load_file(out / "bert" / "model.safetensors")) == set(bert.state_dict())  # one-to-one names

    ldm = LDMTextToImagePipeline.from_pretrained(out)
    ldm.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    # the pipeline assumes f = 8 for the latent size: 64 px asks for these 8 x 8 latents
    theirs = ldm(PROMPTS, height=64, width=64, num_inference_steps=50, guidance_scale=3.0, latents=noise.clone(),
                 output_type="pt").images

    def ours(prompts):  # ldmkit's images are in [-1, 1], diffusers' in [0, 1]
        images = pipe.sample({"caption": prompts}, noise=noise, guidance_scale=3.0, steps=50, precision="fp32")
        return (images / 2 + 0.5).clamp(0, 1)

    mine = ours(PROMPTS)
    assert mine.shape == theirs.shape == (2, 3, 16, 16) and float(theirs.std()) > 0.05
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)  # measured: 9.5e-7
    assert (ours(PROMPTS[::-1]) - mine).abs().max() > 1e-2  # the prompt reaches the image

    back = Pipeline.from_diffusers(out)
    assert back.config.conditioner.name == "bert" and back.config.conditioner.vocab is None
    for key, value in pipe.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


# the paper's bsr_sr layout (models/ldm/bsr_sr/config.yaml), scaled down: VQ-f4, the low-res
# image (the latents' size) concatenated after z_t, an AttentionBlock UNet
SR_CONFIG = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    "linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "first_stage_key": "image",
    "cond_stage_key": "LR_image", "image_size": 4, "channels": 3, "concat_mode": True,
    "cond_stage_trainable": False, "conditioning_key": "concat",
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 4, "in_channels": 6, "out_channels": 3, "model_channels": 32,
        "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2}},
    "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
        "embed_dim": 3, "n_embed": 16, "ddconfig": {
            "double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}},
    "cond_stage_config": {"target": "torch.nn.Identity"}}}}  # fmt: skip


def test_the_papers_super_resolution_model_imports_and_samples_what_diffusers_sr_pipeline_samples(tmp_path):
    """A concat model in the paper's layout (bsr_sr: ``LR_image`` through ``torch.nn.Identity``,
    ``quantize.embedding``, EMA weights) imports as ``low_res`` over ``vq``; written out, it is
    what diffusers' ``LDMSuperResolutionPipeline`` runs, and from the same noise both give the
    same upscaled images."""
    from diffusers import LDMSuperResolutionPipeline

    model = compvis.translate_config(SR_CONFIG)
    assert model.groups["conditioner"]["name"] == "low_res"
    torch.manual_seed(0)
    original = Pipeline.from_config(compvis.compose(model))
    state = {}
    for key, value in original.state_dict().items():
        for ours, theirs in SD_PREFIX.items():
            if key.startswith(ours):
                rest = key[len(ours):].replace("regularizer.", "quantize.")
                state[theirs + rest] = value + 0.05 * torch.randn(value.shape) if value.is_floating_point() else value
                if ours == "denoiser.":  # the EMA copy the paper's training writes, taken by default
                    state["model_ema." + ("diffusion_model." + rest).replace(".", "")] = state[theirs + rest] + 0.01
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(SR_CONFIG))
    torch.save({"state_dict": state}, tmp_path / "sr.ckpt")
    pipe = Pipeline.from_compvis(tmp_path / "sr.ckpt", tmp_path / "config.yaml")
    torch.testing.assert_close(pipe.first_stage.regularizer.embedding.weight,
                               state["first_stage_model.quantize.embedding.weight"])  # fmt: skip
    torch.testing.assert_close(pipe.denoiser.state_dict()["out.2.weight"],
                               state["model_ema.diffusion_modelout2weight"])  # fmt: skip

    out = pipe.to_diffusers(tmp_path / "sr")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "LDMSuperResolutionPipeline"
    sr = LDMSuperResolutionPipeline.from_pretrained(out)
    sr.set_progress_bar_config(disable=True)
    low = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    theirs = sr(low, num_inference_steps=50, generator=torch.Generator().manual_seed(7), output_type="pt").images
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(7))  # what the pipeline draws
    ours = pipe.sample({"lowres": low}, noise=noise, steps=50, precision="fp32") / 2 + 0.5
    assert ours.shape == theirs.shape == (2, 3, 16, 16) and float(theirs.std()) > 0.05
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)  # measured: 1.7e-5
    other = pipe.sample({"lowres": -low}, noise=noise, steps=50, precision="fp32") / 2 + 0.5
    assert (other - ours).abs().max() > 1e-2  # the low-res image reaches the result


# -- the CPU-size presets: GroupNorms of fewer than 32 groups (diffusers' norm_num_groups) ------
SMALL_PRESETS = {
    "kl_f4_small": ["first_stage=kl_f4_small", "first_stage.in_channels=1", "first_stage.out_ch=1"],
    "kl_tiny": ["first_stage=kl_tiny", "image_size=16"],
    "vq_f4_small": ["first_stage=vq_f4_small", "first_stage.n_embed=64"],
}


def small_pipeline(preset: str) -> Pipeline:
    """A class-conditional ``denoiser=unet_tiny`` over a CPU-size first stage, nothing at its
    initial value."""
    import ldmkit

    torch.manual_seed(0)
    pipe = ldmkit.compose(overrides=[*SMALL_PRESETS[preset], "denoiser=unet_tiny", "conditioner=class_label",
                                     "conditioner.embed_dim=32", "sampler.steps=20", "sampler.spacing=paper"])  # fmt: skip
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in pipe.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return pipe


@pytest.mark.parametrize("preset", list(SMALL_PRESETS))
def test_small_presets_export_to_diffusers_which_samples_the_same_images(preset, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VQModel

    pipe = small_pipeline(preset).eval()
    groups = pipe.config.first_stage.norm_groups
    assert groups < 32
    out = pipe.to_diffusers(tmp_path / "small")
    vae_dir = "vae" if pipe.config.first_stage.name == "kl" else "vqvae"
    vae = (AutoencoderKL if vae_dir == "vae" else VQModel).from_pretrained(out / vae_dir)
    assert vae.config.norm_num_groups == groups and vae.encoder.conv_norm_out.num_groups == groups
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
    scheduler.set_timesteps(20)
    f = pipe.first_stage.downsample_factor
    noise = torch.randn(2, pipe.first_stage.latent_channels, pipe.image_size // f, pipe.image_size // f,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    with torch.no_grad():
        context = pipe.conditioner({"label": [3, 7]})["crossattn"]
        x = noise.clone()
        for step in scheduler.timesteps:
            x = scheduler.step(unet(x, step, context).sample, step, x).prev_sample
        theirs = vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)  # as ldmkit returns images
    ours = pipe.sample({"label": [3, 7]}, noise=noise, steps=20, precision="fp32")
    assert float(theirs.std()) > 0.05
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    back = Pipeline.from_diffusers(out)
    assert back.config.first_stage.norm_groups == groups
    theirs_state, ours_state = back.state_dict(), pipe.state_dict()
    for key, value in ours_state.items():
        if not key.endswith("code_usage"):  # the dead-code restarts' bookkeeping stays behind
            assert torch.equal(value, theirs_state[key]), key


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy 2 __array__ notes
@pytest.mark.parametrize(("sampler", "spacing"), [("euler", "karras"), ("dpmpp_2m", "karras"), ("heun", "linspace"),
                                                  ("unipc", "trailing"), ("plms", "paper"), ("euler", "trailing")])  # fmt: skip
def test_an_exported_sampler_samples_the_same_images_with_its_diffusers_scheduler(sampler, spacing, tmp_path):
    """The scheduler written for each sampler, loaded by diffusers' own class from the folder
    and stepped by diffusers' loop (``init_noise_sigma``, ``scale_model_input``, ``step``),
    gives ldmkit's images from the same noise: to 1e-3 (the images span [-1, 1]) from the
    same start. Two conventions of diffusers move them by up to 3e-3, both measured here:
    its Euler-family classes start a linspace, karras or trailing grid at ``noise * sigma_max``
    (k-diffusion's), where ldmkit maps the VP noise to ``noise * sqrt(1 + sigma_max^2)`` (0.2%
    apart at sigma_max = 14.6); and its multistep classes round a karras grid's timesteps to
    integers for the model (ldmkit evaluates the fractional ``t(sigma)``, or with
    ``quantize=true`` the nearest integer)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    pipe = small_pipeline("kl_f4_small").eval().with_sampler(sampler, spacing=spacing, steps=10)
    out = pipe.to_diffusers(tmp_path / "d")
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, config["_class_name"]).from_pretrained(out / "scheduler")
    scheduler.set_timesteps(10)  # for init_noise_sigma
    vae, unet = AutoencoderKL.from_pretrained(out / "vae"), UNet2DConditionModel.from_pretrained(out / "unet")
    f = pipe.first_stage.downsample_factor
    noise = torch.randn(2, pipe.first_stage.latent_channels, pipe.image_size // f, pipe.image_size // f,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip

    def diffusers_loop(start: torch.Tensor) -> torch.Tensor:
        scheduler.set_timesteps(10)
        with torch.no_grad():
            context = pipe.conditioner({"label": [3, 7]})["crossattn"]
            x = start
            for step in scheduler.timesteps:
                eps = unet(scheduler.scale_model_input(x, step), step, context).sample
                x = scheduler.step(eps, step, x).prev_sample
            return vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)

    ours = pipe.sample({"label": [3, 7]}, noise=noise, precision="fp32")
    theirs = diffusers_loop(noise * scheduler.init_noise_sigma)  # as diffusers' pipelines start
    assert float(theirs.std()) > 0.05
    euler_start = float(scheduler.init_noise_sigma) > 1 and spacing != "leading"
    rounded = sampler in ("dpmpp_2m", "unipc") and spacing == "karras"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-3 if euler_start or rounded else 1e-3)
    if euler_start:  # from ldmkit's start, the rest is float32 rounding
        sigma_max = float(scheduler.sigmas[0])
        same_start = diffusers_loop(noise * (1 + sigma_max**2) ** 0.5)
        torch.testing.assert_close(ours, same_start, rtol=0, atol=1e-3)


def test_a_small_preset_converts_both_ways_on_the_command_line(tmp_path):
    small_pipeline("kl_f4_small").save(tmp_path / "ldm")
    for args in (("to-diffusers", str(tmp_path / "ldm"), "--out", str(tmp_path / "d")),
                 ("from-diffusers", str(tmp_path / "d"), "--out", str(tmp_path / "back"))):  # fmt: skip
        result = ldmkit_cli("convert", *args)
        assert result.returncode == 0, result.stderr
    a, b = Pipeline.load(tmp_path / "ldm").state_dict(), Pipeline.load(tmp_path / "back").state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# -- what diffusers reads from a folder, ldmkit reads the same way -----------------------------
def tiny_kl_pipeline(*overrides: str) -> Pipeline:
    """``first_stage=kl_tiny`` under ``denoiser=unet_tiny``, class-conditional (or as
    ``overrides`` say), nothing at its initial value."""
    import ldmkit

    torch.manual_seed(0)
    pipe = ldmkit.compose(overrides=["first_stage=kl_tiny", "image_size=16", "denoiser=unet_tiny",
                                     "conditioner=class_label", "conditioner.embed_dim=32", *overrides])  # fmt: skip
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in pipe.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return pipe


def edit_json(path, **changes) -> None:
    """Set (a value) or drop (``...``) keys of the JSON object in ``path``."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    pipe = tiny_kl_pipeline()
    return pipe, pipe.to_diffusers(tmp_path_factory.mktemp("tiny") / "d")


def test_a_vae_config_without_scaling_factor_has_diffusers_default(tiny_export, tmp_path):
    """diffusers' folders written before scaling_factor was a config key (Stable Diffusion v1's
    vae/config.json) rely on its default, 0.18215, for AutoencoderKL and VQModel alike."""
    from diffusers import AutoencoderKL

    _, out = tiny_export
    shutil.copytree(out, tmp_path / "d")
    edit_json(tmp_path / "d" / "vae" / "config.json", scaling_factor=...)
    theirs = AutoencoderKL.from_pretrained(tmp_path / "d" / "vae").config.scaling_factor
    back = Pipeline.from_diffusers(tmp_path / "d")
    assert float(back.scale_factor) == pytest.approx(theirs) == pytest.approx(0.18215)


def test_attention_head_dim_left_out_or_null_means_what_it_means_to_diffusers(tmp_path):
    """UNet2DModel: attention_head_dim absent is diffusers' default (heads 8 wide), null one
    head of the block's width; the re-imported UNet computes what diffusers' does."""
    from diffusers import UNet2DModel

    pipe = unconditional_vq_pipeline(new_order=False, head_channels=8, heads=-1)
    out = pipe.to_diffusers(tmp_path / "ldm")
    z, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    for value in (..., None):
        edit_json(out / "unet" / "config.json", attention_head_dim=value)
        unet = UNet2DModel.from_pretrained(out / "unet")
        back = Pipeline.from_diffusers(out)
        with torch.no_grad():
            torch.testing.assert_close(back.denoiser(z, t, {}), unet(z, t).sample, rtol=1e-4, atol=1e-4)


def test_a_cross_attention_unet_without_attention_head_dim_has_diffusers_8_heads(tiny_export, tmp_path):
    from diffusers import UNet2DConditionModel

    pipe, out = tiny_export
    shutil.copytree(out, tmp_path / "d")
    edit_json(tmp_path / "d" / "unet" / "config.json", attention_head_dim=..., num_attention_heads=...)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "d" / "unet")
    back = Pipeline.from_diffusers(tmp_path / "d")
    assert back.config.denoiser.num_heads == 8
    z, t = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    cond = pipe.conditioner({"label": [3, 7]})
    with torch.no_grad():
        torch.testing.assert_close(back.denoiser(z, t, cond), unet(z, t, cond["crossattn"]).sample, rtol=1e-4, atol=1e-4)


def test_a_scheduler_that_rescales_its_betas_is_refused(tiny_export, tmp_path):
    _, out = tiny_export
    shutil.copytree(out, tmp_path / "d")
    edit_json(tmp_path / "d" / "scheduler" / "scheduler_config.json", rescale_betas_zero_snr=True)
    with pytest.raises(diffusers_format.ConversionError, match="rescale_betas_zero_snr=True"):
        Pipeline.from_diffusers(tmp_path / "d")


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_a_pipeline_with_another_sampler_converts_back(sampler, tmp_path):
    pipe = tiny_kl_pipeline(f"sampler={sampler}")
    back = Pipeline.from_diffusers(pipe.to_diffusers(tmp_path / "d"))
    assert back.config.sampler == pipe.config.sampler and back.config.choices.sampler == sampler


def test_a_multi_conditioner_converts_back(tmp_path):
    import ldmkit

    torch.manual_seed(0)
    pipe = ldmkit.compose(overrides=["first_stage=kl_tiny", "image_size=16", "denoiser=unet_tiny", "conditioner=multi",
                                     "conditioner.parts=[{name: class_label, num_classes: 10, embed_dim: 32}]"])  # fmt: skip
    back = Pipeline.from_diffusers(pipe.to_diffusers(tmp_path / "d"))
    assert back.config.conditioner == pipe.config.conditioner
    a, b = pipe.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_exporting_over_an_older_export_leaves_none_of_its_conditioner(tmp_path):
    tiny_kl_pipeline().to_diffusers(tmp_path / "d")  # class-conditional: ldmkit_conditioner/
    unconditional = unconditional_vq_pipeline(new_order=False, head_channels=16, heads=-1)
    back = Pipeline.from_diffusers(unconditional.to_diffusers(tmp_path / "d"))
    assert back.config.conditioner.name == "none"
    for key, value in unconditional.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


BROKEN_FILES = {
    "not-an-object": ("vae/config.json", "[]", r"vae/config.json does not hold a JSON object"),
    "not-utf8": ("unet/config.json", b"\xff\xfe\x00 garbage", r"unet/config.json is not JSON"),
    "sampler-not-a-mapping": ("ldmkit.json", '{"sampler": "ddim"}', r"ldmkit.json: sampler="),
    "conditioner-missing": ("ldmkit_conditioner/config.json", "{}", r"ldmkit_conditioner/config.json: conditioner"),
    "conditioner-no-name": ("ldmkit_conditioner/config.json", '{"conditioner": [1]}',
                            r"ldmkit_conditioner/config.json: conditioner"),
    "index-entry": ("model_index.json", '{"vae": ["diffusers", "AutoencoderKL"], "text_encoder": []}',
                    r"model_index.json: text_encoder=\[\]: expected \[library, class\]"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_a_broken_file_in_a_diffusers_folder_is_one_error_naming_it(case, tiny_export, tmp_path):
    _, out = tiny_export
    shutil.copytree(out, tmp_path / "d")
    name, content, message = BROKEN_FILES[case]
    path = tmp_path / "d" / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=message):
        Pipeline.from_diffusers(tmp_path / "d")


def test_attention_head_dims_of_the_wrong_length_are_named(sd_imported, tmp_path):
    out = sd_imported.to_diffusers(tmp_path / "sd")
    edit_json(out / "unet" / "config.json", attention_head_dim=[1, 2, 3])
    with pytest.raises(diffusers_format.ConversionError, match=r"attention_head_dim=\[1, 2, 3\]: .*2 levels"):
        Pipeline.from_diffusers(out)


def test_from_diffusers_may_write_into_the_diffusers_folder_itself(sd_imported, tmp_path):
    out = sd_imported.to_diffusers(tmp_path / "sd")
    result = ldmkit_cli("convert", "from-diffusers", str(out), "--out", str(out))
    assert result.returncode == 0, result.stderr
    a, b = sd_imported.state_dict(), Pipeline.load(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert Pipeline.from_diffusers(out).config.conditioner.name == "clip_text"  # still a diffusers folder


def test_an_export_cut_short_over_an_older_one_is_refused_not_read_half_old(tmp_path, monkeypatch):
    from ldmkit.interop.diffusers import folder

    tiny_kl_pipeline().to_diffusers(tmp_path / "d")
    newer = tiny_kl_pipeline()
    with torch.no_grad():
        newer.denoiser.out[-1].bias.add_(1.0)
    written = []

    def crash_after_the_unet(path, state):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        real_write(path, state)

    real_write = folder._write_tensors
    monkeypatch.setattr(folder, "_write_tensors", crash_after_the_unet)
    with pytest.raises(KeyboardInterrupt):
        newer.to_diffusers(tmp_path / "d")
    assert written == [tmp_path / "d" / "unet" / "diffusion_pytorch_model.safetensors"]
    with pytest.raises(diffusers_format.ConversionError, match="model_index.json is missing"):
        Pipeline.from_diffusers(tmp_path / "d")
    monkeypatch.undo()
    back = Pipeline.from_diffusers(newer.to_diffusers(tmp_path / "d"))  # the rerun completes it
    assert torch.equal(back.denoiser.out[-1].bias, newer.denoiser.out[-1].bias)


def test_an_export_that_fails_leaves_no_new_files(tmp_path, monkeypatch):
    """A fresh --out is removed again; in a folder of the user's, only what the export added
    goes (unet/ and vae/ were left behind)."""
    from ldmkit.interop.diffusers import folder

    def crash_at_the_vae(path, state):
        if "vae" in str(path):
            raise OSError(28, "No space left on device")
        real_write(path, state)

    real_write = folder._write_tensors
    monkeypatch.setattr(folder, "_write_tensors", crash_at_the_vae)
    with pytest.raises(OSError):
        tiny_kl_pipeline().to_diffusers(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(OSError):
        tiny_kl_pipeline().to_diffusers(tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("source", ["to-diffusers", "from-diffusers", "compvis", "export-diffusers"])
def test_convert_out_at_a_file_is_one_line(source, tmp_path):
    from tests.test_bad_values import error_line

    (tmp_path / "notes.txt").write_text("keep me")
    command = "lora" if source == "export-diffusers" else "convert"
    args = {"to-diffusers": [str(tmp_path / "ldm")], "from-diffusers": [str(tmp_path / "d")],
            "compvis": [str(tmp_path / "model.ckpt"), "--preset", "kl-f8"],
            "export-diffusers": [str(tmp_path / "adapter")]}[source]  # fmt: skip
    result = ldmkit_cli(command, source, *args, "--out", str(tmp_path / "notes.txt" / "sub"))
    assert result.returncode == 1
    assert error_line(result.stderr, command).endswith(f"--out: {tmp_path / 'notes.txt'} is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_cosine_schedule_diffusers_cannot_hold_is_named(tmp_path):
    """diffusers' squaredcos_cap_v2 has the offset s = 0.008 built in."""
    pipe = tiny_kl_pipeline("schedule.kind=cosine", "schedule.cosine_s=0.02")
    with pytest.raises(diffusers_format.ConversionError, match=r"schedule.cosine_s=0.02: .*0.008"):
        pipe.to_diffusers(tmp_path / "d")
    assert not (tmp_path / "d" / "model_index.json").exists()


def test_sampling_a_diffusers_folder_or_a_paper_ckpt_says_how_to_convert_it(tiny_export, tmp_path):
    from tests.test_bad_values import error_line

    _, out = tiny_export
    (tmp_path / "model.ckpt").write_bytes(b"")
    for checkpoint, hint in ((out, f"{out} is a diffusers folder: convert it with ldmkit convert from-diffusers"),
                             (tmp_path / "model.ckpt", "is a file, not a pipeline folder (the paper's .ckpt: ldmkit "
                                                       "convert compvis)")):  # fmt: skip
        result = ldmkit_cli("sample", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "s.png"))
        assert result.returncode == 1
        assert hint in error_line(result.stderr, "sample")


def test_a_conditioner_that_reads_a_file_carries_it_in_the_diffusers_folder(tmp_path, monkeypatch):
    """A vocab of one's own (bert with 32 tokens: no LDMBertModel) is copied into
    ldmkit_conditioner/: the folder converts back with the source gone, from another cwd."""
    import ldmkit

    default = ldmkit.compose(overrides=["first_stage=kl_tiny", "image_size=16", "denoiser=unet_tiny", "conditioner=bert"])
    shutil.copy(default.conditioner.tokenizer.path, tmp_path / "my_vocab.txt")
    pipe = ldmkit.compose(overrides=["first_stage=kl_tiny", "image_size=16", "denoiser=unet_tiny", "conditioner=bert",
                                     f"conditioner.vocab={tmp_path / 'my_vocab.txt'}"])  # fmt: skip
    out = pipe.to_diffusers(tmp_path / "d")
    (tmp_path / "my_vocab.txt").unlink()
    shutil.move(out, tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    back = Pipeline.from_diffusers(".")
    a, b = pipe.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    batch = {"caption": ["a red apple"]}
    assert torch.equal(back.conditioner(batch)["crossattn"], pipe.conditioner(batch)["crossattn"])


def test_weights_under_a_variant_name_are_named(tiny_export, tmp_path):
    _, out = tiny_export
    shutil.copytree(out, tmp_path / "d")
    unet = tmp_path / "d" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(diffusers_format.ConversionError,
                       match=r"unet holds no weights \(diffusion_pytorch_model.safetensors\); it has "
                             r"diffusion_pytorch_model.fp16.safetensors \(a variant\? rename it"):  # fmt: skip
        Pipeline.from_diffusers(tmp_path / "d")


@pytest.mark.parametrize(("key", "value"), [("norm_eps", 1e-6), ("resnet_out_scale_factor", 2.0),
                                            ("time_embedding_act_fn", "silu"), ("resnet_time_scale_shift", "ada_group")])  # fmt: skip
def test_a_unet_option_that_changes_the_function_but_no_weight_is_named(key, value, tiny_export, tmp_path):
    _, out = tiny_export
    shutil.copytree(out, tmp_path / "d")
    edit_json(tmp_path / "d" / "unet" / "config.json", **{key: value})
    with pytest.raises(diffusers_format.ConversionError, match=rf"unet/config.json \(UNet2DConditionModel\): {key}="):
        Pipeline.from_diffusers(tmp_path / "d")


@pytest.mark.parametrize(("sampler", "scheduler", "spacing", "written"),
                         [("ddim", "DDIMScheduler", "quad", "paper"), ("plms", "PNDMScheduler", "quad", "paper")])  # fmt: skip
def test_a_spacing_ddim_lacks_exports_the_nearest_one_and_says_so(sampler, scheduler, spacing, written, tmp_path):
    """DDIMScheduler and PNDMScheduler have no quad grid: the export is written with the
    nearest spacing they have, says so, and ldmkit.json keeps the sampler for the way back."""
    from ldmkit.interop.diffusers.scheduler import SPACING_TO_DDIM

    pipe = tiny_kl_pipeline(f"sampler={sampler}", f"sampler.spacing={spacing}")
    with pytest.warns(diffusers_format.ConversionWarning,
                      match=rf"sampler.spacing='{spacing}' has no {scheduler} counterpart: scheduler/ .*'{written}'"):  # fmt: skip
        out = pipe.to_diffusers(tmp_path / "d")
    written_config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    ddim = (written_config["timestep_spacing"], written_config["steps_offset"], written_config["set_alpha_to_one"])
    assert ddim == SPACING_TO_DDIM[written]
    assert Pipeline.from_diffusers(out).config.sampler == pipe.config.sampler


@pytest.mark.parametrize("alpha_to_one", [False, True])
def test_a_leading_offset_one_scheduler_reads_as_paper_and_says_where_it_ends_otherwise(alpha_to_one):
    """diffusers' leading + steps_offset=1 visits the timesteps of ldmkit's `paper` spacing; with
    set_alpha_to_one=False it also ends where `paper` does (alpha_bar_0), with True at alpha_bar = 1,
    which no ldmkit spacing does: read as `paper`, with a warning naming the difference."""
    import warnings

    from diffusers import DDIMScheduler

    from ldmkit.diffusion.timesteps import timestep_pairs
    from ldmkit.interop.diffusers.scheduler import _schedule_from_config

    config = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": alpha_to_one}
    theirs = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, **config)
    theirs.set_timesteps(50)
    assert theirs.timesteps.tolist() == [t for t, _ in timestep_pairs(1000, 50, "paper")]
    assert (float(theirs.final_alpha_cumprod) == 1.0) is alpha_to_one  # else alpha_bar_0, as paper's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, sampler, _ = _schedule_from_config({"_class_name": "DDIMScheduler", **config})
    assert sampler["spacing"] == "paper"
    messages = [str(w.message) for w in caught if issubclass(w.category, diffusers_format.ConversionWarning)]
    assert messages == ([
        "scheduler/scheduler_config.json (DDIMScheduler): timestep_spacing='leading', steps_offset=1, "
        "set_alpha_to_one=True has no ldmkit spacing: read as sampler.spacing='paper', the same timesteps, "
        "but its last step goes to alpha_bar_0, where set_alpha_to_one=True goes to alpha_bar = 1"
    ] if alpha_to_one else [])  # fmt: skip


def test_convert_to_diffusers_of_a_quad_spacing_writes_the_folder_with_one_warning_line(tmp_path):
    tiny_kl_pipeline("sampler.spacing=quad").save(tmp_path / "ldm")
    result = ldmkit_cli("convert", "to-diffusers", str(tmp_path / "ldm"), "--out", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "ConversionWarning" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "sampler.spacing" in line]
    assert len(lines) == 1 and lines[0].startswith("ldmkit convert: warning: sampler.spacing='quad'"), result.stderr
    assert (tmp_path / "d" / "model_index.json").is_file()


@pytest.fixture(scope="module")
def tiny_clip_export(tmp_path_factory):
    """A tiny CLIP-text pipeline as a diffusers folder (text_encoder/, tokenizer/)."""
    root = tmp_path_factory.mktemp("clip")
    clip = write_tiny_clip(root / "clip")
    import ldmkit

    torch.manual_seed(0)
    pipe = ldmkit.compose(overrides=["first_stage=kl_tiny", "image_size=16", "denoiser=unet_tiny", "conditioner=clip_text",
                                     f"conditioner.name_or_path={clip}", "conditioner.pretrained=false"])  # fmt: skip
    return pipe, pipe.to_diffusers(root / "d")


@pytest.mark.parametrize("out_exists", [False, True])
def test_from_diffusers_that_fails_leaves_the_out_folder_as_it_was(out_exists, tiny_clip_export, tmp_path):
    _, out = tiny_clip_export
    shutil.copytree(out, tmp_path / "d")
    edit_json(tmp_path / "d" / "unet" / "config.json", use_linear_projection=True)  # the build fails
    target = tmp_path / "back"
    if out_exists:  # a user's folder, with a tokenizer/ of its own
        (target / "tokenizer").mkdir(parents=True)
        (target / "tokenizer" / "vocab.json").write_text("mine")
        (target / "notes.txt").write_text("keep me")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "d" not in p.relative_to(tmp_path).parts[:1])
    result = ldmkit_cli("convert", "from-diffusers", str(tmp_path / "d"), "--out", str(target))
    assert result.returncode == 1
    from tests.test_bad_values import error_line

    assert "use_linear_projection=True is not supported" in error_line(result.stderr, "convert")
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "d" not in p.relative_to(tmp_path).parts[:1])
    assert after == before
    if out_exists:
        assert (target / "tokenizer" / "vocab.json").read_text() == "mine"


def test_a_pipeline_converted_from_diffusers_needs_the_diffusers_folder_no_more(tiny_clip_export, tmp_path):
    pipe, out = tiny_clip_export
    shutil.copytree(out, tmp_path / "d")
    result = ldmkit_cli("convert", "from-diffusers", str(tmp_path / "d"), "--out", str(tmp_path / "back"))
    assert result.returncode == 0, result.stderr
    shutil.rmtree(tmp_path / "d")
    back = Pipeline.load(tmp_path / "back")
    batch = {"caption": ["a red apple"]}
    assert torch.equal(back.conditioner(batch)["crossattn"], pipe.conditioner(batch)["crossattn"])
    assert not list((tmp_path / "back").rglob("*.safetensors"))[1:]  # model.safetensors alone: no weights copied


def test_a_first_stage_that_attends_in_its_levels_converts_both_ways_and_runs_in_diffusers(tmp_path):
    """attn_resolutions (the paper's kl-f16, kl-f32, vq-f16) are diffusers' Attn*Block2D."""
    from diffusers import AutoencoderKL

    pipe = tiny_kl_pipeline("first_stage.attn_resolutions=[16,8]")
    out = pipe.to_diffusers(tmp_path / "d")
    back = Pipeline.from_diffusers(out)
    assert list(back.config.first_stage.attn_resolutions) == [16, 8]
    a, b = pipe.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    z = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, pipe.first_stage.decode(z), atol=1e-4, rtol=0)


HELD = {"first_stage": ("first_stage.yaml", "a first stage (first_stage.yaml)"),
        "run": ("config.yaml", "a training run (checkpoints/)"),
        "paper": ("config.yaml", "a config.yaml without a model.safetensors (not an ldmkit pipeline's)")}  # fmt: skip


@pytest.mark.parametrize("held", list(HELD))
@pytest.mark.parametrize("source", ["from-diffusers", "compvis"])
def test_converting_a_pipeline_over_another_folder_is_refused(source, held, tiny_export, tmp_path):
    """Pipeline.save would replace a first stage's model.safetensors (first_stage.checkpoint=
    reads it), a training run's config.yaml, or the paper's config.yaml beside its .ckpt."""
    from tests.test_bad_values import error_line
    from tests.test_compvis_import import LDM_CONFIG, paper_state

    out = tmp_path / "out"
    out.mkdir()
    marker, kind = HELD[held]
    mine = yaml.safe_dump(LDM_CONFIG) if held == "paper" else "mine: 1\n"
    (out / marker).write_text(mine)
    weights = out / ("model.ckpt" if held == "paper" else "model.safetensors")
    weights.write_bytes(b"mine")
    if held == "run":
        (out / "checkpoints").mkdir()
    if source == "compvis":
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(LDM_CONFIG))
        torch.manual_seed(0)
        pipe = Pipeline.from_config(compvis.compose(compvis.translate_config(LDM_CONFIG)))
        torch.save({"state_dict": paper_state(pipe)}, tmp_path / "model.ckpt")
        config = out / "config.yaml" if held == "paper" else tmp_path / "config.yaml"
        args = [str(tmp_path / "model.ckpt"), "--config", str(config)]
    else:
        args = [str(tiny_export[1])]
    result = ldmkit_cli("convert", source, *args, "--out", str(out))
    assert result.returncode == 1
    assert error_line(result.stderr, "convert") == (f"--out {out} holds {kind}, whose files the pipeline's "
                                                    "config.yaml and model.safetensors would replace; write it to another folder")  # fmt: skip
    assert (out / marker).read_text() == mine and weights.read_bytes() == b"mine"
    assert not (out / "model.safetensors").exists() or held != "paper"


def test_a_text_encoder_saved_as_pytorch_model_bin_is_read(tiny_clip_export, tmp_path):
    """transformers' older file name (Stable Diffusion v1's folders: text_encoder/pytorch_model.bin)."""
    from safetensors.torch import load_file

    pipe, out = tiny_clip_export
    shutil.copytree(out, tmp_path / "d")
    text = tmp_path / "d" / "text_encoder"
    torch.save(load_file(text / "model.safetensors"), text / "pytorch_model.bin")
    (text / "model.safetensors").unlink()
    back = Pipeline.from_diffusers(tmp_path / "d")
    a, b = pipe.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("conditioner."))


def test_a_clip_text_max_length_goes_to_the_diffusers_tokenizer_and_back(tmp_path):
    """StableDiffusionPipeline pads prompts to the tokenizer's model_max_length: a model of 8
    tokens stays one of 8 (it was read back as 77, a longer context than it was trained on)."""
    from transformers import AutoTokenizer

    import ldmkit

    clip = write_tiny_clip(tmp_path / "clip")
    torch.manual_seed(0)
    pipe = ldmkit.compose(overrides=["first_stage=kl_tiny", "image_size=16", "denoiser=unet_tiny", "conditioner=clip_text",
                                     f"conditioner.name_or_path={clip}", "conditioner.pretrained=false",
                                     "conditioner.max_length=8"])  # fmt: skip
    out = pipe.to_diffusers(tmp_path / "d")
    assert AutoTokenizer.from_pretrained(out / "tokenizer").model_max_length == 8
    back = Pipeline.from_diffusers(out)
    assert back.config.conditioner.max_length == 8
    batch = {"caption": ["the cat and the dog"]}
    assert torch.equal(back.conditioner(batch)["crossattn"], pipe.conditioner(batch)["crossattn"])


def test_a_text_conditioners_input_key_and_drop_rate_survive_the_round_trip(tmp_path):
    """diffusers has no place for them: ldmkit.json keeps them (they were read back as the
    paper's caption and 0.1, another batch key and condition dropout than the model's)."""
    import ldmkit

    clip = write_tiny_clip(tmp_path / "clip")
    pipe = ldmkit.compose(overrides=["first_stage=kl_tiny", "image_size=16", "denoiser=unet_tiny", "conditioner=clip_text",
                                     f"conditioner.name_or_path={clip}", "conditioner.input_key=text",
                                     "conditioner.drop_rate=0.0"])  # fmt: skip
    back = Pipeline.from_diffusers(pipe.to_diffusers(tmp_path / "d"))
    assert (back.config.conditioner.input_key, back.config.conditioner.drop_rate) == ("text", 0.0)
    edit_json(tmp_path / "d" / "ldmkit.json", conditioner_options={"drop_rate": 2})
    with pytest.raises(ConfigError, match=r"ldmkit.json: conditioner_options.drop_rate=2: expected a number >= 0 and <= 1"):
        Pipeline.from_diffusers(tmp_path / "d")


def test_a_sampler_without_a_diffusers_scheduler_exports_as_ddim_and_says_so(tmp_path):
    """dpmpp_3m_sde has no diffusers class: scheduler/ is a DDIMScheduler, said in one warning
    (it was silent), and the sampler comes back through ldmkit.json."""
    pipe = tiny_kl_pipeline("sampler=dpmpp_3m_sde", "sampler.spacing=trailing")
    with pytest.warns(diffusers_format.ConversionWarning,
                      match=r"^sampler=dpmpp_3m_sde has no diffusers scheduler: it is written as a DDIMScheduler"):  # fmt: skip
        out = pipe.to_diffusers(tmp_path / "d")
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    assert Pipeline.from_diffusers(out).config.sampler.name == "dpmpp_3m_sde"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", diffusers_format.ConversionWarning)
        tiny_kl_pipeline("sampler=ddim").to_diffusers(tmp_path / "ddim")  # DDIM: nothing to say


# (sampler, spacing) whose diffusers scheduler visits the same noise levels: the sigma classes'
# linspace, leading and trailing grids, and karras / exponential where the class has them; the
# multistep classes place S + 1 points for linspace and leading (warned, below)
SAME_LEVELS = [(name, spacing) for name in ("euler", "heun", "lms", "dpm_2", "dpm_2_ancestral")
               for spacing in ("linspace", "karras", "exponential", "leading", "trailing")]
SAME_LEVELS += [("euler_ancestral", spacing) for spacing in ("linspace", "leading", "trailing")]
SAME_LEVELS += [(name, spacing) for name in ("dpmpp_2m", "dpmpp_2m_sde", "unipc") for spacing in ("karras", "exponential", "trailing")]  # fmt: skip


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy 2 __array__ notes
@pytest.mark.parametrize(("sampler", "spacing"), SAME_LEVELS)
def test_a_sigma_sampler_exports_as_the_diffusers_scheduler_of_its_method_on_the_same_noise_levels(sampler, spacing):
    """Each sampler is written as the diffusers scheduler of the same method (it was a
    DDIMScheduler whatever the sampler), whose noise levels after ``set_timesteps(S)`` are
    ldmkit's ``sigma_levels`` (diffusers evaluates the two-stage ones, heun and dpm_2, twice
    per level); nothing to warn about, and the config reads back as the same sampler."""
    import warnings

    from ldmkit.diffusion.sampling import sigma_levels
    from ldmkit.diffusion.schedule import NoiseSchedule
    from ldmkit.interop.diffusers.scheduler import (
        SAMPLER_TO_SCHEDULER,
        _schedule_from_config,
        diffusers_scheduler_config,
    )

    schedule = {"kind": "linear", "timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012}
    with warnings.catch_warnings():
        warnings.simplefilter("error", diffusers_format.ConversionWarning)
        config = diffusers_scheduler_config(schedule, {"name": sampler, "spacing": spacing}, "eps")
        _, back, _ = _schedule_from_config(json.loads(json.dumps(config)))
    assert config["_class_name"] == SAMPLER_TO_SCHEDULER[sampler][0] != "DDIMScheduler"
    assert (back["name"], back["spacing"]) == (sampler, spacing)
    theirs = getattr(diffusers, config["_class_name"]).from_config(config)
    theirs.set_timesteps(20)
    levels = torch.unique_consecutive(torch.as_tensor(theirs.sigmas, dtype=torch.float64))
    ours = torch.tensor(sigma_levels(NoiseSchedule(**schedule), 20, spacing), dtype=torch.float64)
    torch.testing.assert_close(levels, ours, rtol=5e-5, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc"])
def test_a_multistep_scheduler_on_another_grid_is_said(sampler):
    """DPMSolverMultistepScheduler and UniPCMultistepScheduler place S + 1 timesteps for
    linspace and drop the last: other noise levels than ldmkit's linspace, said in one line."""
    from ldmkit.diffusion.sampling import sigma_levels
    from ldmkit.diffusion.schedule import NoiseSchedule
    from ldmkit.interop.diffusers.scheduler import diffusers_scheduler_config

    schedule = {"kind": "linear", "timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012}
    with pytest.warns(diffusers_format.ConversionWarning, match=r"places S \+ 1 timesteps and drops the last") as said:
        config = diffusers_scheduler_config(schedule, {"name": sampler, "spacing": "linspace"}, "eps")
    assert len(said) == 1
    theirs = getattr(diffusers, config["_class_name"]).from_config(config)
    theirs.set_timesteps(20)
    ours = sigma_levels(NoiseSchedule(**schedule), 20, "linspace")
    assert abs(float(theirs.sigmas[-2]) - ours[-2]) > 0.1  # what the warning is about


def test_stable_diffusions_pndm_scheduler_reads_as_the_papers_plms():
    """Stable Diffusion v1 ships a PNDMScheduler (skip_prk_steps, leading, steps_offset 1,
    set_alpha_to_one false): the latent diffusion paper's PLMS on its DDIM spacing, read so
    without a warning (it was read as DDIM); its timesteps are ``paper``'s."""
    import warnings

    from ldmkit.diffusion.timesteps import timestep_pairs
    from ldmkit.interop.diffusers.scheduler import _schedule_from_config

    config = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
              "trained_betas": None}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", diffusers_format.ConversionWarning)
        schedule, sampler, prediction = _schedule_from_config(config)
    assert sampler == {"name": "plms", "spacing": "paper"} and prediction == "eps" and schedule["kind"] == "linear"
    theirs = diffusers.PNDMScheduler.from_config(config)
    theirs.set_timesteps(50)
    visited = torch.unique_consecutive(torch.as_tensor(theirs.timesteps)).tolist()
    assert visited == [t for t, _ in timestep_pairs(1000, 50, "paper")]


@pytest.mark.parametrize(("config", "read"), [
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++", "solver_type": "heun",
      "use_karras_sigmas": True}, {"name": "dpmpp_2m_sde", "spacing": "karras", "solver_type": "heun"}),
    ({"_class_name": "UniPCMultistepScheduler", "solver_order": 3, "solver_type": "bh1", "timestep_spacing": "trailing"},
     {"name": "unipc", "spacing": "trailing", "order": 3, "variant": "bh1", "lower_order_final": True}),
    ({"_class_name": "EulerDiscreteScheduler", "use_exponential_sigmas": True}, {"name": "euler", "spacing": "exponential"}),
])  # fmt: skip
def test_a_diffusers_scheduler_reads_as_the_sampler_of_its_method(config, read):
    from ldmkit.interop.diffusers.scheduler import _schedule_from_config

    assert _schedule_from_config(config)[1] == read


@pytest.mark.parametrize(("config", "said"), [
    ({"_class_name": "LCMScheduler"}, r"ldmkit has no sampler of LCMScheduler's method: read as sampler=ddim"),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, r"solver_order=3 is read as sampler=dpmpp_2m"),
    ({"_class_name": "PNDMScheduler", "skip_prk_steps": False}, r"skip_prk_steps=False .* is read as sampler=plms"),
])  # fmt: skip
def test_a_scheduler_ldmkit_has_no_sampler_of_is_read_as_the_nearest_and_said(config, said):
    from ldmkit.interop.diffusers.scheduler import _schedule_from_config

    with pytest.warns(diffusers_format.ConversionWarning, match=said):
        _schedule_from_config(config)


def test_sampler_options_a_scheduler_lacks_are_said(tmp_path):
    """euler with churn is written as an EulerDiscreteScheduler, whose config has no s_churn."""
    pipe = tiny_kl_pipeline("sampler=euler", "sampler.s_churn=0.5")
    with pytest.warns(diffusers_format.ConversionWarning,
                      match=r"^sampler=euler is written as a EulerDiscreteScheduler, which has no s_churn=0.5"):  # fmt: skip
        out = pipe.to_diffusers(tmp_path / "d")
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert Pipeline.from_diffusers(out).config.sampler.s_churn == 0.5  # ldmkit.json keeps it


def test_to_diffusers_into_a_pipeline_or_run_folder_is_refused(tmp_path):
    """``convert to-diffusers P --out P`` (or a run folder) wrote diffusers' files among the
    pipeline's (from-diffusers refused the same)."""
    from tests.test_bad_values import error_line

    pipe = tiny_kl_pipeline()
    pipe.save(tmp_path / "p")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for out, held in [(tmp_path / "p", "a pipeline (config.yaml)"), (tmp_path / "run", "a training run (checkpoints/)")]:
        before = sorted(p.name for p in out.iterdir())
        result = ldmkit_cli("convert", "to-diffusers", str(tmp_path / "p"), "--out", str(out))
        assert result.returncode == 1
        assert error_line(result.stderr, "convert") == f"--out {out} holds {held}: write the diffusers folder to a folder of its own"
        assert sorted(p.name for p in out.iterdir()) == before
