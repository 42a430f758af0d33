"""Trilinear sampling at coordinates or along a displacement field read in place (an autograd Function).

:func:`fast_sample` is ``grid_sample`` at given coordinates; :func:`fused_field_warp` reads a
channels-first displacement in place and makes the lattice point on the fly, so neither a
channels-last copy nor a grid exists (:mod:`.field_cpu`). Both keep ``∂out/∂coords`` in the
forward (one channel always, more within ``KEEP_DERIVATIVE_MAX``) so that the backward is a
product, not a second gather pass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import expand_batch
from ..coords import normalized_to_index_matrix
from . import loader
from .buffers import buffer, flat

__all__ = ["KEEP_DERIVATIVE_MAX", "fast_sample", "fused_field_warp"]

# Multi-channel samples (fields sampled by fields in scaling and squaring) keep ∂out/∂coords, 3C
# values per output voxel, up to this many elements (64 MiB in float32); one channel always does.
KEEP_DERIVATIVE_MAX = 2**24


class _FieldSample(torch.autograd.Function):
    """Trilinear sampling at ``K (x, y, z, 1) + R u`` (see :mod:`.field_cpu`), gradients to the image and ``u``.

    ``u`` is ``(N, D', H', W', 3)`` (sampling coordinates) or, with ``channels_first``,
    ``(N, 3, D', H', W')`` (a displacement field, read in place).
    """

    @staticmethod
    def forward(ctx, image: Tensor, u: Tensor, k: Tensor, r: Tensor, border: bool, channels_first: bool) -> Tensor:
        img = image.detach().contiguous()
        vec = u.detach().contiguous()
        # A sum is finite exactly when no element is NaN or infinite (bar overflow of absurd
        # values), and costs a twentieth of isfinite().all() on a 3D grid.
        if not bool(torch.isfinite(vec.sum())):
            raise ValueError("sampling coordinates or displacements contain NaN or infinity")
        n, c = img.shape[:2]
        out_shape = tuple(vec.shape[2:] if channels_first else vec.shape[1:4])
        ctx.layout = (1, math.prod(out_shape)) if channels_first else (3, 1)
        kk = k.detach().to(torch.float64).expand(n, 3, 4).contiguous()
        rr = r.detach().to(torch.float64).expand(n, 3, 3).contiguous()
        ctx.border = border
        ctx.save_for_backward(img, vec, kk, rr)
        ctx.dv = ctx.dv_layout = None
        if ctx.needs_input_grad[1] and (c == 1 or n * c * math.prod(out_shape) * 3 <= KEEP_DERIVATIVE_MAX):
            # One pass that keeps ∂out/∂u: the backward needs no second gather. With one channel
            # it lies in u's own layout, and the backward turns it into u's gradient in place (no
            # fresh 3-vector-per-voxel buffer: 20 ms of page faults on a 1 mm brain). Kept outside
            # save_for_backward, since that backward overwrites it.
            ctx.dv_layout = (ctx.layout[0], 0, ctx.layout[1]) if c == 1 else (3 * c, 3, 1)
            out, ctx.dv = _FieldSample._forward(ctx, img, vec, kk, rr, out_shape, keep=True)
            return out
        return _FieldSample._forward(ctx, img, vec, kk, rr, out_shape, keep=False)[0]

    @staticmethod
    def _field(ctx, vec: Tensor, kk: Tensor, rr: Tensor) -> tuple:
        """The kernels' field arguments: ``u`` flat per item, its layout strides, ``K`` and ``R``."""
        return (vec.reshape(vec.shape[0], -1).numpy(), *ctx.layout, kk.numpy(), rr.numpy())

    @staticmethod
    def _forward(ctx, img: Tensor, vec: Tensor, kk: Tensor, rr: Tensor, out_shape: tuple, keep: bool):
        """The output and, with ``keep``, ``∂out/∂u`` in ``ctx.dv_layout``."""
        n, c = img.shape[:2]
        out = buffer((n, c, *out_shape), img.dtype)
        field = _FieldSample._field(ctx, vec, kk, rr)
        dims = (*img.shape[2:], ctx.border)
        if not keep:
            loader.kernel("field3d_forward")(n, out_shape[0], flat(img).numpy(), *field, out.numpy(), *dims)
            return out, None
        dv = buffer(tuple(vec.shape) if c == 1 else (n, *out_shape, c, 3), vec.dtype)
        args = (flat(img).numpy(), *field, out.numpy(), dv.reshape(n, -1).numpy(), *ctx.dv_layout, *dims)
        loader.kernel("field3d_forward_grad")(n, out_shape[0], *args)
        return out, dv

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        img, vec, kk, rr = ctx.saved_tensors
        go = grad_out.contiguous().to(img.dtype)
        n = go.shape[0]
        grad_img = grad_u = None
        if ctx.needs_input_grad[1] and ctx.dv_layout is not None:
            dv = ctx.dv
            if dv is None:
                # A second backward through the graph (retain_graph): the same kernel makes ∂out/∂u
                # again, so the gradient comes out bit for bit.
                dv = _FieldSample._forward(ctx, img, vec, kk, rr, tuple(go.shape[2:]), keep=True)[1]
            # One channel: the product overwrites dv with the gradient. Dropped either way, as
            # saved tensors are after a backward: the graph may outlive this pass.
            grad_u = dv if ctx.dv_layout[1] == 0 else buffer(tuple(vec.shape), vec.dtype)  # u's layout
            ctx.dv = None
            args = (dv.reshape(n, -1).numpy(), *ctx.dv_layout, go.numpy(), grad_u.reshape(n, -1).numpy(), *ctx.layout)
            loader.kernel("field3d_chain")(n, go.shape[2], *args)
        elif ctx.needs_input_grad[1]:
            grad_u = buffer(tuple(vec.shape), vec.dtype)
            field = _FieldSample._field(ctx, vec, kk, rr)
            args = (flat(img).numpy(), *field, go.numpy(), grad_u.reshape(n, -1).numpy(), *img.shape[2:], ctx.border)
            loader.kernel("field3d_grad_u")(n, go.shape[2], *args)
        if ctx.needs_input_grad[0]:
            grad_img = buffer(tuple(img.shape), img.dtype, zero=True)
            shape = tuple(int(s) for s in img.shape[2:])
            field = _FieldSample._field(ctx, vec, kk, rr)
            loader.kernels()["field3d_grad_image"](shape, *field, go.numpy(), flat(grad_img).numpy(), ctx.border)
        return grad_img, grad_u, None, None, None, None


def _field_sample(image: Tensor, u: Tensor, k: Tensor, r: Tensor, border: bool, channels_first: bool) -> Tensor:
    if not torch.is_grad_enabled():
        # Under no_grad the Function still sees the inputs' requires_grad and would keep ∂out/∂u.
        image, u = image.detach(), u.detach()
    return _FieldSample.apply(image, u, k, r, border, channels_first)


def fast_sample(image: Tensor, coords: Tensor, padding: str = "zeros") -> Tensor:
    """``grid_sample(image, coords, align_corners=False)``, trilinear, with the numba kernels.

    Args:
        image: ``(N, C, D, H, W)`` float32/float64 on the CPU.
        coords: ``(N, D', H', W', 3)`` normalized ``(x, y, z)`` coordinates, the image's dtype
            (a batch of 1 on either side broadcasts).
        padding: ``"zeros"`` or ``"border"``.

    Returns:
        ``(N, C, D', H', W')``; gradients flow to the image and the coordinates.
    """
    image, coords = expand_batch(image, coords, "image and coordinates")
    # Coordinates are u itself: K is the constant part of the normalized-to-pixel map, R its scale.
    m = normalized_to_index_matrix(tuple(image.shape[2:]))
    k = torch.cat([torch.zeros(3, 3, dtype=torch.float64), m[:3, 3:]], 1)[None]
    return _field_sample(image, coords.to(image.dtype), k, m[None, :3, :3], padding == "border", False)


def fused_field_warp(image: Tensor, field: Tensor, k: Tensor, r: Tensor, padding: str = "zeros") -> Tensor:
    """Warp by a displacement field on the output lattice, reading the field in place (no grid).

    Output voxel ``(x, y, z)`` samples the input at pixel position ``K (x, y, z, 1) + R u(x, y, z)``.

    Args:
        image: ``(N, C, D, H, W)`` float32/float64 on the CPU.
        field: ``(N, 3, D', H', W')`` displacement, channels ``(x, y, z)``, in the units ``R`` takes;
            its lattice is the output's (a batch of 1 on either side broadcasts).
        k: ``(N or 1, 3, 4)`` output index ``(x, y, z, 1)`` to the input pixel position of the
            lattice point (float64).
        r: ``(N or 1, 3, 3)`` displacement units to input pixels (float64).
        padding: ``"zeros"`` or ``"border"``.

    Returns:
        ``(N, C, D', H', W')``; gradients flow to the image and the field.
    """
    image, field = expand_batch(image, field, "image and displacement field")
    return _field_sample(image, field.to(image.dtype), k, r, padding == "border", True)
