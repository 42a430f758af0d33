"""Numba kernels: cubic B-spline warp with the displacement evaluated on the fly (CPU, 3D).

For output voxel ``(x, y, z)`` the input pixel position is ``r = K [x, y, z, 1] + R disp(x, y, z)``
(``K`` ``3x4`` and ``R`` ``3x3`` fold the output lattice, any matrices applied after the B-spline,
and the input's world-to-pixel map), where ``disp`` is the B-spline displacement, ``(x, y, z)``
components. On a lattice aligned with the control grid the cubic weights separate per axis: the
caller passes, per output index of each axis, the four control indices (clamped to the lattice,
as the reference evaluation clamps them) and their weights. Each output row first contracts the
``4 x 4`` (z, y) neighbourhood of the coefficients into a 1D spline along x (``48 cx`` multiply-adds
per row), then every voxel needs 12. No displacement field, coordinate grid or grid-sized gradient
exists, forward or backward.

Backward (coefficients only): per voxel ``∂L/∂disp = Rᵀ Σ_c go_c ∇I_c(r)``, spread along x into a
row buffer, then over the row's four y taps into a per-slice ``(3, cy, cx)`` partial; the slices'
partials are spread over their z taps in slice order, on one thread, so results do not depend on
the thread count. Threads split output slices as in :mod:`.affine_cpu`.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .trilinear import FAST, INLINE, matrix_rows, row_buffers, row_cells, row_position_gradients, row_values


@nb.njit(**INLINE)
def _contract_row(coef, b, z, y, tz_idx, tz_w, ty_idx, ty_w, row) -> None:
    """``row[c, jx] = Σ_{a, e} wz_a wy_e coef[b, c, kz_a, ky_e, jx]``: the row's 1D spline along x."""
    cx = row.shape[1]
    for c in range(3):
        for jx in range(cx):
            row[c, jx] = 0.0
        for a in range(4):
            wa = tz_w[z, a]
            za = tz_idx[z, a]
            for e in range(4):
                wae = wa * ty_w[y, e]
                ye = ty_idx[y, e]
                # Scalar indexing: a sub-array view per (a, e) cost more than the multiply-adds.
                for jx in range(cx):
                    row[c, jx] += wae * coef[b, c, za, ye, jx]


@nb.njit(**INLINE)
def _row_positions(row, tx_idx, tx_w, kb, rb, y, z, pos) -> None:
    """Pixel positions ``pos[0:3]`` of one output row: ``K [x, y, z, 1] + R disp``."""
    px = kb[0][1] * y + kb[0][2] * z + kb[0][3]
    py = kb[1][1] * y + kb[1][2] * z + kb[1][3]
    pz = kb[2][1] * y + kb[2][2] * z + kb[2][3]
    for x in range(pos.shape[1]):
        d0 = 0.0
        d1 = 0.0
        d2 = 0.0
        for k in range(4):
            j = tx_idx[x, k]
            wk = tx_w[x, k]
            d0 += wk * row[0, j]
            d1 += wk * row[1, j]
            d2 += wk * row[2, j]
        pos[0, x] = px + kb[0][0] * x + rb[0][0] * d0 + rb[0][1] * d1 + rb[0][2] * d2
        pos[1, x] = py + kb[1][0] * x + rb[1][0] * d0 + rb[1][1] * d1 + rb[1][2] * d2
        pos[2, x] = pz + kb[2][0] * x + rb[2][0] * d0 + rb[2][1] * d1 + rb[2][2] * d2


@nb.njit(**FAST)
def _forward_slice(  # pragma: no cover - compiled
    b, z, img, coef, tx_idx, tx_w, ty_idx, ty_w, tz_idx, tz_w, k, r, out, d, h, w, border
):
    oh, ow = out.shape[3], out.shape[4]
    row = np.empty((3, coef.shape[4]))
    buf = row_buffers(ow, img.dtype)
    pos, cell, inside, _ = buf
    kb, rb = matrix_rows(k, b, 4), matrix_rows(r, b, 3)
    for y in range(oh):
        _contract_row(coef, b, z, y, tz_idx, tz_w, ty_idx, ty_w, row)
        _row_positions(row, tx_idx, tx_w, kb, rb, y, z, pos)
        row_cells(pos, d, h, w, cell, inside)
        for c in range(img.shape[1]):
            row_values(img[b, c], d, h, w, border, buf, out[b, c, z, y])


@nb.njit(**FAST)
def _grad_slice(  # pragma: no cover - compiled
    b, z, img, coef, tx_idx, tx_w, ty_idx, ty_w, tz_idx, tz_w, k, r, gout, partial, d, h, w, border
):
    oh, ow = gout.shape[3], gout.shape[4]
    cx = coef.shape[4]
    row = np.empty((3, cx))
    rgrad = np.empty((3, cx))
    buf = row_buffers(ow, img.dtype)
    pos, cell, inside, _ = buf
    values = np.empty(ow, img.dtype)
    grads = np.empty((3, ow))
    gpos = np.empty((3, ow))
    kb, rb = matrix_rows(k, b, 4), matrix_rows(r, b, 3)
    for y in range(oh):
        _contract_row(coef, b, z, y, tz_idx, tz_w, ty_idx, ty_w, row)
        _row_positions(row, tx_idx, tx_w, kb, rb, y, z, pos)
        row_cells(pos, d, h, w, cell, inside)
        # ∂L/∂disp = Rᵀ Σ_c go_c ∇I_c(r)
        row_position_gradients(img[b], gout[b, :, z, y], d, h, w, border, buf, rb, values, grads, gpos)
        rgrad[:] = 0.0
        for x in range(ow):
            for t in range(4):
                j = tx_idx[x, t]
                wt = tx_w[x, t]
                rgrad[0, j] += wt * gpos[0, x]
                rgrad[1, j] += wt * gpos[1, x]
                rgrad[2, j] += wt * gpos[2, x]
        for e in range(4):
            we = ty_w[y, e]
            ye = ty_idx[y, e]
            for c in range(3):
                for jx in range(cx):
                    partial[b, z, c, ye, jx] += we * rgrad[c, jx]


@nb.njit(**FAST)
def spread_z(partial, tz_idx, tz_w, grad):  # pragma: no cover - compiled
    """``grad[b, c, kz] += wz partial[b, z, c]`` over every slice's four z taps, in slice order."""
    for b in range(partial.shape[0]):
        for z in range(partial.shape[1]):
            for a in range(4):
                wa = tz_w[z, a]
                za = tz_idx[z, a]
                for c in range(3):
                    grad[b, c, za] += wa * partial[b, z, c]


# Drivers as in affine_cpu (module-level, so numba's disk cache finds them in the next process).


@nb.njit(parallel=True, **FAST)
def _forward_threaded(n_b, od, *args):  # pragma: no cover - compiled
    for task in nb.prange(n_b * od):
        _forward_slice(task // od, task % od, *args)


@nb.njit(**FAST)
def _forward_serial(n_b, od, *args):  # pragma: no cover - compiled
    for task in range(n_b * od):
        _forward_slice(task // od, task % od, *args)


@nb.njit(parallel=True, **FAST)
def _grad_threaded(n_b, od, *args):  # pragma: no cover - compiled
    for task in nb.prange(n_b * od):
        _grad_slice(task // od, task % od, *args)


@nb.njit(**FAST)
def _grad_serial(n_b, od, *args):  # pragma: no cover - compiled
    for task in range(n_b * od):
        _grad_slice(task // od, task % od, *args)


KERNELS = {
    "bspline3d_forward": (_forward_threaded, _forward_serial),
    "bspline3d_grad": (_grad_threaded, _grad_serial),
}
