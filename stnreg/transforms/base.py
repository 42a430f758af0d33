"""The transform protocol: parameters -> point map -> sampling coordinates.

A transform maps points of the **output** (fixed) space to points of the **input** (moving) space
(a pull-back, as ITK's transforms and ``grid_sample`` do): ``warped(x) = image(T(x))``.
Points are ``(N, ..., d)`` in ``(x, y, z)`` order, in the transform's *domain space*: normalized
coordinates for a Spatial Transformer, or world millimetres for registration of images with
geometry (pass :class:`~stnreg.coords.Grid` objects to :meth:`Transform.sampling_grid`).

Composition follows function composition: ``f.compose(g)`` maps ``x`` to ``f(g(x))``, so that
``warp(warp(I, f), g) == warp(I, f.compose(g))`` and ``Composite([f, g])`` lists transforms in the
order in which an ITK ``CompositeTransform`` adds them (ITK applies the last added first).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._checks import check_finite, check_ndim
from ..coords import Grid, apply_affine, index_to_normalized_matrix, lattice

__all__ = ["Composite", "NumericalInverse", "ParametricTransform", "Transform"]


def index_to_domain(out: Sequence[int] | Grid, device: torch.device | str | None = None) -> Tensor:
    """Homogeneous ``(d+1, d+1)`` float64 map from output index to domain space.

    A shape means the normalized domain; a :class:`Grid` means world space.
    """
    if isinstance(out, Grid):
        return out.index_to_world(device=device)
    return index_to_normalized_matrix(tuple(int(s) for s in out), device=device)


def lattice_pixel_map(out: Sequence[int] | Grid, pixel_map: Tensor) -> tuple[Tensor, Tensor]:
    """``(K, R)`` of the fused field and B-spline kernels: ``K`` ``(N, d, d+1)`` maps an output index
    to the input pixel position of its lattice point, ``R`` ``(N, d, d)`` a displacement (domain
    units) to pixels; ``pixel_map`` ``(N, d+1, d+1)`` maps domain points to input pixels."""
    d = pixel_map.shape[-1] - 1
    return (pixel_map @ index_to_domain(out))[:, :d, :], pixel_map[:, :d, :d]


@functools.lru_cache(maxsize=8)
def _cached_lattice(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return lattice(shape, "normalized", dtype, device).unsqueeze(0)


@functools.lru_cache(maxsize=8)
def _cached_lattice_channels_first(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(1, d, *shape)``: adding a channels-first field to it reads and writes both contiguously,
    2-3x faster than adding the field's channels-last view to the ``(1, *shape, d)`` lattice."""
    return lattice(shape, "normalized", dtype, device).movedim(-1, 0).unsqueeze(0).contiguous()


@functools.lru_cache(maxsize=4)
def _cached_world_lattice(grid: Grid, dtype: torch.dtype, device: torch.device) -> Tensor:
    idx = lattice(grid.shape, "index", torch.float64, device)
    return apply_affine(grid.index_to_world(device=device), idx).to(dtype).unsqueeze(0)


def clear_lattice_cache() -> None:
    """Drop the cached lattices: a 1 mm brain's world lattice alone holds 240 MB."""
    _cached_lattice.cache_clear()
    _cached_lattice_channels_first.cache_clear()
    _cached_world_lattice.cache_clear()


def output_lattice(
    out: Sequence[int] | Grid, dtype: torch.dtype, device: torch.device | str | None
) -> tuple[Tensor, Tensor]:
    """Voxel-centre points of the output in domain space and the index-to-domain map.

    Lattices are cached (iterative registration asks for the same one every step), so
    callers must not modify the returned points in place.

    Returns:
        ``(points (1, *shape, d), index_to_domain (d+1, d+1) float64)``.
    """
    m = index_to_domain(out, device)
    if isinstance(out, Grid):
        return _cached_world_lattice(out, dtype, torch.device(device or "cpu")), m
    return _cached_lattice(tuple(int(s) for s in out), dtype, torch.device(device or "cpu")), m


