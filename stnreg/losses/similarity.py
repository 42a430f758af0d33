"""Image similarity losses (lower is better), functional. Images are ``(N, C, *spatial)``.

Every loss takes an optional ``mask`` ``(N or 1, 1, *spatial)`` in [0, 1] weighting voxels, and
returns a scalar averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..fast.dispatch import try_fast_lncc
from .parzen import parzen_mutual_information

__all__ = ["dice_loss", "lncc_loss", "mi_loss", "mse_loss", "ncc_loss"]


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape[2:] != b.shape[2:]:
        raise ValueError(f"images must share a grid: {tuple(a.shape)} vs {tuple(b.shape)}")


def _weighted_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over all but the batch axis, weighted by ``mask``; ``(N,)``."""
    if mask is None:
        return x.flatten(1).mean(1)
    w = mask.expand_as(x)
    return (x * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-8)


def _reduce(per_item: Tensor, reduce: bool) -> Tensor:
    """The batch mean, or the ``(N,)`` per-item values (for solvers that treat each pair on its own)."""
    return per_item.mean() if reduce else per_item


def mse_loss(a: Tensor, b: Tensor, mask: Tensor | None = None, reduce: bool = True) -> Tensor:
    """Mean squared difference; ``reduce=False``: ``(N,)`` per item."""
    _check_pair(a, b)
    return _reduce(_weighted_mean((a - b).square(), mask), reduce)


def ncc_loss(a: Tensor, b: Tensor, mask: Tensor | None = None, eps: float = 1e-12, reduce: bool = True) -> Tensor:
    """``1 - NCC`` with the global normalized cross-correlation over each image (in [0, 2]); ``reduce=False``:
    ``(N,)`` per item."""
    _check_pair(a, b)
    ma, mb = _weighted_mean(a, mask), _weighted_mean(b, mask)
    shape = (-1,) + (1,) * (a.dim() - 1)
    da, db = a - ma.view(shape), b - mb.view(shape)
    cov = _weighted_mean(da * db, mask)
    var = _weighted_mean(da.square(), mask) * _weighted_mean(db.square(), mask)
    return _reduce(1 - cov / var.clamp_min(eps).sqrt(), reduce)


def _box_filter(x: Tensor, window: Sequence[int]) -> Tensor:
    """Moving average with odd ``window`` per axis (array order), zero padded, same size.

    Separable running sums by ``cumsum``: the cost (and the backward's) does not grow with the
    window, and measured 2.4x faster than grouped convolutions for a 7-voxel window in 3D.
    """
    d = x.dim() - 2
    for axis, k in enumerate(window):
        if k <= 1:
            continue
        dim = 2 + axis
        n = x.shape[dim]
        pad = [0, 0] * d
        # F.pad lists the last axis first; one extra leading zero makes the differences start at 0.
        pad[2 * (d - 1 - axis)], pad[2 * (d - 1 - axis) + 1] = k // 2 + 1, k // 2
        c = F.pad(x, pad).cumsum(dim)
        x = (c.narrow(dim, k, n) - c.narrow(dim, 0, n)) / k
    return x


def lncc_loss(
    a: Tensor,
    b: Tensor,
    window: int | Sequence[int] = 9,
    mask: Tensor | None = None,
    eps: float = 1e-8,
    reduce: bool = True,
) -> Tensor:
    """``1 - mean(cc)`` with the squared local correlation ``cc`` in a moving window (VoxelMorph's LNCC).

    Args:
        window: odd window size in voxels, one value or one per axis (array order).
        eps: added to the product of the local variances (of window means, so ``1e-8`` here is
            about VoxelMorph's ``1e-5`` on window sums); flat windows contribute ``cc = 0``.
        reduce: ``False`` returns ``(N,)`` per item (the torch path unless ``N = 1``).
    """
    _check_pair(a, b)
    d = a.dim() - 2
    win = [int(window)] * d if isinstance(window, int) else [int(w) for w in window]
    win = [w if w % 2 else w + 1 for w in win]
    # Numba box filters and the loss's gradient in closed form where they apply (stnreg.fast): the
    # same value, a fraction of autograd's time and memory on 3D volumes.
    value = try_fast_lncc(a, b, win, mask, eps, reduce)
    if value is not None:
        return value
    stats = _box_filter(torch.cat([a, b, a * a, b * b, a * b], 1), win)
    c = a.shape[1]
    ma, mb, aa, bb, ab = stats.split(c, 1)
    cross = ab - ma * mb
    var_a = (aa - ma * ma).clamp_min(0)
    var_b = (bb - mb * mb).clamp_min(0)
    cc = (cross.square() / (var_a * var_b + eps)).clamp(max=1.0)
    return _reduce(1 - _weighted_mean(cc, mask), reduce)


def mi_loss(
    a: Tensor,
    b: Tensor,
    bins: int = 32,
    mask: Tensor | None = None,
    samples: int | None = 65536,
    generator: torch.Generator | None = None,
    reduce: bool = True,
) -> Tensor:
    """Negative mutual information with cubic B-spline Parzen windows, differentiable in both images.

    Intensities are expected in [0, 1] (the registration pipeline normalizes robustly); channels
    are averaged. ``samples`` random voxels per call (all when ``None`` or when the image is
    smaller) are scored, as ITK's Mattes MI does; each costs 16 histogram entries (see
    :mod:`stnreg.losses.parzen`), so memory is ``O(16 * samples)`` whatever ``bins`` is.
    ``reduce=False`` returns ``(N,)`` per item.
    """
    _check_pair(a, b)
    n = a.shape[0]
    fa, fb = a.mean(1).reshape(n, -1), b.mean(1).reshape(n, -1)
    w = None if mask is None else mask.expand(n, 1, *a.shape[2:]).reshape(n, -1)
    if samples is not None and fa.shape[1] > samples:
        idx = torch.randint(0, fa.shape[1], (samples,), device=a.device, generator=generator)
        fa, fb = fa[:, idx], fb[:, idx]
        w = None if w is None else w[:, idx]
    return _reduce(-parzen_mutual_information(fa, fb, bins, w), reduce)


def dice_loss(a: Tensor, b: Tensor, mask: Tensor | None = None, eps: float = 1e-5, reduce: bool = True) -> Tensor:
    """``1 - mean soft Dice`` over channels; ``a`` and ``b`` are ``(N, L, *spatial)`` label probabilities.
    ``reduce=False``: ``(N,)`` per item."""
    _check_pair(a, b)
    w = 1.0 if mask is None else mask
    inter = (a * b * w).flatten(2).sum(-1)
    total = ((a + b) * w).flatten(2).sum(-1)
    return _reduce((1 - (2 * inter + eps) / (total + eps)).mean(1), reduce)
