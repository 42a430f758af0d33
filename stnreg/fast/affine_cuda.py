"""Triton kernels: 3D matrix warp with the coordinates generated on the fly (CUDA).

The GPU twin of :mod:`stnreg.fast.affine_cpu` for float32 volumes. For output voxel ``p``
(normalized lattice coordinate ``u``, ``align_corners=False``) the input position is
``g = θ [u; 1]``, read by trilinear interpolation with zero or border padding, exactly as
``affine_grid`` + ``grid_sample``. No grid tensor exists:

- :func:`forward` writes only the warped image;
- :func:`backward` returns, in one pass over the output gradient ``go``, ``∂L/∂θ = Σ_p Σ_c go[c, p]
  ∇I_c(g(p)) ⊗ [u(p); 1]`` (times ``n / 2`` per row, pixel to normalized units) and/or the image
  gradient, each corner's weight times ``go`` added into it (a scatter);
- :func:`loss_sums` computes, in the same pass as the warp, the sums that MSE and NCC and their
  12-parameter gradients are made of, without writing the warped image.

Each program handles a ``TILE_H x TILE_W`` patch of one output slice (forward) or of ``Z_PER``
slices (the reducing kernels) of one batch item, and writes its partial sums to its own row; torch
adds the rows in float64 in a fixed order, so the warp, θ's gradient and the fused losses are
deterministic. The image gradient is a scatter with atomic adds, as in ``grid_sample``'s CUDA
backward, so its last bits may vary between runs; :mod:`stnreg.fast` takes ``grid_sample``'s
backward instead when ``torch.use_deterministic_algorithms`` is on, so that torch's own rule
(raise or warn) applies.

Tested on an NVIDIA H200 and, without a GPU, in Triton's interpreter (``TRITON_INTERPRET=1``,
``tests/test_fast_cuda.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Each program covers a TILE_H x TILE_W patch of output slices of one batch item, so that a voxel's
# (x, y, z) come from the program ids and two aranges: no integer division per voxel, and the
# position θ [u; 1] is one multiply-add per voxel on top of a per-row term. The forward kernel takes
# one slice per program; the kernels that reduce (θ gradient, fused loss) walk Z_PER slices, keeping
# per-voxel sums in registers, so that the costly cross-thread reductions happen once per Z_PER
# slices. Measured on an H200 (benchmarks/sampler.py --only kernels, 160x192x224): the forward
# kernel took 90 µs with a flat block of 512 voxels (index arithmetic by division), 67 µs with 8x64
# tiles and 54 µs with 4x128 (wider tiles were no faster); the fused NCC kernel 144-186 µs with 4 or
# 8 slices per program and 124 µs with 16 (32 gave 113 µs but leaves small volumes few programs).
TILE_H = 4
TILE_W = 128
NUM_WARPS = 4
# Not yet measured on a card (benchmarks/sampler.py --only kernels sweeps them): slices per forward
# program, which spreads a program's fixed work (θ, tile indices) over more voxels, and streaming
# (evict-first) stores of the output. Any setting gives the same bits: each voxel is computed alone.
FWD_Z_PER = 1
STREAM_OUT = False
_TILES = {"TILE_H": TILE_H, "TILE_W": TILE_W, "Z_PER": FWD_Z_PER, "STREAM_OUT": STREAM_OUT, "num_warps": NUM_WARPS}
RED_TILE_H = 4
RED_TILE_W = 64
Z_PER = 16
_RED_TILES = {"TILE_H": RED_TILE_H, "TILE_W": RED_TILE_W, "Z_PER": Z_PER, "num_warps": NUM_WARPS}
# Σ v, Σ v², Σ v f, Σ f, Σ f² and 12 moments per weight (v - f for MSE; f, v, 1 for NCC).
_STATS = 5
_MOMENTS = 12


@triton.jit
def _tile(oh, ow, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """This program's output columns ``x`` ``(1, TILE_W)`` and rows ``y`` ``(TILE_H, 1)``, and their
    normalized lattice coordinates ``ux``, ``uy`` (``align_corners=False``)."""
    tiles_w = tl.cdiv(ow, TILE_W)
    tile = tl.program_id(0)
    x = (tile % tiles_w) * TILE_W + tl.arange(0, TILE_W)[None, :]
    y = (tile // tiles_w) * TILE_H + tl.arange(0, TILE_H)[:, None]
    ux = (2.0 * x.to(tl.float32) + 1.0) / ow - 1.0
    uy = (2.0 * y.to(tl.float32) + 1.0) / oh - 1.0
    return x, y, ux, uy


@triton.jit
def _position(theta_ptr, b, x, y, ux, uy, z, od, oh, ow, d, h, w, BORDER: tl.constexpr):
    """For the tile's voxels in output slice ``z`` of item ``b``: flat offsets ``offs`` in the item's
    output plane (``mask``: inside the output), pixel positions under θ ``(ix, iy, iz)``, the slice's
    normalized coordinate ``uz``, and the positions' clip derivatives."""
    # Past the last slice (the reducing kernels' last group) no row is inside: oh rows become 0.
    mask = (x < ow) & (y < oh * (z < od).to(tl.int32))
    offs = (z * oh + y) * ow + x
    uz = (2.0 * z.to(tl.float32) + 1.0) / od - 1.0
    th = theta_ptr + b * 12
    # Per row (y) and slice (z) once; per voxel only the x term.
    gx = tl.load(th + 0) * ux + (tl.load(th + 1) * uy + (tl.load(th + 2) * uz + tl.load(th + 3)))
    gy = tl.load(th + 4) * ux + (tl.load(th + 5) * uy + (tl.load(th + 6) * uz + tl.load(th + 7)))
    gz = tl.load(th + 8) * ux + (tl.load(th + 9) * uy + (tl.load(th + 10) * uz + tl.load(th + 11)))
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
    return offs, mask, ix, iy, iz, uz, cx, cy, cz


