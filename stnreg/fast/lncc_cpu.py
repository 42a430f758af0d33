"""Numba kernels for the local normalized cross-correlation of 3D images, forward and gradient.

Box filters (window means with zero padding, divided by the full window volume, as
:func:`stnreg.losses.similarity._box_filter`) run as separable running sums with float64
accumulators. The loss needs five of them (``a, b, a², b², ab``); its gradient with respect to
``a`` three more, because the zero-padded box filter is its own adjoint:

    ∂L/∂a = box(g_ma) + 2 a box(g_aa) + b box(g_ab)

with ``g_*`` the derivatives of the loss with respect to the window statistics at each voxel.
Volumes are ``(D, H, W)`` float arrays; threads split the outer axis of each pass.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .trilinear import FAST, INLINE


@nb.njit(parallel=True, **FAST)
def _box_x(src, dst, r: int) -> None:  # pragma: no cover - compiled
    d, h, w = src.shape
    for z in nb.prange(d):
        for y in range(h):
            row, out = src[z, y], dst[z, y]
            s = 0.0
            for x in range(min(r, w)):
                s += row[x]
            for x in range(w):
                if x + r < w:
                    s += row[x + r]
                if x - r - 1 >= 0:
                    s -= row[x - r - 1]
                out[x] = s


@nb.njit(**INLINE)
def _step(acc, add, sub, out, scale: float) -> None:
    """One step of a running window sum over whole rows: ``acc += add - sub``, ``out = acc scale``.
    Row-wide, so LLVM vectorizes it; the array expressions it replaced made a temporary per row and
    ran 4x slower (measured)."""
    for x in range(acc.shape[0]):
        acc[x] = acc[x] + add[x] - sub[x]
        out[x] = acc[x] * scale


@nb.njit(parallel=True, **FAST)
def _box_y(src, dst, r: int, scale: float) -> None:  # pragma: no cover - compiled
    """``dst`` = ``scale`` times the window sums of radius ``r`` along axis 1 of ``src`` ``(D, H, W)``."""
    d, h, w = src.shape
    for z in nb.prange(d):
        acc, zero, spare = np.zeros(w), np.zeros(w), np.empty(w)
        for y in range(min(r, h)):
            _step(acc, src[z, y], zero, spare, 1.0)
        for y in range(h):
            _step(acc, src[z, y + r] if y + r < h else zero, src[z, y - r - 1] if y > r else zero, dst[z, y], scale)


_Z_BLOCK = 8
"""Rows ``y`` per task of :func:`_box_z`: each step then reads one contiguous block of the slice.
Running along z one row at a time strides a whole slice per read and ran 4x slower (measured)."""


@nb.njit(parallel=True, **FAST)
def _box_z(src, dst, r: int, scale: float) -> None:  # pragma: no cover - compiled
    """As :func:`_box_y` along axis 0; ``dst`` must not overlap ``src``."""
    d, h, w = src.shape
    for block in nb.prange((h + _Z_BLOCK - 1) // _Z_BLOCK):
        y0 = block * _Z_BLOCK
        y1 = min(h, y0 + _Z_BLOCK)
        acc, zero, spare = np.zeros((y1 - y0, w)), np.zeros(w), np.empty(w)
        for z in range(min(r, d)):
            for y in range(y0, y1):
                _step(acc[y - y0], src[z, y], zero, spare, 1.0)
        for z in range(d):
            for y in range(y0, y1):
                add = src[z + r, y] if z + r < d else zero
                _step(acc[y - y0], add, src[z - r - 1, y] if z > r else zero, dst[z, y], scale)


def _box_yz(x_summed: np.ndarray, window: tuple[int, int, int], out: np.ndarray, tmp: np.ndarray) -> None:
    """The y and z passes of :func:`box3d` on an array already summed along x; the result in ``out``."""
    kz, ky, kx = window
    _box_y(x_summed, tmp, ky // 2, 1.0)
    _box_z(tmp, out, kz // 2, 1.0 / (kx * ky * kz))


def box3d(x: np.ndarray, window: tuple[int, int, int], out: np.ndarray, tmp: np.ndarray) -> None:
    """``out`` = window mean of ``x`` ``(D, H, W)``, odd ``window`` in array order, zero padding."""
    _box_x(x, out, window[2] // 2)
    _box_yz(out, window, out, tmp)


@nb.njit(parallel=True, **FAST)
def _box_x_moments(a, b, sa, saa, sab, r: int) -> None:  # pragma: no cover - compiled
    """The x pass of the box filter for ``a``, ``a²`` and ``ab`` at once, the products made on the
    fly (no product volumes written and read back)."""
    d, h, w = a.shape
    for z in nb.prange(d):
        for y in range(h):
            ra, rb = a[z, y], b[z, y]
            oa, oaa, oab = sa[z, y], saa[z, y], sab[z, y]
            s1 = 0.0
            s2 = 0.0
            s3 = 0.0
            for x in range(min(r, w)):
                s1 += ra[x]
                s2 += ra[x] * ra[x]
                s3 += ra[x] * rb[x]
            for x in range(w):
                if x + r < w:
                    v, u = ra[x + r], rb[x + r]
                    s1 += v
                    s2 += v * v
                    s3 += v * u
                if x - r - 1 >= 0:
                    v, u = ra[x - r - 1], rb[x - r - 1]
                    s1 -= v
                    s2 -= v * v
                    s3 -= v * u
                oa[x] = s1
                oaa[x] = s2
                oab[x] = s3


@nb.njit(parallel=True, **FAST)
def _cc_terms(ma, mb, aa, bb, ab, weight, eps, partial) -> None:  # pragma: no cover - compiled
    """Local ``cc`` summed with ``weight`` (``(D, H, W)``, or ``(1, 1, 1)`` for a constant) per slice
    into ``partial``; ``ma, aa, ab`` are overwritten with ``g_ma, g_aa, g_ab``, the derivatives of
    ``-Σ weight · cc`` with respect to them (``mb`` and ``bb`` are only read, so they can be kept)."""
    d, h, w = ma.shape
    # A (1, 1, 1) weight stands for a uniform one: no volume of ones to allocate and read.
    full = weight.shape[0] > 1 or weight.shape[1] > 1 or weight.shape[2] > 1
    w0 = weight[0, 0, 0]
    for z in nb.prange(d):
        s = 0.0
        for y in range(h):
            for x in range(w):
                m_a, m_b = ma[z, y, x], mb[z, y, x]
                cross = ab[z, y, x] - m_a * m_b
                va = aa[z, y, x] - m_a * m_a
                vb = bb[z, y, x] - m_b * m_b
                pos_a = va > 0.0
                va = va if pos_a else 0.0
                vb = vb if vb > 0.0 else 0.0
                den = va * vb + eps
                cc = cross * cross / den
                wgt = weight[z, y, x] if full else w0
                g_ab = 0.0
                g_aa = 0.0
                if cc <= 1.0:
                    s += wgt * cc
                    g_ab = -wgt * 2.0 * cross / den
                    g_aa = wgt * cross * cross * vb / (den * den) if pos_a else 0.0
                else:
                    s += wgt
                ab[z, y, x] = g_ab
                aa[z, y, x] = g_aa
                ma[z, y, x] = -g_ab * m_b - 2.0 * g_aa * m_a
        partial[z] = s


@nb.njit(parallel=True, **FAST)
def _combine(a, b, g_ma, g_aa, g_ab, scale, out) -> None:  # pragma: no cover - compiled
    for z in nb.prange(a.shape[0]):
        out[z] = scale * (g_ma[z] + 2.0 * a[z] * g_aa[z] + b[z] * g_ab[z])


def fixed_stats(b: np.ndarray, window: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Window means ``box(b)`` and ``box(b²)`` of one channel ``(D, H, W)`` (float64)."""
    mb, bb, sq, tmp = (np.empty(b.shape) for _ in range(4))
    box3d(b, window, mb, tmp)
    np.multiply(b, b, out=sq, dtype=np.float64)
    box3d(sq, window, bb, tmp)
    return mb, bb


