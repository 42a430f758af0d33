"""Registration quality metrics: Dice, HD95, Jacobian statistics and landmark error, in mm where it matters.

Jacobian scheme: :mod:`stnreg.fields` (central differences inside, one-sided on the border, in
voxel units of the fixed grid after converting mm displacements through the grid's direction and
spacing). ``folding_percent`` is the share of voxels with ``det J <= 0``; ``sdlogj`` is the standard
deviation of ``log(det J)`` with ``det J`` clipped to ``[1e-9, 1e9]`` first (over all voxels).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from .coords import Grid
from .fields import jacobian_determinant, world_to_voxel_displacement

__all__ = ["centroid_distance", "dice", "hd95", "jacobian_stats", "label_values", "landmark_error"]


def label_values(*maps: Tensor) -> list[int]:
    """Sorted non-zero labels present in any of the maps."""
    vals: set[int] = set()
    for m in maps:
        vals |= {int(v) for v in torch.unique(m).tolist()}
    vals.discard(0)
    return sorted(vals)


def dice(a: Tensor, b: Tensor, labels: Sequence[int] | None = None) -> dict[int, float]:
    """Dice per label of two label maps on the same grid (any shape); absent in both gives NaN."""
    if a.shape != b.shape:
        raise ValueError(f"label maps must share a grid: {tuple(a.shape)} vs {tuple(b.shape)}")
    out = {}
    for v in labels if labels is not None else label_values(a, b):
        ma, mb = a == v, b == v
        total = int(ma.sum() + mb.sum())
        out[int(v)] = float("nan") if total == 0 else 2.0 * int((ma & mb).sum()) / total
    return out


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from the surface voxels of ``a`` to the surface of ``b``."""
    surf_a = a & ~ndimage.binary_erosion(a)
    surf_b = b & ~ndimage.binary_erosion(b)
    dist_to_b = ndimage.distance_transform_edt(~surf_b, sampling=spacing)
    return dist_to_b[surf_a]


def hd95(a: Tensor, b: Tensor, grid: Grid, labels: Sequence[int] | None = None) -> dict[int, float]:
    """95th percentile symmetric Hausdorff distance (mm) per label; NaN where a label is missing in either."""
    spacing = list(reversed(grid.spacing))  # array order for scipy
    na, nb = a.reshape(grid.shape).cpu().numpy(), b.reshape(grid.shape).cpu().numpy()
    out = {}
    for v in labels if labels is not None else label_values(a, b):
        ma, mb = na == v, nb == v
        if not ma.any() or not mb.any():
            out[int(v)] = float("nan")
            continue
        dists = np.concatenate([_surface_distances(ma, mb, spacing), _surface_distances(mb, ma, spacing)])
        out[int(v)] = float(np.percentile(dists, 95))
    return out


# Slices per block of the Jacobian determinant: a 1 mm brain's float32 field in blocks of 16 slices
# took 0.22 s against 0.7 s in one piece (the nine derivative arrays of a block stay in cache).
_JACOBIAN_BLOCK = 16


def _jacobian_determinant_blocks(disp_mm: Tensor, index_to_world: Tensor) -> Tensor:
    """``det(I + ∇u)`` of a displacement ``(1, d, *spatial)`` in mm, converted to voxel units and
    differentiated as :func:`~stnreg.fields.jacobian_determinant` does, in blocks along the first
    spatial axis. Each block is read with one neighbouring slice on either side, so that its
    derivatives are the whole field's (central inside, one-sided only at the field's own border):
    the same values, ``(1, *spatial)``."""
    n = disp_mm.shape[2]
    out = torch.empty(disp_mm.shape[:1] + disp_mm.shape[2:], dtype=disp_mm.dtype)
    for start in range(0, n, _JACOBIAN_BLOCK):
        stop = min(start + _JACOBIAN_BLOCK, n)
        lo, hi = max(start - 1, 0), min(stop + 1, n)
        det = jacobian_determinant(world_to_voxel_displacement(disp_mm[:, :, lo:hi], index_to_world))
        out[:, start:stop] = det[:, start - lo : stop - lo]
    return out


def jacobian_stats(disp_mm: Tensor, grid: Grid, linear: Tensor | None = None) -> dict[str, float]:
    """Folding and smoothness of a displacement ``(d, *shape)`` or ``(1, d, *shape)`` in mm on ``grid``.

    With ``linear``, the ``(d, d)`` linear part ``A`` of an affine map applied after the
    displacement's, the statistics are those of the composite ``x -> A (x + u(x)) + t``: its
    Jacobian is ``A (I + ∇u)``, so ``det J = det A · det(I + ∇u)`` voxel by voxel (the finite
    differences of the affine part would be exact). Computed in float32 and in blocks: on a 1 mm
    brain the determinant took 0.2 s, against 3.5 s in float64 in one piece (one thread).
    """
    disp = disp_mm if disp_mm.dim() == grid.ndim + 2 else disp_mm.unsqueeze(0)
    det = _jacobian_determinant_blocks(disp.float(), grid.index_to_world())
    if linear is not None:
        det.mul_(float(torch.linalg.det(linear.double())))
    logj = torch.log(det.clamp(1e-9, 1e9))
    return {
        "folding_percent": int((det <= 0).sum()) / det.numel() * 100,
        "sdlogj": float(logj.std()),
        "jacobian_min": float(det.min()),
        "jacobian_max": float(det.max()),
    }


def landmark_error(points_a: Tensor, points_b: Tensor) -> dict[str, float]:
    """Target registration error between corresponding world points ``(P, d)`` in mm."""
    err = (points_a.double() - points_b.double()).norm(dim=-1)
    return {"mean": float(err.mean()), "median": float(err.median()), "max": float(err.max())}


def centroid_distance(a: Tensor, b: Tensor, grid: Grid, labels: Sequence[int] | None = None) -> dict[int, float]:
    """Distance (mm) between the world centroids of each label in two maps on the same grid."""
    idx_to_world = grid.index_to_world()
    out = {}
    for v in labels if labels is not None else label_values(a, b):
        cents = []
        for m in (a.reshape(grid.shape) == v, b.reshape(grid.shape) == v):
            nz = torch.nonzero(m).double()
            if nz.numel() == 0:
                cents = None
                break
            ijk = nz.mean(0).flip(0)
            cents.append(idx_to_world[: grid.ndim, : grid.ndim] @ ijk + idx_to_world[: grid.ndim, grid.ndim])
        out[int(v)] = float("nan") if cents is None else float((cents[0] - cents[1]).norm())
    return out
