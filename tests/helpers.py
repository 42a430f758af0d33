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


def quiet_trainer(**kwargs):
    """A CPU Lightning Trainer without logger, checkpoints, progress bar or sanity validation."""
    import lightning as L

    opts = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**(opts | kwargs))
