"""The one safetensors reader, and the one error for weights that cannot be read."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from ldmkit.errors import CheckpointError, LdmkitError, UnreadableWeightsError, WeightsError
from ldmkit.safetensors_io import read_safetensors
from ldmkit.weights import read_weights


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(3.0), "b.c": torch.ones(2, 2)}, str(path))
    return path


def test_reads_all_or_some_keys(weights_file):
    everything = read_safetensors(weights_file)
    assert sorted(everything) == ["a", "b.c"]
    assert torch.equal(everything["a"], torch.arange(3.0))
    assert list(read_safetensors(weights_file, keys=["b.c"])) == ["b.c"]
    assert read_safetensors(weights_file, keys=()) == {}  # the header parses


def test_reads_to_a_device(weights_file):
    assert read_safetensors(weights_file, device="cpu")["a"].device.type == "cpu"


@pytest.mark.parametrize(
    "content", [None, b"not safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"]
)
def test_unreadable_file_is_named(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(
        UnreadableWeightsError, match=f"cannot read checkpoint weights {path}"
    ) as err:
        read_safetensors(path)
    assert err.value.path == path
    assert "\n" not in str(err.value)


def test_a_missing_key_is_named(weights_file):
    with pytest.raises(UnreadableWeightsError, match="no tensor named 'nope'"):
        read_safetensors(weights_file, keys=["a", "nope"])


def test_one_error_type_for_every_reader(tmp_path):
    """The weights loader's pickle branch raises the same type; callers catching the older
    types (composition: WeightsError, the trainer's resume: CheckpointError) still catch it."""
    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps(object(), protocol=2))
    with pytest.raises(UnreadableWeightsError, match=str(path)) as err:
        read_weights(path)
    for caught_by in (WeightsError, CheckpointError, LdmkitError, ValueError, RuntimeError):
        assert isinstance(err.value, caught_by)
    copy = pickle.loads(pickle.dumps(err.value))  # crosses process boundaries (DDP, workers)
    assert (copy.path, copy.reason) == (err.value.path, err.value.reason)


def test_training_and_weights_modules_share_the_reader():
    from ldmkit import weights
    from ldmkit.training import checkpoint

    assert checkpoint.read_safetensors is read_safetensors
    assert weights.WeightsError is WeightsError
    assert checkpoint.CheckpointError is CheckpointError
