"""Numba kernels: trilinear sampling at positions read from a field, CPU.

The same arithmetic as ``grid_sample(..., align_corners=False)`` with zero or border padding. The
input pixel position of output voxel ``(x, y, z)`` of item ``b`` is

    r = K[b] @ (x, y, z, 1) + R[b] @ u[b, z, y, x]

with ``u`` the 3-vectors of a field, ``K`` ``(N, 3, 4)`` and ``R`` ``(N, 3, 3)`` float64. The field
arrives flattened per item, ``(N, 3 D' H' W')``, in either layout: channels-last sampling
coordinates (``xs = 3``, ``cs = 1``) or a channel-first displacement read in place (``xs = 1``,
``cs = D' H' W'``); component ``j`` of voxel ``(x, y, z)`` sits at ``((z H' + y) W' + x) xs + j cs``.
Its gradient is written in the same layout.
Sampling coordinates are the case ``K = [0 | (n - 1) / 2]``, ``R = diag(n / 2)`` (normalized to
pixel); a displacement field on the output lattice is ``K`` = the lattice point's pixel position,
``R`` = displacement units to pixels. The forward writes the output; the backward returns ``u``'s
gradient from the image's spatial derivative at the same positions (kept by the forward as
``∂out/∂u`` when it fits a memory budget, else a second gather pass; with one channel it is kept
in ``u``'s layout and the backward's product overwrites it with the gradient), and the image
gradient, a scatter, only when the image needs one. Work is split by output slice, as in
:mod:`.affine_cpu`, and each row is done in phases (positions, cells, gathers, interpolation) so
that LLVM vectorizes all but the gathers (see :mod:`.trilinear`).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .trilinear import (
    FAST,
    INLINE,
    matrix_rows,
    row_buffers,
    row_cells,
    row_gradients,
    row_position_gradients,
    row_values,
    scatter_row,
)


@nb.njit(**INLINE)
def _components(a, i: int, stride: int, cs: int, n: int):
    """Views of the three components of ``n`` consecutive voxels of a flat field ``a`` whose voxels
    are ``stride`` apart and components ``cs`` apart, from voxel offset ``i``."""
    end = i + n * stride
    return a[i:end:stride], a[i + cs : end + cs : stride], a[i + 2 * cs : end + 2 * cs : stride]


@nb.njit(**INLINE)
def _row_cells(ub, row: int, xs: int, cs: int, kb, rb, y: int, z: int, d: int, h: int, w: int, buf) -> None:
    """Positions ``K (x, y, z, 1) + R u`` of row ``(y, z)`` (flat voxel offset ``row``) and their
    cells into the scratch ``buf`` (:func:`row_buffers`)."""
    pos, cell, inside, _ = buf
    n = cell.shape[0]
    ux, uy, uz = _components(ub, row * xs, xs, cs, n)
    ox = kb[0][1] * y + kb[0][2] * z + kb[0][3]
    oy = kb[1][1] * y + kb[1][2] * z + kb[1][3]
    oz = kb[2][1] * y + kb[2][2] * z + kb[2][3]
    for x in range(n):
        a, b, c = ux[x], uy[x], uz[x]
        pos[0, x] = ox + kb[0][0] * x + rb[0][0] * a + rb[0][1] * b + rb[0][2] * c
        pos[1, x] = oy + kb[1][0] * x + rb[1][0] * a + rb[1][1] * b + rb[1][2] * c
        pos[2, x] = oz + kb[2][0] * x + rb[2][0] * a + rb[2][1] * b + rb[2][2] * c
    row_cells(pos, d, h, w, cell, inside)


@nb.njit(**FAST)
def _forward_slice(b, z, img, u, xs, cs, k, r, out, d, h, w, border):  # pragma: no cover - compiled
    oh, ow = out.shape[3], out.shape[4]
    kb, rb = matrix_rows(k, b, 4), matrix_rows(r, b, 3)
    buf = row_buffers(ow, img.dtype)
    for y in range(oh):
        _row_cells(u[b], (z * oh + y) * ow, xs, cs, kb, rb, y, z, d, h, w, buf)
        for c in range(img.shape[1]):
            row_values(img[b, c], d, h, w, border, buf, out[b, c, z, y])


@nb.njit(**FAST)
def _grad_u_slice(b, z, img, u, xs, cs, k, r, gout, gu, d, h, w, border):  # pragma: no cover - compiled
    oh, ow = gout.shape[3], gout.shape[4]
    kb, rb = matrix_rows(k, b, 4), matrix_rows(r, b, 3)
    buf = row_buffers(ow, img.dtype)
    values = np.empty(ow, img.dtype)
    grads = np.empty((3, ow))
    total = np.empty((3, ow))
    for y in range(oh):
        row = (z * oh + y) * ow
        _row_cells(u[b], row, xs, cs, kb, rb, y, z, d, h, w, buf)
        row_position_gradients(img[b], gout[b, :, z, y], d, h, w, border, buf, rb, values, grads, total)
        gx, gy, gz = _components(gu[b], row * xs, xs, cs, ow)
        gx[:], gy[:], gz[:] = total[0], total[1], total[2]


@nb.njit(**FAST)
def _forward_grad_slice(b, z, img, u, xs, cs, k, r, out, dv, vs, chs, js, d, h, w, border):  # pragma: no cover
    """Forward that also keeps ``∂out/∂u`` in ``dv`` ``(N, L)``, component ``j`` of channel ``c`` at
    voxel ``v`` at ``v vs + c chs + j js``, so that the backward is a product instead of a second
    gather pass."""
    oh, ow = out.shape[3], out.shape[4]
    kb, rb = matrix_rows(k, b, 4), matrix_rows(r, b, 3)
    buf = row_buffers(ow, img.dtype)
    # Gradients go through a contiguous row first: written straight into dv's strided views, LLVM
    # must assume they alias the scratch and does not vectorize (1.5x slower, measured).
    grads = np.empty((3, ow), dv.dtype)
    for y in range(oh):
        row = (z * oh + y) * ow
        _row_cells(u[b], row, xs, cs, kb, rb, y, z, d, h, w, buf)
        for c in range(img.shape[1]):
            row_gradients(img[b, c], d, h, w, border, buf, rb, out[b, c, z, y], grads)
            dx, dy, dz = _components(dv[b], row * vs + c * chs, vs, js, ow)
            dx[:], dy[:], dz[:] = grads[0], grads[1], grads[2]


@nb.njit(**FAST)
def _chain_slice(b, z, dv, vs, chs, js, gout, gu, xs, cs):  # pragma: no cover - compiled
    """``gu = Σ_c gout_c dv_c`` (torch's broadcast product measured 4x slower); ``gu`` may be
    ``dv`` itself (one channel, ``dv`` in ``u``'s layout): each voxel is read before it is written."""
    n_c, oh, ow = gout.shape[1], gout.shape[3], gout.shape[4]
    db, gb = dv[b], gu[b]
    for y in range(oh):
        row = (z * oh + y) * ow
        for x in range(ow):
            di = (row + x) * vs
            go = gout[b, 0, z, y, x]
            gx, gy, gz = go * db[di], go * db[di + js], go * db[di + 2 * js]
            for c in range(1, n_c):
                go = gout[b, c, z, y, x]
                dc = di + c * chs
                gx += go * db[dc]
                gy += go * db[dc + js]
                gz += go * db[dc + 2 * js]
            i = (row + x) * xs
            gb[i] = gx
            gb[i + cs] = gy
            gb[i + 2 * cs] = gz


@nb.njit(**FAST)
def grad_image(img_shape_dhw, u, xs, cs, k, r, gout, gimg, border):  # pragma: no cover - compiled
    """Scatter ``gout`` into ``gimg`` ``(N, C, D*H*W)`` through the trilinear weights (one thread:
    outputs share input voxels, and a fixed order keeps the sums reproducible)."""
    d, h, w = img_shape_dhw
    n_b, n_c = gimg.shape[0], gimg.shape[1]
    od, oh, ow = gout.shape[2], gout.shape[3], gout.shape[4]
    buf = row_buffers(ow, gimg.dtype)
    pos, cell, inside, _ = buf
    weights = np.empty((8, ow))
    for b in range(n_b):
        kb, rb = matrix_rows(k, b, 4), matrix_rows(r, b, 3)
        for z in range(od):
            for y in range(oh):
                _row_cells(u[b], (z * oh + y) * ow, xs, cs, kb, rb, y, z, d, h, w, buf)
                for c in range(n_c):
                    scatter_row(gimg[b, c], pos, cell, inside, gout[b, c, z, y], d, h, w, border, weights)


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
def _grad_u_threaded(n_b, od, *args):  # pragma: no cover - compiled
    for task in nb.prange(n_b * od):
        _grad_u_slice(task // od, task % od, *args)


@nb.njit(**FAST)
def _grad_u_serial(n_b, od, *args):  # pragma: no cover - compiled
    for task in range(n_b * od):
        _grad_u_slice(task // od, task % od, *args)


@nb.njit(parallel=True, **FAST)
def _forward_grad_threaded(n_b, od, *args):  # pragma: no cover - compiled
    for task in nb.prange(n_b * od):
        _forward_grad_slice(task // od, task % od, *args)


@nb.njit(**FAST)
def _forward_grad_serial(n_b, od, *args):  # pragma: no cover - compiled
    for task in range(n_b * od):
        _forward_grad_slice(task // od, task % od, *args)


@nb.njit(parallel=True, **FAST)
def _chain_threaded(n_b, od, *args):  # pragma: no cover - compiled
    for task in nb.prange(n_b * od):
        _chain_slice(task // od, task % od, *args)


@nb.njit(**FAST)
def _chain_serial(n_b, od, *args):  # pragma: no cover - compiled
    for task in range(n_b * od):
        _chain_slice(task // od, task % od, *args)


KERNELS = {
    "field3d_forward": (_forward_threaded, _forward_serial),
    "field3d_grad_u": (_grad_u_threaded, _grad_u_serial),
    "field3d_forward_grad": (_forward_grad_threaded, _forward_grad_serial),
    "field3d_chain": (_chain_threaded, _chain_serial),
}
