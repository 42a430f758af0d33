"""Regularizers of displacement or velocity fields ``(N, d, *spatial)`` in voxel units of their grid."""

from __future__ import annotations

import torch
from torch import Tensor

from ..fields import jacobian_determinant

__all__ = ["bending_energy", "diffusion", "folding_penalty"]


def _diff(x: Tensor, dim: int) -> Tensor:
    return x.narrow(dim, 1, x.shape[dim] - 1) - x.narrow(dim, 0, x.shape[dim] - 1)


def diffusion(field: Tensor) -> Tensor:
    """Mean squared first forward differences, summed over axes (the diffusion / membrane energy)."""
    d = field.dim() - 2
    return sum(_diff(field, 2 + a).square().mean() for a in range(d) if field.shape[2 + a] > 1)


def bending_energy(field: Tensor) -> Tensor:
    """Mean thin-plate bending energy: squared second differences, mixed terms counted twice."""
    d = field.dim() - 2
    total = field.new_zeros(())
    for a in range(d):
        for b in range(a, d):
            if field.shape[2 + a] < 3 and a == b:
                continue
            second = _diff(_diff(field, 2 + a), 2 + b)
            total = total + (1 if a == b else 2) * second.square().mean()
    return total


def folding_penalty(disp: Tensor, eps: float = 0.0) -> Tensor:
    """Mean ``relu(eps - det J)``: penalizes folded (non-positive Jacobian) voxels of a displacement."""
    return torch.relu(eps - jacobian_determinant(disp)).mean()
