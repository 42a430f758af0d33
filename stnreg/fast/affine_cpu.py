"""Numba kernels: matrix warp with the coordinates generated on the fly (CPU).

For output voxel ``p`` (normalized lattice coordinate ``u``) the input position is ``g = θ [u; 1]``
in normalized coordinates (``align_corners=False``), then bilinear/trilinear interpolation with
zero or border padding, exactly as ``affine_grid`` + ``grid_sample``. No grid tensor exists: the
forward writes only the output, and the backward returns ``∂L/∂θ`` directly,
``Σ_p Σ_c go[c, p] ∇I_c(g(p)) ⊗ [u(p); 1]``, plus the image gradient only when asked.

Threads: the parallel kernels split output slices (3D) or rows (2D) over numba's ``workqueue``
pool, which sleeps between calls (OpenMP's pool spins and starved the other core in our runs);
with one torch thread the serial twins in :data:`SERIAL` run instead.

Determinism: every output slice (3D) or row (2D) accumulates its own partial ``∂L/∂θ`` in a fixed
order and the partials are summed in slice order, so results do not depend on the thread count.
The image gradient scatters into shared voxels and therefore runs on one thread.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .trilinear import (
    FAST,
    INLINE,
    checked3d,
    interior3d,
    moments,
    row_buffers,
    row_cells,
    row_span,
    row_values,
    scatter_row,
)

_OPTS = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}


@nb.njit(inline="always", **{k: v for k, v in _OPTS.items() if k != "cache"})
def _unnorm(g: float, n: int, border: bool) -> float:
    ix = ((g + 1.0) * n - 1.0) * 0.5
    if border:
        ix = min(max(ix, 0.0), n - 1.0)
    return ix


@nb.njit(**INLINE)
def _row_start(t, z: int, y: int, od: int, oh: int, ow: int, d: int, h: int, w: int):
    """Pixel position of output voxel ``(z, y, 0)`` under θ and its step per output ``x``."""
    uz = (2.0 * z + 1.0) / od - 1.0
    uy = (2.0 * y + 1.0) / oh - 1.0
    ux = 1.0 / ow - 1.0
    rx = ((t[0, 0] * ux + t[0, 1] * uy + t[0, 2] * uz + t[0, 3] + 1.0) * w - 1.0) * 0.5
    ry = ((t[1, 0] * ux + t[1, 1] * uy + t[1, 2] * uz + t[1, 3] + 1.0) * h - 1.0) * 0.5
    rz = ((t[2, 0] * ux + t[2, 1] * uy + t[2, 2] * uz + t[2, 3] + 1.0) * d - 1.0) * 0.5
    return rx, ry, rz, t[0, 0] * w / ow, t[1, 0] * h / ow, t[2, 0] * d / ow


@nb.njit(**INLINE)
def _row_cells(t, z: int, y: int, od: int, oh: int, ow: int, d: int, h: int, w: int, buf) -> None:
    """Positions of output row ``(z, y)`` under θ and their cells into the scratch ``buf``."""
    pos, cell, inside, _ = buf
    rx, ry, rz, ax, ay, az = _row_start(t, z, y, od, oh, ow, d, h, w)
    for x in range(ow):
        pos[0, x] = rx + x * ax
        pos[1, x] = ry + x * ay
        pos[2, x] = rz + x * az
    row_cells(pos, d, h, w, cell, inside)


@nb.njit(**INLINE)
def _add_moments(acc, s, z: int, y: int, od: int, oh: int) -> None:
    """Add one output row's :func:`moments` to a 3 x 4 θ-gradient: ``Σ g [ux, uy, uz, 1]`` per axis."""
    uz = (2.0 * z + 1.0) / od - 1.0
    uy = (2.0 * y + 1.0) / oh - 1.0
    for row in range(3):
        su, s1 = s[2 * row], s[2 * row + 1]
        acc[row, 0] += su
        acc[row, 1] += uy * s1
        acc[row, 2] += uz * s1
        acc[row, 3] += s1


