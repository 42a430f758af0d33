"""Memory the kernels read and write: flat views, output buffers, and the finiteness check."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .._checks import all_finite

__all__ = ["buffer", "check_finite", "coefficient_gradient", "flat", "image_and_coefficients"]

# glibc serves allocations above its largest mmap threshold (32 MiB) with a fresh mmap each time, so
# every such buffer pays a 4 KiB page fault per page on first touch: 20 ms for the 82 MB field
# derivative of a 1 mm brain, a fifth of the warp. numpy asks the kernel for transparent huge pages
# on its large buffers (madvise), which cuts that to 3 ms (measured); smaller buffers are reused
# from the heap and need nothing.
_HUGE_PAGE_MIN_BYTES = 32 * 2**20
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def flat(img: Tensor) -> Tensor:
    """``(N, C, D, H, W)`` -> ``(N, C, D*H*W)`` (a view of a contiguous tensor), the 3D kernels' layout."""
    return img.reshape(*img.shape[:2], -1)


def buffer(shape: tuple[int, ...], dtype: torch.dtype, zero: bool = False) -> Tensor:
    """A CPU tensor for a kernel to fill: ``torch.empty`` / ``torch.zeros``, or numpy's huge-page
    memory for float buffers over ``_HUGE_PAGE_MIN_BYTES``."""
    if dtype in _NUMPY_DTYPES and math.prod(shape) * dtype.itemsize >= _HUGE_PAGE_MIN_BYTES:
        return torch.from_numpy((np.zeros if zero else np.empty)(shape, _NUMPY_DTYPES[dtype]))
    return (torch.zeros if zero else torch.empty)(shape, dtype=dtype)


def check_finite(theta: Tensor) -> None:
    """Refuse NaN or infinite transform parameters: the kernels run with fastmath, which assumes none."""
    if not all_finite(theta):
        raise ValueError("transform parameters contain NaN or infinity")


def image_and_coefficients(image: Tensor, coef: Tensor) -> tuple[Tensor, Tensor]:
    """The spline kernels' inputs: the image detached and contiguous, ``(N, C, D, H, W)``, and the
    coefficients ``(N or 1, ...)`` in float64, expanded to the image's batch and checked finite."""
    img = image.detach().contiguous()
    cf = coef.detach().to(torch.float64).expand(img.shape[0], *coef.shape[1:]).contiguous()
    check_finite(cf)
    return img, cf


def coefficient_gradient(grad: Tensor, coef_shape: torch.Size, coef_dtype: torch.dtype) -> Tensor:
    """``grad`` ``(N, ...)`` (float64) summed over the batch where the coefficients broadcast (a
    batch of 1), in their dtype."""
    if coef_shape[0] != grad.shape[0]:
        grad = grad.sum(0, keepdim=True)
    return grad.to(coef_dtype)
