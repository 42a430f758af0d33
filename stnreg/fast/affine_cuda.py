"""Triton kernels: 3D matrix warp with the coordinates generated on the fly (CUDA).

The GPU twin of :mod:`stnreg.fast.affine_cpu` for float32 volumes. For output voxel ``p``
(normalized lattice coordinate ``u``, ``align_corners=False``) the input position is
``g = θ [u; 1]``, read by trilinear interpolation with zero or border padding, exactly as
``affine_grid`` + ``grid_sample``. No grid tensor exists:

- :func:`forward` writes only the warped image;
- :func:`grad_theta` returns ``∂L/∂θ = Σ_p Σ_c go[c, p] ∇I_c(g(p)) ⊗ [u(p); 1]`` (times ``n / 2``
  per row, pixel to normalized units) from the output gradient;
- :func:`loss_sums` computes, in the same pass as the warp, the sums that MSE and NCC and their
  12-parameter gradients are made of, without writing the warped image.

Each program handles ``BLOCK`` output voxels of one batch item and writes its partial sums to its
own row; torch adds the rows in float64 in a fixed order. No atomics, so results are deterministic.
The image gradient (a scatter) is not here: :mod:`stnreg.fast` computes it with ``grid_sample``'s
backward when an image needs one.

Tested without a GPU in Triton's interpreter (``TRITON_INTERPRET=1``, ``tests/test_fast_cuda.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 512
# Σ v, Σ v², Σ v f, Σ f, Σ f² and 12 moments per weight (v - f for MSE; f, v, 1 for NCC).
_STATS = 5
_MOMENTS = 12


@triton.jit
def _position(theta_ptr, od, oh, ow, d, h, w, BORDER: tl.constexpr, BLOCK: tl.constexpr):
    """This program's batch item ``b`` and output voxels ``offs`` (``mask``: inside the output), their
    pixel positions under θ, ``(ux, uy, uz)``, and the positions' clip derivatives."""
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < od * oh * ow
    x = offs % ow
    t = offs // ow
    y = t % oh
    z = t // oh
    ux = (2.0 * x.to(tl.float32) + 1.0) / ow - 1.0
    uy = (2.0 * y.to(tl.float32) + 1.0) / oh - 1.0
    uz = (2.0 * z.to(tl.float32) + 1.0) / od - 1.0
    th = theta_ptr + b * 12
    gx = tl.load(th + 0) * ux + tl.load(th + 1) * uy + tl.load(th + 2) * uz + tl.load(th + 3)
    gy = tl.load(th + 4) * ux + tl.load(th + 5) * uy + tl.load(th + 6) * uz + tl.load(th + 7)
    gz = tl.load(th + 8) * ux + tl.load(th + 9) * uy + tl.load(th + 10) * uz + tl.load(th + 11)
    ix = ((gx + 1.0) * w - 1.0) * 0.5
    iy = ((gy + 1.0) * h - 1.0) * 0.5
    iz = ((gz + 1.0) * d - 1.0) * 0.5
    cx = tl.full(ix.shape, 1.0, tl.float32)
    cy = cx
    cz = cx
    if BORDER:
        # grid_sample's clip: the position's derivative is 0 where it was clipped (at or past an edge).
        cx = tl.where((ix > 0.0) & (ix < w - 1.0), 1.0, 0.0)
        cy = tl.where((iy > 0.0) & (iy < h - 1.0), 1.0, 0.0)
        cz = tl.where((iz > 0.0) & (iz < d - 1.0), 1.0, 0.0)
        ix = tl.minimum(tl.maximum(ix, 0.0), w - 1.0)
        iy = tl.minimum(tl.maximum(iy, 0.0), h - 1.0)
        iz = tl.minimum(tl.maximum(iz, 0.0), d - 1.0)
    return b, offs, mask, ix, iy, iz, ux, uy, uz, cx, cy, cz


