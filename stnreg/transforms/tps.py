"""Thin-plate spline transforms in 2D and 3D.

The map is ``T(x) = x + a_0 + A x + sum_k w_k U(|x - c_k|)`` over ``K`` fixed control points
``c_k``, fitted so that ``T(c_k) = y_k`` (exactly for ``regularization = 0``, smoothed otherwise).
Kernels: ``U(r) = r^2 log r^2`` in 2D with ``U(0) = 0`` set explicitly (``0 log 0`` is NaN), and the
3D biharmonic kernel ``U(r) = r``.

Parameters are the target positions ``y`` of the control points, ``(N, K, d)`` in ``(x, y, z)``
order, so the identity parameters are the control points themselves (the Spatial Transformer's
identity bias). Internally the spline is fitted to the displacements ``y - c``, so identity
parameters give exactly the identity map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._checks import check_finite
from ..coords import Grid
from .base import ParametricTransform, index_to_domain

__all__ = ["ThinPlateSpline", "tps_kernel", "uniform_control_points"]


def tps_kernel(sq_dist: Tensor, ndim: int) -> Tensor:
    """Radial basis ``U`` from squared distances; ``U(0) = 0`` with a finite gradient."""
    positive = sq_dist > 0
    safe = torch.where(positive, sq_dist, torch.ones_like(sq_dist))
    if ndim == 2:
        return sq_dist * torch.log(safe)
    return torch.where(positive, torch.sqrt(safe), torch.zeros_like(sq_dist))


def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """Squared distances ``(..., P, K)`` between points ``(..., P, d)`` and ``(K, d)``."""
    # One axis at a time: never materializes the (..., P, K, d) differences.
    out = (a[..., :1] - b[:, 0]).square()
    for i in range(1, b.shape[1]):
        out += (a[..., i : i + 1] - b[:, i]).square()
    return out


def uniform_control_points(shape: Sequence[int], extent: float = 1.0) -> Tensor:
    """A regular lattice of control points ``(K, d)`` spanning ``[-extent, extent]`` per axis.

    Args:
        shape: points per axis, array order (``(4, 4)`` gives the paper's 16-point 2D TPS).
    """
    axes = [torch.linspace(-extent, extent, int(n)) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(list(reversed(mesh)), -1).reshape(-1, len(shape))


class ThinPlateSpline(ParametricTransform):
    """Thin-plate spline through ``K`` control points; parameters ``(N, K, d)`` (target positions).

    Args:
        control_points: ``(K, d)`` control points in domain coordinates (``K >= d + 1``, not all
            on one hyperplane).
        regularization: ``λ >= 0`` on the kernel's diagonal (with the sign that makes the system
            definite: ``+λ`` in 2D, ``-λ`` for the 3D kernel ``U = r``); larger is smoother and no
            longer interpolates the targets exactly.
    """

    def __init__(
        self,
        control_points: Tensor,
        batch: int = 1,
        params: Tensor | None = None,
        regularization: float = 0.0,
    ) -> None:
        cp = torch.as_tensor(control_points, dtype=torch.float64)
        if cp.dim() != 2 or cp.shape[1] not in (2, 3):
            raise ValueError(f"control_points must be (K, 2) or (K, 3), got {tuple(cp.shape)}")
        check_finite(cp, "control_points")
        k, d = cp.shape
        if k < d + 1:
            raise ValueError(f"a {d}D thin-plate spline needs at least {d + 1} control points, got {k}")
        if regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {regularization}")
        self.param_shape = (k, d)
        super().__init__(d, batch, params)
        self.regularization = float(regularization)
        system = torch.zeros(k + d + 1, k + d + 1, dtype=torch.float64)
        # The 3D kernel U = r is conditionally *negative* definite (the 2D one positive), so λ enters
        # with the opposite sign there: the same fit as U = -r + λI, whose interpolant is unchanged.
        # With +λ the 3D system passed through a singular matrix near λ = 1 and did not smooth.
        smoothing = self.regularization if d == 2 else -self.regularization
        system[:k, :k] = tps_kernel(_sq_dist(cp, cp), d) + smoothing * torch.eye(k, dtype=torch.float64)
        poly = torch.cat([torch.ones(k, 1, dtype=torch.float64), cp], 1)
        system[:k, k:] = poly
        system[k:, :k] = poly.T
        if torch.linalg.matrix_rank(system) < k + d + 1:
            raise ValueError("control points are degenerate (collinear/coplanar): the TPS system is singular")
        # Only the columns that multiply the targets are needed; the affine constraints' right side is 0.
        # Kept in float64 (cast at use) so that float64 parameters get a float64-exact fit.
        self.register_buffer("solve", torch.linalg.inv(system)[:, :k])
        self.register_buffer("control_points", cp)
        self._bind(params)

    def identity_params(self, batch: int = 1) -> Tensor:
        return self.control_points.to(torch.get_default_dtype()).expand(batch, -1, -1).clone()

    def with_params(self, params: Tensor) -> ThinPlateSpline:
        new = ThinPlateSpline.__new__(ThinPlateSpline)
        ParametricTransform.__init__(new, self.ndim, params.shape[0], params)
        new.param_shape = self.param_shape
        new.regularization = self.regularization
        new.register_buffer("solve", self.solve)
        new.register_buffer("control_points", self.control_points)
        new._bind(params)
        return new

    def coefficients(self) -> Tensor:
        """``(N, K + d + 1, d)``: kernel weights ``w`` then the affine part ``[a_0; A^T]`` of the displacement."""
        disp = self.params - self.control_points.to(self.params.dtype)
        return self.solve.to(disp.dtype) @ disp

    fast_warp_kind = "tps"

    def fast_warp_args(self, out: Sequence[int] | Grid, pixel_map: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(coef, control_points, P, M)`` of :func:`~stnreg.fast.fused_tps_warp`: ``P`` ``(d, d+1)``
        maps an output index to its domain point, ``M`` ``(N, d, d+1)`` a mapped point to the input pixel."""
        d = self.ndim
        return self.coefficients(), self.control_points, index_to_domain(out)[:d], pixel_map[:, :d, :]

    def forward(self, points: Tensor) -> Tensor:
        self._check_points(points)
        k, d = self.param_shape
        coef = self.coefficients().to(points.dtype)
        flat = points.reshape(points.shape[0], -1, d)
        cp = self.control_points.to(points.dtype)
        # Points shared by the batch (an expanded grid, as the STN's sampling grid) need one basis.
        shared = flat.shape[0] > 1 and flat.stride(0) == 0
        basis = tps_kernel(_sq_dist(flat[:1] if shared else flat, cp), d)
        disp = basis @ coef[:, :k] + coef[:, k : k + 1] + flat @ coef[:, k + 1 :]
        return (flat + disp).reshape((disp.shape[0], *points.shape[1:]))
