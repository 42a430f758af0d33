"""Shared test fixtures that are plain functions."""

import torch

from stnreg.sampler import gaussian_blur


def smooth_image(shape, seed=0, dtype=torch.float64, sigma=2.5):
    """A smooth random image ``(1, 1, *shape)`` in [0, 1], varying on a scale of ``sigma`` voxels."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 1, *shape, generator=g, dtype=torch.float64)
    img = gaussian_blur(noise, torch.full((1, len(shape)), float(sigma), dtype=torch.float64))
    img = (img - img.min()) / (img.max() - img.min())
    return img.to(dtype)
