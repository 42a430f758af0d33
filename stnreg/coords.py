"""The coordinate contract of stnreg. Every other module gets coordinates from here.

Convention
----------
* **Images** are ``(N, C, H, W)`` or ``(N, C, D, H, W)`` in torch's array order.
* **Points and vectors** always carry their components in ``(x, y[, z])`` order, where ``x`` runs
  along the *last* array axis (``W``), ``y`` along ``H`` and ``z`` along ``D``. This is the order
  of ``torch.nn.functional.grid_sample``'s grid and of ITK's continuous index ``(i, j, k)``.
  Point fields are channels-last ``(N, *spatial, d)``; displacement fields and the parameters of
  field transforms are channels-first ``(N, d, *spatial)``, channel 0 being ``x``.
* Three spaces:

  - **index** (voxel) space: the centre of voxel ``[..., j, i]`` sits at ``(i, j)``; units are voxels.
    This is ITK's continuous index.
  - **normalized** space: ``-1`` and ``+1`` are the *outer edges* of the first and last voxels, i.e.
    ``u = (2 i + 1) / n - 1``. This is ``grid_sample``/``affine_grid`` with
    ``align_corners=False`` (torch's default), so an identity map between two images of different
    sizes preserves their extent, which is what a Spatial Transformer needs.
  - **world** space: millimetres, ``p = origin + direction @ (spacing * index)``, exactly ITK's
    physical space (LPS for medical images read through ITK/SimpleITK).

Relation to other libraries: Kornia's ``normalize_pixel_coordinates`` and MONAI's ``Warp`` use the
corner-aligned map ``u = 2 i / (n - 1) - 1`` (``align_corners=True``); MONAI's DDF stores channels in
array order ``(z, y, x)`` and in voxels; VoxelMorph's flow is in voxels, array order. Use
:func:`array_order_to_xyz` and :func:`displacement_index_to_normalized` to bring such fields into
stnreg's convention. The sampler (:mod:`stnreg.sampler`) consumes normalized coordinates only.

All maps between spaces are homogeneous ``(d + 1, d + 1)`` matrices in ``(x, y, z)`` order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ._checks import check_ndim

__all__ = [
    "Grid",
    "apply_affine",
    "array_order_to_xyz",
    "displacement_index_to_normalized",
    "displacement_normalized_to_index",
    "index_to_normalized",
    "index_to_normalized_matrix",
    "lattice",
    "normalized_to_index",
    "normalized_to_index_matrix",
    "xyz_to_array_order",
]


def _sizes_xyz(shape: Sequence[int]) -> list[int]:
    """Array-order shape ``(D, H, W)`` to sizes in ``(x, y, z)`` order."""
    return [int(s) for s in reversed(tuple(shape))]


def index_to_normalized_matrix(
    shape: Sequence[int], dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """Homogeneous ``(d+1, d+1)`` map from index to normalized coordinates for an array-order ``shape``."""
    sizes = _sizes_xyz(shape)
    check_ndim(len(sizes))
    return _diagonal_affine([2.0 / n for n in sizes], [1.0 / n - 1.0 for n in sizes], dtype, device)


def normalized_to_index_matrix(
    shape: Sequence[int], dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """Homogeneous ``(d+1, d+1)`` map from normalized to index coordinates for an array-order ``shape``."""
    sizes = _sizes_xyz(shape)
    check_ndim(len(sizes))
    return _diagonal_affine([n / 2.0 for n in sizes], [(n - 1) / 2.0 for n in sizes], dtype, device)


def _diagonal_affine(
    scale: Sequence[float], offset: Sequence[float], dtype: torch.dtype, device: torch.device | str | None
) -> Tensor:
    """Homogeneous ``diag(scale)`` plus ``offset``, built in one tensor call: element by element
    it took 25 µs, and every warp by a field asks for two (a whole 256x256 warp takes 400 µs)."""
    d = len(scale)
    rows = [[scale[i] if j == i else (offset[i] if j == d else 0.0) for j in range(d + 1)] for i in range(d)]
    return torch.tensor([*rows, [0.0] * d + [1.0]], dtype=dtype, device=device)


def apply_affine(matrix: Tensor, points: Tensor) -> Tensor:
    """Apply homogeneous affine ``matrix`` to ``points``.

    Args:
        matrix: ``(d+1, d+1)`` or batched ``(N, d+1, d+1)``.
        points: ``(..., d)``, or ``(N, ..., d)`` when ``matrix`` is batched (``N`` may be 1 on either side).

    Returns:
        Points of the same layout, ``(x, y, z)`` order.
    """
    d = points.shape[-1]
    matrix = matrix.to(points.dtype)
    lin, off = matrix[..., :d, :d], matrix[..., :d, d]
    if matrix.dim() == 2:
        # One fused GEMM + bias: the matmul and a separate add wrote two point-sized tensors
        # (215 ms against 122 ms for a float64 1 mm brain lattice, one thread).
        return torch.addmm(off, points.reshape(-1, d), lin.transpose(0, 1)).reshape(points.shape)
    n = matrix.shape[0]
    flat = points.reshape(points.shape[0], -1, d)
    out = torch.baddbmm(off.unsqueeze(1), flat.expand(n, -1, -1) if flat.shape[0] == 1 else flat, lin.transpose(1, 2))
    return out.reshape((out.shape[0], *points.shape[1:]))


def index_to_normalized(points: Tensor, shape: Sequence[int]) -> Tensor:
    """Index-space points ``(..., d)`` (``x, y, z`` order) to normalized coordinates for array-order ``shape``."""
    sizes = torch.tensor(_sizes_xyz(shape), dtype=points.dtype, device=points.device)
    return (2.0 * points + 1.0) / sizes - 1.0


def normalized_to_index(points: Tensor, shape: Sequence[int]) -> Tensor:
    """Normalized points ``(..., d)`` to index space for array-order ``shape``."""
    sizes = torch.tensor(_sizes_xyz(shape), dtype=points.dtype, device=points.device)
    return ((points + 1.0) * sizes - 1.0) / 2.0


def displacement_index_to_normalized(field: Tensor) -> Tensor:
    """Displacement ``(N, d, *spatial)`` in voxels (``x, y, z`` channels) to normalized units on its own grid."""
    sizes = torch.tensor(_sizes_xyz(field.shape[2:]), dtype=field.dtype, device=field.device)
    return field * (2.0 / sizes).view(1, -1, *([1] * (field.dim() - 2)))


def displacement_normalized_to_index(field: Tensor) -> Tensor:
    """Displacement ``(N, d, *spatial)`` in normalized units to voxels on its own grid."""
    sizes = torch.tensor(_sizes_xyz(field.shape[2:]), dtype=field.dtype, device=field.device)
    return field * (sizes / 2.0).view(1, -1, *([1] * (field.dim() - 2)))


def array_order_to_xyz(field: Tensor) -> Tensor:
    """Reverse the channels of a ``(N, d, *spatial)`` field stored in array order (MONAI, VoxelMorph)."""
    return field.flip(1)


def xyz_to_array_order(field: Tensor) -> Tensor:
    """Reverse the channels of a ``(N, d, *spatial)`` field from ``(x, y, z)`` into array order."""
    return field.flip(1)


def lattice(
    shape: Sequence[int],
    space: str = "normalized",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Voxel-centre points of an array-order ``shape``, as ``(*shape, d)`` in ``(x, y, z)`` order.

    Args:
        shape: ``(H, W)`` or ``(D, H, W)``.
        space: ``"normalized"`` (``align_corners=False``) or ``"index"``.
    """
    check_ndim(len(shape))
    if space not in ("normalized", "index"):
        raise ValueError(f"space must be 'normalized' or 'index', got {space!r}")
    axes = []
    for n in shape:
        idx = torch.arange(int(n), dtype=dtype, device=device)
        axes.append((2.0 * idx + 1.0) / n - 1.0 if space == "normalized" else idx)
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(list(reversed(mesh)), dim=-1)


