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
:mod:`.affine_cpu`.
"""

from __future__ import annotations

import numba as nb

from .trilinear import FAST, INLINE, checked3d, interior3d, interior3d_value, scatter3d


@nb.njit(**INLINE)
def _inside(rx: float, ry: float, rz: float, d: int, h: int, w: int) -> bool:
    return 0.0 <= rx < w - 1.0 and 0.0 <= ry < h - 1.0 and 0.0 <= rz < d - 1.0


@nb.njit(**INLINE)
def _rows(m, b: int, cols: int):
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
def _diagonal(r) -> bool:
    """Whether ``R`` is diagonal (sampling coordinates, axis-aligned grids): then six of the nine
    multiply-adds per voxel drop out, worth 10% of the kernel."""
    return r[0][1] == 0.0 and r[0][2] == 0.0 and r[1][0] == 0.0 and r[1][2] == 0.0 and r[2][0] == 0.0 and r[2][1] == 0.0


@nb.njit(**INLINE)
def _transposed(r, diag: bool, gx: float, gy: float, gz: float):
    """``Rᵀ (gx, gy, gz)``: the chain rule from the pixel position to ``u``."""
    if diag:
        return r[0][0] * gx, r[1][1] * gy, r[2][2] * gz
    return (
        r[0][0] * gx + r[1][0] * gy + r[2][0] * gz,
        r[0][1] * gx + r[1][1] * gy + r[2][1] * gz,
        r[0][2] * gx + r[1][2] * gy + r[2][2] * gz,
    )


@nb.njit(**INLINE)
def _row_origin(k, y: int, z: int):
    """Pixel position of voxel ``x = 0`` of row ``(y, z)`` before the field term."""
    return (
        k[0][1] * y + k[0][2] * z + k[0][3],
        k[1][1] * y + k[1][2] * z + k[1][3],
        k[2][1] * y + k[2][2] * z + k[2][3],
    )


@nb.njit(**INLINE)
def _position(k, r, diag: bool, ox: float, oy: float, oz: float, x: int, ub, i: int, cs: int):
    """``K @ (x, y, z, 1) + R @ u`` from the row origin and ``u``'s components at ``ub[i + j cs]``."""
    ux, uy, uz = ub[i], ub[i + cs], ub[i + 2 * cs]
    if diag:
        return ox + k[0][0] * x + r[0][0] * ux, oy + k[1][0] * x + r[1][1] * uy, oz + k[2][0] * x + r[2][2] * uz
    return (
        ox + k[0][0] * x + r[0][0] * ux + r[0][1] * uy + r[0][2] * uz,
        oy + k[1][0] * x + r[1][0] * ux + r[1][1] * uy + r[1][2] * uz,
        oz + k[2][0] * x + r[2][0] * ux + r[2][1] * uy + r[2][2] * uz,
    )


@nb.njit(**FAST)
def _forward_slice(b, z, img, u, xs, cs, k, r, out, d, h, w, border):  # pragma: no cover - compiled
    oh, ow = out.shape[3], out.shape[4]
    kb, rb = _rows(k, b, 4), _rows(r, b, 3)
    diag = _diagonal(rb)
    ub = u[b]
    for y in range(oh):
        row = (z * oh + y) * ow * xs
        ox, oy, oz = _row_origin(kb, y, z)
        for c in range(img.shape[1]):
            # Row views hoisted out of the voxel loop: a view per voxel cost more than the gathers.
            flat, orow = img[b, c], out[b, c, z, y]
            for x in range(ow):
                rx, ry, rz = _position(kb, rb, diag, ox, oy, oz, x, ub, row + x * xs, cs)
                if _inside(rx, ry, rz, d, h, w):
                    orow[x] = interior3d_value(flat, rx, ry, rz, w, h * w)
                else:
                    orow[x] = checked3d(flat, d, h, w, rx, ry, rz, border)[0]


@nb.njit(**FAST)
def _grad_u_slice(b, z, img, u, xs, cs, k, r, gout, gu, d, h, w, border):  # pragma: no cover - compiled
    oh, ow = gout.shape[3], gout.shape[4]
    kb, rb = _rows(k, b, 4), _rows(r, b, 3)
    diag = _diagonal(rb)
    ub, gb = u[b], gu[b]
    for y in range(oh):
        row = (z * oh + y) * ow * xs
        ox, oy, oz = _row_origin(kb, y, z)
        for x in range(ow):
            i = row + x * xs
            rx, ry, rz = _position(kb, rb, diag, ox, oy, oz, x, ub, i, cs)
            sx = 0.0
            sy = 0.0
            sz = 0.0
            for c in range(img.shape[1]):
                if _inside(rx, ry, rz, d, h, w):
                    _, gx, gy, gz = interior3d(img[b, c], rx, ry, rz, w, h * w)
                else:
                    _, gx, gy, gz = checked3d(img[b, c], d, h, w, rx, ry, rz, border)
                go = gout[b, c, z, y, x]
                sx += go * gx
                sy += go * gy
                sz += go * gz
            gb[i], gb[i + cs], gb[i + 2 * cs] = _transposed(rb, diag, sx, sy, sz)


@nb.njit(**FAST)
def _forward_grad_slice(b, z, img, u, xs, cs, k, r, out, dv, vs, chs, js, d, h, w, border):  # pragma: no cover
    """Forward that also keeps ``∂out/∂u`` in ``dv`` ``(N, L)``, component ``j`` of channel ``c`` at
    voxel ``v`` at ``v vs + c chs + j js``, so that the backward is a product instead of a second
    gather pass."""
    oh, ow = out.shape[3], out.shape[4]
    kb, rb = _rows(k, b, 4), _rows(r, b, 3)
    diag = _diagonal(rb)
    ub, db = u[b], dv[b]
    for y in range(oh):
        row = (z * oh + y) * ow
        ox, oy, oz = _row_origin(kb, y, z)
        for c in range(img.shape[1]):
            flat, orow = img[b, c], out[b, c, z, y]
            for x in range(ow):
                rx, ry, rz = _position(kb, rb, diag, ox, oy, oz, x, ub, (row + x) * xs, cs)
                # Branches written out: the same through a helper returning the tuple measured 15% slower.
                if _inside(rx, ry, rz, d, h, w):
                    v, gx, gy, gz = interior3d(flat, rx, ry, rz, w, h * w)
                else:
                    v, gx, gy, gz = checked3d(flat, d, h, w, rx, ry, rz, border)
                orow[x] = v
                di = (row + x) * vs + c * chs
                db[di], db[di + js], db[di + 2 * js] = _transposed(rb, diag, gx, gy, gz)


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
    for b in range(n_b):
        kb, rb = _rows(k, b, 4), _rows(r, b, 3)
        diag = _diagonal(rb)
        ub = u[b]
        for c in range(n_c):
            flat = gimg[b, c]
            for z in range(od):
                for y in range(oh):
                    row = (z * oh + y) * ow * xs
                    gorow = gout[b, c, z, y]
                    ox, oy, oz = _row_origin(kb, y, z)
                    for x in range(ow):
                        rx, ry, rz = _position(kb, rb, diag, ox, oy, oz, x, ub, row + x * xs, cs)
                        scatter3d(flat, d, h, w, rx, ry, rz, border, gorow[x])


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
