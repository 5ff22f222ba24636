"""Stage 2: train the latent diffusion model (Rombach et al. 2022, Sec. 3.2-3.3).

The first stage is frozen; the denoiser and the conditioner (tau_theta, trained jointly)
minimize ``E ||target - f_theta(z_t, t, tau(y))||^2`` (:class:`DiffusionObjective`). The
conditioner drops each sample's condition to the null condition with its configured
``drop_rate`` (per part for ``conditioner=multi``) so the model also learns the
unconditional score (classifier-free guidance, Ho & Salimans 2022).
An EMA of the trainable weights is kept and used for sampling. Under ``torchrun`` the
trainable part runs in DistributedDataParallel (``trainer.strategy=ddp``), or sharded by FSDP2
(``trainer.strategy=fsdp``, :mod:`ldmkit.training.fsdp`); only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf, open_dict
from torch import Tensor, nn

from ldmkit import lora
from ldmkit.assembly import checked_condition, returned_tensor
from ldmkit.compiling import compile_module, is_compiled
from ldmkit.diffusion.objective import DiffusionObjective, scale_factor_from_latents
from ldmkit.ema import EMA
from ldmkit.interfaces import Conditioner
from ldmkit.sampling_request import SEED_LIMIT
from ldmkit.training import fsdp
from ldmkit.training.batches import batch_images
from ldmkit.training.defaults import stage_only_keys
from ldmkit.training.distributed import broadcast_object, broadcast_tensor
from ldmkit.training.engine import (
    TRAINER_DEFAULTS,
    Trainer,
    TrainingError,
    TrainingWarning,
    average_logs,
)
from ldmkit.training.freezing import apply_patterns, print_selection
from ldmkit.training.init_from import ComponentLoad, InitSource, initialize, print_report
from ldmkit.training.rng import (
    generator,
    isolated_rng,
    preserved_rng,
    sample_generators,
    stream_seed,
)
from ldmkit.training.working_weights import (
    WorkingWeights,
    check_kernel,
    unsupported_reason,
)

# the stage-2 keys and their defaults: conf/trainer/ldm.yaml (ldmkit.training.defaults)
LDM_DEFAULTS: dict[str, Any] = stage_only_keys("ldm")


class DiffusionStep(nn.Module):
    """The trainable part of one step, as one module so DDP can wrap it."""

    def __init__(self, denoiser: nn.Module, conditioner: Conditioner, objective: DiffusionObjective) -> None:
        super().__init__()
        self.denoiser, self.conditioner, self.objective = denoiser, conditioner, objective

    def forward(
        self, z0: Tensor, batch: Mapping[str, Any], *, t: Tensor, noise: Tensor,
        condition_generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        batch = self.conditioner.training_inputs(batch, condition_generator)
        # with the conditioner's guidance dropout
        cond = checked_condition(self.conditioner, "forward()", self.conditioner.condition(batch, generator=condition_generator))
        return self.objective(self._denoise, z0, cond, t=t, noise=noise)

    def _denoise(self, z_t: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """The denoiser's output, when it is a tensor of ``z_t``'s shape (else one line naming
        its plugin)."""
        return returned_tensor("denoiser", self.denoiser, "forward()", self.denoiser(z_t, t, cond), z_t.shape)


class _CacheBuildStopped(Exception):
    """SIGTERM/SIGINT while rank 0 builds the latent cache: stop building."""


class _ScaleFactor(nn.Module):
    """Holds the pipeline's scale-factor buffer so that a resumed run restores it."""

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale_factor", scale)


