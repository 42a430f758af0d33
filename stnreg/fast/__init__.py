"""Fast paths behind the public API, chosen automatically when they apply (3D, CPU, float).

- :func:`fused_affine_warp` (used by :func:`stnreg.warp` for matrix transforms): the coordinates
  are made on the fly from θ (no grid tensor) and the backward returns ``∂L/∂θ`` directly, the
  image gradient only when the image needs one.
- :func:`fused_affine_loss` (used by :func:`stnreg.register` for matrix stages with MSE/NCC):
  warp, similarity and the 12-parameter gradient in one pass, no warped image.
- :func:`fused_bspline_warp` (used by :func:`stnreg.warp` for cubic B-splines on aligned
  lattices, after any matrices): the displacement is evaluated on the fly from the coefficients,
  separably per row, and the backward returns ``∂L/∂coefficients`` directly.
- :func:`fused_tps_warp` (used by :func:`stnreg.warp` for 3D thin-plate splines, after any
  matrices): the spline is evaluated per voxel from its coefficients, so no ``voxels x K`` basis
  exists, and the backward returns ``∂L/∂coefficients`` directly.
- :func:`fused_field_warp` (used by :func:`stnreg.warp` for displacement and stationary velocity
  fields on the output's lattice, after any constant matrices): the field is read in place, in its
  channel-first layout, and the lattice point made on the fly, so neither a channels-last copy nor
  a grid exists; gradients go to the field (and to the image when it needs one).
- :func:`fast_sample` (used by :func:`stnreg.sample`, so by every other dense, B-spline and TPS warp):
  trilinear sampling at given coordinates. Both keep ``∂out/∂coords`` in the forward (one channel
  always, more within ``_KEEP_DERIVATIVE_MAX``) so the backward is a product, not a second gather pass.
- :func:`fast_lncc` (used by :func:`stnreg.losses.lncc_loss`): box filters by running sums and the
  loss's gradient in closed form, instead of autograd through cumulative sums.

All run numba kernels on the CPU (compiled on first use and cached on disk). On CUDA, float32 3D
volumes take Triton kernels for the two fused matrix paths (:mod:`stnreg.fast.affine_cuda`; one
backward pass gives θ's gradient and scatters the image's when one is needed). Elsewhere (other CUDA
cases, 2D, reflection padding), with ``STNREG_FAST=0``, or without numba / Triton, the reference
torch path runs, after a one-line notice the first time a kernel library is missing. Fast and
reference paths agree to float32 rounding, gradients included (``tests/test_fast.py``,
``tests/test_fast_cuda.py``). Results are deterministic: threads split output slices that each
write their own outputs, partial sums are added in a fixed order, and the scatters of image
gradients run on one thread, so 1 and 2 threads give the same bits. The Triton kernels write one
row of partial sums per program, except the image gradient's scatter, which adds with atomics as
``grid_sample``'s CUDA backward does; under ``torch.use_deterministic_algorithms`` that gradient
comes from ``grid_sample`` instead, where torch applies its own rule.
"""

from __future__ import annotations

import math
import os
import sys
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import all_finite, check_batch, expand_batch
from ..coords import normalized_to_index_matrix

__all__ = [
    "fast_available",
    "fast_cubic",
    "fast_lncc",
    "fast_sample",
    "fused_affine_loss",
    "fused_affine_warp",
    "fused_available",
    "fused_bspline_warp",
    "fused_field_warp",
    "fused_tps_warp",
]

_NOTICE_GIVEN = False
_KERNELS = None
_TRITON = None
_TRITON_NOTICE_GIVEN = False


