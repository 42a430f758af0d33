"""Local normalized cross-correlation of 3D images with its gradient in closed form (an autograd Function).

Box filters by running sums (:mod:`.lncc_cpu`) instead of autograd through cumulative sums; the
fixed image's window statistics are kept between calls while that image is unchanged.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import Tensor

from . import loader

__all__ = ["fast_lncc"]


def _item(x: Tensor, i: int, ch: int) -> np.ndarray:
    """Channel ``ch`` of item ``i`` (a batch of 1 broadcasts) as a ``(D, H, W)`` array."""
    return x[i if x.shape[0] > 1 else 0, ch].numpy()


class _FixedStats:
    """The window means of the last fixed image seen by :func:`fast_lncc`, per item and channel.

    A registration calls the loss with the same fixed tensor at every iteration; its ``box(b)``
    and ``box(b²)`` (two of the five box filters of the forward) are kept until another tensor, a
    modified one (its version counter), or another window comes. The tensor is held by a weak
    reference, so the cache never keeps an image alive.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.ref = None
        self.stats: list = []

    def get(self, b: Tensor, window: tuple[int, int, int], compute) -> list:
        key = (b._version, tuple(b.shape), b.dtype, window)
        if self.ref is None or self.ref() is not b or self.key != key:
            b_ = b.detach().contiguous()
            self.stats = [compute(_item(b_, i, ch), window) for i in range(b.shape[0]) for ch in range(b.shape[1])]
            self.key, self.ref = key, weakref.ref(b)
        return self.stats


_FIXED_STATS = _FixedStats()


class _FastLNCC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, weight: Tensor | None, window: tuple[int, int, int], eps: float) -> Tensor:
        fwd, _, stats_fn = loader.kernels()["lncc"]
        a_, b_ = a.detach().contiguous(), b.detach().contiguous()
        b_stats = _FIXED_STATS.get(b, window, stats_fn)
        w_ = None if weight is None else weight.detach().double().contiguous()
        n, c = max(a.shape[0], b.shape[0]), a.shape[1]
        values, terms, totals = [], [], []
        for i in range(n):
            w_i = np.ones((1, 1, 1)) if w_ is None else _item(w_, i, 0)
            # The weighted mean runs over channels and voxels, as _weighted_mean's.
            totals.append(c * max(float(a_[0, 0].numel()) if w_ is None else float(w_i.sum()), 1e-8))
            s = 0.0
            for ch in range(c):
                stats = b_stats[(i if b.shape[0] > 1 else 0) * b.shape[1] + ch]
                value, t = fwd(_item(a_, i, ch), _item(b_, i, ch), w_i, window, eps, stats)
                s += value
                terms.append(t)
            values.append(1.0 - s / totals[-1])
        ctx.window, ctx.terms, ctx.totals, ctx.n = window, terms, totals, n
        ctx.save_for_backward(a_, b_)
        return torch.tensor(sum(values) / n, dtype=a.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        _, grad_fn, _ = loader.kernels()["lncc"]
        a_, b_ = ctx.saved_tensors
        c = a_.shape[1]
        grad = torch.empty((ctx.n, c, *a_.shape[2:]), dtype=a_.dtype)
        scale = float(grad_out) / ctx.n
        for i in range(ctx.n):
            for ch in range(c):
                out = grad[i, ch].numpy()
                grad_fn(
                    _item(a_, i, ch), _item(b_, i, ch), ctx.terms[i * c + ch], ctx.window, scale / ctx.totals[i], out
                )
        if a_.shape[0] == 1 and ctx.n > 1:
            grad = grad.sum(0, keepdim=True)
        return grad, None, None, None, None


def fast_lncc(
    a: Tensor, b: Tensor, window: tuple[int, int, int], mask: Tensor | None = None, eps: float = 1e-8
) -> Tensor:
    """:func:`stnreg.losses.lncc_loss` of 3D images by the numba kernels; the gradient flows to ``a`` only.

    Args:
        a, b: ``(N, C, D, H, W)`` float on the CPU (a batch of 1 broadcasts).
        window: odd window per axis, array order.
        mask: ``(N or 1, 1, D, H, W)`` voxel weights, or ``None``.
    """
    return _FastLNCC.apply(a, b, mask, tuple(int(k) for k in window), float(eps))