@triton.jit
def _trilinear(base, ix, iy, iz, d, h, w, mask):
    """Value and pixel-unit derivatives ``(v, ∂v/∂ix, ∂v/∂iy, ∂v/∂iz)``; corners outside read 0."""
    fx0 = tl.floor(ix)
    fy0 = tl.floor(iy)
    fz0 = tl.floor(iz)
    tx = ix - fx0
    ty = iy - fy0
    tz = iz - fz0
    x0 = fx0.to(tl.int32)
    y0 = fy0.to(tl.int32)
    z0 = fz0.to(tl.int32)
    x1 = x0 + 1
    y1 = y0 + 1
    z1 = z0 + 1
    mx0 = (x0 >= 0) & (x0 < w)
    mx1 = (x1 >= 0) & (x1 < w)
    my0 = (y0 >= 0) & (y0 < h)
    my1 = (y1 >= 0) & (y1 < h)
    mz0 = mask & (z0 >= 0) & (z0 < d)
    mz1 = mask & (z1 >= 0) & (z1 < d)
    r00 = (z0 * h + y0) * w
    r01 = (z0 * h + y1) * w
    r10 = (z1 * h + y0) * w
    r11 = (z1 * h + y1) * w
    v000 = tl.load(base + r00 + x0, mask=mz0 & my0 & mx0, other=0.0)
    v001 = tl.load(base + r00 + x1, mask=mz0 & my0 & mx1, other=0.0)
    v010 = tl.load(base + r01 + x0, mask=mz0 & my1 & mx0, other=0.0)
    v011 = tl.load(base + r01 + x1, mask=mz0 & my1 & mx1, other=0.0)
    v100 = tl.load(base + r10 + x0, mask=mz1 & my0 & mx0, other=0.0)
    v101 = tl.load(base + r10 + x1, mask=mz1 & my0 & mx1, other=0.0)
    v110 = tl.load(base + r11 + x0, mask=mz1 & my1 & mx0, other=0.0)
    v111 = tl.load(base + r11 + x1, mask=mz1 & my1 & mx1, other=0.0)
    sx = 1.0 - tx
    sy = 1.0 - ty
    sz = 1.0 - tz
    a00 = sx * v000 + tx * v001
    a01 = sx * v010 + tx * v011
    a10 = sx * v100 + tx * v101
    a11 = sx * v110 + tx * v111
    b0 = sy * a00 + ty * a01
    b1 = sy * a10 + ty * a11
    v = sz * b0 + tz * b1
    dx = sz * (sy * (v001 - v000) + ty * (v011 - v010)) + tz * (sy * (v101 - v100) + ty * (v111 - v110))
    dy = sz * (a01 - a00) + tz * (a11 - a10)
    dz = b1 - b0
    return v, dx, dy, dz


@triton.jit
def _forward_kernel(img_ptr, theta_ptr, out_ptr, n_c, d, h, w, od, oh, ow, BORDER: tl.constexpr, BLOCK: tl.constexpr):
    b, offs, mask, ix, iy, iz, _, _, _, _, _, _ = _position(theta_ptr, od, oh, ow, d, h, w, BORDER, BLOCK)
    n_out = od * oh * ow
    for c in range(n_c):
        plane = (b * n_c + c).to(tl.int64)
        v, _, _, _ = _trilinear(img_ptr + plane * (d * h * w), ix, iy, iz, d, h, w, mask)
        tl.store(out_ptr + plane * n_out + offs, v, mask=mask)


@triton.jit
def _store_moments(ptr, wx, wy, wz, ux, uy, uz):
    """``Σ wₖ [ux, uy, uz, 1]`` for the three rows ``k`` of θ, into 12 consecutive floats."""
    tl.store(ptr + 0, tl.sum(wx * ux))
    tl.store(ptr + 1, tl.sum(wx * uy))
    tl.store(ptr + 2, tl.sum(wx * uz))
    tl.store(ptr + 3, tl.sum(wx))
    tl.store(ptr + 4, tl.sum(wy * ux))
    tl.store(ptr + 5, tl.sum(wy * uy))
    tl.store(ptr + 6, tl.sum(wy * uz))
    tl.store(ptr + 7, tl.sum(wy))
    tl.store(ptr + 8, tl.sum(wz * ux))
    tl.store(ptr + 9, tl.sum(wz * uy))
    tl.store(ptr + 10, tl.sum(wz * uz))
    tl.store(ptr + 11, tl.sum(wz))