def _drop_stale_kernel_caches() -> None:
    """Delete numba cache files in this package that are older than any kernel source.

    numba keys each cached kernel on its own module's file only, not on the helpers it inlines from
    :mod:`.trilinear`: after an edit there (or a ``git pull`` into an editable install that changed
    only that file), the old machine code would load silently. Where the package directory is
    read-only, numba caches elsewhere and every install rewrites all sources anyway.
    """
    here = Path(__file__).resolve().parent
    newest = max(f.stat().st_mtime for f in here.glob("*.py"))
    for f in (*here.glob("__pycache__/*.nbi"), *here.glob("__pycache__/*.nbc")):
        try:
            if f.stat().st_mtime < newest:
                f.unlink()
        except OSError:  # read-only, or removed by a concurrent process
            pass


def _kernels():
    """Import (and JIT-compile on first use) the numba kernels; ``None`` where they cannot run."""
    global _KERNELS, _NOTICE_GIVEN
    if _KERNELS is None:
        try:
            import numba

            if "NUMBA_THREADING_LAYER" not in os.environ:
                # A pool that sleeps between calls: OpenMP's spinning workers slowed everything else.
                numba.config.THREADING_LAYER = "workqueue"
            _drop_stale_kernel_caches()
            from . import affine_cpu, bspline_cpu, cubic_cpu, field_cpu, lncc_cpu, tps_cpu

            _KERNELS = {
                **affine_cpu.KERNELS,
                **field_cpu.KERNELS,
                **bspline_cpu.KERNELS,
                **tps_cpu.KERNELS,
                **cubic_cpu.KERNELS,
            }
            _KERNELS["field3d_grad_image"] = field_cpu.grad_image
            _KERNELS["bspline3d_spread_z"] = bspline_cpu.spread_z
            _KERNELS["affine2d_grad_image"] = affine_cpu.affine2d_grad_image
            _KERNELS["affine3d_grad_image"] = affine_cpu.affine3d_grad_image
            _KERNELS["lncc"] = (lncc_cpu.lncc_forward, lncc_cpu.lncc_grad, lncc_cpu.fixed_stats)
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


def _triton():
    """The Triton kernel module (:mod:`stnreg.fast.affine_cuda`); ``None`` where Triton cannot run."""
    global _TRITON, _TRITON_NOTICE_GIVEN
    if _TRITON is None:
        try:
            from . import affine_cuda

            _TRITON = affine_cuda
        except Exception as err:  # triton missing (CPU-only torch wheels do not bring it)
            _TRITON = False
            if not _TRITON_NOTICE_GIVEN:
                reason = f"{type(err).__name__}: {err}"
                print(f"stnreg: fast GPU warps unavailable ({reason}); using grid_sample", file=sys.stderr)
                _TRITON_NOTICE_GIVEN = True
    return _TRITON or None


def _use_triton(image: Tensor) -> bool:
    """Whether ``image`` goes to the Triton kernels: CUDA tensors (the tests route CPU ones to the interpreter)."""
    return image.device.type == "cuda"


def fused_available(image: Tensor, padding: str) -> bool:
    """Whether :func:`fused_affine_warp` and :func:`fused_affine_loss` take this image and padding.

    CPU: float32/float64, 2D or 3D (numba). CUDA: float32 3D with at least 2 voxels along each axis
    (Triton; its cells always read two voxels per axis).
    """
    if os.environ.get("STNREG_FAST", "1") == "0" or padding not in ("zeros", "border"):
        return False
    if _use_triton(image):
        if image.dim() != 5 or image.dtype != torch.float32 or min(image.shape[2:]) < 2:
            return False
        return _triton() is not None
    return fast_available(image, padding)


def _kernel(name: str):
    """The threaded kernel for several torch threads, its serial twin for one."""
    import numba

    threaded, serial = _kernels()[name]
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if threads == 1:
        return serial
    numba.set_num_threads(threads)
    return threaded


def _flat(img: Tensor) -> Tensor:
    """``(N, C, D, H, W)`` -> ``(N, C, D*H*W)`` (a view of a contiguous tensor), the 3D kernels' layout."""
    return img.reshape(*img.shape[:2], -1)


