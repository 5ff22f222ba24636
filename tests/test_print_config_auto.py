"""``--print-config`` shows the denoiser dims written ``auto`` as the numbers composition fills
in (what a saved checkpoint records), marked ``# auto``."""

from __future__ import annotations

import pytest
import yaml

from ldmkit.cli import sample as sample_command
from ldmkit.cli.common import CLIError


def printed(capsys, *overrides: str) -> str:
    assert (
        sample_command.sample([*overrides, "--print-config"], prog="ldmkit sample", description="") == 0
    )
    return capsys.readouterr().out


def test_auto_dims_are_resolved_and_marked(capsys):
    out = printed(
        capsys, "first_stage=kl_f8", "conditioner=class_label", "conditioner.embed_dim=48"
    )
    denoiser = yaml.safe_load(out)["denoiser"]
    assert (denoiser["in_channels"], denoiser["out_channels"]) == (4, 4)  # KL-f8's latent channels
    assert (denoiser["context_dim"], denoiser["vector_dim"]) == (48, None)
    assert "  in_channels: 4  # auto" in out.splitlines()
    assert "auto" not in denoiser.values()


def test_concat_channels_count_into_in_channels(capsys):
    denoiser = yaml.safe_load(printed(capsys, "first_stage=identity", "conditioner=semantic_map"))[
        "denoiser"
    ]
    assert denoiser["in_channels"] == 3 + 8 and denoiser["out_channels"] == 3


def test_an_explicit_dim_is_printed_as_written(capsys):
    out = printed(capsys, "first_stage=identity", "denoiser.in_channels=3")
    assert "  in_channels: 3" in out.splitlines()  # not marked: it was not auto


def test_disagreeing_dims_are_the_composition_error(capsys):
    with pytest.raises(CLIError, match="denoiser.context_dim must be 64"):
        printed(capsys, "conditioner=class_label", "denoiser.context_dim=3")


def test_interpolations_are_printed_as_their_values_and_marked(capsys):
    """What runs (and what the run's config.yaml holds) is the value; before, --print-config
    showed `in_channels: ${data.channels}` and `image_size: ${image_size}`."""
    out = printed(capsys, "experiment=fmnist_kl_f4", "image_size=16")
    cfg = yaml.safe_load(out)
    assert (cfg["first_stage"]["in_channels"], cfg["data"]["image_size"]) == (1, 16)
    lines = out.splitlines()
    assert "  in_channels: 1  # ${data.channels}" in lines and "  image_size: 16  # ${image_size}" in lines
    assert "${" not in out.replace("# ${", "")
