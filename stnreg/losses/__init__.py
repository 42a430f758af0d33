"""Similarity losses and regularizers (functional), plus names for the registration pipeline."""

from .regularizers import bending_energy, diffusion, folding_penalty
from .similarity import dice_loss, lncc_loss, mi_loss, mse_loss, ncc_loss

SIMILARITIES = {"mse": mse_loss, "ncc": ncc_loss, "lncc": lncc_loss, "mi": mi_loss}
REGULARIZERS = {"diffusion": diffusion, "bending": bending_energy, "folding": folding_penalty}

__all__ = [
    "REGULARIZERS",
    "SIMILARITIES",
    "bending_energy",
    "dice_loss",
    "diffusion",
    "folding_penalty",
    "lncc_loss",
    "mi_loss",
    "mse_loss",
    "ncc_loss",
]
