"""Warping an image by a transform: the grid generator and the sampler joined."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._checks import check_image
from .coords import Grid
from .sampler import sample
from .transforms.base import Transform

__all__ = ["warp"]


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
    coords = transform.sampling_grid(tuple(image.shape[2:]) if out is None else out, source)
    return sample(image, coords, mode=mode, padding=padding, antialias=antialias)
