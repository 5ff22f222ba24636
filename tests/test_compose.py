"""Hydra composition through the registry, and the checks that parts fit."""

from __future__ import annotations

import re

import pytest
import torch

import ldmkit
from ldmkit.config import ConfigError, compose_config
from ldmkit.interfaces import MissingConditionError
from ldmkit.pipeline import Pipeline


def test_compose_builds_a_pipeline_from_plugin_configs(toy):
    pipe = ldmkit.compose(overrides=toy)
    assert isinstance(pipe, Pipeline)
    assert type(pipe.first_stage).__name__ == "ToyFirstStage"
    assert type(pipe.sampler).__name__ == "ToySampler"
    assert pipe.schedule.timesteps == 1000
    # auto dims were filled from the first stage and the conditioner
    assert pipe.denoiser.in_channels == 3 and pipe.denoiser.context_dim == 8
    assert pipe.config.denoiser.in_channels == 3  # recorded resolved, for checkpoints


def test_overriding_one_group_still_composes(toy):
    pipe = ldmkit.compose(overrides=toy + ["first_stage=toy_fs5", "conditioner=toy_cond_concat"])
    assert pipe.first_stage.latent_channels == 5
    assert pipe.denoiser.in_channels == 5 + 2 and pipe.denoiser.out_channels == 5


def test_overrides_reach_component_arguments(toy):
    pipe = ldmkit.compose(overrides=toy + ["sampler.steps=3", "conditioner.dim=16"])
    assert pipe.sampler.steps == 3
    assert pipe.denoiser.context_dim == 16


def test_first_party_sampler_options_come_from_the_plugin(toy):
    pipe = ldmkit.compose(overrides=toy + ["sampler=ddim", "sampler.steps=20", "sampler.eta=0.5"])
    assert type(pipe.sampler).__name__ == "DDIMSampler" and pipe.sampler.eta == 0.5


def test_unknown_option_lists_options_including_plugin_ones(toy):
    with pytest.raises(ConfigError) as err:
        compose_config(toy + ["sampler=dimm"])
    message = str(err.value)
    assert "sampler/dimm" in message
    for option in ("ddim", "ddpm", "toy_sampler"):  # first-party plugin + test plugin
        assert option in message


def test_unknown_registered_name_lists_names(toy):
    with pytest.raises(ConfigError, match=r"sampler=toy_sampler.*unknown sampler 'nope'.*ddim"):
        ldmkit.compose(overrides=toy + ["sampler.name=nope"])


def test_unknown_constructor_argument_names_component(toy):
    with pytest.raises(ConfigError, match=r"sampler=toy_sampler.*toy_sampler.*\['bogus', 'steps'\]"):
        ldmkit.compose(overrides=toy + ["+sampler.bogus=1"])


def test_incompatible_latent_channels_name_both_configs(toy):
    overrides = toy + ["first_stage=toy_fs5", "denoiser=toy_denoiser_fixed3"]
    with pytest.raises(ConfigError) as err:
        ldmkit.compose(overrides=overrides)
    message = str(err.value)
    assert "first_stage=toy_fs5" in message and "denoiser=toy_denoiser_fixed3" in message
    assert "in_channels=3" in message and "must be 5" in message


def test_incompatible_context_dim_names_both_configs(toy):
    with pytest.raises(ConfigError) as err:
        ldmkit.compose(overrides=toy + ["denoiser.context_dim=32"])
    message = str(err.value)
    assert "conditioner=toy_cond (crossattn_dim=8)" in message
    assert "denoiser=toy_denoiser (context_dim=32)" in message


def test_concat_channels_count_in_the_denoiser_input(toy):
    overrides = toy + ["conditioner=toy_cond_concat", "denoiser=toy_denoiser_fixed3"]
    with pytest.raises(ConfigError, match=r"concat_channels=2.*denoiser=toy_denoiser_fixed3"):
        ldmkit.compose(overrides=overrides)