# glibc serves allocations above its largest mmap threshold (32 MiB) with a fresh mmap each time, so
# every such buffer pays a 4 KiB page fault per page on first touch: 20 ms for the 82 MB field
# derivative of a 1 mm brain, a fifth of the warp. numpy asks the kernel for transparent huge pages
# on its large buffers (madvise), which cuts that to 3 ms (measured); smaller buffers are reused
# from the heap and need nothing.
_HUGE_PAGE_MIN_BYTES = 32 * 2**20
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, zero: bool = False) -> Tensor:
    """A CPU tensor for a kernel to fill: ``torch.empty`` / ``torch.zeros``, or numpy's huge-page
    memory for float buffers over ``_HUGE_PAGE_MIN_BYTES``."""
    if dtype in _NUMPY_DTYPES and math.prod(shape) * dtype.itemsize >= _HUGE_PAGE_MIN_BYTES:
        return torch.from_numpy((np.zeros if zero else np.empty)(shape, _NUMPY_DTYPES[dtype]))
    return (torch.zeros if zero else torch.empty)(shape, dtype=dtype)


def _check_finite(theta: Tensor) -> None:
    if not all_finite(theta):
        raise ValueError("transform parameters contain NaN or infinity")


class _FusedAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: Tensor, theta: Tensor, out_shape: tuple[int, ...], border: bool) -> Tensor:
        img = image.detach().contiguous()
        ctx.border = border
        ctx.theta_dtype = theta.dtype
        ctx.gpu = _use_triton(img)
        if ctx.gpu:
            th = theta.detach().float().contiguous()
            _check_finite(th)
            ctx.save_for_backward(img, th)
            return _triton().forward(img, th, out_shape, border)
        th = theta.detach().to(torch.float64).contiguous()
        _check_finite(th)
        out = _buffer((image.shape[0], image.shape[1], *out_shape), image.dtype)
        if len(out_shape) == 2:
            _kernel("affine2d_forward")(img.numpy(), th.numpy(), out.numpy(), border)
        else:
            fn = _kernel("affine3d_forward")
            fn(out.shape[0], out.shape[2], _flat(img).numpy(), th.numpy(), out.numpy(), *img.shape[2:], border)
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
                _kernel("affine2d_grad_theta")(img.numpy(), th.numpy(), go.numpy(), partial.numpy(), ctx.border)
            else:
                fn = _kernel("affine3d_grad_theta")
                args = (_flat(img).numpy(), th.numpy(), go.numpy(), partial.numpy(), *img.shape[2:], ctx.border)
                fn(go.shape[0], go.shape[2], *args)
            grad_theta = partial.sum(1).to(ctx.theta_dtype)
        if ctx.needs_input_grad[0]:
            # Accumulated in the image's dtype, as grid_sample does: a float64 buffer and copies
            # of the output gradient doubled the backward's peak memory.
            gimg = _buffer(tuple(img.shape), img.dtype, zero=True)
            if d == 2:
                _kernels()["affine2d_grad_image"](th.numpy(), go.numpy(), gimg.numpy(), ctx.border)
            else:
                args = (th.numpy(), go.numpy(), _flat(gimg).numpy(), *img.shape[2:], ctx.border)
                _kernels()["affine3d_grad_image"](*args)
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
        grad_theta, scattered = _triton().backward(img, th, go, ctx.border, want_theta, want_image)
        grad_img = scattered if want_image else grad_img
    return grad_img, None if grad_theta is None else grad_theta.to(ctx.theta_dtype)


