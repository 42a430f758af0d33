"""Numba kernels: label-preserving resampling on the CPU, the fast form of ``sample(..., mode="label")``.

The reference (:func:`stnreg.sampler.sample`) interpolates each label's indicator linearly and keeps
the label of largest weight, ties going to the smallest label value, with the fill value 0 where
no input voxel has weight under zero padding: one ``grid_sample`` per label, so the AAL atlas (116
labels) cost 116 trilinear passes. Only the labels of an output voxel's 4 (2D) or 8 (3D) input
neighbours can have a weight there, so these kernels sum the bilinear/trilinear weights of each
distinct neighbour label and keep the largest: one gather pass whatever the number of labels, and
none of the weights where all neighbours hold the same label (most of an atlas).

Same results, ties included: the weights are computed with the floating-point operations of
``grid_sample``'s CPU kernels, in the coordinates' dtype, with ``fastmath`` off so that nothing is
reordered or fused that the reference does not fuse. The two kernels round differently and both are
followed. 3D (the scalar kernel): position ``((g + 1) n - 1) / 2``, factors ``(floor r + 1) - r``
and ``r - floor r``, multiplied x, y, then z. 2D (the vectorized kernel): position
``(g + 1) (n / 2) - 1/2``, one FMA where torch runs its AVX2/AVX512 build (the compiler contracts it
there; its DEFAULT build rounds twice, which equals the 3D form, halving being exact), factors
``w = r - floor r`` and ``e = 1 - w``. A label's weight is the sum of its in-bounds corners' weights
in ``grid_sample``'s corner order (``x`` fastest, then ``y``, then ``z``), which is the indicator's
interpolation (its other terms add exact zeros).

Threads split output slices (3D) or rows (2D), each writing its own outputs, as in
:mod:`.affine_cpu`; with one torch thread the serial twin runs.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from numba.extending import intrinsic
from torch import Tensor

from .._checks import check_batch

__all__ = ["label_sample"]

# No fastmath: the weights must round exactly as grid_sample's do (no reassociation, no contraction).
_OPTS = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}
_INLINE = {"inline": "always", "nogil": True, "fastmath": False, "error_model": "numpy"}


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (LLVM's ``fma``), all three of one float type."""

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


@nb.njit(**_INLINE)
def _position(g, n, k):
    """Pixel position of normalized ``g`` along an axis of ``n`` voxels, and whether it can touch the
    image (not beyond one voxel outside, which also keeps ``floor`` within int range). ``n`` and the
    constants ``k = (0, 1, 2, border, fused, ...)`` come in ``g``'s dtype, so float32 stays float32."""
    zero, one, two = k[0], k[1], k[2]
    r = _fma(g + one, n / two, -(one / two)) if k[4] != zero else ((g + one) * n - one) / two
    if k[3] != zero:
        r = min(max(r, zero), n - one)
    return r, r > -two and r < n + one


@nb.njit(**_INLINE)
def _add(labels, weights, count: int, value, weight) -> int:
    """Add ``weight`` to ``value``'s running sum (a new entry if it has none); the new count."""
    for j in range(count):
        if labels[j] == value:
            weights[j] += weight
            return count
    labels[count] = value
    weights[count] = weight
    return count + 1


@nb.njit(**_INLINE)
def _vote(labels, weights, count: int, fallback):
    """The label of largest summed weight among ``count`` distinct labels, ties to the smallest
    value; ``fallback`` where no label has a positive weight."""
    best_w = weights[0] - weights[0]
    best = fallback
    for j in range(count):
        wj = weights[j]
        if wj > best_w or (wj == best_w and best_w > 0 and labels[j] < best):
            best_w = wj
            best = labels[j]
    return best