@nb.njit(**INLINE)
def _scale_rows(acc, d: int, h: int, w: int) -> None:
    """Chain rule from pixel to normalized coordinates: ``∂r/∂g = n / 2`` per axis."""
    for k in range(4):
        acc[0, k] *= 0.5 * w
        acc[1, k] *= 0.5 * h
        acc[2, k] *= 0.5 * d


@nb.njit(**FAST)
def _forward_slice(b, z, img, theta, out, d, h, w, border):  # pragma: no cover - compiled
    od, oh, ow = out.shape[2], out.shape[3], out.shape[4]
    buf = row_buffers(ow, img.dtype)
    for y in range(oh):
        _row_cells(theta[b], z, y, od, oh, ow, d, h, w, buf)
        for c in range(img.shape[1]):
            row_values(img[b, c], d, h, w, border, buf, out[b, c, z, y])


@nb.njit(**FAST)
def _grad_theta_slice(b, z, img, theta, gout, partial, d, h, w, border):  # pragma: no cover - compiled
    n_c = img.shape[1]
    od, oh, ow = gout.shape[2], gout.shape[3], gout.shape[4]
    acc = np.zeros((3, 4))
    for y in range(oh):
        rx, ry, rz, ax, ay, az = _row_start(theta[b], z, y, od, oh, ow, d, h, w)
        lo, hi = row_span(rx, ry, rz, ax, ay, az, d, h, w, ow)
        for c in range(n_c):
            flat, go = img[b, c], gout[b, c, z, y]
            s = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
            for x in range(lo, hi):
                _, gx, gy, gz = interior3d(flat, rx + x * ax, ry + x * ay, rz + x * az, w, h * w)
                s = moments(s, go[x], gx, gy, gz, (2.0 * x + 1.0) / ow - 1.0)
            for x in range(ow):
                if not lo <= x < hi:
                    _, gx, gy, gz = checked3d(flat, d, h, w, rx + x * ax, ry + x * ay, rz + x * az, border)
                    s = moments(s, go[x], gx, gy, gz, (2.0 * x + 1.0) / ow - 1.0)
            _add_moments(acc, s, z, y, od, oh)
    _scale_rows(acc, d, h, w)
    partial[b, z] = acc


@nb.njit(**INLINE)
def _loss_voxel(ncc, st, m_f, m_v, m_1, v, gx, gy, gz, f, x, ow):
    """One voxel's share of the statistics ``(Σv, Σv², Σv·f, Σf, Σf²)`` and of the moments."""
    st = (st[0] + v, st[1] + v * v, st[2] + v * f, st[3] + f, st[4] + f * f)
    ux = (2.0 * x + 1.0) / ow - 1.0
    if ncc:
        return st, moments(m_f, f, gx, gy, gz, ux), moments(m_v, v, gx, gy, gz, ux), moments(m_1, 1.0, gx, gy, gz, ux)
    return st, moments(m_f, v - f, gx, gy, gz, ux), m_v, m_1


