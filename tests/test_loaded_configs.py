"""Configs read back from files a user may have received (a pipeline's ``config.yaml``, a
checkpoint's, a converted folder's) are used as written: an interpolation such as
``${oc.env:...}`` is refused, naming the file and the key, and never resolved, so it cannot
read this machine's environment into labels, error messages or re-saved configs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import ldmkit
from ldmkit.config import ConfigError, load_saved_config, refuse_interpolations
from ldmkit.pipeline import Pipeline
from tests.conftest import ldmkit_cli

SECRET = "UNTRUSTED_TEST_SECRET"  # an environment variable a crafted config tries to read
VALUE = "s3cr3t-do-not-print"


def set_key(path, key: str, value) -> None:
    """Set the dotted ``key`` of the YAML file ``path`` to ``value``, as a hand-edit would."""
    data = yaml.safe_load(path.read_text())
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[leaf] = value
    path.write_text(yaml.safe_dump(data))


def test_the_first_interpolation_is_named_with_its_key():
    data = {"a": 1, "b": [2, {"c": "a ${oc.env:HOME} b"}], "d": "${x}"}
    with pytest.raises(
        ConfigError, match=r"^f\.yaml: b\[1\]\.c holds the interpolation 'a \$\{oc\.env:HOME\} b'"
    ):
        refuse_interpolations(data, "f.yaml")
    refuse_interpolations({"a": [1, "no interpolation", {"$": "{}"}]}, "f.yaml")


def test_pipeline_load_refuses_an_env_interpolation(toy, tmp_path, monkeypatch):
    """Before: loaded, with the variable's value in pipeline.config (and in any re-save)."""
    monkeypatch.setenv(SECRET, "8")
    ldmkit.compose(overrides=toy).save(tmp_path / "p")
    config = tmp_path / "p" / "config.yaml"
    set_key(config, "image_size", f"${{oc.env:{SECRET}}}")
    with pytest.raises(ConfigError) as err:
        Pipeline.load(tmp_path / "p")
    assert str(err.value).startswith(
        f"{config}: image_size holds the interpolation '${{oc.env:{SECRET}}}'"
    )
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="image_size holds the interpolation"):
        load_saved_config(config)


def test_sample_checkpoint_refuses_it_in_one_line(tmp_path):
    """Before: `choices.sampler: ${oc.env:...}` was resolved to pick the sampler, and the
    value came back in the "unknown option sampler=..." error."""
    ldmkit.compose(overrides=["first_stage=identity", "denoiser=unet_tiny", "conditioner=class_label",
                              "conditioner.num_classes=3", "conditioner.embed_dim=16", "image_size=8"]
                   ).save(tmp_path / "p")  # fmt: skip
    config = tmp_path / "p" / "config.yaml"
    set_key(config, "choices.sampler", f"${{oc.env:{SECRET}}}")
    out = ldmkit_cli("sample", "--checkpoint", str(tmp_path / "p"), "sampler.steps=2", "--num-samples", "1",
                     "--no-progress", "--out", str(tmp_path / "grid.png"), env={SECRET: VALUE})  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"ldmkit sample: error: {config}: choices.sampler holds the interpolation '${{oc.env:{SECRET}}}'; "
        "configs read from files are used as written, never resolved (an interpolation can read "
        "environment variables): write the value itself"
    ]
    assert VALUE not in out.stdout + out.stderr
    assert not (tmp_path / "grid.png").exists()


def test_converted_folders_refuse_interpolations(tmp_path):
    """A diffusers folder's JSON and the paper's YAML become the pipeline's config."""
    from ldmkit.interop import compvis
    from ldmkit.interop.diffusers.folder import _read_json

    folder = tmp_path / "ldmkit_conditioner"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"conditioner": {"name": "class_label", "input_key": "${oc.env:HOME}"}})
    )
    with pytest.raises(
        ConfigError, match=r"config\.json: conditioner\.input_key holds the interpolation"
    ):
        _read_json(folder / "config.json")
    paper = tmp_path / "paper.yaml"
    paper.write_text("model:\n  params:\n    cond_stage_key: ${oc.env:HOME}\n")
    with pytest.raises(
        ConfigError, match=r"paper\.yaml: model\.params\.cond_stage_key holds the interpolation"
    ):
        compvis.read_compvis_config(paper)


def test_a_config_written_by_save_loads(toy, tmp_path):
    pipe = ldmkit.compose(overrides=toy)
    pipe.save(tmp_path / "p")
    loaded = Pipeline.load(tmp_path / "p")
    for (name, a), (_, b) in zip(
        pipe.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
