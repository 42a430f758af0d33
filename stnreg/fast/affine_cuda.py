"""Triton kernels: 3D matrix warp with the coordinates generated on the fly (CUDA).

The GPU twin of :mod:`stnreg.fast.affine_cpu` for float32 volumes. For output voxel ``p``
(normalized lattice coordinate ``u``, ``align_corners=False``) the input position is
``g = θ [u; 1]``, read by trilinear interpolation with zero or border padding, as ``affine_grid`` +
``grid_sample`` do, to float32 rounding: θ is folded into pixel units once per program, so that a
position costs one multiply-add per axis. No grid tensor exists:

- :func:`forward` writes only the warped image;
- :func:`backward` returns, in one pass over the output gradient ``go``, ``∂L/∂θ = Σ_p Σ_c go[c, p]
  ∇I_c(g(p)) ⊗ [u(p); 1]`` (times ``n / 2`` per row, pixel to normalized units) and/or the image
  gradient, each corner's weight times ``go`` added into it (a scatter);
- :func:`loss_sums` computes, in the same pass as the warp, the sums that MSE and NCC and their
  12-parameter gradients are made of, without writing the warped image.

Each program handles a ``TILE_H x TILE_W`` patch of a few output slices of one batch item (one
column per thread, see :func:`_position`), and the reducing kernels write its partial sums to its
own row; torch
adds the rows in float64 in a fixed order, so the warp, θ's gradient and the fused losses are
deterministic. The image gradient is a scatter with atomic adds, as in ``grid_sample``'s CUDA
backward, so its last bits may vary between runs; :mod:`stnreg.fast` takes ``grid_sample``'s
backward instead when ``torch.use_deterministic_algorithms`` is on, so that torch's own rule
(raise or warn) applies.

Every cell reads its eight corners from inside the image, clamping the cell and giving the
corners that zero padding leaves out weight 0 (:func:`_axis`), so that no load needs a mask. One
consequence: where a position lies outside the image, the nearest edge voxels are read with
weight 0, so a NaN or infinite edge voxel reaches outputs that ``grid_sample`` sets to 0.
(:func:`stnreg.register` rejects such images.)

Tested on an NVIDIA H200 and, without a GPU, in Triton's interpreter (``TRITON_INTERPRET=1``,
``tests/test_fast_cuda.py``); ``benchmarks/kernel_sass.py`` compiles them for a card on any machine
and counts the machine instructions per voxel.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

# Each program covers a TILE_H x TILE_W patch of Z_PER output slices of one batch item, so that a
# voxel's (x, y, z) come from the program ids and two aranges: no integer division per voxel. The
# kernels that reduce (θ gradient, fused loss) keep per-voxel sums in registers over their slices,
# so that the costly cross-thread reductions happen once per program. Measured on an H200
# (benchmarks/sampler.py --only kernels, 160x192x224), before the gathers were laid out one column
# per thread (see _position): the forward kernel took 90 µs with a flat block of 512 voxels (index
# arithmetic by division), 67 µs with 8x64 tiles and 54 µs with 4x128 (wider tiles were no faster);
# the fused NCC kernel 144-186 µs with 4 or 8 slices per program and 124 µs with 16 (32 gave 113 µs
# but leaves small volumes few programs).
TILE_H = 4
TILE_W = 128
NUM_WARPS = 4
# Slices per forward program: four spread a program's fixed work (θ in pixel units, tile indices)
# over more voxels, 124 -> 98 machine instructions per voxel for sm_90 (benchmarks/kernel_sass.py's
# count; the issue floor on an H200 goes from 25.5 to 20 µs at 160x192x224, under the 23 µs of half
# its bandwidth). Chosen by that count, not yet timed on a card: benchmarks/sampler.py --only kernels
# times 1, 2, 4 and 8, and streaming (evict-first) stores of the output. Any setting gives the same
# bits: each voxel is computed alone.
FWD_Z_PER = 4
STREAM_OUT = False
# Multiply-adds fused, asked for by name: Triton 3.10 turns the default off (and 3.9 warns).
OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": True}
_TILES = {"TILE_H": TILE_H, "TILE_W": TILE_W, "Z_PER": FWD_Z_PER, "STREAM_OUT": STREAM_OUT, **OPTIONS}
RED_TILE_H = 4
RED_TILE_W = 64
# Slices per program of the reducing kernels. Each program ends with 12 to 41 sums across its block,
# so more slices spread them over more voxels: on an H200 (160x192x224, fused NCC kernel alone, 4x64
# tiles, before the layout change) 16 slices took 124 µs and 32 took 113 in one run, and 8 took 143.6
# against 112.7 for 32 in the committed table (sampler-cuda.md). More slices also leave fewer
# programs, so 32 only where that still launches MIN_PROGRAMS (four per multiprocessor of a
# 132-multiprocessor card).
Z_PER = 16
Z_PER_LARGE = 32
MIN_PROGRAMS = 512
_RED_TILES = {"TILE_H": RED_TILE_H, "TILE_W": RED_TILE_W, "Z_PER": Z_PER, **OPTIONS}
# Σ v, Σ v², Σ v f, Σ f, Σ f² and 12 moments per weight (v - f for MSE; f, v, 1 for NCC).
_STATS = 5
_MOMENTS = 12


@triton.jit
def _tile(oh, ow, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """This program's output columns ``x`` ``(1, TILE_W)`` and rows ``y`` ``(TILE_H, 1)``."""
    tiles_w = tl.cdiv(ow, TILE_W)
    tile = tl.program_id(0)
    x = (tile % tiles_w) * TILE_W + tl.arange(0, TILE_W)[None, :]
    y = (tile // tiles_w) * TILE_H + tl.arange(0, TILE_H)[:, None]
    return x, y


@triton.jit
def _normalized(i, n):
    """Normalized lattice coordinate of index ``i`` on an axis of ``n`` voxels (``align_corners=False``)."""
    return (2.0 * i.to(tl.float32) + 1.0) / n - 1.0


@triton.jit
def _pixel_row(theta_ptr, b, k: tl.constexpr, n_k, od, oh, ow):
    """Row ``k`` of θ in pixel units ``(a, b, c, t)``: input pixel coordinate ``i_k = a x + b y + c z + t``
    of output voxel ``(x, y, z)`` (indices), for an input axis of ``n_k`` voxels. Folding both unit
    changes (output index to normalized, normalized to input pixel) into four scalars per program
    leaves one multiply-add per voxel and axis."""
    th = theta_ptr + b * 12 + 4 * k
    t0 = tl.load(th)
    t1 = tl.load(th + 1)
    t2 = tl.load(th + 2)
    t3 = tl.load(th + 3)
    s = 0.5 * n_k
    rx = 1.0 / ow
    ry = 1.0 / oh
    rz = 1.0 / od
    # u = (2 i + 1) / n - 1: the constant terms are gathered as t3 + 1 - (t0 + t1 + t2) first, which
    # is exactly 0 for the identity, so that its positions carry no rounding from cancellation.
    t = s * (t0 * rx + t1 * ry + t2 * rz + (t3 + 1.0 - (t0 + t1 + t2))) - 0.5
    return 2.0 * s * t0 * rx, 2.0 * s * t1 * ry, 2.0 * s * t2 * rz, t


@triton.jit
def _clip(i, n, BORDER: tl.constexpr):
    """Border padding's clip of pixel coordinate ``i`` into ``[0, n - 1]``, and the factor (0 or 1)
    that its derivative takes: 0 at or past an edge, as ``grid_sample``'s clip. Zero padding: ``i``, 1."""
    if BORDER:
        c = tl.where((i > 0.0) & (i < n - 1.0), 1.0, 0.0)
        return tl.minimum(tl.maximum(i, 0.0), n - 1.0), c
    return i, tl.full(i.shape, 1.0, tl.float32)


@triton.jit
def _tile_positions(theta_ptr, b, x, y, d, h, w, od, oh, ow):
    """Input pixel positions ``(jx, jy, jz)`` of the tile's voxels (columns ``x``, rows ``y``) in
    output slice 0 of item ``b``, and their steps per slice ``(sx, sy, sz)``: a voxel's position
    then costs one multiply-add per axis. Once per program, and before any store, since the
    compiler cannot move θ's loads out of a loop that stores (or adds atomically)."""
    xf = x.to(tl.float32)
    yf = y.to(tl.float32)
    a0, a1, a2, a3 = _pixel_row(theta_ptr, b, 0, w, od, oh, ow)
    b0, b1, b2, b3 = _pixel_row(theta_ptr, b, 1, h, od, oh, ow)
    c0, c1, c2, c3 = _pixel_row(theta_ptr, b, 2, d, od, oh, ow)
    return a0 * xf + (a1 * yf + a3), b0 * xf + (b1 * yf + b3), c0 * xf + (c1 * yf + c3), a2, b2, c2


@triton.jit
def _position(jx, jy, jz, sx, sy, sz, x, y, z, od, oh, ow, d, h, w, BORDER: tl.constexpr):
    """For the tile's voxels in output slice ``z`` (see :func:`_tile_positions` for the rest): flat
    offsets ``offs`` in the item's output plane (``mask``: inside the output), input pixel positions
    ``(ix, iy, iz)`` after the padding's clip, and their clip factors ``(cx, cy, cz)`` (:func:`_clip`)."""
    # Past the last slice (the reducing kernels' last group) no row is inside: oh rows become 0.
    mask = (x < ow) & (y < oh * (z < od).to(tl.int32))
    # Contiguity 1 for the compiler: otherwise it gives each thread four adjacent columns, so that
    # the output can be stored in 16-byte pieces, and then one warp-wide gather spans 128 columns of
    # positions instead of 32, touching about three times as many cache lines (the benchmark's θ:
    # 12.4 against 4.2 lines per gather), for three stores saved per four voxels.
    offs = tl.max_contiguous((z * oh + y) * ow + x, [1, 1])
    zf = z.to(tl.float32)
    ix, cx = _clip(jx + sx * zf, w, BORDER)
    iy, cy = _clip(jy + sy * zf, h, BORDER)
    iz, cz = _clip(jz + sz * zf, d, BORDER)
    return offs, mask, ix, iy, iz, cx, cy, cz


@triton.jit
def _total(x):
    """Sum of a ``(TILE_H, TILE_W)`` block, as one flat reduction: summing the rows first and then
    the column sums took two rounds across warps, about 6% of the fused NCC kernel's instructions."""
    return tl.sum(tl.reshape(x, [x.shape[0] * x.shape[1]]), axis=0)


@triton.jit
def _axis(i, n, BORDER: tl.constexpr):
    """One axis of the trilinear cell of pixel coordinate ``i`` on ``n >= 2`` voxels.

    Every read uses the corners ``lo = clamp(floor(i), 0, n - 2)`` and ``lo + 1``, which are inside
    the image, so that no load needs a mask or a bounds test. With zero padding their weights are the
    tent ``max(0, 1 - |i - k|)`` of corner ``k``: ``1 - t`` and ``t`` inside, and where the true cell
    ``floor(i), floor(i) + 1`` pokes out of the image, the weight of the corner that is in on the
    right one of the two and 0 on the other, which is zero padding exactly. With border padding ``i``
    is already clipped into ``[0, n - 1]``, so the cell is inside and only ``i = n - 1`` moves it one
    to the left. ``g0``, ``g1`` are the weights' derivatives in ``i``, on the side that
    ``grid_sample`` takes at integers (the cell of ``floor(i)``); with border padding those of the
    inside, the only place where the clip lets them count. Returns ``lo`` (int32), ``w0``, ``w1``,
    ``g0``, ``g1``.
    """
    f = tl.floor(i)
    if BORDER:
        lo = tl.minimum(f, n - 2.0)
        t = i - lo
        # Only where i is strictly inside (0, n - 1) does the clip factor let a derivative count.
        one = tl.full(i.shape, 1.0, tl.float32)
        return lo.to(tl.int32), 1.0 - t, t, -one, one
    lo = tl.minimum(tl.maximum(f, 0.0), n - 2.0)
    t = i - lo
    w0 = tl.maximum(1.0 - tl.abs(t), 0.0)
    w1 = tl.maximum(1.0 - tl.abs(t - 1.0), 0.0)
    # floor(i) - lo: 0 inside, 1 on the last voxel, -1 just before the first, further beyond.
    shift = f - lo
    g0 = tl.where(shift == 0.0, -1.0, tl.where(shift == -1.0, 1.0, 0.0))
    g1 = tl.where(shift == 0.0, 1.0, tl.where(shift == 1.0, -1.0, 0.0))
    return lo.to(tl.int32), w0, w1, g0, g1


@triton.jit
def _rows(base, lx, ly, lz, h, w):
    """Pointers to the corner ``(lx, ly, lz)`` of each cell and to the three rows beside it (``y + 1``,
    ``z + 1``, both); each row's second corner is the next element."""
    # One int32 offset per row, each added to the base once (a pointer sum is 64-bit arithmetic).
    o00 = (lz * h + ly) * w + lx
    o10 = o00 + h * w
    return base + o00, base + (o00 + w), base + o10, base + (o10 + w)


@triton.jit
def _trilinear(base, ix, iy, iz, d, h, w, BORDER: tl.constexpr):
    """Value and pixel-unit derivatives ``(v, ∂v/∂ix, ∂v/∂iy, ∂v/∂iz)`` at each position (border
    padding: positions already clipped)."""
    lx, wx0, wx1, gx0, gx1 = _axis(ix, w, BORDER)
    ly, wy0, wy1, gy0, gy1 = _axis(iy, h, BORDER)
    lz, wz0, wz1, gz0, gz1 = _axis(iz, d, BORDER)
    p00, p01, p10, p11 = _rows(base, lx, ly, lz, h, w)
    v000 = tl.load(p00)
    v001 = tl.load(p00 + 1)
    v010 = tl.load(p01)
    v011 = tl.load(p01 + 1)
    v100 = tl.load(p10)
    v101 = tl.load(p10 + 1)
    v110 = tl.load(p11)
    v111 = tl.load(p11 + 1)
    a00 = wx0 * v000 + wx1 * v001
    a01 = wx0 * v010 + wx1 * v011
    a10 = wx0 * v100 + wx1 * v101
    a11 = wx0 * v110 + wx1 * v111
    b0 = wy0 * a00 + wy1 * a01
    b1 = wy0 * a10 + wy1 * a11
    v = wz0 * b0 + wz1 * b1
    e0 = wy0 * (gx0 * v000 + gx1 * v001) + wy1 * (gx0 * v010 + gx1 * v011)
    e1 = wy0 * (gx0 * v100 + gx1 * v101) + wy1 * (gx0 * v110 + gx1 * v111)
    dx = wz0 * e0 + wz1 * e1
    dy = wz0 * (gy0 * a00 + gy1 * a01) + wz1 * (gy0 * a10 + gy1 * a11)
    dz = gz0 * b0 + gz1 * b1
    return v, dx, dy, dz


@triton.jit
def _scatter(base, ix, iy, iz, d, h, w, mask, go, BORDER: tl.constexpr):
    """Add ``go`` times each corner's trilinear weight into the image gradient at ``base`` (the
    adjoint of :func:`_trilinear`'s value); corners outside the image have weight 0 there."""
    lx, wx0, wx1, _, _ = _axis(ix, w, BORDER)
    ly, wy0, wy1, _, _ = _axis(iy, h, BORDER)
    lz, wz0, wz1, _, _ = _axis(iz, d, BORDER)
    if not BORDER:
        # A position beyond the band around the image has all weights 0, and its cell is clamped
        # onto the image's faces: skipped, so that a warp that zooms out does not pile atomic adds
        # of 0 onto the few voxels there.
        mask &= (wx0 + wx1 > 0.0) & (wy0 + wy1 > 0.0) & (wz0 + wz1 > 0.0)
    p00, p01, p10, p11 = _rows(base, lx, ly, lz, h, w)
    g0 = go * wz0
    g1 = go * wz1
    tl.atomic_add(p00, g0 * wy0 * wx0, mask=mask, sem="relaxed")
    tl.atomic_add(p00 + 1, g0 * wy0 * wx1, mask=mask, sem="relaxed")
    tl.atomic_add(p01, g0 * wy1 * wx0, mask=mask, sem="relaxed")
    tl.atomic_add(p01 + 1, g0 * wy1 * wx1, mask=mask, sem="relaxed")
    tl.atomic_add(p10, g1 * wy0 * wx0, mask=mask, sem="relaxed")
    tl.atomic_add(p10 + 1, g1 * wy0 * wx1, mask=mask, sem="relaxed")
    tl.atomic_add(p11, g1 * wy1 * wx0, mask=mask, sem="relaxed")
    tl.atomic_add(p11 + 1, g1 * wy1 * wx1, mask=mask, sem="relaxed")


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
    x, y = _tile(oh, ow, TILE_H, TILE_W)
    jx, jy, jz, sx, sy, sz = _tile_positions(theta_ptr, b, x, y, d, h, w, od, oh, ow)
    n_out = od * oh * ow
    for zi in range(Z_PER):
        z = tl.program_id(1) * Z_PER + zi
        offs, mask, ix, iy, iz, _, _, _ = _position(jx, jy, jz, sx, sy, sz, x, y, z, od, oh, ow, d, h, w, BORDER)
        for c in range(n_c):
            plane = (b * n_c + c).to(tl.int64)
            v, _, _, _ = _trilinear(img_ptr + plane * (d * h * w), ix, iy, iz, d, h, w, BORDER)
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
    x, y = _tile(oh, ow, TILE_H, TILE_W)
    jx, jy, jz, sx, sy, sz = _tile_positions(theta_ptr, b, x, y, d, h, w, od, oh, ow)
    ux = _normalized(x, ow)
    uy = _normalized(y, oh)
    n_out = od * oh * ow
    wx = tl.zeros((TILE_H, TILE_W), tl.float32)
    wy = tl.zeros((TILE_H, TILE_W), tl.float32)
    wz = tl.zeros((TILE_H, TILE_W), tl.float32)
    wxz = tl.zeros((TILE_H, TILE_W), tl.float32)
    wyz = tl.zeros((TILE_H, TILE_W), tl.float32)
    wzz = tl.zeros((TILE_H, TILE_W), tl.float32)
    for zi in range(Z_PER):
        z = tl.program_id(1) * Z_PER + zi
        offs, mask, ix, iy, iz, cx, cy, cz = _position(jx, jy, jz, sx, sy, sz, x, y, z, od, oh, ow, d, h, w, BORDER)
        uz = _normalized(z, od)
        gx = tl.zeros((TILE_H, TILE_W), tl.float32)
        gy = tl.zeros((TILE_H, TILE_W), tl.float32)
        gz = tl.zeros((TILE_H, TILE_W), tl.float32)
        for c in range(n_c):
            plane = (b * n_c + c).to(tl.int64)
            go = tl.load(go_ptr + plane * n_out + offs, mask=mask, other=0.0)
            if THETA:
                # go is 0 outside the output, so those voxels add nothing.
                _, dx, dy, dz = _trilinear(img_ptr + plane * (d * h * w), ix, iy, iz, d, h, w, BORDER)
                gx += go * dx
                gy += go * dy
                gz += go * dz
            if IMAGE:
                _scatter(gimg_ptr + plane * (d * h * w), ix, iy, iz, d, h, w, mask, go, BORDER)
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
    x, y = _tile(oh, ow, TILE_H, TILE_W)
    jx, jy, jz, sx, sy, sz = _tile_positions(theta_ptr, b, x, y, d, h, w, od, oh, ow)
    ux = _normalized(x, ow)
    uy = _normalized(y, oh)
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
        offs, mask, ix, iy, iz, cx, cy, cz = _position(jx, jy, jz, sx, sy, sz, x, y, z, od, oh, ow, d, h, w, BORDER)
        uz = _normalized(z, od)
        # A voxel outside the output reads inside the image like any other: its value and (through
        # the clip factors) its derivatives are zeroed, so that it adds nothing to any sum.
        one = tl.where(mask, 1.0, 0.0)
        cx *= one
        cy *= one
        cz *= one
        for c in range(n_c):
            plane = (b * n_c + c).to(tl.int64)
            v, dx, dy, dz = _trilinear(img_ptr + plane * (d * h * w), ix, iy, iz, d, h, w, BORDER)
            v *= one
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


def _check(img: Tensor, theta: Tensor, out_shape: tuple[int, ...]) -> None:
    if img.dim() != 5 or img.dtype != torch.float32 or not img.is_contiguous():
        raise ValueError(f"need a contiguous float32 (N, C, D, H, W) image, got {img.dtype} {tuple(img.shape)}")
    if min(img.shape[2:]) < 2:
        raise ValueError(f"need at least 2 voxels along each axis of the image, got {tuple(img.shape[2:])}")
    # Offsets within one channel are int32.
    if max(math.prod(img.shape[2:]), math.prod(out_shape)) >= 2**31:
        raise ValueError(f"need fewer than 2**31 voxels per channel, got {tuple(img.shape[2:])} -> {tuple(out_shape)}")
    if theta.shape != (img.shape[0], 3, 4) or theta.dtype != torch.float32 or not theta.is_contiguous():
        raise ValueError(f"need a contiguous float32 θ of shape ({img.shape[0]}, 3, 4), got {tuple(theta.shape)}")


def _launch(out_shape: tuple[int, ...], n: int, tile_h: int, tile_w: int, z_per: int) -> tuple[int, int, int]:
    """The launch grid: (tiles per slice, groups of ``z_per`` slices, batch items)."""
    od, oh, ow = out_shape
    return triton.cdiv(oh, tile_h) * triton.cdiv(ow, tile_w), triton.cdiv(od, z_per), n


def _reducing_launch(out_shape: tuple[int, ...], n: int) -> tuple[dict, tuple[int, int, int]]:
    """The reducing kernels' tile constants (slices per program: see ``Z_PER_LARGE``) and grid."""
    grid = _launch(out_shape, n, RED_TILE_H, RED_TILE_W, Z_PER_LARGE)
    z_per = Z_PER_LARGE if math.prod(grid) >= MIN_PROGRAMS else Z_PER
    return {**_RED_TILES, "Z_PER": z_per}, _launch(out_shape, n, RED_TILE_H, RED_TILE_W, z_per)


def forward(img: Tensor, theta: Tensor, out_shape: tuple[int, int, int], border: bool) -> Tensor:
    """``grid_sample(img, affine_grid(theta, out_shape))``: ``(N, C, D, H, W)`` -> ``(N, C, *out_shape)``."""
    _check(img, theta, out_shape)
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
    _check(img, theta, grad_out.shape[2:])
    n = img.shape[0]
    tiles, grid = _reducing_launch(grad_out.shape[2:], n)
    part = torch.empty((n, grid[0] * grid[1], _MOMENTS) if theta_grad else (1,), dtype=torch.float32, device=img.device)
    gimg = torch.zeros_like(img) if image_grad else part
    args = (img, theta, grad_out, part, gimg, img.shape[1], *img.shape[2:], *grad_out.shape[2:])
    _backward_kernel[grid](*args, BORDER=border, THETA=theta_grad, IMAGE=image_grad, **tiles)
    grad_theta = part.double().sum(1).reshape(n, 3, 4) if theta_grad else None
    return grad_theta, gimg if image_grad else None


def loss_sums(img: Tensor, fixed: Tensor, theta: Tensor, border: bool, ncc: bool) -> tuple[Tensor, Tensor]:
    """Per item ``(Σv, Σv², Σv·f, Σf, Σf²)`` ``(N, 5)`` and moments ``(N, 3, 3, 4)`` of the warped image ``v``.

    ``moments[:, k]`` is ``Σ w_k ∂v/∂θ`` with ``w = (v - f, 0, 0)`` for MSE and ``(f, v, 1)`` for NCC,
    the layout of :mod:`stnreg.fast.affine_cpu`'s fused loss, all float64.
    """
    _check(img, theta, fixed.shape[2:])
    n = img.shape[0]
    tiles, grid = _reducing_launch(fixed.shape[2:], n)
    part = torch.zeros((n, grid[0] * grid[1], _STATS + 3 * _MOMENTS), dtype=torch.float32, device=img.device)
    args = (img, fixed, theta, part, img.shape[1], *img.shape[2:], *fixed.shape[2:])
    _loss_kernel[grid](*args, BORDER=border, NCC=ncc, **tiles)
    sums = part.double().sum(1)
    moments = sums[:, _STATS:].reshape(n, 3, 3, 4)
    return sums[:, :_STATS], moments
