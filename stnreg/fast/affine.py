"""Matrix warps and matrix similarities without a coordinate grid (autograd Functions).

:func:`fused_affine_warp` makes each output voxel's input position from θ on the fly and returns
``∂L/∂θ`` straight from the kernel; :func:`fused_affine_loss` adds the MSE or NCC against a fixed
image and its 12-parameter gradient in the same pass, so no warped image exists. CPU tensors run
the numba kernels (:mod:`.affine_cpu`), CUDA float32 volumes the Triton ones (:mod:`.affine_cuda`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_batch, expand_batch
from . import loader
from .buffers import buffer, check_finite, flat

__all__ = ["fused_affine_loss", "fused_affine_warp"]


class _FusedAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: Tensor, theta: Tensor, out_shape: tuple[int, ...], border: bool) -> Tensor:
        img = image.detach().contiguous()
        ctx.border = border
        ctx.theta_dtype = theta.dtype
        ctx.gpu = loader.use_triton(img)
        if ctx.gpu:
            th = theta.detach().float().contiguous()
            check_finite(th)
            ctx.save_for_backward(img, th)
            return loader.triton().forward(img, th, out_shape, border)
        th = theta.detach().to(torch.float64).contiguous()
        check_finite(th)
        out = buffer((image.shape[0], image.shape[1], *out_shape), image.dtype)
        if len(out_shape) == 2:
            loader.kernel("affine2d_forward")(img.numpy(), th.numpy(), out.numpy(), border)
        else:
            fn = loader.kernel("affine3d_forward")
            fn(out.shape[0], out.shape[2], flat(img).numpy(), th.numpy(), out.numpy(), *img.shape[2:], border)
        ctx.save_for_backward(img, th)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        img, th = ctx.saved_tensors
        go = grad_out.contiguous().to(img.dtype)
        if ctx.gpu:
            return (*_gpu_affine_backward(ctx, img, th, go), None, None)
        d = img.dim() - 2
        grad_img = grad_theta = None
        if ctx.needs_input_grad[1]:
            partial = torch.zeros((img.shape[0], go.shape[2], d, d + 1), dtype=torch.float64)
            if d == 2:
                loader.kernel("affine2d_grad_theta")(img.numpy(), th.numpy(), go.numpy(), partial.numpy(), ctx.border)
            else:
                fn = loader.kernel("affine3d_grad_theta")
                args = (flat(img).numpy(), th.numpy(), go.numpy(), partial.numpy(), *img.shape[2:], ctx.border)
                fn(go.shape[0], go.shape[2], *args)
            grad_theta = partial.sum(1).to(ctx.theta_dtype)
        if ctx.needs_input_grad[0]:
            # Accumulated in the image's dtype, as grid_sample does: a float64 buffer and copies
            # of the output gradient doubled the backward's peak memory.
            gimg = buffer(tuple(img.shape), img.dtype, zero=True)
            if d == 2:
                loader.kernels()["affine2d_grad_image"](th.numpy(), go.numpy(), gimg.numpy(), ctx.border)
            else:
                args = (th.numpy(), go.numpy(), flat(gimg).numpy(), *img.shape[2:], ctx.border)
                loader.kernels()["affine3d_grad_image"](*args)
            grad_img = gimg
        return grad_img, grad_theta, None, None


def _gpu_affine_backward(ctx, img: Tensor, th: Tensor, go: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``(∂L/∂image, ∂L/∂θ)`` of the Triton warp, both from one kernel pass over ``go``.

    The image gradient is a scatter with atomic adds, which torch counts as nondeterministic (as it
    does ``grid_sample``'s CUDA backward); under ``torch.use_deterministic_algorithms`` that gradient
    comes from ``grid_sample``'s backward, so that torch raises or warns as it would there.
    """
    want_theta, want_image = ctx.needs_input_grad[1], ctx.needs_input_grad[0]
    grad_img = None
    if want_image and torch.are_deterministic_algorithms_enabled():
        with torch.enable_grad():
            leaf = img.detach().requires_grad_()
            grid = F.affine_grid(th, [img.shape[0], 1, *go.shape[2:]], align_corners=False)
            out = F.grid_sample(leaf, grid, "bilinear", "border" if ctx.border else "zeros", align_corners=False)
            (grad_img,) = torch.autograd.grad(out, leaf, go)
        want_image = False
    grad_theta = None
    if want_theta or want_image:
        grad_theta, scattered = loader.triton().backward(img, th, go, ctx.border, want_theta, want_image)
        grad_img = scattered if want_image else grad_img
    return grad_img, None if grad_theta is None else grad_theta.to(ctx.theta_dtype)


def fused_affine_warp(image: Tensor, theta: Tensor, out_shape: tuple[int, ...], padding: str = "zeros") -> Tensor:
    """``grid_sample(image, affine_grid(theta, out_shape))`` without the grid, ``align_corners=False``.

    Args:
        image: ``(N, C, H, W)`` or ``(N, C, D, H, W)`` float32/float64 on the CPU, or a float32
            ``(N, C, D, H, W)`` CUDA tensor (see :func:`stnreg.fast.dispatch.fused_available`).
        theta: ``(N or 1, d, d+1)`` map from output to input normalized coordinates.
        out_shape: output spatial shape, array order.
        padding: ``"zeros"`` or ``"border"``.
    """
    image, theta = expand_batch(image, theta, "image and transform")
    return _FusedAffine.apply(image, theta, tuple(int(s) for s in out_shape), padding == "border")


