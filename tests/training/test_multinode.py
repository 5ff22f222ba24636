"""Two "nodes" on this machine: two torchrun agents of one process each meet at a c10d
rendezvous on 127.0.0.1 (gloo, CPU) and train stage 2 on real shards; the weights equal a
single process's trained on the same global batches (tests/training/multinode.py says what
lines up and why)."""

from __future__ import annotations

import json

import pytest
import torch

from ldmkit.data import prepare
from tests.data.conftest import make_image_folder
from tests.training.multinode import compare, single_process, two_nodes

# How far the 2-node weights are from the 1-process weights, relative to how far training moved
# them (L2 over all weights). DDP's mean of two ranks' mean gradients is the same sum as one
# process's mean over all samples in another order: float32 rounding, ~1e-7 relative. AdamW's
# first update of an element is lr * sign(gradient), so the few elements whose gradient is zero
# up to rounding move by up to lr either way, and the next steps spread that: measured 1.3e-4
# after 4 steps (in fp32: under bf16 autocast the matmuls round per batch shape, 1e-2). One
# stream of noise per rank instead of per sample (ldmkit.training.rng.sample_generators) gives 1.3.
TOLERANCE = 1e-3


@pytest.fixture
def shards(tmp_path):
    images = tmp_path / "images"
    make_image_folder(images, per_class=8, size=(8, 8))
    prepare("image_folder", tmp_path / "shards", path=str(images), shard_size=4, progress=False)
    return tmp_path / "shards"


@pytest.mark.slow
def test_two_nodes_train_as_one_process_with_the_same_global_batch(tmp_path, shards):
    out = tmp_path / "out"
    out.mkdir()
    args = ["--global-batch=4", "--steps=4"]
    nodes = two_nodes([str(shards), str(tmp_path / "run2"), str(out), *args], timeout=300)
    for node in nodes:
        assert node.returncode == 0, node.stdout[-4000:]
    single = single_process([str(shards), str(tmp_path / "run1"), str(out), *args], timeout=300)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    results = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(results) == ["world1_rank0", "world2_rank0", "world2_rank1"]
    assert {r["step"] for r in results.values()} == {4}
    rank0, rank1, alone = (out / f"{n}.pt" for n in ("world2_rank0", "world2_rank1", "world1_rank0"))
    between = compare(rank1, rank0)
    assert between["same_start"] and between["relative_difference"] == 0.0, "the two nodes' weights diverged"
    found = compare(rank0, alone)
    assert found["same_start"] and found["moved"] > 0.01, found
    assert found["relative_difference"] < TOLERANCE, found
    # rank 0 alone wrote the run folder
    run = tmp_path / "run2"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000000003", "step_000000004"]
    assert (run / "pipeline" / "model.safetensors").is_file()



def test_a_samples_timestep_and_noise_do_not_depend_on_how_the_global_batch_is_split():
    from ldmkit.diffusion.objective import DiffusionObjective
    from ldmkit.diffusion.schedule import NoiseSchedule
    from ldmkit.training.rng import sample_generators

    objective = DiffusionObjective(NoiseSchedule(), prediction="eps")
    z0 = torch.zeros(4, 3, 8, 8)

    def draw(step, first, count):
        gens = sample_generators(0, "diffusion", step, first, count)
        return objective.sample_timesteps(count, z0.device, gens), objective.sample_noise(z0[:count], gens)

    (t, noise), halves = draw(5, 0, 4), [draw(5, 0, 2), draw(5, 2, 2)]
    assert torch.equal(t, torch.cat([h[0] for h in halves]))
    assert torch.equal(noise, torch.cat([h[1] for h in halves]))
    assert not torch.equal(noise, draw(6, 0, 4)[1]), "another step draws other noise"
    assert not torch.equal(noise[0], noise[1])