def lncc_forward(
    a: np.ndarray,
    b: np.ndarray,
    weight: np.ndarray,
    window: tuple[int, int, int],
    eps: float,
    b_stats: tuple[np.ndarray, np.ndarray] | None = None,
):
    """``Σ weight · cc`` of one channel ``(D, H, W)`` and the three derivative maps (float64).

    ``b_stats``: :func:`fixed_stats` of ``b`` when the caller keeps them (``b`` is the fixed image
    of a registration: its two window means are the same at every iteration).
    """
    shape = a.shape
    mb, bb = fixed_stats(b, window) if b_stats is None else b_stats
    ma, aa, ab, tmp = (np.empty(shape) for _ in range(4))
    _box_x_moments(a, b, ma, aa, ab, window[2] // 2)
    for m in (ma, aa, ab):
        _box_yz(m, window, m, tmp)
    partial = np.zeros(shape[0])
    _cc_terms(ma, mb, aa, bb, ab, weight, eps, partial)
    return partial.sum(), (ma, aa, ab)


def lncc_grad(a: np.ndarray, b: np.ndarray, terms, window: tuple[int, int, int], scale: float, out: np.ndarray) -> None:
    """``out = scale · ∂(-Σ weight · cc)/∂a`` for one channel from :func:`lncc_forward`'s derivative
    maps; ``out`` ``(D, H, W)`` may be float32 (written once, no float64 copy to convert)."""
    tmp = np.empty(a.shape)
    boxed = []
    for g in terms:
        box = np.empty(a.shape)
        box3d(g, window, box, tmp)
        boxed.append(box)
    _combine(a, b, boxed[0], boxed[1], boxed[2], scale, out)
