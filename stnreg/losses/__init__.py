"""Similarity losses and regularizers (functional), plus names for the registration pipeline."""

from .registration import REGULARIZERS, SIMILARITIES, RegistrationLoss
from .regularizers import bending_energy, diffusion, folding_penalty
from .similarity import dice_loss, lncc_loss, mi_loss, mse_loss, ncc_loss

__all__ = [
    "REGULARIZERS",
    "SIMILARITIES",
    "RegistrationLoss",
    "bending_energy",
    "dice_loss",
    "diffusion",
    "folding_penalty",
    "lncc_loss",
    "mi_loss",
    "mse_loss",
    "ncc_loss",
]
