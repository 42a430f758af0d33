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

_OPTS = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}


@nb.njit(inline="always", **{k: v for k, v in _OPTS.items() if k != "cache"})
def _unnorm(g: float, n: int, border: bool) -> float:
    ix = ((g + 1.0) * n - 1.0) * 0.5
    if border:
        ix = min(max(ix, 0.0), n - 1.0)
    return ix


@nb.njit(inline="always", **{k: v for k, v in _OPTS.items() if k != "cache"})
def _accumulate3d(acc, gx: float, gy: float, gz: float, ux: float, uy: float, uz: float) -> None:
    """Add one voxel's share ``∇v ⊗ [u; 1]`` to a 3 x 4 θ-gradient accumulator."""
    for row, g in enumerate((gx, gy, gz)):
        acc[row, 0] += g * ux
        acc[row, 1] += g * uy
        acc[row, 2] += g * uz
        acc[row, 3] += g


@nb.njit(parallel=True, **_OPTS)
def affine3d_forward(img, theta, out, border):  # pragma: no cover - compiled
    n_b, n_c, d, h, w = img.shape
    od, oh, ow = out.shape[2], out.shape[3], out.shape[4]
    for b in range(n_b):
        t = theta[b]
        for z in nb.prange(od):
            uz = (2.0 * z + 1.0) / od - 1.0
            for y in range(oh):
                uy = (2.0 * y + 1.0) / oh - 1.0
                for x in range(ow):
                    ux = (2.0 * x + 1.0) / ow - 1.0
                    ix = _unnorm(t[0, 0] * ux + t[0, 1] * uy + t[0, 2] * uz + t[0, 3], w, border)
                    iy = _unnorm(t[1, 0] * ux + t[1, 1] * uy + t[1, 2] * uz + t[1, 3], h, border)
                    iz = _unnorm(t[2, 0] * ux + t[2, 1] * uy + t[2, 2] * uz + t[2, 3], d, border)
                    x0, y0, z0 = math.floor(ix), math.floor(iy), math.floor(iz)
                    fx, fy, fz = ix - x0, iy - y0, iz - z0
                    for c in range(n_c):
                        acc = 0.0
                        for k in range(2):
                            zz = z0 + k
                            if zz < 0 or zz >= d:
                                continue
                            wz = fz if k else 1.0 - fz
                            for j in range(2):
                                yy = y0 + j
                                if yy < 0 or yy >= h:
                                    continue
                                wy = fy if j else 1.0 - fy
                                for i in range(2):
                                    xx = x0 + i
                                    if xx < 0 or xx >= w:
                                        continue
                                    wx = fx if i else 1.0 - fx
                                    acc += wz * wy * wx * img[b, c, zz, yy, xx]
                        out[b, c, z, y, x] = acc


@nb.njit(parallel=True, **_OPTS)
def affine3d_grad_theta(img, theta, gout, partial, border):  # pragma: no cover - compiled
    """``partial[b, z]`` receives slice ``z``'s share of ``∂L/∂θ_b`` (3 x 4)."""
    n_b, n_c, d, h, w = img.shape
    od, oh, ow = gout.shape[2], gout.shape[3], gout.shape[4]
    for b in range(n_b):
        t = theta[b]
        for z in nb.prange(od):
            uz = (2.0 * z + 1.0) / od - 1.0
            acc = np.zeros((3, 4))
            for y in range(oh):
                uy = (2.0 * y + 1.0) / oh - 1.0
                for x in range(ow):
                    ux = (2.0 * x + 1.0) / ow - 1.0
                    gx = t[0, 0] * ux + t[0, 1] * uy + t[0, 2] * uz + t[0, 3]
                    gy = t[1, 0] * ux + t[1, 1] * uy + t[1, 2] * uz + t[1, 3]
                    gz = t[2, 0] * ux + t[2, 1] * uy + t[2, 2] * uz + t[2, 3]
                    rx = ((gx + 1.0) * w - 1.0) * 0.5
                    ry = ((gy + 1.0) * h - 1.0) * 0.5
                    rz = ((gz + 1.0) * d - 1.0) * 0.5
                    # Border padding clamps: the clamped coordinate does not move, its gradient is 0.
                    sx = 0.5 * w if (not border or 0.0 < rx < w - 1.0) else 0.0
                    sy = 0.5 * h if (not border or 0.0 < ry < h - 1.0) else 0.0
                    sz = 0.5 * d if (not border or 0.0 < rz < d - 1.0) else 0.0
                    if border:
                        rx = min(max(rx, 0.0), w - 1.0)
                        ry = min(max(ry, 0.0), h - 1.0)
                        rz = min(max(rz, 0.0), d - 1.0)
                    x0, y0, z0 = math.floor(rx), math.floor(ry), math.floor(rz)
                    fx, fy, fz = rx - x0, ry - y0, rz - z0
                    dvx = 0.0
                    dvy = 0.0
                    dvz = 0.0
                    for c in range(n_c):
                        go = gout[b, c, z, y, x]
                        if go == 0.0:
                            continue
                        for k in range(2):
                            zz = z0 + k
                            if zz < 0 or zz >= d:
                                continue
                            wz = fz if k else 1.0 - fz
                            dz = 1.0 if k else -1.0
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
                                    v = go * img[b, c, zz, yy, xx]
                                    dvx += v * dx * wy * wz
                                    dvy += v * wx * dy * wz
                                    dvz += v * wx * wy * dz
                    dvx *= sx
                    dvy *= sy
                    dvz *= sz
                    _accumulate3d(acc, dvx, dvy, dvz, ux, uy, uz)
            partial[b, z] = acc