@dataclass(frozen=True)
class Grid:
    """A sampling grid in world space: array shape plus ITK geometry.

    Attributes:
        shape: array order, ``(H, W)`` or ``(D, H, W)``.
        spacing: voxel size in mm, ``(x, y, z)`` order.
        origin: world position of voxel index 0, ``(x, y, z)`` order.
        direction: ``d x d`` row-major matrix whose *columns* are the world directions of the index
            axes ``i, j, k`` (ITK's ``GetDirection()``); orthonormal for medical images.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[tuple[float, ...], ...]

    def __init__(
        self,
        shape: Sequence[int],
        spacing: Sequence[float] | None = None,
        origin: Sequence[float] | None = None,
        direction: Sequence[Sequence[float]] | Sequence[float] | None = None,
    ) -> None:
        d = check_ndim(len(shape))
        if any(int(s) < 1 for s in shape):
            raise ValueError(f"grid shape must be positive, got {tuple(shape)}")
        spacing = tuple(float(s) for s in (spacing if spacing is not None else [1.0] * d))
        origin = tuple(float(o) for o in (origin if origin is not None else [0.0] * d))
        if direction is None:
            dirm = torch.eye(d, dtype=torch.float64)
        else:
            dirm = torch.as_tensor(direction, dtype=torch.float64).reshape(d, d)
        if len(spacing) != d or len(origin) != d:
            raise ValueError(f"spacing and origin need {d} values for a {d}D grid, got {spacing} and {origin}")
        if any(s <= 0 or s != s for s in spacing):
            raise ValueError(f"spacing must be positive, got {spacing}")
        if abs(float(torch.linalg.det(dirm))) < 1e-6:
            raise ValueError(f"direction matrix is singular: {dirm.tolist()}")
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", tuple(tuple(float(v) for v in row) for row in dirm.tolist()))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    # The four maps below are fixed by the grid's fields; a registration asks for them every
    # iteration, so each is computed once (float64, CPU) and handed out as a copy.
    @cached_property
    def _index_to_world(self) -> Tensor:
        d = self.ndim
        m = torch.eye(d + 1, dtype=torch.float64)
        m[:d, :d] = torch.tensor(self.direction, dtype=torch.float64) * torch.tensor(self.spacing, dtype=torch.float64)
        m[:d, d] = torch.tensor(self.origin, dtype=torch.float64)
        return m

    @cached_property
    def _world_to_index(self) -> Tensor:
        return torch.linalg.inv(self._index_to_world)

    def index_to_world(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
        """Homogeneous ``(d+1, d+1)`` map from index to world (mm)."""
        return self._index_to_world.to(dtype=dtype, device=device, copy=True)

    def world_to_index(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
        """Homogeneous map from world (mm) to index."""
        return self._world_to_index.to(dtype=dtype, device=device, copy=True)

    @cached_property
    def _normalized_to_world(self) -> Tensor:
        return self._index_to_world @ normalized_to_index_matrix(self.shape)

    @cached_property
    def _world_to_normalized(self) -> Tensor:
        return index_to_normalized_matrix(self.shape) @ self._world_to_index

    def normalized_to_world(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> Tensor:
        """Homogeneous map from this grid's normalized coordinates to world (mm)."""
        return self._normalized_to_world.to(dtype=dtype, device=device, copy=True)

    def world_to_normalized(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> Tensor:
        """Homogeneous map from world (mm) to this grid's normalized coordinates (the sampler's input)."""
        return self._world_to_normalized.to(dtype=dtype, device=device, copy=True)

    def points(
        self, space: str = "world", dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> Tensor:
        """Voxel-centre points ``(*shape, d)`` in ``"world"``, ``"index"`` or ``"normalized"`` space."""
        if space == "world":
            idx = lattice(self.shape, "index", dtype=torch.float64, device=device)
            return apply_affine(self.index_to_world(device=device), idx).to(dtype)
        return lattice(self.shape, space, dtype=dtype, device=device)

    def same_geometry(self, other: Grid, tol: float = 1e-5) -> bool:
        """Whether ``other`` has the same shape and voxel-to-world map (within ``tol`` mm)."""
        return self.shape == other.shape and bool(
            torch.allclose(self.index_to_world(), other.index_to_world(), atol=tol, rtol=0)
        )

    def with_shape(self, shape: Sequence[int]) -> Grid:
        """The grid covering the same world extent with another number of voxels (pyramid levels).

        Spacing scales so that the outer voxel edges stay where they were, consistent with the
        normalized convention (``align_corners=False``).
        """
        d = self.ndim
        old, new = _sizes_xyz(self.shape), _sizes_xyz(shape)
        spacing = [self.spacing[a] * old[a] / new[a] for a in range(d)]
        # The first voxel's edge is fixed: origin moves by half of the change in spacing.
        shift = torch.tensor([(spacing[a] - self.spacing[a]) / 2.0 for a in range(d)], dtype=torch.float64)
        origin = (
            torch.tensor(self.origin, dtype=torch.float64) + torch.tensor(self.direction, dtype=torch.float64) @ shift
        )
        return Grid(shape, spacing, origin.tolist(), self.direction)
