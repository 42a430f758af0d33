"""Warping an image by a transform: the grid generator and the sampler joined."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import all_finite, check_image
from .coords import Grid, normalized_to_index_matrix
from .fast import (
    fast_available,
    fused_affine_warp,
    fused_available,
    fused_bspline_warp,
    fused_field_warp,
    fused_tps_warp,
)
from .image import Image
from .sampler import sample
from .transforms.base import Composite, Transform, index_to_domain
from .transforms.bspline import BSpline
from .transforms.dense import Displacement
from .transforms.matrix import MatrixTransform
from .transforms.tps import ThinPlateSpline

__all__ = ["apply", "warp"]

# Below this many output voxels a B-spline whose coefficients need a gradient warps faster through
# its dense field (the sampler keeps ∂out/∂coords, so its backward is a product, where the on-the-fly
# kernel gathers again): 6.9 vs 5.1 ms at 48x56x64, but 29 vs 38 ms at 80x96x112 and 309 vs 736 ms
# at 160x192x224, forward + backward on one thread. Forward alone, on the fly is faster at any size.
_BSPLINE_ON_THE_FLY_MIN = 2**19


def warp(
    image: Tensor,
    transform: Transform,
    out: Sequence[int] | Grid | None = None,
    source: Grid | None = None,
    mode: str = "linear",
    padding: str = "zeros",
    antialias: bool = False,
) -> Tensor:
    """Resample ``image`` through ``transform``: ``out(x) = image(T(x))``.

    Args:
        image: ``(N, C, H, W)`` or ``(N, C, D, H, W)``.
        transform: a :class:`~stnreg.transforms.Transform` whose domain is normalized space (when
            ``out`` is a shape) or world space (when ``out`` and ``source`` are :class:`Grid`).
        out: output shape (array order) or output :class:`Grid`; defaults to the image's shape.
        source: the image's :class:`Grid`, required with a world-space ``out``.
        mode, padding, antialias: see :func:`stnreg.sampler.sample`.

    Returns:
        ``(N, C, *out_shape)``.
    """
    ndim = check_image(image, allow_integer=mode != "linear")
    if transform.ndim != ndim:
        raise ValueError(f"a {transform.ndim}D transform cannot warp a {ndim}D image of shape {tuple(image.shape)}")
    if isinstance(out, Grid) != isinstance(source, Grid):
        raise ValueError("world-space warping needs both the output Grid and the source Grid")
    if source is not None and source.shape != tuple(image.shape[2:]):
        raise ValueError(f"source Grid shape {source.shape} does not match the image's {tuple(image.shape[2:])}")
    out = tuple(image.shape[2:]) if out is None else out
    if (
        image.dim() == 5
        and isinstance(transform, MatrixTransform)
        and not transform.projective
        and mode == "linear"
        and not antialias
        and fused_available(image, padding)
    ):
        # Coordinates made on the fly, gradient straight to the matrix (stnreg.fast). 3D only: in 2D
        # grid_sample's vectorized bilinear kernel measured faster (benchmarks/results/sampler.md).
        theta = transform.affine_theta(out, source).to(image.dtype)
        return fused_affine_warp(image, theta, tuple(out.shape if isinstance(out, Grid) else out), padding)
    if image.dim() == 5 and mode == "linear" and not antialias and fast_available(image, padding):
        args = _fused_field_args(image, transform, out, source)
        if args is not None:
            # The displacement read in place and the lattice made on the fly (stnreg.fast): no
            # channels-last copy of the field and no grid; gradients to the field and the image.
            return fused_field_warp(image, *args, padding)
    if image.dim() == 5 and mode == "linear" and not antialias and not image.requires_grad:
        fast = fast_available(image, padding)
        out_shape = tuple(out.shape if isinstance(out, Grid) else out)
        args = _fused_bspline_args(image, transform, out, source) if fast else None
        if args is not None:
            # The displacement evaluated on the fly from the coefficients (stnreg.fast): no field,
            # no grid, and the backward goes straight to the coefficients.
            return fused_bspline_warp(image, *args, out_shape, padding)
        args = _fused_tps_args(image, transform, out, source) if fast else None
        if args is not None:
            return fused_tps_warp(image, *args, out_shape, padding)
    coords = transform.sampling_grid(out, source)
    if mode == "label":
        return _sample_labels(image, coords, padding)
    return sample(image, coords, mode=mode, padding=padding, antialias=antialias)


def _sample_labels(image: Tensor, coords: Tensor, padding: str) -> Tensor:
    """``sample(image, coords, "label", padding)``: on the CPU by one vote per output voxel among its
    neighbours' labels (:func:`stnreg.fast.labels_cpu.label_sample`, the same values, ties included),
    elsewhere by the sampler's pass per label.

    Args:
        image: ``(N, C, *spatial)`` label map, any integer, bool or float dtype.
        coords: ``(N, *out_spatial, d)`` normalized coordinates (a batch of 1 broadcasts).

    Returns:
        ``(N, C, *out_spatial)`` in the image's dtype.
    """
    # fast_available checks what the kernel needs of the coordinates: CPU, float32/64, zero or
    # border padding, numba present and STNREG_FAST not 0. The reference reads non-finite
    # coordinates its own way, and 64-bit unsigned labels would not survive the kernel's int64.
    if (
        image.device.type == "cpu"
        and image.dtype != torch.uint64
        and not image.is_complex()
        and fast_available(coords, padding)
        and all_finite(coords)
    ):
        from .fast.labels_cpu import label_sample

        return label_sample(image, coords, padding)
    return sample(image, coords, mode="label", padding=padding)


def _innermost_and_pixel_map(
    image: Tensor, transform: Transform, source: Grid | None
) -> tuple[Transform, Tensor] | None:
    """The innermost transform of a chain (a spline or a field) and ``(N or 1, 4, 4)`` float64 from
    its output point to the input pixel (constant matrices applied after it, the source's
    world-to-normalized map and normalized-to-pixel); ``None`` when a matrix of the chain needs a
    gradient or is no affine."""
    inner, head = transform, None
    if isinstance(transform, Composite):
        inner = transform.transforms[-1]
        head = transform._head_matrix()
        if head is None or head.requires_grad:
            return None
    m = normalized_to_index_matrix(tuple(image.shape[2:]))
    if source is not None:
        m = m @ source.world_to_normalized()
    if head is not None:
        m = m @ head.detach().double().cpu()
    return inner, m.reshape(-1, 4, 4)


def _fused_tps_args(
    image: Tensor, transform: Transform, out: Sequence[int] | Grid, source: Grid | None
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """``(coef, control_points, P, M)`` of :func:`~stnreg.fast.fused_tps_warp` for a 3D thin-plate
    spline, alone or after constant affine matrices; else ``None``."""
    chain = _innermost_and_pixel_map(image, transform, source)
    if chain is None or not isinstance(chain[0], ThinPlateSpline):
        return None
    spline, m = chain
    return spline.coefficients(), spline.control_points, index_to_domain(out)[:3], m[:, :3, :]


def _fused_field_args(
    image: Tensor, transform: Transform, out: Sequence[int] | Grid, source: Grid | None
) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(field, K, R)`` of :func:`~stnreg.fast.fused_field_warp` for a displacement (or stationary
    velocity) field, alone or after constant affine matrices, whose lattice covers the output's
    extent (a resampled copy of its grid); else ``None``.

    Input pixel position = ``pixel ∘ source normalization ∘ matrices`` applied to ``p + u(p)``: ``K``
    maps the output index to the pixel position of ``p``, ``R`` the displacement to pixels.
    """
    chain = _innermost_and_pixel_map(image, transform, source)
    if chain is None or not isinstance(chain[0], Displacement):
        return None
    disp, m = chain
    i2d = index_to_domain(out)
    shape = tuple(out.shape if isinstance(out, Grid) else out)
    if len(shape) != 3 or not disp._shares_frame(i2d, shape):
        return None
    return disp.field_on(shape), (m @ i2d)[:, :3, :], m[:, :3, :3]


