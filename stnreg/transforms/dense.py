"""Dense displacement fields and stationary velocity fields (diffeomorphic by scaling and squaring).

Both store a field ``(N, d, *shape)`` with ``(x, y, z)`` channels on a lattice: the voxel centres of
``shape`` in the field's normalized coordinates. ``domain`` maps the transform's point space to
those normalized coordinates (``None``: the point space is that normalized space, the Spatial
Transformer case; world space: ``grid.world_to_normalized()``). Vectors are in point-space units
(normalized units, or mm in world space). Between lattice points the field is interpolated
linearly, with border extension outside.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..coords import Grid, apply_affine, index_to_normalized_matrix
from ..fast.dispatch import try_fused_displaced
from ..fields import world_to_voxel_displacement
from ..sampler import sample
from .base import (
    ParametricTransform,
    Transform,
    _cached_lattice_channels_first,
    index_to_domain,
    lattice_pixel_map,
    output_lattice,
)

__all__ = ["Displacement", "StationaryVelocity", "compose_fields", "scaling_and_squaring"]


def _channels_last(field: Tensor) -> Tensor:
    return torch.movedim(field, 1, -1)


def _channels_first(field: Tensor) -> Tensor:
    return torch.movedim(field, -1, 1)


def _lattice_plus(vec: Tensor) -> Tensor:
    """Normalized sampler coordinates ``(N, *shape, d)`` of the lattice points moved by ``vec``
    ``(N, d, *shape)`` (normalized units): a channels-last view of a channels-first sum, which
    ``grid_sample`` reads as fast as a contiguous grid."""
    return _channels_last(_cached_lattice_channels_first(tuple(vec.shape[2:]), vec.dtype, vec.device) + vec)


def _sample_displaced(field: Tensor, vec: Tensor) -> Tensor:
    """``field`` ``(N, C, *shape)`` read (linear, border) at its own lattice points moved by ``vec``
    ``(N, d, *shape)`` in its normalized units; ``(N, C, *shape)``, differentiable in both."""
    out = try_fused_displaced(field, vec)  # in 3D on the CPU the kernels read ``vec`` in place
    if out is None:
        out = sample(field, _lattice_plus(vec).to(field.dtype), "linear", "border")
    return out


def _interpolate(field: Tensor, u: Tensor) -> Tensor:
    """Field ``(N, d, *shape)`` at field-normalized points ``u`` ``(N, ..., d)``, channels last."""
    d = u.shape[-1]
    lead = u.shape[:-1]
    if u.dim() == d + 2:
        # Already a d-dimensional lattice of points: sampled as such, the sampler's fast layout.
        return _channels_last(sample(field, u.to(field.dtype), "linear", "border"))
    # The sampler wants a d-dimensional point lattice; any point layout is a (P, 1[, 1]) lattice.
    pts = u.reshape(u.shape[0], -1, *([1] * (d - 1)), d).to(field.dtype)
    out = sample(field, pts, "linear", "border")
    return out.reshape(out.shape[0], d, -1).transpose(1, 2).reshape(out.shape[0], *lead[1:], d)


def compose_fields(first: Tensor, second: Tensor, vector_map: Tensor) -> Tensor:
    """Displacement of ``x -> x + a(x) + b(x + a(x))`` on the fields' own lattice.

    Args:
        first: ``a``, ``(N, d, *shape)``; applied to the lattice points first.
        second: ``b``, ``(N, d, *shape)``, same lattice.
        vector_map: ``(d, d)`` linear map from field units to the lattice's normalized units
            (the linear part of ``domain``).
    """
    return first + _sample_displaced(second, _map_vectors(first, vector_map))


def _map_vectors(field: Tensor, matrix: Tensor) -> Tensor:
    """``matrix`` ``(d, d)`` applied to every vector of ``field`` ``(N, d, *shape)``, channels first.

    Written as sums of scaled channels: a batched ``(…, 3) @ (3, 3)`` matmul over a lattice was
    measured several times slower on CPU than the nine channel operations.
    """
    m = matrix.to(field.dtype)
    d = field.shape[1]
    return torch.stack([sum(m[i, j] * field[:, j] for j in range(d)) for i in range(d)], 1)


def scaling_and_squaring(velocity: Tensor, steps: int, vector_map: Tensor) -> Tensor:
    """``exp(v)`` as a displacement: ``u = v / 2^steps``, then ``steps`` times ``u <- u + u(x + u)``.

    The squarings run in the lattice's normalized units (``vector_map`` applied once before and
    its inverse once after), where a composition needs no change of units: the same map as
    composing in field units, with two vector maps instead of one per step.

    Args:
        velocity: ``(N, d, *shape)``.
        steps: number of squarings (7 is VoxelMorph's default; more is smoother for large fields).
        vector_map: ``(d, d)`` linear map from field units to the lattice's normalized units.
    """
    m = vector_map.to(velocity.dtype)
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    u = _map_vectors(velocity, m / (2**steps))
    for _ in range(steps):
        u = u + _sample_displaced(u, u)
    return u if torch.equal(m, eye) else _map_vectors(u, torch.linalg.inv(m))


class Displacement(ParametricTransform):
    """Dense displacement ``T(x) = x + u(x)``; parameters ``(N, d, *shape)``, ``(x, y, z)`` channels.

    Args:
        shape: array-order lattice shape of the field.
        domain: ``(d+1, d+1)`` map from point space to the field's normalized coordinates.
    """

    def __init__(
        self,
        shape: Sequence[int],
        batch: int = 1,
        params: Tensor | None = None,
        domain: Tensor | None = None,
    ) -> None:
        shape = tuple(int(s) for s in shape)
        d = len(shape)
        self.param_shape = (d, *shape)
        super().__init__(d, batch, params)
        self.shape = shape
        dom = torch.eye(d + 1, dtype=torch.float64) if domain is None else torch.as_tensor(domain).double()
        if dom.shape != (d + 1, d + 1):
            raise ValueError(f"domain must be a ({d + 1}, {d + 1}) homogeneous matrix, got {tuple(dom.shape)}")
        # A CPU copy for the questions asked every call (same frame? identity units?) and for
        # with_params, so that none of them reads a GPU tensor back.
        self._domain_host = dom.detach().to("cpu", torch.float64, copy=True)
        if isinstance(params, Tensor):
            dom = dom.to(params.device)
        self.register_buffer("domain", dom)
        self._bind(params)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._domain_host = self.domain.detach().to("cpu", torch.float64, copy=True)

    @classmethod
    def for_grid(cls, grid: Grid, batch: int = 1) -> Displacement:
        """A zero displacement (in mm) on a world-space image grid."""
        return cls(grid.shape, batch=batch, domain=grid.world_to_normalized())

    def identity_params(self, batch: int = 1) -> Tensor:
        return torch.zeros(batch, *self.param_shape)

    def with_params(self, params: Tensor) -> Displacement:
        return type(self)(self.shape, params=params, domain=self._domain_host)

    def field(self) -> Tensor:
        """The displacement ``(N, d, *shape)`` on the lattice, in point-space units."""
        return self.params

    def _vector_map(self) -> Tensor:
        """``(d, d)`` map from point-space vector units to field-normalized units, on the CPU (its
        entries scale field channels as scalars on any device)."""
        return self._domain_host[: self.ndim, : self.ndim].to(self._dtype())

    def _shares_frame(self, index_to_domain: Tensor, shape: Sequence[int]) -> bool:
        """Whether a lattice of ``shape`` covers the field's own extent: its voxel centres are
        ``lattice(shape)`` in the field's normalized coordinates (a resampled copy of its grid).
        ``index_to_domain``: the lattice's ``(d+1, d+1)`` float64 index-to-domain map, on the CPU."""
        frame = index_to_normalized_matrix(tuple(shape))
        return bool(torch.allclose(self._domain_host @ index_to_domain, frame, atol=1e-9))

    def field_on(self, shape: Sequence[int]) -> Tensor:
        """The displacement ``(N, d, *shape)`` at the voxel centres of a lattice of ``shape`` that
        covers the field's extent (see :meth:`_shares_frame`), in point-space units."""
        field = self.field()
        if tuple(shape) == self.shape:
            return field
        # The same points the sampler would read (voxel centres, border clamped), by the separable
        # resize: measured faster than gathering, backward included, in 3D.
        mode = "bilinear" if self.ndim == 2 else "trilinear"
        return F.interpolate(field, size=tuple(shape), mode=mode, align_corners=False)

    def forward(self, points: Tensor) -> Tensor:
        self._check_points(points)
        u = apply_affine(self.domain.to(points.device), points)
        return points + _interpolate(self.field(), u).to(points.dtype)

    fast_warp_kind = "field"
    lattice_field = True

    def fast_warp_args(self, out: Sequence[int] | Grid, pixel_map: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(field, K, R)`` of :func:`~stnreg.fast.fused_field_warp` when the output lattice covers the
        field's extent (a resampled copy of its grid), else ``None``.

        Input pixel position of output index ``i`` = ``pixel_map`` applied to ``p + u(p)`` with ``p``
        its lattice point: ``K`` maps ``i`` to the pixel position of ``p``, ``R`` ``u`` to pixels.
        """
        shape = tuple(out.shape if isinstance(out, Grid) else out)
        if not self._shares_frame(index_to_domain(out), shape):
            return None
        return self.field_on(shape), *lattice_pixel_map(out, pixel_map)

    def regularizer_field(self, params: Tensor) -> Tensor:
        """The field in voxels of its own grid, ``(N, d, *shape)`` (a velocity's for ``StationaryVelocity``)."""
        inv = torch.linalg.inv(self.domain.to(params.device))
        # The field's own index->world map: normalized->world composed with index->normalized.
        idx_to_world = inv @ index_to_normalized_matrix(self.shape, device=params.device)
        return world_to_voxel_displacement(params, idx_to_world)

    def mapped_lattice(self, out: Sequence[int] | Grid) -> Tensor:
        pts, _ = output_lattice(out, self._dtype(), self._device())
        shape = tuple(pts.shape[1:-1])
        if self._shares_frame(index_to_domain(out), shape):
            field = self.field_on(shape)
            if isinstance(out, Grid):
                return _channels_last(_channels_first(pts) + field)
            return _lattice_plus(field)
        return self(pts)

    def compose(self, other: Transform) -> Transform:
        """``self ∘ other``; with another field on the same lattice the result is one field."""
        same_frame = isinstance(other, Displacement) and torch.equal(other._domain_host, self._domain_host)
        if same_frame and other.shape == self.shape:
            # x -> other(x) then self: u(x) = b(x) + a(x + b(x)).
            field = compose_fields(other.field(), self.field(), self._vector_map())
            return Displacement(self.shape, params=field, domain=self._domain_host)
        return super().compose(other)


class StationaryVelocity(Displacement):
    """Diffeomorphic ``T = exp(v)`` of a stationary velocity field ``v`` ``(N, d, *shape)``.

    Args:
        steps: scaling-and-squaring steps.
    """

    def __init__(
        self,
        shape: Sequence[int],
        batch: int = 1,
        params: Tensor | None = None,
        domain: Tensor | None = None,
        steps: int = 7,
    ) -> None:
        super().__init__(shape, batch, params, domain)
        self.steps = int(steps)

    def with_params(self, params: Tensor) -> StationaryVelocity:
        return StationaryVelocity(self.shape, params=params, domain=self._domain_host, steps=self.steps)

    def field(self) -> Tensor:
        """The displacement ``exp(v) - id`` ``(N, d, *shape)`` on the lattice."""
        return scaling_and_squaring(self.params, self.steps, self._vector_map())

    def inverse(self) -> StationaryVelocity:
        """``exp(-v)``: the exact inverse of the continuous flow."""
        return self.with_params(-self.params)