@triton.jit
def _total(x):
    """Sum of a ``(TILE_H, TILE_W)`` block."""
    return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def _cell(ix, iy, iz, d, h, w, mask):
    """The trilinear cell of each position: fractions ``(tx, ty, tz)``, the two columns ``x0``,
    ``x1``, the flat offsets of its four rows ``r[z][y]``, and per-axis in-image masks of its corners
    (``mask`` folded into the z ones)."""
    fx0 = tl.floor(ix)
    fy0 = tl.floor(iy)
    fz0 = tl.floor(iz)
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
    return ix - fx0, iy - fy0, iz - fz0, x0, x1, r00, r01, r10, r11, mx0, mx1, my0, my1, mz0, mz1


@triton.jit
def _trilinear(base, ix, iy, iz, d, h, w, mask):
    """Value and pixel-unit derivatives ``(v, ∂v/∂ix, ∂v/∂iy, ∂v/∂iz)``; corners outside read 0."""
    tx, ty, tz, x0, x1, r00, r01, r10, r11, mx0, mx1, my0, my1, mz0, mz1 = _cell(ix, iy, iz, d, h, w, mask)
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
def _scatter(base, ix, iy, iz, d, h, w, mask, go):
    """Add ``go`` times each corner's trilinear weight into the image gradient at ``base`` (the
    adjoint of :func:`_trilinear`'s value); corners outside are skipped, as ``grid_sample`` does."""
    tx, ty, tz, x0, x1, r00, r01, r10, r11, mx0, mx1, my0, my1, mz0, mz1 = _cell(ix, iy, iz, d, h, w, mask)
    sx = 1.0 - tx
    sy = 1.0 - ty
    g0 = go * (1.0 - tz)
    g1 = go * tz
    tl.atomic_add(base + r00 + x0, g0 * sy * sx, mask=mz0 & my0 & mx0, sem="relaxed")
    tl.atomic_add(base + r00 + x1, g0 * sy * tx, mask=mz0 & my0 & mx1, sem="relaxed")
    tl.atomic_add(base + r01 + x0, g0 * ty * sx, mask=mz0 & my1 & mx0, sem="relaxed")
    tl.atomic_add(base + r01 + x1, g0 * ty * tx, mask=mz0 & my1 & mx1, sem="relaxed")
    tl.atomic_add(base + r10 + x0, g1 * sy * sx, mask=mz1 & my0 & mx0, sem="relaxed")
    tl.atomic_add(base + r10 + x1, g1 * sy * tx, mask=mz1 & my0 & mx1, sem="relaxed")
    tl.atomic_add(base + r11 + x0, g1 * ty * sx, mask=mz1 & my1 & mx0, sem="relaxed")
    tl.atomic_add(base + r11 + x1, g1 * ty * tx, mask=mz1 & my1 & mx1, sem="relaxed")


