"""The one sampler: reads an image at continuous coordinates. Every transform and warp goes through here.

Coordinates are **normalized** (see :mod:`stnreg.coords`): ``(N, *out_spatial, d)``, components in
``(x, y, z)`` order, ``-1``/``+1`` at the outer edges of the image (``align_corners=False``).
This is the only module that calls ``torch.nn.functional.grid_sample``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_image, expand_batch
from .coords import normalized_to_index
from .cubic import bspline_prefilter, cubic_sample
from .fast.dispatch import try_fast_sample, try_label_sample

__all__ = ["MODES", "PADDINGS", "gaussian_blur", "local_scale", "sample"]

MODES = ("linear", "cubic", "nearest", "label")
PADDINGS = ("zeros", "border", "reflection")


def _check_coords(coords: Tensor, ndim: int) -> None:
    if not isinstance(coords, Tensor) or not coords.is_floating_point():
        raise TypeError("coords must be a floating-point tensor of normalized (x, y[, z]) coordinates")
    if coords.dim() != ndim + 2 or coords.shape[-1] != ndim:
        want = "(N, H_out, W_out, 2)" if ndim == 2 else "(N, D_out, H_out, W_out, 3)"
        raise ValueError(f"coords for a {ndim}D image must have shape {want}, got {tuple(coords.shape)}")


def local_scale(coords: Tensor, in_shape: tuple[int, ...]) -> Tensor:
    """Per-item, per-input-axis footprint of one output voxel, in input voxels.

    For input axis ``a`` it is the length of row ``a`` of the Jacobian of the map from output
    index to input index, estimated by forward differences and summarized by the median over the
    field (exact for matrix transforms, whose Jacobian is constant).

    Args:
        coords: ``(N, *out, d)`` normalized coordinates.
        in_shape: input spatial shape, array order.

    Returns:
        ``(N, d)`` scales in ``(x, y, z)`` order; ``> 1`` means the warp shrinks along that axis.
    """
    d = coords.shape[-1]
    idx = normalized_to_index(coords.detach(), in_shape)
    n = idx.shape[0]
    rows = torch.zeros(n, d, dtype=idx.dtype, device=idx.device)
    for b in range(d):
        # Output axis of the b-th (x, y, z) component is array dim (d - b) of the (N, *out, d) tensor.
        dim = d - b
        if idx.shape[dim] < 2:
            continue
        diff = idx.narrow(dim, 1, idx.shape[dim] - 1) - idx.narrow(dim, 0, idx.shape[dim] - 1)
        rows = rows + diff.reshape(n, -1, d).square().median(dim=1).values
    return rows.sqrt()


def gaussian_blur(image: Tensor, sigma: Tensor, padding: str = "border") -> Tensor:
    """Separable Gaussian blur with a per-item, per-axis standard deviation.

    Args:
        image: ``(N, C, *spatial)``.
        sigma: ``(N, d)`` or ``(1, d)`` (one sigma for every item) in voxels, ``(x, y, z)`` order; axes
            with ``sigma < 0.1`` are left alone.
            It may stay on the CPU beside a GPU image: the taps are made where ``sigma`` lives (the
            kernel radius needs its largest value on the host, a device synchronization otherwise)
            and copied over.
        padding: ``"zeros"`` pads with zeros, anything else replicates the border.
    """
    n = image.shape[0]
    d = image.dim() - 2
    if sigma.shape not in ((n, d), (1, d)):
        shape = tuple(image.shape)
        raise ValueError(f"sigma must be ({n}, {d}) or (1, {d}) for an image {shape}, got {tuple(sigma.shape)}")
    sigma = sigma.expand(n, d)
    out = image
    for a in range(d):
        s = sigma[:, a].to(image.dtype)
        smax = float(s.max())
        if smax < 0.1:
            continue
        radius = max(1, math.ceil(3.0 * smax))
        x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=s.device)
        safe = s.clamp_min(1e-3).view(n, 1)
        k = torch.exp(-0.5 * (x.view(1, -1) / safe) ** 2)
        k = torch.where(s.view(n, 1) < 0.1, (x.view(1, -1) == 0).to(k.dtype), k)
        k = (k / k.sum(dim=1, keepdim=True)).to(image.device)
        dim = image.dim() - 1 - a
        pad = [0, 0] * d
        pad[2 * a], pad[2 * a + 1] = radius, radius
        padded = F.pad(out, pad, mode="constant" if padding == "zeros" else "replicate")
        # A sum of shifted copies accumulated in place: on one thread the grouped conv3d with a
        # (k, 1, 1) kernel that this replaces took 570 ms for a 1 mm brain at sigma 0.87, this 69 ms
        # (2-2.5x faster on smaller 2D and 3D fields too).
        taps = k.view(n, 1, *[1] * d, 2 * radius + 1)
        size = out.shape[dim]
        out = padded.narrow(dim, 0, size) * taps[..., 0]
        for j in range(1, 2 * radius + 1):
            out.addcmul_(padded.narrow(dim, j, size), taps[..., j])
    return out


def _label_sample(image: Tensor, coords: Tensor, padding: str) -> Tensor:
    """Label-preserving resampling: linear interpolation of each label's indicator, then arg-max."""
    values = torch.unique(image)
    wdtype = coords.dtype
    best = None
    out = None
    for v in values:
        weight = F.grid_sample((image == v).to(wdtype), coords, "bilinear", padding, align_corners=False)
        if best is None:
            best, out = weight, torch.full_like(weight, float(v), dtype=image.dtype)
            continue
        take = weight > best
        best = torch.where(take, weight, best)
        out = torch.where(take, v.to(image.dtype), out)
    if padding == "zeros":
        # Points with no support inside the image take the fill value, as in every other mode.
        out = torch.where(best > 0, out, torch.zeros((), dtype=image.dtype, device=image.device))
    return out


