"""Warping an image by a transform: the grid generator and the sampler joined."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import check_image
from .coords import Grid
from .fast.dispatch import try_fused_warp
from .image import Image
from .sampler import sample
from .transforms.base import Transform

__all__ = ["apply", "warp"]


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
    # Matrices, fields and splines warp by kernels that make the coordinates on the fly (no grid)
    # where they apply (stnreg.fast.dispatch).
    warped = try_fused_warp(image, transform, out, source, mode, padding, antialias)
    if warped is None:
        coords = transform.sampling_grid(out, source)
        warped = sample(image, coords, mode=mode, padding=padding, antialias=antialias)
    return warped


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
    else:
        out = sample(data, transform.sampling_grid(grid, image.grid).to(torch.float32), interpolation, padding)
    return Image(out[0], grid, f"{image.name} (resampled)")