@nb.njit(**_OPTS)
def _slice3d(b, z, image, shape, coords, k, out, fallback):  # pragma: no cover - compiled
    """Output slice ``z`` of item ``b``: image ``(Ni, C, D*H*W)`` of spatial ``shape`` ``(D, H, W)``,
    coords ``(Nc, D', H', W', 3)``, ``k = (0, 1, 2, border, fused, W, H, D)`` in the coords' dtype, out
    ``(N, C, D', H', W')``."""
    d, h, w = shape[0], shape[1], shape[2]
    hw = h * w
    img = image[b if image.shape[0] > 1 else 0]
    grid = coords[b if coords.shape[0] > 1 else 0, z]
    dst = out[b, :, z]
    one = k[1]
    labels = np.empty(8, img.dtype)
    weights = np.empty(8, grid.dtype)
    for y in range(grid.shape[0]):
        for x in range(grid.shape[1]):
            rx, okx = _position(grid[y, x, 0], k[5], k)
            ry, oky = _position(grid[y, x, 1], k[6], k)
            rz, okz = _position(grid[y, x, 2], k[7], k)
            if not (okx and oky and okz):
                dst[:, y, x] = fallback
                continue
            fx, fy, fz = np.floor(rx), np.floor(ry), np.floor(rz)
            x0, y0, z0 = int(fx), int(fy), int(fz)
            # grid_sample's 3D factors (corner + 1) - r and r - corner, multiplied x, y, then z.
            tx = ((fx + one) - rx, rx - fx)
            ty = ((fy + one) - ry, ry - fy)
            tz = ((fz + one) - rz, rz - fz)
            base = (z0 * h + y0) * w + x0
            inside = x0 >= 0 and y0 >= 0 and z0 >= 0 and x0 + 1 < w and y0 + 1 < h and z0 + 1 < d
            for c in range(img.shape[0]):
                src = img[c]
                if inside:
                    v = src[base]
                    if (
                        src[base + 1] == v
                        and src[base + w] == v
                        and src[base + w + 1] == v
                        and src[base + hw] == v
                        and src[base + hw + 1] == v
                        and src[base + hw + w] == v
                        and src[base + hw + w + 1] == v
                    ):
                        # One label around a point inside: the whole (positive) weight is its own.
                        dst[c, y, x] = v
                        continue
                count = 0
                for corner in range(8):
                    dx, dy, dz = corner & 1, (corner >> 1) & 1, corner >> 2
                    cx, cy, cz = x0 + dx, y0 + dy, z0 + dz
                    if cx < 0 or cy < 0 or cz < 0 or cx >= w or cy >= h or cz >= d:
                        continue
                    weight = (tx[dx] * ty[dy]) * tz[dz]
                    count = _add(labels, weights, count, src[(cz * h + cy) * w + cx], weight)
                dst[c, y, x] = _vote(labels, weights, count, fallback)


@nb.njit(**_OPTS)
def _row2d(b, y, image, shape, coords, k, out, fallback):  # pragma: no cover - compiled
    """Output row ``y`` of item ``b``: image ``(Ni, C, H*W)`` of spatial ``shape`` ``(H, W)``, coords
    ``(Nc, H', W', 2)``, ``k = (0, 1, 2, border, fused, W, H)`` in the coords' dtype, out ``(N, C, H', W')``."""
    h, w = shape[0], shape[1]
    img = image[b if image.shape[0] > 1 else 0]
    row = coords[b if coords.shape[0] > 1 else 0, y]
    dst = out[b, :, y]
    one = k[1]
    labels = np.empty(4, img.dtype)
    weights = np.empty(4, row.dtype)
    for x in range(row.shape[0]):
        rx, okx = _position(row[x, 0], k[5], k)
        ry, oky = _position(row[x, 1], k[6], k)
        if not (okx and oky):
            dst[:, x] = fallback
            continue
        fx, fy = np.floor(rx), np.floor(ry)
        x0, y0 = int(fx), int(fy)
        # The vectorized 2D kernel's factors: w = r - floor r and e = 1 - w (rounded), e * s first.
        wx, wy = rx - fx, ry - fy
        tx = (one - wx, wx)
        ty = (one - wy, wy)
        for c in range(img.shape[0]):
            src = img[c]
            count = 0
            for corner in range(4):
                dx, dy = corner & 1, corner >> 1
                cx, cy = x0 + dx, y0 + dy
                if cx < 0 or cy < 0 or cx >= w or cy >= h:
                    continue
                count = _add(labels, weights, count, src[cy * w + cx], ty[dy] * tx[dx])
            dst[c, x] = _vote(labels, weights, count, fallback)