def test_bad_schedule_is_named(toy):
    # typed in ldmkit.config.primary_keys: refused at composition, naming the key
    with pytest.raises(ConfigError, match=r"^schedule\.kind='cosin': expected one of linear, "):
        ldmkit.compose(overrides=toy + ["schedule.kind=cosin"])


def test_choices_are_recorded(toy):
    cfg = compose_config(toy)
    assert cfg.choices.sampler == "toy_sampler" and cfg.choices.first_stage == "toy_fs"


def test_sample_shapes_and_seed(toy):
    pipe = ldmkit.compose(overrides=toy)
    a = pipe.sample({"label": [0, 1, 2]}, seed=0)
    b = pipe.sample({"label": [0, 1, 2]}, seed=0)
    assert a.shape == (3, 3, 8, 8) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    z = pipe.sample({"label": [0, 1]}, seed=0, return_latents=True)
    assert z.shape == (2, 3, 4, 4)


def test_sample_errors_name_the_problem(toy):
    pipe = ldmkit.compose(overrides=toy)
    with pytest.raises(MissingConditionError, match=r"conditioner ToyConditioner reads batch key 'label'"):
        pipe.sample(num_samples=2)
    with pytest.raises(ValueError, match="num_samples=3 but the batch holds 2"):
        pipe.sample({"label": [0, 1]}, num_samples=3)
    with pytest.raises(ValueError, match="does not support inpainting"):
        pipe.sample({"label": [0]}, mask=torch.ones(1, 1, 4, 4), known=torch.zeros(1, 3, 4, 4))


