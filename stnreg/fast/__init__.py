"""Fast paths behind the public warp API, chosen automatically when they apply.

:func:`fused_affine_warp` samples an image through a matrix transform with the coordinates made
on the fly (no grid tensor) and returns the transform's gradient directly in the backward pass.
It runs numba kernels on the CPU; elsewhere (or with ``STNREG_FAST=0``, or without numba) the
reference ``affine_grid`` + ``grid_sample`` path runs, after a one-line notice the first time.
The two agree to float32 rounding (see ``tests/test_fast.py``).
"""

from __future__ import annotations

import math
import os
import sys

import torch
from torch import Tensor

from .._checks import check_batch

__all__ = ["fast_available", "fused_affine_loss", "fused_affine_warp"]

_NOTICE_GIVEN = False
_KERNELS = None


def _kernels():
    """Import (and JIT-compile on first use) the numba kernels; ``None`` where they cannot run."""
    global _KERNELS, _NOTICE_GIVEN
    if _KERNELS is None:
        try:
            import numba

            if "NUMBA_THREADING_LAYER" not in os.environ:
                # A pool that sleeps between calls: OpenMP's spinning workers slowed everything else.
                numba.config.THREADING_LAYER = "workqueue"
            from . import affine_cpu

            _KERNELS = affine_cpu
        except Exception as err:  # numba missing, or an unsupported platform
            _KERNELS = False
            if not _NOTICE_GIVEN:
                reason = f"{type(err).__name__}: {err}"
                print(f"stnreg: fast CPU warps unavailable ({reason}); using grid_sample", file=sys.stderr)
                _NOTICE_GIVEN = True
    return _KERNELS or None


def fast_available(image: Tensor, padding: str) -> bool:
    """Whether :func:`fused_affine_warp` can take this image and padding mode."""
    if os.environ.get("STNREG_FAST", "1") == "0":
        return False
    if image.device.type != "cpu" or image.dtype not in (torch.float32, torch.float64):
        return False
    if padding not in ("zeros", "border"):
        return False
    return _kernels() is not None


def _kernel(name: str):
    """The parallel kernel for several torch threads, its serial twin for one."""
    import numba

    k = _kernels()
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if threads == 1:
        return k.SERIAL[name]
    numba.set_num_threads(threads)
    return getattr(k, name)


class _FusedAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: Tensor, theta: Tensor, out_shape: tuple[int, ...], border: bool) -> Tensor:
        img = image.detach().contiguous()
        th = theta.detach().to(torch.float64).contiguous()
        out = torch.empty((image.shape[0], image.shape[1], *out_shape), dtype=image.dtype)
        fwd = _kernel("affine2d_forward" if len(out_shape) == 2 else "affine3d_forward")
        fwd(img.numpy(), th.numpy(), out.numpy(), border)
        ctx.save_for_backward(img, th)
        ctx.border = border
        ctx.theta_dtype = theta.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        k = _kernels()
        img, th = ctx.saved_tensors
        go = grad_out.contiguous().to(img.dtype)
        d = img.dim() - 2
        grad_img = grad_theta = None
        if ctx.needs_input_grad[1]:
            partial = torch.zeros((img.shape[0], go.shape[2], d, d + 1), dtype=torch.float64)
            fn = _kernel("affine2d_grad_theta" if d == 2 else "affine3d_grad_theta")
            fn(img.numpy(), th.numpy(), go.numpy(), partial.numpy(), ctx.border)
            grad_theta = partial.sum(1).to(ctx.theta_dtype)
        if ctx.needs_input_grad[0]:
            gimg = torch.zeros(img.shape, dtype=torch.float64)
            fn = k.affine2d_grad_image if d == 2 else k.affine3d_grad_image
            fn(th.numpy(), go.double().numpy(), gimg.numpy(), ctx.border)
            grad_img = gimg.to(img.dtype)
        return grad_img, grad_theta, None, None


def fused_affine_warp(image: Tensor, theta: Tensor, out_shape: tuple[int, ...], padding: str = "zeros") -> Tensor:
    """``grid_sample(image, affine_grid(theta, out_shape))`` without the grid, ``align_corners=False``.

    Args:
        image: ``(N, C, H, W)`` or ``(N, C, D, H, W)`` float32/float64 on the CPU.
        theta: ``(N or 1, d, d+1)`` map from output to input normalized coordinates.
        out_shape: output spatial shape, array order.
        padding: ``"zeros"`` or ``"border"``.
    """
    n = check_batch(image.shape[0], theta.shape[0], "image and transform")
    if image.shape[0] != n:
        image = image.expand(n, *image.shape[1:])
    if theta.shape[0] != n:
        theta = theta.expand(n, *theta.shape[1:])
    return _FusedAffine.apply(image, theta, tuple(int(s) for s in out_shape), padding == "border")


