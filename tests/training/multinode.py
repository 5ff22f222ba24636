"""One stage-2 training on real shards, launched as one process or as two torchrun "nodes" of
one process each on this machine (gloo, CPU), for tests/training/test_multinode.py and
benchmarks/scaling_gloo.py.

What lines up by construction between world 1 x batch 2B and world 2 x batch B:

* the data: a data factory reads the shards in a fixed order (no shuffling, no augmentation)
  in *global* batches of 2B and gives rank r the slice ``[r*B, (r+1)*B)`` of each, so global
  batch s holds the same samples, in the same order, at every world size;
* the diffusion noise and timesteps: drawn per sample from its index in the step's global
  batch (``ldmkit.training.rng.sample_generators``), not from one stream per rank;
* the conditioner draws nothing (``conditioner.drop_rate=0``): its dropout stream is per rank.

What does not: DDP averages the ranks' mean gradients where one process takes the mean of all
2B, so the float sums run in another order: the weights agree to float32 rounding, not bitwise.

Run as ``python -m tests.training.multinode SHARDS RUN_DIR OUT [--global-batch N --steps N
--image-size N --threads N --set KEY=VALUE]``
(under torchrun or not); writes ``OUT/world{W}_rank{R}.pt`` (the weights before and after training) and
``.json`` (world, rank, step, seconds in the training steps).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]


def environment() -> dict[str, str]:
    """This checkout's tests on the path, before the code this interpreter imports."""
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process(args: list[str], *, timeout: float) -> subprocess.CompletedProcess:
    """The worker as one plain process (no torchrun: world size 1)."""
    return subprocess.run([sys.executable, "-m", __name__, *args], capture_output=True, text=True,
                          env=environment(), timeout=timeout, cwd=ROOT)  # fmt: skip


def two_nodes(args: list[str], *, timeout: float) -> list[subprocess.CompletedProcess]:
    """The worker under two torchrun agents ("nodes") meeting at a c10d rendezvous on
    127.0.0.1, one process each, as two machines would (docs/distributed.md)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    port = free_port()
    command = [str(torchrun), "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=ldmkit-test-{port}",
               "-m", __name__, *args]  # fmt: skip
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=environment(), cwd=ROOT) for _ in range(2)]  # fmt: skip
    results = []
    for node in nodes:
        try:
            out, _ = node.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(command, node.returncode, out, ""))
    return results


def global_batches(data_cfg: Any, global_batch: int, rank: int, world_size: int):
    """A data factory: the shards in their stored order, in global batches, rank ``rank``'s
    slice of each (the same samples per step at every world size)."""
    from ldmkit.data import build_dataloader

    per_rank = global_batch // world_size

    def data(split: str, epoch: int):
        loader = build_dataloader(data_cfg, batch_size=global_batch, split="train", rank=0, world_size=1,
                                  resampled=False, shuffle=False, drop_last=True)  # fmt: skip
        for batch in loader:
            yield {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}

    return data


def flat_weights(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial, trained) of one worker's ``.pt``: every weight flattened into one float64 vector."""
    saved = torch.load(path, weights_only=True)
    return tuple(torch.cat([v.double().flatten() for _, v in sorted(saved[w].items())])
                 for w in ("initial", "trained"))  # fmt: skip


def compare(run: Path, reference: Path) -> dict[str, Any]:
    """A run's weights against a reference run's (each a worker's ``.pt``): whether they
    started equal, how far training moved the reference (L2), and how far apart the trained
    weights are relative to that."""
    (start, trained), (start_ref, trained_ref) = flat_weights(run), flat_weights(reference)
    moved = (trained_ref - start_ref).norm().item()
    return {"same_start": torch.equal(start, start_ref), "moved": moved,
            "relative_difference": (trained - trained_ref).norm().item() / moved}  # fmt: skip


def weights(trainer: Any) -> dict[str, torch.Tensor]:
    """The trainable weights, whole (gathered from the ranks' shards under FSDP: every rank
    must call it; rank 0's are complete)."""
    if getattr(trainer, "sharded", False):
        from ldmkit.training.fsdp import full_state

        return {k: v.detach().cpu().clone() for k, v in full_state(trainer.trainable).items()}
    return {k: v.detach().cpu().clone() for k, v in trainer.trainable.state_dict().items()}


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    from ldmkit.config import compose_config
    from ldmkit.training import distributed_process_group
    from ldmkit.training.ldm import LDMTrainer

    parser = argparse.ArgumentParser()
    parser.add_argument("shards")
    parser.add_argument("run_dir")
    parser.add_argument("out", type=Path)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="trainer.num_threads of each process")
    parser.add_argument("--set", action="append", default=[], help="a further config override")
    args = parser.parse_args(argv)
    with distributed_process_group():
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        cfg = compose_config([
            "stage=ldm", "trainer=ldm_tiny", "first_stage=identity", "denoiser=unet_tiny",
            "conditioner=class_label", "conditioner.num_classes=3", "conditioner.embed_dim=16",
            "conditioner.drop_rate=0", "data=image_folder", f"data.path={args.shards}",
            f"image_size={args.image_size}",
            f"run_dir={args.run_dir}", f"trainer.max_steps={args.steps}",
            f"trainer.batch_size={args.global_batch // world}", "trainer.val_batches=0",
            "trainer.sample_every=0", f"trainer.num_threads={args.threads}", "trainer.precision=fp32",
            *args.set,
        ])  # fmt: skip

        class Trainer(LDMTrainer):
            def before_training(self) -> None:
                super().before_training()
                self.initial = weights(self)

        trainer = Trainer(cfg, data=global_batches(cfg.data, args.global_batch, rank, world))
        trainer.fit()
        name = f"world{world}_rank{rank}"
        torch.save({"initial": trainer.initial, "trained": weights(trainer)}, args.out / f"{name}.pt")
        result = {"world": world, "rank": rank, "step": trainer.step, "train_seconds": trainer.state.train_seconds}
        (args.out / f"{name}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