class _FusedAffineLoss(torch.autograd.Function):
    """Similarity of ``image`` warped by θ against ``fixed``, with ``∂/∂θ`` computed in the same pass."""

    @staticmethod
    def forward(
        ctx, image: Tensor, fixed: Tensor, theta: Tensor, loss: str, border: bool, reduce: bool, overlap: bool
    ) -> Tensor:
        img = image.detach().contiguous()
        fix = fixed.detach().to(img.dtype).contiguous()
        n, od = img.shape[0], fix.shape[2]
        if loader.use_triton(img):
            th = theta.detach().float().contiguous()
            check_finite(th)
            stats, parts = loader.triton().loss_sums(img, fix, th, border, loss == "ncc")
            count = torch.full((n, 1), float(fix[0].numel()), dtype=stats.dtype, device=stats.device)
        else:
            th = theta.detach().to(torch.float64).contiguous()
            check_finite(th)
            stats = torch.zeros((n, od, 6), dtype=torch.float64)
            parts = torch.zeros((n, od, 3, 3, 4), dtype=torch.float64)
            fn = loader.kernel(f"affine3d_{loss}{'_overlap' if overlap else ''}")
            fn(n, od, flat(img).numpy(), fix.numpy(), th.numpy(), *img.shape[2:], border, stats.numpy(), parts.numpy())
            # Slice partials summed in slice order: the same bits for any thread count.
            stats, parts = stats.sum(1), parts.sum(1)
            stats, count = stats[:, :5], stats[:, 5:]
        # An item without overlap scores +inf (a line search then backs off), with no gradient.
        empty = (count == 0).reshape(n)
        count = count.clamp_min(1)
        # Channels x voxels per item that count: all of them, or those mapped inside (overlap).
        # A batch mean divides each item's gradient by n; per-item values (reduce=False) do not.
        n_mean = n if reduce else 1
        # Means of v, v², v f, f, f² per item. Few ops on purpose: on a GPU each is a launch.
        mv, mvv, mvf, mf, mff = (stats / count).unbind(1)
        count = count.reshape(n, 1, 1)
        if loss == "mse":
            # mean (v - f)^2 per item, averaged over the batch; d/dv = 2 (v - f) / (count n).
            value = mvv - 2 * mvf + mff
            grad = parts[:, 0] * (2.0 / (count * n_mean))  # the kernel's Σ (v - f) ∂v/∂θ
        else:
            var_v = (mvv - mv * mv).clamp_min(1e-12)
            var_f = (mff - mf * mf).clamp_min(1e-12)
            sd = (var_v * var_f).sqrt()
            r = (mvf - mv * mf) / sd
            value = 1.0 - r
            # d(1 - r)/dv = -[(f - mf) / sd - r (v - mv) / var_v] / count, batch-averaged: the
            # coefficients of the kernel's Σ f ∂v/∂θ, Σ v ∂v/∂θ and Σ ∂v/∂θ.
            k = 1.0 / (count.reshape(n) * n_mean)
            coef = torch.stack((-k / sd, k * r / var_v, k * (mf / sd - r * mv / var_v)), 1)
            grad = (coef[:, :, None, None] * parts).sum(1)
        value = torch.where(empty, torch.full_like(value, math.inf), value)
        grad = torch.where(empty.reshape(n, 1, 1), torch.zeros_like(grad), grad)
        ctx.save_for_backward(grad)
        ctx.theta_dtype = theta.dtype
        return (value.mean() if reduce else value).to(image.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        # grad_out is a scalar (batch mean) or (N,) (per item): either way one factor per item.
        scaled = grad * grad_out.double().reshape(-1, 1, 1)
        return None, None, scaled.to(ctx.theta_dtype), None, None, None, None


def fused_affine_loss(
    image: Tensor,
    fixed: Tensor,
    theta: Tensor,
    loss: str = "mse",
    padding: str = "border",
    reduce: bool = True,
    overlap: bool = False,
) -> Tensor:
    """``mse_loss`` or ``ncc_loss`` of ``image`` warped by θ against ``fixed``, without a grid or a warped image.

    3D only; the gradient flows to ``theta`` alone (the image must not require one).

    Args:
        image: ``(N, C, D, H, W)`` moving image, float32/float64 on the CPU or float32 on CUDA.
        fixed: ``(N, C, D', H', W')`` fixed image; its shape is the output lattice.
        theta: ``(N, 3, 4)`` output-normalized -> input-normalized map (``affine_grid``'s θ).
        loss: ``"mse"`` or ``"ncc"`` (``1 - NCC``, averaged over the batch, as :mod:`stnreg.losses`).
        reduce: ``False`` returns the ``(N,)`` per-item values instead of their mean.
        overlap: score only the fixed voxels whose trilinear cell lies inside the moving image (ITK's
            rule; CPU kernels only).
    """
    if loss not in ("mse", "ncc"):
        raise ValueError(f"fused losses are 'mse' and 'ncc', got {loss!r}")
    if image.dim() != 5 or fixed.dim() != 5 or image.shape[:2] != fixed.shape[:2]:
        raise ValueError(
            f"need (N, C, D, H, W) images with equal N and C: {tuple(image.shape)} vs {tuple(fixed.shape)}"
        )
    if image.requires_grad:
        raise ValueError("fused_affine_loss returns no image gradient; detach the image or use warp()")
    n = check_batch(image.shape[0], theta.shape[0], "image and transform")
    theta = theta.expand(n, *theta.shape[1:]) if theta.shape[0] != n else theta
    if overlap and image.device.type != "cpu":
        raise ValueError("overlap=True is computed by the CPU kernels only")
    return _FusedAffineLoss.apply(image, fixed, theta, loss, padding == "border", reduce, overlap)