# Drivers as in affine_cpu: module-level functions, so numba's disk cache finds them next time.


@nb.njit(parallel=True, **_OPTS)
def _label3d_threaded(n_b, od, *args):  # pragma: no cover - compiled
    for task in nb.prange(n_b * od):
        _slice3d(task // od, task % od, *args)


@nb.njit(**_OPTS)
def _label3d_serial(n_b, od, *args):  # pragma: no cover - compiled
    for task in range(n_b * od):
        _slice3d(task // od, task % od, *args)


@nb.njit(parallel=True, **_OPTS)
def _label2d_threaded(n_b, oh, *args):  # pragma: no cover - compiled
    for task in nb.prange(n_b * oh):
        _row2d(task // oh, task % oh, *args)


@nb.njit(**_OPTS)
def _label2d_serial(n_b, oh, *args):  # pragma: no cover - compiled
    for task in range(n_b * oh):
        _row2d(task // oh, task % oh, *args)


def label_sample(image: Tensor, coords: Tensor, padding: str = "zeros") -> Tensor:
    """``stnreg.sample(image, coords, "label", padding)`` by one vote per output voxel, on the CPU.

    Args:
        image: ``(N, C, H, W)`` or ``(N, C, D, H, W)`` label map, any integer, bool or float dtype.
        coords: ``(N, H', W', 2)`` or ``(N, D', H', W', 3)`` normalized ``(x, y, z)`` coordinates,
            float32 or float64, finite (a batch of 1 on either side broadcasts).
        padding: ``"zeros"`` or ``"border"``.

    Returns:
        ``(N, C, *out_spatial)`` in the image's dtype; no gradient (labels have none).
    """
    ndim = image.dim() - 2
    n = check_batch(image.shape[0], coords.shape[0], "image and coordinates")
    work = image.detach().to(torch.float64 if image.is_floating_point() else torch.int64)
    flat = work.reshape(*work.shape[:2], -1).contiguous()
    grid = coords.detach().contiguous()
    out_shape = tuple(grid.shape[1:-1])
    # The reference starts every voxel at the smallest label of the whole batch and keeps it where
    # no label has weight, which only zero padding reaches (and then fills 0 instead).
    fallback = flat.numpy().dtype.type(0 if padding == "zeros" else work.min().item())
    sizes = list(reversed(image.shape[2:]))
    # grid_sample's vectorized 2D kernel computes (g + 1) n/2 - 1/2 as one FMA where torch runs its
    # AVX2/AVX512 builds (the compiler contracts it there; the DEFAULT build rounds twice).
    fused = ndim == 2 and torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    k = np.array([0, 1, 2, padding == "border", fused, *sizes], dtype=grid.numpy().dtype)
    out = torch.empty((n, image.shape[1], *out_shape), dtype=work.dtype)
    threads = max(1, min(torch.get_num_threads(), nb.config.NUMBA_NUM_THREADS))
    if threads > 1:
        nb.set_num_threads(threads)
        kernel = _label3d_threaded if ndim == 3 else _label2d_threaded
    else:
        kernel = _label3d_serial if ndim == 3 else _label2d_serial
    # Arrays, not tuples: the threaded drivers pass their arguments through numba's gufunc wrapper.
    shape = np.array(image.shape[2:], dtype=np.int64)
    kernel(n, out_shape[0], flat.numpy(), shape, grid.numpy(), k, out.numpy(), fallback)
    return out.to(image.dtype)
