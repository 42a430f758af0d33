"""Cubic B-spline values and slopes at index positions, by the numba kernels (:mod:`.cubic_cpu`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import loader

__all__ = ["cubic_values"]


def cubic_values(coeffs: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Cubic B-spline values and their gradient (not differentiable; :mod:`stnreg.cubic` chains them).

    Args:
        coeffs: ``(N, C, H, W)`` or ``(N, C, D, H, W)`` B-spline coefficients on the CPU.
        idx: ``(N, P, d)`` index positions in ``(x, y[, z])`` order.

    Returns:
        Values ``(N, C, P)`` and derivatives ``(N, C, P, d)`` (per index unit) in ``coeffs``' dtype.
    """
    d = coeffs.dim() - 2
    n, c = coeffs.shape[:2]
    flat = coeffs.detach().contiguous().reshape(n, c, -1).double().numpy()
    pos = idx.detach().contiguous().double().numpy()
    out = np.empty((n, c, pos.shape[1]))
    dout = np.empty((n, c, pos.shape[1], d))
    loader.kernel(f"cubic{d}d")(flat, pos, out, dout, *coeffs.shape[2:])
    return torch.from_numpy(out).to(coeffs.dtype), torch.from_numpy(dout).to(coeffs.dtype)
