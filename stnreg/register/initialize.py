"""Initial alignment of a pair: centres of mass, optionally principal axes, in world coordinates."""

from __future__ import annotations

import torch
from torch import Tensor

from ..coords import Grid
from ..errors import InputError

__all__ = ["initial_matrix", "world_moments"]


def world_moments(img: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
    """Intensity-weighted world centroid ``(d,)`` and covariance ``(d, d)`` (mm²) of a ``(1, 1, *spatial)`` image.

    Computed in index space from marginal sums (one- and two-axis), then mapped to world by the
    grid's affine (centroid ``A c + o``, covariance ``A C Aᵀ``): no per-voxel array of world points.
    """
    w = img[0, 0].double()
    d = w.dim()
    total = w.sum()
    # Array axis a holds index component d - 1 - a (points are (x, y, z) ordered).
    ranges = [torch.arange(n, dtype=torch.float64, device=w.device) for n in w.shape]
    marginals = [w.sum(dim=[o for o in range(d) if o != a]) for a in range(d)]
    mean = torch.stack([(marginals[a] * ranges[a]).sum() / total for a in range(d)]).flip(0)
    centred = [ranges[a] - mean[d - 1 - a] for a in range(d)]
    cov = torch.zeros(d, d, dtype=torch.float64, device=w.device)
    for a in range(d):
        cov[d - 1 - a, d - 1 - a] = (marginals[a] * centred[a].square()).sum() / total
        for b in range(a + 1, d):
            rest = [o for o in range(d) if o not in (a, b)]
            pair = w.sum(dim=rest) if rest else w
            value = (pair * centred[a][:, None] * centred[b][None, :]).sum() / total
            cov[d - 1 - a, d - 1 - b] = cov[d - 1 - b, d - 1 - a] = value
    m = grid.index_to_world(device=w.device)
    lin = m[:d, :d]
    return lin @ mean + m[:d, d], lin @ cov @ lin.T


def _principal_axes(cov: Tensor) -> Tensor:
    """Principal axes (columns, descending variance) of a covariance ``(d, d)``."""
    _, vecs = torch.linalg.eigh(cov)
    return vecs.flip(1)


def initial_matrix(fixed: Tensor, fgrid: Grid, moving: Tensor, mgrid: Grid, init: str) -> tuple[Tensor, Tensor]:
    """Homogeneous initial map (fixed -> moving world) and the fixed centre of mass."""
    d = fgrid.ndim
    (cf, cov_f), (cm, cov_m) = world_moments(fixed, fgrid), world_moments(moving, mgrid)
    m = torch.eye(d + 1, dtype=torch.float64)
    if init == "none":
        return m, cf
    if init not in ("com", "moments"):
        raise InputError(f"init must be 'com', 'moments' or 'none', got {init!r}")
    rot = torch.eye(d, dtype=torch.float64)
    if init == "moments":
        vf, vm = _principal_axes(cov_f), _principal_axes(cov_m)
        # Eigenvector signs are arbitrary: pick those that keep the rotation closest to the identity.
        vm = vm * torch.sign((vm * vf).sum(0)).clamp(min=-1, max=1).masked_fill((vm * vf).sum(0) == 0, 1)
        rot = vm @ vf.T
        if torch.linalg.det(rot) < 0:
            vm[:, -1] = -vm[:, -1]
            rot = vm @ vf.T
    m[:d, :d] = rot
    m[:d, d] = cm - rot @ cf
    return m, cf