def test_guidance_formula(toy):
    """pipeline.sample with guidance uses eps_u + s (eps_c - eps_u), checked by hand."""
    pipe = ldmkit.compose(overrides=toy + ["sampler.steps=1"])
    batch = {"label": [1, 2]}
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = {}

    def capture(info):
        seen["x0"] = info["x0"]

    pipe.sample(batch, noise=noise, guidance_scale=3.0, callback=capture, precision="fp32")
    t = torch.full((2,), 999)
    with torch.no_grad():
        eps_c = pipe.denoiser(noise, t, pipe.conditioner(batch))
        eps_u = pipe.denoiser(noise, t, pipe.conditioner.unconditional(batch))
        expected = pipe.schedule.predict_x0(noise, t, eps_u + 3.0 * (eps_c - eps_u))
    torch.testing.assert_close(seen["x0"], expected, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(toy, tmp_path):
    pipe = ldmkit.compose(overrides=toy + ["scale_factor=0.5"])
    with torch.no_grad():
        for p in pipe.parameters():
            p.add_(torch.randn_like(p))
    pipe.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.yaml", "model.safetensors"]
    loaded = Pipeline.load(tmp_path / "ckpt")
    assert float(loaded.scale_factor) == 0.5
    for (name, a), (_, b) in zip(pipe.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(
        pipe.sample({"label": [3]}, seed=1), loaded.sample({"label": [3]}, seed=1), atol=0, rtol=0
    )


def test_load_reports_missing_and_mismatched_files(toy, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        Pipeline.load(tmp_path)
    pipe = ldmkit.compose(overrides=toy)
    pipe.save(tmp_path / "a")
    other = ldmkit.compose(overrides=toy + ["first_stage=toy_fs5"])
    other.save(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "b" / "model.safetensors")
    with pytest.raises(ValueError, match="does not match the model built from"):
        Pipeline.load(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read checkpoint weights"):
        Pipeline.load(tmp_path / "b")


def test_a_save_cut_short_between_weights_and_config_is_refused_on_load(toy, tmp_path, monkeypatch):
    import ldmkit.pipeline as pipeline_module

    folder = tmp_path / "ckpt"
    ldmkit.compose(overrides=toy).save(folder)
    other = ldmkit.compose(overrides=toy + ["sampler.steps=3"])  # same weight shapes, another config
    real = pipeline_module.atomic_write_text

    def crash_on_config(target, text):
        if str(target).endswith("config.yaml"):
            raise KeyboardInterrupt  # the process dies between the two files
        return real(target, text)

    monkeypatch.setattr(pipeline_module, "atomic_write_text", crash_on_config)
    with pytest.raises(KeyboardInterrupt):
        other.save(folder)
    monkeypatch.undo()
    # the new weights sit beside the old config: refused, naming the interrupted save
    with pytest.raises(ConfigError, match=r"interrupted save.*\.save-incomplete"):
        Pipeline.load(folder)
    other.save(folder)  # saving again completes the folder
    assert Pipeline.load(folder).sampler.steps == 3
    assert not (folder / ".save-incomplete").exists()


def test_saving_where_a_file_stands_is_one_error_naming_it(toy, tmp_path):
    """Was FileExistsError from mkdir ("File exists"), for a file at the folder or above it."""
    from ldmkit.io import NotAFolderError

    (tmp_path / "taken").write_text("mine")
    pipe = ldmkit.compose(overrides=toy)
    for target in (tmp_path / "taken", tmp_path / "taken" / "pipe"):
        with pytest.raises(NotAFolderError, match=rf"Pipeline.save: {tmp_path / 'taken'} is a file, not a folder"):
            pipe.save(target)
    assert (tmp_path / "taken").read_text() == "mine"


def test_loading_a_run_folder_points_to_its_pipeline(toy, tmp_path):
    """`ldmkit convert to-diffusers runs/ldm` and Pipeline.load of a run said only that
    model.safetensors is missing."""
    ldmkit.compose(overrides=toy).save(tmp_path / "run" / "pipeline")
    with pytest.raises(FileNotFoundError, match=rf"is a training run: its pipeline is {tmp_path / 'run' / 'pipeline'}$"):
        Pipeline.load(tmp_path / "run")


def test_component_checkpoint_key_loads_weights(toy, tmp_path):
    from safetensors.torch import save_file

    source = ldmkit.compose(overrides=toy)
    with torch.no_grad():
        for p in source.first_stage.parameters():
            p.fill_(0.25)
    source.save(tmp_path / "pipe")  # keys prefixed "first_stage."
    save_file({k: v.contiguous() for k, v in source.first_stage.state_dict().items()}, tmp_path / "fs.safetensors")
    torch.save({"state_dict": source.first_stage.state_dict()}, tmp_path / "fs.ckpt")
    for where in (tmp_path / "pipe", tmp_path / "fs.safetensors", tmp_path / "fs.ckpt"):
        pipe = ldmkit.compose(overrides=toy + [f"+first_stage.checkpoint={where}"])
        assert all(torch.all(p == 0.25) for p in pipe.first_stage.parameters()), where


def test_component_checkpoint_errors_name_file_and_component(toy, tmp_path):
    with pytest.raises(ConfigError, match=r"first_stage=toy_fs \(first_stage.checkpoint\): checkpoint .*nope does not exist"):
        ldmkit.compose(overrides=toy + [f"+first_stage.checkpoint={tmp_path / 'nope'}"])
    other = ldmkit.compose(overrides=toy + ["first_stage=toy_fs5"])
    other.save(tmp_path / "five")
    with pytest.raises(ConfigError, match=r"weights in .*five do not fit the first_stage") as err:
        ldmkit.compose(overrides=toy + [f"+first_stage.checkpoint={tmp_path / 'five'}"])
    # one line naming a tensor and both shapes, not PyTorch's multi-line load_state_dict report
    assert "\n" not in str(err.value) and re.search(r"\S+ is \[[\d, ]+\] there but \[[\d, ]+\] in the model", str(err.value))


def test_pickled_checkpoint_code_is_not_executed(toy, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('pwned')",))

    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(ConfigError, match="pickled code is never run"):
        ldmkit.compose(overrides=toy + [f"+first_stage.checkpoint={tmp_path / 'evil.ckpt'}"])
    assert not (tmp_path / "pwned").exists()