class Transform(nn.Module):
    """Base class: a batch of ``N`` spatial maps of a ``d``-dimensional domain.

    Subclasses implement :meth:`forward` (``(N, ..., d) -> (N, ..., d)``) and may override
    :meth:`sampling_grid` with a faster route for lattices.
    """

    def __init__(self, ndim: int) -> None:
        super().__init__()
        self.ndim = check_ndim(ndim)

    @property
    def batch_size(self) -> int:
        raise NotImplementedError

    def forward(self, points: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_points(self, points: Tensor) -> None:
        if points.shape[-1] != self.ndim:
            raise ValueError(f"{type(self).__name__} is {self.ndim}D but points have {points.shape[-1]} components")

    def sampling_grid(self, out: Sequence[int] | Grid, source: Grid | None = None) -> Tensor:
        """Normalized sampler coordinates ``(N, *out_shape, d)`` for an output lattice.

        Args:
            out: output shape (array order) when the domain is normalized space, or a
                :class:`Grid` when the domain is world space.
            source: the input image's :class:`Grid` (world domain only); the mapped world points are
                converted to its normalized coordinates.
        """
        if isinstance(out, Grid) and source is None:
            raise ValueError("a world-space output Grid needs the source Grid too")
        mapped = self.mapped_lattice(out)
        if source is not None:
            mapped = apply_affine(source.world_to_normalized(device=mapped.device), mapped)
        return mapped

    def mapped_lattice(self, out: Sequence[int] | Grid) -> Tensor:
        """``T`` at the output's voxel centres, ``(N, *shape, d)`` in domain space (families add fast paths)."""
        pts, _ = output_lattice(out, self._dtype(), self._device())
        return self(pts)

    def compose(self, other: Transform) -> Transform:
        """``self ∘ other``: the map ``x -> self(other(x))`` (warping by ``self`` first, then ``other``)."""
        return Composite([self, other])

    # Hooks the fast paths ask (stnreg.fast.dispatch): a family answers for itself, so that adding
    # one touches its own file only.

    #: The fused warp kernel that evaluates this family on the fly (``"field"``, ``"bspline"``,
    #: ``"tps"``), or ``None``.
    fast_warp_kind: str | None = None

    def fast_warp_args(self, out: Sequence[int] | Grid, pixel_map: Tensor) -> tuple[Tensor, ...] | None:
        """The arguments of the :attr:`fast_warp_kind` kernel after the image and before the output
        shape, or ``None`` when this output lattice does not fit it.

        Args:
            out: output shape (normalized domain) or :class:`Grid` (world domain).
            pixel_map: ``(N or 1, d+1, d+1)`` float64 from this transform's output points (domain
                space) to the input image's pixel positions.
        """
        return None

    def affine_matrix(self) -> Tensor | None:
        """``(N, d+1, d+1)`` homogeneous matrix when this transform is one affine map, else ``None``."""
        return None

    def affine_theta(self, out: Sequence[int] | Grid, source: Grid | None = None) -> Tensor | None:
        """``(N, d, d+1)`` map from output normalized to source normalized coordinates (``affine_grid``'s
        θ) when this transform is one affine map, else ``None``."""
        return None

    def affine_head(self) -> tuple[Tensor | None, Transform] | None:
        """``(head, inner)`` with ``self = head ∘ inner``: ``head`` the ``(N, d+1, d+1)`` matrix of the
        affine maps applied after the innermost transform (``None``: there are none), ``None`` when
        some of them are no affine map."""
        return None, self

    def inverse(self) -> Transform:
        """The inverse map; numerical (fixed-point iteration) unless a family knows better."""
        return NumericalInverse(self)

    def _dtype(self) -> torch.dtype:
        for t in list(self.parameters()) + list(self.buffers()):
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    def _device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")


class ParametricTransform(Transform):
    """A transform family with a parameter tensor of shape ``(N, *param_shape)``.

    Parameters are either owned (an ``nn.Parameter`` initialized to the identity, for direct
    optimization) or given (a tensor that stays in its autograd graph, e.g. a network's output).
    """

    param_shape: tuple[int, ...]
    #: Whether the parameters are a dense field on a lattice (``(N, d, *shape)``): registration then
    #: refines the lattice level by level and preconditions the steps with a Gaussian.
    lattice_field: bool = False

    def __init__(self, ndim: int, batch: int = 1, params: Tensor | None = None) -> None:
        super().__init__(ndim)
        self._init_batch = int(batch)

    def _bind(self, params: Tensor | None) -> None:
        """Own identity parameters, or hold ``params`` given by the caller (validated)."""
        if params is None:
            self.params = nn.Parameter(self.identity_params(self._init_batch))
            return
        self.params = self.validate_params(params)

    def validate_params(self, params: Tensor) -> Tensor:
        """Check type, shape and finiteness of a parameter tensor; reshape a flat ``(N, P)`` tensor."""
        name = type(self).__name__
        if not isinstance(params, Tensor) or not params.is_floating_point():
            raise TypeError(f"{name} parameters must be a floating-point tensor")
        if params.dim() == 2 and params.shape[1] == self.num_params and len(self.param_shape) != 1:
            params = params.reshape(params.shape[0], *self.param_shape)
        if tuple(params.shape[1:]) != tuple(self.param_shape):
            raise ValueError(
                f"{name} expects parameters of shape (N, {', '.join(map(str, self.param_shape))}) "
                f"or (N, {self.num_params}), got {tuple(params.shape)}"
            )
        check_finite(params, f"{name} parameters")
        return params

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.cuda()``, ``.double()`` move given (non-Parameter) parameters too."""
        module = super()._apply(fn, recurse)
        if not isinstance(self.params, nn.Parameter):
            self.params = fn(self.params)
        return module

    @property
    def num_params(self) -> int:
        """Number of parameters per batch item."""
        n = 1
        for s in self.param_shape:
            n *= s
        return n

    @property
    def batch_size(self) -> int:
        return self.params.shape[0]

    def identity_params(self, batch: int = 1) -> Tensor:  # pragma: no cover - abstract
        """Parameters of the identity map, ``(batch, *param_shape)``."""
        raise NotImplementedError

    def with_params(self, params: Tensor) -> ParametricTransform:
        """A transform of the same family and configuration bound to ``params`` (kept in the graph)."""
        raise NotImplementedError

    def param_scale(self, extent: float, voxel: float) -> Tensor:
        """Per-parameter units ``param_shape`` (float64) that make a unit step move points by about one
        voxel (``voxel`` mm): field and point parameters are in voxels; matrix families override it,
        scaled at the image's half-``extent`` (mm)."""
        return torch.ones(self.param_shape, dtype=torch.float64) * voxel

    def regularizer_field(self, params: Tensor) -> Tensor | None:
        """What regularizers see of ``params``, ``(N, d, *shape)`` in the family's own units, or ``None``
        for a family that is smooth by construction (the default)."""
        return None

    def _dtype(self) -> torch.dtype:
        return self.params.dtype

    def _device(self) -> torch.device:
        return self.params.device


class Composite(Transform):
    """A chain ``[T1, ..., Tn]`` mapping ``x -> T1(T2(...Tn(x)))`` (ITK ``CompositeTransform`` order)."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        if not transforms:
            raise ValueError("Composite needs at least one transform")
        ndims = {t.ndim for t in transforms}
        if len(ndims) != 1:
            raise ValueError(f"cannot compose transforms of different dimensions {sorted(ndims)}")
        super().__init__(transforms[0].ndim)
        flat: list[Transform] = []
        for t in transforms:
            flat.extend(t.transforms if isinstance(t, Composite) else [t])
        self.transforms = nn.ModuleList(flat)

    @property
    def batch_size(self) -> int:
        return max(t.batch_size for t in self.transforms)

    def forward(self, points: Tensor) -> Tensor:
        self._check_points(points)
        for t in reversed(self.transforms):
            points = t(points)
        return points

    def inverse(self) -> Transform:
        return Composite([t.inverse() for t in reversed(self.transforms)])

    def _head_matrix(self) -> Tensor | None:
        """The transforms before the innermost folded into one homogeneous matrix, when all of them
        are affine maps (else ``None``)."""
        head = [t.affine_matrix() for t in self.transforms[:-1]]
        if not head or any(h is None for h in head):
            return None
        m = head[0]
        for h in head[1:]:
            m = m @ h.to(m.dtype)
        return m

    def affine_head(self) -> tuple[Tensor | None, Transform] | None:
        m = self._head_matrix()
        return None if m is None else (m, self.transforms[-1])

    def mapped_lattice(self, out: Sequence[int] | Grid) -> Tensor:
        """Matrices after the innermost transform fold into one matrix applied to its fast lattice path."""
        m = self._head_matrix()
        if m is None:
            return super().mapped_lattice(out)
        return apply_affine(m, self.transforms[-1].mapped_lattice(out))

    def sampling_grid(self, out: Sequence[int] | Grid, source: Grid | None = None) -> Tensor:
        m = self._head_matrix()
        if m is None or source is None:
            return super().sampling_grid(out, source)
        # The source's world-to-normalized map joins the matrix (in float64, as world offsets are
        # hundreds of mm): one pass over the lattice instead of two, backward included.
        post = source.world_to_normalized(device=m.device) @ m.double()
        return apply_affine(post.to(m.dtype), self.transforms[-1].mapped_lattice(out))

    def _dtype(self) -> torch.dtype:
        return self.transforms[-1]._dtype()

    def _device(self) -> torch.device:
        return self.transforms[-1]._device()


class NumericalInverse(Transform):
    """Inverse of ``T`` by the fixed-point iteration ``x <- x - (T(x) - y)``.

    Converges when ``T - id`` is a contraction (displacement gradients below 1), which holds for
    the smooth, folding-free maps of registration. ``iterations`` trades time for accuracy; the
    residual ``|T(x) - y|`` shrinks geometrically.
    """

    def __init__(self, transform: Transform, iterations: int = 30) -> None:
        super().__init__(transform.ndim)
        self.transform = transform
        self.iterations = int(iterations)

    @property
    def batch_size(self) -> int:
        return self.transform.batch_size

    def forward(self, points: Tensor) -> Tensor:
        self._check_points(points)
        x = points
        for _ in range(self.iterations):
            x = x - (self.transform(x) - points)
        return x

    def inverse(self) -> Transform:
        return self.transform
