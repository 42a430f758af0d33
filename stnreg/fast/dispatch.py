"""Which path runs: every rule that sends work to a fast kernel, and the arguments it gets.

Each ``try_*`` function returns the fast path's result, or ``None`` when no fast path applies, so a
caller reads ``out = try_x(...)`` then ``if out is None: <reference path>``. Fast and reference paths
give the same numbers to float32 rounding (``tests/test_fast.py``).

Switches (read on every call):

- ``STNREG_FAST=0`` turns every fast path off.
- ``STNREG_FAST_REPORT=1`` prints each decision to stderr, ``stnreg.fast: <site>: <path>`` with the
  reason when the reference ran, e.g. ``stnreg.fast: warp: reference (2D image: grid_sample measured
  faster)``.

:func:`record` collects the same decisions as ``(site, path, reason)`` within a ``with`` block (how
the tests check which path ran). Sites: ``warp``, ``loss``, ``sample``, ``label``, ``displaced``,
``lncc``, ``cubic``; paths: the kernel's name or ``reference``.

Transforms are met through their hooks only (:meth:`~stnreg.transforms.Transform.affine_theta`,
``affine_head``, ``fast_warp_kind`` and ``fast_warp_args``), so a new family needs no line here
unless it brings a new kernel.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor

from .._checks import all_finite
from ..coords import Grid, normalized_to_index_matrix
from . import loader
from .affine import fused_affine_loss, fused_affine_warp
from .bspline import fused_bspline_warp
from .cubic import cubic_values
from .field import fast_sample, fused_field_warp
from .lncc import fast_lncc
from .tps import fused_tps_warp

__all__ = [
    "BSPLINE_ON_THE_FLY_MIN",
    "Hooked",
    "fast_available",
    "fast_cubic",
    "fused_available",
    "record",
    "try_fast_lncc",
    "try_fast_sample",
    "try_fused_displaced",
    "try_fused_loss",
    "try_fused_warp",
    "try_label_sample",
    "warp_chain",
]


class Hooked(Protocol):
    """What the rules ask of a transform; :class:`stnreg.transforms.Transform` answers all of it (this
    layer sits below the transforms and never imports them)."""

    fast_warp_kind: str | None

    def affine_theta(self, out: Sequence[int] | Grid, source: Grid | None = None) -> Tensor | None: ...

    def affine_head(self) -> tuple[Tensor | None, Hooked] | None: ...

    def fast_warp_args(self, out: Sequence[int] | Grid, pixel_map: Tensor) -> tuple[Tensor, ...] | None: ...


# Below this many output voxels a B-spline whose coefficients need a gradient warps faster through
# its dense field (the sampler keeps ∂out/∂coords, so its backward is a product, where the on-the-fly
# kernel gathers again): 6.9 vs 5.1 ms at 48x56x64, but 29 vs 38 ms at 80x96x112 and 309 vs 736 ms
# at 160x192x224, forward + backward on one thread. Forward alone, on the fly is faster at any size.
BSPLINE_ON_THE_FLY_MIN = 2**19

# Kernels that return no image gradient: an image that needs one takes the reference path.
_NO_IMAGE_GRADIENT = ("bspline", "tps")
_FLOATS = (torch.float32, torch.float64)
_RECORDERS: list[list[tuple[str, str, str]]] = []


@contextmanager
def record() -> Iterator[list[tuple[str, str, str]]]:
    """Collect every decision taken inside the block as ``(site, path, reason)`` (reason ``""`` when fast)."""
    events: list[tuple[str, str, str]] = []
    _RECORDERS.append(events)
    try:
        yield events
    finally:
        _RECORDERS.remove(events)


def _ran(site: str, path: str, why: str = "") -> None:
    for events in _RECORDERS:
        events.append((site, path, why))
    if os.environ.get("STNREG_FAST_REPORT") == "1":
        print(f"stnreg.fast: {site}: {path}" + (f" ({why})" if why else ""), file=sys.stderr)


def _fast(site: str, path: str, out: Any) -> Any:
    """``out``, reported as the fast ``path`` of ``site``."""
    _ran(site, path)
    return out


def _reference(site: str, why: str) -> None:
    """No fast path for ``site``, reported with the first rule that failed."""
    _ran(site, "reference", why)


def _cpu_refusal(t: Tensor, padding: str) -> str | None:
    """Why the numba kernels cannot take ``t`` with ``padding`` (``None``: they can)."""
    if not loader.enabled():
        return "STNREG_FAST=0"
    if t.device.type != "cpu":
        return f"{t.device.type} tensor"
    if t.dtype not in _FLOATS:
        return f"{t.dtype} values"
    if padding not in ("zeros", "border"):
        return f"{padding} padding"
    if loader.kernels() is None:
        return "numba unavailable"
    return None


def _fused_refusal(image: Tensor, padding: str) -> str | None:
    """Why the fused matrix kernels cannot take ``image`` (``None``: they can).

    CPU: float32/float64, 2D or 3D (numba). CUDA: float32 3D with at least 2 voxels along each axis
    (Triton; its cells always read two voxels per axis).
    """
    if not loader.use_triton(image):
        return _cpu_refusal(image, padding)
    if not loader.enabled():
        return "STNREG_FAST=0"
    if padding not in ("zeros", "border"):
        return f"{padding} padding"
    if image.dim() != 5 or image.dtype != torch.float32 or min(image.shape[2:]) < 2:
        return "the Triton kernels take float32 3D volumes of 2+ voxels per axis"
    if loader.triton() is None:
        return "triton unavailable"
    return None


def fast_available(image: Tensor, padding: str) -> bool:
    """Whether the numba kernels can read ``image`` (CPU, float32/float64) with ``padding`` (zeros, border)."""
    return _cpu_refusal(image, padding) is None


def fused_available(image: Tensor, padding: str) -> bool:
    """Whether :func:`~stnreg.fast.fused_affine_warp` and :func:`~stnreg.fast.fused_affine_loss` take
    this image and padding (see :func:`_fused_refusal`)."""
    return _fused_refusal(image, padding) is None


def warp_chain(image: Tensor, transform: Hooked, source: Grid | None) -> tuple[Hooked, Tensor] | None:
    """The innermost transform of a chain and ``(N or 1, d+1, d+1)`` float64 from its output point
    to the input pixel position: the constant affine matrices applied after it, the source's
    world-to-normalized map (world space) and normalized-to-pixel. ``None`` when a matrix of the
    chain needs a gradient (its gradient needs the grid) or is no affine."""
    split = transform.affine_head()
    if split is None:
        return None
    head, inner = split
    if head is not None and head.requires_grad:
        return None
    m = normalized_to_index_matrix(tuple(image.shape[2:]))
    if source is not None:
        m = m @ source.world_to_normalized()
    if head is not None:
        m = m @ head.detach().double().cpu()
    return inner, m.reshape(-1, *m.shape[-2:])


def try_fused_warp(
    image: Tensor,
    transform: Hooked,
    out: Sequence[int] | Grid,
    source: Grid | None = None,
    mode: str = "linear",
    padding: str = "zeros",
    antialias: bool = False,
) -> Tensor | None:
    """:func:`stnreg.warp` by a kernel that makes the coordinates on the fly, or ``None``.

    - an affine matrix (``transform.affine_theta``): :func:`~stnreg.fast.fused_affine_warp`, the
      gradient straight to the matrix;
    - a field, B-spline or thin-plate spline (``fast_warp_kind``), alone or after constant affine
      matrices: its kernel with the arguments of ``fast_warp_args``, gradients to its parameters.

    Args:
        image: ``(N, C, D, H, W)``; 2D images take ``grid_sample``, measured faster there
            (``benchmarks/results/sampler.md``).
        transform, out, source, mode, padding, antialias: as :func:`stnreg.warp`.

    Returns:
        ``(N, C, *out_shape)``, or ``None`` for the reference path.
    """
    if image.dim() != 5:
        return _reference("warp", "2D image: grid_sample measured faster")
    if mode != "linear" or antialias:
        return _reference("warp", f"{mode} mode" if mode != "linear" else "antialias")
    out_shape = tuple(int(s) for s in (out.shape if isinstance(out, Grid) else out))
    why = _fused_refusal(image, padding)
    if why is None:
        theta = transform.affine_theta(out, source)
        if theta is not None:
            return _fast("warp", "affine", fused_affine_warp(image, theta.to(image.dtype), out_shape, padding))
    why = why or _cpu_refusal(image, padding)
    if why is not None:
        return _reference("warp", why)
    chain = warp_chain(image, transform, source)
    if chain is None:
        return _reference("warp", "a matrix of the chain is no affine or needs a gradient")
    inner, m = chain
    kind = inner.fast_warp_kind
    if kind is None:
        return _reference("warp", f"no kernel for {type(inner).__name__}")
    if kind in _NO_IMAGE_GRADIENT and image.requires_grad:
        return _reference("warp", f"the {kind} kernel returns no image gradient")
    args = inner.fast_warp_args(out, m)
    if args is None:
        return _reference("warp", f"the output lattice does not fit the {kind} kernel")
    if kind == "field":
        return _fast("warp", kind, fused_field_warp(image, *args, padding))
    if kind == "bspline":
        if args[0].requires_grad and math.prod(out_shape) < BSPLINE_ON_THE_FLY_MIN:
            return _reference("warp", "small B-spline with a gradient: the dense field measured faster")
        return _fast("warp", kind, fused_bspline_warp(image, *args, out_shape, padding))
    return _fast("warp", kind, fused_tps_warp(image, *args, out_shape, padding))


def try_fused_loss(
    moving: Tensor,
    fixed: Tensor,
    transform: Hooked,
    out: Grid,
    source: Grid,
    loss: str,
    mask: Tensor | None = None,
    mode: str = "linear",
    labels: bool = False,
    padding: str = "border",
) -> Tensor | None:
    """Per-item MSE or ``1 - NCC`` of ``moving`` warped by a matrix against ``fixed``, or ``None``.

    The fused kernel (:func:`~stnreg.fast.fused_affine_loss`) scores the fixed voxels whose
    trilinear cell lies inside the moving image (ITK's overlap rule) and gives θ's gradient in the
    same pass, with no grid and no warped image.

    Args:
        moving: ``(N, C, D, H, W)`` on ``source``; fixed: ``(N, C, D', H', W')`` on ``out``.
        transform: fixed world points to moving world points; only a single affine matrix qualifies.
        loss: the similarity's name; ``mse`` and ``ncc`` have a kernel.
        mask: voxel weights, which the kernel does not take.
        mode: how the moving image is read; the kernel reads linearly.
        labels: whether a Dice term of warped label maps joins the objective; such objectives keep the
            reference path, as they always have.

    Returns:
        ``(N,)`` per-item values (``+inf`` for an item without overlap), or ``None``.
    """
    if loss not in ("mse", "ncc"):
        return _reference("loss", f"no kernel for {loss}")
    if mode != "linear" or mask is not None or labels:
        return _reference("loss", f"{mode} mode" if mode != "linear" else "a mask" if mask is not None else "labels")
    if moving.dim() != 5 or moving.device.type != "cpu":
        return _reference("loss", "the overlap rule runs in the 3D CPU kernels only")
    why = _fused_refusal(moving, padding)
    if why is not None:
        return _reference("loss", why)
    theta = transform.affine_theta(out, source)
    if theta is None:
        return _reference("loss", "not one affine matrix")
    return _fast("loss", "affine", fused_affine_loss(moving, fixed, theta, loss, padding, reduce=False, overlap=True))


def try_fast_sample(image: Tensor, coords: Tensor, padding: str) -> Tensor | None:
    """Linear :func:`stnreg.sample` by the numba trilinear kernels (:func:`~stnreg.fast.fast_sample`),
    or ``None``: 2D (``grid_sample``'s vectorized kernel measured faster) or no kernel for the tensors.

    Args:
        image: ``(N, C, *spatial)``; coords: ``(N, *out, d)`` normalized, the image's dtype.
    """
    if image.dim() != 5:
        return _reference("sample", "2D image: grid_sample measured faster")
    why = _cpu_refusal(image, padding) or ("coordinates not on the CPU" if coords.device.type != "cpu" else None)
    if why is not None:
        return _reference("sample", why)
    return _fast("sample", "trilinear", fast_sample(image, coords, padding))


def try_label_sample(image: Tensor, coords: Tensor, padding: str) -> Tensor | None:
    """``stnreg.sample(image, coords, "label", padding)`` by one vote per output voxel among its
    neighbours' labels (:func:`stnreg.fast.labels_cpu.label_sample`: the same values, ties included),
    or ``None``.

    Args:
        image: ``(N, C, *spatial)`` label map, any integer, bool or float dtype.
        coords: ``(N or 1, *out, d)`` normalized coordinates.
    """
    # The coordinates are what the kernel reads as floats. The reference reads non-finite
    # coordinates its own way, and 64-bit unsigned labels would not survive the kernel's int64.
    why = _cpu_refusal(coords, padding)
    if why is None and image.device.type != "cpu":
        why = f"{image.device.type} image"
    if why is None and (image.dtype == torch.uint64 or image.is_complex()):
        why = f"{image.dtype} labels"
    if why is None and not all_finite(coords):
        why = "non-finite coordinates"
    if why is not None:
        return _reference("label", why)
    from .labels_cpu import label_sample  # numba compiles it on first import: after the checks

    return _fast("label", "label", label_sample(image, coords, padding))


def try_fused_displaced(field: Tensor, vec: Tensor) -> Tensor | None:
    """``field`` ``(N, C, *shape)`` read (linear, border) at its own lattice points moved by ``vec``
    ``(N, d, *shape)`` in its normalized units, by the kernels that read ``vec`` in place; or ``None``
    (2D, another lattice, no kernel)."""
    shape = tuple(vec.shape[2:])
    if len(shape) != 3 or tuple(field.shape[2:]) != shape:
        return _reference("displaced", "2D or another lattice")
    why = _cpu_refusal(field, "border")
    if why is not None:
        return _reference("displaced", why)
    # Lattice point i is input pixel i, and a normalized unit is n / 2 pixels along an axis of n voxels.
    k = torch.eye(3, 4, dtype=torch.float64)[None]
    r = normalized_to_index_matrix(shape)[None, :3, :3]
    return _fast("displaced", "field", fused_field_warp(field, vec, k, r, "border"))


def try_fast_lncc(
    a: Tensor, b: Tensor, window: Sequence[int], mask: Tensor | None, eps: float, reduce: bool
) -> Tensor | None:
    """:func:`stnreg.losses.lncc_loss` by the numba kernels (:func:`~stnreg.fast.fast_lncc`), or ``None``.

    The kernels give the gradient of 3D CPU images to ``a`` alone and one batch value (or one item's).

    Args:
        a, b: ``(N, C, D, H, W)``; window: odd sizes, array order; mask: ``(N or 1, 1, D, H, W)`` or ``None``.

    Returns:
        The batch mean (``reduce``) or ``(1,)``, or ``None``.
    """
    if not (reduce or a.shape[0] == 1):
        return _reference("lncc", "per-item values of a batch")
    if a.dim() != 5 or a.device.type != "cpu":
        return _reference("lncc", "not a 3D CPU image")
    if b.requires_grad or (mask is not None and mask.requires_grad):
        return _reference("lncc", "a gradient to the fixed image or the mask")
    why = _cpu_refusal(a, "zeros")
    if why is not None:
        return _reference("lncc", why)
    value = fast_lncc(a, b, tuple(window), mask, eps)
    return _fast("lncc", "lncc", value if reduce else value.reshape(1))


def fast_cubic(coeffs: Tensor, idx: Tensor) -> tuple[Tensor, Tensor] | None:
    """Cubic B-spline values and slopes by the numba kernels (:func:`~stnreg.fast.cubic.cubic_values`),
    or ``None`` where they cannot run (CUDA, no numba, ``STNREG_FAST=0``).

    Args:
        coeffs: ``(N, C, *spatial)`` B-spline coefficients; idx: ``(N, P, d)`` index positions, ``(x, y, z)``.

    Returns:
        Values ``(N, C, P)`` and derivatives ``(N, C, P, d)`` in ``coeffs``' dtype, not differentiable.
    """
    why = _cpu_refusal(coeffs, "border")
    if why is not None:
        return _reference("cubic", why)
    return _fast("cubic", "cubic", cubic_values(coeffs, idx))