def _make_loss_slice(ncc: bool, overlap: bool):
    """The fused similarity pass over one output slice, specialized at compile time for MSE or NCC,
    over every output voxel (``overlap=False``) or only those whose trilinear cell lies inside the
    moving image (``overlap=True``: ITK's rule that points mapped outside the moving image do not
    count, so that a moved-in border does not bias the optimum).

    ``stats[b, z]`` receives slice ``z``'s ``(Σv, Σv², Σv·f, Σf, Σf², count)``. MSE's derivative in ``v`` is
    known before the pass, ``2 (v - f)`` up to a constant, so ``grads[b, z, 0]`` receives
    ``Σ (v - f) ∂v/∂θ``. NCC's, ``a f + b v + c``, needs the statistics first, so ``grads[b, z, k]``
    receives ``Σ w_k ∂v/∂θ`` for ``w = (f, v, 1)`` and the caller combines them: one pass either way.
    """

    def loss_slice(b, z, img, fixed, theta, d, h, w, border, stats, grads):  # pragma: no cover - compiled
        n_c = img.shape[1]
        od, oh, ow = fixed.shape[2], fixed.shape[3], fixed.shape[4]
        acc_f, acc_v, acc_1 = np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((3, 4))
        st = (0.0, 0.0, 0.0, 0.0, 0.0)
        count = 0
        for y in range(oh):
            rx, ry, rz, ax, ay, az = _row_start(theta[b], z, y, od, oh, ow, d, h, w)
            lo, hi = row_span(rx, ry, rz, ax, ay, az, d, h, w, ow)
            for c in range(n_c):
                flat, fr = img[b, c], fixed[b, c, z, y]
                m_f = m_v = m_1 = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
                count += hi - lo
                for x in range(lo, hi):
                    v, gx, gy, gz = interior3d(flat, rx + x * ax, ry + x * ay, rz + x * az, w, h * w)
                    st, m_f, m_v, m_1 = _loss_voxel(ncc, st, m_f, m_v, m_1, v, gx, gy, gz, fr[x], x, ow)
                # The interior span keeps a voxel of margin; positions there are checked one by one.
                for x in range(ow):
                    if not lo <= x < hi:
                        px, py, pz = rx + x * ax, ry + x * ay, rz + x * az
                        if overlap and not (0.0 <= px <= w - 1.0 and 0.0 <= py <= h - 1.0 and 0.0 <= pz <= d - 1.0):
                            continue
                        count += 1
                        v, gx, gy, gz = checked3d(flat, d, h, w, px, py, pz, border)
                        st, m_f, m_v, m_1 = _loss_voxel(ncc, st, m_f, m_v, m_1, v, gx, gy, gz, fr[x], x, ow)
                _add_moments(acc_f, m_f, z, y, od, oh)
                if ncc:
                    _add_moments(acc_v, m_v, z, y, od, oh)
                    _add_moments(acc_1, m_1, z, y, od, oh)
        for acc in (acc_f, acc_v, acc_1):
            _scale_rows(acc, d, h, w)
        for k in range(5):
            stats[b, z, k] = st[k]
        stats[b, z, 5] = count
        grads[b, z, 0] = acc_f
        grads[b, z, 1] = acc_v
        grads[b, z, 2] = acc_1

    return nb.njit(**FAST)(loss_slice)


# Drivers run ``slice_fn(b, z, *args)`` for every item ``b`` and output slice ``z``. Each slice writes
# its own outputs, so the threaded driver needs no locks and gives the same bits as the serial one;
# the slice functions are compiled apart from the ``prange`` loop, which keeps numba's parallel array
# analysis out of the gather code. Every driver is its own module-level function: numba's disk cache
# keys a closure on its pickled cells, and a pickled dispatcher differs in every process (closures
# were compiled again by every process, ~0.4 s each), and one function jitted both with and without
# ``parallel`` shares one cache entry (the serial build was handed to the threaded kernel).


