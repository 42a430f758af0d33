"""Matrix families: translation, rigid, similarity, attention, affine and projective.

Each family builds a homogeneous ``(N, d+1, d+1)`` matrix ``M`` acting on column vectors
``[x, y, (z), 1]`` of domain points (``x, y, z`` order). An optional fixed ``center`` ``c`` (ITK's
"center of rotation") makes the map ``x -> L (x - c) + c + t``; it conditions optimization in world
space and never changes the set of reachable maps. Inverses and compositions are exact.

Parameter layouts (per batch item):

=============  ==========================================  =====================================
family         2D                                          3D
=============  ==========================================  =====================================
Translation    ``(tx, ty)``                                ``(tx, ty, tz)``
Rigid          ``(angle, tx, ty)``, angle in radians       ``(rx, ry, rz, tx, ty, tz)``, rotation vector
Similarity     ``(angle, scale, tx, ty)``                  ``(rx, ry, rz, scale, tx, ty, tz)``
Attention      ``(scale, tx, ty)`` (the paper's            ``(scale, tx, ty, tz)``
               co-localization transform)
Affine         ``(2, 3)`` matrix ``[A | t]`` (the paper's θ)  ``(3, 4)``
Projective     8 entries of ``H`` with ``H[2, 2] = 1``     15 entries of ``H`` with ``H[3, 3] = 1``
=============  ==========================================  =====================================

A rotation vector ``w`` rotates by ``|w|`` radians about ``w / |w|`` (``R = exp([w]_x)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ..coords import Grid, apply_affine
from .base import Composite, ParametricTransform, Transform

__all__ = [
    "Affine",
    "Attention",
    "MatrixTransform",
    "Projective",
    "Rigid",
    "Similarity",
    "Translation",
    "rotation_matrix",
]


def rotation_matrix(rot: Tensor, ndim: int) -> Tensor:
    """Rotation matrices ``(N, d, d)`` from an angle ``(N, 1)`` (2D) or a rotation vector ``(N, 3)`` (3D)."""
    if ndim == 2:
        c, s = torch.cos(rot[:, 0]), torch.sin(rot[:, 0])
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    wx, wy, wz = rot.unbind(-1)
    z = torch.zeros_like(wx)
    skew = torch.stack(
        [torch.stack([z, -wz, wy], -1), torch.stack([wz, z, -wx], -1), torch.stack([-wy, wx, z], -1)], -2
    )
    return torch.linalg.matrix_exp(skew)


@lru_cache(maxsize=32)
def _bottom_row(d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[0, ..., 0, 1]`` as a ``(1, 1, d+1)`` constant (read only)."""
    return torch.eye(d + 1, dtype=dtype, device=device)[d:].unsqueeze(0)


def _with_bottom_row(top: Tensor) -> Tensor:
    """``(N, d, d+1)`` -> homogeneous ``(N, d+1, d+1)`` with last row ``[0, ..., 0, 1]``.

    One ``cat`` instead of index assignments into a zero matrix: a warp call builds this matrix every
    time, and each assignment is an op on the host (and a launch on a GPU), forward and backward.
    """
    n, d = top.shape[0], top.shape[1]
    return torch.cat([top, _bottom_row(d, top.dtype, top.device).expand(n, 1, d + 1)], 1)


def _homogeneous(linear: Tensor, translation: Tensor) -> Tensor:
    return _with_bottom_row(torch.cat([linear, translation.unsqueeze(-1)], -1))