def sample(
    image: Tensor,
    coords: Tensor,
    mode: str = "linear",
    padding: str = "zeros",
    antialias: bool = False,
) -> Tensor:
    """Read ``image`` at normalized ``coords``.

    Args:
        image: ``(N, C, H, W)`` or ``(N, C, D, H, W)``; floating point for ``"linear"`` and ``"cubic"``,
            any numeric type for ``"nearest"`` and ``"label"``.
        coords: ``(N, H_out, W_out, 2)`` or ``(N, D_out, H_out, W_out, 3)`` normalized coordinates in
            ``(x, y, z)`` order (``align_corners=False``). A batch of 1 on either side broadcasts.
        mode: ``"linear"`` (bilinear/trilinear, differentiable in image and coords), ``"nearest"``,
            ``"cubic"`` (cubic B-spline of the image, prefiltered so that it interpolates; unbiased
            at subvoxel shifts, 4^d taps, differentiable in image and coords; :mod:`stnreg.cubic`),
            or ``"label"``, which interpolates each label's indicator linearly and keeps the most
            likely label, so only label values present in the input come out (plus the zero fill
            outside the image when ``padding="zeros"``).
        padding: ``"zeros"``, ``"border"`` or ``"reflection"``, as ``grid_sample``.
        antialias: before linear or cubic sampling, blur the image with a Gaussian whose per-axis sigma,
            ``0.5 * sqrt(s**2 - 1)`` input voxels, follows the warp's local scale ``s`` (see
            :func:`local_scale`; one sigma per batch item and axis, exact for matrix transforms).
            Only axes that the warp shrinks are blurred. The sigma is not differentiated.

    Returns:
        ``(N, C, *out_spatial)`` in the image's dtype.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    ndim = check_image(image, allow_integer=mode not in ("linear", "cubic"))
    _check_coords(coords, ndim)
    if mode == "label":
        # On the CPU one vote per output voxel among its neighbours' labels (stnreg.fast): the same
        # values, ties included, without a pass per label; it broadcasts a batch of 1 itself.
        out = try_label_sample(image, coords, padding)
        if out is not None:
            return out
    image, coords = expand_batch(image, coords, "image and coordinates")
    if mode in ("linear", "cubic"):
        coords = coords.to(image.dtype)
        if antialias:
            scale = local_scale(coords, tuple(image.shape[2:]))
            sigma = 0.5 * (scale.square() - 1.0).clamp_min(0.0).sqrt()
            image = gaussian_blur(image, sigma, padding)
    if mode == "cubic":
        return cubic_sample(bspline_prefilter(image), coords, padding)
    if mode == "linear":
        # Numba trilinear kernels where they apply, the same numbers as grid_sample (stnreg.fast).
        out = try_fast_sample(image, coords, padding)
        return F.grid_sample(image, coords, "bilinear", padding, align_corners=False) if out is None else out
    if mode == "label":
        return _label_sample(image, coords, padding)
    # Integers travel through float64, which holds every int32 label exactly.
    work = image if image.is_floating_point() else image.to(torch.float64)
    out = F.grid_sample(work, coords.to(work.dtype), "nearest", padding, align_corners=False)
    return out if image.is_floating_point() else out.round().to(image.dtype)