@nb.njit(**_OPTS)
def affine3d_grad_image(theta, gout, gimg, border):  # pragma: no cover - compiled
    n_b, n_c, d, h, w = gimg.shape
    od, oh, ow = gout.shape[2], gout.shape[3], gout.shape[4]
    for b in range(n_b):
        t = theta[b]
        for z in range(od):
            uz = (2.0 * z + 1.0) / od - 1.0
            for y in range(oh):
                uy = (2.0 * y + 1.0) / oh - 1.0
                for x in range(ow):
                    ux = (2.0 * x + 1.0) / ow - 1.0
                    ix = _unnorm(t[0, 0] * ux + t[0, 1] * uy + t[0, 2] * uz + t[0, 3], w, border)
                    iy = _unnorm(t[1, 0] * ux + t[1, 1] * uy + t[1, 2] * uz + t[1, 3], h, border)
                    iz = _unnorm(t[2, 0] * ux + t[2, 1] * uy + t[2, 2] * uz + t[2, 3], d, border)
                    x0, y0, z0 = math.floor(ix), math.floor(iy), math.floor(iz)
                    fx, fy, fz = ix - x0, iy - y0, iz - z0
                    for k in range(2):
                        zz = z0 + k
                        if zz < 0 or zz >= d:
                            continue
                        wz = fz if k else 1.0 - fz
                        for j in range(2):
                            yy = y0 + j
                            if yy < 0 or yy >= h:
                                continue
                            wy = fy if j else 1.0 - fy
                            for i in range(2):
                                xx = x0 + i
                                if xx < 0 or xx >= w:
                                    continue
                                wgt = wz * wy * (fx if i else 1.0 - fx)
                                for c in range(n_c):
                                    gimg[b, c, zz, yy, xx] += wgt * gout[b, c, z, y, x]


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


@nb.njit(parallel=True, **_OPTS)
def affine3d_loss(img, fixed, theta, border, coef, partial_grad, partial_stats):  # pragma: no cover - compiled
    """One pass of a fused similarity: sample ``v`` at ``θ [u; 1]``, compare with ``fixed``.

    ``partial_stats[b, z]`` receives slice ``z``'s ``(Σv, Σv², Σv·f)``; when ``coef = (a, b, c)`` is
    not all zero, ``partial_grad[b, z]`` receives ``Σ (a f + b v + c) ∂v/∂θ`` (3 x 4). MSE needs one
    pass (``a = -2/n, b = 2/n``); NCC a statistics pass, then a gradient pass.
    """
    n_b, n_c, d, h, w = img.shape
    od, oh, ow = fixed.shape[2], fixed.shape[3], fixed.shape[4]
    ca, cb, cc = coef[0], coef[1], coef[2]
    want_grad = ca != 0.0 or cb != 0.0 or cc != 0.0
    for b in range(n_b):
        t = theta[b]
        for z in nb.prange(od):
            uz = (2.0 * z + 1.0) / od - 1.0
            acc = np.zeros((3, 4))
            s_v = 0.0
            s_vv = 0.0
            s_vf = 0.0
            for y in range(oh):
                uy = (2.0 * y + 1.0) / oh - 1.0
                for x in range(ow):
                    ux = (2.0 * x + 1.0) / ow - 1.0
                    rx = ((t[0, 0] * ux + t[0, 1] * uy + t[0, 2] * uz + t[0, 3] + 1.0) * w - 1.0) * 0.5
                    ry = ((t[1, 0] * ux + t[1, 1] * uy + t[1, 2] * uz + t[1, 3] + 1.0) * h - 1.0) * 0.5
                    rz = ((t[2, 0] * ux + t[2, 1] * uy + t[2, 2] * uz + t[2, 3] + 1.0) * d - 1.0) * 0.5
                    sx = 0.5 * w if (not border or 0.0 < rx < w - 1.0) else 0.0
                    sy = 0.5 * h if (not border or 0.0 < ry < h - 1.0) else 0.0
                    sz = 0.5 * d if (not border or 0.0 < rz < d - 1.0) else 0.0
                    if border:
                        rx = min(max(rx, 0.0), w - 1.0)
                        ry = min(max(ry, 0.0), h - 1.0)
                        rz = min(max(rz, 0.0), d - 1.0)
                    x0, y0, z0 = math.floor(rx), math.floor(ry), math.floor(rz)
                    fx, fy, fz = rx - x0, ry - y0, rz - z0
                    for c in range(n_c):
                        v = 0.0
                        dvx = 0.0
                        dvy = 0.0
                        dvz = 0.0
                        for k in range(2):
                            zz = z0 + k
                            if zz < 0 or zz >= d:
                                continue
                            wz = fz if k else 1.0 - fz
                            dz = 1.0 if k else -1.0
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
                                    q = img[b, c, zz, yy, xx]
                                    v += wx * wy * wz * q
                                    dvx += q * dx * wy * wz
                                    dvy += q * wx * dy * wz
                                    dvz += q * wx * wy * dz
                        f = fixed[b, c, z, y, x]
                        s_v += v
                        s_vv += v * v
                        s_vf += v * f
                        if want_grad:
                            g = ca * f + cb * v + cc
                            gx = g * dvx * sx
                            gy = g * dvy * sy
                            gz = g * dvz * sz
                            _accumulate3d(acc, gx, gy, gz, ux, uy, uz)
            partial_stats[b, z, 0] = s_v
            partial_stats[b, z, 1] = s_vv
            partial_stats[b, z, 2] = s_vf
            partial_grad[b, z] = acc


def _serial(fn):
    """The same kernel compiled without threads: no thread pool is woken for one-thread runs."""
    return nb.njit(**_OPTS)(fn.py_func)


SERIAL = {
    name: _serial(globals()[name])
    for name in ("affine3d_forward", "affine3d_grad_theta", "affine2d_forward", "affine2d_grad_theta", "affine3d_loss")
}
