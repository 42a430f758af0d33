"""Trilinear sampling with its spatial gradient, the building block of the 3D numba kernels.

Positions are input **pixel** coordinates ``r = ((g + 1) n - 1) / 2`` of normalized ``g``
(``align_corners=False``), as ``grid_sample`` computes them. Images arrive flattened per channel,
``(N, C, D*H*W)`` C-contiguous, so that one integer offset addresses a voxel.

Kernels that write a value or a gradient per voxel work a row of output voxels at a time, in
phases: the positions (the caller's), the cells and fractions of all of them (:func:`row_cells`),
the gathers alone (:func:`gather_row`), then the interpolation from the gathered corners
(:func:`row_values`, :func:`row_gradients`) or the weights of a scatter (:func:`scatter_row`).
Positions whose eight neighbours do not all exist then take the checked path with
``grid_sample``'s zero or border padding (:func:`checked3d`). The arithmetic phases have no
gathers and no branches, so LLVM vectorizes them (checked in the assembly); LLVM does not vectorize
the gathers. The same work per voxel written as one loop runs scalar, 1.3-1.6x slower (measured on
a 1 mm brain, fields and matrices alike).

Kernels that reduce over the voxels (a matrix's parameter gradient, the fused similarities) keep
one loop per voxel instead: the interior span of a row (:func:`row_span`), where all eight
neighbours exist and the gathers need no checks, and the edges on the checked path. Their sums
stay in registers; in phases they ran 5-20% slower (measured), since the reductions do not
vectorize and the row buffers add a pass.

numba's disk cache keys each kernel on its own module's file, not on the helpers it inlines from
here: :func:`stnreg.fast.loader.drop_stale_kernel_caches` deletes cache files older than any kernel
source before the kernels load.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

# fastmath lets LLVM reorder sums and contract multiply-adds; inputs are checked finite beforehand.
FAST = {"cache": True, "nogil": True, "fastmath": True, "error_model": "numpy"}
INLINE = {"inline": "always", "nogil": True, "fastmath": True, "error_model": "numpy"}


@nb.njit(**INLINE)
def interior_span(r0: float, step: float, n: int, count: int) -> tuple[int, int]:
    """Indices ``[a, b)`` of ``x`` in ``0..count`` with ``0 <= r0 + x step < n - 1``, one voxel of
    margin each side so that rounding can never reach outside the image."""
    hi = n - 1.0
    if step == 0.0:
        return (0, count) if 0.0 <= r0 < hi else (0, 0)
    lo_x = (0.0 - r0) / step
    hi_x = (hi - r0) / step
    if step < 0.0:
        lo_x, hi_x = hi_x, lo_x
    # Clamped before rounding: a tiny step gives bounds far beyond any int.
    a = max(0, math.ceil(min(max(lo_x, -2.0), count + 2.0)) + 1)
    b = min(count, math.floor(min(max(hi_x, -2.0), count + 2.0)) - 1)
    return (a, max(a, b))


@nb.njit(**INLINE)
def _corners(flat, rx: float, ry: float, rz: float, w: int, hw: int):
    """The eight neighbours of an interior position and its fractional offsets."""
    # Interior positions are >= 0: truncation is the floor, and unsigned offsets spare numba's
    # negative-index wraparound on every gather (measured 1.8x faster than signed indexing).
    ix = np.uintp(rx)
    iy = np.uintp(ry)
    iz = np.uintp(rz)
    base = iz * np.uintp(hw) + iy * np.uintp(w) + ix
    one, uw, uhw = np.uintp(1), np.uintp(w), np.uintp(hw)
    p = (
        flat[base],
        flat[base + one],
        flat[base + uw],
        flat[base + uw + one],
        flat[base + uhw],
        flat[base + uhw + one],
        flat[base + uhw + uw],
        flat[base + uhw + uw + one],
    )
    return p, rx - ix, ry - iy, rz - iz


@nb.njit(**INLINE)
def lerp(p, fx: float, fy: float, fz: float) -> float:
    """Trilinear value from the eight corners ``p`` (bits of the index: x, y, z) and fractions."""
    a00 = p[0] + fx * (p[1] - p[0])
    a01 = p[2] + fx * (p[3] - p[2])
    a10 = p[4] + fx * (p[5] - p[4])
    a11 = p[6] + fx * (p[7] - p[6])
    b0 = a00 + fy * (a01 - a00)
    return b0 + fz * (a10 + fy * (a11 - a10) - b0)


@nb.njit(**INLINE)
def lerp_gradient(p, fx: float, fy: float, fz: float):
    """Trilinear value and ``∂/∂(rx, ry, rz)`` from the eight corners ``p`` and fractions."""
    d00 = p[1] - p[0]
    d01 = p[3] - p[2]
    d10 = p[5] - p[4]
    d11 = p[7] - p[6]
    a00 = p[0] + fx * d00
    a01 = p[2] + fx * d01
    a10 = p[4] + fx * d10
    a11 = p[6] + fx * d11
    b0 = a00 + fy * (a01 - a00)
    b1 = a10 + fy * (a11 - a10)
    gx0 = d00 + fy * (d01 - d00)
    gx1 = d10 + fy * (d11 - d10)
    v = b0 + fz * (b1 - b0)
    gx = gx0 + fz * (gx1 - gx0)
    gy = (a01 - a00) + fz * ((a11 - a10) - (a01 - a00))
    return v, gx, gy, b1 - b0


@nb.njit(**INLINE)
def interior3d_value(flat, rx: float, ry: float, rz: float, w: int, hw: int) -> float:
    """Trilinear value at an interior position (all eight neighbours inside the image)."""
    p, fx, fy, fz = _corners(flat, rx, ry, rz, w, hw)
    return lerp(p, fx, fy, fz)


@nb.njit(**INLINE)
def interior3d(flat, rx: float, ry: float, rz: float, w: int, hw: int):
    """Value and ``∂/∂(rx, ry, rz)`` at an interior position."""
    p, fx, fy, fz = _corners(flat, rx, ry, rz, w, hw)
    return lerp_gradient(p, fx, fy, fz)


@nb.njit(**INLINE)
def row_span(rx: float, ry: float, rz: float, ax: float, ay: float, az: float, d: int, h: int, w: int, count: int):
    """The interior span ``[a, b)`` of a row of ``count`` positions ``r + x a``."""
    a1, b1 = interior_span(rx, ax, w, count)
    a2, b2 = interior_span(ry, ay, h, count)
    a3, b3 = interior_span(rz, az, d, count)
    a = max(a1, max(a2, a3))
    return a, max(a, min(b1, min(b2, b3)))


@nb.njit(**INLINE)
def moments(s, wgt: float, gx: float, gy: float, gz: float, ux: float):
    """Running ``Σ wgt ∇v ux`` and ``Σ wgt ∇v`` per axis, as ``(xu, x1, yu, y1, zu, z1)``."""
    qx = wgt * gx
    qy = wgt * gy
    qz = wgt * gz
    return (s[0] + qx * ux, s[1] + qx, s[2] + qy * ux, s[3] + qy, s[4] + qz * ux, s[5] + qz)


@nb.njit(**INLINE)
def _corner(corner: int, x0: int, y0: int, z0: int, fx: float, fy: float, fz: float, d: int, h: int, w: int):
    """Corner ``corner`` (bits: x, y, z) of the cell at ``(x0, y0, z0)``: its flat index (-1 when
    outside the image) and its three 1D interpolation weights."""
    i, j, k = corner & 1, (corner >> 1) & 1, corner >> 2
    xx, yy, zz = x0 + i, y0 + j, z0 + k
    if xx < 0 or xx >= w or yy < 0 or yy >= h or zz < 0 or zz >= d:
        return -1, 0.0, 0.0, 0.0
    return (zz * h + yy) * w + xx, (fx if i else 1.0 - fx), (fy if j else 1.0 - fy), (fz if k else 1.0 - fz)


@nb.njit(**INLINE)
def checked3d(flat, d: int, h: int, w: int, rx: float, ry: float, rz: float, border: bool):
    """As :func:`interior3d` anywhere, with zero or border padding.

    Border padding clamps the position; a clamped axis does not move, so its derivative is 0.
    """
    sx = 1.0
    sy = 1.0
    sz = 1.0
    if border:
        if not 0.0 < rx < w - 1.0:
            sx = 0.0
            rx = min(max(rx, 0.0), w - 1.0)
        if not 0.0 < ry < h - 1.0:
            sy = 0.0
            ry = min(max(ry, 0.0), h - 1.0)
        if not 0.0 < rz < d - 1.0:
            sz = 0.0
            rz = min(max(rz, 0.0), d - 1.0)
    x0, y0, z0 = math.floor(rx), math.floor(ry), math.floor(rz)
    fx, fy, fz = rx - x0, ry - y0, rz - z0
    v = 0.0
    gx = 0.0
    gy = 0.0
    gz = 0.0
    for corner in range(8):
        idx, wx, wy, wz = _corner(corner, x0, y0, z0, fx, fy, fz, d, h, w)
        if idx < 0:
            continue
        q = flat[idx]
        v += wx * wy * wz * q
        # d(weight)/d(position) is +1 for the upper corner of an axis, -1 for the lower.
        gx += q * (1.0 if corner & 1 else -1.0) * wy * wz
        gy += q * wx * (1.0 if corner & 2 else -1.0) * wz
        gz += q * wx * wy * (1.0 if corner & 4 else -1.0)
    return v, gx * sx, gy * sy, gz * sz


@nb.njit(**INLINE)
def _weights(g: float, fx: float, fy: float, fz: float):
    """``g`` times the trilinear weights of the eight corners (bits of the index: x, y, z)."""
    g0, g1 = g * (1.0 - fz), g * fz
    g00, g01, g10, g11 = g0 * (1.0 - fy), g0 * fy, g1 * (1.0 - fy), g1 * fy
    return (
        g00 * (1.0 - fx),
        g00 * fx,
        g01 * (1.0 - fx),
        g01 * fx,
        g10 * (1.0 - fx),
        g10 * fx,
        g11 * (1.0 - fx),
        g11 * fx,
    )


@nb.njit(**INLINE)
def _add_cell(gflat, base, w: int, hw: int, wts) -> None:
    """Add the eight ``wts`` to the corners of the interior cell whose first corner is ``base``."""
    one, uw, uhw = np.uintp(1), np.uintp(w), np.uintp(hw)
    i = np.uintp(base)
    gflat[i] += wts[0]
    gflat[i + one] += wts[1]
    gflat[i + uw] += wts[2]
    gflat[i + uw + one] += wts[3]
    gflat[i + uhw] += wts[4]
    gflat[i + uhw + one] += wts[5]
    gflat[i + uhw + uw] += wts[6]
    gflat[i + uhw + uw + one] += wts[7]


@nb.njit(**INLINE)
def scatter3d(gflat, d: int, h: int, w: int, rx: float, ry: float, rz: float, border: bool, g: float) -> None:
    """Add ``g`` times the trilinear weights at a position into ``gflat`` (the image gradient)."""
    if 0.0 <= rx < w - 1.0 and 0.0 <= ry < h - 1.0 and 0.0 <= rz < d - 1.0:
        # Interior: eight unchecked adds (the common case, twice as fast as the checked loops).
        ix, iy, iz = np.uintp(rx), np.uintp(ry), np.uintp(rz)
        base = iz * np.uintp(h * w) + iy * np.uintp(w) + ix
        _add_cell(gflat, base, w, h * w, _weights(g, rx - ix, ry - iy, rz - iz))
        return
    if border:
        rx = min(max(rx, 0.0), w - 1.0)
        ry = min(max(ry, 0.0), h - 1.0)
        rz = min(max(rz, 0.0), d - 1.0)
    x0, y0, z0 = math.floor(rx), math.floor(ry), math.floor(rz)
    for corner in range(8):
        idx, wx, wy, wz = _corner(corner, x0, y0, z0, rx - x0, ry - y0, rz - z0, d, h, w)
        if idx >= 0:
            gflat[idx] += g * wx * wy * wz


@nb.njit(**INLINE)
def row_buffers(n: int, dtype):
    """Scratch for one row of ``n`` positions: ``pos`` ``(6, n)`` (pixel positions ``x, y, z``,
    then their cells' fractional offsets), ``cell`` ``(n,)`` (flat index of each cell's first
    corner), ``inside`` ``(n,)`` (all eight corners exist) and ``corners`` ``(8, n)`` in ``dtype``."""
    return np.empty((6, n)), np.empty(n, np.int64), np.empty(n, np.bool_), np.empty((8, n), dtype)


@nb.njit(**INLINE)
def row_cells(pos, d: int, h: int, w: int, cell, inside) -> None:
    """From the positions in ``pos[0:3]``: ``inside``, ``cell`` and the fractions ``pos[3:6]``.

    Cells are clamped into the image (a position outside reads a valid cell, whose corners the
    edge path then ignores), in floats and then in integers: the float clamp bounds huge positions,
    the integer clamp any conversion of a non-number. Images with an axis shorter than 2 have no
    interior; their positions all take the edge path, which must not gather here.
    """
    hw = h * w
    for x in range(cell.shape[0]):
        rx, ry, rz = pos[0, x], pos[1, x], pos[2, x]
        inside[x] = (rx >= 0.0) & (rx < w - 1.0) & (ry >= 0.0) & (ry < h - 1.0) & (rz >= 0.0) & (rz < d - 1.0)
        ix = min(max(np.int64(min(max(rx, 0.0), w - 2.0)), 0), w - 2)
        iy = min(max(np.int64(min(max(ry, 0.0), h - 2.0)), 0), h - 2)
        iz = min(max(np.int64(min(max(rz, 0.0), d - 2.0)), 0), d - 2)
        pos[3, x] = rx - ix
        pos[4, x] = ry - iy
        pos[5, x] = rz - iz
        cell[x] = iz * hw + iy * w + ix


@nb.njit(**INLINE)
def gather_row(flat, cell, w: int, hw: int, corners) -> None:
    """The eight corners of every cell of a row into ``corners`` ``(8, n)`` (needs every axis >= 2)."""
    one, uw, uhw = np.uintp(1), np.uintp(w), np.uintp(hw)
    for x in range(cell.shape[0]):
        i = np.uintp(cell[x])
        corners[0, x] = flat[i]
        corners[1, x] = flat[i + one]
        corners[2, x] = flat[i + uw]
        corners[3, x] = flat[i + uw + one]
        corners[4, x] = flat[i + uhw]
        corners[5, x] = flat[i + uhw + one]
        corners[6, x] = flat[i + uhw + uw]
        corners[7, x] = flat[i + uhw + uw + one]


@nb.njit(**INLINE)
def column8(a, x: int):
    """Column ``x`` of an ``(8, n)`` row buffer as a tuple: the gathered corners of position ``x``
    for :func:`lerp` and :func:`lerp_gradient`."""
    return (a[0, x], a[1, x], a[2, x], a[3, x], a[4, x], a[5, x], a[6, x], a[7, x])


@nb.njit(**INLINE)
def scatter_row(gflat, pos, cell, inside, g, d: int, h: int, w: int, border: bool, weights) -> None:
    """Add ``g[x]`` times the trilinear weights of every position of a row into ``gflat``: the
    weights ``(8, n)`` in one vectorized pass, then the adds (interior) or :func:`scatter3d`."""
    for x in range(cell.shape[0]):
        wts = _weights(g[x], pos[3, x], pos[4, x], pos[5, x])
        weights[0, x], weights[1, x], weights[2, x], weights[3, x] = wts[0], wts[1], wts[2], wts[3]
        weights[4, x], weights[5, x], weights[6, x], weights[7, x] = wts[4], wts[5], wts[6], wts[7]
    one, uw, uhw = np.uintp(1), np.uintp(w), np.uintp(h * w)
    for x in range(cell.shape[0]):
        if inside[x]:
            # Each weight read next to its add: reading all eight first (a tuple for _add_cell)
            # made this loop 2x slower (measured).
            i = np.uintp(cell[x])
            gflat[i] += weights[0, x]
            gflat[i + one] += weights[1, x]
            gflat[i + uw] += weights[2, x]
            gflat[i + uw + one] += weights[3, x]
            gflat[i + uhw] += weights[4, x]
            gflat[i + uhw + one] += weights[5, x]
            gflat[i + uhw + uw] += weights[6, x]
            gflat[i + uhw + uw + one] += weights[7, x]
        else:
            scatter3d(gflat, d, h, w, pos[0, x], pos[1, x], pos[2, x], border, g[x])


@nb.njit(**INLINE)
def matrix_rows(m, b: int, cols: int):
    """Row-major entries of ``m[b]`` (3 x ``cols``) as a tuple of tuples, held in registers: read
    through the array, every store to an output made LLVM load them again (it cannot rule out
    aliasing), which cost 40% of the kernel's time."""
    if cols == 3:
        return (
            (m[b, 0, 0], m[b, 0, 1], m[b, 0, 2], 0.0),
            (m[b, 1, 0], m[b, 1, 1], m[b, 1, 2], 0.0),
            (m[b, 2, 0], m[b, 2, 1], m[b, 2, 2], 0.0),
        )
    return (
        (m[b, 0, 0], m[b, 0, 1], m[b, 0, 2], m[b, 0, 3]),
        (m[b, 1, 0], m[b, 1, 1], m[b, 1, 2], m[b, 1, 3]),
        (m[b, 2, 0], m[b, 2, 1], m[b, 2, 2], m[b, 2, 3]),
    )