@nb.njit(parallel=True, **FAST)
def _forward_threaded(n_b, od, *args):  # pragma: no cover - compiled
    for task in nb.prange(n_b * od):
        _forward_slice(task // od, task % od, *args)


@nb.njit(**FAST)
def _forward_serial(n_b, od, *args):  # pragma: no cover - compiled
    for task in range(n_b * od):
        _forward_slice(task // od, task % od, *args)


@nb.njit(parallel=True, **FAST)
def _grad_theta_threaded(n_b, od, *args):  # pragma: no cover - compiled
    for task in nb.prange(n_b * od):
        _grad_theta_slice(task // od, task % od, *args)


@nb.njit(**FAST)
def _grad_theta_serial(n_b, od, *args):  # pragma: no cover - compiled
    for task in range(n_b * od):
        _grad_theta_slice(task // od, task % od, *args)


_mse_slice = _make_loss_slice(False, False)
_ncc_slice = _make_loss_slice(True, False)
_mse_overlap_slice = _make_loss_slice(False, True)
_ncc_overlap_slice = _make_loss_slice(True, True)


@nb.njit(parallel=True, **FAST)
def _mse_threaded(n_b, od, *args):  # pragma: no cover - compiled
    for task in nb.prange(n_b * od):
        _mse_slice(task // od, task % od, *args)


@nb.njit(**FAST)
def _mse_serial(n_b, od, *args):  # pragma: no cover - compiled
    for task in range(n_b * od):
        _mse_slice(task // od, task % od, *args)


@nb.njit(parallel=True, **FAST)
def _ncc_threaded(n_b, od, *args):  # pragma: no cover - compiled
    for task in nb.prange(n_b * od):
        _ncc_slice(task // od, task % od, *args)


@nb.njit(**FAST)
def _ncc_serial(n_b, od, *args):  # pragma: no cover - compiled
    for task in range(n_b * od):
        _ncc_slice(task // od, task % od, *args)


@nb.njit(parallel=True, **FAST)
def _mse_overlap_threaded(n_b, od, *args):  # pragma: no cover - compiled
    for task in nb.prange(n_b * od):
        _mse_overlap_slice(task // od, task % od, *args)


@nb.njit(**FAST)
def _mse_overlap_serial(n_b, od, *args):  # pragma: no cover - compiled
    for task in range(n_b * od):
        _mse_overlap_slice(task // od, task % od, *args)


@nb.njit(parallel=True, **FAST)
def _ncc_overlap_threaded(n_b, od, *args):  # pragma: no cover - compiled
    for task in nb.prange(n_b * od):
        _ncc_overlap_slice(task // od, task % od, *args)


@nb.njit(**FAST)
def _ncc_overlap_serial(n_b, od, *args):  # pragma: no cover - compiled
    for task in range(n_b * od):
        _ncc_overlap_slice(task // od, task % od, *args)


_KERNELS3D = {
    "affine3d_forward": (_forward_threaded, _forward_serial),
    "affine3d_grad_theta": (_grad_theta_threaded, _grad_theta_serial),
    "affine3d_mse": (_mse_threaded, _mse_serial),
    "affine3d_ncc": (_ncc_threaded, _ncc_serial),
    "affine3d_mse_overlap": (_mse_overlap_threaded, _mse_overlap_serial),
    "affine3d_ncc_overlap": (_ncc_overlap_threaded, _ncc_overlap_serial),
}


@nb.njit(**FAST)
def affine3d_grad_image(theta, gout, gimg, d, h, w, border):  # pragma: no cover - compiled
    """Scatter ``gout`` back through the trilinear weights into ``gimg`` ``(N, C, D*H*W)`` (one thread:
    neighbouring outputs share input voxels)."""
    od, oh, ow = gout.shape[2], gout.shape[3], gout.shape[4]
    buf = row_buffers(ow, gimg.dtype)
    pos, cell, inside, _ = buf
    weights = np.empty((8, ow))
    for b in range(gimg.shape[0]):
        for z in range(od):
            for y in range(oh):
                _row_cells(theta[b], z, y, od, oh, ow, d, h, w, buf)
                for c in range(gimg.shape[1]):
                    scatter_row(gimg[b, c], pos, cell, inside, gout[b, c, z, y], d, h, w, border, weights)


@nb.njit(parallel=True, **_OPTS)
def affine2d_forward(img, theta, out, border):  # pragma: no cover - compiled
    n_b, n_c, h, w = img.shape
    oh, ow = out.shape[2], out.shape[3]
    for b in range(n_b):
        t = theta[b]
        for y in nb.prange(oh):
            uy = (2.0 * y + 1.0) / oh - 1.0
            for x in range(ow):
                ux = (2.0 * x + 1.0) / ow - 1.0
                ix = _unnorm(t[0, 0] * ux + t[0, 1] * uy + t[0, 2], w, border)
                iy = _unnorm(t[1, 0] * ux + t[1, 1] * uy + t[1, 2], h, border)
                x0, y0 = math.floor(ix), math.floor(iy)
                fx, fy = ix - x0, iy - y0
                for c in range(n_c):
                    acc = 0.0
                    for j in range(2):
                        yy = y0 + j
                        if yy < 0 or yy >= h:
                            continue
                        wy = fy if j else 1.0 - fy
                        for i in range(2):
                            xx = x0 + i
                            if xx < 0 or xx >= w:
                                continue
                            acc += wy * (fx if i else 1.0 - fx) * img[b, c, yy, xx]
                    out[b, c, y, x] = acc


@nb.njit(parallel=True, **_OPTS)
def affine2d_grad_theta(img, theta, gout, partial, border):  # pragma: no cover - compiled
    n_b, n_c, h, w = img.shape
    oh, ow = gout.shape[2], gout.shape[3]
    for b in range(n_b):
        t = theta[b]
        for y in nb.prange(oh):
            uy = (2.0 * y + 1.0) / oh - 1.0
            acc = np.zeros((2, 3))
            for x in range(ow):
                ux = (2.0 * x + 1.0) / ow - 1.0
                gx = t[0, 0] * ux + t[0, 1] * uy + t[0, 2]
                gy = t[1, 0] * ux + t[1, 1] * uy + t[1, 2]
                rx, ry = ((gx + 1.0) * w - 1.0) * 0.5, ((gy + 1.0) * h - 1.0) * 0.5
                sx = 0.5 * w if (not border or 0.0 < rx < w - 1.0) else 0.0
                sy = 0.5 * h if (not border or 0.0 < ry < h - 1.0) else 0.0
                if border:
                    rx, ry = min(max(rx, 0.0), w - 1.0), min(max(ry, 0.0), h - 1.0)
                x0, y0 = math.floor(rx), math.floor(ry)
                fx, fy = rx - x0, ry - y0
                dvx = 0.0
                dvy = 0.0
                for c in range(n_c):
                    go = gout[b, c, y, x]
                    if go == 0.0:
                        continue
                    for j in range(2):
                        yy = y0 + j
                        if yy < 0 or yy >= h:
                            continue
                        wy = fy if j else 1.0 - fy
                        dy = 1.0 if j else -1.0
                        for i in range(2):
                            xx = x0 + i
                            if xx < 0 or xx >= w:
                                continue
                            wx = fx if i else 1.0 - fx
                            dx = 1.0 if i else -1.0
                            v = go * img[b, c, yy, xx]
                            dvx += v * dx * wy
                            dvy += v * wx * dy
                dvx *= sx
                dvy *= sy
                acc[0, 0] += dvx * ux
                acc[0, 1] += dvx * uy
                acc[0, 2] += dvx
                acc[1, 0] += dvy * ux
                acc[1, 1] += dvy * uy
                acc[1, 2] += dvy
            partial[b, y] = acc


@nb.njit(**_OPTS)
def affine2d_grad_image(theta, gout, gimg, border):  # pragma: no cover - compiled
    n_b, n_c, h, w = gimg.shape
    oh, ow = gout.shape[2], gout.shape[3]
    for b in range(n_b):
        t = theta[b]
        for y in range(oh):
            uy = (2.0 * y + 1.0) / oh - 1.0
            for x in range(ow):
                ux = (2.0 * x + 1.0) / ow - 1.0
                ix = _unnorm(t[0, 0] * ux + t[0, 1] * uy + t[0, 2], w, border)
                iy = _unnorm(t[1, 0] * ux + t[1, 1] * uy + t[1, 2], h, border)
                x0, y0 = math.floor(ix), math.floor(iy)
                fx, fy = ix - x0, iy - y0
                for j in range(2):
                    yy = y0 + j
                    if yy < 0 or yy >= h:
                        continue
                    wy = fy if j else 1.0 - fy
                    for i in range(2):
                        xx = x0 + i
                        if xx < 0 or xx >= w:
                            continue
                        wgt = wy * (fx if i else 1.0 - fx)
                        for c in range(n_c):
                            gimg[b, c, yy, xx] += wgt * gout[b, c, y, x]


def _serial(fn):
    """The same kernel compiled without threads: no thread pool is woken for one-thread runs.

    Not cached on disk: the cache keys on the function, so it would collide with the threaded build.
    """
    return nb.njit(**{**_OPTS, "cache": False})(fn.py_func)


KERNELS = {name: pair for name, pair in _KERNELS3D.items()}
KERNELS.update(
    {name: (globals()[name], _serial(globals()[name])) for name in ("affine2d_forward", "affine2d_grad_theta")}
)