@triton.jit
def _forward_kernel(
    img_ptr,
    theta_ptr,
    out_ptr,
    n_c,
    d,
    h,
    w,
    od,
    oh,
    ow,
    BORDER: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    Z_PER: tl.constexpr,
    STREAM_OUT: tl.constexpr,
):
    b = tl.program_id(2)
    x, y, ux, uy = _tile(oh, ow, TILE_H, TILE_W)
    n_out = od * oh * ow
    for zi in range(Z_PER):
        z = tl.program_id(1) * Z_PER + zi
        offs, mask, ix, iy, iz, _, _, _, _ = _position(theta_ptr, b, x, y, ux, uy, z, od, oh, ow, d, h, w, BORDER)
        for c in range(n_c):
            plane = (b * n_c + c).to(tl.int64)
            v, _, _, _ = _trilinear(img_ptr + plane * (d * h * w), ix, iy, iz, d, h, w, mask)
            if STREAM_OUT:
                # Written once, never read here: evict-first, so that it does not push the image's
                # lines, which neighbouring programs still read, out of L2.
                tl.store(out_ptr + plane * n_out + offs, v, mask=mask, cache_modifier=".cs")
            else:
                tl.store(out_ptr + plane * n_out + offs, v, mask=mask)


@triton.jit
def _program_row(b):
    """This program's row in a ``(N, programs per item, ...)`` partial-sum buffer."""
    per_item = tl.num_programs(0) * tl.num_programs(1)
    return (b * per_item + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)).to(tl.int64)


@triton.jit
def _store_moments(ptr, wx, wy, wz, wxz, wyz, wzz, ux, uy, d, h, w):
    """``Σ wₖ [ux, uy, uz, 1]`` for the three rows ``k`` of θ, into 12 consecutive floats, from the
    per-voxel sums over slices ``wₖ = Σ_z w`` and ``wₖz = Σ_z w uz`` (``ux``, ``uy`` do not vary with z).
    Row ``k`` is scaled by ``n_k / 2`` (pixel to normalized units, ``n = (w, h, d)``) here, so that
    the host needs no device copy of the scales."""
    sx = 0.5 * w
    sy = 0.5 * h
    sz = 0.5 * d
    tl.store(ptr + 0, _total(wx * ux) * sx)
    tl.store(ptr + 1, _total(wx * uy) * sx)
    tl.store(ptr + 2, _total(wxz) * sx)
    tl.store(ptr + 3, _total(wx) * sx)
    tl.store(ptr + 4, _total(wy * ux) * sy)
    tl.store(ptr + 5, _total(wy * uy) * sy)
    tl.store(ptr + 6, _total(wyz) * sy)
    tl.store(ptr + 7, _total(wy) * sy)
    tl.store(ptr + 8, _total(wz * ux) * sz)
    tl.store(ptr + 9, _total(wz * uy) * sz)
    tl.store(ptr + 10, _total(wzz) * sz)
    tl.store(ptr + 11, _total(wz) * sz)