@nb.njit(**INLINE)
def transposed(r, gx: float, gy: float, gz: float):
    """``Rᵀ (gx, gy, gz)`` for ``r`` from :func:`matrix_rows`: the chain rule from a pixel position
    ``K x + R u`` to ``u``."""
    return (
        r[0][0] * gx + r[1][0] * gy + r[2][0] * gz,
        r[0][1] * gx + r[1][1] * gy + r[2][1] * gz,
        r[0][2] * gx + r[1][2] * gy + r[2][2] * gz,
    )


@nb.njit(**INLINE)
def gathered(flat, d: int, h: int, w: int, buf) -> None:
    """The corners of the cells in ``buf`` (:func:`row_buffers`, after :func:`row_cells`) from
    ``flat``; nothing when an axis is shorter than 2 voxels (no position is inside then)."""
    if d >= 2 and h >= 2 and w >= 2:
        gather_row(flat, buf[1], w, h * w, buf[3])


@nb.njit(**INLINE)
def row_values(flat, d: int, h: int, w: int, border: bool, buf, values) -> None:
    """Values of ``flat`` at the row's positions in ``buf`` into ``values`` ``(n,)``."""
    pos, _, inside, corners = buf
    gathered(flat, d, h, w, buf)
    for x in range(values.shape[0]):
        values[x] = lerp(column8(corners, x), pos[3, x], pos[4, x], pos[5, x])
    for x in range(values.shape[0]):
        if not inside[x]:
            values[x] = checked3d(flat, d, h, w, pos[0, x], pos[1, x], pos[2, x], border)[0]


