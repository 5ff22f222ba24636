"""VQ dead-code restarts under a real `torchrun --nproc_per_node=2` (gloo, CPU): every rank
restarts the same codes with the same vectors, so the codebooks (which DDP never re-syncs:
it only averages gradients) and the usage statistics stay bitwise equal across ranks, with
DDP's buffer broadcast on (the trainer's default) or off."""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.training import faults

pytestmark = pytest.mark.slow

WORKER = textwrap.dedent('''
    import hashlib, json, sys
    from pathlib import Path
    import torch.distributed as dist
    import torch.nn.parallel
    from ldmkit.config import compose_config
    from ldmkit.training import distributed_process_group
    from ldmkit.training.autoencoder import AutoencoderTrainer

    out, args = sys.argv[1], sys.argv[2:]
    DDP = torch.nn.parallel.DistributedDataParallel

    class NoBufferBroadcast(DDP):
        def __init__(self, *a, **k):
            super().__init__(*a, broadcast_buffers=False, **k)

    class Recording(AutoencoderTrainer):
        def training_step(self, batches, step):
            logs = super().training_step(batches, step)
            self.restarted += float(logs["dead_codes_restarted"])
            return logs

    with distributed_process_group():
        rank, results = dist.get_rank(), {}
        for broadcast in (True, False):
            torch.nn.parallel.DistributedDataParallel = DDP if broadcast else NoBufferBroadcast
            trainer = Recording(compose_config([*args, f"run_dir={Path(out, str(broadcast))}"]))
            trainer.restarted = 0.0
            trainer.fit()
            quantizer = trainer.first_stage.quantizer
            results[str(broadcast)] = {
                "world": dist.get_world_size(), "step": trainer.step, "restarted": trainer.restarted,
                "codebook": hashlib.sha256(quantizer.embedding.weight.detach().numpy().tobytes()).hexdigest(),
                "usage": quantizer.code_usage.tolist(),
            }
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
''')


def test_dead_code_restarts_keep_the_ranks_codebooks_equal(tmp_path):
    shards = faults.make_shards(tmp_path / "data")
    # usage_decay=0: a code is dead when this step's batch misses it (most of 256 codes, for
    # 2 images of 4x4 latents per rank), so every step restarts codes
    args = faults.stage_args(
        1, shards, tmp_path / "unused", "first_stage=vq_tiny", "first_stage.n_embed=256",
        "first_stage.usage_decay=0.0", "first_stage.dead_code_threshold=0.5", "trainer.batch_size=2",
        "trainer.num_workers=0", "trainer.max_steps=3", "trainer.checkpoint_every=3",
        "trainer.sample_every=0", "trainer.val_every=0",
    )  # fmt: skip
    faults.torchrun_worker(tmp_path, WORKER, args)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for broadcast in ("True", "False"):
        first, second = (rank[broadcast] for rank in ranks)
        assert first["world"] == 2 and first["step"] == second["step"] == 3
        assert first["restarted"] > 0, "no code was restarted: the test proves nothing"
        assert first["codebook"] == second["codebook"], f"the ranks' codebooks diverged (broadcast_buffers={broadcast})"
        assert first["usage"] == second["usage"], f"the ranks' code_usage diverged (broadcast_buffers={broadcast})"
        assert first["restarted"] == second["restarted"], "the ranks restarted different codes"