@triton.jit
def _backward_kernel(
    img_ptr,
    theta_ptr,
    go_ptr,
    part_ptr,
    gimg_ptr,
    n_c,
    d,
    h,
    w,
    od,
    oh,
    ow,
    BORDER: tl.constexpr,
    THETA: tl.constexpr,
    IMAGE: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    Z_PER: tl.constexpr,
):
    b = tl.program_id(2)
    x, y, ux, uy = _tile(oh, ow, TILE_H, TILE_W)
    n_out = od * oh * ow
    wx = tl.zeros((TILE_H, TILE_W), tl.float32)
    wy = tl.zeros((TILE_H, TILE_W), tl.float32)
    wz = tl.zeros((TILE_H, TILE_W), tl.float32)
    wxz = tl.zeros((TILE_H, TILE_W), tl.float32)
    wyz = tl.zeros((TILE_H, TILE_W), tl.float32)
    wzz = tl.zeros((TILE_H, TILE_W), tl.float32)
    for zi in range(Z_PER):
        z = tl.program_id(1) * Z_PER + zi
        offs, mask, ix, iy, iz, uz, cx, cy, cz = _position(theta_ptr, b, x, y, ux, uy, z, od, oh, ow, d, h, w, BORDER)
        gx = tl.zeros((TILE_H, TILE_W), tl.float32)
        gy = tl.zeros((TILE_H, TILE_W), tl.float32)
        gz = tl.zeros((TILE_H, TILE_W), tl.float32)
        for c in range(n_c):
            plane = (b * n_c + c).to(tl.int64)
            go = tl.load(go_ptr + plane * n_out + offs, mask=mask, other=0.0)
            if THETA:
                _, dx, dy, dz = _trilinear(img_ptr + plane * (d * h * w), ix, iy, iz, d, h, w, mask)
                gx += go * dx
                gy += go * dy
                gz += go * dz
            if IMAGE:
                _scatter(gimg_ptr + plane * (d * h * w), ix, iy, iz, d, h, w, mask, go)
        if THETA:
            gx *= cx
            gy *= cy
            gz *= cz
            wx += gx
            wy += gy
            wz += gz
            wxz += gx * uz
            wyz += gy * uz
            wzz += gz * uz
    if THETA:
        row = part_ptr + _program_row(b) * 12
        _store_moments(row, wx, wy, wz, wxz, wyz, wzz, ux, uy, d, h, w)


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
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    Z_PER: tl.constexpr,
):
    b = tl.program_id(2)
    x, y, ux, uy = _tile(oh, ow, TILE_H, TILE_W)
    n_out = od * oh * ow
    s_v = tl.zeros((TILE_H, TILE_W), tl.float32)
    s_vv = tl.zeros((TILE_H, TILE_W), tl.float32)
    s_vf = tl.zeros((TILE_H, TILE_W), tl.float32)
    s_f = tl.zeros((TILE_H, TILE_W), tl.float32)
    s_ff = tl.zeros((TILE_H, TILE_W), tl.float32)
    # Per-voxel sums over slices (and, with uz, their z moments) of w ∂v/∂(ix, iy, iz) times the
    # clip factors, for the weights w_0 (v - f or f), w_1 = v (NCC), w_2 = 1 (NCC).
    ax = tl.zeros((TILE_H, TILE_W), tl.float32)
    ay = tl.zeros((TILE_H, TILE_W), tl.float32)
    az = tl.zeros((TILE_H, TILE_W), tl.float32)
    axz = tl.zeros((TILE_H, TILE_W), tl.float32)
    ayz = tl.zeros((TILE_H, TILE_W), tl.float32)
    azz = tl.zeros((TILE_H, TILE_W), tl.float32)
    bx = tl.zeros((TILE_H, TILE_W), tl.float32)
    by = tl.zeros((TILE_H, TILE_W), tl.float32)
    bz = tl.zeros((TILE_H, TILE_W), tl.float32)
    bxz = tl.zeros((TILE_H, TILE_W), tl.float32)
    byz = tl.zeros((TILE_H, TILE_W), tl.float32)
    bzz = tl.zeros((TILE_H, TILE_W), tl.float32)
    ex = tl.zeros((TILE_H, TILE_W), tl.float32)
    ey = tl.zeros((TILE_H, TILE_W), tl.float32)
    ez = tl.zeros((TILE_H, TILE_W), tl.float32)
    exz = tl.zeros((TILE_H, TILE_W), tl.float32)
    eyz = tl.zeros((TILE_H, TILE_W), tl.float32)
    ezz = tl.zeros((TILE_H, TILE_W), tl.float32)
    for zi in range(Z_PER):
        z = tl.program_id(1) * Z_PER + zi
        offs, mask, ix, iy, iz, uz, cx, cy, cz = _position(theta_ptr, b, x, y, ux, uy, z, od, oh, ow, d, h, w, BORDER)
        one = tl.where(mask, 1.0, 0.0)
        for c in range(n_c):
            plane = (b * n_c + c).to(tl.int64)
            v, dx, dy, dz = _trilinear(img_ptr + plane * (d * h * w), ix, iy, iz, d, h, w, mask)
            f = tl.load(fix_ptr + plane * n_out + offs, mask=mask, other=0.0)
            s_v += v
            s_vv += v * v
            s_vf += v * f
            s_f += f
            s_ff += f * f
            # The clipped derivatives, each voxel's share of every moment.
            dx *= cx
            dy *= cy
            dz *= cz
            w0 = f if NCC else v - f
            ax += w0 * dx
            ay += w0 * dy
            az += w0 * dz
            axz += w0 * dx * uz
            ayz += w0 * dy * uz
            azz += w0 * dz * uz
            if NCC:
                bx += v * dx
                by += v * dy
                bz += v * dz
                bxz += v * dx * uz
                byz += v * dy * uz
                bzz += v * dz * uz
                ex += one * dx
                ey += one * dy
                ez += one * dz
                exz += one * dx * uz
                eyz += one * dy * uz
                ezz += one * dz * uz
    row = part_ptr + _program_row(b) * (5 + 36)
    tl.store(row + 0, _total(s_v))
    tl.store(row + 1, _total(s_vv))
    tl.store(row + 2, _total(s_vf))
    tl.store(row + 3, _total(s_f))
    tl.store(row + 4, _total(s_ff))
    _store_moments(row + 5, ax, ay, az, axz, ayz, azz, ux, uy, d, h, w)
    if NCC:
        _store_moments(row + 17, bx, by, bz, bxz, byz, bzz, ux, uy, d, h, w)
        _store_moments(row + 29, ex, ey, ez, exz, eyz, ezz, ux, uy, d, h, w)


