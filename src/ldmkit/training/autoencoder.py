"""Stage 1: train a first stage with :class:`ldmkit.losses.AutoencoderLoss`
(Rombach et al. 2022, Sec. 3.1): two Adam optimizers, one for the autoencoder (and the
loss's log-variance), one for the PatchGAN discriminator once ``disc_start`` is reached."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmkit.compiling import compile_module
from ldmkit.training.batches import batch_images, to_unit
from ldmkit.training.defaults import stage_only_keys
from ldmkit.training.engine import TRAINER_DEFAULTS, Trainer, TrainingError
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
    if kwargs.get("disc_in_channels", "auto") == "auto":
        kwargs["disc_in_channels"] = getattr(first_stage, "out_channels", first_stage.image_channels)
    try:
        return AutoencoderLoss(**kwargs)
    except TypeError as err:
        raise TrainingError(f"trainer.loss: {err}") from err


class AutoencoderTrainer(Trainer):
    stage = "autoencoder"
    default_preset = "autoencoder"
    extra_options = tuple(stage_only_keys("autoencoder"))  # loss, betas, disc_lr

    def build(self) -> None:
        cfg, options = self.cfg, self.options
        unknown = sorted(set(options) - set(TRAINER_DEFAULTS) - set(self.extra_options))
        if unknown:
            warnings.warn(f"trainer option(s) {unknown} are not used by stage=autoencoder", stacklevel=2)
        self.first_stage = build_first_stage(cfg).to(self.device)
        if not any(p.requires_grad for p in self.first_stage.parameters()):
            raise TrainingError(
                f"first_stage {cfg.first_stage.get('name')!r} has no trainable parameters; "
                f"choose a trainable first stage (e.g. first_stage=kl_f4_small)"
            )
        self.loss = build_autoencoder_loss(options.get("loss") or {}, self.first_stage).to(self.device)
        # trainer.init_from (a fresh run only), then trainer.trainable / trainer.frozen over the
        # checkpoint's names: first_stage.*, loss.logvar, loss.discriminator.*
        init = initialize(self, {"first_stage": self.first_stage, "loss": self.loss})
        named = [*self.first_stage.named_parameters(prefix="first_stage"), *self.loss.named_parameters(prefix="loss")]
        selection = apply_patterns(named, options.get("trainable"), options.get("frozen"), what="stage=autoencoder")
        params = [p for p in self.first_stage.parameters() if p.requires_grad]
        discriminator = [p for p in self.loss.discriminator.parameters() if p.requires_grad]
        if not params or not discriminator:
            raise TrainingError(
                f"trainer.trainable/trainer.frozen leave nothing of the "
                f"{'first stage' if not params else 'discriminator (loss.discriminator.*)'} to train"
            )
        if init is not None:
            print_report(self, *init, ["the optimizers and the step counter start fresh"])
        print_selection(selection, self)
        compile_module(
            self.first_stage, options.get("compile"), device=self.device,
            backend=str(options.get("compile_backend") or "inductor"), key="trainer.compile",
            what="the first stage",
        )
        lr = float(options["lr"])
        betas = tuple(options.get("betas") or (0.5, 0.9))
        self.opt_ae = torch.optim.Adam(params + self.loss.generator_parameters(), lr=lr, betas=betas)
        disc_lr = options.get("disc_lr")
        self.opt_disc = torch.optim.Adam(
            discriminator, lr=float(disc_lr) if disc_lr is not None else lr, betas=betas
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
        return ["first_stage"]

    def training_step(self, batch: Mapping[str, Any], step: int) -> dict[str, Tensor]:
        x = batch_images(batch, channels=self.first_stage.image_channels, device=self.device)
        self.first_stage.train()
        self.loss.train()
        with self.autocast():  # the autoencoder's forward; every loss term below is float32
            rec, reg_loss, reg_logs = self.first_stage(x)
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
        self.backward(g_loss, self.opt_ae)

        if self.loss.gan_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(x, rec.detach(), global_step=step)
            logs.update(d_logs)
            self.check_finite("the discriminator loss", d_loss, logs)
            self.backward(d_loss, self.opt_disc)
        return logs

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
        from torchvision.utils import make_grid, save_image

        from ldmkit.io import atomic_path

        x = batch_images(batch, channels=self.first_stage.image_channels, device=self.device)[:8]
        rec = self.reconstruct(x)
        grid = make_grid(to_unit(torch.cat([x, rec])).cpu(), nrow=x.shape[0], padding=2)  # inputs over reconstructions
        with atomic_path(path) as tmp:
            save_image(grid, tmp, format="png")
        return grid


def train_autoencoder(cfg: Any, *, data: Any = None) -> Path:
    return AutoencoderTrainer(cfg, data=data).fit()


__all__ = ["AutoencoderTrainer", "train_autoencoder"]