def _fused_bspline_args(
    image: Tensor, transform: Transform, out: Sequence[int] | Grid, source: Grid | None
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]] | None:
    """``(coef, K, R, tables)`` of :func:`~stnreg.fast.fused_bspline_warp` for a cubic B-spline, alone
    or after constant affine matrices, on an output lattice aligned with its control grid; else ``None``.

    Input pixel position = ``pixel ∘ source normalization ∘ matrices`` applied to ``p + disp(p)``,
    with ``p`` the output voxel's point: ``K`` maps the output index to the pixel position of ``p``,
    ``R`` the displacement to pixels, all in float64.
    """
    chain = _innermost_and_pixel_map(image, transform, source)
    if chain is None or not isinstance(chain[0], BSpline):
        return None
    spline, m = chain
    voxels = math.prod(out.shape if isinstance(out, Grid) else out)
    if spline.params.requires_grad and voxels < _BSPLINE_ON_THE_FLY_MIN:
        return None
    tables = spline.separable_tables(out)
    if tables is None:
        return None
    k = (m @ index_to_domain(out))[:, :3, :]
    return spline.params, k, m[:, :3, :3], tables


def apply(
    transform: Transform,
    image: Image,
    reference: Image | Grid,
    interpolation: str = "linear",
    padding: str = "zeros",
) -> Image:
    """Resample an :class:`Image` onto ``reference``'s grid through a world-space transform.

    Args:
        transform: maps reference (fixed) world points to ``image`` (moving) world points, as
            returned by :func:`stnreg.register` or read by :func:`stnreg.io.read_transform`.
        interpolation: ``"linear"``, ``"nearest"`` or ``"label"`` (label values stay exact).

    Returns:
        An :class:`Image` on the reference grid, float32 for linear interpolation, the input dtype
        otherwise.
    """
    grid = reference.grid if isinstance(reference, Image) else reference
    if transform.ndim != image.ndim or grid.ndim != image.ndim:
        raise ValueError(
            f"dimension mismatch: transform {transform.ndim}D, image {image.ndim}D ({image.name}), "
            f"reference {grid.ndim}D"
        )
    data = image.batch(torch.float32 if interpolation == "linear" else None)
    if interpolation == "linear":
        # warp's fused paths make no coordinate grid for matrices and fields: on a 1 mm brain 0.13
        # against 0.56 s for a matrix and 0.40 against 0.70 s for an affine + SVF (one thread).
        out = warp(data, transform, grid, image.grid, padding=padding)
    elif interpolation == "label":
        out = _sample_labels(data, transform.sampling_grid(grid, image.grid).to(torch.float32), padding)
    else:
        out = sample(data, transform.sampling_grid(grid, image.grid).to(torch.float32), interpolation, padding)
    return Image(out[0], grid, f"{image.name} (resampled)")
