"""Cubic B-spline reading with its spatial gradient (numba), the fast path of :mod:`stnreg.cubic`.

Inputs: B-spline coefficients flattened per channel ``(N, C, S)`` (``S`` voxels, x fastest), index
positions ``(N, P, d)`` in ``(x, y[, z])`` order. Outputs: values ``(N, C, P)`` and their
derivatives with respect to the positions ``(N, C, P, d)``. Taps outside the image mirror (whole
sample), as the prefilter assumes. Each point writes its own outputs, so the threaded driver gives
the same bits as the serial one. In torch the same reading took 30 ms per evaluation of a 256 x 256
image (16 taps as broadcast tensors); here one pass, in registers.
"""

from __future__ import annotations

import math

import numba as nb

from .trilinear import FAST, INLINE


@nb.njit(**INLINE)
def _mirror(i: int, n: int) -> int:
    if n == 1:
        return 0
    period = 2 * n - 2
    i = i % period
    return period - i if i >= n else i


@nb.njit(**INLINE)
def _weights(t: float):
    """The four tap weights at offset ``t`` and their slopes (tuples: no allocation per point)."""
    t2 = t * t
    t3 = t2 * t
    u = 1.0 - t
    w = (u * u * u / 6.0, (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0, (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0, t3 / 6.0)
    s = (-0.5 * u * u, 1.5 * t2 - 2.0 * t, -1.5 * t2 + t + 0.5, 0.5 * t2)
    return w, s


@nb.njit(**INLINE)
def _taps(f: float, n: int):
    """The four mirrored indices ``floor - 1 .. floor + 2`` of a position with floor ``f``."""
    i = int(f) - 1
    return (_mirror(i, n), _mirror(i + 1, n), _mirror(i + 2, n), _mirror(i + 3, n))


@nb.njit(**INLINE)
def _plane(flat, b: int, c: int, base: int, tx, ty, wx, sx, wy, sy, w: int):
    """Value and (x, y) slopes of the 4 x 4 taps of one z plane starting at flat offset ``base``."""
    v = 0.0
    gx = 0.0
    gy = 0.0
    for j in range(4):
        row = base + ty[j] * w
        rv = 0.0
        rg = 0.0
        for i in range(4):
            a = flat[b, c, row + tx[i]]
            rv += wx[i] * a
            rg += sx[i] * a
        v += wy[j] * rv
        gx += wy[j] * rg
        gy += sy[j] * rv
    return v, gx, gy


# The point functions are compiled apart from the prange drivers (not inlined): numba's parallel
# array analysis fails on their tuples otherwise.
@nb.njit(**FAST)
def _point2d(flat, idx, out, dout, b: int, p: int, h: int, w: int) -> None:
    fx = math.floor(idx[b, p, 0])
    fy = math.floor(idx[b, p, 1])
    wx, sx = _weights(idx[b, p, 0] - fx)
    wy, sy = _weights(idx[b, p, 1] - fy)
    tx = _taps(fx, w)
    ty = _taps(fy, h)
    for c in range(flat.shape[1]):
        v, gx, gy = _plane(flat, b, c, 0, tx, ty, wx, sx, wy, sy, w)
        out[b, c, p] = v
        dout[b, c, p, 0] = gx
        dout[b, c, p, 1] = gy


@nb.njit(**FAST)
def _point3d(flat, idx, out, dout, b: int, p: int, d: int, h: int, w: int) -> None:
    fx = math.floor(idx[b, p, 0])
    fy = math.floor(idx[b, p, 1])
    fz = math.floor(idx[b, p, 2])
    wx, sx = _weights(idx[b, p, 0] - fx)
    wy, sy = _weights(idx[b, p, 1] - fy)
    wz, sz = _weights(idx[b, p, 2] - fz)
    tx = _taps(fx, w)
    ty = _taps(fy, h)
    tz = _taps(fz, d)
    for c in range(flat.shape[1]):
        v = 0.0
        gx = 0.0
        gy = 0.0
        gz = 0.0
        for k in range(4):
            pv, pgx, pgy = _plane(flat, b, c, tz[k] * h * w, tx, ty, wx, sx, wy, sy, w)
            v += wz[k] * pv
            gx += wz[k] * pgx
            gy += wz[k] * pgy
            gz += sz[k] * pv
        out[b, c, p] = v
        dout[b, c, p, 0] = gx
        dout[b, c, p, 1] = gy
        dout[b, c, p, 2] = gz


# One module-level function per driver: numba's disk cache keys on the function (see affine_cpu).
@nb.njit(parallel=True, **FAST)
def _cubic2d_threaded(flat, idx, out, dout, h, w):  # pragma: no cover - compiled
    n, p = idx.shape[0], idx.shape[1]
    for t in nb.prange(n * p):
        _point2d(flat, idx, out, dout, t // p, t % p, h, w)


@nb.njit(**FAST)
def _cubic2d_serial(flat, idx, out, dout, h, w):  # pragma: no cover - compiled
    n, p = idx.shape[0], idx.shape[1]
    for t in range(n * p):
        _point2d(flat, idx, out, dout, t // p, t % p, h, w)


@nb.njit(parallel=True, **FAST)
def _cubic3d_threaded(flat, idx, out, dout, d, h, w):  # pragma: no cover - compiled
    n, p = idx.shape[0], idx.shape[1]
    for t in nb.prange(n * p):
        _point3d(flat, idx, out, dout, t // p, t % p, d, h, w)


@nb.njit(**FAST)
def _cubic3d_serial(flat, idx, out, dout, d, h, w):  # pragma: no cover - compiled
    n, p = idx.shape[0], idx.shape[1]
    for t in range(n * p):
        _point3d(flat, idx, out, dout, t // p, t % p, d, h, w)


KERNELS = {
    "cubic2d": (_cubic2d_threaded, _cubic2d_serial),
    "cubic3d": (_cubic3d_threaded, _cubic3d_serial),
}
