"""Warps by a cubic B-spline evaluated on the fly from its coefficients (an autograd Function).

Separable per row on output lattices aligned with the control grid (:mod:`.bspline_cpu`): no
displacement field and no grid exist, and the backward returns ``∂L/∂coefficients`` directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_batch
from . import loader
from .buffers import buffer, coefficient_gradient, flat, image_and_coefficients

__all__ = ["fused_bspline_warp"]


class _FusedBSpline(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, coef, k, r, tables, out_shape, border):
        img, cf = image_and_coefficients(image, coef)
        n = img.shape[0]
        kk = k.to(torch.float64).expand(n, 3, 4).contiguous()
        rr = r.to(torch.float64).expand(n, 3, 3).contiguous()
        tabs = tuple(t.contiguous().numpy() for t in tables)
        out = buffer((n, img.shape[1], *out_shape), img.dtype)
        args = (flat(img).numpy(), cf.numpy(), *tabs, kk.numpy(), rr.numpy(), out.numpy(), *img.shape[2:], border)
        loader.kernel("bspline3d_forward")(n, out_shape[0], *args)
        ctx.save_for_backward(img, cf, kk, rr)
        ctx.tabs, ctx.border, ctx.coef_shape, ctx.coef_dtype = tabs, border, coef.shape, coef.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        img, cf, kk, rr = ctx.saved_tensors
        grad_coef = None
        if ctx.needs_input_grad[1]:
            go = grad_out.contiguous().to(img.dtype)
            n, od = go.shape[0], go.shape[2]
            partial = torch.zeros((n, od, 3, cf.shape[3], cf.shape[4]), dtype=torch.float64)
            args = (flat(img).numpy(), cf.numpy(), *ctx.tabs, kk.numpy(), rr.numpy(), go.numpy(), partial.numpy())
            loader.kernel("bspline3d_grad")(n, od, *args, *img.shape[2:], ctx.border)
            grad = torch.zeros_like(cf)
            loader.kernels()["bspline3d_spread_z"](partial.numpy(), ctx.tabs[4], ctx.tabs[5], grad.numpy())
            grad_coef = coefficient_gradient(grad, ctx.coef_shape, ctx.coef_dtype)
        return None, grad_coef, None, None, None, None, None


def fused_bspline_warp(
    image: Tensor,
    coef: Tensor,
    k: Tensor,
    r: Tensor,
    tables: tuple[Tensor, ...],
    out_shape: tuple[int, int, int],
    padding: str = "zeros",
) -> Tensor:
    """Warp by a cubic B-spline evaluated on the fly: the kernel behind :func:`stnreg.warp` for B-splines.

    The input pixel position of output voxel ``i = (x, y, z)`` is ``K [i; 1] + R disp(i)``, with
    ``disp`` the B-spline displacement (``(x, y, z)`` components) whose separable weights are given
    per axis. :meth:`stnreg.transforms.BSpline.fast_warp_args` builds every argument.

    Args:
        image: ``(N, C, D, H, W)`` float32/float64 on the CPU; it gets no gradient (it must not need one).
        coef: ``(N or 1, 3, cz, cy, cx)`` coefficients; the gradient flows to them.
        k: ``(N or 1, 3, 4)`` and ``r``: ``(N or 1, 3, 3)`` float64, as above (no gradient).
        tables: ``(x_index, x_weight, y_index, y_weight, z_index, z_weight)``, each ``(n_axis, 4)``:
            the control indices (int64, clamped) and cubic weights (float64) of every output index.
        out_shape: ``(D', H', W')``.
        padding: ``"zeros"`` or ``"border"``.
    """
    if image.requires_grad:
        raise ValueError("fused_bspline_warp returns no image gradient; detach the image or use sample()")
    check_batch(image.shape[0], coef.shape[0], "image and coefficients")
    n = max(image.shape[0], coef.shape[0], k.shape[0])
    image = image.expand(n, *image.shape[1:]) if image.shape[0] != n else image
    return _FusedBSpline.apply(image, coef, k, r, tables, tuple(int(s) for s in out_shape), padding == "border")
