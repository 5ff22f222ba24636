"""Stage 1 under a real `torchrun --nproc_per_node=2` (gloo, CPU) on real shards, with gradient
accumulation: the generator and the discriminator each run in their own DDP wrapper, the ranks
end with identical weights, the all-reduce happens on the last micro-batch of a step only, and a
run stopped at a checkpoint resumes under torchrun bitwise equal to one never stopped."""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.training import faults

pytestmark = pytest.mark.slow

ACCUMULATE = 2

WORKER = textwrap.dedent('''
    import hashlib, json, sys
    from pathlib import Path
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from ldmkit.config import compose_config
    from ldmkit.training import distributed_process_group
    from ldmkit.training.autoencoder import AutoencoderTrainer

    out, args = sys.argv[1], sys.argv[2:]

    class Recording(AutoencoderTrainer):
        """Counts each wrapper's forwards (one per micro-batch) and notes, at every all-reduce
        of a gradient bucket, how many forwards it had seen."""

        def build(self):
            super().build()
            for name, model in (("generator", self.ae_model), ("discriminator", self.disc_model)):
                forwards = [0]
                model.module.register_forward_pre_hook(lambda *_, forwards=forwards: forwards.__setitem__(0, forwards[0] + 1))

                def hook(state, bucket, name=name, forwards=forwards):
                    self.reduced[name].append(forwards[0])
                    return allreduce_hook(None, bucket)

                model.register_comm_hook(None, hook)

    # three trainers, one after another in the same process group: the uninterrupted run, then
    # a run stopped at its checkpoint of step 2 and a new trainer resuming it
    plan = [("straight", []), ("stopped", ["trainer.max_steps=2"]), ("stopped", [])]
    with distributed_process_group():
        rank, results = dist.get_rank(), []
        for run, extra in plan:
            Recording.reduced = {"generator": [], "discriminator": []}
            trainer = Recording(compose_config([*args, f"run_dir={Path(out, run)}", *extra]))
            trainer.fit()
            digest = hashlib.sha256()
            named = [*trainer.first_stage.named_parameters(), *trainer.loss.named_parameters()]
            for name, p in sorted(named, key=lambda item: item[0]):
                digest.update(name.encode()); digest.update(p.detach().numpy().tobytes())
            results.append({"world": dist.get_world_size(), "digest": digest.hexdigest(), "step": trainer.step,
                            "reduced": Recording.reduced})
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
''')


def test_stage1_under_torchrun_accumulates_and_resumes_exactly(tmp_path):
    shards = faults.make_shards(tmp_path / "data")
    args = faults.stage_args(
        1, shards, tmp_path / "unused", f"trainer.accumulate_grad_batches={ACCUMULATE}", "trainer.num_workers=0",
        "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.loss.disc_start=2",
        "trainer.sample_every=0", "trainer.val_every=0",
    )  # fmt: skip
    faults.torchrun_worker(tmp_path, WORKER, args)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    (straight, _, resumed), others = ranks[0], ranks[1]
    assert [r["world"] for r in (straight, others[0])] == [2, 2] and straight["step"] == others[0]["step"] == 4
    assert straight["digest"] == others[0]["digest"], "the ranks' weights diverged"
    for rank in (straight, others[0]):
        generator, discriminator = rank["reduced"]["generator"], rank["reduced"]["discriminator"]
        # every step reduces, and only at the backward of its last micro-batch (forward K, 2K, ...)
        assert sorted(set(generator)) == [ACCUMULATE * s for s in (1, 2, 3, 4)], generator
        # the discriminator trains from disc_start=2: steps 3 and 4
        assert sorted(set(discriminator)) == [ACCUMULATE * s for s in (1, 2)], discriminator
    assert faults.checkpoint_steps(tmp_path / "straight") == [2, 4]
    assert (tmp_path / "straight" / "metrics.csv").is_file()

    assert resumed["step"] == 4 and resumed["digest"] == others[2]["digest"] == straight["digest"]
    contents = [faults.final_contents(tmp_path / run, 4) for run in ("straight", "stopped")]
    assert faults.differences(*contents) == []