def fused_affine_warp(image: Tensor, theta: Tensor, out_shape: tuple[int, ...], padding: str = "zeros") -> Tensor:
    """``grid_sample(image, affine_grid(theta, out_shape))`` without the grid, ``align_corners=False``.

    Args:
        image: ``(N, C, H, W)`` or ``(N, C, D, H, W)`` float32/float64 on the CPU, or a float32
            ``(N, C, D, H, W)`` CUDA tensor (see :func:`fused_available`).
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
        if _use_triton(img):
            th = theta.detach().float().contiguous()
            _check_finite(th)
            stats, parts = _triton().loss_sums(img, fix, th, border, loss == "ncc")
            count = torch.full((n, 1), float(fix[0].numel()), dtype=stats.dtype, device=stats.device)
        else:
            th = theta.detach().to(torch.float64).contiguous()
            _check_finite(th)
            stats = torch.zeros((n, od, 6), dtype=torch.float64)
            parts = torch.zeros((n, od, 3, 3, 4), dtype=torch.float64)
            fn = _kernel(f"affine3d_{loss}{'_overlap' if overlap else ''}")
            fn(n, od, _flat(img).numpy(), fix.numpy(), th.numpy(), *img.shape[2:], border, stats.numpy(), parts.numpy())
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
            rule; CPU kernels only: see :func:`fused_available`).
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


class _FusedBSpline(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, coef, k, r, tables, out_shape, border):
        img = image.detach().contiguous()
        n = img.shape[0]
        cf = coef.detach().to(torch.float64).expand(n, *coef.shape[1:]).contiguous()
        _check_finite(cf)
        kk = k.to(torch.float64).expand(n, 3, 4).contiguous()
        rr = r.to(torch.float64).expand(n, 3, 3).contiguous()
        tabs = tuple(t.contiguous().numpy() for t in tables)
        out = _buffer((n, img.shape[1], *out_shape), img.dtype)
        args = (_flat(img).numpy(), cf.numpy(), *tabs, kk.numpy(), rr.numpy(), out.numpy(), *img.shape[2:], border)
        _kernel("bspline3d_forward")(n, out_shape[0], *args)
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
            args = (_flat(img).numpy(), cf.numpy(), *ctx.tabs, kk.numpy(), rr.numpy(), go.numpy(), partial.numpy())
            _kernel("bspline3d_grad")(n, od, *args, *img.shape[2:], ctx.border)
            grad = torch.zeros_like(cf)
            _kernels()["bspline3d_spread_z"](partial.numpy(), ctx.tabs[4], ctx.tabs[5], grad.numpy())
            if ctx.coef_shape[0] != n:
                grad = grad.sum(0, keepdim=True)
            grad_coef = grad.to(ctx.coef_dtype)
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
    per axis. ``stnreg.warp._fused_bspline_args`` builds every argument from a transform chain.

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


class _FusedTPS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, coef, control_points, p, m, out_shape, border):
        img = image.detach().contiguous()
        n = img.shape[0]
        cf = coef.detach().to(torch.float64).expand(n, *coef.shape[1:]).contiguous()
        _check_finite(cf)
        cp = control_points.detach().to(torch.float64).contiguous()
        pp = p.to(torch.float64).contiguous()
        mm = m.to(torch.float64).expand(n, 3, 4).contiguous()
        out = _buffer((n, img.shape[1], *out_shape), img.dtype)
        args = (_flat(img).numpy(), cf.numpy(), cp.numpy(), pp.numpy(), mm.numpy(), out.numpy())
        _kernel("tps3d_forward")(n, out_shape[0], *args, *img.shape[2:], border)
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
            args = (_flat(img).numpy(), cf.numpy(), cp.numpy(), pp.numpy(), mm.numpy(), go.numpy(), partial.numpy())
            _kernel("tps3d_grad")(n, od, *args, *img.shape[2:], ctx.border)
            # Slices summed in order on one thread: the same bits for any thread count.
            grad = partial.sum(1)
            if ctx.coef_shape[0] != n:
                grad = grad.sum(0, keepdim=True)
            grad_coef = grad.to(ctx.coef_dtype)
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
    ``stnreg.warp._fused_tps_args`` builds every argument from a transform chain.

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


# Multi-channel samples (fields sampled by fields in scaling and squaring) keep ∂out/∂coords, 3C
# values per output voxel, up to this many elements (64 MiB in float32); one channel always does.
_KEEP_DERIVATIVE_MAX = 2**24


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
        if ctx.needs_input_grad[1] and (c == 1 or n * c * math.prod(out_shape) * 3 <= _KEEP_DERIVATIVE_MAX):
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
        out = _buffer((n, c, *out_shape), img.dtype)
        field = _FieldSample._field(ctx, vec, kk, rr)
        dims = (*img.shape[2:], ctx.border)
        if not keep:
            _kernel("field3d_forward")(n, out_shape[0], _flat(img).numpy(), *field, out.numpy(), *dims)
            return out, None
        dv = _buffer(tuple(vec.shape) if c == 1 else (n, *out_shape, c, 3), vec.dtype)
        args = (_flat(img).numpy(), *field, out.numpy(), dv.reshape(n, -1).numpy(), *ctx.dv_layout, *dims)
        _kernel("field3d_forward_grad")(n, out_shape[0], *args)
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
            grad_u = dv if ctx.dv_layout[1] == 0 else _buffer(tuple(vec.shape), vec.dtype)  # u's layout
            ctx.dv = None
            args = (dv.reshape(n, -1).numpy(), *ctx.dv_layout, go.numpy(), grad_u.reshape(n, -1).numpy(), *ctx.layout)
            _kernel("field3d_chain")(n, go.shape[2], *args)
        elif ctx.needs_input_grad[1]:
            grad_u = _buffer(tuple(vec.shape), vec.dtype)
            field = _FieldSample._field(ctx, vec, kk, rr)
            args = (_flat(img).numpy(), *field, go.numpy(), grad_u.reshape(n, -1).numpy(), *img.shape[2:], ctx.border)
            _kernel("field3d_grad_u")(n, go.shape[2], *args)
        if ctx.needs_input_grad[0]:
            grad_img = _buffer(tuple(img.shape), img.dtype, zero=True)
            shape = tuple(int(s) for s in img.shape[2:])
            field = _FieldSample._field(ctx, vec, kk, rr)
            _kernels()["field3d_grad_image"](shape, *field, go.numpy(), _flat(grad_img).numpy(), ctx.border)
        return grad_img, grad_u, None, None, None, None


def _field_sample(image: Tensor, u: Tensor, k: Tensor, r: Tensor, border: bool, channels_first: bool) -> Tensor:
    if not torch.is_grad_enabled():
        # Under no_grad the Function still sees the inputs' requires_grad and would keep ∂out/∂u.
        image, u = image.detach(), u.detach()
    return _FieldSample.apply(image, u, k, r, border, channels_first)


def fast_cubic(coeffs: Tensor, idx: Tensor) -> tuple[Tensor, Tensor] | None:
    """Cubic B-spline values and their gradient by the numba kernels (:mod:`.cubic_cpu`).

    Args:
        coeffs: ``(N, C, H, W)`` or ``(N, C, D, H, W)`` B-spline coefficients on the CPU.
        idx: ``(N, P, d)`` index positions in ``(x, y[, z])`` order.

    Returns:
        Values ``(N, C, P)`` and derivatives ``(N, C, P, d)`` (per index unit) in ``coeffs``' dtype,
        not differentiable; ``None`` where the kernels cannot run (CUDA, no numba, ``STNREG_FAST=0``).
    """
    if not fast_available(coeffs, "border"):
        return None
    d = coeffs.dim() - 2
    n, c = coeffs.shape[:2]
    flat = coeffs.detach().contiguous().reshape(n, c, -1).double().numpy()
    pos = idx.detach().contiguous().double().numpy()
    out = np.empty((n, c, pos.shape[1]))
    dout = np.empty((n, c, pos.shape[1], d))
    _kernel(f"cubic{d}d")(flat, pos, out, dout, *coeffs.shape[2:])
    return torch.from_numpy(out).to(coeffs.dtype), torch.from_numpy(dout).to(coeffs.dtype)


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
        fwd, _, stats_fn = _kernels()["lncc"]
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
        _, grad_fn, _ = _kernels()["lncc"]
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
