"""Numba kernels: 3D thin-plate spline warp with the map evaluated on the fly (CPU).

Output voxel ``i = (x, y, z)`` sits at domain point ``p = P [i; 1]``; the spline moves it to
``T(p) = p + a_0 + A p + sum_k w_k |p - c_k|`` (the 3D biharmonic kernel ``U(r) = r``), and the
input pixel position is ``r = M [T(p); 1]`` (``M`` ``3x4`` folds any matrices applied after the
spline and the input's world-to-pixel map). Coefficients ``(K + 4, 3)`` are the kernel weights
``w_k``, then ``a_0``, then the rows of ``Aᵀ``, as :meth:`ThinPlateSpline.coefficients` returns them.

No ``(voxels x K)`` basis, coordinate grid or grid-sized gradient exists, forward or backward; the
work is still ``K`` kernel evaluations per voxel and pass, as for the dense evaluation.

Backward (coefficients only): per voxel ``g = Mᵀ Σ_c go_c ∇I_c(r)`` (``M``'s ``3x3`` part), then
``∂L/∂w_k += |p - c_k| g``, ``∂L/∂a_0 += g`` and ``∂L/∂Aᵀ[j] += p_j g`` into a per-slice partial,
summed over slices in slice order by the caller, so results do not depend on the thread count.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .trilinear import FAST, INLINE, checked3d, interior3d, interior3d_value


@nb.njit(**INLINE)
def _position(coef, cp, pp, mm, x, y, z, out):
    """Domain point ``out[0:3]`` of voxel ``(x, y, z)`` and its input pixel position ``out[3:6]``."""
    k = cp.shape[0]
    px = pp[0, 0] * x + pp[0, 1] * y + pp[0, 2] * z + pp[0, 3]
    py = pp[1, 0] * x + pp[1, 1] * y + pp[1, 2] * z + pp[1, 3]
    pz = pp[2, 0] * x + pp[2, 1] * y + pp[2, 2] * z + pp[2, 3]
    tx = px + coef[k, 0] + px * coef[k + 1, 0] + py * coef[k + 2, 0] + pz * coef[k + 3, 0]
    ty = py + coef[k, 1] + px * coef[k + 1, 1] + py * coef[k + 2, 1] + pz * coef[k + 3, 1]
    tz = pz + coef[k, 2] + px * coef[k + 1, 2] + py * coef[k + 2, 2] + pz * coef[k + 3, 2]
    for j in range(k):
        dx = px - cp[j, 0]
        dy = py - cp[j, 1]
        dz = pz - cp[j, 2]
        u = math.sqrt(dx * dx + dy * dy + dz * dz)
        tx += u * coef[j, 0]
        ty += u * coef[j, 1]
        tz += u * coef[j, 2]
    out[0], out[1], out[2] = px, py, pz
    out[3] = mm[0, 0] * tx + mm[0, 1] * ty + mm[0, 2] * tz + mm[0, 3]
    out[4] = mm[1, 0] * tx + mm[1, 1] * ty + mm[1, 2] * tz + mm[1, 3]
    out[5] = mm[2, 0] * tx + mm[2, 1] * ty + mm[2, 2] * tz + mm[2, 3]


@nb.njit(**INLINE)
def _inside(rx: float, ry: float, rz: float, d: int, h: int, w: int) -> bool:
    return 0.0 <= rx < w - 1.0 and 0.0 <= ry < h - 1.0 and 0.0 <= rz < d - 1.0


@nb.njit(**FAST)
def _forward_slice(b, z, img, coef, cp, pp, mm, out, d, h, w, border):  # pragma: no cover - compiled
    oh, ow = out.shape[3], out.shape[4]
    cf, m = coef[b], mm[b]
    pos = np.empty(6)
    for y in range(oh):
        for x in range(ow):
            _position(cf, cp, pp, m, x, y, z, pos)
            rx, ry, rz = pos[3], pos[4], pos[5]
            for c in range(img.shape[1]):
                flat = img[b, c]
                if _inside(rx, ry, rz, d, h, w):
                    out[b, c, z, y, x] = interior3d_value(flat, rx, ry, rz, w, h * w)
                else:
                    out[b, c, z, y, x] = checked3d(flat, d, h, w, rx, ry, rz, border)[0]


@nb.njit(**FAST)
def _grad_slice(b, z, img, coef, cp, pp, mm, gout, partial, d, h, w, border):  # pragma: no cover - compiled
    oh, ow = gout.shape[3], gout.shape[4]
    k = cp.shape[0]
    cf, m, acc = coef[b], mm[b], partial[b, z]
    pos = np.empty(6)
    for y in range(oh):
        for x in range(ow):
            _position(cf, cp, pp, m, x, y, z, pos)
            rx, ry, rz = pos[3], pos[4], pos[5]
            gx = 0.0
            gy = 0.0
            gz = 0.0
            for c in range(img.shape[1]):
                flat = img[b, c]
                if _inside(rx, ry, rz, d, h, w):
                    _, vx, vy, vz = interior3d(flat, rx, ry, rz, w, h * w)
                else:
                    _, vx, vy, vz = checked3d(flat, d, h, w, rx, ry, rz, border)
                g = gout[b, c, z, y, x]
                gx += g * vx
                gy += g * vy
                gz += g * vz
            if gx == 0.0 and gy == 0.0 and gz == 0.0:
                continue  # outside the image or a flat neighbourhood: nothing to spread
            # ∂L/∂T = Mᵀ ∂L/∂r
            g0 = m[0, 0] * gx + m[1, 0] * gy + m[2, 0] * gz
            g1 = m[0, 1] * gx + m[1, 1] * gy + m[2, 1] * gz
            g2 = m[0, 2] * gx + m[1, 2] * gy + m[2, 2] * gz
            px, py, pz = pos[0], pos[1], pos[2]
            for j in range(k):
                dx = px - cp[j, 0]
                dy = py - cp[j, 1]
                dz = pz - cp[j, 2]
                u = math.sqrt(dx * dx + dy * dy + dz * dz)
                acc[j, 0] += u * g0
                acc[j, 1] += u * g1
                acc[j, 2] += u * g2
            acc[k, 0] += g0
            acc[k, 1] += g1
            acc[k, 2] += g2
            acc[k + 1, 0] += px * g0
            acc[k + 1, 1] += px * g1
            acc[k + 1, 2] += px * g2
            acc[k + 2, 0] += py * g0
            acc[k + 2, 1] += py * g1
            acc[k + 2, 2] += py * g2
            acc[k + 3, 0] += pz * g0
            acc[k + 3, 1] += pz * g1
            acc[k + 3, 2] += pz * g2


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
    "tps3d_forward": (_forward_threaded, _forward_serial),
    "tps3d_grad": (_grad_threaded, _grad_serial),
}