class LDMTrainer(Trainer):
    stage = "ldm"
    default_preset = "ldm"

    def build(self) -> None:
        from ldmkit.pipeline import build_pipeline

        if self.options.get("cond_drop_prob") is not None:
            raise TrainingError(
                "trainer.cond_drop_prob moved to the conditioner: set conditioner.drop_rate "
                "(per part for conditioner=multi) and remove trainer.cond_drop_prob"
            )
        self.warn_unused_options([*TRAINER_DEFAULTS, *LDM_DEFAULTS],
                                 nested={node: LDM_DEFAULTS[node] for node in ("ema", "lora")})
        self.opts = {**LDM_DEFAULTS, **{k: v for k, v in self.options.items() if k in LDM_DEFAULTS}}
        self.opts["ema"] = {**LDM_DEFAULTS["ema"], **(self.options.get("ema") or {})}
        cfg = self.cfg
        self.pipeline = build_pipeline(cfg).to(self.device)
        first_stage = self.pipeline.first_stage
        first_stage.requires_grad_(False).eval()
        self._check_sample_steps()
        init = initialize(self, self.model_modules())  # trainer.init_from, a fresh run only
        if cfg.first_stage.get("checkpoint") is None and any(True for _ in first_stage.parameters()):
            loaded = [r for r in (init[1] if init is not None else []) if r.name == "first_stage"]
            if init is None and not self.options.get("init_from"):  # (a resumed run's checkpoint has its weights)
                warnings.warn(
                    "first_stage.checkpoint is not set: the latents come from an untrained first stage "
                    "(train one with stage=autoencoder and pass first_stage.checkpoint=<its run_dir>)",
                    TrainingWarning,
                    stacklevel=2,
                )
            elif loaded and not (loaded[0].loaded or loaded[0].resized):
                warnings.warn(
                    f"trainer.init_from={init[0].path} gives the first stage none of its weights "
                    f"({len(loaded[0].new)} new): the latents come from an untrained first stage (the source's "
                    "is another one: trainer.init_architecture=source builds it, or pass "
                    "first_stage.checkpoint=<a trained autoencoder>)",
                    TrainingWarning,
                    stacklevel=2,
                )
        objective = self._build_objective()
        self.step_module = DiffusionStep(self.pipeline.denoiser, self.pipeline.conditioner, objective).to(self.device)
        # trainer.lora: peft's LoRA layers, the rest frozen (ldmkit.lora); after init_from, before the patterns
        # (which narrow what trains) and compile
        self.lora = lora.from_options(self.pipeline, {**LDM_DEFAULTS["lora"], **(self.options.get("lora") or {})})
        if self.lora is not None:
            lora.add_lora(self.pipeline, self.lora)
            if self.is_main:
                print(f"ldmkit train {self.stage}: {lora.summary(self.pipeline)}", file=sys.stderr)
        self.strategy = fsdp.check_strategy(self.opts["strategy"], lora=self.lora is not None)
        selection = apply_patterns(self.step_module.named_parameters(), self.options.get("trainable"),
                                   self.options.get("frozen"), what="stage=ldm")
        compile_module(
            self.pipeline.denoiser, self.options.get("compile"), device=self.device,
            backend=str(self.options.get("compile_backend") or "inductor"), key="trainer.compile",
            what="the denoiser", purpose="train", work=int(self.options.get("max_steps") or 0) or None, quiet=not self.is_main,
        )
        self.sharded = self.strategy == "fsdp"
        self.units = []
        if self.sharded:  # before the optimizer and the EMA, which then hold shards
            self.units = fsdp.shard(self.pipeline.denoiser, self.pipeline.conditioner, objective, self.precision)
        params = [p for p in self.step_module.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("stage=ldm has nothing to train: the denoiser has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            params, lr=float(self.options["lr"]), betas=tuple(self.opts["betas"]),
            weight_decay=float(self.opts["weight_decay"]),
            # the fused kernel is ~3x faster than the per-tensor loop, on CPU too
            fused=all(p.is_floating_point() for p in params),
        )
        self.trainable = nn.ModuleDict({"denoiser": self.pipeline.denoiser, "conditioner": self.pipeline.conditioner})
        ema = self.opts["ema"]
        self.ema = EMA(self.trainable, decay=float(ema["decay"]), warmup=bool(ema["warmup"])) if ema["enabled"] else None
        self.scale = _ScaleFactor(self.pipeline.scale_factor)
        self.scale_by_std = cfg.get("scale_factor") == "scale_by_std"
        if init is not None:
            print_report(self, *init, self._carry_scale_factor(*init))
        print_selection(selection, self)
        self.model = self.step_module
        if self.world_size > 1 and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.step_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(self.opts["ddp_find_unused_parameters"]),
            )
        # rng.py: timesteps and noise per sample (training_step); masks and condition dropout, one
        # stream per rank
        self.condition_generator = generator(stream_seed(self.seed, "conditions", self.rank))
        self.cache = None  # trainer.latent_cache: loaded or built in before_training()
        self.working: WorkingWeights | None = None  # trainer.bf16_weights: set up in before_training()

    def _build_objective(self) -> DiffusionObjective:
        """``trainer.objective``: a bad value or an unknown key is one line naming it."""
        options = self.opts["objective"]
        if options is not None and not isinstance(options, Mapping):
            raise TrainingError(f"trainer.objective={options!r}: expected a mapping of keyword arguments")
        try:
            return DiffusionObjective(
                self.pipeline.schedule, prediction=self.pipeline.denoiser.prediction, **dict(options or {})
            )
        except (TypeError, ValueError) as err:  # the constructor's range checks
            raise TrainingError(f"trainer.objective: {err}") from err

    def _check_sample_steps(self) -> None:
        """The grids' sampler steps fit the schedule: checked before the first step, not at the
        first grid."""
        steps, timesteps = int(self.opts["sample_steps"]), int(self.pipeline.schedule.timesteps)
        if self.options.get("sample_every") and steps > timesteps:
            raise TrainingError(
                f"trainer.sample_steps={steps} is more than the schedule's {timesteps} timesteps "
                f"(schedule.timesteps): give at most {timesteps}"
            )

    def _carry_scale_factor(self, source: InitSource, loads: Sequence[ComponentLoad]) -> list[str]:
        """The source's scale factor, unless ``scale_factor=scale_by_std`` asks for a new
        estimate and the first stage is not the source's own (whose latents the source's
        denoiser learned at that scale: an estimate from one batch of other data would feed
        the carried denoiser, or a LoRA's frozen base, latents of another scale); the
        report's closing notes (and the loss a paper checkpoint was trained with, where the
        run's ``trainer.objective`` differs)."""
        carried = source.scale_factor
        first = next((load for load in loads if load.name == "first_stage"), None)
        # every first-stage tensor (none for `identity`) is the source's: loaded, or the same kept
        own_first_stage = first is not None and first.holds_the_sources
        if self.scale_by_std and carried is not None and own_first_stage:
            self.scale_by_std = False  # nothing to estimate in before_training
            self.pipeline.scale_factor.fill_(carried)
            note = (f"scale_factor: {carried:.6g} from the source, not estimated again (scale_by_std): the "
                    "first stage is the source's, whose latents its denoiser learned at this scale")
        elif self.scale_by_std:
            note = "scale_factor: scale_by_std, estimated from the first batch" + (
                f" (the source's {carried:.6g} is not used)" if carried is not None else "")
        elif carried is None:
            note = f"scale_factor: {float(self.pipeline.scale_factor):.6g} from the config (the source has none)"
        else:
            self.pipeline.scale_factor.fill_(carried)
            note = f"scale_factor: {carried:.6g} from the source"
        notes = [note, "the optimizer, the step counter and the EMA start fresh"]
        ours = self.step_module.objective.loss_type
        if source.loss_type is not None and source.loss_type != ours:  # the run's own objective wins
            notes.append(f"trainer.objective.loss_type={ours}, but the paper trained this model with "
                         f"{source.loss_type} (its config's loss_type): set trainer.objective.loss_type="
                         f"{source.loss_type} to go on as it did")  # fmt: skip
        return notes

    # -- state ---------------------------------------------------------------------------
    def model_modules(self) -> dict[str, nn.Module]:
        return {"first_stage": self.pipeline.first_stage, "denoiser": self.pipeline.denoiser,
                "conditioner": self.pipeline.conditioner}

    def training_modules(self) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"objective": self.step_module.objective, "scale": self.scale}
        if self.ema is not None:
            modules["ema"] = self.ema
        return modules

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"diffusion": self.optimizer}

    def generators(self) -> dict[str, torch.Generator]:
        return {"conditions": self.condition_generator}

    def _whole_modules(self) -> dict[str, nn.Module]:
        """What a sharded checkpoint holds besides the step module and its optimizer."""
        return {"first_stage": self.pipeline.first_stage, **{k: v for k, v in self.training_modules().items()
                                                             if k != "objective"}}

    def sharded_state(self) -> dict[str, Any] | None:
        if not self.sharded:
            return None
        fsdp.reshard(self.units)
        return fsdp.checkpoint_state(self.step_module, self.optimizer, self._whole_modules())

    def load_sharded_state(self, state: dict[str, Any]) -> None:
        fsdp.load_checkpoint_state(self.step_module, self.optimizer, self._whole_modules(), state)

    def hyperparameters(self) -> dict[str, dict[str, Any]]:
        # the lr itself is set every step (warm-up)
        return {"diffusion": {"betas": tuple(self.opts["betas"]), "weight_decay": float(self.opts["weight_decay"])}}

    def config_keys_that_must_match(self) -> list[str]:
        # a learned log-variance and the EMA are checkpoint state (training.safetensors) too
        return ["first_stage", "denoiser", "conditioner", "schedule", "scale_factor", "trainer.lora",
                "trainer.objective.learn_logvar", "trainer.ema.enabled"]

    def config_keys_kept_from_checkpoint(self) -> list[str]:
        # a learned logvar is a saved parameter; a fixed one is rebuilt from logvar_init
        return ["trainer.objective.logvar_init"] if self.step_module.objective.learn_logvar else []

    # -- data ------------------------------------------------------------------------------
    def make_loader(self, split: str, epoch: int) -> Iterable[Mapping[str, Any]]:
        """The train split from the latent cache (``trainer.latent_cache``, built in
        :meth:`build`), else the engine's."""
        if split == "train" and self.cache is not None:
            from ldmkit.training.latent_cache import CacheLoader

            return CacheLoader(self.cache, int(self.options["batch_size"]), seed=self.seed,
                               rank=self.rank, world_size=self.world_size, epoch=epoch)
        return super().make_loader(split, epoch)

    def _cache_fingerprint(self) -> str:
        """What the cached latents depend on: the first stage (its config and the weights it
        encodes with — a first_stage.checkpoint folder may have trained on since), the data,
        the conditioner's keys and the seed."""
        weights = hashlib.sha256()
        for name, tensor in sorted(self.pipeline.first_stage.state_dict().items()):
            weights.update(name.encode())
            weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        parts = {
            "first_stage": OmegaConf.to_container(self.cfg.first_stage, resolve=True),
            "first_stage_weights": weights.hexdigest(),
            "data": OmegaConf.to_container(self.cfg.data, resolve=True),
            "keys": list(self.pipeline.conditioner.data_keys),
            "seed": self.seed,  # a sampling encoder's posterior draws (isolated_rng below)
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _load_cache(self):
        from ldmkit.data import build_dataloader
        from ldmkit.training.latent_cache import (
            DamagedCacheError,
            LatentCache,
            build_cache,
            is_complete,
        )

        directory = self.run_dir / "latent_cache"
        fingerprint = self._cache_fingerprint()
        cache = None
        if self.is_main and is_complete(directory, fingerprint):
            try:
                cache = LatentCache(directory)
            except DamagedCacheError as err:
                warnings.warn(f"{err}; rebuilding the latent cache", TrainingWarning, stacklevel=2)
        building = self.is_main and cache is None
        if building:
            loader = build_dataloader(
                self.cfg.data, batch_size=int(self.options["batch_size"]), split="train",
                rank=0, world_size=1, num_workers=int(self.options["num_workers"]),
                resampled=False, shuffle=False,
            )

            def check() -> None:  # this rank's signal alone: the others wait at the barrier
                if self.signals.stop:
                    raise _CacheBuildStopped

            try:
                with isolated_rng(stream_seed(self.seed, "latent_cache")):  # KL posterior samples
                    build_cache(directory, loader, self.pipeline.first_stage.encode,
                                keys=self.pipeline.conditioner.data_keys, fingerprint=fingerprint,
                                device=self.device, progress=bool(self.options["progress"]),
                                check=check)
            except Exception:
                if not self.signals.stop:  # else it stopped, or the signal also ended the data workers
                    raise
        self.barrier()
        if broadcast_object(building):  # a signal on any rank stops them all, the cache left incomplete
            self.check_interrupt("while building the latent cache")
        return cache if cache is not None else LatentCache(directory)

    # -- before the first step -----------------------------------------------------------
    def before_training(self) -> None:
        # after the resume, which may have put the checkpoint's first stage in place of the
        # first_stage.checkpoint it was built with; before the clock starts: not training time
        if self.opts["latent_cache"] and self.data is None:
            self.cache = self._load_cache()
        if self.scale_by_std and self.step == 0:  # a resumed run restored it from its checkpoint
            self.estimate_scale_factor()
        self.working = self._working_weights()  # after the resume loaded the optimizer's state

    def _working_weights(self) -> WorkingWeights | None:
        """``trainer.bf16_weights`` (:mod:`ldmkit.training.working_weights`): ``auto`` keeps the
        trained matrix layers' weights as a bf16 copy written by one fused AdamW step wherever
        that serves (bf16 on a CPU, one process, no ``trainer.compile``); ``true`` also on CUDA,
        and an error where it cannot serve; ``false`` never."""
        wanted = self.opts["bf16_weights"]
        if wanted is False or self.precision != "bf16":
            return None
        if self.world_size > 1:
            reason = "more than one process (DDP and FSDP reduce the parameters' own gradients)"
        elif wanted == "auto" and self.device.type != "cpu":
            reason = "measured on CPUs only; set trainer.bf16_weights=true to use it on CUDA"
        elif is_compiled(self.pipeline.denoiser):
            reason = "trainer.compile is on"
        else:
            reason = unsupported_reason(self.step_module, self.optimizer) or check_kernel(
                self.device, accumulate=int(self.options["accumulate_grad_batches"]) > 1)
        if reason is not None:
            if wanted is True:
                raise TrainingError(f"trainer.bf16_weights=true, but the bf16 working weights cannot serve this run: {reason}")
            if self.is_main and self.options["progress"]:
                print(f"ldmkit train {self.stage}: bf16 working weights off ({reason})", file=sys.stderr)
            return None
        working = WorkingWeights(self.step_module, self.optimizer)
        if self.is_main and self.options["progress"]:
            print(f"ldmkit train {self.stage}: {working.describe()}", file=sys.stderr)
        return working

    @torch.no_grad()
    def estimate_scale_factor(self) -> float:
        """``scale_factor=scale_by_std``: set the pipeline's scale factor to 1/std of the
        latents of the first training batch, once, before the first step. Rank 0 estimates it
        and every rank uses its value. The global generators are put back after encoding, so
        the estimate measures the very latents (a KL posterior sample) the first step trains
        on, and the training streams do not move."""
        factor = torch.zeros((), device=self.pipeline.scale_factor.device)
        if self.is_main:
            first = next(iter(self.make_loader("train", 0)))
            with preserved_rng():
                latents = self.encode(first)
            try:
                factor.fill_(scale_factor_from_latents(latents))
            except ValueError:  # no spread: NaN tells every rank to stop
                factor.fill_(float("nan"))
        broadcast_tensor(factor)
        if not torch.isfinite(factor):
            raise TrainingError(
                "scale_factor=scale_by_std: the first training batch's latents have std 0 or NaN "
                "(constant images?), so 1/std is no scale; set scale_factor to a number"
            )
        self.pipeline.scale_factor.fill_(float(factor))
        self.logger.log(self.step, {"train/scale_factor": float(factor)})  # rank 0's logger writes
        return float(factor)

    # -- one step --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, batch: Mapping[str, Any]) -> Tensor:
        """The batch's latents before scaling: its cached ``latent``, else the first stage's
        encoding of its images."""
        if "latent" in batch:
            return batch["latent"].to(self.device, non_blocking=True)
        x = batch_images(batch, channels=self.pipeline.first_stage.image_channels, device=self.device)
        return returned_tensor("first_stage", self.pipeline.first_stage, "encode()", self.pipeline.first_stage.encode(x))

    @torch.no_grad()
    def latents(self, batch: Mapping[str, Any]) -> Tensor:
        """What the diffusion model sees: the batch's latents times the scale factor."""
        return self.encode(batch) * self.pipeline.scale_factor

    def training_step(self, batches: Sequence[Mapping[str, Any]], step: int) -> dict[str, Tensor]:
        """One step over its micro-batches. Timesteps and noise are drawn at once for all the
        step's samples (:meth:`DiffusionObjective.draw`), so K micro-batches of B train as
        one batch of K·B would; the conditioner draws its dropout per micro-batch."""
        self.step_module.train()
        warmup = int(self.opts["warmup_steps"])
        lr = float(self.options["lr"]) * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        latents = [self.latents(batch) for batch in batches]  # float32: encoded outside autocast
        sizes = [len(z0) for z0 in latents]
        all_logs, weights = [], []
        for index, weight in self.micro_batches(sizes, [self.model]):
            z0 = latents[index]
            # each sample's t and noise from its index in the step's global batch (rank r's
            # samples, its micro-batches in order, from r * K * B): N ranks x K micro-batches of
            # B samples train as one process with one batch of N * K * B does
            first = self.rank * sum(sizes) + sum(sizes[:index])
            t, noise = self.step_module.objective.draw(
                z0.shape, z0.dtype, self.device, sample_generators(self.seed, "diffusion", step, first, sizes[index])
            )
            # on the bf16 working weights where they serve (trainer.bf16_weights)
            model = self.model if self.working is None else self.working.forward
            with self.autocast(), self._working_weights_errors():  # the loss is computed on float32 outputs
                loss, logs = model(z0, batches[index], t=t, noise=noise,
                                   condition_generator=self.condition_generator)
            self.check_finite("the diffusion loss", loss, logs)
            self.backward(loss * weight)
            if self.working is not None:
                self.working.gather()
            all_logs.append(logs)
            weights.append(weight)
        logs = average_logs(all_logs, weights)
        if self.working is None:
            norm = self.optimizer_step(self.optimizer, self.optimizer.param_groups[0]["params"])
        else:
            norm = self._working_step()
        if norm is not None:
            logs["grad_norm"] = fsdp.replicated(norm)
        if self.ema is not None:
            self.ema.update(self.trainable)
        logs["lr"] = torch.tensor(lr)
        return logs

    @contextlib.contextmanager
    def _working_weights_errors(self):
        """A forward on the bf16 working weights that fails on mixed dtypes (a layer run outside
        autocast on float32 inputs: a plugin's own float32 region) names the key that turns them off."""
        try:
            yield
        except RuntimeError as err:
            if self.working is None or not any(word in str(err) for word in ("BFloat16", "dtype")):
                raise
            raise TrainingError(
                f"the forward on the bf16 working weights failed: {str(err).splitlines()[0]} (a convolution or "
                "linear layer run outside autocast gets bf16 weights); set trainer.bf16_weights=false"
            ) from err

    def _working_step(self) -> Tensor | None:
        """:meth:`optimizer_step` with the bf16 working weights: ``trainer.grad_clip`` as
        ``clip_grad_norm_`` computes it on autocast's float32 gradients (same norm, same factor),
        the fused step of the working weights, then AdamW's own step of the other parameters."""
        norm, factor = None, 1.0
        if self.options.get("grad_clip"):
            norm, factor = self.working.clip(self.optimizer.param_groups[0]["params"], float(self.options["grad_clip"]))
        self.working.step(factor)
        self.optimizer.step()  # the parameters with a .grad: those off the working weights
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- evaluation and images ------------------------------------------------------------
    def _sampling_weights(self):
        fsdp.reshard(self.units)  # the EMA shadow is sharded as the parameters are
        use_ema = self.ema is not None and bool(self.opts["ema"]["use_for_sampling"])
        return self.ema.applied_to(self.trainable) if use_ema else contextlib.nullcontext(self.trainable)

    @torch.no_grad()
    def validate(self, batches: list[Mapping[str, Any]]) -> dict[str, float]:
        """Denoising loss on fixed validation batches with fixed t and noise."""
        gen = torch.Generator().manual_seed(1234)
        total, count = 0.0, 0
        self.step_module.eval()
        for batch in batches:
            z0 = self.latents(batch)
            t = torch.randint(0, self.pipeline.schedule.timesteps, (z0.shape[0],), generator=gen).to(self.device)
            noise = torch.randn(z0.shape, generator=gen).to(self.device)
            cond = self.pipeline.conditioner(self.pipeline.conditioner.training_inputs(batch, gen))
            loss, _ = self.step_module.objective(self.pipeline.denoiser, z0, cond, t=t, noise=noise)
            total += float(loss) * z0.shape[0]
            count += z0.shape[0]
        return {"loss": total / max(count, 1)}

    @torch.no_grad()
    def save_images(self, batch: Mapping[str, Any], path: Path) -> Tensor | None:
        """A grid of samples from the batch's conditions (one row per sample: its condition
        inputs, then the sample), with guidance where the conditioner learned a null condition."""
        from ldmkit.io import atomic_path
        from ldmkit.pipeline import image_grid_rows
        from ldmkit.visualize import make_grid, samples_with_conditions, save_image

        n = int(self.opts["sample_count"])
        conditioner = self.pipeline.conditioner
        cond_batch = None
        if conditioner.input_keys:
            inputs = conditioner.training_inputs(batch, torch.Generator().manual_seed(int(self.cfg.get("seed", 0))))
            cond_batch = {k: inputs[k][:n] for k in conditioner.input_keys if k in inputs}
            n = len(next(iter(cond_batch.values())))
        image_size = batch["image"].shape[-1] if "image" in batch else self.cfg.get("image_size")
        guided = cond_batch is not None and conditioner.learns_null_condition
        self.step_module.eval()
        with self._sampling_weights():
            images = self.pipeline.sample(
                cond_batch, num_samples=None if cond_batch else n, steps=int(self.opts["sample_steps"]),
                guidance_scale=float(self.opts["guidance_scale"]) if guided else 1.0,
                seed=int(self.cfg.get("seed", 0)) % SEED_LIMIT, image_size=int(image_size), precision=self.precision,
            )
        if not self.is_main:  # a sharded model samples on every rank
            return None
        tiles, per_row = samples_with_conditions(images, conditioner, cond_batch)
        grid = make_grid(tiles, nrow=per_row or image_grid_rows(n), padding=2)
        with atomic_path(path) as tmp:
            save_image(grid, tmp, format="png")
        return grid

    def save_checkpoint(self):
        # the pipeline first: a run killed in between resumes from the checkpoint before and
        # exports again, so pipeline/ is never older than the newest checkpoint (a run stopped
        # after its last checkpoint has nothing left to do, and would never re-export)
        if self.is_main or self.sharded:  # a sharded model is gathered by every rank
            self.export_pipeline()
        return super().save_checkpoint()

    def export_pipeline(self) -> Path | None:
        """``<run_dir>/pipeline/``: a :class:`Pipeline` folder (EMA weights by default)
        that ``ldmkit sample --checkpoint`` and ``Pipeline.load`` read. A LoRA run writes the
        adapter alone over its base: the ``trainer.init_from`` folder when the base's weights
        are exactly its, else ``<run_dir>/base/`` (:func:`ldmkit.lora.save_base`)."""
        if self.options.get("init_from") and not self.scale_by_std:  # the scale factor it carried
            with open_dict(self.pipeline.config):
                self.pipeline.config.scale_factor = float(self.pipeline.scale_factor)
        embed = bool(self.options.get("embed_frozen"))
        if self.lora is not None:
            init = self.options.get("init_from")
            lora.save_base(self.pipeline, self.lora, [Path(init), Path(init) / "pipeline"] if init else [],
                           self.run_dir / "base", embed_frozen=embed)  # fmt: skip
            with self._sampling_weights():
                return lora.save_adapter(self.pipeline, self.run_dir / "pipeline", self.lora)
        with self._sampling_weights():
            if self.sharded:  # the full weights, gathered on rank 0 (which alone writes)
                full = fsdp.full_state(self.pipeline)
                return self.pipeline.save(self.run_dir / "pipeline", embed_frozen=embed, state=full) if self.is_main else None
            return self.pipeline.save(self.run_dir / "pipeline", embed_frozen=embed)


def train_ldm(cfg: Any, *, data: Any = None) -> Path:
    return LDMTrainer(cfg, data=data).fit()


__all__ = ["DiffusionStep", "LDMTrainer", "train_ldm"]