def _loss_pass(img: Tensor, fixed: Tensor, th: Tensor, border: bool, coef: tuple[float, float, float]):
    n, od = img.shape[0], fixed.shape[2]
    grad = torch.zeros((n, od, 3, 4), dtype=torch.float64)
    stats = torch.zeros((n, od, 3), dtype=torch.float64)
    _kernel("affine3d_loss")(
        img.numpy(),
        fixed.numpy(),
        th.numpy(),
        border,
        torch.tensor(coef, dtype=torch.float64).numpy(),
        grad.numpy(),
        stats.numpy(),
    )
    return stats.sum(1), grad.sum(1)


class _FusedAffineLoss(torch.autograd.Function):
    """Similarity of ``image`` warped by θ against ``fixed``, with ``∂/∂θ`` computed in the forward."""

    @staticmethod
    def forward(ctx, image: Tensor, fixed: Tensor, theta: Tensor, loss: str, border: bool) -> Tensor:
        img = image.detach().contiguous()
        fix = fixed.detach().to(img.dtype).contiguous()
        th = theta.detach().to(torch.float64).contiguous()
        n = img.shape[0]
        count = fix[0].numel()  # channels x voxels per item
        sf = fix.reshape(n, -1).double().sum(1)
        sff = fix.reshape(n, -1).double().square().sum(1)
        if loss == "mse":
            # (v - f)^2 averaged: one pass gives Σvv and Σvf, and the gradient weight 2 (v - f) / n.
            stats, grad = _loss_pass(img, fix, th, border, (-2.0 / (count * n), 2.0 / (count * n), 0.0))
            value = ((stats[:, 1] - 2 * stats[:, 2] + sff) / count).mean()
        else:
            stats, _ = _loss_pass(img, fix, th, border, (0.0, 0.0, 0.0))
            grads, values = [], []
            for i in range(n):
                sv, svv, svf = stats[i].tolist()
                mv, mf = sv / count, float(sf[i]) / count
                cov = svf / count - mv * mf
                var_v = max(svv / count - mv * mv, 1e-12)
                var_f = max(float(sff[i]) / count - mf * mf, 1e-12)
                r = cov / math.sqrt(var_v * var_f)
                values.append(1.0 - r)
                # d(1 - r)/dv = -[(f - mf) / sqrt(var_v var_f) - r (v - mv) / var_v] / count, batch-averaged.
                s = math.sqrt(var_v * var_f)
                a, b = -1.0 / (s * count * n), r / (var_v * count * n)
                c = (mf / s - r * mv / var_v) / (count * n)
                _, g = _loss_pass(img[i : i + 1], fix[i : i + 1], th[i : i + 1], border, (a, b, c))
                grads.append(g)
            grad = torch.cat(grads)
            value = torch.tensor(values, dtype=torch.float64).mean()
        ctx.save_for_backward(grad)
        ctx.theta_dtype = theta.dtype
        return value.to(image.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return None, None, (grad * float(grad_out)).to(ctx.theta_dtype), None, None


def fused_affine_loss(
    image: Tensor, fixed: Tensor, theta: Tensor, loss: str = "mse", padding: str = "border"
) -> Tensor:
    """``mse_loss`` or ``ncc_loss`` of ``image`` warped by θ against ``fixed``, without a grid or a warped image.

    3D only; the gradient flows to ``theta`` alone (the image must not require one).

    Args:
        image: ``(N, C, D, H, W)`` moving image, float32/float64, CPU.
        fixed: ``(N, C, D', H', W')`` fixed image; its shape is the output lattice.
        theta: ``(N, 3, 4)`` output-normalized -> input-normalized map (``affine_grid``'s θ).
        loss: ``"mse"`` or ``"ncc"`` (``1 - NCC``, averaged over the batch, as :mod:`stnreg.losses`).
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
    return _FusedAffineLoss.apply(image, fixed, theta, loss, padding == "border")