def _check(img: Tensor, theta: Tensor) -> None:
    if img.dim() != 5 or img.dtype != torch.float32 or not img.is_contiguous():
        raise ValueError(f"need a contiguous float32 (N, C, D, H, W) image, got {img.dtype} {tuple(img.shape)}")
    if theta.shape != (img.shape[0], 3, 4) or theta.dtype != torch.float32 or not theta.is_contiguous():
        raise ValueError(f"need a contiguous float32 θ of shape ({img.shape[0]}, 3, 4), got {tuple(theta.shape)}")


def _launch(out_shape: tuple[int, ...], n: int, tile_h: int, tile_w: int, z_per: int) -> tuple[int, int, int]:
    """The launch grid: (tiles per slice, groups of ``z_per`` slices, batch items)."""
    od, oh, ow = out_shape
    return triton.cdiv(oh, tile_h) * triton.cdiv(ow, tile_w), triton.cdiv(od, z_per), n


def forward(img: Tensor, theta: Tensor, out_shape: tuple[int, int, int], border: bool) -> Tensor:
    """``grid_sample(img, affine_grid(theta, out_shape))``: ``(N, C, D, H, W)`` -> ``(N, C, *out_shape)``."""
    _check(img, theta)
    n, c = img.shape[:2]
    out = torch.empty((n, c, *out_shape), dtype=img.dtype, device=img.device)
    _forward_kernel[_launch(out_shape, n, TILE_H, TILE_W, FWD_Z_PER)](
        img, theta, out, c, *img.shape[2:], *out_shape, BORDER=border, **_TILES
    )
    return out


def backward(
    img: Tensor, theta: Tensor, grad_out: Tensor, border: bool, theta_grad: bool, image_grad: bool
) -> tuple[Tensor | None, Tensor | None]:
    """``(∂L/∂θ, ∂L/∂image)`` from ``∂L/∂out`` ``(N, C, D', H', W')`` (contiguous float32), in one pass.

    ``∂L/∂θ`` is ``(N, 3, 4)`` float64, summed in a fixed order (deterministic); ``∂L/∂image`` is
    float32, scattered with atomic adds as ``grid_sample``'s backward does on CUDA, so its last bits
    may vary from run to run. Either is ``None`` when not asked for.
    """
    _check(img, theta)
    n = img.shape[0]
    grid = _launch(grad_out.shape[2:], n, RED_TILE_H, RED_TILE_W, Z_PER)
    part = torch.empty((n, grid[0] * grid[1], _MOMENTS) if theta_grad else (1,), dtype=torch.float32, device=img.device)
    gimg = torch.zeros_like(img) if image_grad else part
    args = (img, theta, grad_out, part, gimg, img.shape[1], *img.shape[2:], *grad_out.shape[2:])
    _backward_kernel[grid](*args, BORDER=border, THETA=theta_grad, IMAGE=image_grad, **_RED_TILES)
    grad_theta = part.double().sum(1).reshape(n, 3, 4) if theta_grad else None
    return grad_theta, gimg if image_grad else None


def loss_sums(img: Tensor, fixed: Tensor, theta: Tensor, border: bool, ncc: bool) -> tuple[Tensor, Tensor]:
    """Per item ``(Σv, Σv², Σv·f, Σf, Σf²)`` ``(N, 5)`` and moments ``(N, 3, 3, 4)`` of the warped image ``v``.

    ``moments[:, k]`` is ``Σ w_k ∂v/∂θ`` with ``w = (v - f, 0, 0)`` for MSE and ``(f, v, 1)`` for NCC,
    the layout of :mod:`stnreg.fast.affine_cpu`'s fused loss, all float64.
    """
    _check(img, theta)
    n = img.shape[0]
    grid = _launch(fixed.shape[2:], n, RED_TILE_H, RED_TILE_W, Z_PER)
    part = torch.zeros((n, grid[0] * grid[1], _STATS + 3 * _MOMENTS), dtype=torch.float32, device=img.device)
    args = (img, fixed, theta, part, img.shape[1], *img.shape[2:], *fixed.shape[2:])
    _loss_kernel[grid](*args, BORDER=border, NCC=ncc, **_RED_TILES)
    sums = part.double().sum(1)
    moments = sums[:, _STATS:].reshape(n, 3, 3, 4)
    return sums[:, :_STATS], moments
