"""Per-image fidelity: PSNR and SSIM of uint8 images."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of uint8 images [B, ...] (peak 255), one value per image."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid region)
    of uint8 images [B, C, H, W], averaged over channels and positions: one value per image, in float64 (the
    variances are differences of blurred squares up to 255^2: float32 would keep ~5 digits of them)."""
    c = a.shape[1]
    window = _gaussian_window().to(a.device).expand(c, 1, 11, 11)
    x, y = a.double(), b.double()

    def blur(t):
        return F.conv2d(t, window, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return ssim.flatten(1).mean(1)
