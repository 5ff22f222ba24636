"""Stage 1: train a first stage with :class:`ldmkit.losses.AutoencoderLoss`
(Rombach et al. 2022, Sec. 3.1): two Adam optimizers, one for the autoencoder (and the
loss's log-variance), one for the PatchGAN discriminator once ``disc_start`` is reached."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from ldmkit.compiling import compile_module
from ldmkit.errors import ConfigError
from ldmkit.training.batches import batch_images, to_unit
from ldmkit.training.defaults import stage_only_keys
from ldmkit.training.engine import (
    TRAINER_DEFAULTS,
    Trainer,
    TrainingError,
    average_logs,
)
from ldmkit.training.freezing import apply_patterns, print_selection
from ldmkit.training.init_from import initialize, print_report

__all__ = ["AutoencoderTrainer", "batch_images", "build_first_stage", "to_unit", "train_autoencoder"]


def build_first_stage(cfg: Any) -> nn.Module:
    from ldmkit.assembly import create_component
    from ldmkit.plugins import get_registry

    return create_component(get_registry(), "first_stage", cfg.first_stage, "first_stage config")


def build_autoencoder_loss(options: Mapping[str, Any], first_stage: nn.Module) -> nn.Module:
    """``trainer.loss`` with ``reduction: auto`` and ``disc_in_channels: auto`` filled
    from the first stage (its ``loss_reduction`` and ``image_channels``)."""
    from ldmkit.losses import AutoencoderLoss

    kwargs = dict(options or {})
    if kwargs.get("reduction", "auto") == "auto":
        kwargs["reduction"] = getattr(first_stage, "loss_reduction", "mean")
    channels = getattr(first_stage, "out_channels", first_stage.image_channels)
    if kwargs.get("disc_in_channels", "auto") == "auto":
        kwargs["disc_in_channels"] = channels
    elif kwargs["disc_in_channels"] != channels:  # else a traceback at the first GAN step
        raise TrainingError(
            f"trainer.loss.disc_in_channels={kwargs['disc_in_channels']}: the discriminator judges the "
            f"first stage's reconstructions, which have {channels} channels; leave it at auto"
        )
    try:
        return AutoencoderLoss(**kwargs)
    except (TypeError, ValueError) as err:  # the constructor's range checks: one line, no traceback
        raise TrainingError(f"trainer.loss: {err}") from err


class _Generator(nn.Module):
    """What the autoencoder's optimizer trains — the first stage and the loss's log-variance
    (used by the loss, outside this forward) — as one module, for DDP."""

    def __init__(self, first_stage: nn.Module, logvar: nn.Parameter) -> None:
        super().__init__()
        self.first_stage, self.logvar = first_stage, logvar

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        return self.first_stage(x)


class _Discriminator(nn.Module):
    """The discriminator's loss as a module over the discriminator alone, for DDP (the
    loss's other parts are not its to reduce)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.discriminator = loss.discriminator
        self.discriminator_loss = loss.discriminator_loss  # a bound method: not a submodule

    def forward(self, x: Tensor, rec: Tensor, *, global_step: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.discriminator_loss(x, rec, global_step=global_step)


class AutoencoderTrainer(Trainer):
    stage = "autoencoder"
    default_preset = "autoencoder"
    extra_options = tuple(stage_only_keys("autoencoder"))  # loss, betas, disc_lr

    def build(self) -> None:
        cfg, options = self.cfg, self.options
        self.warn_unused_options([*TRAINER_DEFAULTS, *self.extra_options])
        self.first_stage = build_first_stage(cfg).to(self.device)
        if not any(p.requires_grad for p in self.first_stage.parameters()):
            raise TrainingError(
                f"first_stage {cfg.first_stage.get('name')!r} has no trainable parameters; "
                f"choose a trainable first stage (e.g. first_stage=kl_f4_small)"
            )
        channels_in, channels_out = self.first_stage.image_channels, getattr(self.first_stage, "out_channels", None)
        if channels_out not in (None, channels_in):  # the loss compares x̂ with x
            raise TrainingError(
                f"first_stage.in_channels={channels_in} and first_stage.out_ch={channels_out}: stage=autoencoder "
                f"trains the first stage to reconstruct its input, so they must be equal"
            )
        self.loss = build_autoencoder_loss(options.get("loss") or {}, self.first_stage).to(self.device)
        # trainer.init_from (a fresh run only), then trainer.trainable / trainer.frozen over the
        # checkpoint's names: first_stage.*, loss.logvar, loss.discriminator.*
        init = initialize(self, {"first_stage": self.first_stage, "loss": self.loss})
        named = [*self.first_stage.named_parameters(prefix="first_stage"), *self.loss.named_parameters(prefix="loss")]
        selection = apply_patterns(named, options.get("trainable"), options.get("frozen"), what="stage=autoencoder")
        params = [p for p in self.first_stage.parameters() if p.requires_grad]
        discriminator = [p for p in self.loss.discriminator.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("trainer.trainable/trainer.frozen leave nothing of the first stage to train")
        if not discriminator:  # it trains beside the first stage, whether its term is on yet or not
            trainable = options.get("trainable")
            fix = (f"add loss.discriminator to trainer.trainable (trainer.trainable=[{', '.join(map(str, trainable))}, "
                   "loss.discriminator])" if trainable else "leave loss.discriminator out of trainer.frozen")
            raise TrainingError(
                "trainer.trainable/trainer.frozen leave nothing of the discriminator (loss.discriminator.*) to "
                f"train, and stage=autoencoder trains it beside the first stage: {fix}"
            )
        if init is not None:
            print_report(self, *init, ["the optimizers and the step counter start fresh"])
        print_selection(selection, self)
        compile_module(
            self.first_stage, options.get("compile"), device=self.device,
            backend=str(options.get("compile_backend") or "inductor"), key="trainer.compile",
            what="the first stage", purpose="train", work=int(options.get("max_steps") or 0) or None, quiet=not self.is_main,
        )
        lr = float(options["lr"])
        betas = tuple(options.get("betas") or (0.5, 0.9))
        self.opt_ae = torch.optim.Adam(params + self.loss.generator_parameters(), lr=lr, betas=betas)
        disc_lr = options.get("disc_lr")
        self.opt_disc = torch.optim.Adam(
            discriminator, lr=float(disc_lr) if disc_lr is not None else lr, betas=betas
        )
        self.ae_model: nn.Module = _Generator(self.first_stage, self.loss.logvar)
        self.disc_model: nn.Module = _Discriminator(self.loss)
        if self.world_size > 1:
            # two wrappers, one per optimizer, each over exactly the parameters its backward
            # reaches: every backward then reduces all of its wrapper's gradients, with no
            # unused parameters to search for (the generator's pass calls D unwrapped, its
            # weights frozen; D's pass sees detached reconstructions)
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ae_model = DistributedDataParallel(self.ae_model, device_ids=ids)
            self.disc_model = DistributedDataParallel(self.disc_model, device_ids=ids)

    def _check_image_size(self) -> None:
        """The factor f's check, then the discriminator's: an image smaller than the patches
        it reads would fail in the first step with the adversarial term; a ``disc_start``
        past ``max_steps`` is said once, since that run never turns the term on."""
        super()._check_image_size()
        loss, max_steps = self.loss, int(self.options["max_steps"])
        if loss.disc_factor <= 0:
            return
        if loss.disc_start >= max_steps:
            if self.is_main and self.options["progress"]:
                print(
                    f"ldmkit train {self.stage}: note: trainer.loss.disc_start={loss.disc_start} is not before "
                    f"trainer.max_steps={max_steps}: this run trains without the adversarial term",
                    file=sys.stderr,
                )
            return
        smallest = loss.discriminator.min_image_size
        for key in ("image_size", "data.image_size") if self.data is None else ("image_size",):
            size = OmegaConf.select(self.cfg, key, default=None)
            if isinstance(size, int) and size < smallest:
                layers = loss.discriminator.num_layers
                raise ConfigError(
                    f"{key}={size} is smaller than the patch discriminator reads ({smallest} px with "
                    f"trainer.loss.disc_num_layers={layers}); use larger images, fewer "
                    "trainer.loss.disc_num_layers, or trainer.loss.disc_factor=0"
                )

    def model_modules(self) -> dict[str, nn.Module]:
        return {"first_stage": self.first_stage}

    def training_modules(self) -> dict[str, nn.Module]:
        return {"loss": self.loss}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"autoencoder": self.opt_ae, "discriminator": self.opt_disc}

    def hyperparameters(self) -> dict[str, dict[str, Any]]:
        lr = float(self.options["lr"])
        disc_lr = self.options.get("disc_lr")
        betas = tuple(self.options.get("betas") or (0.5, 0.9))
        return {"autoencoder": {"lr": lr, "betas": betas},
                "discriminator": {"lr": float(disc_lr) if disc_lr is not None else lr, "betas": betas}}

    def config_keys_that_must_match(self) -> list[str]:
        # the discriminator's shape and the autoencoder optimizer's parameters (logvar) are
        # the checkpoint's too
        return ["first_stage", *(f"trainer.loss.{key}" for key in ("disc_ndf", "disc_num_layers", "learn_logvar"))]

    def config_keys_kept_from_checkpoint(self) -> list[str]:
        # loss.logvar is a parameter of the loss, saved with it, learned or not
        return ["trainer.loss.logvar_init"]

    def training_step(self, batches: Sequence[Mapping[str, Any]], step: int) -> dict[str, Tensor]:
        """One step of both optimizers over its micro-batches: each micro-batch's generator
        and discriminator losses are accumulated, then each optimizer steps once."""
        images = [batch_images(batch, channels=self.first_stage.image_channels, device=self.device) for batch in batches]
        self.first_stage.train()
        self.loss.train()
        gan = self.loss.gan_active(step)
        all_logs, weights = [], []
        for index, weight in self.micro_batches([len(x) for x in images], [self.ae_model, self.disc_model]):
            x = images[index]
            with self.autocast():  # the autoencoder's forward; every loss term below is float32
                rec, reg_loss, reg_logs = self.ae_model(x)
            rec, reg_loss = rec.float(), reg_loss.float()
            # the generator's loss back-propagates through D into x̂ only; D's weights are
            # updated by their own optimizer below
            self.loss.discriminator.requires_grad_(False)
            g_loss, logs = self.loss.generator_loss(
                x, rec, reg_loss, global_step=step, last_layer=self.first_stage.last_layer()
            )
            for param in self.opt_disc.param_groups[0]["params"]:  # not those trainer.frozen froze
                param.requires_grad_(True)
            logs = {**reg_logs, **logs}
            self.check_finite("the autoencoder loss", g_loss, logs)
            self.backward(g_loss * weight)
            if gan:  # D sees the reconstructions before this step's update, as it would in one batch
                d_loss, d_logs = self.disc_model(x, rec.detach(), global_step=step)
                logs.update(d_logs)
                self.check_finite("the discriminator loss", d_loss, logs)
                self.backward(d_loss * weight)
            all_logs.append(logs)
            weights.append(weight)
        self.optimizer_step(self.opt_ae)
        if gan:
            self.optimizer_step(self.opt_disc)
        return average_logs(all_logs, weights)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        self.first_stage.eval()
        return self.first_stage.decode(self.first_stage.encode(x))

    def validate(self, batches: list[Mapping[str, Any]]) -> dict[str, float]:
        from ldmkit.evaluation.metrics import psnr

        l1, values, count = 0.0, [], 0
        for batch in batches:
            x = batch_images(batch, channels=self.first_stage.image_channels, device=self.device)
            rec = self.reconstruct(x)
            values.append(psnr(to_unit(rec), to_unit(x)).cpu())
            l1 += float((rec - x).abs().mean()) * x.shape[0]
            count += x.shape[0]
        return {"psnr": float(torch.cat(values).mean()), "l1": l1 / count}

    def save_images(self, batch: Mapping[str, Any], path: Path) -> Tensor | None:
        from ldmkit.io import atomic_path
        from ldmkit.visualize import make_grid, save_image

        x = batch_images(batch, channels=self.first_stage.image_channels, device=self.device)[:8]
        rec = self.reconstruct(x)
        grid = make_grid(to_unit(torch.cat([x, rec])).cpu(), nrow=x.shape[0], padding=2)  # inputs over reconstructions
        with atomic_path(path) as tmp:
            save_image(grid, tmp, format="png")
        return grid


def train_autoencoder(cfg: Any, *, data: Any = None) -> Path:
    return AutoencoderTrainer(cfg, data=data).fit()


__all__ = ["AutoencoderTrainer", "train_autoencoder"]