@triton.jit
def _grad_theta_kernel(
    img_ptr, theta_ptr, go_ptr, part_ptr, n_c, d, h, w, od, oh, ow, BORDER: tl.constexpr, BLOCK: tl.constexpr
):
    b, offs, mask, ix, iy, iz, ux, uy, uz, cx, cy, cz = _position(theta_ptr, od, oh, ow, d, h, w, BORDER, BLOCK)
    n_out = od * oh * ow
    wx = tl.zeros((BLOCK,), tl.float32)
    wy = tl.zeros((BLOCK,), tl.float32)
    wz = tl.zeros((BLOCK,), tl.float32)
    for c in range(n_c):
        plane = (b * n_c + c).to(tl.int64)
        _, dx, dy, dz = _trilinear(img_ptr + plane * (d * h * w), ix, iy, iz, d, h, w, mask)
        go = tl.load(go_ptr + plane * n_out + offs, mask=mask, other=0.0)
        wx += go * dx
        wy += go * dy
        wz += go * dz
    row = part_ptr + (b * tl.num_programs(0) + tl.program_id(0)).to(tl.int64) * 12
    _store_moments(row, wx * cx, wy * cy, wz * cz, ux, uy, uz)


@triton.jit
def _loss_kernel(
    img_ptr,
    fix_ptr,
    theta_ptr,
    part_ptr,
    n_c,
    d,
    h,
    w,
    od,
    oh,
    ow,
    BORDER: tl.constexpr,
    NCC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b, offs, mask, ix, iy, iz, ux, uy, uz, cx, cy, cz = _position(theta_ptr, od, oh, ow, d, h, w, BORDER, BLOCK)
    n_out = od * oh * ow
    one = tl.where(mask, 1.0, 0.0)
    s_v = tl.zeros((BLOCK,), tl.float32)
    s_vv = tl.zeros((BLOCK,), tl.float32)
    s_vf = tl.zeros((BLOCK,), tl.float32)
    s_f = tl.zeros((BLOCK,), tl.float32)
    s_ff = tl.zeros((BLOCK,), tl.float32)
    # Per-voxel sums over channels of w ∂v/∂(ix, iy, iz) for the weights w_0 (v - f or f), w_1 = v, w_2 = 1.
    ax = tl.zeros((BLOCK,), tl.float32)
    ay = tl.zeros((BLOCK,), tl.float32)
    az = tl.zeros((BLOCK,), tl.float32)
    bx = tl.zeros((BLOCK,), tl.float32)
    by = tl.zeros((BLOCK,), tl.float32)
    bz = tl.zeros((BLOCK,), tl.float32)
    ex = tl.zeros((BLOCK,), tl.float32)
    ey = tl.zeros((BLOCK,), tl.float32)
    ez = tl.zeros((BLOCK,), tl.float32)
    for c in range(n_c):
        plane = (b * n_c + c).to(tl.int64)
        v, dx, dy, dz = _trilinear(img_ptr + plane * (d * h * w), ix, iy, iz, d, h, w, mask)
        f = tl.load(fix_ptr + plane * n_out + offs, mask=mask, other=0.0)
        s_v += v
        s_vv += v * v
        s_vf += v * f
        s_f += f
        s_ff += f * f
        w0 = f if NCC else v - f
        ax += w0 * dx
        ay += w0 * dy
        az += w0 * dz
        if NCC:
            bx += v * dx
            by += v * dy
            bz += v * dz
            ex += one * dx
            ey += one * dy
            ez += one * dz
    row = part_ptr + (b * tl.num_programs(0) + tl.program_id(0)).to(tl.int64) * (5 + 36)
    tl.store(row + 0, tl.sum(s_v))
    tl.store(row + 1, tl.sum(s_vv))
    tl.store(row + 2, tl.sum(s_vf))
    tl.store(row + 3, tl.sum(s_f))
    tl.store(row + 4, tl.sum(s_ff))
    _store_moments(row + 5, ax * cx, ay * cy, az * cz, ux, uy, uz)
    if NCC:
        _store_moments(row + 17, bx * cx, by * cy, bz * cz, ux, uy, uz)
        _store_moments(row + 29, ex * cx, ey * cy, ez * cz, ux, uy, uz)


def _check(img: Tensor, theta: Tensor) -> None:
    if img.dim() != 5 or img.dtype != torch.float32 or not img.is_contiguous():
        raise ValueError(f"need a contiguous float32 (N, C, D, H, W) image, got {img.dtype} {tuple(img.shape)}")
    if theta.shape != (img.shape[0], 3, 4) or theta.dtype != torch.float32 or not theta.is_contiguous():
        raise ValueError(f"need a contiguous float32 θ of shape ({img.shape[0]}, 3, 4), got {tuple(theta.shape)}")


def _row_scale(img: Tensor) -> Tensor:
    """``n / 2`` per row of θ ``(x, y, z)``: pixel to normalized units."""
    d, h, w = img.shape[2:]
    return torch.tensor([w, h, d], dtype=torch.float64, device=img.device)[:, None] * 0.5


def forward(img: Tensor, theta: Tensor, out_shape: tuple[int, int, int], border: bool) -> Tensor:
    """``grid_sample(img, affine_grid(theta, out_shape))``: ``(N, C, D, H, W)`` -> ``(N, C, *out_shape)``."""
    _check(img, theta)
    n, c = img.shape[:2]
    out = torch.empty((n, c, *out_shape), dtype=img.dtype, device=img.device)
    grid = (triton.cdiv(out[0, 0].numel(), BLOCK), n)
    _forward_kernel[grid](img, theta, out, c, *img.shape[2:], *out_shape, BORDER=border, BLOCK=BLOCK)
    return out


def grad_theta(img: Tensor, theta: Tensor, grad_out: Tensor, border: bool) -> Tensor:
    """``∂L/∂θ`` ``(N, 3, 4)`` float64 from ``∂L/∂out`` ``(N, C, D', H', W')`` (contiguous float32)."""
    _check(img, theta)
    n = img.shape[0]
    blocks = triton.cdiv(grad_out[0, 0].numel(), BLOCK)
    part = torch.empty((n, blocks, _MOMENTS), dtype=torch.float32, device=img.device)
    args = (img, theta, grad_out, part, img.shape[1], *img.shape[2:], *grad_out.shape[2:])
    _grad_theta_kernel[(blocks, n)](*args, BORDER=border, BLOCK=BLOCK)
    return part.double().sum(1).reshape(n, 3, 4) * _row_scale(img)


def loss_sums(img: Tensor, fixed: Tensor, theta: Tensor, border: bool, ncc: bool) -> tuple[Tensor, Tensor]:
    """Per item ``(Σv, Σv², Σv·f, Σf, Σf²)`` ``(N, 5)`` and moments ``(N, 3, 3, 4)`` of the warped image ``v``.

    ``moments[:, k]`` is ``Σ w_k ∂v/∂θ`` with ``w = (v - f, 0, 0)`` for MSE and ``(f, v, 1)`` for NCC,
    the layout of :mod:`stnreg.fast.affine_cpu`'s fused loss, all float64.
    """
    _check(img, theta)
    n = img.shape[0]
    blocks = triton.cdiv(fixed[0, 0].numel(), BLOCK)
    part = torch.zeros((n, blocks, _STATS + 3 * _MOMENTS), dtype=torch.float32, device=img.device)
    args = (img, fixed, theta, part, img.shape[1], *img.shape[2:], *fixed.shape[2:])
    _loss_kernel[(blocks, n)](*args, BORDER=border, NCC=ncc, BLOCK=BLOCK)
    sums = part.double().sum(1)
    moments = sums[:, _STATS:].reshape(n, 3, 3, 4) * _row_scale(img)
    return sums[:, :_STATS], moments
