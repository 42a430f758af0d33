"""Input validation shared by every layer: one place that words the errors users see."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_image(image: Tensor, name: str = "image", *, allow_integer: bool = False) -> int:
    """Validate an image batch ``(N, C, H, W)`` or ``(N, C, D, H, W)`` and return its spatial rank."""
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() not in (4, 5):
        raise ValueError(
            f"{name} must have shape (N, C, H, W) or (N, C, D, H, W), got {image.dim()} dims {tuple(image.shape)}"
        )
    if not image.is_floating_point() and not allow_integer:
        raise TypeError(
            f"{name} must be a floating-point tensor for interpolation, got {image.dtype}; "
            "use mode='nearest' or mode='label' for integer label maps"
        )
    if image.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")
    return image.dim() - 2


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite.

    One read-only reduction: NaN and infinity propagate into the sum, so a finite sum proves every
    entry finite (two ops and one host read, a device synchronization on a GPU); only a non-finite
    sum (or an overflowing one) pays for the exact element check.
    """
    if not tensor.is_floating_point():
        return True
    with torch.no_grad():
        return math.isfinite(tensor.sum().item()) or bool(torch.isfinite(tensor).all())


def check_finite(tensor: Tensor, name: str) -> None:
    """Raise if ``tensor`` holds NaN or infinity (see :func:`all_finite`)."""
    if not all_finite(tensor):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_batch(n_a: int, n_b: int, what: str) -> int:
    """Return the broadcast batch size of two batch sizes, where 1 broadcasts."""
    if n_a != n_b and 1 not in (n_a, n_b):
        raise ValueError(f"mismatched batch sizes for {what}: {n_a} vs {n_b} (only 1 broadcasts)")
    return max(n_a, n_b)


def expand_batch(a: Tensor, b: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` with a batch of 1 on either side expanded (a view) to the other's batch."""
    n = check_batch(a.shape[0], b.shape[0], what)
    if a.shape[0] != n:
        a = a.expand(n, *a.shape[1:])
    if b.shape[0] != n:
        b = b.expand(n, *b.shape[1:])
    return a, b


def check_ndim(ndim: int) -> int:
    """Validate a spatial rank: stnreg supports 2D and 3D."""
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    return ndim
