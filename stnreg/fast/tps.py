"""Warps by a 3D thin-plate spline evaluated per voxel from its coefficients (an autograd Function).

No ``voxels x K`` basis exists (:mod:`.tps_cpu`), and the backward returns ``∂L/∂coefficients`` directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_batch
from . import loader
from .buffers import buffer, coefficient_gradient, flat, image_and_coefficients

__all__ = ["fused_tps_warp"]


class _FusedTPS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, coef, control_points, p, m, out_shape, border):
        img, cf = image_and_coefficients(image, coef)
        n = img.shape[0]
        cp = control_points.detach().to(torch.float64).contiguous()
        pp = p.to(torch.float64).contiguous()
        mm = m.to(torch.float64).expand(n, 3, 4).contiguous()
        out = buffer((n, img.shape[1], *out_shape), img.dtype)
        args = (flat(img).numpy(), cf.numpy(), cp.numpy(), pp.numpy(), mm.numpy(), out.numpy())
        loader.kernel("tps3d_forward")(n, out_shape[0], *args, *img.shape[2:], border)
        ctx.save_for_backward(img, cf, cp, pp, mm)
        ctx.border, ctx.coef_shape, ctx.coef_dtype = border, coef.shape, coef.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        img, cf, cp, pp, mm = ctx.saved_tensors
        grad_coef = None
        if ctx.needs_input_grad[1]:
            go = grad_out.contiguous().to(img.dtype)
            n, od = go.shape[0], go.shape[2]
            partial = torch.zeros((n, od, *cf.shape[1:]), dtype=torch.float64)
            args = (flat(img).numpy(), cf.numpy(), cp.numpy(), pp.numpy(), mm.numpy(), go.numpy(), partial.numpy())
            loader.kernel("tps3d_grad")(n, od, *args, *img.shape[2:], ctx.border)
            # Slices summed in order on one thread: the same bits for any thread count.
            grad = partial.sum(1)
            grad_coef = coefficient_gradient(grad, ctx.coef_shape, ctx.coef_dtype)
        return None, grad_coef, None, None, None, None, None


def fused_tps_warp(
    image: Tensor,
    coef: Tensor,
    control_points: Tensor,
    p: Tensor,
    m: Tensor,
    out_shape: tuple[int, int, int],
    padding: str = "zeros",
) -> Tensor:
    """Warp by a 3D thin-plate spline evaluated on the fly: the kernel behind :func:`stnreg.warp` for TPS.

    Output voxel ``i = (x, y, z)`` is the domain point ``q = p [i; 1]``, the spline maps it to
    ``T(q)`` (see :mod:`stnreg.fast.tps_cpu`), and the input pixel position is ``m [T(q); 1]``.
    :meth:`stnreg.transforms.ThinPlateSpline.fast_warp_args` builds every argument.

    Args:
        image: ``(N, C, D, H, W)`` float32/float64 on the CPU; it gets no gradient (it must not need one).
        coef: ``(N or 1, K + 4, 3)`` spline coefficients (:meth:`ThinPlateSpline.coefficients`); the
            gradient flows to them.
        control_points: ``(K, 3)`` in domain coordinates, ``(x, y, z)`` order.
        p: ``(3, 4)`` output index to domain point; ``m``: ``(N or 1, 3, 4)`` domain point to input
            pixel (float64, no gradient).
        out_shape: ``(D', H', W')``.
        padding: ``"zeros"`` or ``"border"``.
    """
    if image.requires_grad:
        raise ValueError("fused_tps_warp returns no image gradient; detach the image or use sample()")
    k = control_points.shape[0]
    if coef.dim() != 3 or tuple(coef.shape[1:]) != (k + 4, 3):
        raise ValueError(f"need coefficients (N, {k + 4}, 3) for {k} control points, got {tuple(coef.shape)}")
    check_batch(image.shape[0], coef.shape[0], "image and coefficients")
    n = max(image.shape[0], coef.shape[0], m.shape[0])
    image = image.expand(n, *image.shape[1:]) if image.shape[0] != n else image
    return _FusedTPS.apply(image, coef, control_points, p, m, tuple(int(s) for s in out_shape), padding == "border")