@lru_cache(maxsize=64)
def _centering(center: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``[I | -c]`` ``(d+1, d+1)`` and ``[0 | c]`` ``(d, d+1)`` for a centre ``c`` (read only).

    Cached by value, dtype and device: every iteration of a registration builds transforms about the
    same centre, and a cached constant costs no op and no host-to-device copy per call.
    """
    d = len(center)
    c = torch.tensor(center, dtype=torch.float64)
    uncenter = torch.eye(d + 1, dtype=torch.float64)
    uncenter[:d, d] = -c
    recenter = torch.zeros(d, d + 1, dtype=torch.float64)
    recenter[:, d] = c
    return uncenter.to(device, dtype), recenter.to(device, dtype)


class MatrixTransform(ParametricTransform):
    """Base of the matrix families; subclasses define :meth:`_core_matrix`."""

    projective = False

    def __init__(
        self,
        ndim: int,
        batch: int = 1,
        params: Tensor | None = None,
        center: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__(ndim, batch, params)
        c = torch.zeros(ndim, dtype=torch.float64) if center is None else torch.as_tensor(center).double()
        if c.shape != (ndim,):
            raise ValueError(f"center must have {ndim} components, got shape {tuple(c.shape)}")
        if isinstance(params, Tensor):
            # Beside the parameters, so that building the matrix copies nothing between devices.
            c = c.to(params.device)
        self.register_buffer("center", c, persistent=True)
        self._set_center(c)
        self._bind(params)

    def _set_center(self, center: Tensor) -> None:
        """Keep the centre's values on the host, which :meth:`with_params` passes on and
        :meth:`matrix` reads, so that neither reads a GPU tensor back per call."""
        self._center_host = tuple(center.detach().cpu().double().tolist())
        self._centered = any(self._center_host)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A loaded centre replaces the one this transform was built with.
        self._set_center(self.center)

    def _core_matrix(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matrix(self) -> Tensor:
        """Homogeneous ``(N, d+1, d+1)`` matrix in domain coordinates, centre applied."""
        m = self._core_matrix()
        if not self._centered:
            return m
        d = self.ndim
        # x -> L (x - c) + c + t: the top rows [L | t] times [I | -c], plus c in the last column.
        uncenter, recenter = _centering(self._center_host, m.dtype, m.device)
        top = m[:, :d] @ uncenter + recenter
        return torch.cat([top, m[:, d:]], 1)

    def with_params(self, params: Tensor) -> MatrixTransform:
        return type(self)(self.ndim, params=params, center=self._center_host)

    def param_scale(self, extent: float, voxel: float) -> Tensor:
        """Translations of one voxel; a rotation or linear entry of ``voxel / extent`` moves a point at
        the half-``extent`` by one voxel (a projective entry of ``voxel / extent²`` likewise)."""
        scale = torch.ones(self.param_shape, dtype=torch.float64)
        self._mark_translations(scale, extent)
        return scale * (voxel / extent)

    def _mark_translations(self, scale: Tensor, extent: float) -> None:
        """Set the translation entries of ``scale`` (``param_shape``) to ``extent``: the last ``d``
        parameters here; families with another layout override this."""
        scale[-self.ndim :] = extent

    def forward(self, points: Tensor) -> Tensor:
        self._check_points(points)
        m = self.matrix().to(points.dtype)
        if not self.projective:
            return apply_affine(m, points)
        d = self.ndim
        flat = points.reshape(points.shape[0], -1, d)
        homog = torch.cat([flat, torch.ones_like(flat[..., :1])], -1) @ m.transpose(1, 2)
        out = homog[..., :d] / homog[..., d:]
        return out.reshape((out.shape[0], *points.shape[1:]))

    def affine_matrix(self) -> Tensor | None:
        return None if self.projective else self.matrix()

    def affine_theta(self, out: Sequence[int] | Grid, source: Grid | None = None) -> Tensor | None:
        """``(N, d, d+1)`` map from output normalized to source normalized coordinates (``affine_grid``'s
        θ); ``None`` for a projective map."""
        if isinstance(out, Grid) and source is None:
            raise ValueError("a world-space output Grid needs the source Grid too")
        if self.projective:
            return None
        m = self.matrix()
        if isinstance(out, Grid):
            # Output normalized -> world -> T -> source normalized, composed in float64 so that world
            # offsets of hundreds of mm lose no precision.
            dev = self._device()
            m = source.world_to_normalized(device=dev) @ (m.double() @ out.normalized_to_world(device=dev))
        return m.to(self._dtype())[:, : self.ndim, :]

    def sampling_grid(self, out: Sequence[int] | Grid, source: Grid | None = None) -> Tensor:
        """One ``affine_grid`` call: output normalized -> domain -> source normalized, all in one matrix."""
        if isinstance(out, Grid) and source is None:
            raise ValueError("a world-space output Grid needs the source Grid too")
        if self.projective:
            return super().sampling_grid(out, source)
        theta = self.affine_theta(out, source)
        shape = tuple(out.shape if isinstance(out, Grid) else out)
        return F.affine_grid(theta, [theta.shape[0], 1, *shape], align_corners=False)

    def compose(self, other: Transform) -> Transform:
        if isinstance(other, MatrixTransform):
            m = self.matrix() @ other.matrix().to(self.matrix().dtype)
            cls = Projective if (self.projective or other.projective) else Affine
            return cls.from_matrix(m)
        return Composite([self, other])

    def inverse(self) -> MatrixTransform:
        m = torch.linalg.inv(self.matrix())
        return (Projective if self.projective else Affine).from_matrix(m)


class Translation(MatrixTransform):
    """Translation ``x -> x + t``; parameters ``(N, d)``."""

    def __init__(self, ndim: int, batch: int = 1, params: Tensor | None = None, center=None) -> None:
        self.param_shape = (ndim,)
        super().__init__(ndim, batch, params, center)

    def identity_params(self, batch: int = 1) -> Tensor:
        return torch.zeros(batch, self.ndim)

    def _core_matrix(self) -> Tensor:
        p = self.params
        eye = torch.eye(self.ndim, dtype=p.dtype, device=p.device).expand(p.shape[0], -1, -1)
        return _homogeneous(eye, p)


class Rigid(MatrixTransform):
    """Rotation then translation; parameters ``(N, 3)`` in 2D, ``(N, 6)`` in 3D (see module table)."""

    def __init__(self, ndim: int, batch: int = 1, params: Tensor | None = None, center=None) -> None:
        self.param_shape = (3 if ndim == 2 else 6,)
        super().__init__(ndim, batch, params, center)

    def identity_params(self, batch: int = 1) -> Tensor:
        return torch.zeros(batch, self.param_shape[0])

    def _core_matrix(self) -> Tensor:
        r = 1 if self.ndim == 2 else 3
        return _homogeneous(rotation_matrix(self.params[:, :r], self.ndim), self.params[:, r:])


class Similarity(MatrixTransform):
    """Isotropic scale, rotation and translation; ``(N, 4)`` in 2D, ``(N, 7)`` in 3D."""

    def __init__(self, ndim: int, batch: int = 1, params: Tensor | None = None, center=None) -> None:
        self.param_shape = (4 if ndim == 2 else 7,)
        super().__init__(ndim, batch, params, center)

    def identity_params(self, batch: int = 1) -> Tensor:
        p = torch.zeros(batch, self.param_shape[0])
        p[:, 1 if self.ndim == 2 else 3] = 1.0
        return p

    def _core_matrix(self) -> Tensor:
        r = 1 if self.ndim == 2 else 3
        rot = rotation_matrix(self.params[:, :r], self.ndim)
        scale = self.params[:, r : r + 1].unsqueeze(-1)
        return _homogeneous(rot * scale, self.params[:, r + 1 :])


class Attention(MatrixTransform):
    """Isotropic scale and translation ``x -> s x + t`` (the paper's attention transform); ``(N, d+1)``."""

    def __init__(self, ndim: int, batch: int = 1, params: Tensor | None = None, center=None) -> None:
        self.param_shape = (ndim + 1,)
        super().__init__(ndim, batch, params, center)

    def identity_params(self, batch: int = 1) -> Tensor:
        p = torch.zeros(batch, self.ndim + 1)
        p[:, 0] = 1.0
        return p

    def _core_matrix(self) -> Tensor:
        p = self.params
        eye = torch.eye(self.ndim, dtype=p.dtype, device=p.device)
        return _homogeneous(eye * p[:, :1].unsqueeze(-1), p[:, 1:])


class Affine(MatrixTransform):
    """General affine ``x -> A x + t``; parameters ``(N, d, d+1)`` = ``[A | t]`` (flat ``(N, d(d+1))`` accepted)."""

    def __init__(self, ndim: int, batch: int = 1, params: Tensor | None = None, center=None) -> None:
        self.param_shape = (ndim, ndim + 1)
        super().__init__(ndim, batch, params, center)

    def identity_params(self, batch: int = 1) -> Tensor:
        return torch.eye(self.ndim, self.ndim + 1).expand(batch, -1, -1).clone()

    def _core_matrix(self) -> Tensor:
        return _with_bottom_row(self.params)

    def _mark_translations(self, scale: Tensor, extent: float) -> None:
        scale[:, self.ndim] = extent

    @classmethod
    def from_matrix(cls, matrix: Tensor) -> Affine:
        """Wrap a homogeneous ``(N, d+1, d+1)`` matrix (its last row must be ``[0, ..., 0, 1]``)."""
        d = matrix.shape[-1] - 1
        return cls(d, params=matrix[:, :d, :])


class Projective(MatrixTransform):
    """Homography ``x -> (A x + t) / (p . x + 1)``; parameters ``(N, (d+1)^2 - 1)``, row-major ``H``."""

    projective = True

    def __init__(self, ndim: int, batch: int = 1, params: Tensor | None = None, center=None) -> None:
        self.param_shape = ((ndim + 1) ** 2 - 1,)
        super().__init__(ndim, batch, params, center)

    def identity_params(self, batch: int = 1) -> Tensor:
        return torch.eye(self.ndim + 1).reshape(-1)[:-1].expand(batch, -1).clone()

    def _mark_translations(self, scale: Tensor, extent: float) -> None:
        # The perspective row too: 1 / extent, so that its entries come out in voxel / extent².
        d = self.ndim
        for i in range(d):
            scale[i * (d + 1) + d] = extent
        scale[d * (d + 1) :] = 1.0 / extent

    def _core_matrix(self) -> Tensor:
        p = self.params
        one = torch.ones(p.shape[0], 1, dtype=p.dtype, device=p.device)
        return torch.cat([p, one], 1).reshape(p.shape[0], self.ndim + 1, self.ndim + 1)

    @classmethod
    def from_matrix(cls, matrix: Tensor) -> Projective:
        """Wrap a homogeneous ``(N, d+1, d+1)`` matrix, normalized so that ``H[d, d] = 1``."""
        d = matrix.shape[-1] - 1
        h = matrix / matrix[:, d : d + 1, d : d + 1]
        return cls(d, params=h.reshape(h.shape[0], -1)[:, :-1])