@nb.njit(**INLINE)
def row_gradients(flat, d: int, h: int, w: int, border: bool, buf, rb, values, grads) -> None:
    """Values of ``flat`` at the row's positions in ``buf`` into ``values`` ``(n,)``, and their
    spatial gradients times ``Rᵀ`` (``rb`` from :func:`matrix_rows`) into ``grads`` ``(3, n)``."""
    pos, _, inside, corners = buf
    gathered(flat, d, h, w, buf)
    for x in range(grads.shape[1]):
        v, gx, gy, gz = lerp_gradient(column8(corners, x), pos[3, x], pos[4, x], pos[5, x])
        values[x] = v
        grads[0, x], grads[1, x], grads[2, x] = transposed(rb, gx, gy, gz)
    for x in range(grads.shape[1]):
        if not inside[x]:
            v, gx, gy, gz = checked3d(flat, d, h, w, pos[0, x], pos[1, x], pos[2, x], border)
            values[x] = v
            grads[0, x], grads[1, x], grads[2, x] = transposed(rb, gx, gy, gz)


@nb.njit(**INLINE)
def row_position_gradients(img_b, go_rows, d: int, h: int, w: int, border: bool, buf, rb, values, grads, total):
    """``total`` ``(3, n)`` = ``Σ_c go_c Rᵀ ∇I_c`` at the row's positions in ``buf``: the gradient of
    ``Σ_c go_c I_c(r)`` with respect to ``u`` in ``r = K x + R u``, for ``img_b`` ``(C, D*H*W)`` and
    ``go_rows`` ``(C, n)``; ``values`` and ``grads`` are scratch for :func:`row_gradients`."""
    total[:] = 0.0
    for c in range(img_b.shape[0]):
        row_gradients(img_b[c], d, h, w, border, buf, rb, values, grads)
        go = go_rows[c]
        for x in range(total.shape[1]):
            total[0, x] += go[x] * grads[0, x]
            total[1, x] += go[x] * grads[1, x]
            total[2, x] += go[x] * grads[2, x]
