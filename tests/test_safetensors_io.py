"""The one safetensors reader, and the one error for weights that cannot be read."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import ldmkit
from ldmkit.errors import CheckpointError, LdmkitError, UnreadableWeightsError, WeightsError
from ldmkit.pipeline import Pipeline
from ldmkit.safetensors_io import read_safetensors, read_safetensors_shapes
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


@pytest.fixture
def reads(monkeypatch):
    """The names of the tensors read from any safetensors file (the header is always read)."""
    import safetensors

    seen: list[str] = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.handle = real(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, name):
            seen.append(name)
            return self.inner.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    return seen


def craft(path, tensors: dict, data: bytes) -> None:
    """A safetensors file with the header ``tensors`` (name -> (shape, [start, end])) and
    ``data`` after it, whatever the offsets claim."""
    header = json.dumps(
        {
            name: {"dtype": "F32", "shape": shape, "data_offsets": offsets}
            for name, (shape, offsets) in tensors.items()
        }
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def test_offsets_beyond_the_end_are_one_clear_error(tmp_path, reads):
    path = tmp_path / "crafted.safetensors"
    craft(path, {"a": ([2], [0, 8]), "b": ([2**30], [8, 8 + 2**32])}, bytes(8))
    with pytest.raises(UnreadableWeightsError) as err:
        read_safetensors(path, keys=["a"])
    assert str(err.value) == (
        f"cannot read checkpoint weights {path}: the tensor offsets in its header do not match "
        f"the file's size ({path.stat().st_size} bytes): the file is cut short, has bytes "
        "appended, or its header is crafted"
    )
    assert reads == []


def test_only_the_tensors_asked_for_are_read(weights_file, reads):
    assert list(read_safetensors(weights_file, prefix="b.")) == ["b.c"]
    assert read_safetensors(weights_file, prefix="nothing.") == {}
    assert reads == ["b.c"]
    assert read_safetensors_shapes(weights_file) == {"a": (3,), "b.c": (2, 2)}
    assert reads == ["b.c"]


def test_pipeline_load_checks_names_and_shapes_before_reading(toy, tmp_path, reads):
    """Before: every tensor was read, then load_state_dict found the extra or misshapen one."""
    pipe = ldmkit.compose(overrides=toy)
    pipe.save(tmp_path / "p")
    weights = tmp_path / "p" / "model.safetensors"
    state = load_file(weights)
    save_file({**state, "denoiser.unused": torch.zeros(1000)}, weights)
    reads.clear()
    with pytest.raises(ValueError, match=r"unexpected keys \['denoiser.unused'\]"):
        Pipeline.load(tmp_path / "p")
    assert reads == []
    name = next(k for k in state if k.startswith("denoiser.") and state[k].ndim == 1)
    save_file({**state, name: torch.zeros(state[name].numel() + 1)}, weights)
    with pytest.raises(
        ValueError, match=rf"wrong shapes {name} \[{state[name].numel() + 1}\] \(the model's: "
    ):
        Pipeline.load(tmp_path / "p")
    assert reads == []
    save_file(state, weights)
    Pipeline.load(tmp_path / "p")
    assert sorted(reads) == sorted(state)


def test_component_checkpoint_reads_only_its_component(toy, tmp_path, reads):
    """Before: `first_stage.checkpoint=<pipeline>` read the denoiser and conditioner too."""
    ldmkit.compose(overrides=toy).save(tmp_path / "p")
    reads.clear()
    ldmkit.compose(overrides=toy + [f"+first_stage.checkpoint={tmp_path / 'p'}"])
    assert reads and all(name.startswith("first_stage.") for name in reads)
