"""Per-image reconstruction metrics for images in [0, 1]: PSNR and SSIM (Wang et al. 2004),
computed by torchmetrics (``torchmetrics.functional.image``) with the parameters below.

ldmkit's SSIM is scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=True, data_range=1)``: an 11×11 Gaussian window (sigma 1.5), the mean
over the windows that lie inside the image (no padding), covariances with the N-1
normalization (N = 121 window pixels), averaged over channels. torchmetrics' defaults differ
in two places, so :func:`ssim` adapts them:

* torchmetrics reflect-pads the image and averages over every pixel; ldmkit asks for the full
  SSIM map (``return_full_image=True``) and crops the 5-pixel border whose windows overlap
  the padding.
* torchmetrics divides the covariances by N; scaling all of them by N/(N-1) equals dividing
  ``C2`` by N/(N-1) (the luminance term has no covariance), so ldmkit passes
  ``k2 * sqrt((N-1)/N)``.

torchmetrics is imported on first use: importing it costs seconds (it pulls in torchvision's
model zoo), which a module that only names these functions should not pay.
"""

from __future__ import annotations

import math

from torch import Tensor


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two B×C×H×W batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor, *, data_range: float = 1.0, eps: float = 1e-10) -> Tensor:
    """``10 log10(data_range^2 / MSE)`` per image (B,), MSE over C, H, W (float64 inside);
    identical images score ``10 log10(data_range^2 / eps)`` instead of infinity."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_pair(x, y)
    values = peak_signal_noise_ratio(x.double(), y.double(), data_range=data_range, reduction="none", dim=(1, 2, 3))
    return values.clamp_max(10.0 * math.log10(data_range**2 / eps)).float()


def ssim(
    x: Tensor,
    y: Tensor,
    *,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Mean SSIM per image (B,) over the windows inside the image (module docstring).
    torchmetrics sizes a Gaussian window from ``sigma`` (``2 * int(3.5 sigma + 0.5) + 1``:
    11 for 1.5), so ``window_size`` must be that size."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(x, y)
    if window_size != 2 * int(3.5 * sigma + 0.5) + 1:
        raise ValueError(
            f"window_size {window_size} does not fit sigma {sigma}: torchmetrics' Gaussian window "
            f"for it is {2 * int(3.5 * sigma + 0.5) + 1} pixels"
        )
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size}, got {tuple(x.shape[-2:])}")
    n = window_size * window_size
    _, ssim_map = structural_similarity_index_measure(
        x.double(), y.double(), gaussian_kernel=True, sigma=sigma, kernel_size=window_size,
        data_range=data_range, k1=k1, k2=k2 * math.sqrt((n - 1) / n), reduction="none",
        return_full_image=True,
    )
    border = window_size // 2
    return ssim_map[..., border:-border, border:-border].flatten(1).mean(1).float()
