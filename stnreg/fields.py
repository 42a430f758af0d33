"""Spatial derivatives of displacement fields: the one finite-difference scheme stnreg uses.

Scheme (stated, because Jacobian metrics are defined inconsistently across tools): derivatives
along each axis by ``torch.gradient`` with unit spacing in voxels, i.e. central differences
``(u[i+1] - u[i-1]) / 2`` inside and one-sided first-order differences on the border voxels, the
same as ``numpy.gradient``. Fields are ``(N, d, *spatial)`` with ``(x, y, z)`` channels in voxel
units of their own grid.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["displacement_gradient", "jacobian_determinant", "world_to_voxel_displacement"]


def displacement_gradient(disp: Tensor) -> Tensor:
    """``∂u_c / ∂x_a`` as ``(N, d, d, *spatial)`` (component ``c``, axis ``a``; both in ``x, y, z`` order)."""
    d = disp.shape[1]
    # Spatial dims of (N, d, *spatial): x is the last one.
    dims = [disp.dim() - 1 - a for a in range(d)]
    grads = torch.gradient(disp, dim=dims)
    return torch.stack(grads, dim=2)


def jacobian_determinant(disp: Tensor) -> Tensor:
    """``det(I + ∇u)`` per voxel, ``(N, *spatial)``, for a displacement in voxel units."""
    d = disp.shape[1]
    jac = displacement_gradient(disp) + torch.eye(d, dtype=disp.dtype, device=disp.device).view(1, d, d, *[1] * d)
    jac = torch.movedim(torch.movedim(jac, 1, -1), 1, -1)
    return torch.linalg.det(jac)


def world_to_voxel_displacement(disp_mm: Tensor, index_to_world: Tensor) -> Tensor:
    """Convert a displacement ``(N, d, *spatial)`` in mm into voxel units of its grid.

    ``index_to_world`` is the grid's homogeneous map (:meth:`Grid.index_to_world`); vectors
    transform by the inverse of its linear part (direction and spacing).
    """
    d = disp_mm.shape[1]
    inv = torch.linalg.inv(index_to_world[:d, :d].double()).to(disp_mm.dtype).to(disp_mm.device)
    return torch.einsum("ab,nb...->na...", inv, disp_mm)
